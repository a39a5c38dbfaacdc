"""Build an IndexStore from embedding arrays (read from EMB.h5 by ``retrieval.data.embfile``)."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from indexer.index import build_index
from indexer.store import IndexStore

logger = logging.getLogger(__name__)

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
        emb: {vectors, ids, paths, groups {name: array}, attrs}, e.g. ``retrieval.data.embfile.read_embeddings(p).as_dict()``.
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
