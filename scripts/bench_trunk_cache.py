"""Benchmark a trunk cache held in memory against the same cache read from disk batch by batch.

A cache whose kept part is larger than half the machine's memory stays on disk (``TrunkCache``'s
``on_disk``): each training batch reads its rows from the HDF5 file. This times, for one cache and
the model of a checkpoint, in a process of its own per mode (so that each peak RSS is its own):
opening the cache (with its finiteness check), and one epoch of batch reads (every row once in a
seeded random order, random views), against the same reads from memory. The disk mode reads
through the page cache: on a cold disk the first epoch is slower.

Usage: python scripts/bench_trunk_cache.py --cache RUN/trunk-cache.h5 --checkpoint RUN/best.pt [--batch-size 128]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def run_one(cache: str, checkpoint: str, batch_size: int, on_disk: bool) -> dict:
    """Open the cache in one mode and read one epoch of batches; seconds and peak RSS."""
    from retrieval.net.checkpoint import load_model
    from retrieval.net.trunkcache import TrunkCache

    model, ckpt = load_model(checkpoint)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    trunk_cache = TrunkCache(cache, model, ckpt["start_unit"], max_memory=0 if on_disk else 1 << 62)
    opened = time.perf_counter() - start
    rows = torch.from_numpy(trunk_cache.ok.nonzero()[0])
    generator = torch.Generator().manual_seed(0)
    order = rows[torch.randperm(len(rows), generator=generator)]
    flips = torch.randint(0, 2, (len(rows),), generator=generator)
    start = time.perf_counter()
    for at in range(0, len(order), batch_size):
        trunk_cache.inputs(order[at:at + batch_size], flips[at:at + batch_size])
    epoch = time.perf_counter() - start
    batches = -(-len(order) // batch_size)
    return {"mode": "disk" if on_disk else "memory", "rows": len(rows), "gb": trunk_cache.nbytes / 2**30,
            "open_s": opened, "epoch_s": epoch, "batch_ms": 1000 * epoch / batches,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base}


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table: mode, open time, epoch of reads, ms per batch, peak RSS over the model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a trunk cache (RUN/trunk-cache.h5)")
    parser.add_argument("--checkpoint", required=True, help="the run's checkpoint (RUN/best.pt)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--one", choices=("memory", "disk"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.cache, args.checkpoint, args.batch_size, args.one == "disk")))
        return 0
    print("| mode | rows | kept GB | open s | epoch of reads s | ms per batch | peak RSS over the model GB |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    for mode in ("memory", "disk"):
        out = subprocess.run([sys.executable, __file__, "--cache", args.cache, "--checkpoint", args.checkpoint,
                              "--batch-size", str(args.batch_size), "--one", mode],
                             check=True, capture_output=True, text=True)
        r = results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {r['rows']:,} | {r['gb']:.2f} | {r['open_s']:.1f} | {r['epoch_s']:.1f} | "
              f"{r['batch_ms']:.1f} | {r['peak_gb']:.2f} |", flush=True)
    print(f"\ndisk / memory: epoch of reads {results['disk']['epoch_s'] / results['memory']['epoch_s']:.1f}x, "
          f"peak memory {results['disk']['peak_gb'] / max(results['memory']['peak_gb'], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
