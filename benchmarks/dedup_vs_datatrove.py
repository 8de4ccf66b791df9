"""Data-engine benchmark: docs/s of every data stage, and our dedup against datatrove's.

The corpus (data_engine/generators/dedup_corpus.py) holds (base, variant) pairs whose
exact word-5-gram Jaccard is known, spread uniformly over [0.2, 1.0], plus
unrelated singletons. Our stages run as the pipeline runs them (Ray Data,
run store; W&B disabled). datatrove's MinHash dedup runs in its own venv on
the same JSONL files with the same shingles (lowercased words without
punctuation, 5-grams) and the same bands x rows, on as many workers.

    python3 -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install datatrove "xxhash<4" regex tokenizers orjson
    .venv/bin/python benchmarks/dedup_vs_datatrove.py --pairs 8000 --singletons 4000 \
        --datatrove-python /tmp/bench-venv/bin/python

Short real documents (benchmarks/short_docs.py: 16,000 of this machine's offline texts, 2,000
planted pairs), only ingest and dedup:

    .venv/bin/python benchmarks/dedup_vs_datatrove.py --corpus short-docs --pairs 2000 \
        --singletons 16000 --stages ingest,dedup --out benchmarks/out/dedup_short

(datatrove 0.10.1 passes str to xxhash, which xxhash 4 refuses; regex,
tokenizers and orjson are imports of its MinHash and JSONL modules.)

Timing: wall seconds, and CPU seconds of each side's whole process tree
(ours: the embedded Ray node, daemons included; datatrove: its process and
pool), sampled from /proc. The dedup comparison is repeated, interleaved,
and the medians are reported: the machine is shared and its load drifts.

Quality is scored against the exact Jaccard of each pair: recall = pairs at
or above a Jaccard level of which one row was removed; precision = removed
rows whose pair partner has Jaccard >= the threshold; "removed below 0.5" =
removed rows whose partner is under 0.5 (a removed singleton counts as 0).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_engine.dedup import DedupConfig  # noqa: E402
from data_engine.generators.dedup_corpus import make_jaccard_corpus  # noqa: E402

STAGES = ["ingest", "dedup", "quality", "domains", "difficulty"]


def make_corpus(kind: str, pairs: int, singletons: int, seed: int, cache: Path) -> tuple[pa.Table, pa.Table]:
    if kind == "short-docs":  # real short texts: pairs planted among `singletons` documents
        from benchmarks.short_docs import make_short_docs_corpus
        return make_short_docs_corpus(singletons + pairs, pairs, seed=seed, cache=cache)
    return make_jaccard_corpus(pairs, seed=seed, n_singletons=singletons)


def write_corpus(out: Path, records: pa.Table, files: int) -> None:
    """JSONL shards of the corpus under out/corpus."""
    started = time.time()
    folder = out / "corpus"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rows = records.select(["id", "text"]).to_pylist()
    step = -(-len(rows) // files)
    for i in range(files):
        with open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[i * step:(i + 1) * step])
    print(f"corpus: {len(rows)} docs in {files} files, {time.time() - started:.0f}s to write",
          flush=True)


def _recipe(out: Path, cfg: DedupConfig, workers: int, stages: list[str]):
    from pipelines.config import validate
    corpus = out / "corpus"
    size = sum(p.stat().st_size for p in corpus.glob("*.jsonl"))
    return validate({
        "name": "bench", "runs_dir": str(out / "runs"), "stages": stages,
        "wandb": {"mode": "disabled"}, "ray": {"num_cpus": workers},
        "ingest": {"inputs": [{"path": str(corpus)}], "chunk_bytes": size // 8 + 1},
        "dedup": cfg.model_dump(mode="json"), "quality": {},
        # The student: the teacher runs ~11 docs/s on this CPU (BENCHMARKS.md, domains).
        "domains": {"method": "student"}, "difficulty": {}}, "benchmark")


class CpuMonitor:
    """CPU seconds of a process tree, sampled every ``every`` s from each process's own
    times: Ray's workers and datatrove's pool are not reaped into any rusage we can read.
    CPU time, unlike wall time, hardly moves when other jobs load the shared machine."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil
        self.root, self.every, self.last = psutil.Process(pid), every, {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            try:
                t = proc.cpu_times()
                with self._lock:
                    self.last[(proc.pid, proc.create_time())] = t.user + t.system
            except psutil.Error:  # ended since listed: its last sample stands
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def total(self) -> float:
        self._sample()
        with self._lock:
            return sum(self.last.values())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.total()


class StageClock:
    """An echo callback for run_pipeline that reads the CPU clock as each stage starts and ends."""

    def __init__(self, monitor: CpuMonitor):
        self.monitor, self.cpu, self._start = monitor, {}, 0.0

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        verb, _, rest = line.partition(" ")
        name = rest.split()[0].rstrip(":") if rest.split() else ""
        if verb in ("run", "resume"):
            self._start = self.monitor.total()
        elif verb == "done":
            self.cpu[name] = round(self.monitor.total() - self._start, 2)


def run_ours(out: Path, cfg: DedupConfig, workers: int, stages: list[str],
             monitor: CpuMonitor) -> dict:
    """Every stage once, in order, as `r1pipe run` would."""
    from pipelines.runner import run_pipeline
    shutil.rmtree(out / "runs", ignore_errors=True)
    clock = StageClock(monitor)
    results = run_pipeline(_recipe(out, cfg, workers, stages), "bench", echo=clock)
    stages_out = {}
    for r in results:
        rows = r.metrics["rows_in"]
        stages_out[r.name] = {"rows_in": rows, "seconds": round(r.seconds, 2),
                              "docs_per_s": round(rows / r.seconds, 1),
                              "cpu_s": clock.cpu[r.name],
                              "docs_per_cpu_s": round(rows / clock.cpu[r.name], 1)}
    dedup = next(r for r in results if r.name == "dedup").metrics
    stages_out["dedup"].update({k: dedup.get(k) for k in ("bucket_pass_s", "cluster_pass_s",
                                                           "candidate_pairs")})
    removed = set(_ids(out / "runs" / "bench" / "dedup" / "rejected"))
    return {"stages": stages_out, "removed": removed}


def rerun_dedup(out: Path, cfg: DedupConfig, workers: int, stages: list[str],
                monitor: CpuMonitor) -> tuple:
    """The dedup stage again (forced), on the same Ray cluster: (wall s, CPU s)."""
    from pipelines.runner import run_pipeline
    clock = StageClock(monitor)
    [result] = run_pipeline(_recipe(out, cfg, workers, stages), "bench", stages=["dedup"],
                            force=True, echo=clock)
    return round(result.seconds, 2), clock.cpu["dedup"]


def _ids(folder: Path) -> list[str]:
    return [i for p in sorted(folder.glob("*.parquet")) for i in pq.read_table(p)["id"].to_pylist()]


def run_command(out: Path, cfg: DedupConfig, workers: int, stages: list[str]) -> float:
    """Wall seconds of the whole `r1pipe run RECIPE --stages ...` command in a fresh process:
    Python and Ray start-up, every stage, the store."""
    import yaml
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(out, cfg, workers, stages).model_dump(mode="json")))
    shutil.rmtree(out / "runs", ignore_errors=True)
    started = time.time()
    subprocess.run([str(Path(sys.executable).with_name("r1pipe")), "run", str(recipe),
                    "--stages", ",".join(stages)], check=True, stdout=subprocess.DEVNULL)
    return round(time.time() - started, 2)


def run_datatrove(out: Path, bands: int, rows: int, ngram: int, workers: int,
                  python: str) -> dict:
    dt_out = out / f"datatrove_{bands}x{rows}"
    shutil.rmtree(dt_out, ignore_errors=True)
    cmd = [python, str(REPO / "benchmarks" / "datatrove_minhash.py"), str(out / "corpus"),
           str(dt_out), "--bands", str(bands), "--rows", str(rows),
           "--ngram", str(ngram), "--workers", str(workers)]
    dt_out.mkdir(parents=True)
    started = time.time()
    # Files, not pipes: datatrove logs a lot, and a full pipe would stall it while we poll.
    with open(dt_out / "stdout.txt", "w") as out_f, open(dt_out / "stderr.txt", "w") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f)
        monitor = CpuMonitor(proc.pid, every=0.1)
        proc.wait()
        cpu = monitor.stop()
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"datatrove failed:\n{(dt_out / 'stderr.txt').read_text()[-3000:]}")
    result = json.loads((dt_out / "stdout.txt").read_text().strip().splitlines()[-1])
    removed = set()
    for path in sorted(Path(result["removed_dir"]).glob("*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            removed.update(json.loads(line)["id"] for line in f)
    return {"seconds": result["seconds"], "process_wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "removed": removed}


def score(removed: set[str], truth: pa.Table, threshold: float, records: pa.Table | None = None) -> dict:
    """Recall on the truth's pairs; precision by each removed row's pair partner, or, given the
    records (a corpus with duplicates nobody planted), by its most similar other document."""
    partner = {}
    for r in truth.to_pylist():
        partner[r["base_id"]] = r["jaccard"]
        partner[r["variant_id"]] = r["jaccard"]
    pairs = truth.to_pylist()

    def recall(level: float) -> float:
        hit = [r["base_id"] in removed or r["variant_id"] in removed
               for r in pairs if r["jaccard"] >= level]
        return round(sum(hit) / len(hit), 4) if hit else float("nan")

    if records is not None:
        from benchmarks.short_docs import partner_jaccard
        partner = partner_jaccard(records, removed)
    true_j = [partner.get(i, 0.0) for i in removed]
    n = max(len(removed), 1)
    return {"removed": len(removed), f"recall_j>={threshold}": recall(threshold),
            "recall_j>=0.8": recall(0.8),
            f"precision_j>={threshold}": round(sum(j >= threshold for j in true_j) / n, 4),
            "removed_below_0.5": round(sum(j < 0.5 for j in true_j) / n, 4)}


def main() -> None:
    # Ray starts its workers at nice 15; datatrove runs at nice 0. On a shared
    # machine that alone would hand our CPU to other jobs, so level the field.
    os.environ.setdefault("RAY_worker_niceness", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["generated", "short-docs"], default="generated",
                        help="generated: 200-400-word pairs (data_engine); short-docs: real short texts "
                             "of this machine with planted pairs (benchmarks/short_docs.py)")
    parser.add_argument("--pairs", type=int, default=8000)
    parser.add_argument("--singletons", type=int, default=4000,
                        help="documents without a planted partner (short-docs: the real documents)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--datatrove-python", default="/tmp/bench-venv/bin/python")
    # Ours (20x6, verified) first; 14x9 is the band/row optimum without verification.
    parser.add_argument("--datatrove-bands", default="20x6,14x9",
                        help="bands x rows settings to run datatrove with")
    parser.add_argument("--repeat", type=int, default=3, help="dedup timings, interleaved")
    parser.add_argument("--jaccard", default="exact,estimated",
                        help="our verification settings to time (dedup.jaccard), the first is 'ours'")
    parser.add_argument("--command-repeat", type=int, default=0,
                        help="also time the whole `r1pipe run --stages ...` command this many "
                             "times, interleaved with datatrove's first setting")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "dedup"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = args.jaccard.split(",")
    cfgs = {("ours" if i == 0 else f"ours_{v}"): DedupConfig(jaccard=v) for i, v in enumerate(variants)}
    cfg = cfgs["ours"]
    records, truth = make_corpus(args.corpus, args.pairs, args.singletons, args.seed, out.parent)
    write_corpus(out, records, args.files)
    stages = args.stages.split(",")
    monitor = CpuMonitor(os.getpid())  # with an embedded Ray: the whole Ray node
    ours = run_ours(out, cfg, args.workers, stages, monitor)
    docs = records.num_rows
    settings = args.datatrove_bands.split(",")
    times = {"ours": [ours["stages"]["dedup"]["seconds"]], **{k: [] for k in list(cfgs)[1:]},
             **{s: [] for s in settings}}
    cpu = {k: ([ours["stages"]["dedup"]["cpu_s"]] if k == "ours" else []) for k in times}
    removed = {"ours": ours["removed"]}
    # Interleaved repeats: the machine is shared, so load drifts between runs.
    for rep in range(args.repeat):
        # Rotated: the first of our runs after datatrove's finds Ray's idle workers gone.
        order = list(cfgs.items())[rep % len(cfgs):] + list(cfgs.items())[:rep % len(cfgs)]
        for name, variant in order:
            if rep or name != "ours":
                wall, cpu_s = rerun_dedup(out, variant, args.workers, stages, monitor)
                times[name].append(wall)
                cpu[name].append(cpu_s)
                removed.setdefault(name, set(_ids(out / "runs" / "bench" / "dedup" / "rejected")))
        for setting in settings:
            bands, rows = map(int, setting.split("x"))
            theirs = run_datatrove(out, bands, rows, cfg.ngram, args.workers,
                                   args.datatrove_python)
            times[setting].append(theirs["seconds"]["total"])
            cpu[setting].append(theirs["cpu_s"])
            removed.setdefault(setting, theirs["removed"])
            print(f"datatrove {setting}: {theirs['seconds']}", flush=True)
    commands = {"ours": [], "datatrove": []}
    for _ in range(args.command_repeat):  # whole commands, fresh processes, interleaved
        commands["ours"].append(run_command(out, cfg, args.workers, stages))
        bands, rows = map(int, settings[0].split("x"))
        commands["datatrove"].append(run_datatrove(out, bands, rows, cfg.ngram, args.workers,
                                                   args.datatrove_python)["seconds"]["total"])
        print(f"whole command: ours {commands['ours'][-1]}s, datatrove "
              f"{commands['datatrove'][-1]}s", flush=True)
    ours_s, ours_cpu = statistics.median(times["ours"]), statistics.median(cpu["ours"])
    report = {"corpus": args.corpus, "docs": docs, "workers": args.workers, "bands": cfg.bands, "rows": cfg.rows,
              "threshold": cfg.threshold, "repeat": args.repeat, "stages": ours["stages"]}
    for name, runs in times.items():
        median = statistics.median(runs)
        key = "ours_dedup" if name == "ours" else name if name.startswith("ours_") \
            else f"datatrove_{name}"
        median_cpu = statistics.median(cpu[name])
        report[key] = {**score(removed[name], truth, cfg.threshold,
                                  records if args.corpus == "short-docs" else None), "seconds": runs,
                       "median_s": median, "docs_per_s": round(docs / median, 1),
                       "ours_speedup": round(median / ours_s, 3), "cpu_s": cpu[name],
                       "median_cpu_s": median_cpu,
                       "docs_per_cpu_s": round(docs / median_cpu, 1),
                       "ours_cpu_speedup": round(median_cpu / ours_cpu, 3)}
    if args.command_repeat:
        ours_cmd, theirs_cmd = (statistics.median(commands[k]) for k in ("ours", "datatrove"))
        report["whole_command"] = {"stages": stages, "ours_s": commands["ours"],
                                   f"datatrove_{settings[0]}_s": commands["datatrove"],
                                   "ours_speedup": round(theirs_cmd / ours_cmd, 3)}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
