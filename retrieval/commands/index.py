"""``retrieval index build|add|remove``: keep the catalog's FAISS index directory up to date."""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from retrieval.atomic import hold_lock
from retrieval.data.catalog import read_catalog
from retrieval.data.embfile import (SHARED_VIEW_READS, index_view_power, multi_label_view_power, shared_view_name,
                                    shared_view_rows)

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval index", description=(
        "Build a FAISS index directory from embeddings (a 'shared' view plus one 'group-<name>' view per "
        "group), or add new / remove withdrawn products without a full rebuild."))
    sub = p.add_subparsers(dest="action", required=True, metavar="build|add|remove")
    build = sub.add_parser("build", help="build INDEX_DIR from EMB.h5 (written beside, renamed into place)")
    build.add_argument("--embeddings", required=True, metavar="EMB.h5")
    build.add_argument("--out", required=True, metavar="INDEX_DIR")
    build.add_argument("--type", default="flat", choices=("flat", "ivf", "hnsw", "ivfpq"))
    build.add_argument("--catalog", metavar="DIR", help="catalog for titles and labels (default: the one embedded)")
    build.add_argument("--gpu", choices=("auto", "on", "off"), default="auto",
                       help="build on the GPU when faiss sees one (auto)")
    build.add_argument("--shared-view", choices=SHARED_VIEW_READS, default="file",
                       help="what the shared view indexes: 'file', the embeddings' vectors as written (the model's "
                            "--shared-view, matches by default); 'embedding', the shared embedding alone "
                            "(its first embedding_dim columns): 256 wide instead of 256 + the labels, without "
                            "embedding again. Search by photo follows the index's choice; 'add' keeps it")
    build.add_argument("--skip-unchanged", action="store_true",
                       help="leave INDEX_DIR as it is when it already holds what this build would write (the same "
                            "model, options, images, labels, titles and vectors): no rewrite, no server reload "
                            "(scripts/rebuild_index.sh passes it)")
    build.add_argument("--group-codec", choices=("fp16", "8bit"), default="fp16",
                       help="how group views store their values, searched exactly: fp16 (2 bytes a value, "
                            "default) or 8bit (1 byte; mAP@50 within 0.5 points on the development catalogue)")
    add = sub.add_parser("add", help="add the products of EMB.h5 that the index does not hold yet, and update "
                                     "those it holds whose labels, title or photo changed")
    add.add_argument("--index", required=True, metavar="INDEX_DIR")
    add.add_argument("--embeddings", required=True, metavar="EMB.h5")
    add.add_argument("--catalog", metavar="DIR", help="catalog for titles and labels (default: the one embedded)")
    remove = sub.add_parser("remove", help="remove withdrawn products by catalog image path or item id (as in /items/ID)")
    remove.add_argument("--index", required=True, metavar="INDEX_DIR")
    remove.add_argument("--paths", nargs="*", default=[], metavar="IMAGE", help="image paths as in labels.csv")
    remove.add_argument("--ids", nargs="*", type=int, default=[], metavar="ID", help="item ids (as in /items/ID)")
    return p


def item_metadata(paths: list[str], attrs: dict, catalog_dir: str | None) -> tuple[list[str], dict[str, list[tuple]]]:
    """Titles and labels of the embedded items, looked up in the catalog by image path."""
    root = catalog_dir or attrs.get("catalog")
    if not root:
        raise ValueError("the embeddings do not name their catalog; pass --catalog DIR")
    catalog = read_catalog(root, check_files=False)
    by_image = catalog.by_image()
    missing = [p for p in paths if p not in by_image]
    if missing:
        raise ValueError(f"{len(missing)} embedded images are not in {root}/labels.csv, e.g. {missing[:3]}")
    items = [by_image[p] for p in paths]
    labels = {g: [it.labels[g] for it in items] for g in catalog.groups}
    return [it.title for it in items], labels


def vector_source(reader, shared_view: str = "file", ids: np.ndarray | None = None):
    """An indexer VectorSource reading the views of an open EMB.h5 (BlockReader) block by block; its
    shared view as ``shared_view`` says (``embfile.shared_view_rows``); its items' ids the file's
    (row ids) unless ``ids`` are given."""
    from indexer import VectorSource

    dataset = {"shared": "vectors", **{f"group-{name[len('groups/'):]}": name for name in reader.dims
                                       if name.startswith("groups/")}}

    def read(view: str, start: int, stop: int) -> np.ndarray:
        rows = reader.rows(dataset[view], start, stop)
        return shared_view_rows(rows, reader.attrs, shared_view) if view == "shared" else rows

    dims = {view: reader.dims[name] for view, name in dataset.items()}
    dims["shared"] = read("shared", 0, 1).shape[1] if len(reader.ids) else dims["shared"]
    return VectorSource(reader.ids if ids is None else ids, dims, read)


def store_reading(shared_view: str | None, path, attrs: dict) -> str:
    """How ``add`` reads new rows of the file at ``path`` (attributes ``attrs``) for an index whose
    sidecar says ``shared_view``: the embedding alone for an index of it, the file's vectors otherwise
    (the index's dimension check refuses another width). One model's files can hold different joined
    views of the same width (``embed --shared-view``): such a file is refused, not mixed in."""
    if shared_view == "embedding":
        return "embedding"
    own = shared_view_name(attrs)
    if shared_view is not None and own != shared_view:
        raise ValueError(f"{path}: its shared view is {own!r}, the index's is {shared_view!r}; embed it with "
                         f"'retrieval embed --shared-view {shared_view}' or build the index again from it")
    return "file"


def check_group_views(store_power: float | None, path, attrs: dict) -> None:
    """Refuse to add rows whose multi-label group views were scaled by another rule than the index's
    (``embfile.group_vectors``: files embedded before 2026-11-29 hold them at unit length, power 1):
    their scores would not compare. An index that records no power and is asked to take such groups
    was built from files that predate the record, so it holds the cosine's."""
    own = multi_label_view_power(attrs)
    if own is None:
        return
    theirs = index_view_power(store_power)
    if own != theirs:
        raise ValueError(f"{path}: its multi-label groups' views are divided by their length to the power {own:g}, "
                         f"the index's to the power {theirs:g} (embedded by another version); build the index "
                         f"again from it (scripts/rebuild_index.sh)")


def new_items(paths: list[str], held_paths: list[str], next_id: int,
              retired: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows of an embeddings file whose image the index does not hold, the ids they get there). An
    image is the item (a catalogue's rows move when rows are inserted, sorted or removed, so a file's
    row ids name other images than the index's did): one the index held before takes the id it had
    there (``retired``: a re-listed product's old links work again); the others are numbered from
    ``next_id``, above every id the index ever gave, so a withdrawn product's id never names another one."""
    held = set(held_paths)
    new = [i for i, path in enumerate(paths) if path not in held]
    fresh = iter(range(next_id, next_id + len(new)))
    ids = [retired[paths[i]] if paths[i] in retired else next(fresh) for i in new]
    return np.array(new, dtype=np.int64), np.array(ids, dtype=np.int64)


def kept_ids(paths: list[str], ids: np.ndarray, index_dir: Path) -> tuple[np.ndarray, int | None, dict[str, int]]:
    """(the ids a new build of ``index_dir`` gives an embeddings file's rows, the id it numbers later
    items from, its retired record): an image the index there holds keeps its id (yesterday's links to
    /items/ID name the same product), one it held before takes that id again and a new one the next id
    the index never gave (``new_items``); the images it holds that the file lacks are retired with their
    ids, beside those retired before and not back. Row ids and no record where no index is there, or
    where it cannot be read (said: it is being replaced anyway)."""
    from indexer import IndexStore

    try:  # (read_items finishes a swap killed between its renames: its index is the one replaced)
        before, next_id, retired = IndexStore.read_items(index_dir)
    except (OSError, ValueError) as err:
        try:  # a malformed retired record alone: every held image keeps its id all the same
            before, next_id, retired = IndexStore.read_items(index_dir, ignore_retired=True)
        except (OSError, ValueError):
            if (index_dir / "sidecar.json").is_file():  # no index there (a first build) goes unsaid
                logger.warning("%s cannot be read (%s): the new index numbers its items by catalog row, so links "
                               "to the old one's items may name other products", index_dir, err)
            return np.asarray(ids, dtype=np.int64), None, {}
        logger.warning("%s (%s): the new index keeps every image's id there, but products withdrawn before come "
                       "back under new ids", index_dir, err)
    held_paths = before.paths.tolist()
    out = np.full(len(paths), -1, dtype=np.int64)
    held, held_ids = held_items(paths, held_paths, before.ids)
    out[held] = held_ids
    new, new_ids = new_items(paths, held_paths, next_id, retired)
    out[new] = new_ids
    listed = set(paths)
    retired = {path: i for path, i in retired.items() if path not in listed}
    retired.update((path, i) for path, i in zip(held_paths, before.ids.tolist()) if path not in listed)
    return out, next_id, retired


def up_to_date(index_dir: Path, reader, args, titles: list[str], labels: dict[str, list[tuple]]) -> bool:
    """Whether the index at ``index_dir`` already holds what building it from ``reader`` with ``args``
    would write: the same fingerprint, index type, shared view, group codec and view rule, the same
    views, groups and images, and no image whose title, labels or vectors differ (``changed_items``)."""
    from indexer import IndexStore
    from indexer.index import MIN_TRAIN_ITEMS, group_codec

    # the type the build would make: IVF and IVF-PQ below MIN_TRAIN_ITEMS build flat
    kind = "flat" if args.type in ("ivf", "ivfpq") and len(reader.paths) < MIN_TRAIN_ITEMS else args.type
    try:
        store = IndexStore.load(index_dir)
    except (OSError, ValueError):
        return False  # none there, or rebuilt, which names what is wrong if it still is
    held_paths = store.paths
    views = {"shared", *(f"group-{n[len('groups/'):]}" for n in reader.dims if n.startswith("groups/"))}
    same = (store.fingerprint == str(reader.attrs.get("fingerprint", "")) and store.index_type == kind
            and store.shared_view == shared_view_name(reader.attrs, args.shared_view)
            and group_codec(store.views) in (args.group_codec, None)
            and store.multi_label_view_power == multi_label_view_power(reader.attrs)
            and set(store.views) == views and set(store.vocabulary()) == set(labels)
            and len(store) == len(reader.paths) and set(held_paths) == set(reader.paths))
    if not same:
        return False
    rows, ids = held_items(reader.paths, held_paths, store.ids)
    source = vector_source(reader, store_reading(store.shared_view, reader.path, reader.attrs))
    return not len(changed_items(store, source, rows, ids, [titles[i] for i in rows], {g: [v[i] for i in rows]
                                                                                      for g, v in labels.items()}))


def held_items(paths: list[str], held_paths: list[str], held_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of an embeddings file whose image the index holds, their ids there)."""
    by_path = dict(zip(held_paths, held_ids.tolist()))
    rows = np.array([i for i, path in enumerate(paths) if path in by_path], dtype=np.int64)
    return rows, np.array([by_path[paths[i]] for i in rows], dtype=np.int64)


def changed_items(store, source, rows: np.ndarray, ids: np.ndarray, titles: list[str],
                  labels: dict[str, list[tuple]], block: int = 65536) -> np.ndarray:
    """Positions in ``rows`` (file rows of images the index holds, ``ids`` theirs there; ``titles`` and
    ``labels`` theirs in the catalog now) whose title, labels or vectors differ from the index's: a
    label corrected, a photo shot again under its name. A group the index has and the catalog lost
    counts as unlabelled; one the catalog gained is not compared (the index cannot filter by it)."""
    differ = np.zeros(len(rows), dtype=bool)
    for start in range(0, len(rows), block):
        part = slice(start, start + block)
        for k, item in enumerate(store.items_by_id(ids[part]), start):
            differ[k] = (item["title"] or "") != (titles[k] or "") or any(
                sorted(held) != sorted(labels[g][k] if g in labels else ()) for g, held in item["labels"].items())
        differ[part] |= store.unlike(ids[part], {view: source.take(view, rows[part]) for view in store.views})
    return np.flatnonzero(differ)


HELD_BY_PARENT = "RETRIEVAL_INDEX_LOCK"  # set by scripts/rebuild_index.sh for its steps: the lock it holds


@contextmanager
def index_lock(index: Path):
    """Hold the index's update lock (``.INDEX_DIR.lock`` beside it, the one scripts/rebuild_index.sh
    holds) while ``build``, ``add`` or ``remove`` reads, changes and saves it: two at once each read
    the same index and the last save dropped the other's items (or an add saved over a new build).
    Another holder is a ValueError naming it; a step of the rebuild script, whose lock it is
    (``RETRIEVAL_INDEX_LOCK`` names it), goes ahead under it."""
    index = Path(index)
    if index.exists() and not index.is_dir():  # its lock file would go beside it, into a catalog say
        raise ValueError(f"{index} is a file, not an index folder")
    lock = index.parent / f".{index.name}.lock"
    if os.environ.get(HELD_BY_PARENT) and Path(os.environ[HELD_BY_PARENT]).resolve() == lock.resolve():
        yield
        return
    held = hold_lock(lock)
    if isinstance(held, str):
        raise ValueError(f"{index} is being changed by another process (pid {held}: an index build, add or "
                         "remove, or scripts/rebuild_index.sh); try again when it has finished")
    try:
        yield
    finally:
        os.close(held)


def use_gpu(choice: str):
    return {"auto": "auto", "on": True, "off": False}[choice]


def main(argv=None) -> int:
    from indexer import IndexStore, build_store
    from indexer.persist import check_replaceable
    from retrieval.data.embfile import BlockReader

    args = get_args_parser().parse_args(argv)
    if args.action == "build":
        check_replaceable(Path(args.out))  # before reading anything: a folder of other files is never replaced
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with index_lock(Path(args.out)), BlockReader(args.embeddings) as reader:
            titles, labels = item_metadata(reader.paths, reader.attrs, args.catalog)
            if args.skip_unchanged and up_to_date(Path(args.out), reader, args, titles, labels):
                print(f"{args.out} is up to date with {args.embeddings} (the same model, options, images, labels "
                      "and vectors): left as it was")
                return 0
            ids, next_id, retired = kept_ids(reader.paths, reader.ids, Path(args.out))
            store = build_store(vector_source(reader, args.shared_view, ids), reader.paths, args.type, titles, labels,
                                fingerprint=str(reader.attrs.get("fingerprint", "")),
                                group_codec=args.group_codec, use_gpu=use_gpu(args.gpu),
                                shared_view=shared_view_name(reader.attrs, args.shared_view),
                                multi_label_view_power=multi_label_view_power(reader.attrs), next_id=next_id,
                                retired=retired)  # the images the index held and this build leaves out
            store.save(args.out)
        print(f"Built {args.out}: {len(store)} items, {store.index_type}, views {', '.join(store.views)} "
              f"(shared: {store.shared_view}, {store.views['shared'].d}-d)")
    elif args.action == "add":
        with index_lock(args.index), BlockReader(args.embeddings) as reader:
            store = IndexStore.load(args.index, expect_fingerprint=str(reader.attrs.get("fingerprint", "")))
            held_paths = store.paths  # every item's path, made once
            new, ids = new_items(reader.paths, held_paths, store.next_id, store.retired)
            back = sum(reader.paths[i] in store.retired for i in new)
            held, held_ids = held_items(reader.paths, held_paths, store.ids)
            titles, labels = item_metadata([reader.paths[i] for i in np.concatenate([new, held])], reader.attrs,
                                           args.catalog)
            extra = [g for g in labels if g not in store.vocabulary()]
            if extra:  # a column the catalog gained since the build: the index has no filter for it
                logger.warning("the catalog's group(s) %s are not in the index (built before they were added): "
                               "left out of the new items; build the index again to filter by them "
                               "(scripts/rebuild_index.sh)", ", ".join(map(repr, extra)))
                labels = {g: v for g, v in labels.items() if g not in extra}
            source = vector_source(reader, store_reading(store.shared_view, args.embeddings, reader.attrs))
            check_group_views(store.multi_label_view_power, args.embeddings, reader.attrs)
            n = len(new)
            changed = changed_items(store, source, held, held_ids, titles[n:], {g: v[n:] for g, v in labels.items()})
            if len(changed):  # taken out and put back under their ids: links to them keep working
                store.remove(held_ids[changed])
            rows = np.concatenate([new, held[changed]])
            picked = np.concatenate([np.arange(n), n + changed])
            if len(rows):
                store.add({view: source.take(view, rows) for view in store.views},
                          np.concatenate([ids, held_ids[changed]]), [reader.paths[i] for i in rows],
                          [titles[i] for i in picked], {g: [v[i] for i in picked] for g, v in labels.items()})
                store.save(args.index)
        if not len(rows):
            print(f"Nothing to add or update: {args.index} holds every image of {args.embeddings} as it is "
                  f"({len(store)} items); left as it was")
        else:
            returned = f" ({back} withdrawn before, back under their ids)" if back else ""
            print(f"Added {n} items to {args.index}{returned} and updated {len(changed)} (a label, title or photo "
                  f"changed); it now holds {len(store)}")
    else:
        with index_lock(args.index):
            if not args.paths and not args.ids:
                raise ValueError("nothing to remove: give --paths or --ids")
            store = IndexStore.load(args.index)
            held_ids = store.ids.tolist()
            by_path, held = dict(zip(store.paths, held_ids)), set(held_ids)
            gone = [p for p in args.paths if p not in by_path] + [str(i) for i in args.ids if i not in held]
            if gone:  # removed before (a day's list run again), or never there: said, not an error
                logger.warning("%d of the paths / ids given are not in %s (removed before, or never added): %s%s",
                               len(gone), args.index, ", ".join(gone[:10]), ", ..." if len(gone) > 10 else "")
            ids = sorted({i for i in args.ids if i in held} | {by_path[p] for p in args.paths if p in by_path})
            if ids:
                store.remove(ids)
                store.save(args.index)
        print(f"Removed {len(ids)} items from {args.index}; it now holds {len(store)}"
              + ("" if ids else " (left as it was)"))
    return 0
