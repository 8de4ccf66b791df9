"""DPO on real Ray Train gangs (gloo, DeepSpeed ZeRO-1), through run_gang like every training stage.

One uninterrupted 2-worker reference run; a run whose worker 1 is killed at step 5 restarts the
gang from the step-4 checkpoint, reads the stored reference log-probs, and reproduces the
reference losses exactly. Under ZeRO-3 (the frozen reference sharded over the gang), the
precomputed and the online reference give the same losses.
"""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.gang import GangConfig
from cluster.session import RaySettings, connect
from cluster.train import run_gang
from data_engine.pair_data import PAIR_SCHEMA
from rl import dpo
from rl.config import DpoConfig
from tests.rl.conftest import pair_row

CFG = DpoConfig.model_validate({
    "steps": 8, "eval_every": 4, "checkpoint": {"every": 4, "keep": 3},
    "engine": {"zero_stage": 1, "optimizer": {"lr": 1e-3, "warmup_steps": 1}},
    "data": {"seq_len": 64, "micro_batch": 2, "global_batch": 8, "val_max_pairs": 7}})  # 4 + 3 per rank


@pytest.fixture(scope="module")
def inputs(reasoner, tmp_path_factory):
    connect(RaySettings(num_cpus=2))
    root = tmp_path_factory.mktemp("dpo-pairs")
    for split, folder in (("train", reasoner.train_dir), ("eval", reasoner.eval_dir)):
        rows = [pair_row(t, i) for i, t in enumerate(pq.read_table(folder).to_pylist())][:120]
        pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), root / f"{split}.parquet")
    return reasoner, root


def gang_run(inputs, root, cfg=CFG, **kw):
    reasoner, pairs = inputs
    payload = {"config": cfg.model_dump(mode="json"), "seed": 0,
               "paths": {"train_files": [str(pairs / "train.parquet")], "val_files": [str(pairs / "eval.parquet")],
                         "init_model": str(reasoner.model), "work": str(root / "work"),
                         "checkpoints": str(root / "checkpoints"), "out": str(root / "out")}}
    rows = []
    summary = run_gang(dpo.worker, payload, GangConfig(num_workers=2, **kw.pop("gang", {})),
                       checkpoints=root / "checkpoints", work=root / "work", on_metrics=rows.append, name="dpo", **kw)
    return rows, summary


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-ref")
    rows, summary = gang_run(inputs, root)
    return root, rows, summary


def test_reference_starts_at_ln2_learns_and_writes_the_model(reference):
    root, rows, summary = reference
    assert [r["step"] for r in rows] == list(range(1, 9)) and summary["steps"] == 8 and summary["pairs"] == 120
    assert rows[0]["dpo_loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert rows[-1]["val/loss"] < rows[3]["val/loss"] and rows[-1]["rewards/margins"] > 0
    assert (root / "out" / "model" / "model.safetensors").is_file()
    assert len(list((root / "work").glob("reference-*.safetensors"))) == 2  # train and held-out pairs


def test_killed_worker_restarts_with_identical_losses(inputs, reference, tmp_path):
    rows, summary = gang_run(inputs, tmp_path, gang={"max_failures": 1}, fault="dpo:worker1:step5")
    assert summary["resumed_from_step"] == 4
    assert [r["step"] for r in rows][:6] == [1, 2, 3, 4, 5, 5]  # step 5 replayed after the restart
    assert {r["step"]: r["loss"] for r in rows} == {r["step"]: r["loss"] for r in reference[1]}  # bitwise


def test_under_zero3_precomputed_and_online_reference_give_the_same_losses(inputs, tmp_path):
    runs = {}
    for mode in ("precomputed", "online"):
        cfg = CFG.model_copy(update={"steps": 3, "eval_every": 3, "reference": mode,
                                     "engine": CFG.engine.model_copy(update={"zero_stage": 3})})
        runs[mode], _ = gang_run(inputs, tmp_path / mode, cfg=cfg)
    pre, online = runs["precomputed"], runs["online"]
    assert [r["step"] for r in pre] == [r["step"] for r in online] == [1, 2, 3]
    assert pre[0]["dpo_loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert [r["dpo_loss"] for r in online] == pytest.approx([r["dpo_loss"] for r in pre], abs=1e-5)
    assert online[-1]["val/rewards/accuracies"] == pre[-1]["val/rewards/accuracies"]
    assert list((tmp_path / "precomputed" / "work").glob("reference-*")) and \
        not list((tmp_path / "online" / "work").glob("reference-*"))
