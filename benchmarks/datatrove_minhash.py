"""datatrove's MinHash dedup on a folder of JSONL shards; run by dedup_vs_datatrove.py.

Runs in the benchmark's own venv (datatrove is not a project dependency):

    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install datatrove xxhash
    /tmp/bench-venv/bin/python benchmarks/datatrove_minhash.py IN_DIR OUT_DIR \
        --bands 20 --rows 6 --ngram 5 --workers 2

Prints one JSON line: seconds per step and in total, and the file of removed ids.
Shingles match r1pipe's: datatrove's simplify_text (lowercase, punctuation to
spaces, whitespace collapsed) then whitespace words, word n-grams.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer


class SplitTokenizer(WordTokenizer):
    """Whitespace words: datatrove's English default needs spaCy, and r1pipe splits on spaces."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def run(args) -> dict:
    out = Path(args.out_dir)
    cfg = MinhashConfig(n_grams=args.ngram, num_buckets=args.bands, hashes_per_bucket=args.rows,
                        hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    files = len(list(Path(args.in_dir).glob("*.jsonl")))
    reader = lambda: JsonlReader(args.in_dir, glob_pattern="*.jsonl")  # noqa: E731
    steps = {
        "signatures": ([reader(), MinhashDedupSignature(str(out / "sigs"), config=cfg,
                                                       language=SplitTokenizer())], files),
        "buckets": ([MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=cfg)],
                    cfg.num_buckets),
        "cluster": ([MinhashDedupCluster(str(out / "buckets"), str(out / "remove_ids"),
                                         config=cfg)], 1),
        "filter": ([reader(), MinhashDedupFilter(
            str(out / "remove_ids"), exclusion_writer=JsonlWriter(str(out / "removed"))),
            JsonlWriter(str(out / "kept"))], files),
    }
    seconds = {}
    started = time.perf_counter()
    for name, (pipeline, tasks) in steps.items():
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=args.workers,
                              logging_dir=str(out / "logs" / name)).run()
        seconds[name] = round(time.perf_counter() - t0, 3)
    seconds["total"] = round(time.perf_counter() - started, 3)
    return {"seconds": seconds, "removed_dir": str(out / "removed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("in_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--bands", type=int, default=20)
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
