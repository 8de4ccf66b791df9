"""Dedup's survivors: connected components of verified near-duplicate edges, and which
member of each group (a component, or an exact-hash group) stays.

    components = connected_components(edges)             # {id: root}
    removed = choose_survivors(attach_roots(members, components), cfg)   # REMOVED_SCHEMA rows

``cfg`` is a data_engine.dedup.DedupConfig (``keep``: first_id, longest or shortest). With
``verify``, a chain A~B~C whose ends are far apart keeps a second survivor, so no removed row
is below the threshold to the row it names.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_engine.dedup_minhash import PairJaccard

if TYPE_CHECKING:
    from data_engine.dedup import DedupConfig

REMOVED_SCHEMA = pa.schema([
    ("id", pa.string()), ("reason", pa.string()),
    ("duplicate_of", pa.string()), ("jaccard", pa.float64()),
])


# --- clusters and survivors ----------------------------------------------------

def component_labels(edges: pa.Table | Iterable[pa.Table]) -> pa.Table:
    """Table(id, label) for every id on an edge: its component's number (0..C-1, arbitrary);
    ids are large_string. Vectorised: ids are dictionary-encoded to ints and scipy's
    connected_components labels the graph, so memory is a few integers per edge, not a
    Python dict of strings."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as label_components
    tables = [edges] if isinstance(edges, pa.Table) else list(edges)
    a = pa.chunked_array([c for t in tables for c in t.column("a").chunks], pa.string())
    b = pa.chunked_array([c for t in tables for c in t.column("b").chunks], pa.string())
    if not len(a):
        return pa.table({"id": pa.array([], pa.large_string()), "label": pa.array([], pa.int64())})
    # large_string: 64-bit offsets, so the ends of 10^8 pairs may hold more than 2 GiB of ids
    encoded = pa.concat_arrays([a.cast(pa.large_string()).combine_chunks(),
                                b.cast(pa.large_string()).combine_chunks()]).dictionary_encode()
    ids, ends = encoded.dictionary, encoded.indices.to_numpy()
    n = len(ids)
    graph = coo_matrix((np.ones(len(a), np.int8), (ends[:len(a)], ends[len(a):])), shape=(n, n))
    _, labels = label_components(graph, directed=False)
    return pa.table({"id": ids, "label": pa.array(labels.astype(np.int64))})


def component_roots(edges: pa.Table | Iterable[pa.Table]) -> pa.Table:
    """component_labels plus ``root``, each component's smallest id."""
    table = component_labels(edges)
    roots = table.group_by("label").aggregate([("id", "min")]).sort_by("label")
    return table.append_column("root", pc.take(roots.column("id_min"), table.column("label")))


def connected_components(edges: pa.Table | Iterable[pa.Table]) -> dict[str, str]:
    """{id: root} for every id on an edge; root = min id of its component."""
    roots = component_roots(edges)
    return dict(zip(roots.column("id").to_pylist(), roots.column("root").to_pylist()))


def attach_roots(sig_batch: pa.Table, components: dict[str, str]) -> pa.Table:
    """Rows of sig_batch whose id is in a component, with a ``root`` column added."""
    ids = sig_batch.column("id").to_pylist()
    mask = [i in components for i in ids]
    kept = sig_batch.filter(pa.array(mask, pa.bool_()))
    roots = [components[i] for i in kept.column("id").to_pylist()]
    return kept.append_column("root", pa.array(roots, pa.string()))


# The sort that puts a group's survivor first; executors reuse it.
KEEP_ORDER = {"first_id": [], "longest": [("n_chars", "descending")],
              "shortest": [("n_chars", "ascending")]}


def choose_survivors(members: pa.Table, cfg: DedupConfig, group_col: str = "root",
                     reason: str = "near_duplicate") -> pa.Table:
    """Apply cfg.keep per group; REMOVED_SCHEMA rows for every non-survivor.

    ``members`` has id, n_chars, ``group_col`` and, unless reason is
    exact_duplicate, what PairJaccard needs for the Jaccard to the survivor (sig, or
    shingles for exact). Ties on length fall back to the smallest id, so the choice is
    deterministic.
    """
    order = [(group_col, "ascending")] + KEEP_ORDER[cfg.keep] + [("id", "ascending")]
    ordered = members.sort_by(order)
    groups = ordered.column(group_col).to_pylist()
    ids = ordered.column("id").to_pylist()
    first = np.array([i == 0 or groups[i] != groups[i - 1] for i in range(len(ids))], bool)
    survivor_idx = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
    if reason == "exact_duplicate":
        removed = np.flatnonzero(~first)
        jaccard = np.ones(len(removed))
    else:
        pair_jaccard = PairJaccard(ordered, cfg)
        jaccard_all = pair_jaccard(np.arange(len(ids)), survivor_idx)
        if cfg.verify:
            _split_chains(pair_jaccard, first, survivor_idx, jaccard_all, cfg.threshold)
        removed = np.flatnonzero(survivor_idx != np.arange(len(ids)))
        jaccard = jaccard_all[removed]
    return pa.table({
        "id": pa.array([ids[i] for i in removed], pa.string()),
        "reason": pa.array([reason] * len(removed), pa.string()),
        "duplicate_of": pa.array([ids[i] for i in survivor_idx[removed]], pa.string()),
        "jaccard": pa.array(jaccard, pa.float64()),
    }, schema=REMOVED_SCHEMA)


def _split_chains(pair_jaccard: PairJaccard, first: np.ndarray, survivor_idx: np.ndarray,
                  jaccard: np.ndarray, threshold: float) -> None:
    """Keep every removal within ``threshold`` of the row it names (in place).

    A component can chain A~B~C with A and C far apart. Its first row in keep order survives
    and takes the members close to it; among the rest, the first in keep order survives too
    and takes those close to it, and so on. A pair at or above the threshold still loses one
    row (the earlier one survives and takes the later, unless the later went first), so
    recall holds while no removed row is below the threshold to its survivor.
    """
    far = np.flatnonzero(jaccard < threshold - 1e-12)
    starts = np.flatnonzero(first)
    for start in np.unique(survivor_idx[far]):
        stop = starts[np.searchsorted(starts, start, side="right")] \
            if start < starts[-1] else len(first)
        pending = [i for i in range(start + 1, stop) if jaccard[i] < threshold - 1e-12]
        while pending:
            head, rest = pending[0], np.array(pending[1:], int)
            survivor_idx[head], jaccard[head] = head, 1.0
            if not len(rest):
                break
            score = pair_jaccard(rest, np.full(len(rest), head))
            close = score >= threshold - 1e-12
            survivor_idx[rest[close]], jaccard[rest[close]] = head, score[close]
            pending = list(rest[~close])
