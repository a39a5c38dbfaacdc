"""Exact top-k inner-product neighbours of query rows among all rows (or the candidates whose scores
are left finite), ties broken by lower row id.

One extra candidate tells whether the k-th score is tied with one outside the top k; only those
rows are fixed up, together (common where scores are coarse: a view of few labels, many items).
On the CPU the [rows, k] results are ordered on the host with numpy (``topk_scores``): small
tensor operations cost more than the work they do on a busy CPU. On a GPU they stay there
(``topk_ids``): host work would leave it idle.
"""
from __future__ import annotations

import numpy as np
import torch


def topk_rows(x: torch.Tensor, rows: torch.Tensor, k: int, out: torch.Tensor | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) of the given rows against all rows, self excluded, ties by id (1 <= k < N).

    ``out``: an optional [>= len(rows), N] float32 buffer for the scores, reused across blocks so
    that each block does not allocate (and page in) block x N x 4 bytes afresh.
    """
    return topk_scores(row_scores(x, rows, out), k)


def row_scores(x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None,
               candidates: torch.Tensor | None = None, own: torch.Tensor | None = None) -> torch.Tensor:
    """Inner products [len(rows), M] of the given rows with all M rows (or with the rows of
    ``candidates``), self set to -inf: column ``rows`` (or ``own``, self's column among the
    candidates). ``out``: as in ``topk_rows``, any buffer of at least len(rows) x M values."""
    candidates = x if candidates is None else candidates
    shape = (len(rows), len(candidates))
    s = torch.mm(x[rows], candidates.T) if out is None else \
        torch.mm(x[rows], candidates.T, out=out.view(-1)[:shape[0] * shape[1]].view(shape))
    s[torch.arange(len(rows), device=x.device), rows if own is None else own] = float("-inf")
    return s


def topk_scores(s: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) of each row of scores ``s``, ties by id; columns at -inf are left out,
    so every row needs at least k finite scores (1 <= k < s.shape[1])."""
    vals, idx = _topk_fixed_at_boundary(s, k)
    return _sort_by_score_then_index(vals.cpu().numpy(), idx.cpu().numpy())


def topk_ids(s: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of ``topk_scores``, ordered alike (score descending, ties by id), left on the scores'
    device: the tied rows are fixed as there, then every row is ordered by two sorts on the device."""
    vals, idx = _topk_fixed_at_boundary(s, k)
    idx, order = idx.sort(dim=1)  # ids ascending, then a stable sort by score keeps them so in ties
    return idx.gather(1, vals.gather(1, order).sort(dim=1, descending=True, stable=True)[1])


def _topk_fixed_at_boundary(s: torch.Tensor, k: int, cells: int = 2**24) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk's k best (scores, ids) of each row, where the k-th score ties with one left out
    replaced by every id scoring above it and then the lowest ids equal to it (in id order: the
    caller orders by score). The tied rows are fixed together, ``cells`` scores at a time: ties are
    common where scores are coarse (a 2-label group's view at 392k items: 22k rows in 49k queries,
    which one at a time cost three syncs each on a GPU)."""
    vals, idx = torch.topk(s, k + 1, dim=1, sorted=True)
    tied = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
    vals, idx = vals[:, :k], idx[:, :k]
    for rows in tied.split(max(1, cells // s.shape[1])) if len(tied) else ():
        scores, threshold = s[rows], vals[rows, k - 1]
        row, col = torch.nonzero(scores >= threshold[:, None], as_tuple=True)  # ids ascending in each row
        equal = scores[row, col] == threshold[row]
        above = torch.bincount(row[~equal], minlength=len(rows))  # < k: the k-th score itself is not above
        seen = equal.cumsum(0)  # equal ids so far, then counted from each row's first
        rank = seen - (seen - equal.long())[torch.searchsorted(row, torch.arange(len(rows), device=row.device))][row]
        best = col[~equal | (rank <= (k - above)[row])]  # exactly k in each row
        idx[rows] = best.view(len(rows), k)
        vals[rows] = scores.gather(1, idx[rows])
    return vals, idx


def _sort_by_score_then_index(vals: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by score descending, then index ascending (rows already in order are kept)."""
    # Rows with ties, or left unsorted by a boundary fix; topk already sorted all others.
    rows = np.flatnonzero((vals[:, 1:] >= vals[:, :-1]).any(axis=1))
    if len(rows):
        order = np.lexsort((idx[rows], -vals[rows]))  # the last key sorts first
        vals[rows], idx[rows] = np.take_along_axis(vals[rows], order, 1), np.take_along_axis(idx[rows], order, 1)
    return vals, idx
