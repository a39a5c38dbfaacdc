"""Prototype (issue 16): label-wise attention for multi-label groups, post hoc (the model's
``--label-attention`` trains the same classifier with the heads; this fits it alone, to try settings).

A multi-label group on pictures of several items (each item's colour, each item's type) asks each
label to find its own item, while the model pools every group's evidence through one attention and
one embedding. Here each multi-label group gets a classifier of its own on the frozen trunk's cells,
class-specific residual attention (CSRA; Zhu & Wu, ICCV 2021): a 1x1 layer scores every label in
every cell from the cell's features (its colour histogram, Hellinger-normalised, the log of its
colour mass, and the trunk map's channels, L2-normalised), and a label's logit is the mean of its
cell scores plus ``--lam`` times their softmax(``--temperature`` x score)-weighted mean. Trained on
the training split's cached cells (both mirror views) with the balanced loss, then sharpened with
the item loss (as the product's head fit is); its probabilities replace the trained model's for
that group, and the group view and the shared view (with the groups) are evaluated again.

Reads an ``experiment_transfer.py`` catalogue folder: ``trunk-cache.h5`` (the default's frozen
pass, learned colour weighting: per-cell colour mass, then the trunk map), ``default.h5`` and
``imagenet.h5``. The cache layout assumed is EfficientNet-Lite0's (``--map-channels 320``).

    python scripts/prototype_label_attention.py --catalog /tmp/standins/multicolour --run /tmp/transfer/multicolour
"""
from __future__ import annotations

import argparse
import json
import logging
import math

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from retrieval.data.catalog import read_catalog
from retrieval.data.embfile import (embedding_part, group_vectors, ranks_by_cosine, read_paths, read_probabilities,
                                    read_rows, shared_vectors)
from retrieval.data.standins import colour_group
from retrieval.evaluate.metrics import evaluate_retrieval, label_matrix
from retrieval.evaluate.report import match_rows
from retrieval.net.model import RetrievalModel


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", required=True)
    p.add_argument("--run", required=True, help="experiment_transfer.py's folder of the catalogue")
    p.add_argument("--lam", type=float, default=3.0, help="weight of the attended cell scores")
    p.add_argument("--temperature", type=float, default=3.0, help="sharpness of each label's attention")
    p.add_argument("--epochs", type=int, default=60, help="epochs of the balanced loss")
    p.add_argument("--fit-epochs", type=int, default=20, help="epochs of the item loss after them")
    p.add_argument("--map-channels", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    return p


class CellFeatures:
    """Per-cell features [N, F, cells] of cached rows, view 0 (as indexed) or 1 (mirrored)."""

    def __init__(self, path, map_channels: int):
        self.file = h5py.File(path, "r")
        key = json.loads(self.file.attrs["key"])
        self.bins = math.prod(key["colour"])
        self.cells = math.ceil(key["image_size"] / 32) ** 2
        self.channels = map_channels
        width = self.file["prefix"].shape[2]
        if key.get("colour_weighting") != "learned" or (self.bins + map_channels) * self.cells > width:
            raise SystemExit(f"{path}: not a learned-colour cache of the assumed layout")
        self.position = {p.decode() if isinstance(p, bytes) else p: i for i, p in enumerate(self.file["paths"][:])}

    def __call__(self, images: list[str], view: int) -> torch.Tensor:
        rows = np.array([self.position[i] for i in images])
        order = np.argsort(rows)
        stop = (self.bins + self.channels) * self.cells
        x = np.empty((len(rows), stop), dtype=np.float32)
        x[order] = self.file["prefix"][rows[order].tolist(), view, :stop]
        x *= self.file["prefix_scale"][:, view][rows][:, None]
        cells = torch.from_numpy(x[:, :self.bins * self.cells]).view(-1, self.bins, self.cells)
        trunk_map = torch.from_numpy(x[:, self.bins * self.cells:]).view(-1, self.channels, self.cells)
        return RetrievalModel.cell_features(cells, trunk_map)  # what the model's label attention reads


def fit_label_attention(train_x: list[torch.Tensor], y: torch.Tensor, args) -> torch.nn.Module:
    layer = torch.nn.Conv1d(train_x[0].shape[1], y.shape[1], 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3, weight_decay=1e-3)
    for epoch in range(args.epochs + args.fit_epochs):
        for batch in torch.randperm(len(y)).split(128):
            z = csra(layer, train_x[int(torch.randint(2, ()))][batch], args)
            loss = F.binary_cross_entropy_with_logits(z, y[batch], reduction="none")
            if epoch < args.epochs:  # balanced: the mean over positive labels plus the mean over negative ones
                pos = y[batch]
                loss = (loss * pos).sum(1) / pos.sum(1).clamp_min(1) + (loss * (1 - pos)).sum(1) / (1 - pos).sum(1).clamp_min(1)
            else:  # item: summed over labels
                loss = loss.sum(1)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
    return layer


def csra(layer, x: torch.Tensor, args) -> torch.Tensor:
    scores = layer(x)  # [N, labels, cells]
    return scores.mean(2) + args.lam * (torch.softmax(args.temperature * scores, 2) * scores).sum(2)


def means(report: dict, colour: str | None) -> list[float]:
    col = report["groups"].get(colour, {}) if colour else {}
    return [100 * report["mean"]["map_paper"], 100 * report["views"]["group"]["map_paper"],
            100 * col.get("map_paper", float("nan")), 100 * col.get("group_view", {}).get("map_paper", float("nan"))]


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    logging.disable(logging.WARNING)
    torch.manual_seed(args.seed)
    catalog = read_catalog(args.catalog, check_files=False)
    trained = f"{args.run}/default.h5"
    rows, items = match_rows(read_paths(trained), catalog, "test")
    emb, probs = read_rows(trained, rows), read_probabilities(trained, rows)
    sigmoid = set(emb.sigmoid_groups or ())
    if not sigmoid:
        raise SystemExit(f"{args.catalog}: no multi-label group")
    features = CellFeatures(f"{args.run}/trunk-cache.h5", args.map_channels)
    test_x = features([it.image for it in items], 0)
    train = [it for it in catalog.split_items("train") if any(it.labels[g] for g in sigmoid)]
    train_x = [features([it.image for it in train], v) for v in (0, 1)]  # read once for every group
    replaced = dict(probs)
    for g in sorted(sigmoid):
        keep = torch.tensor([bool(it.labels[g]) for it in train])
        y = torch.tensor(label_matrix([it.labels[g] for it in train if it.labels[g]], catalog.vocab[g]),
                         dtype=torch.float32)
        layer = fit_label_attention([x[keep] for x in train_x], y, args)
        with torch.no_grad():
            replaced[g] = torch.sigmoid(csra(layer, test_x, args)).numpy()
    labels = {g: [it.labels[g] for it in items] for g in catalog.groups}
    try:
        colour = colour_group(catalog)
    except ValueError:
        colour = None
    off_rows, _ = match_rows(read_paths(f"{args.run}/imagenet.h5"), catalog, "test")
    off = evaluate_retrieval(read_rows(f"{args.run}/imagenet.h5", off_rows).vectors, labels, k=50)
    base = [100 * off["mean"]["map_paper"], 100 * off["groups"][colour]["map_paper"] if colour else float("nan")]
    print(f"{args.catalog}: multi-label groups {', '.join(sorted(sigmoid))}; mAP@50 paper, test split; "
          f"shared / group view / colour shared / colour group view (gains over the off-the-shelf trunk)")
    for name, p in (("default", probs), ("label attention", replaced)):
        views, how = group_vectors(p, sigmoid), emb.attrs.get("shared_view", "embedding")
        report = evaluate_retrieval(shared_vectors(embedding_part(emb), p, sigmoid, how), labels, k=50,
                                    vectors_by_group=views, normalise=ranks_by_cosine(how))
        m = means(report, colour)
        gains = [m[0] - base[0], m[1] - base[0], m[2] - base[1], m[3] - base[1]]
        per_group = ", ".join(f"{g} {100 * report['groups'][g]['group_view']['map_paper']:.1f}" for g in sorted(sigmoid))
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in m)} | {' / '.join(f'{v:+.1f}' for v in gains)} | "
              f"group view of {per_group} |")


if __name__ == "__main__":
    main()
