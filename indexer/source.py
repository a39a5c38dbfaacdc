"""Where an index build reads its vectors from: row blocks of every view, never the whole corpus at once."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 65_536  # 64 MiB of 256-d float32 per block of the shared view


@dataclass
class VectorSource:
    """N items' vectors per view ("shared", "group-<name>"), read in row blocks by ``read(view, start, stop)``.

    ``ids`` are the catalog ids of the rows; ``dims`` maps each view to its dimension."""

    ids: np.ndarray
    dims: dict[str, int]
    read: Callable[[str, int, int], np.ndarray]
    block_rows: int = BLOCK_ROWS

    @classmethod
    def from_arrays(cls, views: Mapping[str, np.ndarray], ids) -> "VectorSource":
        """A source over in-memory arrays {view: [N, D]}."""
        arrays = {view: np.asarray(x) for view, x in views.items()}
        for view, x in arrays.items():
            if x.ndim != 2:
                raise ValueError(f"{view} vectors must be a 2-D [N, D] array, got shape {x.shape}")
        return cls(np.asarray(ids, dtype=np.int64).reshape(-1), {v: int(x.shape[1]) for v, x in arrays.items()},
                   lambda view, start, stop: np.ascontiguousarray(arrays[view][start:stop], dtype=np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def blocks(self, view: str) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start row, float32 rows) blocks of a view, in order."""
        for start in range(0, len(self), self.block_rows):
            yield start, self.read(view, start, min(len(self), start + self.block_rows))

    def take(self, view: str, rows: np.ndarray) -> np.ndarray:
        """Return the given rows of a view (in the given order), reading only the blocks that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dims[view]), dtype=np.float32)
        block = rows // self.block_rows
        for b in np.unique(block):
            start = int(b) * self.block_rows
            chosen = np.flatnonzero(block == b)
            out[chosen] = self.read(view, start, min(len(self), start + self.block_rows))[rows[chosen] - start]
        return out
