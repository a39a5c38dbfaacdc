"""Benchmark `evaluate_retrieval` (query = candidate, every view) against its matrix-product floor.

Synthetic data shaped like e-Clothing1.4M: a 256-d shared embedding and 24 attribute groups of
2..145 labels (~830 in all, two of them multi-label, 0-60% unlabelled per group), each with a
group view of its label count (softmax probabilities; L2-normalised sigmoids for the multi-label
ones), vectors clustered by label so retrieval is not trivial. The floor is the time of the
blocked ``X @ X.T`` alone for all views, with the evaluation's own block size and reused score
buffer. With ``--queries Q`` (< N), both are timed on Q queries against all N candidates (the
evaluation's ``sample_queries``) and scaled by N / Q, so that large N fit in a session: the cost
per query does not depend on which queries; the evaluation's fixed part (labels, relevant counts;
timed as a run with one query) is counted once. Each size runs in its own process so that its peak RSS
(ru_maxrss, data included) is its own.

Usage: python scripts/bench_eval.py [--sizes 30000 100000] [--device cpu] [--target 1.5]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from retrieval.devices import DEVICES, resolve_device
from retrieval.evaluate.metrics import CANDIDATES, default_block, evaluate_retrieval

DIM = 256
CLASSES = np.round(np.geomspace(2, 145, 24)).astype(int)  # labels per group, 831 in all
MULTI_LABEL = {5, 17}  # indices of the multi-label groups


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, dict, dict]:
    """(shared vectors [n, DIM], {group: label tuples}, {group: group-view vectors})."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((n, DIM), dtype=np.float32)
    labels, views = {}, {}
    for g, classes in enumerate(CLASSES):
        name = f"g{g:02d}"
        truth = rng.integers(0, classes, n)
        shared += 0.6 * rng.standard_normal((classes, DIM), dtype=np.float32)[truth]
        logits = rng.standard_normal((n, classes), dtype=np.float32)
        logits[np.arange(n), truth] += 3.0
        known = rng.random(n) >= rng.uniform(0.0, 0.6)
        vocab = [(f"{name}-{c}",) for c in range(classes)]
        if g in MULTI_LABEL:
            second = rng.integers(0, classes, n)
            both = (rng.random(n) < 0.3) & (second != truth)
            logits[both, second[both]] += 3.0
            probs = 1 / (1 + np.exp(-logits))
            views[name] = probs / np.linalg.norm(probs, axis=1, keepdims=True)
            labels[name] = [(vocab[t][0], vocab[s][0]) if b else vocab[t] if k else ()
                            for t, s, b, k in zip(truth, second, both, known)]
        else:
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            views[name] = probs / probs.sum(axis=1, keepdims=True)
            labels[name] = [vocab[t] if k else () for t, k in zip(truth, known)]
    return shared, labels, views


def floor_seconds(matrices: list[np.ndarray], device: str, rows: int) -> float:
    """Seconds of the blocked X @ X.T of every view over ``rows`` query rows (scores only)."""
    dev = resolve_device(device)
    n = len(matrices[0])
    block = default_block(n, dev)
    tensors = [torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(dev) for x in matrices]
    buffer = torch.empty((block, n), device=dev)
    start = time.perf_counter()
    for first in range(0, rows, block):
        for x in tensors:
            torch.mm(x[first:min(rows, first + block)], x.T, out=buffer[:min(rows, first + block) - first])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_one(n: int, device: str, k: int, queries: int | None, rounds: int, candidates: str = "labelled") -> dict:
    """Time one size: the evaluation and its floor in turn, ``rounds`` times (best of each, as
    the load of a shared machine drifts); peak RSS of this process."""
    shared, labels, views = synthetic(n)
    rows = min(n, queries or n)
    fixed = 0.0
    if rows < n:  # the work that does not grow with the queries (labels, counts, bootstrap): once
        start = time.perf_counter()
        evaluate_retrieval(shared, labels, k=k, vectors_by_group=views, device=device, sample_queries=1,
                           candidates=candidates)
        fixed = time.perf_counter() - start
    walls, floors = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        report = evaluate_retrieval(shared, labels, k=k, vectors_by_group=views, device=device,
                                    sample_queries=rows if rows < n else None, candidates=candidates)
        walls.append(fixed + (time.perf_counter() - start - fixed) * n / rows)
        floors.append(floor_seconds([shared, *views.values()], device, rows) * n / rows)
    return {"n": n, "queries": rows, "views": 1 + len(views), "wall": min(walls), "floor": min(floors),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "map": report["mean"]["map_paper"], "map_view": report["mean"]["group_view"]["map_paper"]}


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[30_000, 100_000])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--queries", type=int, help="time Q queries per size and scale by N / Q (default: all)")
    parser.add_argument("--rounds", type=int, default=2, help="evaluation and floor timed in turn, best of R")
    parser.add_argument("--target", type=float, default=1.5, help="allowed ratio to the floor (default: 1.5)")
    parser.add_argument("--candidates", default="labelled", choices=CANDIDATES,
                        help="a group's candidates (evaluate --candidates; default: labelled)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one size, JSON out (child process)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table: N, views, wall, floor, ratio, peak RSS."""
    args = get_args_parser().parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.k, args.queries, args.rounds, args.candidates)))
        return 0
    print(f"device {resolve_device(args.device)}, {torch.get_num_threads()} threads, shared d = {DIM}, "
          f"{len(CLASSES)} group views of {CLASSES.sum()} labels in all, k = {args.k}, "
          f"candidates {args.candidates}\n")
    print("| N | queries timed | views | wall s | floor s | ratio | peak RSS GB | mAP shared / group view |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for n in args.sizes:
        sample = ["--queries", str(args.queries)] if args.queries else []
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--device", args.device, "--k", str(args.k),
                              "--rounds", str(args.rounds), "--candidates", args.candidates, *sample],
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ratios.append(r["wall"] / r["floor"])
        print(f"| {n:,} | {r['queries']:,} | {r['views']} | {r['wall']:.1f} | {r['floor']:.1f} | {ratios[-1]:.2f} | "
              f"{r['peak_gb']:.2f} | {100 * r['map']:.1f} / {100 * r['map_view']:.1f} |", flush=True)
    met = max(ratios) <= args.target
    print(f"\ntarget within {args.target:g}x of the floor: {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
