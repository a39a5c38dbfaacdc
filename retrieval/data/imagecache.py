"""``retrieval cache``: pre-decode letterboxed catalog images into HDF5 for fast training input."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from retrieval.atomic import hold_lock, remove_stale_temporaries, temporary_path
from retrieval.data.catalog import Catalog, digest_change, items_digest
from retrieval.data.datasets import ImageDataset, check_image_cache, collate_images, loader_workers

logger = logging.getLogger(__name__)


def open_cache(path: Path, catalog: Catalog, size: int) -> int:
    """Create the cache file, or reopen an interrupted one made for the same images (paths, order,
    file sizes and times) at the same size; returns images done."""
    paths = [it.image for it in catalog.items]
    covers = items_digest(catalog.items)
    if path.exists():
        check_image_cache(path)  # a file of another kind (a checkpoint, EMB.h5) is never rebuilt over
        with h5py.File(path, "r") as f:
            why = (f"it holds {f['images'].shape[1]}px images, not {size}px" if f["images"].shape[1] != size
                   else digest_change(json.loads(f.attrs.get("covers", "null")), covers))
            if why is None:
                return int(f.attrs.get("done", 0))
        logger.warning("Not resuming %s: %s; rebuilding it", path, why)
    remove_stale_temporaries(path.parent)  # a killed run's layout
    tmp = temporary_path(path)  # named by its writer: two runs laying one out at once each keep their own
    with h5py.File(tmp, "w") as f:
        f.create_dataset("images", (len(paths), size, size, 3), dtype="uint8", chunks=(1, size, size, 3))
        f.create_dataset("paths", data=paths, dtype=h5py.string_dtype())
        f.create_dataset("stats", data=np.array([it.stat or (-1, -1) for it in catalog.items], dtype=np.int64))
        f.create_dataset("ok", (len(paths),), dtype="bool")
        f.attrs["done"], f.attrs["covers"] = 0, json.dumps(covers)
    tmp.replace(path)
    return 0


def build_image_cache(catalog: Catalog, path: str | Path, size: int = 224, workers: int | None = None) -> int:
    """Fill (or resume) the image cache; returns the number of unreadable images. Another process
    filling the same file (a second ``retrieval cache`` of it) is a ValueError naming it: two writers
    of one file each redid the other's rows, or one failed inside HDF5 with "unable to lock file"."""
    path = Path(path)
    held = hold_lock(path.with_name(f".{path.name}.lock"))
    if isinstance(held, str):
        raise ValueError(f"image cache {path} is being written by another process (pid {held}, another "
                         "'retrieval cache' of it?); wait for it to finish, or give this run another --out")
    try:
        return _fill(catalog, path, size, workers)
    finally:
        os.close(held)


def _fill(catalog: Catalog, path: Path, size: int, workers: int | None) -> int:
    done = open_cache(path, catalog, size)
    dataset = ImageDataset(catalog, catalog.items[done:], size)
    loader = DataLoader(dataset, batch_size=32, num_workers=loader_workers(workers), collate_fn=collate_images)
    bad, began = [], time.perf_counter()
    with h5py.File(path, "r+") as f, tqdm(total=len(catalog), initial=done, unit="img", desc="cache") as bar:
        for images, index, failed in loader:
            bad += [dataset.items[i].image for i in failed]
            if images is not None:
                rows = (index + done).numpy()
                f["images"][rows] = images.numpy()
                f["ok"][rows] = True
            step = len(index) + len(failed)
            f.attrs["done"] = int(f.attrs["done"]) + step
            f.flush()  # on disk now: a killed process resumes from here
            bar.update(step)
            bar.set_postfix(img_s=f"{(bar.n - done) / (time.perf_counter() - began):.0f}")
    if bad:
        logger.warning("%d unreadable images skipped: %s", len(bad), ", ".join(bad[:10]))
    return len(bad)
