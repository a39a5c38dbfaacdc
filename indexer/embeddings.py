"""Read the embeddings HDF5 file (docs/formats.md) and build an IndexStore from it."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from indexer.index import build_index
from indexer.store import IndexStore

logger = logging.getLogger(__name__)

REQUIRED_DATASETS = ("vectors", "ids", "paths")
JSON_ATTRS = ("groups", "skipped")


def decode_attr(name: str, value):
    """Return an HDF5 attribute as plain Python: str for bytes, lists for the JSON-list attributes."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    if name in JSON_ATTRS and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_datasets(f: h5py.File, path: Path) -> dict:
    """Return vectors, ids, paths and groups from an open embeddings file, checking their shapes."""
    missing = [name for name in REQUIRED_DATASETS if name not in f]
    if missing:
        raise ValueError(f"Embeddings file {path} lacks dataset(s) {', '.join(missing)}; "
                         f"it has: {', '.join(f.keys()) or 'nothing'}")
    vectors = np.asarray(f["vectors"][...], dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"Embeddings file {path}: dataset 'vectors' must be 2-D, has shape {vectors.shape}")
    ids = np.asarray(f["ids"][...], dtype=np.int64).reshape(-1)
    paths = [str(p) for p in f["paths"].asstr()[...]]
    groups = {name: np.asarray(ds[...], dtype=np.float32) for name, ds in f.get("groups", {}).items()}
    for name, arr in {"ids": ids, "paths": paths, **{f"groups/{g}": a for g, a in groups.items()}}.items():
        if len(arr) != len(vectors):
            raise ValueError(f"Embeddings file {path}: dataset {name!r} has {len(arr)} rows, "
                             f"'vectors' has {len(vectors)}")
    return {"vectors": vectors, "ids": ids, "paths": paths, "groups": groups}


def read_embeddings(path) -> dict:
    """Return {vectors, ids, paths, groups {name: array}, attrs} from an embeddings HDF5 file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Embeddings file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"Cannot read embeddings file {path} as HDF5: {err}") from err
    with f:
        emb = read_datasets(f, path)
        emb["attrs"] = {name: decode_attr(name, value) for name, value in f.attrs.items()}
    logger.info("Read %d embeddings of dimension %d from %s", *emb["vectors"].shape, path)
    return emb


def align_to_ids(values, ids: np.ndarray, default, name: str) -> list | None:
    """Return values in ids order: a sequence must already be aligned, a mapping is looked up by id."""
    if values is None:
        return None
    if isinstance(values, Mapping):
        return [values.get(int(i), default) for i in ids]
    values = list(values)
    if len(values) != len(ids):
        raise ValueError(f"{name} has {len(values)} entries for {len(ids)} embeddings")
    return values


def build_store_from_embeddings(emb: dict, index_type: str = "flat", titles=None, labels=None, *,
                                use_gpu="auto", **build_kwargs) -> IndexStore:
    """Build an IndexStore with a "shared" view and a "group-<name>" view per group in emb.

    Args:
        emb: the dict read_embeddings returns.
        index_type: flat, ivf, hnsw or ivfpq, used for every view.
        titles: per-item titles, aligned with emb["ids"] or a mapping {id: title}.
        labels: {group: per-item label lists}, each aligned with emb["ids"] or a mapping {id: [labels]}.
        use_gpu, build_kwargs: passed to build_index (nlist, m_hnsw, pq_m, nprobe, ef_search, ...).
    """
    ids = emb["ids"]
    views = {"shared": emb["vectors"], **{f"group-{g}": x for g, x in emb.get("groups", {}).items()}}
    built = {}
    for view, vectors in views.items():
        logger.info("Building %s view (%s, %d x %d)", view, index_type, *vectors.shape)
        built[view] = build_index(vectors, ids, index_type, use_gpu=use_gpu, unit_norm=view == "shared",
                                  **build_kwargs)
    labels = {g: align_to_ids(v, ids, [], f"labels[{g!r}]") for g, v in (labels or {}).items()}
    return IndexStore(built, ids, emb["paths"], align_to_ids(titles, ids, "", "titles"), labels,
                      fingerprint=str(emb.get("attrs", {}).get("fingerprint", "")), use_gpu=use_gpu)
