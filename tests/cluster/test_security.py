"""Security of the embedded cluster and of a run's files.

- Which sockets a local run listens on: our own code opens none on a non-loopback address; Ray 2.60's
  servers (GCS, raylet, core workers, dashboard agent, the head's dashboard and autoscaler monitor)
  still bind every interface although the node advertises 127.0.0.2 (README, "Security"), so the
  second test shows that the cluster refuses a client without its token.
- No secret (W&B key, Ray token, S3 credentials) reaches a run's files: a planted value is grepped for.
- Model weights load only through safetensors (an AST scan of the packages for torch.load/pickle).
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from cluster.session import RaySettings, connect
from pipelines.cli import app
from tests.conftest import REPO, write_jsonl_with_malformed, write_recipe

RAY_SERVERS = ("gcs_server", "raylet")  # and every Ray worker process, named "ray::<what it runs>"


@pytest.fixture(scope="module")
def local_ray():
    connect(RaySettings(num_cpus=2))
    yield ray._private.worker.global_worker.node.gcs_address
    ray.shutdown()


def _is_rays(listener: dict, probe: dict) -> bool:
    """Ray's own processes: its servers, its workers ("ray::..."), Python processes running a
    script from Ray's package (the head's dashboard and autoscaler monitor), and the driver's
    core worker."""
    what = listener["name"]
    script = " ".join(listener["cmdline"])
    return (what in RAY_SERVERS or what.startswith("ray::") or probe["ray_package"] in script
            or (listener["pid"] == probe["driver_pid"] and listener["port"] == probe["driver_port"]))


def test_no_listener_on_a_non_loopback_address_and_wildcards_are_rays():
    out = subprocess.run([sys.executable, "-m", "tests.listeners_probe"], cwd=REPO, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    listeners = probe["listeners"]
    assert any(l["name"] == "gcs_server" for l in listeners), "the scan found no GCS: it is broken"
    for l in listeners:
        assert l["ip"] in ("0.0.0.0", "::") or l["ip"].startswith("127.") or l["ip"] == "::1", l
        if l["ip"] in ("0.0.0.0", "::"):
            assert _is_rays(l, probe), f"{l} listens on every interface, and it is not Ray's"


def _connect_as_a_client(address: str, home: Path, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", **({"RAY_AUTH_TOKEN": token} if token else {}))
    code = f"import ray; ray.init(address={address!r}); print('CONNECTED', ray.cluster_resources().get('CPU'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_a_client_without_the_token_is_refused(local_ray, tmp_path):
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    refused = _connect_as_a_client(local_ray, tmp_path, None)  # a home without ~/.ray/auth_token
    assert refused.returncode != 0 and "CONNECTED" not in refused.stdout
    wrong = _connect_as_a_client(local_ray, tmp_path, "x" * len(token))
    assert wrong.returncode != 0 and "CONNECTED" not in wrong.stdout
    allowed = _connect_as_a_client(local_ray, tmp_path, token)  # the control: the same client, the token
    assert allowed.returncode == 0 and "CONNECTED" in allowed.stdout, allowed.stderr[-2000:]


PLANTED = {"WANDB_API_KEY": "planted-wandb-0123456789abcdef", "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-9876",
           "AWS_ACCESS_KEY_ID": "planted-aws-key-id-5555"}


def test_no_planted_secret_in_a_runs_files(tmp_path):
    ray.shutdown()  # the CLI starts its own cluster, with the planted environment
    write_jsonl_with_malformed(tmp_path / "in.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", f"""
name: sec
runs_dir: {tmp_path / 'runs'}
stages: [ingest]
wandb: {{mode: offline}}
ray: {{num_cpus: 2, data_concurrency: 1}}
ingest:
  inputs: [{{path: {tmp_path / 'in.jsonl'}}}]
""")
    res = CliRunner().invoke(app, ["run", str(recipe)], env=PLANTED)
    assert res.exit_code == 0, res.output
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "pipeline.json" for p in files) and any(p.suffix == ".wandb" for p in files)
    assert any(p.parent.name == "logs" for p in files)
    for path in files:
        data = path.read_bytes()
        for name, value in PLANTED.items():
            assert value.encode() not in data, f"{name} found in {path}"


def test_model_weights_load_only_through_safetensors():
    unsafe = []
    for package in ("pipelines", "cluster", "rl", "training", "data_engine"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                weights_only = any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
                if name.endswith("torch.load") and not weights_only or name in ("pickle.load", "pickle.loads"):
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
                if name.endswith("np.load") and any(k.arg == "allow_pickle" for k in node.keywords):
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno} np.load(allow_pickle=...)")
    assert unsafe == []
