"""Embed a catalog: run the model over its items and write EMB.h5 through ``data.embfile``."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from retrieval.data.catalog import Catalog, items_digest
from retrieval.data.embfile import finalize, open_partial
from retrieval.embed.inference import iter_outputs, standardize

logger = logging.getLogger(__name__)


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
    return finalize(out, items, meta, standardize if standardise else None)
