"""Synthetic catalogues and embedding files at any size for ``scripts/bench_scale.py``.

The catalogue has the shape of e-Clothing1.4M: 24 attribute groups, 830 labels (groups of 2 to 188
labels, Zipf-skewed within a group), three multi-label groups, groups labelled on 35-100% of the
items, and the corpus's share of test items. Every item has a true label per group; unknown cells
are only hidden in labels.csv, as in a real catalogue. ``EMB.h5`` is written through
``retrieval.data.embfile`` and ``retrieval.embed.shards`` (one work file merged, as ``retrieval embed`` does): a 256-d shared
vector drawn around the centroids of the item's labels plus noise, and per group the head
probabilities and the group view made from them by the file's own rule (``group_vectors``).

Images: one tiny JPEG hard-linked for every row (ext4 allows 65,000 links to a file, so one source
file per LINKS_PER_FILE rows), a directory of 1,000 rows each: the catalogue reader's existence
check sees real files at the cost of a directory entry per item.
"""
from __future__ import annotations

import csv
import json
import os
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.data.catalog import items_digest
from retrieval.data.embfile import group_vectors, open_partial
from retrieval.embed.shards import merge_shards, shard_path

# 24 groups, 830 labels: a few tiny groups (gender-like), many mid-sized, a few of 100+ (article types)
GROUP_SIZES = (2, 2, 3, 3, 4, 5, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 60, 80, 100, 120, 188)
MULTI_LABEL = (9, 13, 17)  # colour-like groups (10, 20, 40 labels): items may carry several labels
TEST_SHARE = 392_537 / (1_069_901 + 392_537)  # e-Clothing1.4M's test split
DIM = 256
NOISE = 0.25  # per dimension; the noise's norm (4) is close to the label signal's (~sqrt(24))
LINKS_PER_FILE = 50_000
CHUNK = 20_000
FORMAT_VERSION = 1  # bump when the generated data changes, so old --out folders are regenerated

Row = namedtuple("Row", "row_id image stat")  # what the shard merge reads of a catalogue item


@dataclass
class Spec:
    """Everything about the synthetic catalogue that does not depend on its size."""

    groups: list[str]
    labels: list[list[str]]
    label_p: list[np.ndarray]
    labelled: np.ndarray
    centroids: list[np.ndarray]
    seed: int

    @property
    def multi_label(self) -> list[str]:
        return [self.groups[i] for i in MULTI_LABEL]


def make_spec(seed: int = 0) -> Spec:
    """The label vocabularies, their frequencies, the labelled share and a centroid per label."""
    rng = np.random.default_rng([seed, 830])
    groups = [f"group{i:02d}" for i in range(len(GROUP_SIZES))]
    labels = [[f"g{i:02d}l{j:03d}" for j in range(c)] for i, c in enumerate(GROUP_SIZES)]
    label_p = []
    for c in GROUP_SIZES:
        p = 1.0 / np.arange(1, c + 1) ** 1.1
        label_p.append(p / p.sum())
    labelled = rng.permutation(np.linspace(1.0, 0.35, len(GROUP_SIZES)))
    labelled[0] = 1.0  # one group always known, as a category is
    centroids = []
    for c in GROUP_SIZES:
        v = rng.standard_normal((c, DIM)).astype(np.float32)
        centroids.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return Spec(groups, labels, label_p, labelled, centroids, seed)


def draw_labels(spec: Spec, gi: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-hot [m, C] true labels of group gi: one label, sometimes two or three in multi-label groups."""
    c = GROUP_SIZES[gi]
    y = np.zeros((m, c), dtype=np.float32)
    y[np.arange(m), rng.choice(c, m, p=spec.label_p[gi])] = 1
    if gi in MULTI_LABEL:
        for share in (0.35, 0.12):
            rows = np.flatnonzero(rng.random(m) < share)
            y[rows, rng.choice(c, len(rows), p=spec.label_p[gi])] = 1
    return y


def head_probabilities(y: np.ndarray, multi: bool, rng: np.random.Generator) -> np.ndarray:
    """What a trained head would say: the true labels likely, with noise (softmax, or sigmoids)."""
    logits = 4.0 * y + 1.5 * rng.standard_normal(y.shape, dtype=np.float32)
    if multi:
        return (1 / (1 + np.exp(-(logits - 2.0)))).astype(np.float32)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def cell_texts(spec: Spec, gi: int, y: np.ndarray, known: np.ndarray) -> list[str]:
    """labels.csv cells of one group: labels joined by '|', empty where the label is unknown."""
    names = spec.labels[gi]
    if gi not in MULTI_LABEL:
        cells = np.asarray(names, dtype=object)[y.argmax(axis=1)]
        cells[~known] = ""
        return cells.tolist()
    return ["|".join(names[j] for j in np.flatnonzero(row)) if k else "" for row, k in zip(y, known)]


def image_path(i: int) -> str:
    return f"images/{i // 1000:04d}/{i:07d}.jpg"


def make_chunk(spec: Spec, start: int, stop: int) -> tuple[list[list[str]], dict[str, np.ndarray]]:
    """labels.csv rows and EMB.h5 arrays of items start..stop-1 (deterministic per chunk)."""
    m = stop - start
    rng = np.random.default_rng([spec.seed, start])
    columns = [[image_path(i) for i in range(start, stop)],
               np.where(rng.random(m) < TEST_SHARE, "test", "train").tolist()]
    x = NOISE * rng.standard_normal((m, DIM), dtype=np.float32)
    probs, cells = {}, []
    for gi, g in enumerate(spec.groups):
        y, known = draw_labels(spec, gi, m, rng), rng.random(m) < spec.labelled[gi]
        if start == 0:  # every label is seen in labels.csv, so the catalogue's vocabulary is the heads'
            c = min(m, GROUP_SIZES[gi])
            y[:c], known[:c] = np.eye(GROUP_SIZES[gi], dtype=np.float32)[:c], True
        x += (y @ spec.centroids[gi]) / y.sum(axis=1, keepdims=True)
        probs[g] = head_probabilities(y, gi in MULTI_LABEL, rng)
        cells.append(cell_texts(spec, gi, y, known))
        if gi in (20, 23):  # titles name the item's label in two large groups: '?q=' has words to find
            columns.append(np.asarray(spec.labels[gi], dtype=object)[y.argmax(axis=1)].tolist())
    titles = [f"{a} {b} item {i}" for i, a, b in zip(range(start, stop), columns[-2], columns[-1])]
    rows = [list(r) for r in zip(columns[0], columns[1], titles, *cells)]
    arrays = {"vectors": x / np.linalg.norm(x, axis=1, keepdims=True)}
    arrays.update({f"probs/{g}": p for g, p in probs.items()})
    arrays.update({f"groups/{g}": v for g, v in group_vectors(probs, spec.multi_label).items()})
    return rows, arrays


def tiny_jpeg(path: Path, shade: int) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (shade % 256, 128, 96)).save(path, quality=80)


def link_images(root: Path, start: int, stop: int) -> None:
    """Hard links images/NNNN/NNNNNNN.jpg of rows start..stop-1 to shared tiny JPEGs."""
    src_dir = root / "images" / "_src"
    src_dir.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        src = src_dir / f"{i // LINKS_PER_FILE}.jpg"
        if not src.exists():
            tiny_jpeg(src, i // LINKS_PER_FILE)
        dst = root / image_path(i)
        if i % 1000 == 0 or i == start:
            dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)


def generate(out: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """Write OUT/catalog (labels.csv + images) and OUT/emb.h5 for n items; reused when already there
    for the same n, seed and format. Returns (catalog dir, embeddings file)."""
    catalog, emb = out / "catalog", out / "emb.h5"
    marker = out / "generated.json"
    stamp = {"n": n, "seed": seed, "format": FORMAT_VERSION}
    if marker.is_file() and json.loads(marker.read_text()) == stamp and emb.is_file():
        return catalog, emb
    if catalog.exists():
        import shutil

        shutil.rmtree(catalog)
    work = shard_path(emb, 0, 1)
    work.unlink(missing_ok=True)
    catalog.mkdir(parents=True)
    spec = make_spec(seed)
    meta = {"fingerprint": f"synthetic:bench_scale:{seed}", "backbone": "synthetic",
            "catalog": str(catalog.resolve()), "split": "all", "sigmoid_groups": json.dumps(spec.multi_label)}
    dims = {"vectors": DIM, **{f"{kind}/{g}": c for g, c in zip(spec.groups, GROUP_SIZES)
                               for kind in ("groups", "probs")}}
    items = [Row(i, image_path(i), None) for i in range(n)]
    f, _ = open_partial(work, n, dims, meta, items_digest(items))
    with f, open(catalog / "labels.csv", "w", newline="", encoding="utf-8") as out_csv:
        writer = csv.writer(out_csv)
        writer.writerow(["image", "split", "title", *spec.groups])
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            rows, arrays = make_chunk(spec, start, stop)
            writer.writerows(rows)
            f["outputs"][start:stop] = np.concatenate([arrays[name] for name in dims], axis=1)
            f["ok"][start:stop] = True
            f.attrs["done"] = stop
            link_images(catalog, start, stop)
    merge_shards(emb, items, meta, 1)
    marker.write_text(json.dumps(stamp))
    return catalog, emb
