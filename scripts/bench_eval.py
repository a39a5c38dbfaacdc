"""Benchmark mAP@k evaluation against the matrix-product floor 2*N*N*d / measured FLOP rate.

Usage: python scripts/bench_eval.py [--sizes 10000 50000] [--dim 512] [--k 50] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from retrieval.devices import DEVICES, resolve_device
from retrieval.evaluate.metrics import evaluate_retrieval

GROUPS = {"type": (40, 1, 0.0), "colour": (12, 1, 0.1), "style": (20, 3, 0.3)}  # classes, max labels, unlabelled


def measure_matmul_rate(device: str, dim: int, repeats: int = 3) -> float:
    """Best float32 torch.mm rate in FLOP/s on a block-shaped product (4096 x dim @ dim x 16384)."""
    dev = resolve_device(device)
    a, b = torch.randn(4096, dim, device=dev), torch.randn(16384, dim, device=dev)
    torch.mm(a, b.T)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b.T)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * a.shape[0] * b.shape[0] * dim / best


def random_labels(rng: np.random.Generator, n: int) -> dict[str, list[tuple[str, ...]]]:
    """Random label sets for the benchmark groups, some unlabelled, one group multi-label."""
    labels = {}
    for g, (classes, max_labels, unlabelled) in GROUPS.items():
        names = np.array([f"{g}{c}" for c in range(classes)])
        sizes = np.where(rng.random(n) < unlabelled, 0, rng.integers(1, max_labels + 1, n))
        picks = rng.integers(0, classes, (n, max_labels))
        labels[g] = [tuple(dict.fromkeys(names[picks[i, :sizes[i]]])) for i in range(n)]
    return labels


def time_evaluation(n: int, dim: int, k: int, device: str, seed: int = 0) -> float:
    """Seconds for evaluate_retrieval on n random unit vectors with random labels."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    labels = random_labels(rng, n)
    start = time.perf_counter()
    evaluate_retrieval(vectors, labels, k=k, device=device)
    return time.perf_counter() - start


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--target", type=float, default=3.0, help="allowed ratio to the floor (default: 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table of evaluation time vs the matrix-product floor."""
    args = get_args_parser().parse_args(argv)
    print(f"device {resolve_device(args.device)}, {torch.get_num_threads()} threads, d = {args.dim}, "
          f"k = {args.k}, groups {list(GROUPS)}; the rate is the best float32 torch.mm rate measured "
          f"just before each size (the machine is shared, so it drifts)\n")
    print("| N | seconds | floor seconds | ratio | torch.mm GFLOP/s |\n|---:|---:|---:|---:|---:|")
    ratios = []
    for n in args.sizes:
        rate = measure_matmul_rate(args.device, args.dim)
        seconds, floor = time_evaluation(n, args.dim, args.k, args.device), 2 * n * n * args.dim / rate
        ratios.append(seconds / floor)
        print(f"| {n:,} | {seconds:.2f} | {floor:.2f} | {ratios[-1]:.2f} | {rate / 1e9:.0f} |", flush=True)
    met = max(ratios) <= args.target
    print(f"\ntarget within {args.target:g}x of the floor: {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
