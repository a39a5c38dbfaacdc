"""What `retrieval catalog-info` prints: per-group classes, labelled share, extremes; unreadable images."""
from __future__ import annotations

from retrieval.data.catalog import SPLITS, Catalog, untrainable_groups


def summarize_catalog(catalog: Catalog) -> list[dict]:
    """Per-group summary: classes, labelled share, largest and smallest class."""
    rows, multi = [], set(catalog.multi_label_groups())  # once: it scans every item of every group
    for g in catalog.groups:
        counts: dict[str, int] = {}
        labelled = 0
        for item in catalog.items:
            labelled += bool(item.labels[g])
            for label in item.labels[g]:
                counts[label] = counts.get(label, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        rows.append({
            "group": g,
            "classes": len(counts),
            "labelled": labelled / len(catalog.items),
            "multi_label": g in multi,
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
    return lines


def format_summary(catalog: Catalog) -> str:
    """Human-readable table of ``summarize_catalog``, then the groups left out and why."""
    splits = {s: len(catalog.split_items(s)) for s in SPLITS}
    lines = [f"{catalog.root}: {len(catalog)} items ({splits['train']} train, {splits['test']} test), "
             f"{len(catalog.groups)} groups",
             f"{'group':<20} {'classes':>7} {'labelled':>9} {'multi':>5}  largest / smallest class"]
    for row in summarize_catalog(catalog):
        largest = "{} ({})".format(*row["largest"]) if row["largest"] else "-"
        smallest = "{} ({})".format(*row["smallest"]) if row["smallest"] else "-"
        lines.append(f"{row['group']:<20} {row['classes']:>7} {row['labelled']:>8.1%} "
                     f"{'yes' if row['multi_label'] else 'no':>5}  {largest} / {smallest}")
    return "\n".join(lines + left_out_lines(catalog))


def unreadable_images(catalog: Catalog) -> list[str]:
    """``path: reason`` of every image that cannot be decoded, paths relative to the catalog."""
    from retrieval.data.images import ImageError, load_image

    bad = []
    for item in catalog.items:
        try:
            load_image(catalog.path_of(item), name=item.image)
        except ImageError as err:
            bad.append(str(err))
    return bad
