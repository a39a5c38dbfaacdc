"""Benchmark the trunk's forward with its batch norms folded into the convolutions against the units
as they are (``fold_batchnorm``), the forward that the trunk-cache pass, ``embed`` from images and
the audit's features run over a whole catalogue. Same random batch, same device; rounds alternate
between the two so that a busy machine slows both alike. Prints one table per backbone and the
largest relative difference of the last unit's output.

Usage: python scripts/bench_fold.py [--backbones efficientnet_lite0 resnet50] [--image-size 288] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from bench_train import sync  # noqa: E402

from retrieval.devices import resolve_device  # noqa: E402
from retrieval.net.backbones import LITE_PACKAGES, create_trunk, fold_batchnorm  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    p.add_argument("--image-size", type=int, default=288)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    return p


@torch.no_grad()
def measure(name: str, args, device: torch.device) -> list[tuple]:
    """Images/s of the units and of their folded copy, and the largest relative difference."""
    trunk = create_trunk(name, weights=None if name in LITE_PACKAGES else "none").eval().to(device)
    folded = fold_batchnorm(trunk.units)
    # channels-last, as a decoded batch is (collate_images stacks H x W x 3 images; normalize_batch
    # permutes them): the convolutions take their fast path on it
    x = torch.randn(args.batch_size, args.image_size, args.image_size, 3, device=device).permute(0, 3, 1, 2)
    seconds = {"as they are": 0.0, "folded": 0.0}
    for units in (trunk.units, folded):  # warm-up
        trunk(x, 0, units)
    for _ in range(args.rounds):
        for label, units in (("as they are", trunk.units), ("folded", folded)):
            sync(device)
            began = time.perf_counter()
            trunk(x, 0, units)
            sync(device)
            seconds[label] += time.perf_counter() - began
    a, b = trunk(x, 0)[-1], trunk(x, 0, folded)[-1]
    diff = float((a - b).abs().max() / a.abs().max())
    base = seconds["as they are"]
    return [(name, label, args.rounds * args.batch_size / s, base / s, diff if label == "folded" else 0.0)
            for label, s in seconds.items()]


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    print(f"{args.image_size} px, batch {args.batch_size}, {args.rounds} rounds, {device}, "
          f"{torch.get_num_threads()} threads\n")
    print("| backbone | batch norms | images/s | speed-up | max relative difference |")
    print("|---|---|---:|---:|---:|")
    for name in args.backbones:
        for row in measure(name, args, device):
            print("| {} | {} | {:.1f} | {:.2f}x | {:.1e} |".format(*row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
