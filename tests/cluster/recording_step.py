"""A data step for the multi-node tests, in a module of its own so the Ray workers that import it
load no more than the quality stage's own step does (the test module pulls in torch and DeepSpeed)."""
import time
import uuid
from pathlib import Path

import pyarrow as pa
import ray

from data_engine.quality import QualityConfig, quality_batch


class RecordingQualityStep:
    """The quality stage's step that also records the node each shard ran on (marks/<shard>.<uuid>)
    and, on the ``victim`` node, holds every shard after the node's first one, so that node can be
    killed with a shard in flight (marks/hanging-<shard>). Until the victim holds one, the other
    nodes wait, so the victim surely gets two shards however Ray Data spreads them."""

    def __init__(self, marks: str, victim: str | None = None):
        self.marks, self.victim = Path(marks), victim
        self.cfg = QualityConfig()

    def __call__(self, table: pa.Table):
        shard = table.column("id")[0].as_py().split("-")[0]
        node = ray.get_runtime_context().get_node_id()
        (self.marks / f"{shard}.{uuid.uuid4().hex}").write_text(node)
        if self.victim is not None and node != self.victim:
            deadline = time.time() + 60
            while not any(self.marks.glob("hanging-*")) and time.time() < deadline:
                time.sleep(0.1)
        if node == self.victim and len(self._ran_on(node)) > 1:
            (self.marks / f"hanging-{shard}").write_text(node)
            while True:
                time.sleep(1)
        return quality_batch(table, self.cfg)

    def _ran_on(self, node: str) -> list[str]:
        return [p for p in self.marks.glob("s*.*") if p.read_text() == node]


def records(marks: Path) -> dict[str, list[str]]:
    """shard -> the nodes it was computed on, in no particular order."""
    out: dict[str, list[str]] = {}
    for p in marks.glob("s*.*"):
        out.setdefault(p.name.split(".")[0], []).append(p.read_text())
    return out
