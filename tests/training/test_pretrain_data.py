"""Token cache, packing and the curriculum sampler on a tiny corpus (no DeepSpeed, no Ray)."""
import json

import numpy as np
import pytest

from tests.pretrain_corpus import write_corpus, write_tokenizer
from training.config import CurriculumConfig, DataConfig
from training.distributed import rank_slice
from training.pretrain_data import CurriculumSampler, PackedCorpus, build_token_cache, is_validation


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = write_corpus(root, n_docs=150)
    write_tokenizer(root / "tok", files, vocab_size=400)
    return root, files


@pytest.fixture(scope="module")
def cache(corpus_files):
    root, files = corpus_files
    return build_token_cache(files, root / "tok" / "tokenizer.json", root / "cache", val_fraction=0.1)


@pytest.fixture(scope="module")
def corpus(cache):
    return PackedCorpus(cache, seq_len=16)


def data_cfg(**kw) -> DataConfig:
    return DataConfig(seq_len=16, micro_batch=2, global_batch=8, **kw)


def test_cache_is_reused_and_split_is_stable(corpus_files, cache):
    root, files = corpus_files
    again = build_token_cache(files, root / "tok" / "tokenizer.json", root / "cache", val_fraction=0.1)
    assert again == cache
    pools = json.loads((cache / "pools.json").read_text())
    assert {(p["domain"], p["difficulty"]) for p in pools if p["split"] == "train"} == {
        (d, lvl) for d in ("code", "math", "history") for lvl in ("basic", "advanced", "expert")}
    n_val = sum(p["docs"] for p in pools if p["split"] == "val")
    assert n_val == sum(is_validation(f"d{i:05d}", 0.1) for i in range(150)) > 0
    other = build_token_cache(files, root / "tok" / "tokenizer.json", root / "cache", val_fraction=0.2)
    assert other != cache  # a changed split is a new cache, never a stale one


def test_packing_shifts_targets_and_wastes_nothing(corpus):
    pool = corpus.train[0]
    x, y = corpus.sequence(pool, 1)
    assert x.shape == y.shape == (16,)
    assert np.array_equal(x[1:], y[:-1])
    assert np.array_equal(x, np.asarray(pool.tokens[16:32]))  # stride seq_len: consecutive windows
    assert pool.n == (pool.tokens.size - 1) // 16
    assert pool.tokens[0] == 1  # every document starts with <s>


def test_sampler_is_deterministic_and_resumes_mid_phase(corpus):
    cfg = data_cfg()
    a = CurriculumSampler(corpus, cfg, total_steps=20, seed=3)
    first = [a.next_batch() for _ in range(7)]  # step 7 is in phase 2 (0.2 * 20 = 4 <= 7 < 12)
    assert a.phase() == 1
    state = json.loads(json.dumps(a.state_dict()))  # it survives JSON, as in trainer.json
    rest = [a.next_batch() for _ in range(10)]

    b = CurriculumSampler(corpus, cfg, total_steps=20, seed=3)
    assert [b.next_batch() for _ in range(7)] == first
    c = CurriculumSampler(corpus, cfg, total_steps=20, seed=3)
    c.load_state_dict(state)
    assert [c.next_batch() for _ in range(10)] == rest
    d = CurriculumSampler(corpus, cfg, total_steps=20, seed=4)
    assert [d.next_batch() for _ in range(7)] != first


def test_curriculum_phases_follow_the_step_budget(corpus):
    s = CurriculumSampler(corpus, data_cfg(), total_steps=50, seed=0)
    seen = {0: set(), 1: set(), 2: set()}
    for step in range(50):
        phase = s.phase()
        assert phase == (0 if step < 10 else 1 if step < 30 else 2)
        seen[phase] |= {corpus.train[p].difficulty for p, _ in s.next_batch()}
    assert seen == {0: {"basic"}, 1: {"basic", "advanced"}, 2: {"basic", "advanced", "expert"}}
    off = CurriculumSampler(corpus, data_cfg(curriculum=CurriculumConfig(enabled=False)), 50, 0)
    assert off.phase() == 2  # shuffled order: everything from step 0


def test_domain_weights_and_early_domains(corpus):
    cfg = data_cfg(domain_weights={"math": 3.0, "code": 1.0},
                   curriculum=CurriculumConfig(early_domains=["math"]))
    s = CurriculumSampler(corpus, cfg, total_steps=100, seed=0)
    early = [corpus.train[p].domain for _ in range(20) for p, _ in s.next_batch()]
    assert set(early) == {"math"}
    s.load_state_dict({**s.state_dict(), "step": 60})
    late = [corpus.train[p].domain for _ in range(40) for p, _ in s.next_batch()]
    assert set(late) == {"math", "code"}  # history has no weight: never sampled
    assert 2.0 < late.count("math") / late.count("code") < 4.5
    with pytest.raises(ValueError, match="data.domain_weights.*'physics'"):
        CurriculumSampler(corpus, data_cfg(domain_weights={"physics": 1.0}), 10, 0)


def test_sharding_covers_the_global_batch_once(corpus):
    ids = CurriculumSampler(corpus, data_cfg(), total_steps=10, seed=0).next_batch()
    parts = [rank_slice(ids, r, 4) for r in range(4)]
    assert [i for part in parts for i in part] == ids
    micro = corpus.micro_batches(parts[0], 1)
    assert len(micro) == 2 and micro[0][0].shape == (1, 16)


def test_each_sequence_once_per_epoch(corpus):
    s = CurriculumSampler(corpus, data_cfg(curriculum=CurriculumConfig(enabled=False)), 10_000, 0)
    pool = 0
    n = corpus.train[pool].n
    drawn = []
    while s.epochs[pool] == 0:
        drawn += [i for p, i in s.next_batch() if p == pool]
    assert sorted(drawn[:n]) == list(range(n))  # a permutation of the pool, then a new epoch
    assert drawn[:n] != list(range(n))


def test_config_errors():
    with pytest.raises(ValueError, match="boundaries"):
        CurriculumConfig(boundaries=(0.7, 0.2))
    with pytest.raises(ValueError, match="negative"):
        DataConfig(domain_weights={"math": -1})
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        DataConfig(seq_lenn=3)
