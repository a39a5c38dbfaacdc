"""Build FAISS inner-product indexes over L2-normalised vectors and tune their search depth."""
from __future__ import annotations

import logging
import math

import faiss
import numpy as np

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
GPU_TYPES = ("flat", "ivf")
MIN_TRAIN_ITEMS = 256  # below this IVF training is meaningless: such indexes are built flat
TARGET_RECALL = 0.95
TUNE_K = 50
TUNE_QUERIES = 256
TUNE_MARGIN = 0.01  # catalog items as queries are slightly easier than new photos
EF_CANDIDATES = (128, 192, 256, 384, 512, 768, 1024, 2048)
EF_CONSTRUCTION = 64
PLATEAU_GAIN = 0.002
PLATEAU_FROM = 0.8  # recall below which tuning never stops for lack of gain
TRAIN_POINTS_PER_LIST = 64  # FAISS default 256 makes 1M-item training take many minutes on CPU


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
    index.own_fields = True
    quantizer.this.disown()
    return index


def fill_index(index: faiss.Index, x: np.ndarray, ids: np.ndarray, gpu: bool = False) -> faiss.Index:
    """Train (when needed) and add x with ids; IVF work runs on all GPUs when gpu; returns a CPU index."""
    if gpu and isinstance(index, faiss.IndexIVF):
        logger.info("Training and filling the IVF index on %d GPU(s)", faiss.get_num_gpus())
        on_gpu = faiss.index_cpu_to_all_gpus(index)
        on_gpu.train(x)
        on_gpu.add_with_ids(x, ids)
        index = faiss.index_gpu_to_cpu(on_gpu)
    else:
        if not index.is_trained:
            index.train(x)
        index.add_with_ids(x, ids)
    if isinstance(index, faiss.IndexIVF):
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct/remove by catalog id
    return index


def build_index(vectors, ids, index_type: str = "flat", *, nlist=None, m_hnsw=32, pq_m=None,
                use_gpu="auto", nprobe=None, ef_search=None, ef_construction=EF_CONSTRUCTION,
                target_recall=TARGET_RECALL, unit_norm: bool = True) -> faiss.Index:
    """Build an inner-product index of vectors under catalog ids; always returns a CPU index.

    Args:
        vectors: float32 [N, D], L2-normalised unless ``unit_norm`` is False (group views hold
            probabilities, whose plain inner product is what ranks them). ids: int64 [N] catalog row ids.
        index_type: flat (exact), ivf, hnsw or ivfpq. ivf/ivfpq below MIN_TRAIN_ITEMS build flat.
        nlist, m_hnsw, pq_m, ef_construction: structure parameters (see make_empty_index).
        nprobe, ef_search: search depth; when None it is tuned so leave-one-out recall@50 of
            sampled catalog items reaches target_recall + TUNE_MARGIN (see tune_search_depth).
        use_gpu: "auto"/True train IVF on the GPUs when FAISS sees any; False never.
    """
    check_index_type(index_type)
    x = as_vectors(vectors)
    ids = as_ids(ids, len(x))
    if unit_norm:
        warn_if_not_normalised(x)
    if index_type in ("ivf", "ivfpq") and len(x) < MIN_TRAIN_ITEMS:
        logger.warning("Only %d vectors: building a flat index instead of %s", len(x), index_type)
        index_type = "flat"
    index = make_empty_index(index_type, x.shape[1], len(x), nlist=nlist, m_hnsw=m_hnsw,
                             pq_m=pq_m, ef_construction=ef_construction)
    index = fill_index(index, x, ids, gpu=index_type in GPU_TYPES and want_gpu(use_gpu))
    depth = nprobe if index_type in ("ivf", "ivfpq") else ef_search
    if depth is not None:
        set_search_depth(index, depth)
    elif index_type != "flat":
        tune_search_depth(index, x, ids, target=min(1.0, target_recall + TUNE_MARGIN))
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


def depth_candidates(index: faiss.Index, k: int) -> list[int]:
    """Return increasing nprobe (steps of about 1.5x up to nlist) or efSearch (>= k) values to try."""
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexIVF):
        steps = sorted({int(b * 2 ** i) for i in range(32) for b in (1, 1.5)})  # 1, 2, 3, 4, 6, 8, 12, ...
        return [p for p in steps if p < inner.nlist] + [int(inner.nlist)]
    return [ef for ef in EF_CANDIDATES if ef >= k] or [k]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Return the mean share of each row of truth ids that appears in the same row of found."""
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, (t >= 0).sum())
            for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def recall_by_score(found: np.ndarray, queries: np.ndarray, x: np.ndarray, ids: np.ndarray,
                    kth: np.ndarray) -> float:
    """Tie-aware recall@k: the share of found ids whose exact score reaches the k-th exact score.

    Counting ids instead would call a correct answer wrong whenever many items tie with the k-th
    one, as in group views of a few labels (probability vectors repeat): there the tuner saw
    recall 0.00-0.05 at every depth and stopped at nprobe 1-3."""
    order = np.argsort(ids)
    pos = order[np.searchsorted(ids, found.clip(min=0), sorter=order)]
    exact = np.einsum("qd,qkd->qk", queries, x[pos])
    tol = 1e-5 * np.maximum(1.0, np.abs(kth))
    hits = (found >= 0) & (exact >= (kth - tol)[:, None])
    return float(hits.sum(1).clip(max=found.shape[1]).mean() / found.shape[1])


def drop_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Return the first k ids of each row of found other than that row's own id."""
    return np.stack([row[row != me][:k] for row, me in zip(found, own)])


def tune_search_depth(index: faiss.Index, x: np.ndarray, ids: np.ndarray, *, k=TUNE_K,
                      target=TARGET_RECALL, n_queries=TUNE_QUERIES, seed=0) -> int | None:
    """Raise nprobe/efSearch until leave-one-out recall@k of sampled catalog items reaches target.

    Each sampled item queries the index and its own id is dropped from both the exact and the
    approximate answers, so the trivial self-match does not flatter the estimate.
    """
    k = min(k, len(x) - 1)
    if k < 1:
        return None
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(x), min(n_queries, len(x)), replace=False)
    queries, own = x[sample], ids[sample]
    truth_scores, truth_pos = faiss.knn(queries, x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    kth = np.stack([s[p != i][k - 1] for s, p, i in zip(truth_scores, truth_pos, sample)])
    recall, depth = -1.0, None
    for candidate in depth_candidates(index, k):
        set_search_depth(index, candidate)
        found = drop_self(index.search(queries, k + 1)[1], own, k)
        gained = recall_by_score(found, queries, x, ids, kth) - recall
        if gained < PLATEAU_GAIN and recall >= PLATEAU_FROM:  # deeper search stopped paying (PQ error caps
            # recall); below PLATEAU_FROM a flat step is no plateau (few distinct vectors: keep going)
            set_search_depth(index, depth)
            break
        recall, depth = recall + gained, candidate
        if recall >= target:
            break
    log = logger.info if recall >= target else logger.warning
    log("%s search depth %s gives leave-one-out recall@%d %.3f on %d sampled items (target %.2f)",
        index_kind(index), depth, k, recall, len(queries), target)
    return depth


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
