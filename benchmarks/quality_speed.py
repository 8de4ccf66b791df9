"""quality_batch throughput on one shard, in docs per CPU-second (best of N, one process).

    .venv/bin/python benchmarks/quality_speed.py                      # this checkout
    .venv/bin/python benchmarks/quality_speed.py --against 9bd4ddf    # and an older commit's rules,
                                                                      # interleaved, as a ratio

The default shard is the first dedup output of benchmarks/dedup_vs_datatrove.py (run it first).
CPU time, not wall time: it hardly moves when neighbours load a shared machine. With
--against, data_engine/quality.py of that commit is loaded beside the current one and both run
in turns on the same table, so drifting load hits both alike; the outputs are checked equal.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import data_engine  # noqa: E402
from data_engine import quality  # noqa: E402

DEFAULT = REPO / "benchmarks/out/dedup/runs/bench/dedup/data/part-00000.parquet"


def load_at(rev: str):
    """data_engine/quality.py as of git revision ``rev``, imported as data_engine.quality_<rev>."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:data_engine/quality.py"],
                            capture_output=True, text=True, check=True).stdout
    folder = Path(tempfile.mkdtemp())
    name = f"quality_{rev.replace('-', '_').replace('~', '_')}"
    (folder / f"{name}.py").write_text(source)
    data_engine.__path__.append(str(folder))  # so its relative imports of data_engine.* resolve
    return __import__(f"data_engine.{name}", fromlist=["quality_batch"])


def cpu_seconds(module, table) -> float:
    cfg = module.QualityConfig()
    start = time.process_time()
    module.quality_batch(table, cfg)
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shard", nargs="?", default=str(DEFAULT))
    ap.add_argument("--against", help="a git revision whose quality rules to compare with")
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args()
    table = pq.read_table(args.shard)
    modules = {"current": quality}
    if args.against:
        modules[args.against] = load_at(args.against)
        outs = [m.quality_batch(table, m.QualityConfig()) for m in modules.values()]
        same = all(a.equals(b) for a, b in zip(outs[0][:2], outs[1][:2])) and outs[0][2] == outs[1][2]
        print(f"outputs identical to {args.against}: {same}")
    for m in modules.values():
        m.quality_batch(table.slice(0, 200), m.QualityConfig())  # warm-up: regexes, blocklist
    best = {name: float("inf") for name in modules}
    for _ in range(args.repeat):
        for name, m in modules.items():
            best[name] = min(best[name], cpu_seconds(m, table))
    for name in modules:
        print(f"{name:>12}: {table.num_rows / best[name]:.0f} docs per CPU-second ({table.num_rows} rows)")
    if args.against:
        print(f"current / {args.against}: {best[args.against] / best['current']:.2f}x")


if __name__ == "__main__":
    main()
