"""Search depth tuning: raise IVF nprobe / HNSW efSearch until leave-one-out recall@k reaches a target.

The exact answers come from passes over the source's blocks (``faiss.contrib.exhaustive_search``), so
tuning never needs the corpus in memory."""
from __future__ import annotations

import logging

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from indexer.index import inner_index, index_kind, set_search_depth
from indexer.source import VectorSource

logger = logging.getLogger(__name__)

TARGET_RECALL = 0.95
TUNE_K = 50
TUNE_QUERIES = 256
TUNE_MARGIN = 0.01  # catalog items as queries are slightly easier than new photos
EF_CANDIDATES = (128, 192, 256, 384, 512, 768, 1024, 2048)
PLATEAU_GAIN = 0.002
PLATEAU_FROM = 0.8  # recall below which tuning never stops for lack of gain


def depth_candidates(index: faiss.Index, k: int) -> list[int]:
    """Return increasing nprobe (steps of about 1.5x up to nlist) or efSearch (>= k) values to try."""
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexIVF):
        steps = sorted({int(b * 2 ** i) for i in range(32) for b in (1, 1.5)})  # 1, 2, 3, 4, 6, 8, 12, ...
        return [p for p in steps if p < inner.nlist] + [int(inner.nlist)]
    return [ef for ef in EF_CANDIDATES if ef >= k] or [k]


def exact_answers(source: VectorSource, view: str, sample: np.ndarray, k: int) -> list[np.ndarray]:
    """Per sampled row, the ids of the other items whose exact score reaches the k-th best one's.

    Ties are all included: in vectors of a few distinct values thousands of items tie with the k-th
    one, and counting ids against one arbitrary top-k would call correct answers wrong (the tuner
    then saw recall 0.00-0.05 at every depth and stopped at nprobe 1-3)."""
    queries = source.take(view, sample)
    scores, rows = knn_ground_truth(queries, (x for _, x in source.blocks(view)), k + 1,
                                    metric_type=faiss.METRIC_INNER_PRODUCT)
    kth = np.stack([s[r != own][k - 1] for s, r, own in zip(scores, rows, sample)])
    floor = kth - 1e-5 * np.maximum(1.0, np.abs(kth))
    hits_q, hits_row = [], []
    for start, x in source.blocks(view):
        q, r = np.nonzero(queries @ x.T >= floor[:, None])
        hits_q.append(q)
        hits_row.append(r + start)
    q, r = np.concatenate(hits_q), np.concatenate(hits_row)
    keep = r != sample[q]  # leave one out
    q, r = q[keep], r[keep]
    return [np.sort(source.ids[r[q == i]]) for i in range(len(sample))]


def recall_of(found: np.ndarray, good: list[np.ndarray], k: int) -> float:
    """Return the mean share of each row's k slots holding an id among that row's good answers."""
    hits = [np.isin(row[row >= 0], answers).sum() for row, answers in zip(found, good)]
    return float(np.minimum(hits, k).mean() / k) if hits else 1.0


def drop_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Return the first k ids of each row of found other than that row's own id."""
    return np.stack([row[row != me][:k] for row, me in zip(found, own)])


def tune_search_depth(index: faiss.Index, source: VectorSource, view: str = "shared", *, k=TUNE_K,
                      target=TARGET_RECALL, n_queries=TUNE_QUERIES, seed=0) -> int | None:
    """Raise nprobe/efSearch until leave-one-out recall@k of sampled catalog items reaches target.

    Each sampled item queries the index and its own id is dropped from both the exact and the
    approximate answers, so the trivial self-match does not flatter the estimate.
    """
    k = min(k, len(source) - 1)
    if k < 1:
        return None
    sample = np.sort(np.random.default_rng(seed).choice(len(source), min(n_queries, len(source)), replace=False))
    good = exact_answers(source, view, sample, k)
    queries, own = source.take(view, sample), source.ids[sample]
    recall, depth = -1.0, None
    for candidate in depth_candidates(index, k):
        set_search_depth(index, candidate)
        gained = recall_of(drop_self(index.search(queries, k + 1)[1], own, k), good, k) - recall
        if gained < PLATEAU_GAIN and recall >= PLATEAU_FROM:  # deeper search stopped paying (PQ error caps
            # recall); below PLATEAU_FROM a flat step is no plateau (few distinct vectors: keep going)
            set_search_depth(index, depth)
            break
        recall, depth = recall + gained, candidate
        if recall >= target:
            break
    log = logger.info if recall >= target else logger.warning
    log("%s search depth %s gives leave-one-out recall@%d %.3f on %d sampled items (target %.2f)",
        index_kind(index), depth, k, recall, len(queries), target)
    return depth


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Return the mean share of each row of truth ids that appears in the same row of found."""
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0
