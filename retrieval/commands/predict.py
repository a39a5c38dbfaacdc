"""``retrieval predict``: each group's labels with probabilities for image files."""
from __future__ import annotations

import argparse
import json

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
    p.add_argument("--threshold", type=float, default=0.5, help="probability shown for multi-label groups")
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
    """The model and, per image, per-group probabilities (fused with a second model when given)."""
    model, _ = load_model(checkpoint, device)
    results = predict_images(model, paths, device)
    if fuse:
        other, _ = load_model(fuse, device)
        if other.config.groups != model.config.groups:
            raise ValueError(f"{fuse}: its groups or labels differ from {checkpoint}; cannot fuse")
        results = [fuse_probabilities(a, b) for a, b in zip(results, predict_images(other, paths, device))]
    return model, results


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    try:
        model, results = predict_paths(args.checkpoint, args.images, device, args.fuse)
    except ImageError as err:
        raise ValueError(str(err)) from err
    report = []
    for path, probs in zip(args.images, results):
        groups = {g: top_labels(p, model.config.groups[g], model.is_multi_label(g), args.top, args.threshold)
                  for g, p in probs.items()}
        report.append({"image": path, "labels": groups})
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for entry in report:
        print(entry["image"])
        for g, pairs in entry["labels"].items():
            print(f"  {g:<18} " + ", ".join(f"{label} {p:.2f}" for label, p in pairs))
    return 0
