"""Stand-in catalogues of other kinds, generated from a labelled catalog of studio product photos.

Defaults tuned on one catalogue are checked on catalogues unlike it (issue 16), all drawn
deterministically from a seed and keeping the source's group names:

- ``street``: each garment cut from its white studio background (near-white pixels connected to
  the border), scaled down and pasted off-centre onto procedural clutter (gradients, shapes, noise,
  crops of other photos), then lit warmer or cooler, brighter or darker;
- ``multicolour``: a garment with one or two other items beside it on white; the colour group
  becomes multi-label (the distinct colours of the items shown, 1–3 labels), the other groups keep
  the main garment's labels;
- ``multilabel``: the multicolour stand-in's images (the same seed draws the same pictures) with a
  second multi-label group, as a street catalogue with several multi-label groups (colour,
  pattern) has: the finest other group (the most labels: articleType) lists every shown item's
  label too;
- ``missing``: every image of the source (hard-linked, so a trunk cache of the source serves it)
  with each group's labels kept on the paper's shares of the items only (``--label-dropout paper``);
- ``noisy``: every image of the source (hard-linked) with wrong labels in training, as a
  catalogue labelled in a hurry has: in each group, ``NOISE`` of the labelled training items take
  the labels of another labelled training item drawn at random (so the classes keep their shares,
  and some draws repeat the true label); the test split keeps its labels, so that test scores
  measure what the noise did to training. Made from a street stand-in, it stands for street photos
  labelled by hand;
- ``wide``: every image of the source (hard-linked) with four more groups beside the source's, as a
  catalogue of many groups has (the issue's street catalogue: 11 groups, multi-label colour and
  pattern): ``colourFamily``, multi-label, the family of each colour shown (``colour_family``:
  dark, neutral, warm, cool or other, by the colour's name); ``mainColour``, the first colour label
  alone; ``department``, the first two other groups' labels joined (``Men / Apparel``); ``occasion``,
  multi-label, the last two other groups' labels together; each new group kept on a share of the
  items only (``WIDE_KEEP``). Made from the street, multi-label stand-in it has 11 groups, four of
  them multi-label.
- ``snapshot``: each garment as a phone snapshot of it, as a small shop or a marketplace seller
  takes them: cut from white, larger than on the street (55–85% of the frame), turned up to 25
  degrees, with a soft shadow on a plain backdrop (one muted colour, uneven light, a weave), a
  stronger colour cast than the street's, then a low-resolution camera and a harsh JPEG. Drawn on
  2026-11-29 after every default was chosen: a check, never used to choose.
"""
from __future__ import annotations

import colorsys
import io
import logging
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFilter
from scipy import ndimage
from tqdm import tqdm

from retrieval.data.catalog import LABEL_SEPARATOR, LABELS_FILE, Catalog, Item, link_or_copy, read_catalog
from retrieval.data.datasets import drop_labels, parse_dropout_profile
from retrieval.data.demo import write_csv_atomic
from retrieval.data.images import load_image

logger = logging.getLogger(__name__)

KINDS = ("street", "multicolour", "multilabel", "missing", "noisy", "wide", "snapshot")
NOISE = 0.3  # share of the labelled training items whose labels the noisy stand-in replaces, per group
WIDE_KEEP = {"colourFamily": 1.0, "mainColour": 0.7, "department": 0.8, "occasion": 0.5}  # items labelled
SIDE = 256  # stand-in images are SIDE × SIDE
WHITE = 235  # a background pixel has every channel at least this bright


def garment_mask(rgb: np.ndarray, threshold: int = WHITE) -> np.ndarray:
    """HW float alpha of the product: 0 on near-white pixels connected to the image border (the
    studio background), 1 elsewhere (white parts inside the garment stay), edges softened."""
    near_white = rgb.min(axis=2) >= threshold
    regions, _ = ndimage.label(near_white)
    edge = np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])
    background = np.isin(regions, np.unique(edge[edge > 0]))
    return ndimage.gaussian_filter((~background).astype(np.float32), 0.8)


def cut_out(image: Image.Image, longest: int) -> Image.Image:
    """The product as RGBA (background transparent), cropped to it and scaled so its longer side
    is ``longest`` pixels."""
    rgb = np.asarray(image.convert("RGB"))
    alpha = garment_mask(rgb)
    rows, cols = np.nonzero(alpha > 0.5)
    if len(rows) == 0:  # nothing but white: keep the whole photo
        rows, cols = np.array([0, rgb.shape[0] - 1]), np.array([0, rgb.shape[1] - 1])
    crop = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    rgba = np.dstack([rgb, (alpha * 255).astype(np.uint8)])
    product = Image.fromarray(rgba, "RGBA").crop(crop)
    scale = longest / max(product.size)
    return product.resize((max(1, round(product.width * scale)), max(1, round(product.height * scale))),
                          Image.Resampling.BILINEAR)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def clutter(rng: np.random.Generator, crops: list[Image.Image]) -> Image.Image:
    """A cluttered, coloured background: a two-colour gradient, random shapes, pasted crops of other
    photos, blur and sensor noise."""
    t = np.linspace(0, 1, SIDE, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None], 0, 1)[..., None]
    a, b = np.array(_random_colour(rng)), np.array(_random_colour(rng))
    canvas = Image.fromarray((a * (1 - ramp) + b * ramp).astype(np.uint8))
    draw = ImageDraw.Draw(canvas, "RGBA")
    for _ in range(rng.integers(4, 12)):
        x0, y0 = rng.integers(-SIDE // 4, SIDE, 2)
        w, h = rng.integers(SIDE // 10, SIDE // 2, 2)
        fill = (*_random_colour(rng), int(rng.integers(120, 256)))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=fill)
    for crop in crops:
        w = int(rng.integers(SIDE // 5, SIDE // 2))
        canvas.paste(crop.resize((w, w)), tuple(int(v) for v in rng.integers(-w // 2, SIDE - w // 2, 2)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2.0)))
    noise = rng.normal(0, rng.uniform(3, 10), (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(np.asarray(canvas, np.float32) + noise, 0, 255).astype(np.uint8))


def relight(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """A lighting shift: colour temperature (red against blue gain) and brightness."""
    warmth, brightness = rng.uniform(-0.15, 0.15), rng.uniform(0.7, 1.2)
    gains = brightness * np.array([1 + warmth, 1.0, 1 - warmth], np.float32)
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * gains, 0, 255).astype(np.uint8))


def street_image(rng: np.random.Generator, garment: Image.Image, others: list[Image.Image]) -> Image.Image:
    """The garment scaled to 40–70% of the frame, pasted off-centre onto clutter, relit."""
    product = cut_out(garment, int(rng.uniform(0.4, 0.7) * SIDE))
    crops = [_random_crop(rng, o) for o in others]
    canvas = clutter(rng, crops)
    x = int(rng.integers(0, SIDE - product.width + 1))
    y = int(rng.integers(0, SIDE - product.height + 1))
    canvas.paste(product, (x, y), product)
    return relight(rng, canvas)


def backdrop(rng: np.random.Generator) -> Image.Image:
    """A plain surface under uneven light, as a garment laid on a floor, bed or table is shot: one
    muted colour, a brightness falloff from a random point, a weave-like texture and sensor noise."""
    hue, light, saturation = rng.uniform(0, 1), rng.uniform(0.35, 0.85), rng.uniform(0.05, 0.35)
    base = np.array(colorsys.hls_to_rgb(hue, light, saturation), np.float32) * 255
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    cy, cx = rng.uniform(-0.2, 1.2, 2)
    falloff = 1.15 - rng.uniform(0.2, 0.5) * np.hypot(yy - cy, xx - cx)
    period = rng.uniform(3, 8)
    weave = 1 + rng.uniform(0.02, 0.06) * np.sin(2 * np.pi * xx * SIDE / period) * np.sin(2 * np.pi * yy * SIDE / period)
    pixels = base * (falloff * weave)[..., None] + rng.normal(0, rng.uniform(2, 6), (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def snapshot_image(rng: np.random.Generator, garment: Image.Image) -> Image.Image:
    """The garment as a phone snapshot of it: 55–85% of the frame, turned up to 25 degrees, off
    centre, with a soft shadow, on a ``backdrop``; then a cast (±25% red against blue), brightness
    0.65–1.15, the camera's low resolution (96–160 px scaled back up) and a JPEG of quality 20–50."""
    product = cut_out(garment, int(rng.uniform(0.55, 0.85) * SIDE))
    product = product.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BILINEAR, expand=True)
    if max(product.size) > SIDE:  # turned, it may outgrow the frame
        product.thumbnail((SIDE, SIDE), Image.Resampling.BILINEAR)
    canvas = backdrop(rng)
    x = int(rng.integers(0, SIDE - product.width + 1))
    y = int(rng.integers(0, SIDE - product.height + 1))
    shade = product.getchannel("A").filter(ImageFilter.GaussianBlur(6)).point(lambda a: int(a * 0.45))
    dx, dy = (int(v) for v in rng.integers(3, 10, 2))
    canvas.paste((0, 0, 0), (x + dx, y + dy), shade)
    canvas.paste(product, (x, y), product)
    warmth, brightness = rng.uniform(-0.25, 0.25), rng.uniform(0.65, 1.15)
    gains = brightness * np.array([1 + warmth, 1.0, 1 - warmth], np.float32)
    canvas = Image.fromarray(np.clip(np.asarray(canvas, np.float32) * gains, 0, 255).astype(np.uint8))
    low = int(rng.integers(96, 161))
    canvas = canvas.resize((low, low), Image.Resampling.BILINEAR).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=int(rng.integers(20, 51)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _random_crop(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    w = int(rng.integers(image.width // 4, image.width // 2 + 1))
    x, y = (int(v) for v in rng.integers(0, image.width - w + 1, 2))
    return image.convert("RGB").crop((x, y, x + w, y + w))


def multicolour_image(rng: np.random.Generator, images: list[Image.Image]) -> Image.Image:
    """The first image's product large on the left, the others smaller beside it, on white."""
    canvas = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
    sizes = [int(rng.uniform(0.6, 0.75) * SIDE)] + [int(rng.uniform(0.35, 0.5) * SIDE)] * (len(images) - 1)
    for i, (image, size) in enumerate(zip(images, sizes)):
        product = cut_out(image, size)
        x = 0 if i == 0 else SIDE - product.width
        y = (SIDE - product.height) // 2 if i < 2 else SIDE - product.height
        canvas.paste(product, (x, y), product)
    return canvas


def _row(item: Item, groups: list[str], image: str, labels: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    labels = item.labels if labels is None else labels
    return [image, item.split, item.title, *(LABEL_SEPARATOR.join(labels[g]) for g in groups)]


def colour_group(catalog: Catalog) -> str:
    """The source's colour group: the first whose name says colour."""
    found = [g for g in catalog.groups if "colo" in g.lower()]
    if not found:
        raise ValueError(f"{catalog.root}: no colour group among {', '.join(catalog.groups)}")
    return found[0]


def _street_row(catalog: Catalog, out: Path, seed: int, i: int, index: int) -> list[str]:
    item_rng = np.random.default_rng([seed, i])
    others = [catalog.items[j] for j in item_rng.integers(0, len(catalog.items), item_rng.integers(1, 4))]
    image = street_image(item_rng, load_image(catalog.path_of(catalog.items[index])),
                         [load_image(catalog.path_of(o)) for o in others])
    path = f"images/{i:06d}.jpg"
    image.save(out / path, "JPEG", quality=90)
    return _row(catalog.items[index], catalog.groups, path)


def _snapshot_row(catalog: Catalog, out: Path, seed: int, i: int, index: int) -> list[str]:
    image = snapshot_image(np.random.default_rng([seed, i]), load_image(catalog.path_of(catalog.items[index])))
    path = f"images/{i:06d}.jpg"
    image.save(out / path, "JPEG", quality=95)  # the snapshot's own JPEG artefacts are in its pixels
    return _row(catalog.items[index], catalog.groups, path)


def capped(n_items: int, available: int, what: str) -> int:
    """``n_items``, or the ``available`` count when that is fewer (each source image is drawn once),
    with a warning saying so."""
    if n_items > available:
        logger.warning("--n-items %d: the source catalog has %d %s, each drawn once; the stand-in has %d",
                       n_items, available, what, available)
    return min(n_items, available)


def make_drawn(catalog: Catalog, out: Path, n_items: int, seed: int, workers: int = 1,
               kind: str = "street") -> list[list[str]]:
    """Rows of a kind drawn one source image each, ``street`` (``street_image``) or ``snapshot``
    (``snapshot_image``); images written under ``out/images``."""
    row = {"street": _street_row, "snapshot": _snapshot_row}[kind]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(catalog.items), size=capped(n_items, len(catalog.items), "images"), replace=False)
    return _rows(partial(row, catalog, out, seed), chosen, workers, f"{kind} stand-in")


def _multicolour_row(catalog: Catalog, coloured: list[Item], shared: tuple[str, ...], out: Path, seed: int,
                     i: int, index: int) -> list[str]:
    item_rng = np.random.default_rng([seed, i])
    extra = int(item_rng.choice(3, p=[0.25, 0.5, 0.25]))
    shown = [coloured[index]] + [coloured[j] for j in item_rng.integers(0, len(coloured), extra)]
    image = multicolour_image(item_rng, [load_image(catalog.path_of(it)) for it in shown])
    path = f"images/{i:06d}.jpg"
    image.save(out / path, "JPEG", quality=90)
    every = {g: tuple(dict.fromkeys(c for it in shown for c in it.labels[g])) for g in shared}
    return _row(coloured[index], catalog.groups, path, {**coloured[index].labels, **every})


def finest_group(catalog: Catalog, besides: str) -> str:
    """The group with the most labels other than ``besides`` (the first of a tie)."""
    others = [g for g in catalog.groups if g != besides]
    if not others:
        raise ValueError(f"{catalog.root}: no group besides {besides!r} to make multi-label")
    return max(others, key=lambda g: len(catalog.vocab[g]))


def make_multicolour(catalog: Catalog, out: Path, n_items: int, seed: int, workers: int = 1,
                     kind: str = "multicolour") -> list[list[str]]:
    """Rows of garments shown with 0–2 other items; the colour group (and for ``multilabel`` the
    finest other group) lists every item's labels."""
    colour = colour_group(catalog)
    shared = (colour,) if kind == "multicolour" else (colour, finest_group(catalog, colour))
    coloured = [it for it in catalog.items if it.labels[colour]]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(coloured), size=capped(n_items, len(coloured), f"images with a {colour!r} label"),
                        replace=False)
    return _rows(partial(_multicolour_row, catalog, coloured, shared, out, seed), chosen, workers,
                 f"{kind} stand-in")


def _rows(make_row, chosen: np.ndarray, workers: int, desc: str) -> list[list[str]]:
    """``make_row(i, index)`` for each chosen source index, in order; each image draws from its own
    seed, so any number of worker processes gives the same catalog."""
    jobs = (range(len(chosen)), [int(c) for c in chosen])
    if workers <= 1:
        return [make_row(i, index) for i, index in tqdm(zip(*jobs), total=len(chosen), desc=desc, unit="img")]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(make_row, *jobs, chunksize=64), total=len(chosen), desc=desc, unit="img"))


def make_missing(catalog: Catalog, out: Path, seed: int) -> list[list[str]]:
    """Rows of every item, its images linked, each group's labels kept on the paper's shares."""
    keep = parse_dropout_profile("paper", len(catalog.groups))
    rows = []
    for item in drop_labels(catalog.items, catalog.groups, keep, seed):
        link_or_copy(catalog.path_of(item), out / item.image)
        rows.append(_row(item, catalog.groups, item.image))
    return rows


def make_noisy(catalog: Catalog, out: Path, seed: int, rate: float = NOISE) -> list[list[str]]:
    """Rows of every item, its images linked; in each group a share ``rate`` of the labelled training
    items take the labels of a random labelled training item (seeded by group position)."""
    labels = {i: dict(item.labels) for i, item in enumerate(catalog.items)}
    for position, g in enumerate(catalog.groups):
        rng = np.random.default_rng([seed, position])
        pool = [i for i, item in enumerate(catalog.items) if item.split == "train" and item.labels[g]]
        if not pool:
            continue
        changed = rng.choice(len(pool), size=round(rate * len(pool)), replace=False)
        donors = rng.integers(0, len(pool), len(changed))
        for c, d in zip(changed, donors):
            labels[pool[c]][g] = catalog.items[pool[d]].labels[g]
    rows = []
    for i, item in enumerate(catalog.items):
        link_or_copy(catalog.path_of(item), out / item.image)
        rows.append(_row(item, catalog.groups, item.image, labels[i]))
    return rows


def _new_group_names(groups: list[str]) -> dict[str, str]:
    """``WIDE_KEEP``'s names, each followed by 2s until no source group has it."""
    names = {}
    for name in WIDE_KEEP:
        new = name
        while new in groups or new in names.values():
            new += "2"
        names[name] = new
    return names


def colour_family(name: str) -> str:
    """A colour label's family by its name read as a CSS colour (the whole name without spaces, else
    its words, first to last: 'Navy Blue' is navy): ``dark`` (lightness under 0.2), ``neutral``
    (saturation under 0.2), ``warm`` (hues from red through yellow, and pinks), ``cool`` (the rest),
    ``other`` when no name is known ('Multi', 'Charcoal')."""
    words = name.lower().split()
    for key in ["".join(words), *words]:
        try:
            r, g, b = ImageColor.getrgb(key)[:3]
        except ValueError:
            continue
        hue, light, saturation = colorsys.rgb_to_hls(r / 255, g / 255, b / 255)
        if light < 0.2:
            return "dark"
        if saturation < 0.2:
            return "neutral"
        return "warm" if hue < 1 / 6 or hue >= 5 / 6 else "cool"
    return "other"


def wide_labels(item: Item, colour: str, others: list[str], family: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """The wide stand-in's four new groups of an item (before any are dropped), by ``WIDE_KEEP``'s names:
    ``colour`` is the source's colour group, ``others`` its other groups, ``family`` each colour's family."""
    colours = item.labels[colour]
    joined = " / ".join(item.labels[g][0] for g in others[:2]) if all(item.labels[g] for g in others[:2]) else ""
    return {"colourFamily": tuple(dict.fromkeys(family[c] for c in colours)),
            "mainColour": colours[:1],
            "department": (joined,) if joined else (),
            "occasion": tuple(dict.fromkeys(label for g in others[-2:] for label in item.labels[g]))}


def make_wide(catalog: Catalog, out: Path, seed: int) -> tuple[list[str], list[list[str]]]:
    """(groups, rows) of every item, its images linked, with four new groups (``wide_labels``), each
    kept on its ``WIDE_KEEP`` share of the items (seeded by the group's position)."""
    colour = colour_group(catalog)
    others = [g for g in catalog.groups if g != colour]
    if len(others) < 2:
        raise ValueError(f"{catalog.root}: the wide stand-in needs two groups besides {colour!r}")
    family = {c: colour_family(c) for c in catalog.vocab[colour]}
    names = _new_group_names(catalog.groups)
    new = [wide_labels(item, colour, others, family) for item in catalog.items]
    for position, name in enumerate(WIDE_KEEP):
        dropped = np.random.default_rng([seed, 100 + position]).random(len(new)) >= WIDE_KEEP[name]
        for labels, drop in zip(new, dropped):
            if drop:
                labels[name] = ()
    rows = []
    for item, labels in zip(catalog.items, new):
        link_or_copy(catalog.path_of(item), out / item.image)
        rows.append(_row(item, catalog.groups, item.image) + [LABEL_SEPARATOR.join(labels[n]) for n in WIDE_KEEP])
    return [*catalog.groups, *names.values()], rows


def make_standin(source: str | Path, out: str | Path, kind: str, n_items: int = 2000, seed: int = 0,
                 workers: int = 1) -> Path:
    """Write a stand-in catalog of ``kind`` drawn from ``source`` into ``out``; returns its labels.csv.

    Args:
        source: a catalog of product photos on white (``labels.csv`` + images).
        out: folder of the stand-in (created; must not be the source).
        kind: one of ``KINDS``.
        n_items: how many images ``street``, ``snapshot``, ``multicolour`` and ``multilabel`` draw (``missing``, ``noisy``
            and ``wide`` keep them all).
        seed: the same seed gives the same catalog.
        workers: processes drawing the images (the catalog is the same for any number).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown stand-in kind {kind!r}; choose one of: {', '.join(KINDS)}")
    catalog, out = read_catalog(source), Path(out)
    if out.resolve() == catalog.root.resolve():
        raise ValueError(f"{out}: a stand-in must go to a new folder, not over its source")
    (out / "images").mkdir(parents=True, exist_ok=True)
    groups = catalog.groups
    if kind == "wide":
        groups, rows = make_wide(catalog, out, seed)
    elif kind == "missing":
        rows = make_missing(catalog, out, seed)
    elif kind == "noisy":
        rows = make_noisy(catalog, out, seed)
    elif kind in ("street", "snapshot"):
        rows = make_drawn(catalog, out, n_items, seed, workers, kind)
    else:
        rows = make_multicolour(catalog, out, n_items, seed, workers, kind)
    labels = out / LABELS_FILE
    write_csv_atomic(labels, [["image", "split", "title", *groups], *rows])  # last: images exist
    logger.info("Wrote %s stand-in %s (%d items, seed %d)", kind, labels, len(rows), seed)
    return labels
