"""An index directory: named FAISS views over the same catalog ids plus a JSON sidecar."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from indexer.filters import EXACT_SUBSET_MAX, build_label_index, filtered_search, pad_results, qualifying_ids
from indexer.index import as_ids, as_vectors, index_kind, rebuild_hnsw, to_gpu, want_gpu
from indexer.persist import (SIDECAR, check_expected, fsync_file, read_sidecar, read_view, remove_stale_temporaries,
                             swap_into_place, temporary_dir)

logger = logging.getLogger(__name__)

VIEW_NAME = re.compile(r"^(shared|group-[A-Za-z0-9_.-]+)$")
GPU_MAX_K = 2048  # FAISS GPU k-selection limit; larger k searches the CPU index
HNSW_COMPACT_SHARE = 0.25  # rebuild an HNSW view once this share of its nodes are removed items


def utc_now() -> str:
    """Return the current UTC time in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_views(views: Mapping[str, faiss.Index]) -> None:
    """Raise a ValueError unless there is a "shared" view and every name is shared or group-<name>."""
    if "shared" not in views:
        raise ValueError(f"An index needs a 'shared' view; got: {', '.join(views) or 'none'}")
    bad = [name for name in views if not VIEW_NAME.match(name)]
    if bad:
        raise ValueError(f"Bad view name(s) {bad}; use 'shared' or 'group-<name>' ([A-Za-z0-9_.-])")


def align_labels(labels: Mapping | None, count: int, groups=None) -> dict[str, list[list[str]]]:
    """Return {group: [[label, ...] per item]} with one entry per item, checking lengths and groups."""
    labels = dict(labels or {})
    if groups is not None:
        unknown = sorted(set(labels) - set(groups))
        if unknown:
            raise ValueError(f"Unknown label group(s) {unknown}; choose from: {', '.join(sorted(groups))}")
        labels = {group: labels.get(group, [[]] * count) for group in groups}
    out = {}
    for group, per_item in labels.items():
        if len(per_item) != count:
            raise ValueError(f"labels[{group!r}] has {len(per_item)} entries for {count} items")
        out[group] = [[item] if isinstance(item, str) else [str(x) for x in item] for item in per_item]
    return out


def text_list(values: Sequence | None, count: int, name: str) -> list[str]:
    """Return values as a list of count strings ("" when values is None)."""
    values = [""] * count if values is None else [str(v) for v in values]
    if len(values) != count:
        raise ValueError(f"Got {len(values)} {name} for {count} items")
    return values


class IndexStore:
    """Named FAISS views ("shared", "group-<name>") over the same catalog ids, with item metadata."""

    def __init__(self, views: Mapping[str, faiss.Index], ids, paths, titles=None, labels=None, *,
                 fingerprint: str = "", created: str | None = None, use_gpu="auto"):
        check_views(views)
        self.views = dict(views)
        self.ids = as_ids(ids)
        self.paths = text_list(paths, len(self.ids), "paths")
        self.titles = text_list(titles, len(self.ids), "titles")
        self.labels = align_labels(labels, len(self.ids))
        self.fingerprint = fingerprint
        self.created = created or utc_now()
        self.use_gpu = use_gpu
        self._gpu_lock = threading.Lock()
        self._on_gpu = None  # whether to search GPU copies, decided at the first search
        self.exact_subset_max = EXACT_SUBSET_MAX
        self._dead = {view: np.setdiff1d(self._stored_ids(view), self.ids)
                      for view in self.views if index_kind(self.views[view]) == "hnsw"}
        self._check_counts()
        self._reset_caches()

    # ---- metadata ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dimension(self) -> int:
        """Return the shared view's vector dimension."""
        return int(self.views["shared"].d)

    @property
    def index_type(self) -> str:
        """Return the shared view's index type (flat, ivf, hnsw or ivfpq)."""
        return index_kind(self.views["shared"])

    def vocabulary(self) -> dict[str, list[str]]:
        """Return {group: sorted labels} that filters may use."""
        return {group: sorted(table) for group, table in self._label_table().items()}

    def item(self, item_id: int) -> dict:
        """Return dict(id, path, title, labels) for one catalog id (KeyError when absent)."""
        pos = int(self._positions(np.array([item_id]))[0])
        labels = {group: list(per_item[pos]) for group, per_item in self.labels.items()}
        return {"id": int(self.ids[pos]), "path": self.paths[pos], "title": self.titles[pos],
                "labels": labels}

    def sidecar(self) -> dict:
        """Return the JSON sidecar contents (see docs/formats.md)."""
        return {"fingerprint": self.fingerprint, "type": self.index_type, "dimension": self.dimension,
                "count": len(self), "metric": "inner_product", "created": self.created,
                "views": {view: int(index.d) for view, index in self.views.items()},
                "ids": self.ids.tolist(), "paths": self.paths, "titles": self.titles,
                "labels": self.labels}

    # ---- search -----------------------------------------------------------------------------
    def search(self, vectors, k: int, filters: dict | None = None, view: str = "shared"):
        """Return (scores [Q,k] float32, ids [Q,k] int64) padded with -inf / -1, optionally filtered."""
        index = self._view(view)
        queries = as_vectors(vectors, index.d, name="query vectors")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        allowed = qualifying_ids(filters, self._label_table())
        if allowed is None and len(self._dead.get(view, ())):
            allowed = np.sort(self.ids)  # hide removed HNSW nodes
        if allowed is None:
            return pad_results(*self._search_unfiltered(view, queries, k), k)
        return filtered_search(index, queries, k, allowed, len(self), self.exact_subset_max)

    # ---- updates ----------------------------------------------------------------------------
    def add(self, vectors_by_view, ids, paths, titles=None, labels=None) -> None:
        """Add new items to every view (vectors_by_view: {view: [N, D]}, or an array for "shared")."""
        if not isinstance(vectors_by_view, Mapping):
            vectors_by_view = {"shared": vectors_by_view}
        ids = as_ids(ids)
        batch = self._check_new_vectors(vectors_by_view, len(ids))
        paths = text_list(paths, len(ids), "paths")
        titles = text_list(titles, len(ids), "titles")
        labels = align_labels(labels, len(ids), groups=self.labels.keys())
        clash = np.intersect1d(ids, self.ids)
        if len(clash):
            raise ValueError(f"{len(clash)} id(s) already in the index: {clash[:20].tolist()}")
        for view, x in batch.items():
            if len(np.intersect1d(ids, self._dead.get(view, []))):
                self._compact(view)  # an HNSW node of a removed id must go before the id returns
            self.views[view].add_with_ids(x, ids)
        self.ids = np.concatenate([self.ids, ids])
        self.paths += paths
        self.titles += titles
        for group in self.labels:
            self.labels[group] += labels[group]
        self._reset_caches()
        logger.info("Added %d items; the index now holds %d", len(ids), len(self))

    def remove(self, ids) -> None:
        """Remove withdrawn items from every view without rebuilding (KeyError naming unknown ids)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        keep = np.ones(len(self.ids), dtype=bool)
        keep[self._positions(ids)] = False
        for view in self.views:
            self._remove_from_view(view, ids)
        self.ids = self.ids[keep]
        self.paths = [p for p, k in zip(self.paths, keep) if k]
        self.titles = [t for t, k in zip(self.titles, keep) if k]
        self.labels = {g: [x for x, k in zip(per, keep) if k] for g, per in self.labels.items()}
        for view in list(self._dead):
            if len(self._dead[view]) > HNSW_COMPACT_SHARE * self.views[view].ntotal:
                self._compact(view)
        self._reset_caches()
        logger.info("Removed %d items; the index now holds %d", len(ids), len(self))

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write <view>.faiss files and sidecar.json to a temporary directory, then swap it into place."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)  # what a killed writer left (whole index copies)
        tmp = temporary_dir(directory)
        try:
            for view, index in self.views.items():
                faiss.write_index(index, str(tmp / f"{view}.faiss"))
            (tmp / SIDECAR).write_text(json.dumps(self.sidecar()), encoding="utf-8")
            for path in tmp.iterdir():
                fsync_file(path)  # the data must be on disk before the rename makes it visible
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; an index is meant to be read by servers
            swap_into_place(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Saved %d items (%s) to %s", len(self), ", ".join(self.views), directory)
        return directory

    @classmethod
    def load(cls, directory, expect_fingerprint: str | None = None, expect_dimension: int | None = None,
             use_gpu="auto") -> "IndexStore":
        """Load an index directory, refusing a fingerprint or dimension other than the expected one."""
        directory = Path(directory)
        sidecar = read_sidecar(directory)
        check_expected(sidecar, "fingerprint", expect_fingerprint, directory / SIDECAR)
        check_expected(sidecar, "dimension", expect_dimension, directory / SIDECAR)
        views = {view: read_view(directory / f"{view}.faiss", dim) for view, dim in sidecar["views"].items()}
        try:
            return cls(views, sidecar["ids"], sidecar["paths"], sidecar["titles"], sidecar["labels"],
                       fingerprint=sidecar["fingerprint"], created=sidecar["created"], use_gpu=use_gpu)
        except ValueError as err:
            raise ValueError(f"Inconsistent index directory {directory}: {err}") from err

    # ---- internals --------------------------------------------------------------------------
    def _view(self, view: str) -> faiss.Index:
        if view not in self.views:
            raise ValueError(f"Unknown view {view!r}; choose one of: {', '.join(self.views)}")
        return self.views[view]

    def _stored_ids(self, view: str) -> np.ndarray:
        return faiss.vector_to_array(faiss.downcast_index(self.views[view]).id_map)

    def _check_counts(self) -> None:
        for view, index in self.views.items():
            expected = len(self) + len(self._dead.get(view, ()))
            if index.ntotal != expected:
                raise ValueError(f"view {view!r} holds {index.ntotal} vectors for {len(self)} ids")

    def _check_new_vectors(self, vectors_by_view: Mapping, count: int) -> dict[str, np.ndarray]:
        missing, extra = set(self.views) - set(vectors_by_view), set(vectors_by_view) - set(self.views)
        if missing or extra:
            raise ValueError(f"add() needs vectors for exactly the views {sorted(self.views)}; "
                             f"missing {sorted(missing)}, unknown {sorted(extra)}")
        batch = {v: as_vectors(x, self.views[v].d, name=f"{v} vectors") for v, x in vectors_by_view.items()}
        for view, x in batch.items():
            if len(x) != count:
                raise ValueError(f"Got {len(x)} {view} vectors for {count} ids")
        return batch

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[self._order]
        at = np.minimum(np.searchsorted(sorted_ids, ids), max(0, len(sorted_ids) - 1))
        found = (sorted_ids[at] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
        if not found.all():
            raise KeyError(f"id(s) not in the index: {np.asarray(ids)[~found][:20].tolist()}")
        return self._order[at]

    def _remove_from_view(self, view: str, ids: np.ndarray) -> None:
        if view in self._dead:
            self._dead[view] = np.union1d(self._dead[view], ids)  # HNSW cannot delete nodes
            return
        # IVF's hashtable direct map only removes through an id array; a hash set is O(1) per row elsewhere
        ivf = index_kind(self.views[view]) in ("ivf", "ivfpq")
        selector = faiss.IDSelectorArray(ids) if ivf else faiss.IDSelectorBatch(ids)
        removed = self.views[view].remove_ids(selector)
        assert removed == len(ids), f"view {view}: removed {removed} of {len(ids)} ids"

    def _compact(self, view: str) -> None:
        logger.info("Rebuilding HNSW view %s without %d removed items", view, len(self._dead[view]))
        self.views[view] = rebuild_hnsw(self.views[view], self.ids)
        self._dead[view] = np.empty(0, dtype=np.int64)
        self._gpu.pop(view, None)

    def _label_table(self) -> dict:
        if self._table is None:
            self._table = build_label_index(self.ids, self.labels)
        return self._table

    def _search_unfiltered(self, view: str, queries: np.ndarray, k: int):
        """Search the view's GPU copy when there is one, else the CPU index. FAISS GPU indexes
        (and their StandardGpuResources) are not safe for concurrent calls, while the web server
        searches from several threads: GPU searches take a lock, CPU ones run concurrently."""
        if self._on_gpu is None:
            self._on_gpu = want_gpu(self.use_gpu)
        if k > GPU_MAX_K or not self._on_gpu:
            return self.views[view].search(queries, k)
        with self._gpu_lock:
            if view not in self._gpu:
                self._gpu[view] = to_gpu(self.views[view])
            index = self._gpu[view] or self.views[view]
            return index.search(queries, k)

    def _reset_caches(self) -> None:
        self._order = None
        self._table = None
        self._gpu = {}
