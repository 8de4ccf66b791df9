"""A cluster whose nodes do not share the run's folder: ``runs_dir`` on object storage (a moto S3
server on loopback), and one worker node that keeps the run's local mirror on its own disk.

That node is a real Ray node (``ray start``) started in a mount namespace of its own
(``unshare --mount``) with an empty tmpfs over the cache folder: the same paths as on the driver's
node, none of its files. The head (the driver's node, no CPUs) and a second worker node share the
machine's disk. The data stages and a pretrain gang spread over both worker nodes (one rank on
each, a worker killed mid-stage) must give what the same recipe gives on one machine, which means
that every input the private node read came from the bucket, and everything it wrote went back
through it: shards, dedup's signatures, its rank's checkpoint files, the model when its rank is 0.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster import storage
from cluster.session import shutdown
from pipelines.config import load_config
from pipelines.runner import run_pipeline
from pipelines.store import RunStore
from tests.conftest import write_recipe
from tests.pipelines.test_pretrain_stage import RECIPE as PRETRAIN_RECIPE
from tests.pipelines.test_pretrain_stage import curated_corpus
from tests.pipelines.test_s3_runs import RUNS, _curated_corpus_in_bucket, s3  # noqa: F401

IP = "127.0.0.2"
# run ids of their own: moto keeps one in-memory store per process, which test_s3_runs also uses
DATA_RUN, TRAIN_RUN = "private-data", "private-p"
SPREAD = ["pretrain.gang.placement_strategy=STRICT_SPREAD"]


DATA_RECIPE = """
name: data
runs_dir: {runs}
stages: [ingest, dedup, quality]
wandb: {{mode: offline}}
ray: {{num_cpus: 2}}
ingest: {{inputs: [{{demo: {{n_docs: 300, seed: 3}}}}], chunk_bytes: 40000, max_reject_fraction: 0.5}}
dedup: {{}}
quality: {{}}
"""


def _data_recipe(tmp: Path, runs: str) -> Path:
    """The data stages on the demo corpus, which ingest generates into the run's own folder."""
    return write_recipe(tmp / "data.yaml", DATA_RECIPE.format(runs=runs))


def _rows(run: Path, folder: str) -> list[str]:
    """Every row of a run's Parquet shards under ``folder`` (ingest's rejected rows may have no id;
    their details name the input file in the run's folder, written here as RUN), in one order."""
    tables = [pq.read_table(p) for p in sorted((run / folder).glob("*.parquet"))]
    return sorted(json.dumps(r, sort_keys=True, default=str).replace(str(run), "RUN")
                  for t in tables for r in t.to_pylist())


def _reference(tmp: Path) -> dict:
    """The recipes on one machine (the embedded local cluster), runs_dir a local folder."""
    data = run_pipeline(load_config(_data_recipe(tmp, str(tmp / "runs"))), "main")
    curated_corpus(tmp / "runs" / "r")
    cfg = load_config(write_recipe(tmp / "p.yaml", PRETRAIN_RECIPE.format(runs=tmp / "runs")))
    [_, pretrain] = run_pipeline(cfg, "r", stages=["tokenizer", "pretrain"])
    shutdown()
    return {"data": {r.name: r.metrics for r in data}, "root": tmp / "runs", "pretrain": pretrain.metrics}


class PrivateNode:
    """A Ray worker node whose view of the cache folder is an empty tmpfs of its own."""

    def __init__(self, address: str, cache: Path, num_cpus: int):
        script = (f"mount -t tmpfs r1pipe-private-cache {cache} && exec {Path(sys.executable).parent / 'ray'} start "
                  f"--address={address} --node-ip-address={IP} --num-cpus={num_cpus} "
                  "--resources='{\"private_disk\": 1}' --block")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                     start_new_session=True, stdout=subprocess.DEVNULL)

    def files(self, root: Path) -> set[str]:
        """The files under ``root`` as the private node sees them (a task pinned there lists them)."""
        node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "private_disk" in n["Resources"])

        def walk(folder: str) -> set[str]:
            return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}
        pinned = ray.remote(walk).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        return ray.get(pinned.remote(str(root)))

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def private(s3, tmp_path_factory):  # noqa: F811 - the S3 server fixture, imported
    reference = _reference(tmp_path_factory.mktemp("reference"))
    cache = Path(os.environ["R1PIPE_CACHE_DIR"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": IP})
    cluster.add_node(num_cpus=1, node_ip_address=IP)  # shares the machine's disk with the head
    node = PrivateNode(cluster.address, cache, num_cpus=2)
    try:
        ray.init(address=cluster.address, logging_level="WARNING", runtime_env={"env_vars": {
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}})
        deadline = time.time() + 60
        while ray.cluster_resources().get("private_disk", 0) < 1:
            assert node.proc.poll() is None and time.time() < deadline, "the private node did not join"
            time.sleep(0.5)
        assert node.files(cache) == set(), "the private node sees the driver's cache folder"
        yield {"node": node, "reference": reference, "tmp": tmp_path_factory.mktemp("private")}
    finally:
        shutdown()
        node.stop()
        cluster.shutdown()


def test_data_stages_on_a_node_without_the_runs_folder_match_one_machine(private):
    tmp = private["tmp"]
    results = {r.name: r for r in run_pipeline(load_config(_data_recipe(tmp, RUNS)), DATA_RUN)}
    assert [results[s].action for s in ("ingest", "dedup", "quality")] == ["ran"] * 3
    store, ref = RunStore(RUNS, DATA_RUN), private["reference"]["root"] / "main"
    for stage in ("ingest", "dedup", "quality"):  # the same rows kept and rejected, for the same reasons
        for kind in ("data", "rejected"):
            assert _rows(store.root, f"{stage}/{kind}") == _rows(ref, f"{stage}/{kind}"), (stage, kind)
        assert results[stage].metrics["kept"] == private["reference"]["data"][stage]["kept"]
    # the private node ran shards of every stage and read its inputs from the bucket
    seen = private["node"].files(store.root)
    for stage in ("ingest", "dedup", "quality"):
        assert any(f.startswith(f"{stage}/.work/shards/done/") for f in seen), stage
    assert any(f.startswith("ingest/.work/demo_corpus/") for f in seen)  # ingest's input, from the bucket
    assert any(f.startswith("ingest/data/part-") for f in seen)  # an input of dedup or quality, likewise
    assert any(f.startswith("dedup/.work/signatures/") for f in seen)


def test_a_gang_over_a_node_without_the_runs_folder_trains_as_on_one_machine(private):
    """Tokenizer and pretrain (one rank on each worker node, rank 1 killed at step 6 and the gang
    restarted from its step-4 checkpoint) end with one machine's losses and model bytes."""
    tmp = private["tmp"]
    _curated_corpus_in_bucket(tmp, TRAIN_RUN)
    cfg = load_config(write_recipe(tmp / "p.yaml", PRETRAIN_RECIPE.format(runs=RUNS)), SPREAD)
    [tok] = run_pipeline(cfg, TRAIN_RUN, stages=["tokenizer"])  # its task needs a CPU the head lacks: it runs there unreserved
    assert tok.metrics["docs"] == 160
    [res] = run_pipeline(cfg, TRAIN_RUN, stages=["pretrain"], fault="pretrain:worker1:step6")
    ref = private["reference"]
    assert (res.metrics["gang_workers"], res.metrics["gang_nodes"]) == (2, 2)
    assert res.metrics["resumed_from_step"] == 4
    stage = RunStore(RUNS, TRAIN_RUN).stage("pretrain")
    log = [json.loads(line) for line in (stage.root / "train_log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(line) for line in (ref["root"] / "r" / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in log} == {r["step"]: r["loss"] for r in ref_log}
    model = Path("model") / "model.safetensors"
    assert (stage.root / model).read_bytes() == (ref["root"] / "r" / "pretrain" / model).read_bytes()
    # each rank's part of the last checkpoint reached the bucket, whichever node wrote it
    files = storage.list_files(storage.join(stage.remote, "checkpoints"))
    assert {"step_00000016/rng/rank_00000.json", "step_00000016/rng/rank_00001.json",
            "step_00000016/trainer.json"} <= set(files)
    seen = private["node"].files(stage.root)
    assert "checkpoints/step_00000016/trainer.json" in seen  # its own copy of the last checkpoint
