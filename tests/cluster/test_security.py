"""Security of the embedded cluster and of a run's files.

- Which sockets a local run listens on: our own code opens none on a non-loopback address; Ray 2.60's
  gRPC servers (GCS, raylet, core workers, dashboard agent) still bind every interface although the
  node advertises 127.0.0.2 (README, "Security"), so the second test shows that those refuse a client
  without the cluster's token.
- No secret (W&B key, Ray token, S3 credentials) reaches a run's files: a planted value is grepped for.
- Model weights load only through safetensors (an AST scan of the packages for torch.load/pickle).
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import ray
from typer.testing import CliRunner

from cluster.session import RaySettings, connect
from pipelines.cli import app
from tests.conftest import REPO, write_jsonl_with_malformed, write_recipe

# Ray's own servers that 2.60 binds to every interface (their gRPC ports take the cluster's token)
RAY_GRPC_SERVERS = ("gcs_server", "raylet", "ray::IDLE", "ray::DashboardAgent", "ray::DashboardA", "python",
                    "ray::_wrapper", "ray::execute_stage")


@pytest.fixture(scope="module")
def local_ray():
    connect(RaySettings(num_cpus=2))
    yield ray._private.worker.global_worker.node.gcs_address
    ray.shutdown()


def _listeners() -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP listener of this process and its descendants."""
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                continue
            out.append((name, c.laddr.ip, c.laddr.port))
    return out


def test_no_listener_on_a_non_loopback_address_and_wildcards_are_rays_grpc(local_ray):
    listeners = _listeners()
    assert listeners, "no listener found: the scan is broken"
    for name, ip, port in listeners:
        assert ip in ("0.0.0.0", "::") or ip.startswith("127.") or ip == "::1", (name, ip, port)
    wildcard = {name for name, ip, _ in listeners if ip in ("0.0.0.0", "::")}
    assert wildcard <= set(RAY_GRPC_SERVERS), f"a listener on every interface that is not Ray's gRPC: {wildcard}"


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
    assert allowed.returncode == 0 and "CONNECTED 2.0" in allowed.stdout, allowed.stderr[-2000:]


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
