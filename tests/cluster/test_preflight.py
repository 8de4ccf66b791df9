"""Gangs checked before any work: an impossible gang (or an RL stage's actor groups that leave no
room for it) fails the run before its first stage, naming the key; on an autoscaling cluster a
gang that fits only the cluster the autoscaler may build is announced as a wait. The autoscaler's
cluster config is the record KubeRay and the launcher publish in the GCS, written here directly."""
import pytest
import ray
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put
from typer.testing import CliRunner

from cluster.gang import GangConfig, preflight, shortfall, summed
from cluster.roles import ActorGroup
from cluster.session import RaySettings, connect
from pipelines.cli import app
from pipelines.config import load_config
from pipelines.runner import run_pipeline
from tests.conftest import REPO

DEMO = REPO / "recipes" / "demo.yaml"


@pytest.fixture(scope="module")
def local_ray():
    connect(RaySettings(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture()
def autoscaler(local_ray):
    """The cluster config of an autoscaler that may add up to 8 nodes of 4 CPUs."""
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.resources["CPU"] = 4
    group.max_count = 8
    ns, key = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE, ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=ns)
    yield
    _internal_kv_del(key, namespace=ns)


def test_an_impossible_gang_fails_the_run_before_its_first_stage(local_ray, tmp_path):
    cfg = load_config(DEMO, ["pretrain.gang.num_workers=64", f"runs_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"pretrain\.gang: a gang of 64 workers"):
        run_pipeline(cfg, "t")
    assert not (tmp_path / "t" / "ingest").exists()  # nothing ran


def test_rollout_workers_that_leave_no_room_for_the_gang_fail_first(local_ray, tmp_path):
    cfg = load_config(DEMO, ["prl.rollout.workers=2", f"runs_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"prl_1\.gang: the gang .* and its RL actor groups"):
        run_pipeline(cfg, "t")
    assert not (tmp_path / "t" / "ingest").exists()


def test_every_rl_actor_group_counts_beside_the_gang(local_ray, tmp_path):
    from pipelines.runner import role_resources
    cfg = load_config(DEMO, ["prl.rollout.workers=1", "prl.loss.kl_coef=0.1", "prl.roles.reference.workers=2",
                             "prl.roles.reference.use_gpu=true", "prl.roles.reference.cpus_per_worker=0.5",
                             f"runs_dir={tmp_path}"])
    assert role_resources(cfg.section("prl_1")) == {"CPU": 2.0, "GPU": 2.0}
    assert role_resources(load_config(DEMO, [f"runs_dir={tmp_path}"]).section("prl_1")) is None
    with pytest.raises(ValueError, match=r"prl_1\.gang: .* and its RL actor groups \(\{'CPU': 2.0, 'GPU': 2.0\}\)"):
        run_pipeline(cfg, "t")
    assert not (tmp_path / "t" / "ingest").exists()


def test_on_an_autoscaling_cluster_a_gang_waits_for_nodes_or_fails_past_the_maximum(autoscaler):
    wait = preflight(GangConfig(num_workers=16), "sft.gang")
    assert wait is not None and "autoscaler can add the nodes" in wait and "{'CPU': 16" in wait
    assert preflight(GangConfig(num_workers=2), "sft.gang") is None  # fits the 2 CPUs there now
    with pytest.raises(ValueError, match=r"sft\.gang: a gang of 64 workers .* autoscaler's largest cluster"):
        preflight(GangConfig(num_workers=64), "sft.gang")


def test_totals_and_shortfall():
    assert summed([{"CPU": 2, "GPU": 1}, {"CPU": 0.5, "memory": 4}]) == {"CPU": 2.5, "GPU": 1, "memory": 4}
    assert shortfall({"CPU": 2.5, "GPU": 1}, {"CPU": 2.5, "GPU": 0}) == {"GPU": 1}
    assert shortfall({"CPU": 2.5}, {"CPU": 2.5 - 1e-12}) == {}  # float sums of fractional CPUs


class Idle:
    def __init__(self, device: str):
        self.device = device


@pytest.mark.parametrize("group_cpus, fits", [(1.0, True), (1.5, False)])
def test_the_preflight_and_an_actor_group_apply_one_fit_rule(local_ray, group_cpus, fits):
    """A 1-CPU gang beside a group of group_cpus on the 2-CPU cluster: the run's preflight and the
    group itself (at its start) agree on whether it fits."""
    gang = GangConfig(num_workers=1)
    reserve = {"CPU": 1.0}
    if fits:
        assert preflight(gang, "prl_1.gang", {"CPU": group_cpus}) is None
        ActorGroup(Idle, (), workers=1, use_gpu=False, cpus_per_worker=group_cpus, strategy="PACK",
                   key="prl.rollout.workers", reserve=reserve).shutdown()
        return
    with pytest.raises(ValueError, match=r"prl_1\.gang: the gang .* need \{'CPU': 2\.5\} in all, but the cluster has \{'CPU': 2\.0\}"):
        preflight(gang, "prl_1.gang", {"CPU": group_cpus})
    with pytest.raises(ValueError, match=r"prl.rollout.workers=1: the role workers need \{'CPU': 1\.5\} beside the gang's \{'CPU': 1\.0\}"):
        ActorGroup(Idle, (), workers=1, use_gpu=False, cpus_per_worker=group_cpus, strategy="PACK",
                   key="prl.rollout.workers", reserve=reserve)


def test_the_cli_names_the_gang_and_exits_2(tmp_path):
    res = CliRunner().invoke(app, ["run", str(DEMO), "--runs-dir", str(tmp_path), "--set", "pretrain.gang.num_workers=64"],
                             env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "pretrain.gang: a gang of 64 workers" in res.output
    assert not (tmp_path / "demo" / "ingest").exists()
