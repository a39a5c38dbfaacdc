"""FAISS wrapping for the catalog: build, save/load with a JSON sidecar, add/remove, filtered search."""
try:
    import faiss  # noqa: F401
except ImportError as err:  # faiss-cpu and faiss-gpu are extras: exactly one must be installed
    raise ImportError("FAISS is not installed: pip install '.[cpu]' (or '.[gpu]' on a CUDA machine), "
                      "or run scripts/setup.sh") from err
from indexer.embeddings import build_store_from_embeddings
from indexer.filters import qualifying_ids
from indexer.index import INDEX_TYPES, build_index, index_kind, search_depth, tune_search_depth
from indexer.persist import IndexMismatch
from indexer.store import IndexStore

__all__ = [
    "INDEX_TYPES",
    "IndexMismatch",
    "IndexStore",
    "build_index",
    "build_store_from_embeddings",
    "index_kind",
    "qualifying_ids",
    "search_depth",
    "tune_search_depth",
]
