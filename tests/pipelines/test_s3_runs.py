"""Runs on object storage: ``runs_dir: s3://bucket/runs`` against a real S3-compatible server.

One moto server (its HTTP API on loopback, not a mock of the client) and one Ray session
serve the module. The data stages run on it and on a local folder and must keep and reject
the same rows; a stage killed after one shard resumes from the shard that reached the
bucket, and dedup, killed with its node's disk, from the removals it had uploaded; a stage whose outputs are uploaded but whose manifest is not `done` runs again; a
changed config reruns one stage there. A short pretrain is killed with its driver and
resumes from the checkpoint in the bucket, skipping a checkpoint caught half-uploaded.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cluster import storage
from pipelines.config import load_config
from pipelines.runner import StageFailed, run_pipeline
from pipelines.status import collect
from pipelines.store import RunStore, StageDir, write_json_atomic
from tests.conftest import REPO, VENV_BIN, kill_pipeline_when, write_recipe
from tests.pipelines.test_data_stages import _corpus
from tests.pipelines.test_pretrain_stage import RECIPE as PRETRAIN_RECIPE
from tests.pretrain_corpus import write_corpus

BUCKET = "r1pipe-test"
RUNS = f"s3://{BUCKET}/runs"
DATA_STAGES = ["ingest", "dedup", "quality"]
ACCESS_KEY, SECRET_KEY = "AKIAPLANTEDKEY000042", "planted-secret-9f31c7"  # moto takes any


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS settings in the environment, where
    the embedded Ray cluster (started after them) and `r1pipe run` subprocesses find them."""
    from moto.server import ThreadedMotoServer
    from cluster.session import shutdown
    shutdown()  # workers of a cluster started earlier would not see the settings below
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true",
           "R1PIPE_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._filesystem.cache_clear()
    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
    yield env
    shutdown()
    storage._filesystem.cache_clear()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


def _data_recipe(tmp: Path, runs_dir: str) -> Path:
    rows, _, _ = _corpus()
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_recipe(tmp / "data.yaml", f"""
name: data
runs_dir: {runs_dir}
stages: {DATA_STAGES}
wandb: {{mode: offline}}
ray: {{num_cpus: 2}}
ingest:
  inputs: [{{path: {corpus}}}]
  chunk_bytes: {corpus.stat().st_size // 4}
dedup: {{}}
quality: {{}}
""")


def _remote_rows(uri: str, columns=("id", "reason")) -> list[dict]:
    """Rows of the Parquet files under a URI, read straight from the bucket."""
    fs, path = storage.resolve(uri)
    files = sorted(rel for rel in storage.list_files(uri) if rel.endswith(".parquet"))
    tables = [pq.read_table(f"{path}/{rel}", filesystem=fs) for rel in files]
    table = pa.concat_tables(tables) if tables else pa.table({})
    return sorted(({c: r.get(c) for c in columns} for r in table.to_pylist()), key=lambda r: r["id"])


def _local_rows(folder: Path, columns=("id", "reason")) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]
    table = pa.concat_tables(tables) if tables else pa.table({})
    return sorted(({c: r.get(c) for c in columns} for r in table.to_pylist()), key=lambda r: r["id"])


@pytest.fixture(scope="module")
def data_run(s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3data")
    recipe = _data_recipe(tmp, RUNS)
    cfg = load_config(recipe)
    quality, dedup = RunStore(RUNS, "main").stage("quality"), RunStore(RUNS, "main").stage("dedup")
    # 0. dedup dies applying its removals; its node's disk is lost with it (the local mirror's
    # .work goes): the removals, found once, must come back from the bucket
    with pytest.raises(StageFailed):
        run_pipeline(load_config(recipe, ["ray.data_concurrency=1"]), "main", fault="dedup:after_write:0")
    dedup_work = sorted(storage.list_files(storage.join(dedup.remote, ".work")))
    shutil.rmtree(dedup.work)
    # 1. quality dies after writing shard 1 (before its marker): shard 0 is in the bucket
    with pytest.raises(StageFailed):
        run_pipeline(load_config(recipe, ["ray.data_concurrency=1"]), "main", fault="quality:after_write:1")
    killed = {"status": quality.manifest()["status"],
              "remote_work": sorted(storage.list_files(storage.join(quality.remote, ".work")))}
    # 2. the resume must not redo shard 0: redoing it would hit this fault and fail the stage
    resumed = {r.name: r for r in run_pipeline(cfg, "main", fault="quality:after_write:0")}
    # 3. the same recipe on a local folder, for comparison
    (tmp / "local").mkdir()
    local_cfg = load_config(_data_recipe(tmp / "local", str(tmp / "local" / "runs")))
    run_pipeline(local_cfg, "main")
    return {"recipe": recipe, "cfg": cfg, "killed": killed, "resumed": resumed, "dedup_work": dedup_work,
            "dedup": dedup.manifest(),
            "local": Path(local_cfg.runs_dir) / "main"}


def test_data_stages_on_s3_keep_and_reject_the_same_rows_as_locally(data_run):
    _, removed, rejected = _corpus()
    for name in DATA_STAGES:
        remote = f"{RUNS}/main/{name}"
        for kind in ("data", "rejected"):
            assert _remote_rows(f"{remote}/{kind}") == _local_rows(data_run["local"] / name / kind), (name, kind)
        manifest = RunStore(RUNS, "main").stage(name).manifest()
        assert manifest["status"] == "done"
        local = json.loads((data_run["local"] / name / "manifest.json").read_text())
        assert {k: manifest["metrics"][k] for k in ("rows_in", "kept", "rejected")} == \
               {k: local["metrics"][k] for k in ("rows_in", "kept", "rejected")}
        # paths stay relative to the run; every output listed is in the bucket with its size
        files = storage.list_files(remote)
        assert manifest["outputs"] and all(files[o["path"]].size == o["bytes"] for o in manifest["outputs"])
        assert not any(rel.startswith((".work", ".staging")) for rel in files)  # dropped once done
    assert {r["id"] for r in _remote_rows(f"{RUNS}/main/dedup/rejected")} == removed
    assert {r["id"]: r["reason"] for r in _remote_rows(f"{RUNS}/main/quality/rejected")} == rejected


def test_a_failed_stage_resumes_from_the_shards_in_the_bucket(data_run):
    killed = data_run["killed"]
    assert killed["status"] == "failed"
    # shard 0 went up with its marker; shard 1 was written locally but never committed
    assert {"shards/data/part-00000.parquet", "shards/rejected/part-00000.parquet",
            "shards/done/part-00000.json"} <= set(killed["remote_work"])
    assert "shards/done/part-00001.json" not in killed["remote_work"]
    resumed = data_run["resumed"]
    assert [resumed[s].action for s in DATA_STAGES] == ["skipped", "skipped", "ran"]
    assert resumed["quality"].metrics["shards_reused"] == 1
    assert RunStore(RUNS, "main").stage("quality").manifest()["resumed"] is True


def test_partial_work_other_than_shards_resumes_from_the_bucket(data_run):
    """dedup's removals (its costly part) go up with their marker last; a resume on a node
    without them downloads them instead of finding them again."""
    assert "removals.json" in data_run["dedup_work"]
    assert any(rel.startswith("removals/part-") for rel in data_run["dedup_work"])
    metrics = data_run["dedup"]["metrics"]
    assert data_run["dedup"]["status"] == "done" and metrics["removals_reused"] is True


def test_status_report_and_wandb_folder_on_s3(data_run):
    status = collect(RUNS, None)  # the newest run in the bucket
    assert status["run_id"] == "main" and status["root"] == f"{RUNS}/main"
    assert [s["status"] for s in status["stages"]] == ["done"] * 3
    from pipelines.report import write_report
    write_report(RUNS, "main")
    assert "report.html" in storage.list_files(f"{RUNS}/main")
    # each stage's W&B offline run was synced into the bucket (wandb sync works from a download)
    runs = {rel.split("/")[1] for rel in storage.list_files(f"{RUNS}/main/wandb") if rel.startswith("wandb/offline-run-")}
    assert len(runs) >= 4  # quality's failed attempt, its resume, ingest and dedup
    events = RunStore(RUNS, "main").events()
    assert [e["action"] for e in events if e["stage"] == "quality"] == ["run", "fail", "resume", "done"]


def test_lineage_reads_the_bucket(data_run):
    """`r1pipe lineage s3://...`: built from the manifests in the bucket, as for a local run."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.lineage import build_lineage, find_lineage
    uri = f"{RUNS}/main/quality"
    found = find_lineage(uri + "/")
    assert found == build_lineage(RunStore(RUNS, "main"), "quality")
    assert [s["name"] for s in found["stages"]] == DATA_STAGES and found["warnings"] == []
    assert found["fingerprint"] == RunStore(RUNS, "main").stage("quality").manifest()["fingerprint"]
    assert find_lineage(f"{uri}/data") == found  # any folder in the stage
    out = CliRunner().invoke(app, ["lineage", uri, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["fingerprint"] == found["fingerprint"]
    missing = CliRunner().invoke(app, ["lineage", f"{RUNS}/main/nope"])
    assert missing.exit_code == 2 and "no such file or folder in the object store" in " ".join(missing.output.split())


def test_cli_run_and_status_on_s3(data_run):
    """`r1pipe run` of a done stage skips it, then uploads the run's report and its log;
    `r1pipe status` reads the bucket."""
    run = subprocess.run([str(VENV_BIN / "r1pipe"), "run", str(data_run["recipe"]), "--run-id", "main",
                          "--stages", "ingest"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    last = RunStore(RUNS, "main").events()[-1]
    assert (last["stage"], last["action"]) == ("ingest", "skip")
    files = storage.list_files(f"{RUNS}/main")
    assert "report.html" in files and any(rel.startswith("logs/run-") for rel in files)
    status = subprocess.run([str(VENV_BIN / "r1pipe"), "status", "main", "--runs-dir", RUNS, "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["root"] == f"{RUNS}/main" and [s["status"] for s in report["stages"]] == ["done"] * 3


def test_no_credentials_in_any_object_or_mirror_file(data_run):
    fs, base = storage.resolve(RUNS)
    for rel in storage.list_files(RUNS):
        with fs.open_input_stream(f"{base}/{rel}") as f:
            data = f.read()
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, rel
    mirror = RunStore(RUNS, "main").root
    for path in (p for p in mirror.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, path


def test_uploaded_outputs_without_a_done_manifest_are_not_done(data_run):
    stage = RunStore(RUNS, "main").stage("quality")
    done = stage.manifest()
    storage.write_bytes(storage.join(stage.remote, "manifest.json"),
                        json.dumps(dict(done, status="running")).encode())  # died before the commit
    assert not stage.is_done(done["fingerprint"])
    [res] = run_pipeline(data_run["cfg"], "main", stages=["quality"])
    assert res.action == "ran" and stage.manifest()["status"] == "done"


def test_a_changed_config_reruns_one_stage_in_the_bucket(data_run):
    cfg = load_config(data_run["recipe"], ["quality.min_words=65"])
    results = {r.name: r.action for r in run_pipeline(cfg, "main")}
    assert results == {"ingest": "skipped", "dedup": "skipped", "quality": "ran"}
    rejected = _remote_rows(f"{RUNS}/main/quality/rejected")
    # more rows fall under 65 words; q-lorem is now caught by the word count, the first rule it fails
    assert len(rejected) > 2 and {r["id"]: r["reason"] for r in rejected}["q-lorem"] == "quality:word_count"
    manifest = RunStore(RUNS, "main").stage("quality").manifest()
    assert manifest["metrics"]["rejected"] == len(rejected)
    kept = {r["id"] for r in _remote_rows(f"{RUNS}/main/quality/data")}
    assert kept.isdisjoint(r["id"] for r in rejected)
    assert manifest["metrics"]["kept"] == len(kept)


def test_a_bad_object_store_names_the_uri(s3):
    with pytest.raises(ValueError, match=r"s3://no-such-bucket/runs.*does not exist"):
        RunStore("s3://no-such-bucket/runs", "x")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{closed}"
    try:
        with pytest.raises(ValueError, match=r"s3://unreachable-bucket/runs.*cannot reach"):
            RunStore("s3://unreachable-bucket/runs", "x")
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3["AWS_ENDPOINT_URL"]


# ----------------------------------------------------------------------------- pretrain


def _curated_corpus_in_bucket(tmp: Path, run: str = "p") -> None:
    """The difficulty stage's outputs and done manifest, uploaded as the data stages leave them."""
    local = tmp / "difficulty"
    write_corpus(local, n_docs=160)
    outputs = StageDir(local, "difficulty").list_outputs()
    write_json_atomic(local / "manifest.json", {"stage": "difficulty", "status": "done",
                                                "fingerprint": "curated-by-test", "metrics": {},
                                                "outputs": outputs})
    storage.upload(local, f"{RUNS}/{run}/difficulty", last=("manifest.json",))


def test_pretrain_killed_with_its_driver_resumes_from_the_bucket(s3, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", PRETRAIN_RECIPE.format(runs=RUNS))
    cfg = load_config(recipe)
    _curated_corpus_in_bucket(tmp_path)
    [tok] = run_pipeline(cfg, "p", stages=["tokenizer"])
    assert tok.metrics["docs"] == 160
    stage = RunStore(RUNS, "p").stage("pretrain")
    ckpts = storage.join(stage.remote, "checkpoints")

    kill_pipeline_when(stage.root / ".work" / "tokens" / "fault-pretrain_worker0_step6", recipe, "p", "pretrain",
                       "pretrain:worker0:step6=hang")
    assert stage.manifest()["status"] == "running"
    assert storage.list_dirs(ckpts) == ["step_00000004"]
    assert "step_00000004/trainer.json" in storage.list_files(ckpts)
    # a checkpoint caught half-uploaded (no trainer.json) must not be resumed from
    storage.write_bytes(storage.join(ckpts, "step_00000012", "ds", "partial.pt"), b"half")

    [res] = run_pipeline(cfg, "p", stages=["pretrain"])
    assert res.action == "ran" and res.metrics["resumed_from_step"] == 4 and res.metrics["steps"] == 16
    manifest = stage.manifest()
    assert manifest["status"] == "done" and manifest["resumed"] is True
    files = storage.list_files(stage.remote)
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "train_log.jsonl"} <= set(files)
    assert storage.list_dirs(ckpts) == ["step_00000012", "step_00000016"]  # keep: 2, the stray one replaced
    assert all(f"{d}/trainer.json" in storage.list_files(ckpts) for d in ("step_00000012", "step_00000016"))
    log = [json.loads(line) for line in storage.read_bytes(storage.join(stage.remote, "train_log.jsonl")).splitlines()]
    assert [r["step"] for r in log] == list(range(1, 17))  # steps 1-4 from the killed run's log in the bucket
    from pipelines.lineage import find_lineage  # the model's recorded lineage.json, read from the bucket
    lineage = find_lineage(storage.join(stage.remote, "model"))
    names = [s["name"] for s in lineage["stages"]]
    assert names[-1] == "pretrain" and "tokenizer" in names
    assert lineage["fingerprint"] == manifest["fingerprint"] and lineage["stages"][-1]["finished"] == manifest["finished"]
    from training.export import load_model
    fresh = tmp_path / "download"
    storage.download(storage.join(stage.remote, "model"), fresh)
    assert load_model(fresh).cfg.vocab_size == 320
