"""Domain-tagging accuracy on the labelled dev set (disjoint from the seed).

One machine:

    .venv/bin/python benchmarks/domain_accuracy.py                   # student
    .venv/bin/python benchmarks/domain_accuracy.py --method teacher  # MiniLM, needs the extra
    .venv/bin/python benchmarks/domain_accuracy.py --method cascade  # student, unsure rows to the teacher
    .venv/bin/python benchmarks/domain_accuracy.py --method all      # the three in one run, with docs/s ratios
    .venv/bin/python benchmarks/domain_accuracy.py --confusions      # list the misses

A cluster: nothing differs; the figure depends only on the model and the dev set.
Prints macro accuracy (the mean of per-domain accuracies), per-domain
accuracy, micro accuracy, the construction and tagging times, docs/s, and
for the cascade the fraction of rows the teacher saw. Tagging is timed on a
warm model (one untimed call first), the dev set repeated `--repeat` times.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_engine.domains import DEV_PATH, DomainsConfig, DomainTagger  # noqa: E402
from data_engine.schema import DOMAINS  # noqa: E402


def load_dev(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def per_domain_accuracy(rows: list[dict], predicted: list[str]) -> dict[str, float]:
    total, hits = Counter(), Counter()
    for row, pred in zip(rows, predicted):
        total[row["domain"]] += 1
        hits[row["domain"]] += int(pred == row["domain"])
    return {d: hits[d] / total[d] for d in DOMAINS if total[d]}


def evaluate(cfg: DomainsConfig, dev_path: Path = DEV_PATH, repeat: int = 1) -> dict:
    rows = load_dev(dev_path)
    start = time.perf_counter()
    tagger = DomainTagger(cfg)
    built = time.perf_counter()
    tagger(pa.table({"text": [r["text"] for r in rows[:8]]}))  # warm-up: lazy init, caches
    if cfg.method == "cascade":
        tagger.model.rows = tagger.model.teacher_rows = 0
    batch = pa.table({"text": [r["text"] for r in rows] * repeat})
    timed = time.perf_counter()
    out = tagger(batch)
    tagged = time.perf_counter()
    predicted = out.column("domain").to_pylist()[:len(rows)]
    per_domain = per_domain_accuracy(rows, predicted)
    return {
        "method": cfg.method,
        "rows": len(rows),
        "macro_accuracy": sum(per_domain.values()) / len(per_domain),
        "micro_accuracy": sum(p == r["domain"] for p, r in zip(predicted, rows)) / len(rows),
        "per_domain": per_domain,
        "build_s": built - start,
        "tag_s": tagged - timed,
        "docs_per_s": batch.num_rows / (tagged - timed),
        "teacher_fraction": (tagger.model.teacher_rows / tagger.model.rows
                             if cfg.method == "cascade" else float(cfg.method == "teacher")),
        "misses": [(r["domain"], p, r.get("register", ""), r["text"][:90])
                   for r, p in zip(rows, predicted) if p != r["domain"]],
    }


def print_report(report: dict, confusions: bool) -> None:
    print(f"method={report['method']} rows={report['rows']} "
          f"macro_accuracy={report['macro_accuracy']:.3f} micro_accuracy={report['micro_accuracy']:.3f} "
          f"teacher_fraction={report['teacher_fraction']:.3f} build_s={report['build_s']:.1f} "
          f"tag_s={report['tag_s']:.2f} docs_per_s={report['docs_per_s']:.1f}")
    for domain, acc in report["per_domain"].items():
        print(f"  {domain:12s} {acc:.2f}")
    if confusions:
        for gold, pred, register, text in report["misses"]:
            print(f"  MISS {gold:>11s} -> {pred:11s} [{register}] {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["student", "teacher", "cascade", "all"], default="student")
    parser.add_argument("--dev", type=Path, default=DEV_PATH)
    parser.add_argument("--repeat", type=int, default=1, help="tag the dev set this many times (timing)")
    parser.add_argument("--cascade-threshold", type=float, default=None, help="default: the config's")
    parser.add_argument("--confusions", action="store_true", help="print every miss")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the teacher runs (domains.device)")
    args = parser.parse_args()
    methods = ["student", "cascade", "teacher"] if args.method == "all" else [args.method]
    extra = {"device": args.device}
    if args.cascade_threshold is not None:
        extra["cascade_threshold"] = args.cascade_threshold
    reports = {m: evaluate(DomainsConfig(method=m, **extra), args.dev, args.repeat) for m in methods}
    for report in reports.values():
        print_report(report, args.confusions)
    if len(reports) > 1:
        speed = {m: r["docs_per_s"] for m, r in reports.items()}
        print("docs/s ratios: " + ", ".join(f"student/{m} {speed['student'] / speed[m]:.1f}x"
                                            for m in methods if m != "student"))


if __name__ == "__main__":
    main()
