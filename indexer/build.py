"""Build views from a VectorSource in blocks: the shared view trained on a sample and filled block by
block (the corpus is never held twice), group views stored compactly and searched exactly."""
from __future__ import annotations

import logging

import faiss
import numpy as np

from indexer.index import (GPU_TYPES, GROUP_CODECS, MIN_TRAIN_ITEMS, TRAIN_SAMPLE, EF_CONSTRUCTION, as_ids,
                           as_vectors, check_index_type, make_empty_index, pad_columns, padded_width,
                           set_search_depth, want_gpu, warn_if_not_normalised)
from indexer.source import VectorSource
from indexer.tuning import TARGET_RECALL, TUNE_MARGIN, tune_search_depth

logger = logging.getLogger(__name__)


def training_rows(source: VectorSource, view: str, size: int = TRAIN_SAMPLE, seed: int = 0) -> np.ndarray:
    """Return at most size rows of a view drawn at random (all of them when the view is smaller)."""
    n = len(source)
    rows = np.arange(n) if n <= size else np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    return source.take(view, rows)


def add_blocks(index: faiss.Index, source: VectorSource, view: str, with_ids: bool = True) -> None:
    """Add every block of a view (under the source's ids, or as positions 0..N-1 when not with_ids)."""
    for start, x in source.blocks(view):
        if with_ids:
            index.add_with_ids(x, source.ids[start:start + len(x)])
        else:
            index.add(x)
        logger.debug("%s: %d / %d rows added", view, start + len(x), len(source))


def fill_view(index: faiss.Index, source: VectorSource, view: str, gpu: bool = False) -> faiss.Index:
    """Train (on a sample, when needed) and fill index block by block; IVF work runs on all GPUs when gpu."""
    ivf = isinstance(index, faiss.IndexIVF)
    if gpu and ivf:
        logger.info("Training and filling the IVF index on %d GPU(s)", faiss.get_num_gpus())
        on_gpu = faiss.index_cpu_to_all_gpus(index)
        on_gpu.train(training_rows(source, view))
        add_blocks(on_gpu, source, view)
        index = faiss.index_gpu_to_cpu(on_gpu)
    else:
        if not index.is_trained:
            index.train(training_rows(source, view))
        add_blocks(index, source, view)
    if ivf:
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct/remove by catalog id
    return index


def build_view(source: VectorSource, view: str = "shared", index_type: str = "flat", *, nlist=None, m_hnsw=32,
               pq_m=None, use_gpu="auto", nprobe=None, ef_search=None, ef_construction=EF_CONSTRUCTION,
               target_recall=TARGET_RECALL, unit_length: bool = True) -> faiss.Index:
    """Build an inner-product index of one view under the source's catalog ids; always a CPU index.

    Args:
        source: the vectors (L2-normalised: inner product = cosine, unless ``unit_length`` is False:
            a plain inner product, warned about otherwise) and their catalog ids.
        index_type: flat (exact), ivf, hnsw or ivfpq. ivf/ivfpq below MIN_TRAIN_ITEMS build flat.
            ivf/ivfpq train on at most TRAIN_SAMPLE rows.
        nlist, m_hnsw, pq_m, ef_construction: structure parameters (see make_empty_index).
        nprobe, ef_search: search depth; when None it is tuned so leave-one-out recall@50 of
            sampled catalog items reaches target_recall + TUNE_MARGIN (see tune_search_depth).
        use_gpu: "auto"/True train and fill IVF on the GPUs when FAISS sees any; False never.
    """
    check_index_type(index_type)
    as_ids(source.ids)
    n, d = len(source), source.dims[view]
    if unit_length:
        warn_if_not_normalised(source.read(view, 0, min(n, 1000)))
    if index_type in ("ivf", "ivfpq") and n < MIN_TRAIN_ITEMS:
        logger.warning("Only %d vectors: building a flat index instead of %s", n, index_type)
        index_type = "flat"
    index = make_empty_index(index_type, d, n, nlist=nlist, m_hnsw=m_hnsw, pq_m=pq_m,
                             ef_construction=ef_construction)
    index = fill_view(index, source, view, gpu=index_type in GPU_TYPES and want_gpu(use_gpu))
    depth = nprobe if index_type in ("ivf", "ivfpq") else ef_search
    if depth is not None:
        set_search_depth(index, depth)
    elif index_type != "flat":
        tune_search_depth(index, source, view, target=min(1.0, target_recall + TUNE_MARGIN))
    return index


def build_index(vectors, ids, index_type: str = "flat", **kwargs) -> faiss.Index:
    """Build an index of in-memory vectors [N, D] under catalog ids (see build_view for kwargs)."""
    x = as_vectors(vectors)
    return build_view(VectorSource.from_arrays({"shared": x}, as_ids(ids, len(x))), "shared", index_type, **kwargs)


def check_group_codec(codec: str) -> int:
    """Return the FAISS scalar quantizer type of a group-view codec, or raise listing the valid ones."""
    if codec not in GROUP_CODECS:
        raise ValueError(f"Unknown group view codec {codec!r}; choose one of: {', '.join(GROUP_CODECS)}")
    return GROUP_CODECS[codec]


def build_group_view(source: VectorSource, view: str, codec: str = "fp16") -> faiss.Index:
    """Build an exact index of a group view with compact codes, addressed by row position (no id map).

    Group views hold a few dozen probabilities per item: an exact scan of fp16 (2 bytes a value) or
    8-bit (1 byte) codes is fast, keeps their ties in order and needs no training beyond 8-bit ranges.
    The codes are padded with zeros to a multiple of CODE_ALIGN values, where FAISS scans them with SIMD."""
    width = padded_width(source.dims[view])
    padded = VectorSource(source.ids, {view: width}, lambda v, start, stop: pad_columns(source.read(v, start, stop), width),
                          source.block_rows)
    index = faiss.IndexScalarQuantizer(width, check_group_codec(codec), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(training_rows(padded, view))
    add_blocks(index, padded, view, with_ids=False)
    return index
