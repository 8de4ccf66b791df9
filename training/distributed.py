"""Collectives every training loop shares: rank and world, broadcast, barrier, sums, rank-0 work.

Plain torch.distributed; each call is a no-op in a group of one, so the same loop runs in
one process, on a Ray Train gang of CPU workers (gloo) and on GPUs (NCCL).

    rank, world = rank_world()
    folders = broadcast(list_checkpoints(root) if rank == 0 else None)
    on_rank0(lambda: write_model(...))      # every rank raises if rank 0 failed
    total, = all_sum([local_count])
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def collective_device() -> torch.device:
    """Where a tensor for a torch.distributed call must live: NCCL takes CUDA tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank."""
    box = [obj]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


def on_rank0(fn: Callable[[], Any]) -> None:
    """Run fn on rank 0 only; if it fails, every rank raises (instead of waiting forever)."""
    on_leaders(FileView.one_copy(), fn)


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks, in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    gathered = [None] * dist.get_world_size()
    if len(gathered) > 1:
        dist.all_gather_object(gathered, obj)
    else:
        gathered[0] = obj
    return gathered


def rank_slice(ids: list, rank: int, world: int) -> list:
    """This rank's contiguous slice of a global batch (its part of every step's rows)."""
    per = len(ids) // world
    return ids[rank * per:(rank + 1) * per]


@dataclass(frozen=True)
class FileView:
    """The ranks that see the same files under a folder as this one (``peers``, in rank order):
    every rank, on one machine or where the nodes share the folder; the ranks of this node where
    each node keeps the folder on its own disk (a run on object storage whose cache folder is
    node-local). Work on those files is split among the peers, and their first rank, the
    leader, does what one process per copy of the folder must do."""

    peers: tuple[int, ...]
    rank: int
    shared: bool

    @classmethod
    def one_copy(cls) -> "FileView":
        """Every rank sees the same files (one machine, or a folder the nodes share): rank 0 leads."""
        rank, world = rank_world()
        return cls(tuple(range(world)), rank, True)

    @property
    def index(self) -> int:
        return self.peers.index(self.rank)

    @property
    def leader(self) -> bool:
        return self.rank == self.peers[0]


def file_view(root: Path) -> FileView:
    """Which ranks see the same files under ``root``: each rank writes a probe file there, and
    ranks that see the same probes share a copy of the folder. Collective: every rank calls it."""
    rank, world = rank_world()
    if world == 1:
        return FileView.one_copy()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    nonce = broadcast(uuid.uuid4().hex if rank == 0 else None)
    mine = root / f".view-{nonce}-{rank}"
    mine.write_text("")
    barrier()
    seen = all_gather(sorted(int(p.name.rsplit("-", 1)[1]) for p in root.glob(f".view-{nonce}-*")))
    barrier()
    mine.unlink()
    return FileView(tuple(r for r, s in enumerate(seen) if s == seen[rank]), rank, seen.count(seen[0]) == world)


def on_leaders(view: FileView, fn: Callable[[], Any]) -> None:
    """Work on a folder's files that each copy of the folder needs once (rank 0 alone where the
    ranks share it): run by each view's leader; if any fails, every rank raises (instead of
    waiting forever)."""
    error = None
    if view.leader:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = f"rank {view.rank} failed: {type(err).__name__}: {err}"
    failed = [e for e in all_gather(error) if e]
    if failed:
        raise RuntimeError(failed[0])
