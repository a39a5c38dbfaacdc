"""What `retrieval catalog-info` prints: per-group classes, labelled share, extremes; unreadable images."""
from __future__ import annotations

import os
from collections import Counter

from retrieval.data.catalog import SPLITS, Catalog, label_counts, untrainable_groups


def summarize_catalog(catalog: Catalog) -> list[dict]:
    """Per-group summary: classes, labelled share, largest and smallest class."""
    rows = []
    for g in catalog.groups:
        cells = Counter(item.labels[g] for item in catalog.items)  # label tuples are few: count those
        counts = label_counts(cells)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        rows.append({
            "group": g,
            "classes": len(counts),
            "labelled": (len(catalog.items) - cells[()]) / len(catalog.items),
            "multi_label": any(len(labels) > 1 for labels in cells),
            "largest": ranked[0] if ranked else None,
            "smallest": ranked[-1] if ranked else None,
        })
    return rows


def left_out_lines(catalog: Catalog) -> list[str]:
    """One line per group that is not used at all, or not trained, with the reason."""
    lines = [f"left out: group {g!r} ({why}); not trained, embedded, evaluated or shown"
             for g, why in catalog.left_out.items()]
    lines += [f"not trained: group {g!r} ({why}); evaluated but has no head"
              for g, why in untrainable_groups(catalog).items()]
    lines += [f"one label: group {g!r} (every labelled item is {labels[0]!r}); it tells no item apart, and "
              "every ranking scores 100 in it, so the evaluation leaves it out of the means"
              for g, labels in catalog.vocab.items() if len(labels) == 1]
    for g, labels in catalog.vocab.items():
        joined = composite_labels(labels)
        if joined:
            lines.append(f"several labels in one cell? group {g!r} has {len(joined)} labels made of its other labels "
                         f"(e.g. {joined[0]!r}); separate the labels of a cell with '|' to make the group multi-label")
        same = same_numbers(labels)
        if same:
            lines.append(f"one number written several ways? group {g!r} has {len(same)} numbers with more than one "
                         f"spelling (e.g. {' / '.join(map(repr, same[0]))}: a spreadsheet's '38.0' for '38'), each a "
                         f"label of its own; write each number one way")
    return lines


def same_numbers(labels: list[str]) -> list[list[str]]:
    """The spellings of each number that more than one label of a group writes ('38', '38.0', '038'),
    the most spellings first."""
    by_value: dict[float, list[str]] = {}
    for label in labels:
        try:
            value = float(label)
        except ValueError:
            continue
        if value == value and abs(value) != float("inf"):  # not nan / inf ('nan' is a word here)
            by_value.setdefault(value, []).append(label)
    return sorted((spellings for spellings in by_value.values() if len(spellings) > 1), key=len, reverse=True)


def composite_labels(labels: list[str]) -> list[str]:
    """The labels that are two or more of the group's other labels joined by ',' or ';' ('Black, White'
    beside 'Black' and 'White'): a multi-label cell written with another separator than '|'."""
    known = set(labels)
    found = []
    for label in labels:
        for separator in (",", ";"):
            parts = [part.strip() for part in label.split(separator)]
            if len(parts) > 1 and all(part in known for part in parts):
                found.append(label)
                break
    return found


WIDE_GROUP = 1000  # labels from which catalog-info names a group's cost in EMB.h5 and the index


def format_summary(catalog: Catalog) -> str:
    """Human-readable table of ``summarize_catalog``, then the groups left out and why."""
    splits = {s: len(catalog.split_items(s)) for s in SPLITS}
    counts = ", ".join(f"{n} {s}" for s, n in splits.items() if n or s != "val")
    lines = [f"{catalog.root}: {len(catalog)} items ({counts}), {len(catalog.groups)} groups",
             f"{'group':<20} {'classes':>7} {'labelled':>9} {'multi':>5}  largest / smallest class"]
    for row in summarize_catalog(catalog):
        largest = "{} ({})".format(*row["largest"]) if row["largest"] else "-"
        smallest = "{} ({})".format(*row["smallest"]) if row["smallest"] else "-"
        lines.append(f"{row['group']:<20} {row['classes']:>7} {row['labelled']:>8.1%} "
                     f"{'yes' if row['multi_label'] else 'no':>5}  {largest} / {smallest}")
    return "\n".join(lines + size_lines(catalog) + left_out_lines(catalog))


def size_lines(catalog: Catalog, embed_dim: int = 256) -> list[str]:
    """What a trained model's EMB.h5 holds an item (the shared view: the embedding and every label's
    probability; each group's view and probabilities: two values a label), and for a group of many
    labels (a brand, a product id) the share of it that group is and what keeps it small."""
    from retrieval.atomic import size_text

    labels = sum(len(catalog.vocab[g]) for g in catalog.groups)
    values = embed_dim + 3 * labels
    lines = [f"a trained model's EMB.h5: ~{size_text(4 * values * len(catalog))} ({values:,} values an item: "
             f"the embedding's {embed_dim} and three for each of the {labels:,} labels)"]
    wide = [g for g in catalog.groups if len(catalog.vocab[g]) >= WIDE_GROUP]
    if wide:
        lines.append(f"many labels: {', '.join(f'{g!r} ({len(catalog.vocab[g]):,})' for g in wide)}; each label "
                     "is a value of every item in EMB.h5 and the index's shared view (index build --shared-view "
                     "embedding keeps the shared view to the embedding's)")
    return lines


def unreadable_images(catalog: Catalog, workers: int | None = None, progress: bool = False) -> list[str]:
    """``path: reason`` of every image that cannot be decoded, paths relative to the catalog, in
    catalog order; images are decoded on a thread pool (Pillow releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(lambda item: _decode_error(catalog, item), catalog.items, chunksize=64)
        bad = [error for error in tqdm(found, total=len(catalog), desc="verify images", unit="image",
                                       disable=not progress) if error]
    return bad


# --verify-images decodes a JPEG as training does (at a reduced scale, whose whole stream is still read),
# here for a model of up to this many pixels a side: what training reads, it accepts
VERIFY_SIZE = 1024


def _decode_error(catalog: Catalog, item) -> str | None:
    """Why an item's image cannot be decoded, or None."""
    from retrieval.data.images import ImageError, load_image

    try:
        load_image(catalog.path_of(item), name=item.image, size=VERIFY_SIZE)
    except ImageError as err:
        return str(err)
    return None
