"""Driver memory and time of dedup's connected components: the vectorised component_roots
(scipy + Arrow) against the plain union-find over a dict it replaced, on the same edges.

    .venv/bin/python benchmarks/dedup_components.py --edges 2000000

Each method runs in a fresh subprocess. Its working memory is the peak RSS, reset once the edges
are loaded (/proc/self/clear_refs), minus the RSS at that point, read when each has its result:
the dict for the union-find, the Arrow table for the vectorised version (the dict it then builds
only feeds the digest that checks both found the same components). The edges join random pairs among 1.5x as many 20-character ids.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import hashlib, json, sys, time
import numpy as np, pyarrow as pa
method, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
ids = pa.array([f"{i:020d}" for i in range(int(1.5 * n))])
a, b = rng.integers(0, len(ids), n), rng.integers(0, len(ids), n)
edges = pa.table({"a": ids.take(a), "b": ids.take(b)})
del ids, a, b
import gc; gc.collect()
from data_engine.dedup_survivors import component_roots

def status(field):  # kB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
t0 = time.process_time()
if method == "vectorised":
    out = component_roots(edges)  # Arrow columns, no dict (the cluster pass needs only the labels)
    cpu, peak = time.process_time() - t0, status("VmHWM")
    roots = dict(zip(out.column("id").to_pylist(), out.column("root").to_pylist()))
else:
    parent = {}
    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for x, y in zip(edges.column("a").to_pylist(), edges.column("b").to_pylist()):
        parent.setdefault(x, x); parent.setdefault(y, y)
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    roots = {x: find(x) for x in parent}
    cpu, peak = time.process_time() - t0, status("VmHWM")
digest = hashlib.sha256("\n".join(f"{k} {roots[k]}" for k in sorted(roots)).encode()).hexdigest()
print(json.dumps({"method": method, "edges": n, "ids": len(roots), "cpu_s": round(cpu, 2),
                  "working_mib": round((peak - base) / 1024, 1), "components": digest}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", type=int, default=2_000_000)
    args = parser.parse_args()
    rows = {}
    for method in ("union_find_dict", "vectorised"):
        out = subprocess.run([sys.executable, "-c", CHILD, method, str(args.edges)],
                             capture_output=True, text=True, check=True)
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[method], flush=True)
    old, new = rows["union_find_dict"], rows["vectorised"]
    print(json.dumps({"memory_ratio_old_over_new": round(old["working_mib"] / max(new["working_mib"], 0.1), 2),
                      "cpu_ratio_old_over_new": round(old["cpu_s"] / max(new["cpu_s"], 0.01), 2),
                      "same_components": old["components"] == new["components"]}))


if __name__ == "__main__":
    main()
