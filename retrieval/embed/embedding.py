"""Embed a catalog: run the model over its items into resumable shards (``embed.shards``), one or
more per torchrun rank, and merge them into EMB.h5."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from retrieval.atomic import check_free_space
from retrieval.data.catalog import Catalog, Item, items_digest
from retrieval.data.embfile import decode_attr, h5_key, open_h5, open_partial
from retrieval.embed.inference import Outputs, iter_outputs, standardize
from retrieval.embed.reuse import Reuse
from retrieval.embed.shards import merge_shards, same_file, shard_count, shard_path, shard_rows

logger = logging.getLogger(__name__)


def output_columns(o: Outputs) -> dict[str, np.ndarray]:
    """A batch's outputs by EMB.h5 dataset name, in the work file's column order."""
    columns = {"vectors": o.vectors}
    for g in o.group_vectors:
        columns[f"groups/{h5_key(g)}"], columns[f"probs/{h5_key(g)}"] = o.group_vectors[g], o.probs[g]
    return columns


def output_dims(model, catalog: Catalog, items: list[Item], device, image_cache, trunk_cache, start, heads) -> dict:
    """Width of every output, from the model's outputs on the first item."""
    # the first readable item's (one unreadable image first made the file as wide as the vectors alone)
    probe = next(iter_outputs(model, catalog, items[:1], device, 1, 0, image_cache, trunk_cache, start, heads), None)
    if probe is None and len(items) > 1:
        probe = next(iter_outputs(model, catalog, items[1:], device, 1, 0, image_cache, trunk_cache, start, heads), None)
    if probe is None:
        return {"vectors": model.config.embed_dim}
    return {name: values.shape[1] for name, values in output_columns(probe).items()}


def write_rows(f, o: Outputs, rows: np.ndarray) -> None:
    """One batch's outputs into the work file's ``rows`` (increasing; one per output row)."""
    values = np.concatenate(list(output_columns(o).values()), axis=1)
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # contiguous: one slice
        f["outputs"][int(rows[0]):int(rows[-1]) + 1], f["ok"][int(rows[0]):int(rows[-1]) + 1] = values, True
    else:
        f["outputs"][rows], f["ok"][rows] = values, True


def copy_reused(f, reuse: Reuse, rows: np.ndarray, done: int, block: int = 4096) -> np.ndarray:
    """Write the rows of ``reuse``'s file that the items from ``done`` on can take (``rows``: each
    one's row there, -1 for none) into the work file ``f``; returns ``rows`` with -1 where the file
    could not give them after all (then they are computed)."""
    columns = json.loads(f.attrs["columns"])
    for first in range(0, len(rows), block):
        at = np.flatnonzero(rows[first:first + block] >= 0)
        values = reuse.read(rows[first + at], columns) if len(at) else None
        if values is None:
            rows[first:first + block] = -1
            continue
        f["outputs"][done + first + at], f["ok"][done + first + at] = values, True
    return rows


def embed_shard(model, catalog: Catalog, items: list[Item], path: Path, dims: dict, meta: dict, device,
                heads: bool, batch_size=64, workers=None, image_cache=None, trunk_cache=None, start=0,
                reuse: Reuse | None = None) -> int:
    """Fill (or resume) the work file ``path`` with the outputs of ``items``; a finished one is left as
    it is. Items whose rows ``reuse`` holds are copied from it; the others computed, in order (a
    resumed run's prefix ``done`` is complete, the copies after it are made again). Returns the
    number of images copied."""
    f, done = open_partial(path, len(items), dims, meta, items_digest(items))
    if done == len(items):
        f.close()
        logger.info("%s is finished; not recomputed", path)
        return 0
    bad: list[str] = []
    began = time.perf_counter()
    with f, tqdm(total=len(items), initial=done, unit="img", desc=f"embed {path.name}") as bar:
        rows = reuse.rows(items[done:]) if reuse is not None else np.full(len(items) - done, -1)
        if (rows >= 0).any():
            rows = copy_reused(f, reuse, rows, done)
        todo = np.flatnonzero(rows < 0)  # positions after done to compute
        copied = len(rows) - len(todo)
        f.attrs["done"] = done + (int(todo[0]) if len(todo) else len(rows))  # copies before the first computed
        f.flush()
        for o in iter_outputs(model, catalog, [items[done + i] for i in todo], device, batch_size, workers,
                              image_cache, trunk_cache, start, heads, bad):
            write_rows(f, o, done + todo[o.positions])
            later = todo[o.positions[-1] + 1] if o.positions[-1] + 1 < len(todo) else len(rows)
            f.attrs["done"] = done + int(later)  # what lies before the next one to compute is complete
            f.flush()  # on disk now: a killed process resumes from here
            bar.n = f.attrs["done"]
            bar.set_postfix(img_s=f"{(bar.n - done - copied) / (time.perf_counter() - began):.1f}")
            bar.update(0)
        f.attrs["done"] = len(items)
    if bad:
        logger.warning("%d unreadable images skipped: %s", len(bad), ", ".join(bad[:10]))
    return copied


def open_reuse(path: Path | None, meta: dict, standardise: bool) -> Reuse | None:
    """``Reuse`` of the earlier embeddings file ``path`` for this job, or None (said why) when none of
    its rows can be copied."""
    if path is None or not Path(path).is_file():
        return None
    if standardise:
        logger.info("Not reusing %s: its vectors were standardised together; computing every image", path)
        return None
    earlier = Reuse(path, meta)
    if earlier.why_not:
        logger.info("Not reusing %s: %s; computing every image", path, earlier.why_not)
        return None
    return earlier


def is_whole(earlier: Reuse, items: list[Item], meta: dict) -> bool:
    """Whether ``earlier``'s file is what embedding ``items`` would write: every image unchanged and
    in the same order under the same row ids, none skipped, the same catalog folder and split."""
    f = earlier.file
    return (len(earlier.row_of) == len(items) and np.array_equal(earlier.rows(items), np.arange(len(items)))
            and np.array_equal(f["ids"][:], [it.row_id for it in items])
            and all(decode_attr(k, f.attrs.get(k)) == meta[k] for k in ("catalog", "split"))
            and decode_attr("skipped", f.attrs.get("skipped", "[]")) == [])


def agreed_shard_count(out: Path, n: int, shards: int | None, world: int) -> int:
    """The shard count, decided by rank 0 (which may find work files of an earlier run) for all ranks."""
    count = [shard_count(out, n, shards, world) if world == 1 or dist.get_rank() == 0 else None]
    if world > 1:
        dist.broadcast_object_list(count, src=0)
    return count[0]


def embed_catalog(model, catalog: Catalog, out: Path, meta: dict, device, heads: bool, standardise: bool,
                  batch_size=64, workers=None, image_cache=None, trunk_cache=None, start=0, split="all",
                  shards: int | None = None, merge_only: bool = False, reuse: Path | None = None) -> dict | None:
    """Embed the catalog's items into ``out``: this rank's shards (all of them without torchrun),
    then, on rank 0 once every rank is done, the merge. ``merge_only`` computes nothing and merges
    finished shards. ``reuse``: an earlier embeddings file whose rows of unchanged images are copied
    (``embed.reuse``; not for a standardised file, whose rows the merge transforms together).
    Returns the file's attributes on rank 0, None on the other ranks."""
    items = catalog.split_items(split)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    count = agreed_shard_count(out, len(items), shards, world)
    if merge_only and out.is_file() and not any(shard_path(out, i, count).exists() for i in range(count)):
        raise ValueError(f"{out} is complete (its shards were merged and removed): nothing to merge")
    mine = [] if merge_only else list(range(rank, count, world))
    earlier = open_reuse(reuse, meta, standardise) if mine else None
    if earlier is not None and world == 1 and same_file(reuse, out) and is_whole(earlier, items, meta) \
            and not any(shard_path(out, i, count).exists() for i in range(count)):
        earlier.close()  # every image unchanged, in the same order under the same rows, none skipped
        logger.info("%s is up to date (the same model, options, catalog and images): left as it was", out)
        with open_h5(out, "r") as f:
            return {**f.attrs, "unchanged": True}
    if rank >= count and not merge_only:
        logger.warning("Rank %d has no shard: the job has %d (pass --shards to cut it anew)", rank, count)
    if mine:
        dims = output_dims(model, catalog, items, device, image_cache, trunk_cache, start, heads)
        logger.info("Rank %d of %d embeds shard(s) %s of %d", rank, world, mine, count)
        row_bytes = 4 * sum(dims.values())  # float32
        written = sum(p.stat().st_size for i in mine if (p := shard_path(out, i, count)).is_file())
        needed = sum(len(shard_rows(len(items), i, count)) for i in mine) * row_bytes - written
        check_free_space(out.parent, needed + (len(items) * row_bytes if rank == 0 else 0),
                         f"embedding {len(items)} images ({sum(dims.values())} values each: the work files, "
                         f"then {out.name} beside them)")
    copied = 0
    try:
        for i in mine:
            rows = shard_rows(len(items), i, count)
            copied += embed_shard(model, catalog, items[rows.start:rows.stop], shard_path(out, i, count), dims, meta,
                                  device, heads, batch_size, workers, image_cache, trunk_cache, start, earlier)
    finally:
        if earlier is not None:
            earlier.close()
    if earlier is not None:
        logger.info("Copied %d of %d images' rows from %s (unchanged since); computed the others", copied,
                    sum(len(shard_rows(len(items), i, count)) for i in mine), reuse)
    if world > 1:
        dist.barrier()  # every shard is finished
    if rank != 0:
        return None
    return merge_shards(out, items, meta, count, standardize if standardise else None)
