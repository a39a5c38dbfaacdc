"""FAISS wrapping for the catalog: build, save/load with a JSON sidecar, add/remove, filtered search."""
try:
    import faiss  # noqa: F401
except ImportError as err:  # faiss-cpu and faiss-gpu are extras: exactly one must be installed
    raise ImportError("FAISS is not installed: pip install '.[cpu]' (or '.[gpu]' on a CUDA machine), "
                      "or run scripts/setup.sh") from err
from indexer.build import build_group_view, build_index, build_view
from indexer.embeddings import build_store, build_store_from_embeddings
from indexer.filters import qualifying_positions
from indexer.index import GROUP_CODECS, INDEX_TYPES, index_kind, search_depth
from indexer.persist import IndexMismatch
from indexer.source import VectorSource
from indexer.store import IndexStore
from indexer.tuning import tune_search_depth

__all__ = [
    "GROUP_CODECS",
    "INDEX_TYPES",
    "IndexMismatch",
    "IndexStore",
    "VectorSource",
    "build_group_view",
    "build_index",
    "build_store",
    "build_store_from_embeddings",
    "build_view",
    "index_kind",
    "qualifying_positions",
    "search_depth",
    "tune_search_depth",
]
