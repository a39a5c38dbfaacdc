"""Trunk caches: run the frozen part of the trunk once (with flips) and train the rest from HDF5."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from retrieval.atomic import check_free_space, hold_lock, in_use, remove_stale_temporaries, temporary_path
from retrieval.data.catalog import Catalog, Item, items_digest
from retrieval.data.datasets import ImageCache, ImageDataset, collate_images, loader_workers
from retrieval.data.images import normalize_batch
from retrieval.net.backbones import fold_batchnorm
from retrieval.net.model import ATTENDED, RetrievalModel, fingerprint

logger = logging.getLogger(__name__)


def frozen_fingerprint(trunk, start: int) -> str:
    """Fingerprint of the trunk units below ``start``: all that a cache cut there depends on. The
    units from ``start`` on may train, and the checkpoint keeps its training cache's key, so embed
    serves it from that cache; with every unit frozen it is the whole trunk's ``fingerprint``."""
    return fingerprint(trunk, lambda name: int(name.split(".")[1]) < start)


def cache_key(model: RetrievalModel, start: int, items: list[Item]) -> str:
    """What a trunk cache depends on: the frozen units' weights, cut point, pooling, size, images
    (their paths in order, and their files' sizes and times) and the units it pooled, which may be
    more than a model taps: any subset is served from it."""
    covers = items_digest(items)
    return json.dumps({
        "trunk": frozen_fingerprint(model.trunk, start), "start": start, "taps": list(range(start)), "gem_p": model.config.gem_p,
        # the attended poolings reweight units from the learned colour's cache: a plain prefix
        "pool_weighting": "none" if model.config.pool_weighting in ATTENDED else model.config.pool_weighting,
        "colour": model.colour_bins,
        "colour_weighting": model.config.colour_weighting,
        "image_size": model.config.image_size, "images": covers["paths"], "files": covers["files"],
    }, sort_keys=True)


def is_cache_key(value) -> bool:
    """Whether an HDF5 ``key`` attribute is a trunk cache's (``cache_key``): what tells our caches,
    which may be rebuilt, from other HDF5 files (EMB.h5, an image cache), which never are."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        key = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        return False
    return isinstance(key, dict) and {"trunk", "start", "taps"} <= set(key)


def cache_serves(stored_key: str | None, wanted_key: str, model: RetrievalModel, start: int) -> bool:
    """Whether a cache made under ``stored_key`` holds what this model needs below unit ``start``."""
    if not is_cache_key(stored_key):
        return False
    stored, wanted = json.loads(stored_key), json.loads(wanted_key)
    stored.setdefault("pool_weighting", "none")  # caches made before the options existed
    # a model without a histogram takes any cache; one with a histogram needs its bins and weighting
    stored_colour = stored.pop("colour", None), stored.pop("colour_weighting", "border")
    wanted_colour = wanted.pop("colour"), wanted.pop("colour_weighting")
    stored_taps = stored.pop("taps")
    wanted.pop("taps")
    return stored == wanted and set(t for t in model.taps if t < start) <= set(stored_taps) \
        and (wanted_colour[0] is None or wanted_colour == stored_colour)


@torch.no_grad()
def frozen_outputs(model: RetrievalModel, x: torch.Tensor, start: int, taps: list[int] | None = None,
                   units: torch.nn.ModuleList | None = None):
    """What the trunk cache stores for a batch: ``model.trunk_prefix`` without gradients (through
    ``units``, the frozen units with their batch norms folded, when given)."""
    return model.trunk_prefix(x, start, taps, units)


def prefix_columns(model: RetrievalModel, stored_taps: list[int], start: int, stored_colour: int = 0) -> torch.Tensor:
    """Columns of a cached prefix (``stored_colour`` columns of colour feature, then pooled
    ``stored_taps``) that hold the model's colour feature and taps below ``start``. A model with a
    histogram takes all of the colour columns (``cache_serves`` has checked they are its kind: a
    histogram, or the learned weighting's inputs), one without takes none."""
    offsets, at = {}, stored_colour
    for t in stored_taps:
        offsets[t] = at
        at += model.trunk.channels[t]
    spans = [torch.arange(stored_colour if model.colour_bins is not None else 0)]
    spans += [torch.arange(offsets[t], offsets[t] + model.trunk.channels[t]) for t in model.taps if t < start]
    return torch.cat(spans)


def read_columns(dataset: h5py.Dataset, columns: torch.Tensor | None, rows_at_a_time: int = 1024) -> torch.Tensor:
    """A stored [N, 2, P] dataset in memory with only ``columns`` of its last axis (all when None),
    read in slices of rows: the stored width is never held whole beside the kept one (a copy of the
    kept columns from the whole had doubled the peak memory)."""
    if columns is None:
        return torch.from_numpy(dataset[:])
    out = torch.from_numpy(np.empty((*dataset.shape[:2], len(columns)), dtype=dataset.dtype))
    for at in range(0, dataset.shape[0], rows_at_a_time):
        out[at:at + rows_at_a_time] = torch.from_numpy(dataset[at:at + rows_at_a_time])[:, :, columns]
    return out


FLOAT16_SAFE = 2.0 ** 14  # stored values stay below this; float16 ends at 65504


def storage_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row power-of-two divisor that brings each row of ``x`` within float16's range.

    1 for ordinary activations (so those are stored exactly as before); a power of two otherwise,
    which divides without rounding. Random-weight ResNet-101 units reach ~1.8e5, past float16."""
    peak = x.detach().abs().flatten(1).amax(1).float()
    exponent = torch.log2(peak / FLOAT16_SAFE).ceil().clamp_min(0)
    return torch.exp2(exponent)


def check_finite(x: torch.Tensor, what: str, names, prefix: str = "") -> None:
    """Refuse non-finite trunk outputs, naming the images they came from (``prefix`` + ``names[i]``)."""
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{what} are not finite (inf or NaN) for {len(rows)} image(s), e.g. "
                         f"{', '.join(f'{prefix}{names[i]}' for i in rows[:3])}: the trunk's weights overflow "
                         "float32; give trained weights with --weights or choose another backbone")


MEMORY_SHARE = 0.5  # a trunk cache whose kept part exceeds this share of the machine's memory stays on disk
STORED = ("prefix", "act", "weight")  # the [N, 2, ...] datasets a batch reads


def memory_budget() -> int:
    """Bytes of trunk cache one process holds in memory at most: ``MEMORY_SHARE`` of the machine's
    physical memory, shared among the processes torchrun starts on it (``LOCAL_WORLD_SIZE``)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows): no limit
        return 1 << 62
    return int(total * MEMORY_SHARE) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class RowReader:
    """Rows of an uncompressed [N, ...] HDF5 dataset chunked by whole rows, read with one ``preadv``
    each: a row is one contiguous run of bytes inside its chunk. (h5py's selection of scattered
    rows took ~440 ms a batch of 128 rows on the development catalog's cache, reading whole
    chunks.) ``open`` gives None where the layout does not allow it."""

    def __init__(self, path: Path, offsets: np.ndarray, per_chunk: int, dtype: np.dtype, shape: tuple):
        self.fd = os.open(path, os.O_RDONLY)
        self.offsets, self.per_chunk, self.dtype, self.shape = offsets, per_chunk, dtype, shape
        self.row_bytes = int(np.prod(shape)) * dtype.itemsize

    @classmethod
    def open(cls, path: Path, dataset: h5py.Dataset) -> RowReader | None:
        if (not hasattr(os, "preadv") or dataset.chunks is None or dataset.compression
                or tuple(dataset.chunks[1:]) != dataset.shape[1:]):
            return None
        per_chunk = dataset.chunks[0]
        chunk_bytes = per_chunk * int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize
        offsets = np.full(-(-dataset.shape[0] // per_chunk), -1, np.int64)  # -1: a chunk never written
        for i in range(dataset.id.get_num_chunks()):
            info = dataset.id.get_chunk_info(i)
            if info.filter_mask or info.size != chunk_bytes:
                return None
            offsets[info.chunk_offset[0] // per_chunk] = info.byte_offset
        return cls(path, offsets, per_chunk, dataset.dtype, dataset.shape[1:])

    def read(self, rows: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """The stored values of ``rows`` ([len(rows), ...]), in that order; with ``views``, only
        view ``views[i]`` of row i (the next axis: [len(rows), ...] without it), which halves the reads."""
        starts = self.offsets[rows // self.per_chunk]
        if (starts < 0).any():
            raise ValueError(f"rows {rows[starts < 0][:3].tolist()} of the trunk cache were never written")
        starts = starts + (rows % self.per_chunk) * self.row_bytes
        size, shape = self.row_bytes, self.shape
        if views is not None:
            size, shape = self.row_bytes // shape[0], shape[1:]
            starts = starts + np.asarray(views) * size
        out = np.empty((len(rows), size), np.uint8)
        for i, at in enumerate(starts.tolist()):
            if os.preadv(self.fd, [out[i]], at) != size:
                raise ValueError(f"the trunk cache ends inside row {rows[i]}: a truncated file?")
        return out.view(self.dtype).reshape(len(rows), *shape)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


class TrunkCache:
    """HDF5 of per-image frozen outputs, original and flipped: ``prefix`` [N,2,P], ``act`` [N,2,C,H,W],
    each stored in float16 divided by a per-row power of two (``prefix_scale``/``act_scale`` [N,2];
    absent = 1, as in caches made before large activations were handled). Held in memory as
    stored (float16) and scaled by the batch in ``inputs``: the learned colour weighting's prefix
    has ~40k columns (1.5 GB for 10k images). A cache larger than ``max_memory`` bytes (default
    ``memory_budget()``) stays on disk: each batch reads its rows (``on_disk``)."""

    def __init__(self, path: Path, model: RetrievalModel | None = None, start: int | None = None,
                 max_memory: int | None = None):
        self.path = Path(path)
        self._file, self._readers = None, {}
        with h5py.File(self.path, "r") as f:
            self.ok = f["ok"][:].astype(bool)
            stored = json.loads(f.attrs["key"])
            self.columns = None
            if model is not None:  # keep only the model's colour feature and taps, in its order
                colour = f["prefix"].shape[2] - sum(model.trunk.channels[t] for t in stored["taps"])
                columns = prefix_columns(model, stored["taps"], start, colour)
                if not torch.equal(columns, torch.arange(f["prefix"].shape[2])):
                    self.columns = columns
            kept = {name: f[name].size * f[name].dtype.itemsize for name in STORED if name in f}
            if self.columns is not None:
                kept["prefix"] = kept["prefix"] // f["prefix"].shape[2] * len(self.columns)
            self.nbytes = sum(kept.values())
            self.on_disk = self.nbytes > (memory_budget() if max_memory is None else max_memory)
            if self.on_disk:
                self._readers = {name: RowReader.open(self.path, f[name]) for name in STORED if name in f}
                logger.info("trunk cache %s: %.1f GB, more than the memory budget; each batch reads its rows "
                            "from disk", self.path, self.nbytes / 2**30)
            self.prefix = None if self.on_disk else read_columns(f["prefix"], self.columns)
            self.act = torch.from_numpy(f["act"][:]) if "act" in f and not self.on_disk else None
            self.weight = torch.from_numpy(f["weight"][:]) if "weight" in f and not self.on_disk else None
            self.has = {name: name in f for name in STORED}
            self.prefix_scale = torch.from_numpy(f["prefix_scale"][:]) if "prefix_scale" in f else None
            self.act_scale = torch.from_numpy(f["act_scale"][:]) if "act_scale" in f else None
            rows = np.flatnonzero(self.ok)  # checked once here, not on every batch read
            for name, what in (("prefix", "cached pooled features"), ("act", "cached activations")):
                if not self.has[name]:
                    continue
                for at in range(0, len(rows), 1024):  # in chunks: a copy of every row would double the memory
                    chunk = rows[at:at + 1024]
                    values = self._stored(name, chunk) if self.on_disk else getattr(self, name)[torch.from_numpy(chunk)]
                    check_finite(values, f"{self.path}: {what}", chunk, "catalog row ")

    def _stored(self, name: str, rows: np.ndarray, views: np.ndarray | None = None) -> torch.Tensor:
        """Rows of a stored dataset from the file (the model's columns of ``prefix``), in ``rows``
        order, both views or view ``views[i]`` of row i: with ``RowReader`` where the layout allows
        it, else with h5py."""
        if self._readers.get(name) is not None:
            values = torch.from_numpy(self._readers[name].read(rows, views))
        else:
            if self._file is None:  # opened on first use, by the process that reads
                self._file = h5py.File(self.path, "r")
            unique, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing rows
            values = torch.from_numpy(self._file[name][unique])[torch.from_numpy(inverse.reshape(-1))]
            if views is not None:
                values = values[torch.arange(len(rows)), torch.as_tensor(views)]
        return values[..., self.columns] if name == "prefix" and self.columns is not None else values

    def _rows(self, name: str, index: torch.Tensor, flip: torch.Tensor) -> torch.Tensor | None:
        """The stored (float16) values of rows ``index``, view ``flip``, from memory or from disk."""
        if not self.has[name]:
            return None
        if not self.on_disk:
            return getattr(self, name)[index, flip]
        return self._stored(name, index.numpy(), flip.numpy())

    def inputs(self, index: torch.Tensor, flip: torch.Tensor):
        """Cached (prefix, activations, pooling weights) of rows ``index``, flipped where ``flip`` is 1."""
        prefix = self._rows("prefix", index, flip).float()
        if self.prefix_scale is not None:
            prefix *= self.prefix_scale[index, flip][:, None]
        act = self._rows("act", index, flip)
        if act is not None:
            act = act.float()
            if self.act_scale is not None:
                act *= self.act_scale[index, flip].view(-1, *[1] * (act.dim() - 1))
        weight = self._rows("weight", index, flip)
        return prefix, act, weight if weight is None else weight.float()


def build_trunk_cache(model: RetrievalModel, catalog: Catalog, items: list[Item], start: int, path: Path,
                      device: torch.device, batch_size: int = 64, image_cache: ImageCache | None = None,
                      workers: int | None = None) -> Path:
    """Compute (or resume) the trunk cache of ``items`` for training units ``start..``. Another process
    writing it (two runs sharing ``--trunk-cache``) is a ValueError saying so, never a rebuild under it."""
    path = Path(path)
    key = cache_key(model, start, items)
    in_use_error = ValueError(f"trunk cache {path} is in use by another process (another run sharing --trunk-cache, "
                              "still filling it?); wait for it to finish, or give this run its own --trunk-cache")
    # held while the cache is made and filled: two runs started together each laid out a cache of their
    # own and did the whole pass, the last rename throwing the other's work away
    held = None
    if path.parent.is_dir() and not cache_complete(path, key, model, start, len(items)):
        try:  # a finished cache is only read: no lock file, so one in a read-only folder still serves
            held = hold_lock(path.with_name(f".{path.name}.lock"))
        except OSError:  # no lock file can be made there (read-only, another user's): writing will say why
            held = None
    if isinstance(held, str):
        raise in_use_error
    try:
        done = _open_or_create(model, items, start, path, key, device)
        if done < len(items):
            check_free_space(path.parent, _item_bytes(path, len(items)) * (len(items) - done),
                             f"the trunk cache of {len(items)} images ({path.name})")
            _fill(model, catalog, items, start, path, done, device, batch_size, image_cache, workers)
        with h5py.File(path, "r") as f:
            ok = f["ok"][:].astype(bool)
    except OSError as err:
        if not in_use(err):
            raise
        raise in_use_error from None
    finally:
        if held is not None:
            os.close(held)
    bad = [items[i].image for i in np.flatnonzero(~ok)]
    if bad:
        logger.warning("%d unreadable images skipped, e.g. %s", len(bad), ", ".join(bad[:5]))
    return path


def cache_complete(path: Path, key: str, model: RetrievalModel, start: int, n: int) -> bool:
    """Whether ``path`` is a finished trunk cache serving this model's ``n`` items (nothing to write)."""
    try:
        with h5py.File(path, "r") as f:
            return cache_serves(f.attrs.get("key"), key, model, start) and int(f.attrs.get("done", 0)) >= n
    except (OSError, ValueError, KeyError):  # missing, cut short, in use, another kind: not finished here
        return False


def _item_bytes(path: Path, n: int) -> int:
    """Bytes one image takes in the cache file's numeric datasets (its flips included)."""
    with h5py.File(path, "r") as f:
        return sum(int(np.prod(ds.shape[1:])) * ds.dtype.itemsize for ds in f.values()
                   if isinstance(ds, h5py.Dataset) and ds.shape[:1] == (n,) and ds.dtype.kind in "fb")


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# the name of the first dataset a trunk cache creates, as the root group's link-name heap holds it; the
# heap is written in the file's first kilobytes, before any data, so a cache cut short keeps it
CACHE_MARK = b"\x00prefix\x00"
MARK_SPAN = 1 << 20  # bytes searched for it


def cut_short_cache(path: Path) -> bool:
    """Whether an unreadable file is a trunk cache of ours cut short (a full disk, a copy stopped), or
    empty: then nothing is lost by rebuilding it. Anything else (a checkpoint, a CSV, another HDF5
    file) may be the user's own and is never written over."""
    with open(path, "rb") as f:
        head = f.read(MARK_SPAN)
    return not head or (head.startswith(HDF5_SIGNATURE) and CACHE_MARK in head)


def not_a_cache(path: Path, why: str) -> ValueError:
    """The error for a --trunk-cache path that holds something else: it is left as it is."""
    return ValueError(f"{path} is not a trunk cache ({why}); it is left as it is: give --trunk-cache another "
                      "path, or delete the file if it is an old cache you no longer need")


def _open_or_create(model, items, start, path: Path, key: str, device) -> int:
    """Images already cached at ``path`` for this key (resumed), else 0 after laying out a new cache
    there: only a trunk cache of ours (another model's, or one cut short) is replaced."""
    if path.is_dir():
        raise FileExistsError(f"trunk cache {path} is a folder; give --trunk-cache the cache file's name "
                              f"(e.g. {path / 'trunk-cache.h5'})")
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                if not is_cache_key(f.attrs.get("key")):
                    raise not_a_cache(path, "an HDF5 file without a trunk cache's key: an embeddings file or "
                                            "an image cache?")
                if cache_serves(f.attrs.get("key"), key, model, start):
                    done = int(f.attrs.get("done", 0))
                    if done:
                        logger.info("Resuming trunk cache %s at %d/%d images", path, done, len(items))
                    return done
            logger.info("Trunk cache %s was made for another model or catalog: rebuilding", path)
        except OSError as err:  # truncated (a full disk, a copy cut short) or not HDF5
            if in_use(err):  # another run (sharing --trunk-cache) has it open: never rebuilt under it
                raise  # build_trunk_cache says so
            if not cut_short_cache(path):
                raise not_a_cache(path, "not a readable HDF5 file: a checkpoint, a CSV?") from None
            logger.warning("Trunk cache %s cannot be read (%s): rebuilding", path, err)
    probe = torch.zeros(1, 3, model.config.image_size, model.config.image_size, device=device)
    model.trunk.eval()
    prefix, act, weight = frozen_outputs(model, probe, start, list(range(start)))
    remove_stale_temporaries(path.parent)  # a killed run's layout
    tmp = temporary_path(path)  # named by its writer (a fixed NAME.tmp was shared by two runs)
    with h5py.File(tmp, "w") as f:
        n = len(items)
        f.create_dataset("prefix", (n, 2, prefix.shape[1]), dtype="float16", chunks=(min(n, 64), 2, prefix.shape[1]))
        f.create_dataset("prefix_scale", (n, 2), dtype="float32", fillvalue=1.0)
        if act is not None:
            shape = tuple(act.shape[1:])
            f.create_dataset("act", (n, 2, *shape), dtype="float16", chunks=(min(n, 16), 2, *shape))
            f.create_dataset("act_scale", (n, 2), dtype="float32", fillvalue=1.0)
        if weight is not None:
            shape = tuple(weight.shape[1:])
            f.create_dataset("weight", (n, 2, *shape), dtype="float16", chunks=(min(n, 64), 2, *shape))
        f.create_dataset("ok", (n,), dtype="bool")
        f.create_dataset("paths", data=[it.image for it in items], dtype=h5py.string_dtype())
        f.attrs["key"], f.attrs["done"] = key, 0
    tmp.replace(path)
    return 0


def _fill(model, catalog, items, start, path, done, device, batch_size, image_cache, workers):
    dataset = ImageDataset(catalog, items[done:], model.config.image_size, image_cache)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=loader_workers(workers),
                        collate_fn=collate_images)
    model.trunk.eval().to(device)
    units = fold_batchnorm(model.trunk.units[:start])
    with h5py.File(path, "r") as f:
        taps = json.loads(f.attrs["key"])["taps"]
    began = time.perf_counter()
    with h5py.File(path, "r+") as f, tqdm(total=len(items), initial=done, unit="img", desc="trunk cache") as bar:
        offset = done
        for images, index, bad in loader:
            n = len(index) + len(bad)
            if images is not None:
                rows = (index + done).numpy()
                x = normalize_batch(images.to(device))
                outputs = [frozen_outputs(model, v, start, taps, units) for v in (x, x.flip(3))]
                names = [items[i].image for i in rows]
                _write_scaled(f, "prefix", rows, torch.stack([o[0] for o in outputs], 1), names)
                if outputs[0][1] is not None:
                    _write_scaled(f, "act", rows, torch.stack([o[1] for o in outputs], 1), names)
                if outputs[0][2] is not None:
                    f["weight"][rows] = torch.stack([o[2] for o in outputs], 1).cpu().half().numpy()
                f["ok"][rows] = True
            offset += n
            f.attrs["done"] = offset  # written last: an interrupted run resumes here
            f.flush()  # on disk now: a killed process resumes from here
            bar.update(n)
            bar.set_postfix(img_s=f"{(offset - done) / (time.perf_counter() - began):.1f}")


def _write_scaled(f: h5py.File, name: str, rows: np.ndarray, values: torch.Tensor, names: list[str]) -> None:
    """Write [n, 2, ...] values as float16 with their per-row scales (``name``_scale), refusing
    non-finite values: a cache never holds inf or NaN."""
    values = values.float()
    check_finite(values.flatten(1), f"trunk outputs ({name})", names)
    scale = storage_scale(values.flatten(0, 1)).view(len(values), 2)
    f[name][rows] = (values / scale.view(*scale.shape, *[1] * (values.dim() - 2))).cpu().half().numpy()
    if f"{name}_scale" in f:
        f[f"{name}_scale"][rows] = scale.cpu().numpy()
    elif bool((scale != 1).any()):
        raise ValueError(f"{f.filename}: values up to {float(values.abs().max()):.3g} need a scaled cache, "
                         "and this one was made before scales were stored; delete it to rebuild")
