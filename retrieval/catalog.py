"""Read and validate a labelled catalog (``DIR/labels.csv`` plus images)."""
from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
RESERVED_COLUMNS = ("image", "split", "title")
SPLITS = ("train", "test")
LABEL_SEPARATOR = "|"


class CatalogError(ValueError):
    """A catalog that cannot be read; the message names the file, row or field."""


@dataclass(frozen=True)
class Item:
    """One catalog row: its id (0-based data row), image path, split, title and labels."""

    row_id: int
    image: str
    split: str
    title: str
    labels: dict[str, tuple[str, ...]]


@dataclass
class Catalog:
    """A parsed catalog: its root, attribute groups, label vocabularies and items."""

    root: Path
    groups: list[str]
    items: list[Item]
    vocab: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        if not self.vocab:
            self.vocab = build_vocab(self.items, self.groups)

    def __len__(self) -> int:
        return len(self.items)

    def path_of(self, item: Item) -> Path:
        """Absolute path of an item's image."""
        return self.root / item.image

    def split_items(self, split: str) -> list[Item]:
        """Items of one split (``train``, ``test``) or all of them (``all``)."""
        if split == "all":
            return list(self.items)
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of: train, test, all")
        return [item for item in self.items if item.split == split]

    def multi_label_groups(self) -> list[str]:
        """Groups where at least one item carries several labels."""
        return [g for g in self.groups if any(len(it.labels[g]) > 1 for it in self.items)]

    def by_image(self) -> dict[str, Item]:
        """Items keyed by their image path."""
        return {item.image: item for item in self.items}


def select_groups(catalog: Catalog, groups: list[str]) -> Catalog:
    """The same catalog seen through a subset of its attribute groups."""
    unknown = [g for g in groups if g not in catalog.groups]
    if unknown:
        raise ValueError(f"Unknown group(s) {', '.join(unknown)}; choose from: {', '.join(catalog.groups)}")
    return Catalog(catalog.root, list(groups), catalog.items, {g: catalog.vocab[g] for g in groups})


def hash_split(image: str, test_share: float = 0.2) -> str:
    """Deterministic train/test split from a hash of the image path."""
    digest = hashlib.sha256(image.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:4], "big") / 2**32 < test_share else "train"


def parse_labels(cell: str | None) -> tuple[str, ...]:
    """Split a cell into its labels; empty means unknown."""
    if not cell:
        return ()
    labels = [part.strip() for part in cell.split(LABEL_SEPARATOR)]
    return tuple(dict.fromkeys(label for label in labels if label))


def build_vocab(items: list[Item], groups: list[str]) -> dict[str, list[str]]:
    """Sorted label vocabulary of every group."""
    vocab: dict[str, set[str]] = {g: set() for g in groups}
    for item in items:
        for g in groups:
            vocab[g].update(item.labels[g])
    return {g: sorted(labels) for g, labels in vocab.items()}


def _check_header(header: list[str] | None, csv_path: Path) -> list[str]:
    if not header or "image" not in header:
        raise CatalogError(f"{csv_path}: missing header; the first line must be 'image,split,title,<group>,...'")
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise CatalogError(f"{csv_path}: duplicate columns {duplicates}")
    groups = [h for h in header if h not in RESERVED_COLUMNS]
    if not groups:
        raise CatalogError(f"{csv_path}: no attribute group columns besides {', '.join(RESERVED_COLUMNS)}")
    if any(not g.strip() for g in groups):
        raise CatalogError(f"{csv_path}: an attribute group column has an empty name")
    return groups


def _parse_row(row: dict, row_id: int, line: int, root: Path, groups: list[str], csv_path: Path,
               check_files: bool) -> Item:
    where = f"{csv_path}, line {line}"
    if None in row:
        raise CatalogError(f"{where}: more cells than header columns")
    image = (row.get("image") or "").strip()
    if not image:
        raise CatalogError(f"{where}: empty 'image' field")
    resolved = (root / image).resolve()
    if Path(image).is_absolute() or not resolved.is_relative_to(root.resolve()):
        raise CatalogError(f"{where}: image path {image!r} leaves the catalog directory {root}")
    if check_files and not resolved.is_file():
        raise CatalogError(f"{where}: image file {image!r} does not exist under {root}")
    split = (row.get("split") or "").strip()
    if "split" not in row:
        split = hash_split(image)
    elif split not in SPLITS:
        raise CatalogError(f"{where}: unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    labels = {g: parse_labels(row.get(g)) for g in groups}
    return Item(row_id, image, split, (row.get("title") or "").strip(), labels)


def read_catalog(root: str | Path, check_files: bool = True) -> Catalog:
    """Read ``root/labels.csv``; raise CatalogError naming the file and line on bad input."""
    root = Path(root)
    csv_path = root / LABELS_FILE
    if not csv_path.is_file():
        raise CatalogError(f"{csv_path}: not found; a catalog is a directory with labels.csv and images")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        groups = _check_header(reader.fieldnames, csv_path)
        items = []
        seen: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            item = _parse_row(row, len(items), line, root, groups, csv_path, check_files)
            if item.image in seen:
                raise CatalogError(f"{csv_path}, line {line}: image {item.image!r} already listed on line {seen[item.image]}")
            seen[item.image] = line
            items.append(item)
    if not items:
        raise CatalogError(f"{csv_path}: no rows")
    return Catalog(root, groups, items)


def summarize_catalog(catalog: Catalog) -> list[dict]:
    """Per-group summary: classes, labelled share, largest and smallest class."""
    rows = []
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
            "multi_label": g in catalog.multi_label_groups(),
            "largest": ranked[0] if ranked else None,
            "smallest": ranked[-1] if ranked else None,
        })
    return rows


def format_summary(catalog: Catalog) -> str:
    """Human-readable table of ``summarize_catalog``."""
    splits = {s: len(catalog.split_items(s)) for s in SPLITS}
    lines = [f"{catalog.root}: {len(catalog)} items ({splits['train']} train, {splits['test']} test), "
             f"{len(catalog.groups)} groups",
             f"{'group':<20} {'classes':>7} {'labelled':>9} {'multi':>5}  largest / smallest class"]
    for row in summarize_catalog(catalog):
        largest = "{} ({})".format(*row["largest"]) if row["largest"] else "-"
        smallest = "{} ({})".format(*row["smallest"]) if row["smallest"] else "-"
        lines.append(f"{row['group']:<20} {row['classes']:>7} {row['labelled']:>8.1%} "
                     f"{'yes' if row['multi_label'] else 'no':>5}  {largest} / {smallest}")
    return "\n".join(lines)
