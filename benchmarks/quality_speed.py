"""quality_batch throughput on one shard, in docs per CPU-second (best of 3, one process).

    .venv/bin/python benchmarks/quality_speed.py [SHARD.parquet]

The default shard is the first dedup output of benchmarks/dedup_vs_datatrove.py (run it first).
CPU time, not wall time: it hardly moves when neighbours load a shared machine.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_engine.quality import QualityConfig, quality_batch  # noqa: E402

DEFAULT = REPO / "benchmarks/out/dedup/runs/bench/dedup/data/part-00000.parquet"


def cpu_seconds(table, cfg: QualityConfig) -> float:
    start = time.process_time()
    quality_batch(table, cfg)
    return time.process_time() - start


def main() -> None:
    table = pq.read_table(sys.argv[1] if len(sys.argv) > 1 else DEFAULT)
    cfg = QualityConfig()
    quality_batch(table.slice(0, 200), cfg)  # warm-up: regex compilation, blocklist load
    best = min(cpu_seconds(table, cfg) for _ in range(3))
    print(f"{table.num_rows} rows: {table.num_rows / best:.0f} docs per CPU-second")


if __name__ == "__main__":
    main()
