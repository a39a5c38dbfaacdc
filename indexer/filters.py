"""Label filters: the items passing them (from label codes) and recall-preserving filtered search."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.index import inner_index
from indexer.items import LabelCodes

logger = logging.getLogger(__name__)

EXACT_SUBSET_MAX = 20_000  # at most this many qualifying items: brute force over them
BITMAP_MAX_BYTES = 64 << 20  # ids up to ~512M use a bitmap selector, larger ones a hash set
HNSW_EF_MAX = 2048


def check_filters(filters: dict, labels: LabelCodes) -> None:
    """Raise a ValueError naming the valid groups or labels when a filter uses unknown ones."""
    for group, wanted in filters.items():
        if group not in labels.vocab:
            raise ValueError(f"Unknown label group {group!r}; choose one of: {', '.join(sorted(labels.vocab))}")
        if isinstance(wanted, str):
            raise ValueError(f"Filter for group {group!r} must be a list of labels, got the string {wanted!r}")
        unknown = [label for label in wanted if label not in labels.vocab[group]]
        if unknown:
            raise ValueError(f"Unknown label(s) {', '.join(map(repr, unknown))} in group {group!r}; "
                             f"choose from: {', '.join(labels.vocab[group])}")


def qualifying_positions(filters: dict | None, labels: LabelCodes) -> np.ndarray | None:
    """Return sorted item positions passing every group (OR within a group, AND across); None = no filter.

    A group given an empty label list places no constraint (nothing ticked = anything goes).
    """
    if not filters:
        return None
    check_filters(filters, labels)
    result = None
    for group, wanted in filters.items():
        if not wanted:
            continue
        members = np.unique(np.concatenate([labels.items_with(labels.code(group, label)) for label in wanted]))
        result = members if result is None else np.intersect1d(result, members, assume_unique=True)
    return result


@dataclass
class Selector:
    """A FAISS id selector together with the buffers it points into (kept alive while searching)."""

    sel: faiss.IDSelector
    buffer: np.ndarray


def make_selector(ids: np.ndarray) -> Selector:
    """Return a bitmap selector over ids (a hash-set IDSelectorBatch when ids are too large)."""
    ids = np.asarray(ids, dtype=np.int64)
    top = int(ids.max()) if len(ids) else 0
    if top // 8 + 1 <= BITMAP_MAX_BYTES:
        bits = np.zeros(top + 1, dtype=bool)
        bits[ids] = True
        bitmap = np.packbits(bits, bitorder="little")
        return Selector(faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap)
    return Selector(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)), ids)


def selector_params(index: faiss.Index, sel: faiss.IDSelector, boost: float) -> faiss.SearchParameters:
    """Return search parameters restricting to sel, deepening IVF/HNSW search by boost (1/selectivity)."""
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexIVF):
        nprobe = min(inner.nlist, math.ceil(inner.nprobe * boost))
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe))
    if isinstance(inner, faiss.IndexHNSW):
        ef = max(inner.hnsw.efSearch, min(HNSW_EF_MAX, math.ceil(inner.hnsw.efSearch * boost)))
        return faiss.SearchParametersHNSW(sel=sel, efSearch=int(ef))
    return faiss.SearchParameters(sel=sel)


def search_with_selector(index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray,
                         n_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Search a CPU index returning only allowed ids; approximate indexes search deeper when selective."""
    selector = make_selector(allowed)
    params = selector_params(index, selector.sel, boost=n_total / max(1, len(allowed)))
    scores, ids = index.search(queries, k, params=params)
    del selector  # the selector and its buffer must outlive the search call above
    return scores, ids


def search_exact_subset(index: faiss.Index, queries: np.ndarray, k: int,
                        allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force the queries against the allowed ids' vectors reconstructed from index."""
    vectors = index.reconstruct_batch(np.ascontiguousarray(allowed, dtype=np.int64))
    scores, positions = faiss.knn(queries, vectors, min(k, len(allowed)),
                                  metric=faiss.METRIC_INNER_PRODUCT)
    ids = np.where(positions >= 0, allowed[np.maximum(positions, 0)], -1)
    return pad_results(scores, ids, k)


def pad_results(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return [Q, k] float32 scores / int64 ids with -inf / -1 in every empty slot."""
    q = len(ids)
    out_scores = np.full((q, k), -np.inf, dtype=np.float32)
    out_ids = np.full((q, k), -1, dtype=np.int64)
    width = min(k, ids.shape[1]) if ids.ndim == 2 else 0
    out_ids[:, :width] = ids[:, :width]
    out_scores[:, :width] = scores[:, :width]
    out_scores[out_ids < 0] = -np.inf
    return out_scores, out_ids


def filtered_search(index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray,
                    n_total: int, exact_max: int = EXACT_SUBSET_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Search only the allowed ids: exact over small subsets, FAISS selectors over large ones."""
    if len(allowed) == 0:
        return pad_results(np.empty((len(queries), 0)), np.empty((len(queries), 0), np.int64), k)
    if len(allowed) <= exact_max:
        return search_exact_subset(index, queries, k, allowed)
    return pad_results(*search_with_selector(index, queries, k, allowed, n_total), k)
