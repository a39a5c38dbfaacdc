"""Benchmark flat, IVF and HNSW indexes (default settings) on clustered synthetic embeddings.

Prints a Markdown table: build time, batch queries/s, speed-up over flat, recall@k against flat,
and whether IVF or HNSW reaches the target (recall@50 >= 0.95 at >= 10x the flat speed).
Then the time of `retrieval index add` of N new items into an index of N, at each --add-sizes N,
with the ratio to the previous size: about 2x per doubling when adding is linear in N.

    python scripts/bench_index.py --sizes 100000 1000000 --dim 512 --queries 1000 --k 50
    python scripts/bench_index.py --sizes --add-sizes 5000 10000 20000   # index add only

The whole index directory (shared + 24 group views + item arrays) through `retrieval index build` and
`retrieval serve` at corpus size: scripts/bench_scale.py.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from indexer import build_index, search_depth  # noqa: E402
from indexer.tuning import recall_at_k  # noqa: E402

logger = logging.getLogger("bench_index")

TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0


def get_args_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                      help="catalog sizes N of the search benchmark (none: skip it)")
    data.add_argument("--add-sizes", type=int, nargs="*", default=[5_000, 10_000, 20_000],
                      help="N of the 'index add' benchmark: N new items into an index of N (none: skip it)")
    data.add_argument("--dim", type=int, default=512, help="embedding dimension")
    data.add_argument("--clusters", type=int, default=1000, help="Gaussian clusters in the mixture")
    data.add_argument("--intrinsic-dim", type=int, default=64, help="rank of the within-cluster variation")
    data.add_argument("--seed", type=int, default=0)
    search = parser.add_argument_group("search")
    search.add_argument("--queries", type=int, default=1000, help="queries (drawn from the same mixture)")
    search.add_argument("--k", type=int, default=50)
    search.add_argument("--repeats", type=int, default=3, help="timed searches per index; the fastest counts")
    search.add_argument("--types", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw", "ivfpq"])
    index = parser.add_argument_group("index (defaults = indexer defaults)")
    index.add_argument("--nlist", type=int, default=None, help="IVF lists (default: indexer's, ~4*sqrt(N))")
    index.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree M")
    index.add_argument("--ef-construction", type=int, default=None, help="HNSW build beam (default: indexer's)")
    index.add_argument("--threads", type=int, default=0, help="OpenMP threads (0 = FAISS default)")
    index.add_argument("--gpu", choices=["auto", "never"], default="never", help="train IVF on GPUs when present")
    return parser


def make_mixture(n_clusters: int, dim: int, intrinsic_dim: int, rng: np.random.Generator) -> dict:
    """Return a two-level Gaussian mixture: 50 categories, n_clusters products styles under them."""
    supers = rng.standard_normal((50, dim)).astype(np.float32)
    centres = supers[rng.integers(0, 50, n_clusters)] + 0.8 * rng.standard_normal((n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # scaled so a standard-normal z gives z @ basis of norm ~1: spread is then the noise/centre ratio
    basis = rng.standard_normal((intrinsic_dim, dim)).astype(np.float32) / np.sqrt(intrinsic_dim * dim)
    weights = rng.zipf(1.5, n_clusters).clip(max=50).astype(np.float64)
    return {"centres": centres.astype(np.float32), "basis": basis,
            "spread": rng.uniform(0.4, 0.9, n_clusters).astype(np.float32), "weights": weights / weights.sum()}


def sample_mixture(mixture: dict, n: int, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    """Return n L2-normalised float32 vectors from the mixture (low-rank spread + a little noise)."""
    dim = mixture["centres"].shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        c = rng.choice(len(mixture["centres"]), m, p=mixture["weights"])
        z = rng.standard_normal((m, mixture["basis"].shape[0]), dtype=np.float32)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.2 / np.sqrt(dim))
        x = mixture["centres"][c] + mixture["spread"][c, None] * (z @ mixture["basis"] + noise)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def time_search(index: faiss.Index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, np.ndarray]:
    """Return (queries per second of the fastest of repeats batched searches, ids) after a warm-up."""
    index.search(queries[:10], k)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best, ids


def bench_type(index_type: str, x: np.ndarray, ids: np.ndarray, queries: np.ndarray, args) -> dict:
    """Build one index type with indexer defaults; return its build time, speed and result ids."""
    kwargs = {"m_hnsw": args.hnsw_m, "use_gpu": "auto" if args.gpu == "auto" else False}
    if args.nlist:
        kwargs["nlist"] = args.nlist
    if args.ef_construction:
        kwargs["ef_construction"] = args.ef_construction
    logger.info("Building %s over %d x %d", index_type, *x.shape)
    start = time.perf_counter()
    index = build_index(x, ids, index_type, **kwargs)
    build_s = time.perf_counter() - start
    qps, found = time_search(index, queries, args.k, args.repeats)
    logger.info("%s: build %.1fs, %.0f queries/s", index_type, build_s, qps)
    row = {"type": index_type, "n": len(x), "build_s": build_s, "qps": qps, "depth": search_depth(index),
           "found": found}
    del index
    gc.collect()
    return row


def bench_size(n: int, mixture: dict, queries: np.ndarray, args) -> list[dict]:
    """Benchmark every requested index type at catalog size n; recall is against the flat results."""
    logger.info("Generating %d vectors", n)
    x = sample_mixture(mixture, n, np.random.default_rng(args.seed + n))
    ids = np.arange(n, dtype=np.int64)
    types = ["flat"] + [t for t in args.types if t != "flat"]
    rows = [bench_type(t, x, ids, queries, args) for t in types]
    truth = rows[0]["found"]
    for row in rows:
        row["recall"] = recall_at_k(row.pop("found"), truth)
        row["speedup"] = row["qps"] / rows[0]["qps"]
    return rows


def meets_target(row: dict) -> bool:
    """Return True when an approximate row reaches the recall and speed-up targets."""
    return row["type"] != "flat" and row["recall"] >= TARGET_RECALL and row["speedup"] >= TARGET_SPEEDUP


def format_table(rows: list[dict], k: int) -> str:
    """Return the results as a Markdown table."""
    lines = [f"| type | N | build s | search param | queries/s | speed-up vs flat | recall@{k} | target |",
             "|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        name = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}.get(r["type"])
        param = f"{name}={r['depth']}" if name else "-"
        lines.append(f"| {r['type']} | {r['n']:,} | {r['build_s']:.1f} | {param} | {r['qps']:,.0f} | "
                     f"{r['speedup']:.1f}x | {r['recall']:.3f} | {'yes' if meets_target(r) else '-'} |")
    return "\n".join(lines)


def write_embeddings(path: Path, x: np.ndarray, catalog: Path) -> None:
    """An EMB.h5 (docs/formats.md) of x with ids 0..N-1, one 8-way group view, naming catalog."""
    import h5py

    n = len(x)
    probs = np.eye(8, dtype=np.float32)[np.arange(n) % 8]
    with h5py.File(path, "w") as f:
        f.create_dataset("vectors", data=x)
        f.create_dataset("ids", data=np.arange(n, dtype=np.int64))
        f.create_dataset("paths", data=[f"images/{i}.jpg" for i in range(n)], dtype=h5py.string_dtype())
        f.create_dataset("groups/colour", data=probs)
        f.attrs.update({"fingerprint": "bench", "catalog": str(catalog), "groups": '["colour"]'})


def time_add(n: int, mixture: dict, args) -> float:
    """Seconds of `retrieval index add` of N new items into a flat index of N (through the CLI code)."""
    from retrieval.commands.index import main as index_main

    x = sample_mixture(mixture, 2 * n, np.random.default_rng(args.seed + n))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "cat").mkdir()
        rows = [f"images/{i}.jpg,train,item {i},c{i % 8}" for i in range(2 * n)]
        (tmp / "cat" / "labels.csv").write_text("\n".join(["image,split,title,colour", *rows]) + "\n")
        write_embeddings(tmp / "old.h5", x[:n], tmp / "cat")
        write_embeddings(tmp / "all.h5", x, tmp / "cat")
        with contextlib.redirect_stdout(io.StringIO()):  # the commands' own one-line reports
            index_main(["build", "--embeddings", str(tmp / "old.h5"), "--out", str(tmp / "index"), "--gpu", "off"])
            start = time.perf_counter()
            index_main(["add", "--index", str(tmp / "index"), "--embeddings", str(tmp / "all.h5")])
            return time.perf_counter() - start


def bench_add(args, mixture: dict) -> str:
    """Markdown table of index add timings with the growth ratio between consecutive sizes."""
    lines = ["| index add | N new into N | seconds | ratio to previous N |", "|---|---:|---:|---:|"]
    previous = None
    for n in args.add_sizes:
        seconds = time_add(n, mixture, args)
        ratio = f"{seconds / previous[1]:.2f}x for {n / previous[0]:.1f}x N" if previous else "-"
        lines.append(f"| flat, dim {args.dim} | {n:,} | {seconds:.2f} | {ratio} |")
        previous = (n, seconds)
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the benchmark and print the table and the target verdict per size."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    mixture = make_mixture(args.clusters, args.dim, args.intrinsic_dim, rng)
    queries = sample_mixture(mixture, args.queries, rng)
    all_rows = []
    for n in args.sizes:
        rows = bench_size(n, mixture, queries, args)
        all_rows += rows
        print(format_table(rows, args.k), flush=True)
        met = [r["type"] for r in rows if meets_target(r)]
        print(f"\nN={n:,}: target (recall@{args.k} >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:.0f}x flat) "
              f"{'met by ' + ', '.join(met) if met else 'NOT met'}\n", flush=True)
    if args.add_sizes:
        print(bench_add(args, mixture) + "\n", flush=True)
    print(f"threads={faiss.omp_get_max_threads()} dim={args.dim} queries={args.queries} (one batched search) "
          f"clusters={args.clusters} repeats={args.repeats} (best counts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
