"""Built-in demo catalog (docs/formats.md): drawn garments, imbalanced and partly missing labels."""
import csv
import logging
import math
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from retrieval.atomic import atomic_write

logger = logging.getLogger(__name__)

DEMO_GROUPS = ("category", "colours", "pattern", "sleeve", "gender")
HEADER = ("image", "split", "title") + DEMO_GROUPS
TEST_FRACTION = 0.2
MISSING_RATE = 0.05
SECOND_COLOUR_RATE = 0.3

CATEGORY_SHARES = {"tshirt": 0.26, "trousers": 0.18, "dress": 0.15, "skirt": 0.11, "shorts": 0.09,
                   "shirt": 0.08, "jacket": 0.07, "bag": 0.035, "hat": 0.025}
COLOURS = {  # name: (rgb, share)
    "black": ((32, 32, 34), 0.22), "white": ((242, 242, 240), 0.16), "blue": ((40, 80, 190), 0.16),
    "red": ((200, 32, 40), 0.12), "grey": ((128, 128, 130), 0.10), "green": ((40, 140, 60), 0.09),
    "yellow": ((238, 200, 40), 0.08), "pink": ((240, 140, 180), 0.07),
}
PATTERN_SHARES = {"plain": 0.55, "striped": 0.20, "dotted": 0.13, "checked": 0.12}
SLEEVE_SHARES = {  # only garments that have sleeves; the others get an empty (unknown) label
    "tshirt": {"short": 0.75, "long": 0.1, "sleeveless": 0.15},
    "shirt": {"short": 0.3, "long": 0.7}, "jacket": {"long": 0.9, "sleeveless": 0.1},
    "dress": {"sleeveless": 0.45, "short": 0.35, "long": 0.2},
}
GENDER_SHARES = {  # (women, men, unisex): correlated with category, but noisy
    "tshirt": (0.30, 0.30, 0.40), "trousers": (0.40, 0.45, 0.15), "dress": (0.90, 0.02, 0.08),
    "skirt": (0.90, 0.02, 0.08), "shorts": (0.35, 0.40, 0.25), "shirt": (0.30, 0.60, 0.10),
    "jacket": (0.35, 0.45, 0.20), "bag": (0.60, 0.05, 0.35), "hat": (0.20, 0.25, 0.55),
}
GENDERS = ("women", "men", "unisex")


def _ellipse(cx, cy, rx, ry, n=24):
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return list(zip((cx + rx * np.cos(angles)).tolist(), (cy + ry * np.sin(angles)).tolist()))


def _band(x0, x1, y0, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Unit-square polygons; each category has its own silhouette, a trim (where a second colour may
# go on plain garments) and detail lines (seams, zips) drawn in a darker shade.
BODIES = {
    "tshirt": [[(0.33, 0.2), (0.44, 0.17), (0.5, 0.23), (0.56, 0.17), (0.67, 0.2), (0.67, 0.82),
                (0.33, 0.82)]],
    "shirt": [[(0.33, 0.18), (0.45, 0.15), (0.5, 0.2), (0.55, 0.15), (0.67, 0.18), (0.67, 0.86),
               (0.5, 0.9), (0.33, 0.86)]],
    "jacket": [[(0.3, 0.18), (0.44, 0.13), (0.56, 0.13), (0.7, 0.18), (0.72, 0.8), (0.28, 0.8)]],
    "dress": [[(0.4, 0.14), (0.44, 0.14), (0.5, 0.21), (0.56, 0.14), (0.6, 0.14), (0.62, 0.42),
               (0.78, 0.9), (0.22, 0.9), (0.38, 0.42)]],
    "skirt": [[(0.37, 0.28), (0.63, 0.28), (0.76, 0.78), (0.24, 0.78)]],
    "trousers": [[(0.34, 0.1), (0.66, 0.1), (0.7, 0.9), (0.55, 0.9), (0.5, 0.32), (0.45, 0.9),
                  (0.3, 0.9)]],
    "shorts": [[(0.3, 0.3), (0.7, 0.3), (0.75, 0.66), (0.54, 0.68), (0.5, 0.46), (0.46, 0.68),
                (0.25, 0.66)]],
    "bag": [[(0.26, 0.42), (0.74, 0.42), (0.78, 0.82), (0.22, 0.82)],
            [(0.35, 0.43), (0.37, 0.22), (0.63, 0.22), (0.65, 0.43), (0.59, 0.43), (0.58, 0.28),
             (0.42, 0.28), (0.41, 0.43)]],
    "hat": [[(0.36, 0.3), (0.64, 0.3), (0.67, 0.58), (0.33, 0.58)],
            _ellipse(0.5, 0.59, 0.33, 0.06)],
}
TRIMS = {
    "tshirt": [_band(0.33, 0.67, 0.76, 0.82)], "dress": [_band(0.38, 0.62, 0.4, 0.46)],
    "skirt": [_band(0.37, 0.63, 0.28, 0.33)], "trousers": [_band(0.34, 0.66, 0.1, 0.15)],
    "shorts": [_band(0.3, 0.7, 0.3, 0.35)], "hat": [_band(0.35, 0.65, 0.5, 0.57)],
    "shirt": [[(0.45, 0.15), (0.5, 0.22), (0.41, 0.26)], [(0.55, 0.15), (0.5, 0.22), (0.59, 0.26)]],
    "jacket": [_band(0.28, 0.72, 0.74, 0.8), [(0.44, 0.13), (0.56, 0.13), (0.5, 0.24)]],
    "bag": [[(0.26, 0.42), (0.74, 0.42), (0.7, 0.56), (0.3, 0.56)]],
}
DETAILS = {
    "shirt": [[(0.5, 0.22), (0.5, 0.89)]],
    "jacket": [[(0.5, 0.24), (0.5, 0.8)], _band(0.34, 0.44, 0.56, 0.68),
               _band(0.56, 0.66, 0.56, 0.68)],
    "trousers": [[(0.5, 0.15), (0.5, 0.32)]],
}
SHOULDERS = {"tshirt": (0.33, 0.2), "shirt": (0.33, 0.18), "jacket": (0.31, 0.18),
             "dress": (0.4, 0.15)}


def sleeve_polygons(category, sleeve):
    """Return both sleeves of a top or dress as unit-square polygons (none when sleeveless)."""
    if sleeve not in ("short", "long"):
        return []
    sx, sy = SHOULDERS[category]
    if sleeve == "short":
        left = [(sx, sy), (sx - 0.16, sy + 0.14), (sx - 0.09, sy + 0.23), (sx, sy + 0.15)]
    else:
        left = [(sx, sy), (sx - 0.19, sy + 0.56), (sx - 0.1, sy + 0.59), (sx, sy + 0.2)]
    return [left, [(1 - x, y) for x, y in left]]


def allocate_counts(shares, n):
    """Split n items over classes in proportion to their shares (largest remainder)."""
    names = list(shares)
    raw = np.array([shares[k] for k in names]) * n / sum(shares.values())
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return dict(zip(names, counts.tolist()))


def _pick(rng, shares):
    names = list(shares)
    p = np.array([shares[k] for k in names], dtype=float)
    return names[rng.choice(len(names), p=p / p.sum())]


def sample_labels(rng, category):
    """Draw the true attributes of one garment of the given category."""
    colours = [_pick(rng, {k: s for k, (_, s) in COLOURS.items()})]
    if rng.random() < SECOND_COLOUR_RATE:
        colours.append(_pick(rng, {k: s for k, (_, s) in COLOURS.items() if k != colours[0]}))
    sleeve = _pick(rng, SLEEVE_SHARES[category]) if category in SLEEVE_SHARES else ""
    gender = GENDERS[rng.choice(3, p=GENDER_SHARES[category])]
    return {"category": category, "colours": "|".join(colours),
            "pattern": _pick(rng, PATTERN_SHARES), "sleeve": sleeve, "gender": gender}


def hide_labels(rng, labels):
    """Blank about MISSING_RATE of the known labels, never every group of one item."""
    known = [g for g in DEMO_GROUPS if labels[g]]
    hidden = [g for g in known if rng.random() < MISSING_RATE]
    if hidden and len(hidden) == len(known):
        hidden.pop(rng.integers(len(hidden)))
    return {g: ("" if g in hidden else labels[g]) for g in DEMO_GROUPS}


def make_title(labels):
    """Describe a garment in words, e.g. 'Red and white striped long-sleeve dress'."""
    words = [" and ".join(labels["colours"].split("|"))]
    if labels["pattern"] != "plain":
        words.append(labels["pattern"])
    if labels["sleeve"]:
        sleeve = labels["sleeve"]
        words.append(sleeve if sleeve == "sleeveless" else sleeve + "-sleeve")
    words.append("T-shirt" if labels["category"] == "tshirt" else labels["category"])
    text = " ".join(words)
    return text[0].upper() + text[1:]


def _jitter_colour(rng, name):
    rgb = np.array(COLOURS[name][0]) + rng.integers(-12, 13, 3)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def _shade(rgb, towards, amount):
    return tuple(int(round(c + (t - c) * amount)) for c, t in zip(rgb, towards))


def _tone(rgb):
    # A lighter or darker shade, so one-colour patterns stay visible without a second label.
    return _shade(rgb, (255,) * 3, 0.45) if sum(rgb) < 384 else _shade(rgb, (0,) * 3, 0.35)


def _placement(rng, size, narrow):
    """Return a function mapping unit-square points to jittered, rotated canvas pixels."""
    scale, angle = rng.uniform(0.85, 1.15), math.radians(rng.uniform(-7, 7))
    centre = 0.5 + rng.uniform(-0.06, 0.06, 2)
    cos, sin = math.cos(angle), math.sin(angle)
    matrix = scale * np.array([[cos, -sin], [sin, cos]]) @ np.diag([0.92 if narrow else 1.0, 1.0])
    return lambda poly: [tuple(p) for p in ((np.array(poly) - 0.5) @ matrix.T + centre) * size]


def draw_pattern(draw, rng, pattern, colour, size):
    """Fill the whole canvas with stripes, dots or checks in the given colour."""
    period = size * rng.uniform(0.07, 0.11)
    steps = np.arange(-period * rng.random(), size, period)
    if pattern == "striped":
        vertical = rng.random() < 0.4
        for s in steps:
            box = (s, 0, s + period / 2, size) if vertical else (0, s, size, s + period / 2)
            draw.rectangle(box, fill=colour)
    elif pattern == "dotted":
        r = period * 0.22
        for i, y in enumerate(steps):
            for x in steps + (period / 2 if i % 2 else 0):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif pattern == "checked":
        for i, y in enumerate(steps):
            for j, x in enumerate(steps):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + period, y + period), fill=colour)


def render_garment(rng, labels, image_size):
    """Draw one garment on a plain or lightly tinted background and return an RGB image."""
    size = image_size * 2  # drawn at twice the size, then downsampled for anti-aliasing
    category, pattern = labels["category"], labels["pattern"]
    colours = labels["colours"].split("|")
    main = _jitter_colour(rng, colours[0])
    second = _jitter_colour(rng, colours[1]) if len(colours) > 1 else None
    narrow = labels["gender"] == "women" and category in ("tshirt", "shirt", "jacket")
    place = _placement(rng, size, narrow)
    body = BODIES[category] + sleeve_polygons(category, labels["sleeve"])
    tint = rng.integers(4, 36, 3) if rng.random() < 0.5 else np.zeros(3, int)  # white or light
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in 255 - tint))
    fill = Image.new("RGB", (size, size), main)
    mask = Image.new("L", (size, size), 0)
    mask_draw, fill_draw = ImageDraw.Draw(mask), ImageDraw.Draw(fill)
    for poly in body:
        mask_draw.polygon(place(poly), fill=255)
    if pattern != "plain":
        draw_pattern(fill_draw, rng, pattern, second or _tone(main), size)
    elif second:
        for poly in TRIMS[category]:
            fill_draw.polygon(place(poly), fill=second)
    canvas.paste(fill, mask=mask)
    draw = ImageDraw.Draw(canvas)
    outline, width = _shade(main, (0, 0, 0), 0.5), max(1, size // 110)
    for poly in body + DETAILS.get(category, []):
        draw.line(place(poly + poly[:1] if len(poly) > 2 else poly), fill=outline, width=width)
    return degrade(rng, canvas.resize((image_size, image_size), Image.Resampling.LANCZOS))


def degrade(rng, image):
    """Apply a slight blur or mild sensor-like noise."""
    if rng.random() < 0.5:
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8)))
    noise = rng.normal(0, rng.uniform(2, 6), (image.height, image.width, 3))
    pixels = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_csv_atomic(path, rows):
    """Write rows to a CSV file through a temporary file in the same directory."""
    with atomic_write(path, newline="") as f:
        csv.writer(f).writerows(rows)


def make_demo_catalog(out_dir, n_items=480, seed=0, image_size=128, progress=False):
    """Generate the demo catalog in out_dir and return the path of its labels.csv."""
    if n_items < 1 or image_size < 32:
        raise ValueError(f"Need n_items >= 1 and image_size >= 32 (got {n_items}, {image_size})")
    out_dir = pathlib.Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = allocate_counts(CATEGORY_SHARES, n_items)
    categories = rng.permutation([c for c, k in counts.items() for _ in range(k)])
    n_test = max(1, round(n_items * TEST_FRACTION)) if n_items > 1 else 0
    test_rows = set(rng.permutation(n_items)[:n_test].tolist())
    rows = [HEADER]
    for i in tqdm(range(n_items), desc="demo catalog", unit="img", disable=not progress):
        item_rng = np.random.default_rng([seed, i])
        labels = sample_labels(item_rng, str(categories[i]))
        image = f"images/{i:06d}.jpg"
        render_garment(item_rng, labels, image_size).save(out_dir / image, "JPEG", quality=90)
        shown = hide_labels(item_rng, labels)
        rows.append((image, "test" if i in test_rows else "train", make_title(labels),
                     *(shown[g] for g in DEMO_GROUPS)))
    labels_path = out_dir / "labels.csv"
    write_csv_atomic(labels_path, rows)  # written last: a catalog exists only once images do
    logger.info("Wrote demo catalog %s (%d items, seed %d)", labels_path, n_items, seed)
    return labels_path
