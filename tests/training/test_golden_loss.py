"""Golden losses of pretraining for a fixed seed: any refactor of the engine, the loop or the data
path must reproduce them. Recorded on the code before the engine took its loss as a function
(commit 5dc861f); the corpus is generated here (seeded words), so it depends on nothing on disk."""
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.config import PretrainConfig
from training.pretrain import Hooks, Paths, pretrain
from training.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer

# (loss, lm_loss, aux_loss, val/loss) of steps 1..6
GOLDEN = [
    (5.8013670444488525, 5.791182279586792, 0.010184586513787508, None),
    (5.774394273757935, 5.7642176151275635, 0.010176844894886017, None),
    (5.769197940826416, 5.759071350097656, 0.01012653112411499, 5.708895750045777),
    (5.727284669876099, 5.717257976531982, 0.010026612784713507, None),
    (5.668328523635864, 5.658192157745361, 0.010136375203728676, None),
    (5.601958990097046, 5.591583013534546, 0.010376141872256994, 5.5155024814605715),
]


def seeded_corpus(root):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)] + ["the", "of", "and", "a", "to"]
    rows = [{"id": f"d{i:04d}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80))),
             "domain": ("math", "code")[i % 2], "difficulty": ("basic", "advanced", "expert")[i % 3]}
            for i in range(120)]
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "part-0.parquet")
    save_tokenizer(train_tokenizer([r["text"] for r in rows], TokenizerConfig(vocab_size=300)), root / "tok")
    return root / "data" / "part-0.parquet"


def test_pretrain_losses_match_the_golden_values(tmp_path):
    data = seeded_corpus(tmp_path)
    cfg = PretrainConfig.model_validate({
        "steps": 6, "eval_every": 3, "checkpoint": {"every": 3, "keep": 1},
        "model": {"preset": "tiny", "overrides": dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                                      dense_hidden=64, expert_hidden=32, max_seq_len=32)},
        "engine": {"zero_stage": 1}, "data": {"seq_len": 16, "micro_batch": 2, "global_batch": 4, "val_fraction": 0.1}})
    rows = []
    pretrain(cfg, Paths([data], tmp_path / "tok", tmp_path / "work", tmp_path / "ck", tmp_path / "out"), seed=0,
             hooks=Hooks(on_metrics=lambda m, s: rows.append(m)))
    got = [(r["loss"], r["lm_loss"], r["aux_loss"], r.get("val/loss")) for r in rows]
    assert len(got) == len(GOLDEN)
    for g, want in zip(got, GOLDEN):
        assert g[:3] == pytest.approx(want[:3], rel=1e-6)
        assert (g[3] is None) == (want[3] is None) and (want[3] is None or g[3] == pytest.approx(want[3], rel=1e-6))
