"""`tokenizer`: a byte-level BPE trained on the curated corpus (or an existing tokenizer.json).

Input: the `difficulty` stage's data/*.parquet (the last data stage). Writes
tokenizer.json, tokenizer_config.json and special_tokens_map.json into the stage folder,
which `transformers.PreTrainedTokenizerFast.from_pretrained` loads as they are.
Metrics: vocabulary size, documents and files read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from pipelines.graph import CORPUS_STAGE, Stage, StageContext, register



def corpus_files(stage_root: Path) -> list[Path]:
    """The curated corpus: the Parquet shards an upstream data stage published under data/."""
    files = sorted((Path(stage_root) / "data").glob("*.parquet"))
    if not files:
        raise ValueError(f"{stage_root}/data holds no Parquet files: run the {CORPUS_STAGE!r} stage first")
    return files


def iter_texts(files: list[Path], column: str, limit: int | None, counter: list[int]) -> Iterator[str]:
    """Texts batch by batch, so a large corpus never sits in memory at once."""
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=2048):
            for text in batch.column(0).to_pylist():
                if limit is not None and counter[0] >= limit:
                    return
                if text:
                    counter[0] += 1
                    yield text


def run(ctx: StageContext) -> dict:
    from training.tokenizer import TokenizerConfig, build_tokenizer, save_tokenizer
    cfg = ctx.section
    tok_cfg = TokenizerConfig(**cfg.model_dump(exclude={"max_docs", "text_column"}))
    files, docs = [], [0]
    texts = None
    if cfg.path is None:
        files = corpus_files(ctx.inputs[CORPUS_STAGE])
        texts = iter_texts(files, cfg.text_column, cfg.max_docs, docs)
    tok = build_tokenizer(tok_cfg, texts)
    save_tokenizer(tok, ctx.out)
    ctx.log(f"vocabulary of {tok.get_vocab_size()} from {docs[0]} documents in {len(files)} file(s)")
    return {"vocab_size": tok.get_vocab_size(), "docs": docs[0], "files": len(files),
            "from_path": cfg.path is not None}


# BPE training runs in this task (Rust threads), so it asks for a CPU
register(Stage("tokenizer", (CORPUS_STAGE,), run, resources={"num_cpus": 1}))
