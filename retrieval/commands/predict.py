"""``retrieval predict``: each group's labels with probabilities for image files."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from retrieval.commands.argtypes import at_least
from retrieval.data.embfile import fuse_probabilities
from retrieval.data.images import ImageError
from retrieval.devices import resolve_device
from retrieval.embed.inference import predict_images
from retrieval.net.checkpoint import load_model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval predict",
                                description="Print the labels a trained model predicts for images, per group.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, metavar="PT", help="RUN/best.pt")
    p.add_argument("--fuse", metavar="PT", help="a second checkpoint whose class scores are averaged in (score fusion)")
    p.add_argument("--top", type=at_least(1), default=3, help="labels shown per single-label group")
    p.add_argument("--threshold", type=float, default=0.5, help="probability shown for multi-label groups (the likeliest label is shown below it too)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", default="auto")
    return p


def top_labels(probs: np.ndarray, labels: list[str], multi_label: bool, top: int, threshold: float):
    """(label, probability) pairs: the top ones, or those above the threshold (at least one)."""
    order = np.argsort(-probs, kind="stable")
    if multi_label:
        chosen = [i for i in order if probs[i] >= threshold] or list(order[:1])
    else:
        chosen = list(order[:top])
    return [(labels[i], float(probs[i])) for i in chosen]


def predict_paths(checkpoint, paths, device="cpu", fuse=None):
    """The model and, per image, per-group probabilities (fused with a second model when given), or
    the ImageError's message of an image that cannot be read (the others are still predicted)."""
    model, _ = load_model(checkpoint, device)
    other = None
    if fuse:
        other, _ = load_model(fuse, device)
        if other.config.groups != model.config.groups:
            raise ValueError(f"{fuse}: its groups or labels differ from {checkpoint}; cannot fuse")
    results = []
    for path in paths:
        try:
            probs = predict_images(model, [path], device)[0]
            if other is not None:
                probs = fuse_probabilities(probs, predict_images(other, [path], device)[0])
        except ImageError as err:
            probs = str(err)
        results.append(probs)
    return model, results


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    model, results = predict_paths(args.checkpoint, args.images, device, args.fuse)
    report = []
    for path, probs in zip(args.images, results):
        if isinstance(probs, str):  # unreadable: said, the others still shown
            report.append({"image": path, "error": probs})
            continue
        groups = {g: top_labels(p, model.config.groups[g], model.is_multi_label(g), args.top, args.threshold)
                  for g, p in probs.items()}
        report.append({"image": path, "labels": groups})
    failed = [entry for entry in report if "error" in entry]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for entry in report:
            if "error" in entry:
                print(f"retrieval predict: error: {entry['error']}", file=sys.stderr)
                continue
            print(entry["image"])
            for g, pairs in entry["labels"].items():
                print(f"  {g:<18} " + ", ".join(f"{label} {p:.2f}" for label, p in pairs))
    return 1 if failed else 0
