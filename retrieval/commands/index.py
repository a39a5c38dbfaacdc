"""``retrieval index build|add|remove``: keep the catalog's FAISS index directory up to date."""
from __future__ import annotations

import argparse

import numpy as np

from retrieval.data.catalog import read_catalog


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
    add = sub.add_parser("add", help="add the products of EMB.h5 that the index does not hold yet")
    add.add_argument("--index", required=True, metavar="INDEX_DIR")
    add.add_argument("--embeddings", required=True, metavar="EMB.h5")
    add.add_argument("--catalog", metavar="DIR", help="catalog for titles and labels (default: the one embedded)")
    remove = sub.add_parser("remove", help="remove withdrawn products by catalog image path or row id")
    remove.add_argument("--index", required=True, metavar="INDEX_DIR")
    remove.add_argument("--paths", nargs="*", default=[], metavar="IMAGE", help="image paths as in labels.csv")
    remove.add_argument("--ids", nargs="*", type=int, default=[], metavar="ID", help="catalog row ids")
    return p


def item_metadata(emb: dict, catalog_dir: str | None) -> tuple[list[str], dict[str, list[list[str]]]]:
    """Titles and labels of the embedded items, looked up in the catalog by image path."""
    root = catalog_dir or emb["attrs"].get("catalog")
    if not root:
        raise ValueError("the embeddings do not name their catalog; pass --catalog DIR")
    catalog = read_catalog(root, check_files=False)
    by_image = catalog.by_image()
    missing = [p for p in emb["paths"] if p not in by_image]
    if missing:
        raise ValueError(f"{len(missing)} embedded images are not in {root}/labels.csv, e.g. {missing[:3]}")
    items = [by_image[p] for p in emb["paths"]]
    labels = {g: [list(it.labels[g]) for it in items] for g in catalog.groups}
    return [it.title for it in items], labels


def use_gpu(choice: str):
    return {"auto": "auto", "on": True, "off": False}[choice]


def main(argv=None) -> int:
    from indexer import IndexStore, build_store_from_embeddings
    from retrieval.data.embfile import read_embeddings

    args = get_args_parser().parse_args(argv)
    if args.action == "build":
        emb = read_embeddings(args.embeddings).as_dict()
        titles, labels = item_metadata(emb, args.catalog)
        store = build_store_from_embeddings(emb, args.type, titles, labels, use_gpu=use_gpu(args.gpu))
        store.save(args.out)
        print(f"Built {args.out}: {len(store)} items, {store.index_type}, views {', '.join(store.views)}")
    elif args.action == "add":
        emb = read_embeddings(args.embeddings).as_dict()
        store = IndexStore.load(args.index, expect_fingerprint=str(emb["attrs"].get("fingerprint", "")))
        new = np.flatnonzero(~np.isin(emb["ids"], store.ids)).tolist()  # one sorted pass, not a set per row
        titles, labels = item_metadata(emb, args.catalog)
        views = {"shared": emb["vectors"][new], **{f"group-{g}": v[new] for g, v in emb["groups"].items()
                                                   if f"group-{g}" in store.views}}
        store.add(views, emb["ids"][new], [emb["paths"][i] for i in new], [titles[i] for i in new],
                  {g: [v[i] for i in new] for g, v in labels.items()})
        store.save(args.index)
        print(f"Added {len(new)} items to {args.index}; it now holds {len(store)}")
    else:
        store = IndexStore.load(args.index)
        by_path = dict(zip(store.paths, store.ids.tolist()))
        unknown = [p for p in args.paths if p not in by_path]
        if unknown:
            raise KeyError(f"not in the index: {', '.join(unknown[:10])}")
        ids = sorted(set(args.ids) | {by_path[p] for p in args.paths})
        if not ids:
            raise ValueError("nothing to remove: give --paths or --ids")
        store.remove(ids)
        store.save(args.index)
        print(f"Removed {len(ids)} items from {args.index}; it now holds {len(store)}")
    return 0
