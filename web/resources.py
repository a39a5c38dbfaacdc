"""Server resources loaded lazily: the index (hot-reloaded when INDEX_DIR is replaced), model, catalog."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, abort, current_app, g

from web.facets import Facets
from web.search import QueryCache

logger = logging.getLogger(__name__)

SIDECAR = "sidecar.json"
LOAD_ATTEMPTS = 3


class Unavailable(RuntimeError):
    """A resource the request needs is not configured or cannot be loaded (answered with 503)."""


@dataclass(frozen=True)
class Snapshot:
    """One loaded index directory: the store, its facets and the sidecar identity it was read from."""

    store: object
    facets: Facets
    key: tuple
    loaded_at: float = field(default_factory=time.time)


def stat_key(directory: Path) -> tuple:
    """Return the identity of an index directory's sidecar (raises OSError while it is missing)."""
    st = os.stat(directory / SIDECAR)
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class IndexHolder:
    """The current index snapshot; a replaced INDEX_DIR is noticed (one os.stat per interval) and swapped in."""

    def __init__(self, directory, fingerprint: str | None = None, interval: float = 1.0):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.interval = interval
        self.error: str | None = None
        self._snapshot: Snapshot | None = None
        self._checked = 0.0
        self._failed_key = None
        self._load_lock = threading.Lock()  # one loader at a time; readers never wait on it

    def get(self) -> Snapshot:
        """Return the current snapshot, loading it on first use and checking for a newer one."""
        snapshot = self._snapshot
        if snapshot is None:
            return self._load_first()
        if time.monotonic() - self._checked >= self.interval:
            self._checked = time.monotonic()
            self._reload_if_changed(snapshot)
        return self._snapshot

    def _load_first(self) -> Snapshot:
        with self._load_lock:
            if self._snapshot is None:
                self._snapshot = self._load()
                self._checked = time.monotonic()
            return self._snapshot

    def _reload_if_changed(self, snapshot: Snapshot) -> None:
        try:
            key = stat_key(self.directory)
        except OSError:
            # between the two renames of a swap: keep serving the old index, unless its writer is gone
            # (killed there): then its new index is put in place and read as any other
            from indexer.persist import finish_interrupted_swap

            try:
                if not finish_interrupted_swap(self.directory):
                    return
                key = stat_key(self.directory)
            except OSError:
                return
        if key in (snapshot.key, self._failed_key) or not self._load_lock.acquire(blocking=False):
            return
        try:
            self._snapshot = self._load()
            self.error = None
            logger.info("Reloaded index %s: %d items", self.directory, len(self._snapshot.facets))
        except Exception as err:  # noqa: BLE001 -- whatever a broken index raises, the old one keeps serving
            self._failed_key, self.error = key, str(err) or type(err).__name__
            logger.error("Keeping the previous index; the new one cannot be used: %s", self.error,
                         exc_info=not isinstance(err, (OSError, ValueError)))  # a trace only for the unforeseen
        finally:
            self._load_lock.release()

    def _load(self) -> Snapshot:
        """Read the directory, retrying when it was swapped while being read."""
        from indexer import IndexStore
        from indexer.persist import finish_interrupted_swap

        finish_interrupted_swap(self.directory)  # a swap killed between its renames left no index to stat
        for _ in range(LOAD_ATTEMPTS):
            before = stat_key(self.directory)
            # memory-mapped: the item arrays and exact views live in the page cache, so a reload does
            # not need a second private copy of them beside the snapshot still serving
            store = IndexStore.load(self.directory, expect_fingerprint=self.fingerprint, mmap=True)
            if stat_key(self.directory) == before:
                return Snapshot(store, Facets(store), before)
        raise OSError(f"{self.directory} kept changing while being read; try again")


class ModelHolder:
    """The search-by-photo model of a checkpoint, loaded once on first use."""

    def __init__(self, checkpoint, device: str = "cpu"):
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.device = device
        self._loaded = None
        self._lock = threading.Lock()

    def get(self):
        """Return (model, checkpoint dict); Unavailable when the server has no checkpoint."""
        if self.checkpoint is None:
            raise Unavailable("Search by photo is disabled: the server was started without --checkpoint")
        if self._loaded is None:
            with self._lock:
                if self._loaded is None:
                    from retrieval.net.backbones import fold_batchnorm
                    from retrieval.net.checkpoint import load_model

                    model, ckpt = load_model(self.checkpoint, self.device)
                    # the server only runs this copy: its trunk's batch norms are folded into the
                    # convolutions once (checked; the same vectors, a photo ~12% faster on the CPU)
                    model.trunk.units = fold_batchnorm(model.trunk.units)
                    self._loaded = model, ckpt
                    logger.info("Loaded model %s (fingerprint %s)", self.checkpoint,
                                self._loaded[1]["fingerprint"][:16])
        return self._loaded


class Resources:
    """Everything the app serves from, created by init_app and loaded on first use."""

    def __init__(self, config):
        self.catalog_dir = Path(config["CATALOG_DIR"]) if config.get("CATALOG_DIR") else None
        self.model = ModelHolder(config.get("CHECKPOINT"), config.get("DEVICE", "cpu"))
        self.index_dir = config.get("INDEX_DIR")
        self.interval = float(config.get("INDEX_CHECK_INTERVAL", 1.0))
        self.queries = QueryCache(int(config.get("QUERY_CACHE_SIZE", 256)))
        self._index: IndexHolder | None = None
        self._lock = threading.Lock()

    def index(self) -> IndexHolder:
        """Return the index holder, created once the expected fingerprint is known."""
        if self.index_dir is None:
            raise Unavailable("No index configured (INDEX_DIR)")
        with self._lock:
            if self._index is None:
                fingerprint = self.model.get()[1]["fingerprint"] if self.model.checkpoint else None
                self._index = IndexHolder(self.index_dir, fingerprint, self.interval)
            return self._index

    def warm_up(self) -> Snapshot:
        """Check the catalog, load the model and index now so that configuration errors show at startup.

        The catalog's labels.csv is not parsed: the index holds every item's path, title and labels, and
        images are looked up by path (a missing file is a 404 of that image)."""
        labels_csv = self.catalog_dir / "labels.csv" if self.catalog_dir else None
        if labels_csv is None or not labels_csv.is_file():
            raise FileNotFoundError(f"Catalog not found: {labels_csv or 'no --catalog'} (labels.csv of the "
                                    "catalog the index was built from)")
        if self.model.checkpoint:
            self.model.get()
        from indexer import IndexMismatch

        try:
            return self.index().get()
        except IndexMismatch as err:
            if err.field == "fingerprint" and self.model.checkpoint:
                raise ValueError(f"{err}. The index was not built with the embeddings of "
                                 f"{self.model.checkpoint}: rebuild it (scripts/rebuild_index.sh) "
                                 f"or pass the checkpoint it was built with") from err
            raise
        except (ValueError, FileNotFoundError, Unavailable):
            raise  # these name the file: `retrieval serve` says them in one line
        except Exception as err:  # noqa: BLE001 -- an unreadable index is one line at start-up, not a trace
            raise ValueError(f"The index {self.index_dir} cannot be used: {err or type(err).__name__}") from err


def init_app(app: Flask) -> None:
    """Attach the lazily loaded resources to the app."""
    app.extensions["retrieval"] = Resources(app.config)


def resources() -> Resources:
    """Return the current app's resources."""
    return current_app.extensions["retrieval"]


def get_snapshot() -> Snapshot:
    """Return the index snapshot this request uses from start to end (503 when unavailable)."""
    if "snapshot" not in g:
        try:
            g.snapshot = resources().index().get()
        except Exception as err:  # noqa: BLE001 -- a file problem of the server: 503 naming it, never a 500
            logger.error("Index unavailable: %s", err or type(err).__name__,
                         exc_info=not isinstance(err, (Unavailable, OSError, ValueError)))
            abort(503, f"The index is unavailable: {err or type(err).__name__}")
    return g.snapshot


def get_model():
    """Return (model, checkpoint dict), 503 when search by photo is not available."""
    try:
        return resources().model.get()
    except Unavailable as err:
        abort(503, str(err))
    except (OSError, ValueError) as err:
        logger.error("Model unavailable: %s", err)
        abort(503, f"The model is unavailable: {err}")


def catalog_dir() -> Path:
    """Return the catalog directory images are served from (503 when not configured)."""
    root = resources().catalog_dir
    if root is None:
        abort(503, "No catalog configured (CATALOG_DIR)")
    return root
