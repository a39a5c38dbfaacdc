"""``retrieval embed``: shared-layer embeddings (and group-focused vectors) of a catalog, in HDF5."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from .backbones import BACKBONES
from .catalog import Catalog, digest_change, items_digest, read_catalog
from .checkpoint import load_model
from .data import ImageCache
from .inference import iter_outputs, open_trunk_cache, standardize
from .model import POOL_WEIGHTINGS, create_model
from .devices import resolve_device

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval embed", description=(
        "Embed every catalog image with the model's shared layers (L2-normalised) into HDF5, with "
        "each group's head-focused vectors and probabilities. Interrupted runs resume."))
    p.add_argument("--checkpoint", metavar="PT", help="trained checkpoint (RUN/best.pt)")
    p.add_argument("--pretrained-only", action="store_true",
                   help="no training: embed with the ImageNet trunk's pooled features (the off-the-shelf baseline)")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONES, help="with --pretrained-only")
    p.add_argument("--weights", help="with --pretrained-only: local trunk weights file")
    p.add_argument("--taps", default="last", help="with --pretrained-only: pooled units (last, all, or 3,5,8); "
                                                  "several are standardised and concatenated")
    p.add_argument("--gem-p", type=float, default=1.0, help="with --pretrained-only: pooling exponent (1 = average)")
    p.add_argument("--image-size", type=int, default=224, help="with --pretrained-only")
    p.add_argument("--pool-weighting", default="none", choices=POOL_WEIGHTINGS, help="with --pretrained-only")
    p.add_argument("--colour-bins", default="none", metavar="L,A,B",
                   help="with --pretrained-only: prepend a CIELAB colour histogram (e.g. 4,6,6)")
    p.add_argument("--catalog", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="EMB.h5")
    p.add_argument("--split", default="all", choices=("all", "train", "test"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int)
    p.add_argument("--image-cache", metavar="H5", help="pre-decoded images from 'retrieval cache'")
    p.add_argument("--trunk-cache", metavar="H5", help="reuse the trunk cache of a frozen-trunk training run")
    return p


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


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if bool(args.checkpoint) == bool(args.pretrained_only):
        raise ValueError("give either --checkpoint RUN/best.pt or --pretrained-only")
    device = resolve_device(args.device)
    catalog = read_catalog(args.catalog)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.pretrained_only:
        model = create_model(args.backbone, {}, 1, method="multi-task", weights=args.weights, taps=args.taps,
                             gem_p=args.gem_p, image_size=args.image_size, pool_weighting=args.pool_weighting,
                             colour_bins=args.colour_bins, flip_average=False)
        model.embed = torch.nn.Identity()
        model.embed_pooled = lambda pooled: pooled
        start = len(model.trunk)
        fp = f"pretrained:{args.backbone}:{args.taps}:gem{args.gem_p}:{args.pool_weighting}:{args.colour_bins}"
        heads, standardise = False, len(model.taps) > 1 or model.colour_dim > 0
        if not standardise:
            model.embed_pooled = lambda pooled: torch.nn.functional.normalize(pooled, dim=1)
    else:
        model, ckpt = load_model(args.checkpoint)
        start, fp = ckpt.get("start_unit", 0), ckpt["fingerprint"]
        heads, standardise = True, False
    trunk_cache = open_trunk_cache(args.trunk_cache, model, catalog, start) if args.trunk_cache else None
    meta = {"fingerprint": fp, "backbone": model.config.backbone, "catalog": str(Path(args.catalog).resolve()),
            "split": args.split, "sigmoid_groups": json.dumps(model.sigmoid_groups if heads else [])}
    image_cache = ImageCache(args.image_cache) if args.image_cache else None
    attrs = embed_catalog(model, catalog, out, meta, device, heads, standardise, args.batch_size, args.workers,
                          image_cache, trunk_cache, start, args.split)
    print(f"Wrote {out}: {attrs['count']} vectors of dimension {attrs['dimension']}, "
          f"groups {', '.join(json.loads(attrs['groups'])) or '-'}, fingerprint {fp[:16]}")
    return 0
