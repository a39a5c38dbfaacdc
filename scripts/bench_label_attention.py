"""What label attention costs a cached training step: images/s with and without it, measured in one run.

Two models of the README's defaults (a frozen trunk, learned colour weighting) differ only in
``label_attention``; both take the same cached trunk outputs of one batch (random images through
the frozen trunk, as the trunk cache stores them) and run forward + backward + an optimiser step of
the cached model (``CachedForward``: pooling, the embedding, the heads and, for one, the label head
over every cell), alternating, several rounds; the table gives each one's median images/s and
their ratio. The groups are the multicolour stand-in's by default (gender 5, masterCategory 5,
subCategory 28, articleType 67, baseColour 42 multi-label, season 4, usage 6 labels); ``--catalog``
takes a catalogue's own (its multi-label groups attended). Random trunk weights: the time is the same.

    python scripts/bench_label_attention.py [--catalog DIR] [--batch-size 128] [--steps 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from retrieval.net.model import create_model
from retrieval.net.trunkcache import frozen_outputs
from retrieval.train.config import CachedForward

STAND_IN = {"gender": 5, "masterCategory": 5, "subCategory": 28, "articleType": 67, "baseColour": 42, "season": 4,
            "usage": 6}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", help="take the groups and multi-label groups of this catalogue")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p


def catalogue_groups(catalog: str | None) -> tuple[dict[str, list[str]], list[str]]:
    """(vocabularies, multi-label groups) of a catalogue, or the multicolour stand-in's shape."""
    if catalog is None:
        return {g: [f"{g}{i}" for i in range(n)] for g, n in STAND_IN.items()}, ["baseColour"]
    from retrieval.data.catalog import read_catalog

    read = read_catalog(catalog, check_files=False)
    return read.vocab, read.multi_label_groups()


def step(net: CachedForward, optimizer, inputs) -> None:
    """Forward + backward + step on a plain loss of every head's and attended group's logits."""
    emb, heads, attended = net(*inputs)
    loss = sum(z.logsumexp(1).mean() for z in heads.values()) + sum(z.mean() for z in attended.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def images_per_second(net: CachedForward, optimizer, inputs, steps: int, batch: int) -> float:
    began = time.perf_counter()
    for _ in range(steps):
        step(net, optimizer, inputs)
    return steps * batch / (time.perf_counter() - began)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, multi = catalogue_groups(args.catalog)
    nets = {}
    for name, on in (("without label attention", False), ("with label attention", True)):
        model = create_model(args.backbone, vocab, multi_label_groups=multi, weights="none", frozen_trunk=True,
                             label_attention=on)
        nets[name] = CachedForward(model, len(model.trunk))
    model = nets["with label attention"].model
    if not model.attended_groups:
        raise SystemExit("No group gets label attention: the catalogue has no multi-label group")
    x = torch.randn(args.batch_size, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        inputs = frozen_outputs(model.eval(), x, len(model.trunk))
    for net in nets.values():  # both time training steps (dropout on), after the trunk pass in eval mode
        net.train()
    optimizers = {name: torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
                  for name, net in nets.items()}
    for name, net in nets.items():  # warm-up
        step(net, optimizers[name], inputs)
    speeds = {name: [] for name in nets}
    for _ in range(args.rounds):
        for name, net in nets.items():
            speeds[name].append(images_per_second(net, optimizers[name], inputs, args.steps, args.batch_size))
    base = statistics.median(speeds["without label attention"])
    print(f"cached training step, {args.backbone} at {model.config.image_size} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; label head {model.label_head.in_channels} -> "
          f"{model.label_head.out_channels} over every cell ({', '.join(model.attended_groups)})\n")
    print("| model | images/s (median of rounds) | rounds | vs without |")
    print("|---|---:|---|---:|")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | {median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
