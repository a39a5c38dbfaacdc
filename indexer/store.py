"""An index directory: a "shared" FAISS view by catalog id, compact exact group views by row position,
item metadata as arrays (indexer/items.py) and a small JSON sidecar."""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from indexer.filters import EXACT_SUBSET_MAX, filtered_search, pad_results, qualifying_positions
from indexer.index import (as_ids, as_vectors, check_views, group_codec, index_kind, pad_columns, rebuild_hnsw,
                           to_gpu, want_gpu)
from indexer.items import Items, align_labels, text_list
from indexer.persist import (FORMAT, SIDECAR, check_expected, check_replaceable, finish_interrupted_swap, fsync_file,
                             read_sidecar, read_view, remove_stale_temporaries, retired_items, swap_into_place,
                             temporary_dir, view_file, view_files)

logger = logging.getLogger(__name__)

GPU_MAX_K = 2048  # FAISS GPU k-selection limit; larger k searches the CPU index
HNSW_COMPACT_SHARE = 0.25  # rebuild an HNSW view once this share of its nodes are removed items


def first_unused_id(recorded: int | None, *given: np.ndarray) -> int:
    """The id new items are numbered from: the recorded ``next_id`` (an index saved before it: none),
    or above every id in ``given`` where that is higher."""
    return max([int(recorded or 0), *(int(np.max(ids, initial=-1)) + 1 for ids in given)])


def id_array(retired: Mapping[str, int]) -> np.ndarray:
    """The ids of a retired record ({image path: id}) as an int64 array."""
    return np.fromiter(retired.values(), dtype=np.int64, count=len(retired))


def utc_now() -> str:
    """Return the current UTC time in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class IndexStore:
    """The views of one catalog ("shared" by id, "group-<name>" by position) with item metadata."""

    def __init__(self, views: Mapping[str, faiss.Index], ids, paths=None, titles=None, labels=None, *,
                 items: Items | None = None, fingerprint: str = "", created: str | None = None, use_gpu="auto",
                 shared_view: str | None = None, multi_label_view_power: float | None = None,
                 next_id: int | None = None, retired: Mapping[str, int] | None = None):
        check_views(views)
        self.views = dict(views)
        if items is None:
            ids = as_ids(ids)
            items = Items.from_lists(ids, text_list(paths, len(ids), "paths"), text_list(titles, len(ids), "titles"),
                                     align_labels(labels, len(ids)))
        self.items = items
        self.fingerprint = fingerprint
        self.shared_view = shared_view  # what the embeddings say the shared view holds (None: not recorded)
        # the power the embeddings' multi-label group views were scaled with (None: none, or not recorded)
        self.multi_label_view_power = multi_label_view_power
        self.created = created or utc_now()
        self.use_gpu = use_gpu
        self._gpu_lock = threading.Lock()
        self._on_gpu = None  # whether to search GPU copies, decided at the first search
        self.exact_subset_max = EXACT_SUBSET_MAX
        self._dead = (np.setdiff1d(faiss.vector_to_array(faiss.downcast_index(self.views["shared"]).id_map),
                                   self.ids) if self.index_type == "hnsw" else np.empty(0, np.int64))
        # {image path: id} of every item this index held and holds no more (removed, or left out of a
        # build over it): a path that comes back takes its id again, so a re-listed product's old links
        # work again, and no other path is given it (an index saved before the record: none)
        self.retired = dict(retired or {})
        # above every id this index ever gave (a withdrawn product's included): other new items are
        # numbered from here, so an id never names another product (an index saved before it: above
        # its ids and, for HNSW, its removed nodes' ids)
        self.next_id = first_unused_id(next_id, items.ids, self._dead, id_array(self.retired))
        self._check_counts()
        self._reset_caches()

    # ---- metadata ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> np.ndarray:
        """Catalog ids in row (position) order."""
        return self.items.ids

    @property
    def dimension(self) -> int:
        """Return the shared view's vector dimension."""
        return int(self.views["shared"].d)

    @property
    def index_type(self) -> str:
        """Return the shared view's index type (flat, ivf, hnsw or ivfpq)."""
        return index_kind(self.views["shared"])

    @property
    def paths(self) -> list[str]:
        """Every item's image path (one Python string each: whole-catalogue work only)."""
        return self.items.paths.tolist()

    @property
    def labels(self) -> dict[str, list[list[str]]]:
        """{group: [[label, ...] per item]} (Python lists of every item: whole-catalogue work only)."""
        per_item = [self.items.labels.labels_at(p) for p in range(len(self))]
        return {g: [labels[g] for labels in per_item] for g in self.items.labels.groups}

    def vocabulary(self) -> dict[str, list[str]]:
        """Return {group: sorted labels} that filters may use."""
        return self.items.labels.vocab

    def position(self, item_id: int) -> int:
        """Return the row position of a catalog id (KeyError when absent, or past int64 as a web address may ask)."""
        if not -2**63 <= int(item_id) < 2**63:
            raise KeyError(f"id(s) not in the index: [{item_id}]")
        return int(self._positions(np.array([item_id], dtype=np.int64))[0])

    def item(self, item_id: int) -> dict:
        """Return dict(id, path, title, labels) for one catalog id (KeyError when absent)."""
        return self.items.item(self.position(item_id))

    def items_by_id(self, ids: Sequence[int]) -> list[dict]:
        """Return item(id) for several ids with one lookup of their positions (KeyError when one is absent)."""
        return [self.items.item(int(p)) for p in self._positions(np.asarray(ids, dtype=np.int64))]

    def vector(self, item_id: int, view: str = "shared") -> np.ndarray:
        """Return an item's stored vector [1, D] in a view (IVF-PQ: its PQ approximation)."""
        key = item_id if view == "shared" else self.position(item_id)
        return np.asarray(self._view(view).reconstruct(int(key)), dtype=np.float32)[None, :]

    def vectors(self, item_ids, view: str = "shared") -> np.ndarray:
        """Return the stored vectors [N, D] of several catalog ids in a view (IVF-PQ's shared view: its
        PQ approximation; group views: as their codec stores them)."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        keys = ids if view == "shared" else self._positions(ids).astype(np.int64)
        if not len(keys):
            return np.empty((0, self._view(view).d), dtype=np.float32)
        return np.asarray(self._view(view).reconstruct_batch(keys), dtype=np.float32)

    def unlike(self, item_ids, vectors_by_view: Mapping[str, np.ndarray]) -> np.ndarray:
        """Which of ``item_ids`` (bool per id) hold, in a given view, another vector than the given one
        would be stored as: group views and IVF-PQ's shared view compared after the view's codec (fp16 /
        8-bit, product quantization) rounds the given one, another shared view as it is (to 1e-5)."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        differ = np.zeros(len(ids), dtype=bool)
        if not len(ids):
            return differ
        for view, vectors in vectors_by_view.items():
            given = self._as_view_vectors(view, vectors, f"{view} vectors")
            if view != "shared" or self.index_type == "ivfpq":
                index = faiss.downcast_index(self._view(view))
                given = index.sa_decode(index.sa_encode(given))
            differ |= np.abs(given - self.vectors(ids, view)).max(axis=1) > 1e-5
        return differ

    def sidecar(self) -> dict:
        """Return the JSON sidecar contents (see docs/formats.md); item arrays are written beside it."""
        retired = sorted(self.retired.items())
        return {"format": FORMAT, "fingerprint": self.fingerprint, "type": self.index_type,
                "dimension": self.dimension, "count": len(self), "metric": "inner_product",
                "created": self.created, "views": {view: int(index.d) for view, index in self.views.items()},
                "files": view_files(self.views),
                "group_codec": group_codec(self.views), "labels": self.vocabulary(), "next_id": self.next_id,
                **({"shared_view": self.shared_view} if self.shared_view else {}),
                **({"multi_label_view_power": self.multi_label_view_power}
                   if self.multi_label_view_power is not None else {}),
                **({"retired": {"paths": [path for path, _ in retired], "ids": [i for _, i in retired]}}
                   if retired else {})}

    # ---- search -----------------------------------------------------------------------------
    def search(self, vectors, k: int, filters: dict | None = None, view: str = "shared"):
        """Return (scores [Q,k] float32, ids [Q,k] int64) padded with -inf / -1, optionally filtered."""
        index = self._view(view)
        queries = self._as_view_vectors(view, vectors, "query vectors")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        allowed = qualifying_positions(filters, self.items.labels)
        if view != "shared":  # rows of group views are positions
            if allowed is None:
                scores, found = pad_results(*index.search(queries, k), k)
            else:
                scores, found = filtered_search(index, queries, k, allowed, len(self), self.exact_subset_max)
            if not len(self):  # nothing to map (an index whose every item was removed)
                return scores, np.full_like(found, -1)
            return scores, np.where(found >= 0, self.ids[np.maximum(found, 0)], -1)
        if allowed is None and len(self._dead):
            allowed = np.arange(len(self))  # hide removed HNSW nodes
        if allowed is None:
            return pad_results(*self._search_unfiltered(queries, k), k)
        return filtered_search(index, queries, k, np.sort(self.ids[allowed]), len(self), self.exact_subset_max)

    # ---- updates ----------------------------------------------------------------------------
    def add(self, vectors_by_view, ids, paths, titles=None, labels=None) -> None:
        """Add new items to every view (vectors_by_view: {view: [N, D]}, or an array for "shared"); their
        paths and ids leave ``retired``."""
        if not isinstance(vectors_by_view, Mapping):
            vectors_by_view = {"shared": vectors_by_view}
        ids = as_ids(ids)
        batch = self._check_new_vectors(vectors_by_view, len(ids))
        paths = text_list(paths, len(ids), "paths")
        new = Items.from_lists(ids, paths, text_list(titles, len(ids), "titles"),
                               align_labels(labels, len(ids), groups=self.items.labels.groups))
        clash = np.intersect1d(ids, self.ids)
        if len(clash):
            raise ValueError(f"{len(clash)} id(s) already in the index: {clash[:20].tolist()}")
        if len(np.intersect1d(ids, self._dead)):
            self._compact()  # an HNSW node of a removed id must go before the id returns
        for view, x in batch.items():
            if view == "shared":
                self.views[view].add_with_ids(x, ids)
            else:
                self.views[view].add(x)
        self.items = self.items.concat(new)
        if self.retired:  # a path back (under its id or another), or an id given again: held now, not retired
            back, given = set(paths), set(ids.tolist())
            self.retired = {path: i for path, i in self.retired.items() if path not in back and i not in given}
        self.next_id = first_unused_id(self.next_id, ids)
        self._reset_caches()
        logger.info("Added %d items; the index now holds %d", len(ids), len(self))

    def remove(self, ids) -> None:
        """Remove withdrawn items from every view without rebuilding, their paths' ids kept in ``retired``
        (KeyError naming unknown ids)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        positions = self._positions(ids)
        keep = np.ones(len(self), dtype=bool)
        keep[positions] = False
        for view, index in self.views.items():
            if view == "shared" and self.index_type == "hnsw":
                self._dead = np.union1d(self._dead, ids)  # HNSW cannot delete nodes
                continue
            # IVF's hashtable direct map only removes through an id array; a hash set is O(1) per row elsewhere
            ivf = index_kind(index) in ("ivf", "ivfpq")
            gone = ids if view == "shared" else positions.astype(np.int64)
            removed = index.remove_ids(faiss.IDSelectorArray(gone) if ivf else faiss.IDSelectorBatch(gone))
            assert removed == len(ids), f"view {view}: removed {removed} of {len(ids)} ids"
        # each path keeps its id: the product withdrawn takes it again when it comes back (``add`` of an
        # updated item puts it back at once, which ends its record there)
        self.retired.update(zip(self.items.paths.take(positions).tolist(), ids.tolist()))
        self.items = self.items.take(np.flatnonzero(keep))
        if len(self._dead) > HNSW_COMPACT_SHARE * self.views["shared"].ntotal:
            self._compact()
        self._reset_caches()
        logger.info("Removed %d items; the index now holds %d", len(ids), len(self))

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write <view>.faiss files (``view_files``), items-*.npy and sidecar.json to a temporary directory, then swap it in."""
        directory = Path(directory)
        check_replaceable(directory)  # before any work: a catalog or a file is never replaced
        directory.parent.mkdir(parents=True, exist_ok=True)
        finish_interrupted_swap(directory)  # before the clean-up, which would delete both copies
        remove_stale_temporaries(directory)  # what a killed writer left (whole index copies)
        tmp = temporary_dir(directory)
        try:
            sidecar = self.sidecar()
            for view, index in self.views.items():
                faiss.write_index(index, str(tmp / sidecar["files"][view]))
            self.items.save(tmp)
            (tmp / SIDECAR).write_text(json.dumps(sidecar), encoding="utf-8")
            for path in tmp.iterdir():
                fsync_file(path)  # the data must be on disk before the rename makes it visible
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; an index is meant to be read by servers
            swap_into_place(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Saved %d items (%s) to %s", len(self), ", ".join(self.views), directory)
        return directory

    @staticmethod
    def read_items(directory, ignore_retired: bool = False) -> tuple[Items, int, dict[str, int]]:
        """The item arrays of an index directory alone (ids, paths, titles, labels; memory-mapped), its
        views left unread, the id it numbers new items from (``next_id``) and its retired record
        ({image path: id}; with ``ignore_retired`` none, read or not): what a new build of the directory
        keeps each image's id by."""
        directory = Path(directory)
        finish_interrupted_swap(directory)
        sidecar = read_sidecar(directory, ignore_retired)
        items = Items.load(directory, sidecar["labels"], mmap=True)
        retired = retired_items(sidecar)
        return items, first_unused_id(sidecar.get("next_id"), items.ids, id_array(retired)), retired

    @classmethod
    def load(cls, directory, expect_fingerprint: str | None = None, expect_dimension: int | None = None,
             use_gpu="auto", mmap: bool = False) -> "IndexStore":
        """Load an index directory, refusing a fingerprint or dimension other than the expected one.

        mmap: item arrays and flat / group view codes stay in the files' pages (page cache, shared and
        reclaimable) instead of being copied into the process: for servers, which never modify the index."""
        directory = Path(directory)
        finish_interrupted_swap(directory)  # a swap killed between its renames left no index there
        sidecar = read_sidecar(directory)
        check_expected(sidecar, "fingerprint", expect_fingerprint, directory / SIDECAR)
        check_expected(sidecar, "dimension", expect_dimension, directory / SIDECAR)
        files = sidecar.get("files") or {}  # indexes saved before it: view_file's names
        views = {view: read_view(directory / files.get(view, view_file(directory, view).name), dim, mmap)
                 for view, dim in sidecar["views"].items()}
        try:
            items = Items.load(directory, sidecar["labels"], mmap=mmap)
            return cls(views, None, items=items, fingerprint=sidecar["fingerprint"], created=sidecar["created"],
                       use_gpu=use_gpu, shared_view=sidecar.get("shared_view"),
                       multi_label_view_power=sidecar.get("multi_label_view_power"), next_id=sidecar.get("next_id"),
                       retired=retired_items(sidecar))
        except ValueError as err:
            raise ValueError(f"Inconsistent index directory {directory}: {err}") from err

    # ---- internals --------------------------------------------------------------------------
    def _view(self, view: str) -> faiss.Index:
        if view not in self.views:
            raise ValueError(f"Unknown view {view!r}; choose one of: {', '.join(self.views)}")
        return self.views[view]

    def _check_counts(self) -> None:
        for view, index in self.views.items():
            expected = len(self) + (len(self._dead) if view == "shared" else 0)
            if index.ntotal != expected:
                raise ValueError(f"view {view!r} holds {index.ntotal} vectors for {len(self)} ids")

    def _check_new_vectors(self, vectors_by_view: Mapping, count: int) -> dict[str, np.ndarray]:
        missing, extra = set(self.views) - set(vectors_by_view), set(vectors_by_view) - set(self.views)
        if missing or extra:
            raise ValueError(f"add() needs vectors for exactly the views {sorted(self.views)}; "
                             f"missing {sorted(missing)}, unknown {sorted(extra)}")
        batch = {v: self._as_view_vectors(v, x, f"{v} vectors") for v, x in vectors_by_view.items()}
        for view, x in batch.items():
            if len(x) != count:
                raise ValueError(f"Got {len(x)} {view} vectors for {count} ids")
        return batch

    def _as_view_vectors(self, view: str, vectors, name: str) -> np.ndarray:
        """Vectors for a view, checked against its dimension; group vectors padded like its codes."""
        width = self._view(view).d
        x = as_vectors(vectors, name=name)
        return as_vectors(x if view == "shared" else pad_columns(x, width), width, name=name)

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        # the sort order and sorted ids are made together and published as one tuple: the web server's
        # threads share a store, and one that saw the order set before the sorted ids failed (a 500
        # right after an index reload); two threads computing it at once each publish the same
        sorted_by_id = self._sorted_by_id
        if sorted_by_id is None:
            order = np.argsort(self.ids, kind="stable")
            sorted_by_id = self._sorted_by_id = (order, self.ids[order])
        order, sorted_ids = sorted_by_id
        at = np.minimum(np.searchsorted(sorted_ids, ids), max(0, len(self) - 1))
        found = (sorted_ids[at] == ids) if len(self) else np.zeros(len(ids), bool)
        if not found.all():
            raise KeyError(f"id(s) not in the index: {np.asarray(ids)[~found][:20].tolist()}")
        return order[at]

    def _compact(self) -> None:
        logger.info("Rebuilding the HNSW shared view without %d removed items", len(self._dead))
        self.views["shared"] = rebuild_hnsw(self.views["shared"], self.ids)
        self._dead = np.empty(0, dtype=np.int64)
        self._gpu = None

    def _search_unfiltered(self, queries: np.ndarray, k: int):
        """Search the shared view's GPU copy when there is one, else the CPU index. FAISS GPU indexes
        (and their StandardGpuResources) are not safe for concurrent calls, while the web server
        searches from several threads: GPU searches take a lock, CPU ones run concurrently."""
        if self._on_gpu is None:
            self._on_gpu = want_gpu(self.use_gpu)
        if k > GPU_MAX_K or not self._on_gpu:
            return self.views["shared"].search(queries, k)
        with self._gpu_lock:
            if self._gpu is None:
                self._gpu = to_gpu(self.views["shared"]) or False
            return (self._gpu or self.views["shared"]).search(queries, k)

    def _reset_caches(self) -> None:
        self._sorted_by_id = None  # (order of self.ids, the ids in that order), made by _positions
        self._gpu = None

