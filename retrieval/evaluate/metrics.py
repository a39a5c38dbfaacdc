"""Retrieval metrics (the paper's mAP@k, two variants) and classification metrics.

Retrieval protocol: the evaluated set is both the query set and the candidate set (query =
candidate). For each group, the evaluated set is the items labelled in that group: each of them
is a query, and all *other* items labelled in the group are ranked by inner product (vectors are
L2-normalised first), ties broken by lower row id, and the top k kept. A retrieved item is relevant
when it shares at least one label of the group with the query. An item unlabelled in a group is
unknown there, neither a match nor a miss; ``candidates="all"`` ranks every other item instead and
counts the unlabelled ones as misses (the protocol before issue 16; the same on complete labels).

- paper's AP: ``(1/M) sum_r P(r) rel(r)`` with M = relevant items among the k retrieved;
- standard AP: the same sum with M = min(k, relevant items in the whole set except the query).

Both are 0 when their M is 0. mAP of a group = mean AP over its queries.

``evaluate_retrieval`` works block by block of queries against every candidate, view by view, so
memory stays bounded whatever N (the bound is in its docstring); ``--sample-queries`` evaluates a
random sample of queries against all candidates (``interval.py`` gives the confidence intervals).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from retrieval.data.embfile import unit_rows
from retrieval.devices import resolve_device
from retrieval.evaluate.interval import add_intervals, draw_queries
from retrieval.evaluate.neighbours import row_scores, topk_ids, topk_rows, topk_scores

logger = logging.getLogger(__name__)

SHARED = None  # the shared view's key among the group views
CANDIDATES = ("labelled", "all")  # a group's candidates: the items labelled in it, or every item
MAX_FETCH = 16  # a partially labelled group ranks at most this many times k rows before masking its scores
SCORE_BYTES = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}  # one block of float32 scores, block x N x 4 bytes
ON_HOST = ("cpu",)  # device types whose ranked blocks are worked on in numpy (class Ranked)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows as float32 (zero rows stay zero): ``embfile.unit_rows`` of the float32 rows."""
    return unit_rows(np.asarray(vectors, dtype=np.float32))


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
    x = _on_device(vectors, resolve_device(device))
    n = x.shape[0]
    k = max(0, min(int(k), n - 1))
    scores, indices = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    if k == 0:
        return scores, indices
    for start in tqdm(range(0, n, block_size), desc="neighbours", unit="block", disable=not progress):
        stop = min(n, start + block_size)
        scores[start:stop], indices[start:stop] = _topk_block(x, start, stop, k)
    return scores, indices


def _topk_block(x: torch.Tensor, start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of rows ``start:stop`` against all rows, self excluded, ties by index."""
    return topk_rows(x, torch.arange(start, stop, device=x.device), k)


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


def pack_labels(y: np.ndarray) -> np.ndarray:
    """Pack a bool [N, C] matrix into uint64 words [N, W] so overlap is one AND per word."""
    packed = np.packbits(y, axis=1)
    pad = (-packed.shape[1]) % 8
    packed = np.pad(packed, ((0, 0), (0, pad + (8 if packed.shape[1] == 0 else 0))))
    return np.ascontiguousarray(packed).view(np.uint64)


def relevance(neighbors: np.ndarray, packed: np.ndarray, queries: np.ndarray, block_size: int = 8192) -> np.ndarray:
    """Bool [Q, k]: whether each neighbour shares a label with its query.

    Args:
        neighbors: [Q, k] neighbour rows of each query.
        packed: ``pack_labels`` of the label matrix of all rows.
        queries: [Q] the query rows.
    """
    rel = np.empty(neighbors.shape, dtype=bool)
    for start in range(0, len(queries), block_size):
        stop = start + block_size
        rel[start:stop] = (packed[neighbors[start:stop]] & packed[queries[start:stop], None, :]).any(axis=2)
    return rel


def count_relevant(y: np.ndarray, block_size: int = 2048) -> np.ndarray:
    """Items sharing a label with each row, the row itself excluded (0 for unlabelled rows).

    Works on the distinct label sets, so the overlap matrix is at most U x U (U = distinct
    sets) and is built in blocks of rows, never N x N. Sets are told apart by their packed words
    (one per 64 labels): sorting those is many times faster than sorting the bool rows.
    """
    packed = pack_labels(y)
    if packed.shape[1] == 1:  # up to 64 labels: one word a row, and a flat unique is ~8x a row-wise one
        sets, inverse, counts = np.unique(packed[:, 0], return_inverse=True, return_counts=True)
        sets = sets[:, None]
    else:
        sets, inverse, counts = np.unique(packed, axis=0, return_inverse=True, return_counts=True)
    u = torch.as_tensor(np.unpackbits(sets.view(np.uint8), axis=1).astype(np.float32))
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
    return safe_divide(summed, m_paper), safe_divide(summed, m_standard)


def safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
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
    rel = relevance(neighbors[queries], pack_labels(y), queries)
    ap_paper, ap_standard = average_precision_at_k(rel, count_relevant(y)[queries], k)
    return {"map_paper": float(ap_paper.mean()), "map_standard": float(ap_standard.mean()),
            "queries": int(len(queries))}


def evaluate_retrieval(vectors: np.ndarray, labels_by_group: dict[str, Sequence[Sequence[str]]], k: int = 50,
                       vectors_by_group: dict[str, np.ndarray] | None = None, device: str = "cpu",
                       block_size: int | None = None, progress: bool = False, sample_queries: int | None = None,
                       seed: int = 0, candidates: str = "labelled", normalise: bool = True) -> dict:
    """mAP@k per group on the shared vectors and, where given, on each group's own vectors.

    Memory, besides the inputs: the views' vectors as float32, N x (D + sum_g D_g) x 4 bytes (on
    the device); one block of scores, block_size x N x 4 bytes (256 MiB by default, 2 GiB on a
    GPU) with its top k+1; the labels, N x sum_g (C_g + 8 ceil(C_g / 64) + 8) bytes (multi-hot,
    packed, relevant counts); 24 bytes per query per group per view for the per-query APs; with
    ``sample_queries`` Q, 2 x Q x S x 8 bytes for the bootstrap (S = 2 x the group entries).

    Args:
        vectors: [N, D] shared view (normalised here: ranked by cosine; with ``normalise`` False
            ranked by the plain inner product, as the ``matches`` shared view is).
        labels_by_group: {group: one tuple of labels per item}; an empty tuple means unlabelled.
        k: retrieval depth R.
        vectors_by_group: optional {group: [N, D_g]} group-focused vectors, ranked by their plain
            inner product (they are head probabilities: p·q is the chance two items share a label).
        device: where scores and top-k are computed (``cpu``, ``cuda``, ``auto``).
        block_size: queries scored at a time (default: as many as fit ``SCORE_BYTES``).
        progress: show a tqdm bar with queries/s.
        sample_queries: evaluate this many random queries (seeded) against all candidates and add
            95% bootstrap intervals (``ci95``); None = every item is a query.
        candidates: ``labelled`` = a group's candidates are the other items labelled in it (query =
            candidate); ``all`` = every other item, the unlabelled counted as misses.

    Returns:
        ``{"groups": {g: {map_paper, map_standard, queries[, group_view]}},
        "views": {"shared": mean, "group": mean}, "mean": {map_paper, map_standard[, group_view]}}``;
        a group without queries has ``None`` maps and is left out of the means, and so is one where
        every evaluated item shares a label or none shares one with another (``uninformative``: every
        ranking scores 100 or 0 there), which keeps its maps and is marked ``"uninformative": true``.
    """
    if candidates not in CANDIDATES:
        raise ValueError(f"Unknown candidates {candidates!r}; choose one of: {', '.join(CANDIDATES)}")
    vectors_by_group = {g: v for g, v in (vectors_by_group or {}).items() if g in labels_by_group}
    labels = {g: label_matrix(sets, sorted({lab for s in sets for lab in s})) for g, sets in labels_by_group.items()}
    shared = normalize_rows(vectors) if normalise else np.asarray(vectors, dtype=np.float32)
    ranked = {SHARED: (shared, list(labels))}
    ranked.update({g: (np.asarray(v, dtype=np.float32), [g]) for g, v in vectors_by_group.items()})
    queries = np.arange(len(vectors)) if sample_queries is None else draw_queries(len(vectors), sample_queries, seed)
    aps = rank_views(ranked, labels, queries, k, device, block_size, progress, candidates)
    groups = {g: {**ap_means(*aps[SHARED, g][1:]), "queries": len(aps[SHARED, g][0])} for g in labels}
    for g in vectors_by_group:
        groups[g]["group_view"] = ap_means(*aps[g, g][1:])
    trivial = [g for g, y in labels.items() if uninformative(y, candidates)]
    for g in trivial:
        groups[g]["uninformative"] = True
    views = {"shared": mean_over_groups({g: m for g, m in groups.items() if g not in trivial})}
    if vectors_by_group:
        views["group"] = mean_over_groups({g: groups[g]["group_view"] for g in vectors_by_group if g not in trivial})
    if sample_queries is not None:
        add_intervals(groups, views, aps, len(queries), seed)
    mean = {key: views["shared"][key] for key in ("map_paper", "map_standard")}
    if "group" in views:
        mean["group_view"] = {key: views["group"][key] for key in ("map_paper", "map_standard")}
    return {"groups": groups, "views": views, "mean": mean}


def uninformative(y: np.ndarray, candidates: str = "labelled") -> bool:
    """Whether a group's ranking cannot matter: two or more evaluated items, and either a label that
    every one of them has, so each candidate is relevant to each query and any ranking scores AP 1 (a
    catalog whose group has one label, or a test split that holds one), or no label that two of them
    share, so no query has a relevant item and any ranking scores 0 (a small test split of rare
    labels). With ``candidates="all"`` an unlabelled item is a miss, so a group with unlabelled items
    still tells rankings apart in the first case."""
    labelled = y.any(axis=1)
    if labelled.sum() < 2:
        return False
    if not (y[labelled].sum(axis=0) >= 2).any():
        return True
    if candidates == "all" and not labelled.all():
        return False
    return bool(y[labelled].all(axis=0).any())


def ap_means(paper: np.ndarray, standard: np.ndarray) -> dict:
    """mAP (both variants) from per-query APs; None without queries."""
    return {"map_paper": float(paper.mean()) if len(paper) else None,
            "map_standard": float(standard.mean()) if len(standard) else None}


def rank_views(views: dict, labels: dict[str, np.ndarray], queries: np.ndarray, k: int, device: str = "cpu",
               block_size: int | None = None, progress: bool = False, candidates: str = "labelled") -> dict:
    """Per-query APs of every view and group, block by block of queries against all rows.

    One score block and one top-k per view serve all its groups. A group labelled on every row (or
    every group with ``candidates="all"``) keeps the first k of it. A group with unlabelled rows
    ranks its labelled rows only: its own view (its only group) is scored against them alone; in a
    view shared with other groups it keeps the first k of its labelled rows in a deeper top-k
    (``fetch_depth``: deep enough for its labelled share), and only a query with fewer than k of
    them there, or a group labelled too rarely for that, ranks a copy of its row with the
    unlabelled columns at -inf.

    Args:
        views: {view: ([N, D] vectors ranked by inner product, the groups it is evaluated on)}.
        labels: {group: [N, C] multi-hot labels}; a query of a group is a row labelled in it.
        queries: the rows to evaluate as queries, ascending.
        candidates: ``labelled`` (a group's candidates are its labelled rows) or ``all``.

    Returns:
        {(view, group): (positions in ``queries``, paper APs, standard APs)}.
    """
    dev = resolve_device(device)
    n = len(next(iter(views.values()))[0])
    block_size = block_size or default_block(n, dev)
    labelled = {g: y.any(axis=1) for g, y in labels.items()}
    post = Ranked(labels, labelled, k, dev)
    partial = [g for g, mask in labelled.items() if candidates == "labelled" and not mask.all()]
    depth = {g: max(0, min(int(k), (int(labelled[g].sum()) if g in partial else n) - 1)) for g in labels}
    fetch = {g: fetch_depth(depth[g], labelled[g].mean(), n) if g in partial else depth[g] for g in labels}
    unknown = {g: torch.as_tensor(~labelled[g], device=dev) for g in partial}  # columns that are no candidate
    tensors = {view: _on_device(x, dev) for view, (x, _) in views.items()}
    # a group's own view ranks only its labelled rows: their vectors, and their row ids (ascending)
    own_rows = {view: np.flatnonzero(labelled[groups[0]]) for view, (_, groups) in views.items()
                if len(groups) == 1 and groups[0] in partial}
    own_vectors = {view: tensors[view][torch.as_tensor(ids, device=dev)] for view, ids in own_rows.items()}
    own_ids = {view: post.array(ids) for view, ids in own_rows.items()}
    buffer = torch.empty((min(block_size, len(queries)), n), device=dev) if n > 1 and len(queries) else None
    found = {(view, g): [] for view, (_, groups) in views.items() for g in groups}
    bar = tqdm(total=len(queries), desc=f"mAP@{k}", unit="query", disable=not progress, mininterval=1)
    for start in range(0, len(queries), block_size):
        block = queries[start:start + block_size]
        for view, (_, groups) in views.items():
            asked = np.flatnonzero(np.logical_or.reduce([labelled[g][block] for g in groups]))
            if len(asked) == 0:
                continue
            rows = block[asked]
            alone = groups[0] if view in own_rows else None
            scores = top = None  # none where no group of the view ranks anything
            if alone is not None:  # a group's own view: scored against its labelled rows only
                if depth[alone]:
                    own = torch.as_tensor(np.searchsorted(own_rows[view], rows), device=dev)
                    scores = row_scores(tensors[view], torch.as_tensor(rows, device=dev), buffer, own_vectors[view],
                                        own)
                    top = own_ids[view][post.top(scores, depth[alone])]
            else:
                scores = row_scores(tensors[view], torch.as_tensor(rows, device=dev), buffer) \
                    if any(depth[g] for g in groups) else None
                deepest = max((fetch[g] or 0) for g in groups)
                top = post.top(scores, deepest) if deepest else None
            for g in groups:
                mine = labelled[g][rows]
                if depth[g] == 0:
                    neighbors = post.array(np.empty((int(mine.sum()), 0), np.int64))
                elif g not in unknown or g == alone:
                    neighbors = top[post.array(mine), :depth[g]]
                else:
                    neighbors = post.labelled_neighbours(scores, np.flatnonzero(mine), top if fetch[g] else None, g,
                                                         unknown[g], depth[g])
                found[view, g].append((start + asked[mine], *post.average_precision(neighbors, g, rows[mine])))
        bar.update(len(block))
    bar.close()
    return {key: (np.concatenate([np.zeros(0, np.int64)] + [p[0] for p in parts]),
                  *(post.concat([p[i] for p in parts]) for i in (1, 2))) for key, parts in found.items()}


class Ranked:
    """What follows a block's scores: the top-k ids, a partially labelled group's first labelled ones,
    relevance and the per-query APs. In numpy on the host where the device type is in ``ON_HOST``
    (the CPU: small tensor operations cost more than their work there); in torch on the device
    elsewhere (a GPU idles while the host works: 21x its matrix products at N = 100k on an H200, 9x so)."""

    def __init__(self, labels: dict[str, np.ndarray], labelled: dict[str, np.ndarray], k: int, dev: torch.device):
        self.k, self.dev, self.on_device = k, dev, dev.type not in ON_HOST
        self.packed = {g: self.array(pack_labels(y).view(np.int64)) for g, y in labels.items()}
        self.n_relevant = {g: self.array(count_relevant(y)) for g, y in labels.items()}
        self.allowed = {g: self.array(mask) for g, mask in labelled.items()}

    def array(self, x: np.ndarray):
        """A host array, moved to where the work is done."""
        return torch.as_tensor(x, device=self.dev) if self.on_device else x

    def concat(self, parts: list) -> np.ndarray:
        """Per-query values of every block, as one float64 host array."""
        if self.on_device:
            return torch.cat([torch.zeros(0, dtype=torch.float64, device=self.dev), *parts]).cpu().numpy()
        return np.concatenate([np.zeros(0), *parts])

    def top(self, scores: torch.Tensor, depth: int):
        """Ids of the top ``depth`` of each score row, ties by id (``neighbours.topk_scores``)."""
        return topk_ids(scores, depth) if self.on_device else topk_scores(scores, depth)[1]

    def labelled_neighbours(self, scores: torch.Tensor, mine: np.ndarray, top, g: str, unknown: torch.Tensor,
                            depth: int):
        """The top ``depth`` ids labelled in ``g`` of score rows ``mine``: the first labelled ones of
        their ranked ``top`` ids where it holds enough, else the top-k of the rows' scores with the
        ``unknown`` columns at -inf."""
        out = torch.empty((len(mine), depth), dtype=torch.long, device=self.dev) if self.on_device else \
            np.empty((len(mine), depth), np.int64)
        short = np.arange(len(mine))
        if top is not None:
            ids = top[self.array(mine)]
            ok = self.allowed[g][ids]
            seen = ok.cumsum(1)
            enough = seen[:, -1] >= depth
            keep = ok & (seen <= depth)  # the first depth allowed ids, in rank order
            out[enough] = ids[enough][keep[enough]].reshape(-1, depth)
            short = np.flatnonzero(~enough.cpu().numpy() if self.on_device else ~enough)
        if len(short):
            rows = torch.as_tensor(mine[short], device=scores.device)
            out[self.array(short)] = self.top(scores[rows].masked_fill_(unknown, float("-inf")), depth)
        return out

    def average_precision(self, neighbors, g: str, queries: np.ndarray) -> tuple:
        """(paper APs, standard APs) of the queries of group ``g`` from their neighbour ids."""
        if not self.on_device:
            rel = relevance(neighbors, self.packed[g], queries)
            return average_precision_at_k(rel, self.n_relevant[g][queries], self.k)
        q = torch.as_tensor(queries, device=self.dev)
        rel = (self.packed[g][neighbors] & self.packed[g][q][:, None, :]).ne(0).any(2)[:, :self.k]
        hits = rel.cumsum(1)
        ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64, device=self.dev)
        summed = torch.where(rel, hits / ranks, 0.0).sum(1)
        m_paper = hits[:, -1] if rel.shape[1] else torch.zeros(len(q), dtype=torch.long, device=self.dev)
        m_standard = torch.clamp(self.n_relevant[g][q], max=self.k)
        return tuple(torch.where(m > 0, summed / m.clamp(min=1), 0.0) for m in (m_paper, m_standard))


def fetch_depth(depth: int, share: float, n: int) -> int | None:
    """How deep to rank all rows so that a group labelled on ``share`` of them finds its first
    ``depth`` labelled rows there for nearly every query (twice the expected depth, plus a margin);
    None when that is beyond ``MAX_FETCH`` x depth (a rare group: its scores are masked instead)."""
    want = int(np.ceil(2 * (depth + 1) / max(share, 1e-12))) + 32
    return min(want, n - 1) if want <= MAX_FETCH * max(depth, 1) else None


def default_block(n: int, device: torch.device) -> int:
    """Queries per block: as many as ``SCORE_BYTES`` of the device type hold (at most 4096)."""
    return max(1, min(4096, SCORE_BYTES.get(device.type, SCORE_BYTES["cpu"]) // (4 * max(n, 1))))


def _on_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """Float32 vectors on the device, refused when they hold NaN or infinite values."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinite values")
    return torch.as_tensor(x).to(device)


def mean_over_groups(groups: dict[str, dict]) -> dict:
    """Mean of both mAP variants over the groups that have a value, and which groups those are."""
    valid = [g for g, m in groups.items() if m.get("map_paper") is not None]
    mean = {key: float(np.mean([groups[g][key] for g in valid])) if valid else None
            for key in ("map_paper", "map_standard")}
    return {**mean, "groups": valid}
