"""Read and validate a labelled catalog (``DIR/labels.csv`` plus images)."""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
RESERVED_COLUMNS = ("image", "split", "title")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # an image cell that is a web address (https://cdn...)
SPLITS = ("train", "val", "test")
# a split cell as catalogues write it (any letter case) -> the split: a ``val`` split is the validation
# items training selects its checkpoint by (without one, ``--val-fraction`` of the train split)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
LABEL_SEPARATOR = "|"
# what programs write for a missing value (pandas' NaN and <NA>, SQL's NULL, Excel's #N/A): no
# attribute of a garment is called so, so a label spelt so is unknown, as an empty cell is; NA, N/A
# and None stay labels (a bag's sleeve length "N/A", a collar "None")
MISSING_MARKERS = frozenset({"nan", "null", "#n/a"})  # in any letter case
MISSING_EXACT = frozenset({"<NA>", "NaT"})  # as pandas writes them: "NAT" / "Nat" may be a colour code (natural)
MIN_UNSHARED_ITEMS = 20  # a group is judged an identifier column (unshared_labels) from this many labelled items


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
    stat: tuple[int, int] | None = field(default=None, compare=False, repr=False)  # (size, mtime_ns) when read


@dataclass
class Catalog:
    """A parsed catalog: its root, attribute groups, label vocabularies and items."""

    root: Path
    groups: list[str]
    items: list[Item]
    vocab: dict[str, list[str]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # group -> why it is not used

    def __post_init__(self):
        if not self.vocab:
            self.vocab = build_vocab(self.items, self.groups)

    def __len__(self) -> int:
        return len(self.items)

    def path_of(self, item: Item) -> Path:
        """Absolute path of an item's image."""
        return self.root / item.image

    def split_items(self, split: str) -> list[Item]:
        """Items of one split (``train``, ``val``, ``test``) or all of them (``all``)."""
        if split == "all":
            return list(self.items)
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of: {', '.join(SPLITS)}, all")
        return [item for item in self.items if item.split == split]

    def multi_label_groups(self) -> list[str]:
        """Groups where at least one item carries several labels."""
        return [g for g in self.groups if any(len(it.labels[g]) > 1 for it in self.items)]

    def by_image(self) -> dict[str, Item]:
        """Items keyed by their image path."""
        return {item.image: item for item in self.items}


def group_list(text: str, known: list[str]) -> list[str]:
    """The groups a ``--groups`` value names: comma-separated, a name holding a comma quoted as in a
    CSV cell (``'"Size, EU",colour'``), or the whole value when it is one group's name."""
    if text in known:
        return [text]
    names = [name.strip() for name in next(csv.reader([text], skipinitialspace=True), []) if name.strip()]
    if not names:
        raise ValueError(f"--groups {text!r} names no group; choose from: {', '.join(map(repr, known))}")
    return names


def select_groups(catalog: Catalog, groups: list[str]) -> Catalog:
    """The same catalog seen through a subset of its attribute groups."""
    unknown = [g for g in groups if g not in catalog.groups]
    if unknown:
        raise ValueError(f"Unknown group(s) {', '.join(map(repr, unknown))}; choose from: "
                         f"{', '.join(map(repr, catalog.groups))} (a name with a comma in double quotes)")
    return Catalog(catalog.root, list(groups), catalog.items, {g: catalog.vocab[g] for g in groups},
                   dict(catalog.left_out))


def untrainable_groups(catalog: Catalog) -> dict[str, str]:
    """Groups with no label in the train split (they get no head), with the reason."""
    train = catalog.split_items("train")
    out = {}
    for g in catalog.groups:
        if not any(it.labels[g] for it in train):
            where = sorted({it.split for it in catalog.items if it.labels[g]}, key=SPLITS.index)
            out[g] = f"labelled only in the {' and '.join(where)} split{'s' if len(where) > 1 else ''}"
    return out


def training_catalog(catalog: Catalog, groups: str | None = None) -> Catalog:
    """The catalog a training run uses: the ``groups`` asked for (comma-separated, default all),
    less those with no label in the train split, which are named in a warning."""
    if groups:
        catalog = select_groups(catalog, group_list(groups, catalog.groups))
    skipped = untrainable_groups(catalog)
    if groups and skipped:
        raise CatalogError(f"{catalog.root / LABELS_FILE}: group(s) {', '.join(skipped)} asked for have "
                           "no label in the train split")
    for g, why in skipped.items():
        logger.warning("%s: group %r is %s; it is left out of training", catalog.root / LABELS_FILE, g, why)
    kept = [g for g in catalog.groups if g not in skipped]
    if not kept:
        raise CatalogError(f"{catalog.root / LABELS_FILE}: no attribute group has a label in the train split")
    catalog = select_groups(catalog, kept)
    catalog.left_out.update(skipped)
    return catalog


def split_name(cell: str) -> str | None:
    """The split a split cell names (``SPLIT_NAMES``, any letter case: 'Train', 'Validation'), None if none."""
    return SPLIT_NAMES.get(cell.strip().lower())


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


def header_names(cells: list[str]) -> list[str]:
    """A header row's column names: trimmed, and ``image``, ``split`` and ``title`` in any letter case
    ('Image', 'SPLIT', as spreadsheets write them) as those names; every other name as written."""
    names = [cell.strip() for cell in cells]
    return [name.lower() if name.lower() in RESERVED_COLUMNS else name for name in names]


def check_header(header: list[str] | None, csv_path: Path) -> list[str]:
    """The attribute groups of a header (``header_names``); CatalogError when it is not usable."""
    if not header or "image" not in header:
        raise CatalogError(f"{csv_path}: missing header; the first line must be 'image,split,title,<group>,...'")
    duplicates = sorted({h for h in header if h and header.count(h) > 1})
    if duplicates:
        raise CatalogError(f"{csv_path}: duplicate columns {duplicates}")
    groups = [h for h in header if h and h not in RESERVED_COLUMNS]  # a column without a name: see unnamed_cell
    if not groups:
        raise CatalogError(f"{csv_path}: no attribute group columns besides {', '.join(RESERVED_COLUMNS)}")
    return groups


def unnamed_cell(header: list[str], cells: list[str | None]) -> tuple[int, str] | None:
    """(column number from 1, value) of the first cell with a value in a column whose header is empty,
    or None. A spreadsheet's export may carry such columns, empty (trailing separators); they are
    ignored, but a value there belongs to no group and is an error."""
    for i, (name, cell) in enumerate(zip(header, cells)):
        if not name and cell and cell.strip():
            return i + 1, cell
    return None


def link_hint(root: Path, image: str) -> str:
    """What an error about a path leaving the catalog adds when a symbolic link inside it is the way
    out (a folder of photos linked in from a shared drive): the link and where it points."""
    path = Path(root)
    for part in Path(image).parts[:-1] if ".." not in Path(image).parts else ():
        path = path / part
        if path.is_symlink():
            return (f" through the symbolic link {str(path.relative_to(root))!r} -> {os.readlink(path)!r}; "
                    "copy the photos into the catalog directory or point the catalog at the folder holding both")
    return ""


def missing_hint(root: str, resolved: str, image: str) -> str:
    """What a missing image's error adds: that a web address is not downloaded, or the file whose path
    differs only in letter case (a catalogue written on Windows or macOS, read on Linux)."""
    if URL.match(image):
        return ("; image paths are files under the catalog directory, and web addresses are not downloaded: "
                "download the photos into it and write their paths")
    if os.path.isdir(resolved):  # said "differs only in letter case" of itself
        return "; it is a folder, not an image file"
    parts, path = [], resolved
    while not os.path.isdir(path):  # the deepest existing folder, then each part matched without case
        path, part = os.path.split(path)
        if not part:
            return ""
        parts.append(part)
    for part in reversed(parts):
        try:
            match = next((n for n in os.listdir(path) if n.lower() == part.lower()), None)
        except OSError:
            return ""
        if match is None:
            return ""
        path = os.path.join(path, match)
    if path == resolved:  # there, as written, but no regular file (a socket, a device)
        return "; it is not a regular file"
    return f"; {os.path.relpath(path, root)!r} differs only in letter case (paths are case-sensitive here)"


def decode_labels_file(csv_path: Path) -> str:
    """The text of labels.csv: UTF-8, UTF-16 with its byte-order mark (a spreadsheet's "Unicode
    text" export, tab-separated), or Windows-1252 (``windows_1252_text``); otherwise a CatalogError
    names the line of the first byte that is not UTF-8."""
    try:
        data = csv_path.read_bytes()
    except OSError as err:
        raise CatalogError(f"{csv_path}: cannot read ({err.strerror or err})") from err
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise CatalogError(f"{csv_path}: starts as UTF-16 but byte {err.start} is not ({err.reason}); "
                               "re-save the file as UTF-8 (e.g. 'Save as' CSV UTF-8)") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        text = windows_1252_text(data, csv_path)
        if text is not None:
            return text
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise CatalogError(f"{csv_path}, line {line}: byte 0x{data[err.start]:02x} at column {column} is not UTF-8; "
                           "re-save the file as UTF-8 (e.g. 'Save as' CSV UTF-8)") from None


def windows_1252_text(data: bytes, csv_path: Path) -> str | None:
    """labels.csv read as Windows-1252, what a spreadsheet's plain "CSV" export writes on Windows
    ('Bébé' as b'B\\xe9b\\xe9'), when that is what it is: every byte is Windows-1252's and UTF-8 reads
    no more of its letters outside ASCII than it fails on (UTF-8 text with a bad byte or two is not
    taken for it: its many-byte letters outnumber the bad bytes). A warning shows the first line with
    a letter outside ASCII as read, so that a file in another encoding is seen. None otherwise (the
    caller names the bad byte)."""
    as_utf8 = data.decode("utf-8", errors="replace")
    failed = as_utf8.count("\ufffd") - data.count("\ufffd".encode())
    if len(as_utf8) - len(as_utf8.encode("ascii", "ignore")) - failed > failed:  # letters read > bytes failed
        return None
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        return None
    line, example = next((n, row) for n, row in enumerate(text.splitlines(), 1) if not row.isascii())
    logger.warning("%s is not UTF-8: read as Windows-1252 (a spreadsheet's CSV export on Windows); line %d "
                   "reads %r. If its letters are wrong, re-save the file as CSV UTF-8", csv_path, line, example[:120])
    return text


def csv_delimiter(first_line: str) -> str:
    """The cell separator of labels.csv: a comma, or the semicolon or tab of a spreadsheet's export
    where the header splits into an 'image' column on that and not on commas."""
    for delimiter in (",", ";", "\t"):
        if "image" in (cell.strip().strip('"').lower() for cell in first_line.split(delimiter)):
            return delimiter
    return ","


def image_path_of(cell: str) -> str:
    """An image path as written in labels.csv, with a Windows export's backslashes as '/', and './'
    parts and doubled '/' dropped ('./images//a.jpg' is 'images/a.jpg': one image, one name); a path
    with '..' parts stays as written (the reader refuses one that leaves the catalog), as does a web
    address (named as such)."""
    path = cell.strip().replace("\\", "/")
    if "/" not in path or ".." in path.split("/") or URL.match(path):
        return path
    tidy = posixpath.normpath(path)
    return path if tidy == "." else tidy


def image_stat(path: str | Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a regular file, None when it is missing or not a file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source``'s file to ``target`` (a copy keeping its times across file systems). A
    symbolic link's file is linked, not the link (a relative one would point elsewhere from there)."""
    if target.exists() or not source.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(os.path.realpath(source), target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


PATH_CELL = re.compile(r"^[^\s,;]+\.[A-Za-z0-9]{2,5}$")  # images/a.jpg, sku/1001.JFIF: no words, no spaces


def path_shape(path: str) -> tuple[str, str]:
    """An image path's folder and extension (lower case): 'sku/1001' and 'sku/1002' share one."""
    return posixpath.dirname(path), posixpath.splitext(path)[1].lower()


def runaway_cell(value: str, delimiter: str, header: list[str], root: str | Path, image: str = "") -> bool:
    """Whether a cell over several lines holds whole rows (a quote opened and never closed): a line
    after its first that splits into the header's cells, with a file of the catalog, or a bare file
    name when the photos are not there, in the image column, or there a path of the row's own
    ``image``'s folder and extension, one word, beside a split name (train, val, ...) in the split
    column (image names without an extension, the photos not there). A description or title over
    several lines, commas, file names and split names in its text and all, is no row."""
    at = header.index("image") if "image" in header else 0
    split_at = header.index("split") if "split" in header else None
    shape = path_shape(image_path_of(image)) if image else None
    for line in value.split("\n")[1:]:
        if line.count(delimiter) < len(header) - 1:  # fewer cells than a row: no file system call
            continue
        try:
            cells = next(csv.reader([line], delimiter=delimiter), [])
        except csv.Error:  # a bare carriage return: no row of ours
            continue
        path = image_path_of(cells[at]) if len(cells) >= len(header) else ""
        if not path or os.path.isabs(path):
            continue
        if os.path.isfile(os.path.join(root, path)) or PATH_CELL.match(path) or (
                split_at is not None and split_name(cells[split_at]) and path_shape(path) == shape
                and not any(c.isspace() for c in path)):
            return True
    return False


@dataclass
class _RowReader:
    """Turns the rows of one labels.csv into Items, naming the file and line of a bad one."""

    root: Path
    csv_path: Path
    groups: list[str]
    check_files: bool
    delimiter: str = ","

    def __post_init__(self):
        self.real_root = os.path.realpath(self.root)

    def image_path(self, image: str, where: str) -> tuple[int, int] | None:
        """Check that ``image`` stays inside the catalog (and exists); return its stat."""
        try:  # os.path rather than pathlib: a third of the time on big catalogs
            resolved = os.path.realpath(os.path.join(self.root, image))
        except (OSError, ValueError) as err:  # NUL bytes
            raise CatalogError(f"{where}: image path {image!r} is not a usable file path ({err})") from None
        inside = resolved == self.real_root or resolved.startswith(os.path.join(self.real_root, ""))
        if os.path.isabs(image):
            relative = f" (here {os.path.relpath(resolved, self.real_root)!r})" if inside else ""
            raise CatalogError(f"{where}: image path {image!r} is absolute; write it relative to the catalog "
                               f"directory {self.root}{relative}")
        if not inside:
            raise CatalogError(f"{where}: image path {image!r} leaves the catalog directory {self.root}"
                               f"{link_hint(self.root, image)}")
        found = image_stat(resolved) if self.check_files else None
        if self.check_files and found is None:
            hint = missing_hint(self.real_root, resolved, image)
            raise CatalogError(f"{where}: image file {image!r} does not exist under {self.root}{hint}")
        return found

    def item(self, row: dict, row_id: int, line: int) -> Item:
        """The Item of one data row."""
        where = f"{self.csv_path}, line {line}"
        if None in row:
            raise CatalogError(f"{where}: more cells than header columns")
        stray = unnamed_cell([k if not k.startswith("\0") else "" for k in row], list(row.values()))
        if stray:
            raise CatalogError(f"{where}: value {stray[1]!r} in column {stray[0]}, which has no name in the header")
        for name, value in row.items():  # a quote opened and never closed reads the rows after it as one cell
            if value and "\n" in value and runaway_cell(value, self.delimiter, list(row), self.root,
                                                          row.get("image") or ""):
                lines = value.rstrip("\n").count("\n")  # an unclosed quote holds the last line end too
                raise CatalogError(f"{self.csv_path}, line {line - lines}: the {name!r} cell runs on over "
                                   f"{lines + 1} lines, holding the rows after it (a stray '\"'? a cell that "
                                   "opens with a quote must close with one)")
        image = image_path_of(row.get("image") or "")
        if not image:
            raise CatalogError(f"{where}: empty 'image' field")
        found = self.image_path(image, where)
        cell = (row.get("split") or "").strip()
        split = split_name(cell)
        if "split" not in row:
            split = hash_split(image)
        elif split is None:
            raise CatalogError(f"{where}: unknown split {cell!r}; expected one of: {', '.join(SPLITS)} "
                               f"(or {', '.join(n for n in SPLIT_NAMES if n not in SPLITS)})")
        labels = {g: parse_labels(row.get(g)) for g in self.groups}
        return Item(row_id, image, split, (row.get("title") or "").strip(), labels, found)


def _read_rows(csv_path: Path, root: Path, check_files: bool) -> tuple[list[str], list[Item]]:
    text = decode_labels_file(csv_path)
    delimiter = csv_delimiter(text.split("\n", 1)[0])
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = header_names(reader.fieldnames) if reader.fieldnames else reader.fieldnames
        groups = check_header(header, csv_path)
        reader.fieldnames = [h or f"\0unnamed {i}" for i, h in enumerate(header)]  # kept apart, checked empty
        rows = _RowReader(root, csv_path, groups, check_files, delimiter)
        items: list[Item] = []
        seen: dict[str, int] = {}
        for row in reader:
            item = rows.item(row, len(items), reader.line_num)
            if item.image in seen:
                raise CatalogError(f"{csv_path}, line {reader.line_num}: image {item.image!r} already listed "
                                   f"on line {seen[item.image]}")
            seen[item.image] = reader.line_num
            items.append(item)
    except csv.Error as err:
        raise CatalogError(f"{csv_path}, line {reader.line_num}: {err}") from None
    return rows.groups, items


def read_catalog(root: str | Path, check_files: bool = True) -> Catalog:
    """Read ``root/labels.csv``; raise CatalogError naming the file and line on bad input.

    Column by column with pyarrow (``columns.py``) when the file is well-formed; row by row when
    it is not, for the error naming the line and field. ``check_files``: every image must exist
    (one stat each, in parallel); without it, images are looked at only to keep them inside the
    catalog, and a missing or unreadable one is skipped when training or embedding reads it.
    A group column empty on every row is left out (with a warning): nothing can be learnt,
    evaluated or filtered by it.
    """
    from retrieval.data.columns import read_columns  # pyarrow is imported when a catalog is read

    root = Path(root)
    csv_path = root / LABELS_FILE
    if not csv_path.is_file():
        raise CatalogError(f"{csv_path}: not found; a catalog is a directory with labels.csv and images")
    fast = read_columns(csv_path, root, check_files)
    if fast is None:
        logger.info("%s: read row by row (the column reader takes only regular files: every row with every "
                    "column, plain paths, existing images)", csv_path)
    groups, items, cells = fast if fast else (*_read_rows(csv_path, root, check_files), None)
    if not items:
        raise CatalogError(f"{csv_path}: no rows")
    cells = cells or {g: Counter(item.labels[g] for item in items) for g in groups}
    for g in groups:
        unknown, told = missing_markers(cells[g])
        if unknown:
            logger.warning("%s: group %r: %s read as unknown, as an empty cell is (a missing value as a program "
                           "writes it)", csv_path, g, told)
            respell(items, g, cells, unknown)
        respelled, told = merge_spellings(cells[g])
        if respelled:
            logger.warning("%s: group %r: labels that differ only in letter case or spaces are one label, the "
                           "most frequent spelling: %s", csv_path, g, told)
            respell(items, g, cells, respelled)
    vocab = {g: sorted({label for cell in cells[g] for label in cell}) for g in groups}
    left_out = {g: "no label on any row" for g in groups if not vocab[g]}
    left_out.update({g: why for g in groups if g not in left_out and (why := unshared_labels(cells[g]))})
    for g, why in left_out.items():
        logger.warning("%s: group %r: %s; it is left out", csv_path, g, why)
    kept = [g for g in groups if g not in left_out]
    return Catalog(root, kept, items, {g: vocab[g] for g in kept}, left_out=left_out)


def label_counts(cells: dict[tuple[str, ...], int]) -> Counter[str]:
    """Items per label of a group, from its rows per label tuple (an item counts once per label)."""
    counts: Counter[str] = Counter()
    for cell, n in cells.items():
        counts.update(dict.fromkeys(cell, n))
    return counts


def respell(items: list[Item], group: str, cells: dict[str, Counter], respelled: dict[tuple[str, ...], tuple[str, ...]]):
    """Give ``group``'s cells (its items' labels and its count of items per cell) their new spelling."""
    for item in items:
        item.labels[group] = respelled.get(item.labels[group], item.labels[group])
    merged: Counter[tuple[str, ...]] = Counter()
    for cell, n in cells[group].items():
        merged[respelled.get(cell, cell)] += n
    cells[group] = merged


def missing_markers(cells: dict[tuple[str, ...], int]) -> tuple[dict[tuple[str, ...], tuple[str, ...]], str]:
    """A group's labels spelt as a missing value (``MISSING_MARKERS`` in any letter case, ``MISSING_EXACT``) dropped:
    ({cell: the cell without them} for the cells that change, which spellings on how many items)."""
    def missing(label: str) -> bool:
        return label.casefold() in MISSING_MARKERS or label in MISSING_EXACT

    respelled = {cell: tuple(label for label in cell if not missing(label)) for cell in cells}
    respelled = {cell: new for cell, new in respelled.items() if new != cell}
    counts = label_counts(cells)
    markers = sorted({label for cell in respelled for label in cell if missing(label)})
    return respelled, ", ".join(f"{label!r} on {counts[label]:,} item{'s' * (counts[label] != 1)}" for label in markers)


def merge_spellings(cells: dict[tuple[str, ...], int]) -> tuple[dict[tuple[str, ...], tuple[str, ...]], str]:
    """Labels of one group that differ only in letter case or spaces ('Navy Blue', 'navy  blue') as
    one: ({cell: the cell respelled} for the cells that change, what was merged, for the log). The
    spelling kept is the one on the most items (ties: the first in sorted order)."""
    counts = label_counts(cells)
    spellings: dict[str, list[str]] = {}
    for label in sorted(counts):
        spellings.setdefault(" ".join(label.casefold().split()), []).append(label)
    kept = {label: max(group, key=lambda v: (counts[v], [-ord(c) for c in v]))
            for group in spellings.values() if len(group) > 1 for label in group}
    respelled = {cell: new for cell in cells if any(label in kept for label in cell)
                 for new in [tuple(dict.fromkeys(kept.get(label, label) for label in cell))] if new != cell}
    told = "; ".join(f"{keep!r} for {', '.join(repr(v) for v in group if v != keep)}"
                     for group in spellings.values() if len(group) > 1 for keep in [kept[group[0]]])
    return respelled, told


def unshared_labels(cells: dict[tuple[str, ...], int], min_items: int = MIN_UNSHARED_ITEMS) -> str | None:
    """Why a group is a column of identifiers or free text rather than an attribute (None when it is
    not): most of its labelled items (``min_items`` or more) share no label with any other item, so
    there is nothing to learn from them, and as queries they have no relevant item in any ranking
    (a SKU, a product name, a description; a product id shared by several photos stays a group)."""
    counts = label_counts(cells)
    labelled = sum(n for cell, n in cells.items() if cell)
    alone = sum(n for cell, n in cells.items() if cell and all(counts[label] == 1 for label in cell))
    if labelled < min_items or 2 * alone <= labelled:
        return None
    return (f"an identifier or free text, not an attribute: {alone:,} of its {labelled:,} labelled items share "
            "no label with another item")


def items_digest(items: list[Item]) -> dict[str, str]:
    """What a derived file covers: a digest of the ordered image paths and one of their files'
    sizes and modification times (as stat-ed when the catalog was read)."""
    paths = json.dumps([it.image for it in items])
    files = json.dumps([it.stat for it in items])
    return {"paths": hashlib.sha256(paths.encode()).hexdigest(), "files": hashlib.sha256(files.encode()).hexdigest()}


def digest_change(stored: dict | None, current: dict[str, str]) -> str | None:
    """Why a file made for ``stored`` does not fit ``current`` (None when it does)."""
    if not stored:
        return "it records no catalog digest (made by an older version)"
    if stored.get("paths") != current["paths"]:
        return "the catalog's image list or its order changed"
    if stored.get("files") != current["files"]:
        return "image files changed (size or modification time)"
    return None
