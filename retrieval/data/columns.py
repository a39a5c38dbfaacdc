"""labels.csv read column by column with pyarrow's CSV reader: the fast path of ``read_catalog``.

A label cell is parsed once per distinct value of its column, not once per row; image paths are
checked one directory at a time (``realpath`` once per distinct directory) plus one ``lstat`` per
file, run on a thread pool. Anything the fast path does not accept (a parse error, a bad cell, a
path it cannot vouch for, a missing file) makes it return None: the row-by-row reader then reads
the file again and raises the error naming the line and field.
"""
from __future__ import annotations

import csv
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

from retrieval.data.catalog import (Item, check_header, csv_delimiter, hash_split, header_names, image_path_of,
                                    parse_labels, runaway_cell, split_name)

STAT_CHUNK = 4096  # paths per thread-pool task


def read_header(csv_path: Path) -> tuple[list[str], str] | None:
    """The first record of labels.csv and its cell separator (None when it cannot be decoded or parsed)."""
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            delimiter = csv_delimiter(f.readline())
            f.seek(0)
            header = next(csv.reader(f, delimiter=delimiter), None)
    except (UnicodeDecodeError, csv.Error):
        return None
    return (header, delimiter) if header else None


def read_table(csv_path: Path, n_columns: int, delimiter: str = ",") -> pa.Table | None:
    """Every cell as a string (empty stays empty), the header as row 0; None on any parse error."""
    names = [f"c{i}" for i in range(n_columns)]
    try:
        return pv.read_csv(csv_path, read_options=pv.ReadOptions(column_names=names),
                           parse_options=pv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                           convert_options=pv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                             strings_can_be_null=False,
                                                             quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError):
        return None


def stripped(column: pa.ChunkedArray) -> list[str]:
    """The column's cells with surrounding whitespace removed (Python's rule, as the row reader)."""
    return [cell.strip() for cell in column.to_pylist()]


def label_column(column: pa.ChunkedArray) -> tuple[list[tuple[str, ...]], dict[tuple[str, ...], int]]:
    """Each row's label tuple (one shared tuple per distinct cell) and how many rows have each."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    parsed = [parse_labels(cell) for cell in encoded.dictionary.to_pylist()]
    table = np.empty(len(parsed), dtype=object)
    table[:] = parsed
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    cells: dict[tuple[str, ...], int] = {}
    for labels, n in zip(parsed, np.bincount(indices, minlength=len(parsed)).tolist()):
        cells[labels] = cells.get(labels, 0) + n  # "a|b" and "a | b" are one tuple
    return table[indices].tolist(), cells


def file_stats(root: Path, images: list[str]) -> list[tuple[int, int] | None] | None:
    """(size, mtime_ns) of each image (None when not a regular file), or None when a path may
    leave the catalog or is not plain enough for this check (the row reader decides those)."""
    inside = os.path.join(os.path.realpath(root), "")
    dirs, paths = {}, []
    for image in images:
        folder, _, name = image.rpartition(os.sep)
        if folder not in dirs:
            dirs[folder] = os.path.join(os.path.realpath(os.path.join(root, folder)), "")
        if name in ("", ".", "..") or "\x00" in image or image.startswith(os.sep) or not dirs[folder].startswith(inside):
            return None
        paths.append(dirs[folder] + name)
    chunks = [paths[i:i + STAT_CHUNK] for i in range(0, len(paths), STAT_CHUNK)]
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        found = [entry for chunk in pool.map(lambda chunk: [_lstat(p, inside) for p in chunk], chunks) for entry in chunk]
    return None if any(entry is False for entry in found) else found


def _lstat(path: str, inside: str) -> tuple[int, int] | None | bool:
    """Stat of one image in its resolved folder; False when it is a link leaving the catalog."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            path = os.path.realpath(path)
            if not path.startswith(inside):
                return False
            st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def read_columns(csv_path: Path, root: Path, check_files: bool
                 ) -> tuple[list[str], list[Item], dict[str, dict[tuple[str, ...], int]]] | None:
    """(groups, items, {group: {label tuple: rows}}) of a well-formed labels.csv, else None."""
    head = read_header(csv_path)
    header, delimiter = head if head else (None, ",")
    table = read_table(csv_path, len(header), delimiter) if header else None
    if table is None or table.num_rows < 2 or table.slice(0, 1).to_pylist()[0] != {
            f"c{i}": h for i, h in enumerate(header)}:
        return None
    header = header_names(header)
    groups = check_header(header, csv_path)
    columns = {h: table.column(i).slice(1) for i, h in enumerate(header) if h}
    if any(not h and any(cell.strip() for cell in table.column(i).slice(1).to_pylist()) for i, h in enumerate(header)):
        return None  # a value in a column without a name: the row reader names it
    cells = columns["image"].to_pylist()
    for i in range(len(header)):
        column = table.column(i).slice(1)
        if pc.any(pc.match_substring(column, "\n")).as_py() and any(
                runaway_cell(cell, delimiter, header, root, cells[r])
                for r, cell in enumerate(column.to_pylist()) if "\n" in cell):
            return None  # rows read as one cell of an unclosed quote: the row reader names its line
    images = [image_path_of(cell) for cell in cells]
    if not all(images) or len(set(images)) != len(images):
        return None
    found = file_stats(root, images)
    if found is None or (check_files and None in found):
        return None
    if "split" in columns:
        splits = [split_name(split) for split in stripped(columns["split"])]
        if None in splits:
            return None  # the row reader names the line
    else:
        splits = [hash_split(image) for image in images]
    titles = stripped(columns["title"]) if "title" in columns else [""] * len(images)
    labels, cells = zip(*(label_column(columns[g]) for g in groups))
    stats = found if check_files else [None] * len(images)
    rows = zip(images, splits, titles, stats, zip(*labels))
    items = [Item(row, image, split, title, dict(zip(groups, cells)), st)
             for row, (image, split, title, st, cells) in enumerate(rows)]
    return groups, items, dict(zip(groups, cells))
