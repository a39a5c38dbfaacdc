"""Shards of an embedding job and their merge into EMB.h5.

The catalog's rows are cut into K contiguous shards (shard i = rows i·N//K up to (i+1)·N//K), each a
resumable work file beside the output (``EMB.h5.partial`` when K = 1, else
``EMB.h5.partial-0000i-of-0000K``). Torchrun's ranks take shards i = rank, rank + world, ...; the
merge concatenates the shards' readable rows in shard order, which is catalog order, into the one
file a single process writes. Memory while merging: ``MERGE_BLOCK`` rows of the work file
(8192 x its width x 4 bytes: 64 MB at 24 groups of 35 labels), plus the shared vectors whole when
they are standardised over the set."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np

from retrieval.atomic import remove_stale_temporaries, temporary_path
from retrieval.data.catalog import Item, items_digest
from retrieval.data.embfile import STATS, group_name, open_h5, partial_mismatch

logger = logging.getLogger(__name__)

MERGE_BLOCK = 8192  # work-file rows read at a time


def shard_path(out: Path, index: int, count: int) -> Path:
    """The work file of shard ``index`` of ``count`` beside ``out``."""
    return out.with_name(f"{out.name}.partial" + (f"-{index:05d}-of-{count:05d}" if count > 1 else ""))


def shard_rows(n: int, index: int, count: int) -> range:
    """Catalog rows (positions in the job's item list) of shard ``index`` of ``count``."""
    return range(index * n // count, (index + 1) * n // count)


def counts_on_disk(out: Path) -> set[int]:
    """Shard counts of the work files beside ``out``."""
    pattern = re.compile(re.escape(out.name) + r"\.partial(?:-\d{5}-of-(\d{5}))?$")
    found = (pattern.match(p.name) for p in out.parent.iterdir()) if out.parent.is_dir() else ()
    return {int(m[1] or 1) for m in found if m}


def shard_count(out: Path, n: int, requested: int | None, world: int) -> int:
    """Shards of this job: as asked, else those already beside ``out`` (so a rerun at another world
    size resumes them), else one per rank; never more than the rows."""
    if requested is None:
        found = counts_on_disk(out)
        if len(found) > 1:
            raise ValueError(f"{out.parent} holds work files of {out.name} cut into {sorted(found)} shards; "
                             "pass --shards K to choose one, or delete the others")
        requested = found.pop() if found else world
    if requested < 1:
        raise ValueError(f"--shards must be at least 1, got {requested}")
    return max(1, min(requested, n))


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links too, where both exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return a.resolve() == b.resolve()


def not_embeddings(path: Path) -> str | None:
    """Why the existing file ``path`` is not an embeddings file that --out may replace (None when it
    is one: datasets ``vectors`` and ``ids``, as ``check_layout`` reads them; or empty)."""
    if path.stat().st_size == 0:
        return None
    try:
        with open_h5(path, "r") as f:
            if "vectors" in f and "ids" in f:
                return None
            return f"an HDF5 file without datasets vectors and ids; it has: {', '.join(f.keys()) or 'nothing'}"
    except OSError:
        return "not an HDF5 file: a checkpoint, a CSV?"


def check_out(out: Path, others: dict[str, str | Path | None] | None = None) -> None:
    """Refuse an --out that would replace what is not an embeddings file: a folder, one of the
    job's inputs (``others``: {what: path}), or any other existing file that is not EMB.h5. An
    existing embeddings file is replaced (or its work files resumed) as before."""
    for what, other in (others or {}).items():
        if other and same_file(out, Path(other)):
            raise FileExistsError(f"--out {out} is the same file as {what}; give the embeddings a file of their own "
                                  f"(e.g. {out.parent / 'EMB.h5'})")
    if out.is_dir():
        raise FileExistsError(f"{out} is a folder; --out names the embeddings file to write (e.g. {out / 'EMB.h5'})")
    why = not_embeddings(out) if out.exists() else None
    if why:
        raise FileExistsError(f"{out} exists and is not an embeddings file ({why}); embed would replace it: "
                              "choose another --out, or delete the file if it is yours to lose")


def shard_problem(path: Path, n: int, meta: dict, covers: dict) -> str | None:
    """Why shard ``path`` cannot be merged (None when it is finished and made by this job)."""
    if not path.exists():
        return "missing"
    try:
        f = open_h5(path, "r")
    except OSError as err:  # cut short: the run without --merge-only starts it afresh
        return f"unreadable ({err})"
    with f:
        why = partial_mismatch(f, n, meta, covers)
        done = int(f.attrs.get("done", 0))
    return why or (f"unfinished ({done}/{n} rows)" if done < n else None)


def check_shards(out: Path, items: list[Item], meta: dict, count: int) -> None:
    """Refuse to merge unless every shard is finished and was made by this job for these images."""
    problems = []
    for i in range(count):
        rows = shard_rows(len(items), i, count)
        why = shard_problem(shard_path(out, i, count), len(rows), meta, items_digest(items[rows.start:rows.stop]))
        if why:
            problems.append(f"{shard_path(out, i, count).name}: {why}")
    if problems:
        raise ValueError(f"cannot merge the {count} shard(s) of {out}: " + "; ".join(problems)
                         + " (run the same embed command again, without --merge-only, to finish them)")


def copy_outputs(shards: list[h5py.File], oks: list[np.ndarray], g: h5py.File) -> None:
    """Every output's readable rows of every shard, in shard order, into its own dataset of ``g``;
    each block of work-file rows is read once."""
    columns = json.loads(shards[0].attrs["columns"])
    total = int(sum(ok.sum() for ok in oks))
    for name, (begin, end) in columns.items():
        g.create_dataset(name, (total, end - begin), dtype="float32")
    at = 0
    for f, ok in zip(shards, oks):
        for first in range(0, len(ok), MERGE_BLOCK):
            block = f["outputs"][first:first + MERGE_BLOCK][ok[first:first + MERGE_BLOCK]]
            for name, (begin, end) in columns.items():
                g[name][at:at + len(block)] = block[:, begin:end]
            at += len(block)


def merge_shards(out: Path, items: list[Item], meta: dict, count: int, transform=None) -> dict:
    """Write EMB.h5 from the finished shards (readable rows only, catalog order) atomically, then
    delete them; ``transform`` (e.g. standardisation) applies to the shared vectors. Returns the
    file's attributes."""
    check_shards(out, items, meta, count)
    check_out(out)  # again: a file may have been put there while the shards were computed
    paths = [shard_path(out, i, count) for i in range(count)]
    remove_stale_temporaries(out.parent)
    tmp = temporary_path(out)
    try:
        with ExitStack() as stack:
            shards = [stack.enter_context(open_h5(p, "r")) for p in paths]
            g = stack.enter_context(open_h5(tmp, "w"))
            ok = np.concatenate(oks := [f["ok"][:] for f in shards])
            copy_outputs(shards, oks, g)
            if transform is not None:
                g["vectors"][...] = transform(g["vectors"][:])
            g.create_dataset("ids", data=np.array([it.row_id for it in items], dtype=np.int64)[ok])
            g.create_dataset("paths", data=[it.image for it, k in zip(items, ok) if k], dtype=h5py.string_dtype())
            if all(it.stat for it in items):  # what a later embedding may copy rows by (embed.reuse)
                g.create_dataset(STATS, data=np.array([it.stat for it, k in zip(items, ok) if k],
                                                      dtype=np.int64).reshape(-1, 2))
            groups = sorted(group_name(k) for k in g["groups"].keys()) if "groups" in g else []
            attrs = {**meta, "dimension": int(g["vectors"].shape[1]), "count": int(ok.sum()),
                     "created": dt.datetime.now(dt.timezone.utc).isoformat(), "groups": json.dumps(groups),
                     "skipped": json.dumps([it.image for it, k in zip(items, ok) if not k])}
            g.attrs.update(attrs)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for p in paths:
        p.unlink()
    logger.info("Merged %d shard(s) into %s: %d rows", count, out, attrs["count"])
    return attrs
