"""Retrieval metrics (the paper's mAP@k, two variants) and classification metrics.

Retrieval protocol: the evaluated set is both the query set and the candidate set. For each
group, every item labelled in that group is a query; all *other* items are ranked by inner
product (vectors are L2-normalised first), ties broken by lower row id, and the top k kept.
A retrieved item is relevant when it shares at least one label of the group with the query.

- paper's AP: ``(1/M) sum_r P(r) rel(r)`` with M = relevant items among the k retrieved;
- standard AP: the same sum with M = min(k, relevant items in the whole set except the query).

Both are 0 when their M is 0. mAP of a group = mean AP over its queries.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from retrieval.devices import resolve_device

logger = logging.getLogger(__name__)

def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows as float32 (zero rows stay zero)."""
    x = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1).astype(np.float32)


# --------------------------------------------------------------------------- nearest neighbours

def topk_neighbors(vectors: np.ndarray, k: int, block_size: int = 1024, device: str = "cpu",
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours of every row among the other rows.

    Args:
        vectors: [N, D] array; scores are plain inner products (normalise first for cosine).
        k: neighbours per row; clipped to N - 1.
        block_size: query rows scored at a time (memory is block_size x N scores).
        device: ``cpu``, ``cuda`` or ``auto``.
        progress: show a tqdm bar over the blocks.

    Returns:
        (scores float32 [N, k'], indices int64 [N, k']) sorted by score descending, ties by index
        ascending, with k' = min(k, N - 1).
    """
    x = torch.as_tensor(np.ascontiguousarray(vectors, dtype=np.float32)).to(resolve_device(device))
    n = x.shape[0]
    k = max(0, min(int(k), n - 1))
    scores, indices = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    if k == 0:
        return scores, indices
    if not bool(torch.isfinite(x).all()):
        raise ValueError("vectors contain NaN or infinite values")
    starts = range(0, n, block_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="neighbours", unit="block", total=len(starts))
    for start in starts:
        stop = min(n, start + block_size)
        vals, idx = _topk_block(x, start, stop, k)
        scores[start:stop], indices[start:stop] = vals.cpu().numpy(), idx.cpu().numpy()
    return scores, indices


def _topk_block(x: torch.Tensor, start: int, stop: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of rows ``start:stop`` against all rows, self excluded, ties by index."""
    s = torch.mm(x[start:stop], x.T)
    rows = torch.arange(stop - start, device=x.device)
    s[rows, rows + start] = float("-inf")
    # One extra candidate tells whether the k-th value is tied with a value outside the top k.
    vals, idx = torch.topk(s, k + 1, dim=1, sorted=True)
    vals, idx = vals.contiguous(), idx.contiguous()
    for r in torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten().tolist():
        idx[r, :k] = _lowest_ids_at_boundary(s[r], vals[r, k - 1], k)
        vals[r, :k] = s[r, idx[r, :k]]
    return _sort_by_score_then_index(vals[:, :k], idx[:, :k])


def _lowest_ids_at_boundary(row: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """The k best ids of one row when the k-th score is tied: all above it, then lowest ids equal to it."""
    above = torch.nonzero(row > threshold).flatten()
    equal = torch.nonzero(row == threshold).flatten()[: k - above.numel()]
    return torch.cat([above, equal])


def _sort_by_score_then_index(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by score descending, then index ascending (rows already in order are kept)."""
    # Rows with ties, or left unsorted by a boundary fix; topk already sorted all others.
    rows = torch.nonzero((vals[:, 1:] >= vals[:, :-1]).any(dim=1)).flatten()
    if rows.numel() == 0:
        return vals, idx
    sub_idx, perm = torch.sort(idx[rows], dim=1)
    sub_vals = vals[rows].gather(1, perm)
    _, perm = torch.sort(sub_vals, dim=1, descending=True, stable=True)
    vals, idx = vals.clone(), idx.clone()
    vals[rows], idx[rows] = sub_vals.gather(1, perm), sub_idx.gather(1, perm)
    return vals, idx


# --------------------------------------------------------------------------- labels and mAP

def label_matrix(label_sets: Sequence[Sequence[str]], vocab: Sequence[str]) -> np.ndarray:
    """Multi-hot bool matrix [N, C] of label sets over a vocabulary; empty sets give zero rows."""
    column = {label: c for c, label in enumerate(vocab)}
    y = np.zeros((len(label_sets), len(vocab)), dtype=bool)
    for i, labels in enumerate(label_sets):
        for label in labels:
            if label not in column:
                raise ValueError(f"Label {label!r} of item {i} is not in the vocabulary ({len(vocab)} labels)")
            y[i, column[label]] = True
    return y


def _pack_labels(y: np.ndarray) -> np.ndarray:
    """Pack a bool [N, C] matrix into uint64 words [N, W] so overlap is one AND per word."""
    packed = np.packbits(y, axis=1)
    pad = (-packed.shape[1]) % 8
    packed = np.pad(packed, ((0, 0), (0, pad + (8 if packed.shape[1] == 0 else 0))))
    return np.ascontiguousarray(packed).view(np.uint64)


def relevance(neighbors: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None,
              block_size: int = 8192) -> np.ndarray:
    """Bool [len(rows), k]: whether each neighbour of each row shares a label with that row."""
    rows = np.arange(len(neighbors)) if rows is None else np.asarray(rows)
    packed = _pack_labels(y)
    rel = np.empty((len(rows), neighbors.shape[1]), dtype=bool)
    for start in range(0, len(rows), block_size):
        block = rows[start:start + block_size]
        rel[start:start + len(block)] = (packed[neighbors[block]] & packed[block, None, :]).any(axis=2)
    return rel


def count_relevant(y: np.ndarray, block_size: int = 2048) -> np.ndarray:
    """Items sharing a label with each row, the row itself excluded (0 for unlabelled rows).

    Works on the distinct label sets, so the overlap matrix is at most U x U (U = distinct
    sets) and is built in blocks of rows, never N x N.
    """
    sets, inverse, counts = np.unique(y, axis=0, return_inverse=True, return_counts=True)
    u = torch.as_tensor(sets.astype(np.float32))
    c = torch.as_tensor(counts.astype(np.float64))
    totals = np.empty(len(sets), dtype=np.int64)
    for start in range(0, len(sets), block_size):
        overlap = torch.mm(u[start:start + block_size], u.T) > 0
        totals[start:start + block_size] = torch.mv(overlap.double(), c).round().long().numpy()
    labelled = y.any(axis=1)
    return np.where(labelled, totals[inverse.reshape(-1)] - 1, 0)


def average_precision_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Per-query (paper AP, standard AP) from relevance rows [Q, R] and relevant counts [Q]."""
    rel = np.asarray(rel, dtype=bool)[:, :k]
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    hits = np.cumsum(rel, axis=1)
    summed = np.where(rel, hits / ranks, 0.0).sum(axis=1)
    m_paper = hits[:, -1] if rel.shape[1] else np.zeros(len(rel))
    m_standard = np.minimum(rel.shape[1] if k is None else k, np.asarray(n_relevant))
    return _safe_divide(summed, m_paper), _safe_divide(summed, m_standard)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0."""
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def map_at_k(neighbors: np.ndarray, y: np.ndarray, k: int = 50) -> dict:
    """mAP@k (both variants) of one group; queries are the rows labelled in ``y``."""
    if neighbors.shape[1] < min(k, len(neighbors) - 1):
        raise ValueError(f"map_at_k needs {k} neighbours per row, got {neighbors.shape[1]}")
    neighbors = neighbors[:, :k]
    queries = np.flatnonzero(y.any(axis=1))
    if len(queries) == 0:
        return {"map_paper": None, "map_standard": None, "queries": 0}
    rel = relevance(neighbors, y, queries)
    ap_paper, ap_standard = average_precision_at_k(rel, count_relevant(y)[queries], k)
    return {"map_paper": float(ap_paper.mean()), "map_standard": float(ap_standard.mean()),
            "queries": int(len(queries))}


def evaluate_retrieval(vectors: np.ndarray, labels_by_group: dict[str, Sequence[Sequence[str]]], k: int = 50,
                       vectors_by_group: dict[str, np.ndarray] | None = None, device: str = "cpu",
                       block_size: int = 1024, progress: bool = False) -> dict:
    """mAP@k per group on the shared vectors and, where given, on each group's own vectors.

    Args:
        vectors: [N, D] shared embedding (normalised here).
        labels_by_group: {group: one tuple of labels per item}; an empty tuple means unlabelled.
        k: retrieval depth R.
        vectors_by_group: optional {group: [N, D_g]} group-focused vectors, ranked by their plain
            inner product (they are head probabilities: p·q is the chance two items share a label).
        device, block_size, progress: passed to ``topk_neighbors``.

    Returns:
        ``{"groups": {g: {map_paper, map_standard, queries[, group_view]}},
        "views": {"shared": mean, "group": mean}, "mean": {map_paper, map_standard[, group_view]}}``;
        a group without queries has ``None`` maps and is left out of the means.
    """
    vectors_by_group = {g: v for g, v in (vectors_by_group or {}).items() if g in labels_by_group}
    labels = {g: label_matrix(sets, sorted({lab for s in sets for lab in s})) for g, sets in labels_by_group.items()}
    options = {"device": device, "block_size": block_size, "progress": progress}
    _, shared = topk_neighbors(normalize_rows(vectors), k, **options)
    groups = {g: map_at_k(shared, y, k) for g, y in labels.items()}
    for g, group_vectors in vectors_by_group.items():
        _, own = topk_neighbors(np.asarray(group_vectors, dtype=np.float32), k, **options)
        view = map_at_k(own, labels[g], k)
        groups[g]["group_view"] = {"map_paper": view["map_paper"], "map_standard": view["map_standard"]}
    views = {"shared": mean_over_groups(groups)}
    if vectors_by_group:
        views["group"] = mean_over_groups({g: groups[g]["group_view"] for g in vectors_by_group})
    mean = {key: views["shared"][key] for key in ("map_paper", "map_standard")}
    if "group" in views:
        mean["group_view"] = {key: views["group"][key] for key in ("map_paper", "map_standard")}
    return {"groups": groups, "views": views, "mean": mean}


def mean_over_groups(groups: dict[str, dict]) -> dict:
    """Mean of both mAP variants over the groups that have a value, and which groups those are."""
    valid = [g for g, m in groups.items() if m.get("map_paper") is not None]
    mean = {key: float(np.mean([groups[g][key] for g in valid])) if valid else None
            for key in ("map_paper", "map_standard")}
    return {**mean, "groups": valid}


# --------------------------------------------------------------------------- classification

def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts [n_classes, n_classes]: rows are true classes, columns predicted classes."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y_true.shape} vs {y_pred.shape}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} has class ids outside 0..{n_classes - 1}")
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and macro-F1 of single-label predictions.

    Undefined ratios (0/0) count as 0, like sklearn's ``zero_division=0``. Classes with neither
    support nor predictions carry no information about the model and are left out of macro-F1.
    """
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    tp = np.diag(cm)
    report = _per_class_report(tp, cm.sum(axis=0), cm.sum(axis=1), class_names)
    report["accuracy"] = float(tp.sum() / cm.sum()) if cm.sum() else 0.0
    return report


def multilabel_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """Per-class P/R/F1, macro-F1, exact-match and sample-averaged accuracy of multi-hot predictions.

    Sample-averaged accuracy is the mean of |true & pred| / |true | pred| per sample, where a sample
    with both sets empty scores 1. Macro-F1 follows ``classification_report``.
    """
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape or y_true.shape[1:] != (len(class_names),):
        raise ValueError(f"Expected two [N, {len(class_names)}] arrays, got {y_true.shape} and {y_pred.shape}")
    tp = (y_true & y_pred).sum(axis=0)
    report = _per_class_report(tp, y_pred.sum(axis=0), y_true.sum(axis=0), class_names)
    inter, union = (y_true & y_pred).sum(axis=1), (y_true | y_pred).sum(axis=1)
    report["exact_match"] = float((y_true == y_pred).all(axis=1).mean()) if len(y_true) else 0.0
    report["sample_accuracy"] = float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean()) \
        if len(y_true) else 0.0
    return report


def _per_class_report(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray,
                      class_names: Sequence[str]) -> dict:
    """Per-class precision/recall/F1 from true positives, predicted and true counts; macro-F1."""
    precision = _safe_divide(tp.astype(np.float64), predicted)
    recall = _safe_divide(tp.astype(np.float64), support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    classes = {name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                      "support": int(support[c])} for c, name in enumerate(class_names)}
    present = (support > 0) | (predicted > 0)
    macro = float(f1[present].mean()) if present.any() else 0.0
    return {"classes": classes, "macro_f1": macro}
