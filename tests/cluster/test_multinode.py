"""Several nodes, simulated on one machine with ``ray.cluster_utils.Cluster``: a head without CPUs
(the driver's node) and worker nodes started and killed inside the tests (``remove_node``, not
graceful). One cluster for the module; nodes are added as the tests consume them.

Data: a shard pass on one node is the reference; the same pass over two nodes, one of them killed
with a shard in flight, fails, and its rerun redoes only the shard the dead node held, ending with
the reference's bytes. Training (STRICT_SPREAD gangs, workers on different nodes, counted by the
node ids the workers report), against one uninterrupted gang on one node: a spread gang with a
node killed mid-stage restarts on the nodes left from its last checkpoint and ends with the
reference's losses and model bytes (so neither spreading nor the restart changes a bit); a node
that never comes back leaves an elastic gang (``gang.min_workers``) resuming on fewer workers from
a universal checkpoint, and a gang that may not shrink failing with an error that says so.
"""
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.gang import GangConfig, launch_size, preflight
from cluster.session import shutdown
from cluster.sharded import configure, run_sharded
from cluster.train import GangLostNodes, run_pretrain
from data_engine.schema import RECORD_SCHEMA
from tests.cluster.recording_step import RecordingQualityStep, records
from tests.cluster.test_train_gang import losses, paths
from tests.pretrain_corpus import documents, write_corpus, write_tokenizer
from training.config import PretrainConfig
from training.pretrain import Paths

CFG = PretrainConfig.model_validate({
    "steps": 8, "eval_every": 8, "checkpoint": {"every": 4, "keep": 3},
    "model": {"preset": "tiny", "overrides": dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                                  dense_hidden=64, expert_hidden=32, max_seq_len=32)},
    "engine": {"zero_stage": 2, "optimizer": {"warmup_steps": 2}},
    "data": {"seq_len": 16, "micro_batch": 2, "global_batch": 8, "val_fraction": 0.1}})
SPREAD = dict(num_workers=2, placement_strategy="STRICT_SPREAD")
START_TIMEOUT_S = "3"  # how long a restarting gang waits for a lost node (Ray's default: 60 s)
IP = "127.0.0.2"  # loopback, as the local cluster (cluster/session.py)
# the GCS declares a killed node dead after a few seconds, not ~15 s: the driver's re-check of the
# nodes after a failed placement sees it gone sooner
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                      "health_check_timeout_ms": 2000}
SHARDS = 6


class Nodes:
    """The cluster's worker nodes: added on demand, killed by the node id a worker reported."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.worker_nodes}

    def ensure(self, count: int, num_cpus: int = 2) -> None:
        while len(self.cluster.worker_nodes) < count:
            self.cluster.add_node(num_cpus=num_cpus, node_ip_address=IP)
        self.cluster.wait_for_nodes()

    def kill(self, node_id: str) -> None:
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)


@pytest.fixture(scope="module")
def nodes():
    shutdown()  # a local session an earlier module left in this process
    saved = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = START_TIMEOUT_S  # read by Ray Train at fit()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": IP, "_system_config": FAST_HEALTH_CHECKS})
    cluster.add_node(num_cpus=2, node_ip_address=IP)
    ray.init(address=cluster.address, logging_level="WARNING", runtime_env={"env_vars": {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]},
        "worker_process_setup_hook": "cluster.session.quiet_local_workers"})
    configure()
    yield Nodes(cluster)
    ray.shutdown()
    cluster.shutdown()
    if saved is None:
        os.environ.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
    else:
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = saved


def run_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """fn in a thread (the main thread must stay free to kill nodes); its result or error in the dict."""
    out: dict = {}

    def body():
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def joined(thread: threading.Thread, out: dict):
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not end"
    if "error" in out:
        raise out["error"]
    return out["result"]


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def shard_items(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    docs = documents()[:SHARDS * 12]
    items = []
    for i in range(SHARDS):
        rows = [{"id": f"s{i:02d}-{j:02d}", "text": d, "source": "stdlib", "meta": "{}"}
                for j, d in enumerate(docs[i::SHARDS])]
        path = root / f"part-{i:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), path)
        items.append({"index": i, "path": str(path)})
    return items


def shard_pass(out: Path, items: list[dict], victim: str | None = None):
    (out / "marks").mkdir(parents=True, exist_ok=True)
    return run_sharded(RecordingQualityStep, {"marks": str(out / "marks"), "victim": victim}, items,
                       out / "shards", actors=False)


def outputs(shards: Path) -> dict[str, bytes]:
    return {f"{kind}/{p.name}": p.read_bytes() for kind in ("data", "rejected")
            for p in sorted((shards / kind).glob("*.parquet"))}


@pytest.fixture(scope="module")
def one_node_shards(nodes, shard_items, tmp_path_factory):
    """The reference: the shard pass while the cluster has one worker node."""
    assert len(nodes.ids()) == 1, "the one-node reference must run before other nodes are added"
    out = tmp_path_factory.mktemp("one-node")
    stats, errors = shard_pass(out, shard_items)
    assert not errors and len(stats) == SHARDS
    assert {n for ran in records(out / "marks").values() for n in ran} == nodes.ids()
    return out


def test_a_killed_node_costs_the_data_stage_only_the_shard_it_held(nodes, shard_items, one_node_shards, tmp_path):
    first = next(iter(nodes.ids()))
    nodes.ensure(2, num_cpus=1)  # one shard at a time there: its first finishes, its second is held
    victim = (nodes.ids() - {first}).pop()
    thread, result = run_in_thread(shard_pass, tmp_path, shard_items, victim)
    done, marks = tmp_path / "shards" / "done", tmp_path / "marks"
    wait_until(lambda: len(list(done.glob("*.json"))) + len(list(marks.glob("hanging-*"))) == SHARDS,
               "every shard finished or held by the node to kill")
    nodes.kill(victim)
    thread.join(timeout=120)
    assert "error" in result, "the pass with a dead node's shard in flight should fail"

    held = sorted(p.name.split("-", 1)[1] for p in marks.glob("hanging-*"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.glob("*.json")}
    ran = records(marks)
    assert {n for shards in ran.values() for n in shards} == {first, victim}  # spread over both
    finished_on_victim = {s for s, on in ran.items() if victim in on} - set(held)
    assert finished_on_victim and len(before) == SHARDS - len(held)

    stats, errors = shard_pass(tmp_path, shard_items)  # the rerun on the node left
    assert not errors and len(stats) == SHARDS
    redone = {s for s, on in records(marks).items() if len(on) > len(ran.get(s, []))}
    assert redone == set(held)  # only the lost shards, each once, on the node left
    assert all(records(marks)[s].count(first) == 1 for s in held)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.glob("*.json")
            if p.name in before} == before  # finished shards untouched, the dead node's too
    assert outputs(tmp_path / "shards") == outputs(one_node_shards / "shards")


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gang")
    files = write_corpus(root, n_docs=150)
    write_tokenizer(root / "tok", files, vocab_size=300)
    return root, files


def train(corpus, name: str, gang: GangConfig, fault: str | None = None):
    p, rows = paths(corpus, name), []
    return p, rows, run_pretrain(CFG, gang, p, seed=0, on_metrics=rows.append, fault=fault)


@pytest.fixture(scope="module")
def one_node_run(nodes, corpus):
    """The reference: an uninterrupted gang of 2 on one node."""
    p, rows, summary = train(corpus, "one-node", GangConfig(num_workers=2, placement_strategy="STRICT_PACK"))
    assert (summary["gang_workers"], summary["gang_nodes"]) == (2, 1)
    assert [r["step"] for r in rows] == list(range(1, CFG.steps + 1))
    return p, rows, summary


def kill_the_node_of_worker1(nodes, p: Paths, fault: str) -> str:
    marker = p.work / f"fault-{fault.partition('=')[0].replace(':', '_')}"
    wait_until(marker.exists, f"{marker} (worker 1 holding at its step)", timeout=240)
    node = marker.read_text().split()[-1]  # "fired on node <id>"
    nodes.kill(node)
    return node


def test_a_gang_spread_over_nodes_trains_as_on_one_and_restarts_from_its_checkpoint(nodes, corpus, one_node_run):
    """A gang on two nodes, one of them killed mid-stage, restarts on the nodes left from its last
    checkpoint and ends with the losses and the model bytes of the uninterrupted gang on one node:
    spreading changes nothing, and neither does the restart."""
    nodes.ensure(3)  # two for the gang, one to restart on
    fault = "pretrain:worker1:step6=hang"
    p = paths(corpus, "killed")
    thread, result = run_in_thread(train, corpus, "killed", GangConfig(**SPREAD, max_failures=1), fault)
    killed = kill_the_node_of_worker1(nodes, p, fault)
    _, rows, summary = joined(thread, result)
    assert killed not in nodes.ids()
    assert summary["resumed_from_step"] == 4  # the checkpoint before the kill
    assert (summary["gang_workers"], summary["gang_nodes"]) == (2, 2)  # on the two nodes left
    assert [r["step"] for r in rows][:6] == list(range(1, 7)) and rows[6]["step"] == 5  # 5-6 replayed
    assert losses(rows) == losses(one_node_run[1])  # bitwise, every step
    assert summary["val/loss"] == one_node_run[2]["val/loss"]
    model = Path("model") / "model.safetensors"
    assert (p.out / model).read_bytes() == (one_node_run[0].out / model).read_bytes()


def test_an_elastic_gang_resumes_on_fewer_workers_when_a_node_never_comes_back(nodes, corpus, one_node_run):
    nodes.ensure(2)
    fault = "pretrain:worker1:step5=hang"
    p = paths(corpus, "shrunk")
    gang = GangConfig(**SPREAD, min_workers=1)
    thread, result = run_in_thread(train, corpus, "shrunk", gang, fault)
    kill_the_node_of_worker1(nodes, p, fault)
    _, rows, summary = joined(thread, result)
    assert len(nodes.ids()) == 1
    assert (summary["gang_workers"], summary["gang_nodes"]) == (1, 1)
    assert summary["resumed_from_step"] == 4
    assert (p.checkpoints / "step_00000004" / "universal" / "zero").is_dir()  # resharded 2 -> 1
    ref, got = losses(one_node_run[1]), losses(rows)
    assert sorted(got) == list(range(1, CFG.steps + 1))
    assert [r["loss"] for r in rows[:5]] == [ref[s] for s in range(1, 6)]  # before the kill, on 2 nodes
    assert [r["step"] for r in rows[5:]] == list(range(5, CFG.steps + 1))  # then from the checkpoint, on 1
    assert [got[s] for s in range(5, CFG.steps + 1)] == pytest.approx([ref[s] for s in range(5, CFG.steps + 1)],
                                                                      rel=1e-5)
    # on the node left, the same gang would now launch on 1 worker, and preflight says so
    assert launch_size(gang, "pretrain.gang") == 1
    assert preflight(gang, "pretrain.gang") == ("will not wait for more than 1 of its 2 workers: the cluster's "
                                                "nodes hold no more, and pretrain.gang.min_workers=1 lets it run on 1")


def test_a_gang_that_may_not_shrink_fails_saying_so_when_a_node_never_comes_back(nodes, corpus):
    nodes.ensure(2)
    fault = "pretrain:worker1:step2=hang"
    p = paths(corpus, "lost")
    thread, result = run_in_thread(train, corpus, "lost", GangConfig(**SPREAD, max_failures=1), fault)
    kill_the_node_of_worker1(nodes, p, fault)
    with pytest.raises(GangLostNodes) as err:
        joined(thread, result)
    assert str(err.value).startswith("the pretrain gang lost nodes: the cluster's alive nodes hold 1 of its 2 workers")
    assert "pretrain.gang.min_workers is not set, so the gang may not resume on fewer workers" in str(err.value)
    with pytest.raises(ValueError, match=r"pretrain\.gang: a gang of 2 workers .* can never be placed"):
        preflight(GangConfig(**SPREAD), "pretrain.gang")  # and a rerun stops before it starts


def test_min_workers_is_checked_and_sizes_the_launch():
    nodes = [{"CPU": 0.0}, {"CPU": 2.0}, {"CPU": 2.0}]
    assert launch_size(GangConfig(num_workers=3, placement_strategy="SPREAD"), "sft.gang", nodes) == 3
    assert launch_size(GangConfig(num_workers=3, min_workers=2, placement_strategy="STRICT_SPREAD"),
                       "sft.gang", nodes) == 2
    with pytest.raises(ValueError, match=r"sft\.gang: a gang of 3 workers .* they hold 2, fewer than "
                                         r"sft\.gang\.min_workers=3"):
        launch_size(GangConfig(num_workers=3, min_workers=3, placement_strategy="STRICT_SPREAD"), "sft.gang", nodes)
    with pytest.raises(ValueError, match=r"lower sft\.gang\.num_workers"):
        launch_size(GangConfig(num_workers=3, placement_strategy="STRICT_SPREAD"), "sft.gang", nodes)
    with pytest.raises(ValueError, match="min_workers=3 is more than num_workers=2"):
        GangConfig(num_workers=2, min_workers=3)
