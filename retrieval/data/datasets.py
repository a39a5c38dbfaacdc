"""Datasets: label targets, images from JPEG files or a pre-decoded HDF5 cache."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from retrieval.atomic import in_use
from retrieval.data.catalog import Catalog, Item
from retrieval.data.images import ImageError, load_image, to_uint8_array

logger = logging.getLogger(__name__)


@dataclass
class Targets:
    """Multi-hot labels and a known-mask per group, row-aligned with a list of items."""

    multi_hot: dict[str, torch.Tensor]
    known: dict[str, torch.Tensor]

    def take(self, index: torch.Tensor) -> "Targets":
        """The rows at ``index``."""
        return Targets({g: t[index] for g, t in self.multi_hot.items()},
                       {g: k[index] for g, k in self.known.items()})

    def to(self, device) -> "Targets":
        return Targets({g: t.to(device) for g, t in self.multi_hot.items()},
                       {g: k.to(device) for g, k in self.known.items()})

    def counts(self) -> dict[str, int]:
        """Labelled samples per group."""
        return {g: int(k.sum()) for g, k in self.known.items()}

    def label_counts(self) -> dict[str, torch.Tensor]:
        """Samples per label of every group."""
        return {g: t.sum(0) for g, t in self.multi_hot.items()}


def build_targets(items: list[Item], vocab: dict[str, list[str]]) -> Targets:
    """Multi-hot targets of ``items``; labels missing from ``vocab`` are ignored."""
    multi_hot, known = {}, {}
    for g, labels in vocab.items():
        position = {label: i for i, label in enumerate(labels)}
        t = torch.zeros(len(items), len(labels))
        for row, item in enumerate(items):
            for label in item.labels.get(g, ()):
                if label in position:
                    t[row, position[label]] = 1
        multi_hot[g], known[g] = t, t.sum(1) > 0
    return Targets(multi_hot, known)


def missing_at_random(targets: Targets, group: str, share: float = 0.5) -> torch.Tensor:
    """Which items' missing ``group`` label may be filled in (``train --fill-missing``): those whose
    labels in every other group are ones whose items are labelled in ``group`` at ``share`` or more
    of its overall rate. A label missing because it does not apply (the demo catalog's trousers have
    no sleeve length) is not filled; one left out at random (a group labelled on 60% of the items,
    about 60% of the trousers included) is."""
    labelled = targets.known[group].float()
    rate = labelled.mean()
    fillable = torch.ones(len(labelled), dtype=torch.bool)
    for other, members in targets.multi_hot.items():
        if other == group:
            continue
        within = (members * labelled[:, None]).sum(0) / members.sum(0).clamp_min(1)  # by label of ``other``
        lowest = torch.where(members > 0, within, torch.ones_like(within)).min(1).values
        fillable &= lowest >= share * rate
    return fillable


def drop_labels(items: list[Item], groups: list[str], keep: list[float], seed: int) -> list[Item]:
    """Emulate incomplete labelling: keep group t's labels on a share ``keep[t]`` of items."""
    rng = np.random.default_rng(seed)
    kept = {}
    for g, share in zip(groups, keep):
        order = rng.permutation(len(items))
        kept[g] = set(order[: round(share * len(items))].tolist())
    return [Item(it.row_id, it.image, it.split, it.title,
                 {g: (it.labels[g] if i in kept.get(g, range(len(items))) else ()) for g in groups}, it.stat)
            for i, it in enumerate(items)]


LABEL_DROPOUT_PROFILES = {"paper": [1.0, 0.96, 0.82, 0.78, 0.68, 0.61, 0.60]}


def parse_dropout_profile(text: str, n_groups: int) -> list[float]:
    """``paper`` or comma-separated shares, extended with the last share to every group."""
    shares = LABEL_DROPOUT_PROFILES.get(text)
    if shares is None:
        try:
            shares = [float(s) for s in text.split(",")]
        except ValueError:
            raise ValueError(f"Bad --label-dropout {text!r}; use {', '.join(LABEL_DROPOUT_PROFILES)} "
                             "or shares like 1.0,0.8,0.6") from None
    if any(not 0 < s <= 1 for s in shares):  # 0 keeps no label of a group (leave it out with --groups)
        raise ValueError(f"--label-dropout shares must lie in (0, 1], got {shares}")
    if text not in LABEL_DROPOUT_PROFILES and len(shares) > n_groups:  # a profile fits any number of groups
        raise ValueError(f"--label-dropout gives {len(shares)} shares for {n_groups} groups: one a group, "
                         "the last repeated for the groups after it")
    return (shares + [shares[-1]] * n_groups)[:n_groups]


def check_image_cache(path: Path) -> None:
    """A ValueError naming ``path`` unless it is an HDF5 image cache (datasets ``images`` and ``paths``)."""
    if not Path(path).exists():  # said as such, not "not an HDF5 file"
        raise FileNotFoundError(f"{path}: no such image cache (make one with 'retrieval cache')")
    try:
        with h5py.File(path, "r") as f:
            if "images" in f and "paths" in f:
                return
    except OSError as err:
        if in_use(err):
            raise ValueError(f"{path} is in use by another process (a cache being written?); "
                             "try again when it has finished") from None
        raise ValueError(f"{path}: not an image cache (not an HDF5 file); choose another file or delete it") from None
    raise ValueError(f"{path}: not an image cache (no images and paths datasets); choose another file or delete it")


class ImageCache:
    """Pre-decoded letterboxed images in HDF5: ``images`` uint8 [N,S,S,3], ``paths``, ``ok`` and the
    ``stats`` (size, mtime_ns) of the files they were decoded from."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None
        check_image_cache(self.path)  # a checkpoint or CSV given as --image-cache was HDF5's traceback
        with h5py.File(self.path, "r") as f:
            self.size = int(f["images"].shape[1])
            self.done = int(f.attrs.get("done", 0))
            paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]]
            ok = f["ok"][:]
            stats = f["stats"][:] if "stats" in f else None
        if stats is None:
            logger.warning("%s records no file sizes and times (an older cache): images changed since it was "
                           "made cannot be noticed; rebuild it with 'retrieval cache'", self.path)
        self.index = {p: i for i, p in enumerate(paths) if i < self.done and ok[i]}
        self.stats = {p: tuple(int(v) for v in stats[i]) for p, i in self.index.items()} if stats is not None else {}

    def __contains__(self, image: str) -> bool:
        return image in self.index

    def serves(self, item: Item) -> bool:
        """Whether the cache holds this item's image as its file is now (same size and time)."""
        if item.image not in self.index:
            return False
        stored = self.stats.get(item.image)
        return stored is None or item.stat is None or stored == tuple(item.stat)

    def stale(self, items: list[Item]) -> list[str]:
        """Images the cache holds in an older version than their file."""
        return [it.image for it in items if it.image in self.index and not self.serves(it)]

    def read(self, image: str) -> np.ndarray:
        """The cached uint8 HWC array of an image path."""
        if self._file is None:  # opened lazily, once per worker process
            self._file = h5py.File(self.path, "r")
        return self._file["images"][self.index[image]]


class ImageDataset(Dataset):
    """Uint8 HWC images of catalog items, from the cache when it has them as they are now, else decoded."""

    def __init__(self, catalog: Catalog, items: list[Item], size: int, cache: ImageCache | None = None):
        if cache is not None and cache.size != size:
            raise ValueError(f"{cache.path}: cached at {cache.size}px, training needs {size}px")
        stale = cache.stale(items) if cache is not None else []
        if stale:
            logger.warning("%d images changed since %s was made; decoding them from their files, e.g. %s",
                           len(stale), cache.path, ", ".join(stale[:3]))
        self.catalog, self.items, self.size, self.cache = catalog, items, size, cache

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        if self.cache is not None and self.cache.serves(item):
            return torch.from_numpy(self.cache.read(item.image)), i
        try:
            image = load_image(self.catalog.path_of(item), size=self.size)
            return torch.from_numpy(to_uint8_array(image, self.size)), i
        except ImageError as err:
            logger.debug("%s", err)
            return None, i


def collate_images(batch):
    """Stack readable images; return (images, indices, indices of unreadable ones)."""
    good = [(img, i) for img, i in batch if img is not None]
    bad = [i for img, i in batch if img is None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), bad
    images, index = zip(*good)
    return torch.stack(images), torch.tensor(index), bad


def loader_workers(requested: int | None = None) -> int:
    """Data loader worker count: as asked, else this process's share of the cores (torchrun's
    LOCAL_WORLD_SIZE processes on a node share them) less one for the process itself, at most 16."""
    if requested is not None:
        return requested
    share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(16, max(0, share - 1))
