"""Exact top-k inner-product neighbours of query rows among all rows, ties broken by lower row id.

One extra candidate tells whether the k-th score is tied with one outside the top k; only those
rows (rare with real-valued vectors) are fixed up one by one.
"""
from __future__ import annotations

import torch


def topk_rows(x: torch.Tensor, rows: torch.Tensor, k: int, out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the given rows against all rows, self excluded, ties by index (1 <= k < N).

    ``out``: an optional [>= len(rows), N] float32 buffer for the scores, reused across blocks so
    that each block does not allocate (and page in) block x N x 4 bytes afresh.
    """
    s = torch.mm(x[rows], x.T) if out is None else torch.mm(x[rows], x.T, out=out[:len(rows)])
    s[torch.arange(len(rows), device=x.device), rows] = float("-inf")
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
