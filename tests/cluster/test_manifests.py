"""Cluster manifests from a recipe: the launcher's YAML validates against Ray's own cluster-config
schema, the KubeRay RayJob against the RayJob CRD's schema (cluster/manifests/schema/, with the pod
templates checked against Kubernetes' own PodTemplateSpec); both hold every gang of the recipe (or
the command names the gang it cannot hold), carry no secret, and the shipped examples are what the
command writes today."""
import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.autoscaler._private.util import validate_config
from referencing import Registry, Resource
from typer.testing import CliRunner

from pipelines.cli import app
from tests.conftest import REPO

runner = CliRunner()
RECIPE = REPO / "recipes" / "cluster.yaml"
SHIPPED = REPO / "cluster" / "manifests"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
RAYJOB_SCHEMA = SHIPPED / "schema" / "rayjob-v1.schema.json"
K8S_DEFINITIONS = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / "v1.33.0-local-strict"
                   / "_definitions.json")


def manifest(*args, env=None) -> tuple[int, str]:
    res = runner.invoke(app, ["cluster", "manifest", str(RECIPE), *args], env={"COLUMNS": "300", **(env or {})})
    return res.exit_code, res.output


@pytest.mark.parametrize("preset", ["a100-80g-x8", "h100-80g-x8"])
@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_the_launcher_config_validates_against_rays_schema(preset, provider):
    code, text = manifest("--preset", preset, "--nodes", "2", "--provider", provider)
    assert code == 0, text
    config = yaml.safe_load(text)
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(config)  # Ray's own check: the schema and the node types' consistency
    [gpu] = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert gpu["min_workers"] == gpu["max_workers"] == 2 and gpu["resources"]["GPU"] == 8
    assert "-v /shared:/shared" in config["docker"]["run_options"]  # where the recipe's runs_dir lies


def test_a_gang_the_nodes_cannot_hold_is_named():
    code, text = manifest("--nodes", "1", "--set", "sft.gang.num_workers=16")
    assert code == 2 and "sft.gang: 16 workers" in text and "raise --nodes" in text
    code, text = manifest("--nodes", "1", "--set", "pretrain.gang.cpus_per_worker=48")
    assert code == 2 and "pretrain.gang" in text  # 8 x 48 CPUs on a 192-CPU node
    assert manifest("--nodes", "2", "--set", "sft.gang.num_workers=16")[0] == 0


def test_no_secret_reaches_the_manifest():
    code, text = manifest(env={"WANDB_API_KEY": "planted-wandb-secret", "RAY_AUTH_TOKEN": "planted-ray-token"})
    assert code == 0 and "planted" not in text
    assert "-e WANDB_API_KEY" in text and "-e RAY_AUTH_TOKEN" in text  # by name, from the caller's env


def test_bad_options_are_named():
    assert "--target 'helm'" in manifest("--target", "helm")[1]
    assert "--preset 'v100'" in manifest("--preset", "v100")[1]
    assert "not under the shared storage" in manifest("--storage", "/mnt/other")[1]


@pytest.mark.parametrize("preset", ["a100-80g-x8", "h100-80g-x8"])
def test_the_shipped_examples_are_current(preset):
    code, text = manifest("--preset", preset, "--nodes", "2", "--image", "r1pipe:0.1.0")
    assert code == 0
    assert (SHIPPED / f"launcher-{preset}.yaml").read_text() == text, \
        f"regenerate: r1pipe cluster manifest recipes/cluster.yaml --preset {preset} --nodes 2 --image r1pipe:0.1.0"


# ---- KubeRay ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft202012Validator:
    """The RayJob schema, its pod templates resolved in Kubernetes' own (strict) definitions."""
    k8s = json.loads(K8S_DEFINITIONS.read_text())
    registry = Registry().with_resource(k8s["$id"], Resource.from_contents(k8s))
    schema = json.loads(RAYJOB_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    code, text = manifest("--target", "kuberay", "--nodes", "2")
    assert code == 0, text
    return yaml.safe_load(text)


def errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def containers(job: dict) -> dict[str, dict]:
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"]),
            job["spec"]["submitterPodTemplate"]]
    return {c["name"]: c for pod in pods for c in pod["spec"]["containers"]}


@pytest.mark.parametrize("preset,cpus,memory", [("a100-80g-x8", "88", "921Gi"), ("h100-80g-x8", "184", "1843Gi")])
def test_the_rayjob_validates_against_the_crd_schema(rayjob_validator, preset, cpus, memory):
    code, text = manifest("--target", "kuberay", "--preset", preset, "--nodes", "3")
    assert code == 0, text
    job = yaml.safe_load(text)
    assert errors(rayjob_validator, job) == []
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["entrypoint"] == "r1pipe run /opt/r1pipe/recipes/cluster.yaml --address auto"
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}  # the driver's pod takes no stage work
    [gpu] = cluster["workerGroupSpecs"]
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == 3
    worker = gpu["template"]["spec"]["containers"][0]
    want = {"cpu": cpus, "memory": memory, "nvidia.com/gpu": "8"}
    assert worker["resources"] == {"requests": want, "limits": want}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["volumeMounts"]
    for pod in (cluster["headGroupSpec"]["template"], gpu["template"]):  # where the recipe's runs_dir lies
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "r1pipe-shared"}} in pod["spec"]["volumes"]
        assert {"name": "shared", "mountPath": "/shared"} in pod["spec"]["containers"][0]["volumeMounts"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["NCCL_DEBUG"] == "WARN" and env["RAY_AUTH_MODE"] == "token"


MUTATIONS = {  # each a mistake the API server (kubectl's strict field validation) or KubeRay refuses
    "a misspelt spec key": (lambda j: j["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    "a misspelt worker group key": (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(
        replica=2), "replica"),
    "replicas as a string": (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="2"),
                             "is not of type 'integer'"),
    "no groupName": (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    "an unknown submission mode": (lambda j: j["spec"].update(submissionMode="K8sJob"), "K8sJob"),
    "a bogus container key": (lambda j: containers(j)["ray-worker"].update(imagePolicy="Always"), "imagePolicy"),
    "a bogus pod spec key": (lambda j: j["spec"]["submitterPodTemplate"]["spec"].update(restart="Never"), "restart"),
    "a secretKeyRef without its key": (lambda j: containers(j)["ray-head"]["env"][-1]["valueFrom"]["secretKeyRef"]
                                       .pop("key"), "'key' is a required property"),
    "a name that is no DNS-1035 label": (lambda j: j["metadata"].update(name="R1_moe"), "R1_moe"),
    "a name over 47 characters": (lambda j: j["metadata"].update(name="r" * 48), "is too long"),
    "a wrong apiVersion": (lambda j: j.update(apiVersion="ray.io/v1alpha1"), "ray.io/v1"),
}


@pytest.mark.parametrize("mistake", sorted(MUTATIONS))
def test_the_schema_rejects_a_broken_rayjob(rayjob_validator, rayjob, mistake):
    mutate, expected = MUTATIONS[mistake]
    job = copy.deepcopy(rayjob)
    mutate(job)
    found = errors(rayjob_validator, job)
    assert found and any(expected in e for e in found), found


def test_a_gang_the_pods_cannot_hold_is_named():
    code, text = manifest("--target", "kuberay", "--nodes", "1", "--set", "sft.gang.num_workers=16")
    assert code == 2 and "sft.gang: 16 workers" in text and "raise --nodes" in text
    # 8 x 24 CPUs fill an H100 node (192 CPUs, the launcher's), not the pod that leaves the kubelet its share
    assert manifest("--nodes", "1", "--set", "pretrain.gang.cpus_per_worker=24")[0] == 0
    code, text = manifest("--target", "kuberay", "--nodes", "1", "--set", "pretrain.gang.cpus_per_worker=24")
    assert code == 2 and "pretrain.gang: 8 workers" in text and "'CPU': 184" in text
    code, text = manifest("--target", "kuberay", "--nodes", "2", "--set", "sft.gang.num_workers=16")
    assert code == 0 and "--set sft.gang.num_workers=16" in yaml.safe_load(text)["spec"]["entrypoint"]


def test_the_rayjob_names_its_secrets_and_holds_no_value():
    planted = {"WANDB_API_KEY": "planted-wandb-secret", "RAY_AUTH_TOKEN": "planted-ray-token"}
    code, text = manifest("--target", "kuberay", "--auth-secret", "ray-token", env=planted)
    assert code == 0 and "planted" not in text
    job = yaml.safe_load(text)
    for name, container in containers(job).items():
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN",
                                         "valueFrom": {"secretKeyRef": {"name": "ray-token", "key": "auth_token"}}}
        if name != "ray-job-submitter":
            assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "r1pipe-wandb", "key": "api_key"}
    code, text = manifest("--target", "kuberay", "--wandb-secret", "")
    assert code == 0 and "WANDB_API_KEY" not in text


def test_bad_kuberay_options_are_named():
    assert "--pvc 'Shared_Runs'" in manifest("--target", "kuberay", "--pvc", "Shared_Runs")[1]
    assert "--auth-secret 'token!'" in manifest("--target", "kuberay", "--auth-secret", "token!")[1]
    assert "--recipe-path 'cluster.yaml'" in manifest("--target", "kuberay", "--recipe-path", "cluster.yaml")[1]
    assert "not under the shared storage" in manifest("--target", "kuberay", "--storage", "/mnt/other")[1]
    assert "--nodes 0" in manifest("--target", "kuberay", "--nodes", "0")[1]


@pytest.mark.parametrize("preset", ["a100-80g-x8", "h100-80g-x8"])
def test_the_shipped_rayjobs_are_current(rayjob_validator, preset):
    code, text = manifest("--target", "kuberay", "--preset", preset, "--nodes", "2", "--image", "r1pipe:0.1.0")
    assert code == 0
    assert (SHIPPED / f"kuberay-{preset}.yaml").read_text() == text, \
        f"regenerate: r1pipe cluster manifest recipes/cluster.yaml --target kuberay --preset {preset} --nodes 2 " \
        "--image r1pipe:0.1.0"
    assert errors(rayjob_validator, yaml.safe_load(text)) == []


OBJECT_STORE = ["--set", "runs_dir=s3://team-bucket/runs"]


def test_a_run_on_object_storage_needs_no_shared_mount(rayjob_validator):
    """runs_dir on S3: no claim or shared mount; each pod (or node) keeps its own mirror of the run
    and takes the object store's settings by name, never by value."""
    planted = {"AWS_SECRET_ACCESS_KEY": "planted-s3-secret"}
    code, text = manifest("--target", "kuberay", "--nodes", "2", *OBJECT_STORE, env=planted)
    assert code == 0, text
    job = yaml.safe_load(text)
    assert errors(rayjob_validator, job) == []
    assert "persistentVolumeClaim" not in text and "planted" not in text
    spec = job["spec"]["rayClusterSpec"]
    for pod in (spec["headGroupSpec"]["template"], spec["workerGroupSpecs"][0]["template"]):
        [c] = pod["spec"]["containers"]
        assert {"name": "run-mirror", "emptyDir": {}} in pod["spec"]["volumes"]
        assert {"name": "run-mirror", "mountPath": "/var/cache/r1pipe"} in c["volumeMounts"]
        assert {"name": "R1PIPE_CACHE_DIR", "value": "/var/cache/r1pipe"} in c["env"]
        assert c["envFrom"] == [{"secretRef": {"name": "r1pipe-s3"}}]
    assert "envFrom" not in containers(job)["ray-job-submitter"]

    code, text = manifest("--nodes", "2", *OBJECT_STORE, env=planted)  # the cluster launcher
    assert code == 0, text
    config = yaml.safe_load(text)
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(config)
    options = config["docker"]["run_options"]
    assert "-v /var/cache/r1pipe:/var/cache/r1pipe" in options and "-e R1PIPE_CACHE_DIR=/var/cache/r1pipe" in options
    assert {"-e AWS_ACCESS_KEY_ID", "-e AWS_SECRET_ACCESS_KEY", "-e AWS_ENDPOINT_URL"} <= set(options)
    assert "planted" not in text and not any("/shared" in o for o in options)
    assert "runs_dir 's3://team-bucket/runs' is on object storage" in manifest("--storage", "/shared", *OBJECT_STORE)[1]
    assert "--s3-secret 'S3!'" in manifest("--target", "kuberay", "--s3-secret", "S3!", *OBJECT_STORE)[1]


def test_the_shipped_object_storage_rayjob_is_current(rayjob_validator):
    args = ["--target", "kuberay", "--preset", "h100-80g-x8", "--nodes", "2", "--image", "r1pipe:0.1.0",
            "--set", "runs_dir=s3://your-bucket/runs"]
    code, text = manifest(*args)
    assert code == 0
    assert (SHIPPED / "kuberay-h100-80g-x8-s3.yaml").read_text() == text, \
        "regenerate: r1pipe cluster manifest recipes/cluster.yaml " + " ".join(args)
