"""Rows of an earlier EMB.h5 that an embedding copies instead of computing them again: the same
model and options (the file's attributes), the same image file (path, size and modification time,
the ``stats`` dataset). A daily rebuild of a catalogue that gained a few products computes those
few."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retrieval.data.catalog import Item
from retrieval.data.embfile import STATS, decode_attr, open_h5

logger = logging.getLogger(__name__)

NOT_COMPARED = ("catalog", "split")  # a moved catalog folder or another split holds the same images' rows


class Reuse:
    """An earlier embeddings file, open for copying rows; ``why_not`` says why none can be (None: some may)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.file, self.why_not, self.row_of = Path(path), None, None, {}
        try:
            self.file = open_h5(self.path, "r")
        except (OSError, ValueError) as err:
            self.why_not = f"it cannot be read ({err})"
            return
        attrs = {name: decode_attr(name, value) for name, value in self.file.attrs.items()}
        differ = sorted(k for k in meta if k not in NOT_COMPARED and attrs.get(k) != decode_attr(k, meta[k]))
        if STATS not in self.file or "paths" not in self.file:
            self.why_not = "it records no image file sizes and times (written before 2026-11-29)"
        elif differ:
            self.why_not = f"another model or options made it ({', '.join(differ)} differ)"
        else:
            paths = self.file["paths"].asstr()[:]
            stats = self.file[STATS][:]
            self.row_of = {(p, int(s[0]), int(s[1])): i for i, (p, s) in enumerate(zip(paths, stats))}
        if self.why_not:
            self.close()

    def rows(self, items: list[Item]) -> np.ndarray:
        """Each item's row in the file (-1: computed again: new, changed since, or not in it)."""
        return np.array([self.row_of.get((it.image, *it.stat), -1) if it.stat else -1 for it in items],
                        dtype=np.int64)

    def read(self, rows: np.ndarray, columns: dict[str, list[int]]) -> np.ndarray | None:
        """The given rows (any order, at least one) laid out as a work file's ``columns`` ({dataset:
        [start, stop]}); None when the file lacks a dataset or has another width (then they are computed)."""
        width = max(stop for _, stop in columns.values())
        out = np.empty((len(rows), width), dtype=np.float32)
        order = np.argsort(rows)
        ordered = rows[order]
        for name, (start, stop) in columns.items():
            if name not in self.file or self.file[name].shape[1:] != (stop - start,):
                return None
            out[order, start:stop] = self.file[name][ordered]
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
