"""Build an IndexStore from embeddings: in blocks from a VectorSource (EMB.h5 through
``retrieval.data.embfile.BlockReader``), or from in-memory arrays."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from indexer.build import build_group_view, build_view
from indexer.source import VectorSource
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


def build_store(source: VectorSource, paths, index_type: str = "flat", titles=None, labels=None, *,
                fingerprint: str = "", group_codec: str = "fp16", use_gpu="auto", shared_view: str | None = None,
                multi_label_view_power: float | None = None, next_id: int | None = None,
                retired: dict[str, int] | None = None,
                **build_kwargs) -> IndexStore:
    """Build an IndexStore with the "shared" view of index_type and an exact compact view per group.

    Args:
        source: the vectors of every view ("shared", "group-<name>"), read block by block.
        paths: per-item image paths, aligned with source.ids.
        titles: per-item titles, aligned with source.ids or a mapping {id: title}.
        labels: {group: per-item label lists}, each aligned with source.ids or a mapping {id: [labels]}.
        group_codec: how group views store their values: fp16 (2 bytes) or 8bit (1 byte).
        shared_view: what the shared view's vectors are (as the embeddings name it), kept in the sidecar.
        multi_label_view_power: how the embeddings scaled their multi-label group views, kept in the sidecar.
        next_id: the id new items are numbered from (above every id the index this build replaces gave).
        retired: {image path: id} of the images the index this build replaces held and this one leaves out.
        use_gpu, build_kwargs: passed to build_view (nlist, m_hnsw, pq_m, nprobe, ef_search, ...).
    """
    ids = source.ids
    built = {}
    for view, dim in source.dims.items():
        if view == "shared":
            logger.info("Building the shared view (%s, %d x %d)", index_type, len(ids), dim)
            # the embeddings' "matches" shared view ranks by a plain inner product (embfile.shared_vectors)
            built[view] = build_view(source, view, index_type, use_gpu=use_gpu, unit_length=shared_view != "matches",
                                     **build_kwargs)
        else:
            logger.info("Building %s (exact, %s, %d x %d)", view, group_codec, len(ids), dim)
            built[view] = build_group_view(source, view, group_codec)
    labels = {g: align_to_ids(v, ids, [], f"labels[{g!r}]") for g, v in (labels or {}).items()}
    return IndexStore(built, ids, paths, align_to_ids(titles, ids, "", "titles"), labels,
                      fingerprint=fingerprint, use_gpu=use_gpu, shared_view=shared_view,
                      multi_label_view_power=multi_label_view_power, next_id=next_id, retired=retired)


def build_store_from_embeddings(emb: dict, index_type: str = "flat", titles=None, labels=None, **kwargs) -> IndexStore:
    """Build an IndexStore from in-memory arrays {vectors, ids, paths, groups {name: array}, attrs}
    (``retrieval.data.embfile.read_embeddings(p).as_dict()``); kwargs as build_store takes them."""
    views = {"shared": emb["vectors"], **{f"group-{g}": x for g, x in emb.get("groups", {}).items()}}
    source = VectorSource.from_arrays(views, emb["ids"])
    attrs = emb.get("attrs", {})
    kwargs.setdefault("shared_view", attrs.get("shared_view"))
    kwargs.setdefault("multi_label_view_power", attrs.get("multi_label_view_power"))
    return build_store(source, emb["paths"], index_type, titles, labels,
                       fingerprint=str(attrs.get("fingerprint", "")), **kwargs)
