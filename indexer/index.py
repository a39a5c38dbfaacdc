"""Build FAISS inner-product indexes over L2-normalised vectors and tune their search depth."""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import faiss
import numpy as np

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
VIEW_NAME = re.compile(r"^(shared|group-.+)$", re.DOTALL)  # a group's name may be anything (files: persist.view_file)
GPU_TYPES = ("flat", "ivf")
MIN_TRAIN_ITEMS = 256  # below this IVF training is meaningless: such indexes are built flat
EF_CONSTRUCTION = 64
TRAIN_POINTS_PER_LIST = 64  # FAISS default 256 makes 1M-item training take many minutes on CPU
TRAIN_ITERATIONS = 10  # k-means passes (FAISS default 25): the tuned nprobe absorbs coarser lists
TRAIN_SAMPLE = 100_000  # IVF / PQ training rows, drawn evenly from the corpus
GROUP_CODECS = {"fp16": faiss.ScalarQuantizer.QT_fp16, "8bit": faiss.ScalarQuantizer.QT_8bit}
CODE_ALIGN = 8  # FAISS scans scalar-quantized codes with SIMD only when d is a multiple of 8 (20x faster)


def check_index_type(index_type: str) -> None:
    """Raise a ValueError listing the valid index types when index_type is not one of them."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"Unknown index type {index_type!r}; choose one of: {', '.join(INDEX_TYPES)}")


def as_vectors(vectors, dimension: int | None = None, name: str = "vectors") -> np.ndarray:
    """Return vectors as a C-contiguous float32 [N, D] array, checking D when given."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {x.shape}")
    if dimension is not None and x.shape[1] != dimension:
        raise ValueError(f"{name} have dimension {x.shape[1]}, the index expects {dimension}")
    return x


def padded_width(d: int) -> int:
    """Return d rounded up to a multiple of CODE_ALIGN."""
    return -(-d // CODE_ALIGN) * CODE_ALIGN


def pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    """Return x with zero columns appended up to width when width is its padded width (inner products
    are unchanged); other shapes are returned as they are, for the caller's dimension check."""
    if x.ndim == 2 and x.shape[1] < width == padded_width(x.shape[1]):
        return np.pad(x, ((0, 0), (0, width - x.shape[1])))
    return x


def as_ids(ids, count: int | None = None) -> np.ndarray:
    """Return ids as a unique, non-negative int64 array, checking its length when given."""
    out = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if count is not None and len(out) != count:
        raise ValueError(f"Got {len(out)} ids for {count} vectors")
    if len(out) and out.min() < 0:
        raise ValueError("ids must be non-negative (-1 marks an empty result slot)")
    if len(np.unique(out)) != len(out):
        raise ValueError("ids must be unique")
    return out


def warn_if_not_normalised(x: np.ndarray) -> None:
    """Log a warning when sampled rows are not unit length (inner product then is not cosine)."""
    norms = np.linalg.norm(x[:: max(1, len(x) // 1000)], axis=1)
    if len(norms) and np.abs(norms - 1.0).max() > 1e-3:
        logger.warning("Vectors are not L2-normalised (norms %.3f..%.3f)", norms.min(), norms.max())


def default_nlist(n: int) -> int:
    """Return about 4*sqrt(n) inverted lists, keeping at least 39 training points per list."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39, 65536)))


def default_pq_m(d: int) -> int:
    """Return the largest divisor of d that is at most d/8 (about 8 dimensions per sub-quantizer)."""
    return next(m for m in range(max(1, d // 8), 0, -1) if d % m == 0)


def default_pq_bits(n: int) -> int:
    """Return bits per PQ code: 8 when there is enough data to train 256 centroids, fewer otherwise."""
    return int(min(8, max(4, math.floor(math.log2(max(n, 2) / 39)))))


def want_gpu(use_gpu) -> bool:
    """Return True when use_gpu allows it and FAISS sees at least one GPU."""
    if use_gpu is False:
        return False
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is True and ngpu == 0:
        logger.warning("use_gpu=True but FAISS sees no GPU; using the CPU")
    return ngpu > 0


def make_empty_index(index_type: str, d: int, n: int, *, nlist=None, m_hnsw=32, pq_m=None,
                     ef_construction=EF_CONSTRUCTION) -> faiss.Index:
    """Create an untrained index of the given type for n vectors of dimension d.

    Args:
        index_type: one of INDEX_TYPES.
        d, n: vector dimension and the number of vectors it will be trained on.
        nlist: inverted lists for ivf/ivfpq (default: default_nlist(n)).
        m_hnsw: HNSW graph degree; ef_construction: HNSW build-time beam width.
        pq_m: PQ sub-quantizers for ivfpq (default: default_pq_m(d)); must divide d.
    """
    ip = faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if index_type == "hnsw":
        inner = faiss.IndexHNSWFlat(d, m_hnsw, ip)
        inner.hnsw.efConstruction = ef_construction
        return faiss.IndexIDMap2(inner)
    nlist = nlist or default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    if index_type == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
    else:
        pq_m = pq_m or default_pq_m(d)
        if d % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the dimension {d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, default_pq_bits(n), ip)
    index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST  # k-means cost is linear in the sample
    index.cp.niter = TRAIN_ITERATIONS
    index.own_fields = True
    quantizer.this.disown()
    return index


def inner_index(index: faiss.Index) -> faiss.Index:
    """Return the index an IndexIDMap wraps (or the index itself), downcast to its real type."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.downcast_index(index.index)
    return index


def index_kind(index: faiss.Index) -> str:
    """Return which of INDEX_TYPES a CPU index is ("other" when none)."""
    inner = inner_index(index)
    for cls, kind in ((faiss.IndexIVFPQ, "ivfpq"), (faiss.IndexIVF, "ivf"),
                      (faiss.IndexHNSW, "hnsw"), (faiss.IndexFlat, "flat")):
        if isinstance(inner, cls):
            return kind
    return "other"


def search_depth(index: faiss.Index) -> int | None:
    """Return nprobe for IVF, efSearch for HNSW, None for exact indexes."""
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexIVF):
        return int(inner.nprobe)
    if isinstance(inner, faiss.IndexHNSW):
        return int(inner.hnsw.efSearch)
    return None


def set_search_depth(index: faiss.Index, depth: int) -> None:
    """Set nprobe (IVF, clamped to nlist) or efSearch (HNSW); stored with the index file."""
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = int(min(depth, inner.nlist))
    elif isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = int(depth)


def rebuild_hnsw(index: faiss.Index, keep_ids: np.ndarray) -> faiss.Index:
    """Return a fresh IDMap2(HNSW) holding only keep_ids, with the same M and ef settings."""
    inner = inner_index(index)
    stored = faiss.vector_to_array(index.id_map)
    keep = np.isin(stored, keep_ids)
    vectors = inner.reconstruct_n(0, inner.ntotal)[keep]
    fresh = make_empty_index("hnsw", inner.d, int(keep.sum()), m_hnsw=inner.hnsw.nb_neighbors(0) // 2,
                             ef_construction=inner.hnsw.efConstruction)
    fresh.add_with_ids(vectors, stored[keep])
    set_search_depth(fresh, inner.hnsw.efSearch)
    return fresh


def to_gpu(index: faiss.Index) -> faiss.Index | None:
    """Return a copy of a flat or IVF index on all GPUs for unfiltered search, None when not possible."""
    if index_kind(index) not in GPU_TYPES:
        return None
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as err:
        logger.warning("Could not copy the index to the GPU, searching on the CPU: %s", err)
        return None


def check_views(views: Mapping[str, faiss.Index]) -> None:
    """Raise a ValueError unless there is a "shared" view, every name is shared or group-<name> and every
    group view is an exact index addressed by row position (indexer.build.build_group_view)."""
    if "shared" not in views:
        raise ValueError(f"An index needs a 'shared' view; got: {', '.join(views) or 'none'}")
    bad = [name for name in views if not VIEW_NAME.match(name)]
    if bad:
        raise ValueError(f"Bad view name(s) {bad}; use 'shared' or 'group-<name>'")
    by_id = [name for name, index in views.items()
             if name != "shared" and not isinstance(faiss.downcast_index(index), faiss.IndexFlatCodes)]
    if by_id:
        raise ValueError(f"Group view(s) {by_id} must be exact position-addressed indexes (build_group_view)")


def group_codec(views: Mapping[str, faiss.Index]) -> str | None:
    """Return "fp16", "8bit" or "float32" as the group views store their values (None without group views)."""
    for name, index in views.items():
        inner = faiss.downcast_index(index)
        if name != "shared":
            if isinstance(inner, faiss.IndexScalarQuantizer):
                return "fp16" if inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16 else "8bit"
            return "float32"
    return None
