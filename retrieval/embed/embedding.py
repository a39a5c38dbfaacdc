"""``retrieval embed``: shared-layer embeddings (and group-focused vectors) of a catalog, in HDF5."""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from retrieval.data.catalog import Catalog, digest_change, items_digest
from retrieval.embed.inference import iter_outputs, standardize

logger = logging.getLogger(__name__)


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def open_h5(path: Path, mode: str) -> h5py.File:
    """``h5py.File``, with HDF5's file-lock error turned into a message that says what to do."""
    try:
        return h5py.File(path, mode)
    except OSError as err:
        if not isinstance(err, BlockingIOError) and "lock" not in str(err).lower():
            raise
        raise ValueError(f"{path} is in use by another process (another 'retrieval embed' of the same --out, "
                         "or a rebuild, still running?); wait for it to finish or stop it") from None


def partial_mismatch(f: h5py.File, n: int, meta: dict, covers: dict) -> str | None:
    """Why a work file cannot be resumed by this job (None when it can)."""
    stored = json.loads(f.attrs.get("job", "{}"))
    changed = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
    if changed:
        return f"it was made by another job ({', '.join(changed)} differ)"
    if len(f["ok"]) != n:
        return f"it covers {len(f['ok'])} images, this job {n}"
    return digest_change(json.loads(f.attrs.get("covers", "null")), covers)


def open_partial(out: Path, n: int, dims: dict[str, int], meta: dict, covers: dict) -> tuple[h5py.File, int]:
    """The resumable work file: reopened when it was made by this job for the same images (same
    paths in the same order, same file sizes and times), else created afresh."""
    path = partial_path(out)
    if path.exists():
        f = open_h5(path, "r+")
        why = partial_mismatch(f, n, meta, covers)
        if why is None:
            logger.info("Resuming %s at %d/%d images", path, f.attrs["done"], n)
            return f, int(f.attrs["done"])
        f.close()
        logger.warning("Not resuming %s: %s; starting from zero", path, why)
    f = open_h5(path, "w")
    for name, dim in dims.items():
        f.create_dataset(name, (n, dim), dtype="float32", chunks=(min(n, 256), dim))
    f.create_dataset("ok", (n,), dtype="bool")
    f.attrs["job"], f.attrs["done"] = json.dumps(meta, sort_keys=True), 0
    f.attrs["covers"] = json.dumps(covers)
    return f, 0


def finalize(out: Path, items, meta: dict, standardise: bool) -> dict:
    """Write the final EMB.h5 from the work file (readable rows only) atomically."""
    src = partial_path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with open_h5(src, "r") as f, open_h5(tmp, "w") as g:
        ok = f["ok"][:]
        vectors = f["vectors"][:][ok]
        g.create_dataset("vectors", data=standardize(vectors) if standardise else vectors)
        g.create_dataset("ids", data=np.array([it.row_id for it in items], dtype=np.int64)[ok])
        g.create_dataset("paths", data=[it.image for it, k in zip(items, ok) if k], dtype=h5py.string_dtype())
        groups = sorted(f["groups"].keys()) if "groups" in f else []
        for name in groups:
            g.create_dataset(f"groups/{name}", data=f[f"groups/{name}"][:][ok])
            g.create_dataset(f"probs/{name}", data=f[f"probs/{name}"][:][ok])
        skipped = [it.image for it, k in zip(items, ok) if not k]
        attrs = {**meta, "dimension": int(vectors.shape[1]), "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                 "groups": json.dumps(groups), "skipped": json.dumps(skipped), "count": int(ok.sum())}
        g.attrs.update(attrs)
    tmp.replace(out)
    src.unlink()
    return attrs


def embed_catalog(model, catalog: Catalog, out: Path, meta: dict, device, heads: bool, standardise: bool,
                  batch_size=64, workers=None, image_cache=None, trunk_cache=None, start=0, split="all") -> dict:
    """Embed the catalog's items into ``out``; returns the file's attributes."""
    items = catalog.split_items(split)
    probe = next(iter_outputs(model, catalog, items[:1], device, 1, 0, image_cache, trunk_cache, start, heads), None)
    dims = {"vectors": probe.vectors.shape[1] if probe else model.config.embed_dim}
    if probe is not None:
        dims.update({f"groups/{g}": v.shape[1] for g, v in probe.group_vectors.items()})
        dims.update({f"probs/{g}": v.shape[1] for g, v in probe.probs.items()})
    f, done = open_partial(out, len(items), dims, meta, items_digest(items))
    bad: list[str] = []
    began = time.perf_counter()
    with f, tqdm(total=len(items), initial=done, unit="img", desc="embed") as bar:
        for o in iter_outputs(model, catalog, items[done:], device, batch_size, workers, image_cache,
                              trunk_cache, start, heads, bad):
            rows = o.positions + done
            f["vectors"][rows] = o.vectors
            for g in o.group_vectors:
                f[f"groups/{g}"][rows], f[f"probs/{g}"][rows] = o.group_vectors[g], o.probs[g]
            f["ok"][rows] = True
            f.attrs["done"] = int(rows.max()) + 1
            f.flush()  # on disk now: a killed process resumes from here
            bar.n = f.attrs["done"]
            bar.set_postfix(img_s=f"{(bar.n - done) / (time.perf_counter() - began):.1f}")
            bar.update(0)
        f.attrs["done"] = len(items)
    if bad:
        logger.warning("%d unreadable images skipped: %s", len(bad), ", ".join(bad[:10]))
    return finalize(out, items, meta, standardise)
