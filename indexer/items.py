"""Per-item metadata of an index as flat arrays: ids, paths and titles (utf-8 blobs with offsets) and
label codes (one CSR table over all groups, plus its transpose: the items of each label). No Python
object per item, so a million-item index loads in well under a second and memory-maps."""
from __future__ import annotations

from bisect import bisect_left
from itertools import chain
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

ITEM_ARRAYS = ("ids", "path_blob", "path_offsets", "path_order", "title_blob", "title_offsets",
               "label_offsets", "label_codes", "posting_offsets", "postings")


def csr_gather(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Return the concatenated values of the given rows of a CSR table (offsets has one entry per row + 1)."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    total = int(lengths.sum())
    if not total:
        return values[:0]
    shift = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return values[shift + np.arange(total)]


def code_dtype(n_codes: int) -> type:
    """The smallest integer type that holds n_codes label codes."""
    return np.int16 if n_codes < 2 ** 15 else np.int32


def csr_offsets(lengths) -> np.ndarray:
    """Return CSR offsets (int64, one more than rows) of row lengths."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def take_rows(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (offsets, values) of a CSR table reduced to rows, in that order."""
    return csr_offsets(offsets[rows + 1] - offsets[rows]), csr_gather(offsets, values, rows)


def align_labels(labels: Mapping | None, count: int, groups=None) -> dict[str, list[Sequence[str]]]:
    """Return {group: [labels of each item]} with one entry per item (a lone string is one label),
    checking lengths and groups."""
    labels = dict(labels or {})
    if groups is not None:
        unknown = sorted(set(labels) - set(groups))
        if unknown:
            raise ValueError(f"Unknown label group(s) {unknown}; choose from: {', '.join(sorted(groups))}")
        labels = {group: labels.get(group, [[]] * count) for group in groups}
    out = {}
    for group, per_item in labels.items():
        if len(per_item) != count:
            raise ValueError(f"labels[{group!r}] has {len(per_item)} entries for {count} items")
        out[group] = [(item,) if isinstance(item, str) else item for item in per_item]
    return out


def text_list(values, count: int, name: str) -> list[str]:
    """Return values as a list of count strings ("" when values is None)."""
    values = [""] * count if values is None else [str(v) for v in values]
    if len(values) != count:
        raise ValueError(f"Got {len(values)} {name} for {count} items")
    return values


class TextColumn:
    """N strings as one utf-8 byte blob and N + 1 offsets."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, values: Sequence[str]) -> "TextColumn":
        encoded = [str(v).encode("utf-8") for v in values]
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), csr_offsets([len(e) for e in encoded]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, position: int) -> str:
        return self.blob[self.offsets[position]:self.offsets[position + 1]].tobytes().decode("utf-8")

    def tolist(self) -> list[str]:
        """Every string (one Python object each: for whole-catalogue work, not for requests)."""
        data, ends = self.blob.tobytes(), self.offsets.tolist()
        return [data[a:b].decode("utf-8") for a, b in zip(ends[:-1], ends[1:])]

    def take(self, rows: np.ndarray) -> "TextColumn":
        offsets, blob = take_rows(self.offsets, self.blob, rows)
        return TextColumn(blob, offsets)

    def concat(self, other: "TextColumn") -> "TextColumn":
        return TextColumn(np.concatenate([self.blob, other.blob]),
                          np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]]))


class LabelCodes:
    """The labels of N items in every group: global code = the group's base + the label's rank in the
    group's sorted vocabulary; ``offsets``/``codes`` list each item's codes, ``postings`` each code's items."""

    def __init__(self, vocab: Mapping[str, list[str]], offsets: np.ndarray, codes: np.ndarray,
                 posting_offsets: np.ndarray | None = None, postings: np.ndarray | None = None):
        self.vocab = {group: list(labels) for group, labels in vocab.items()}
        self.groups = list(self.vocab)
        sizes = [len(labels) for labels in self.vocab.values()]
        self.base = dict(zip(self.groups, np.cumsum([0] + sizes[:-1]).tolist()))
        self.n_codes = int(sum(sizes))
        self.names = [(g, label) for g in self.groups for label in self.vocab[g]]  # code -> (group, label)
        self.offsets, self.codes = offsets, codes
        if postings is None:
            posting_offsets, postings = self._transpose()
        self.posting_offsets, self.postings = posting_offsets, postings

    @classmethod
    def from_lists(cls, labels: Mapping[str, Sequence[Sequence[str]]], count: int) -> "LabelCodes":
        """From {group: [[label, ...] per item]}."""
        vocab, per_group = {}, []
        for group, per_item in labels.items():
            lengths = np.fromiter((len(item) for item in per_item), dtype=np.int64, count=count)
            flat = [str(label) for label in chain.from_iterable(per_item)]
            vocab[group] = sorted(set(flat))
            code_of = {label: code for code, label in enumerate(vocab[group])}
            per_group.append((lengths, np.fromiter(map(code_of.__getitem__, flat), dtype=np.int64, count=len(flat))))
        return cls.from_group_codes(vocab, per_group, count)

    @classmethod
    def from_group_codes(cls, vocab: dict, per_group: list[tuple[np.ndarray, np.ndarray]], count: int):
        """From per-group (lengths [N], local codes) pairs, in vocab's group order."""
        bases = np.cumsum([0] + [len(v) for v in vocab.values()][:-1])
        lengths = np.zeros(count, dtype=np.int64)
        for group_lengths, _ in per_group:
            lengths += group_lengths
        offsets = csr_offsets(lengths)
        codes = np.empty(int(offsets[-1]), dtype=code_dtype(int(sum(len(v) for v in vocab.values()))))
        filled = offsets[:-1].copy()
        for base, (group_lengths, local) in zip(bases, per_group):
            group_offsets = csr_offsets(group_lengths)
            dest = np.repeat(filled - group_offsets[:-1], group_lengths) + np.arange(len(local))
            codes[dest] = local + base
            filled += group_lengths
        return cls(vocab, offsets, codes)

    def _transpose(self) -> tuple[np.ndarray, np.ndarray]:
        owners = np.repeat(np.arange(len(self.offsets) - 1, dtype=np.int32), np.diff(self.offsets))
        order = np.argsort(self.codes, kind="stable")  # stable: each label's items stay in position order
        return csr_offsets(np.bincount(self.codes, minlength=self.n_codes)), owners[order]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def labels_at(self, position: int) -> dict[str, list[str]]:
        """{group: [labels]} of the item at a position."""
        out = {group: [] for group in self.groups}
        for code in self.codes[self.offsets[position]:self.offsets[position + 1]].tolist():
            group, label = self.names[code]
            out[group].append(label)
        return out

    def items_with(self, code: int) -> np.ndarray:
        """Sorted positions of the items carrying a global label code."""
        return self.postings[self.posting_offsets[code]:self.posting_offsets[code + 1]]

    def code(self, group: str, label: str) -> int:
        """The global code of a label (ValueError naming the valid ones when unknown)."""
        if group not in self.vocab:
            raise ValueError(f"Unknown label group {group!r}; choose one of: {', '.join(sorted(self.vocab))}")
        labels = self.vocab[group]
        at = bisect_left(labels, label)
        if at == len(labels) or labels[at] != label:
            raise ValueError(f"Unknown label(s) {label!r} in group {group!r}; choose from: {', '.join(labels)}")
        return self.base[group] + at

    def take(self, rows: np.ndarray) -> "LabelCodes":
        offsets, codes = take_rows(self.offsets, self.codes, rows)
        return LabelCodes(self.vocab, offsets, codes)

    def concat(self, other: "LabelCodes") -> "LabelCodes":
        """Both tables' items; each group's vocabulary becomes the sorted union of both."""
        if set(other.groups) - set(self.groups):
            raise ValueError(f"Unknown label group(s) {sorted(set(other.groups) - set(self.groups))}; "
                             f"choose from: {', '.join(sorted(self.groups))}")
        vocab = {g: sorted(set(self.vocab[g]) | set(other.vocab.get(g, ()))) for g in self.groups}
        code_of = {name: code for code, name in enumerate((g, label) for g in vocab for label in vocab[g])}
        codes = np.concatenate([np.array([code_of[name] for name in table.names], dtype=np.int64)[table.codes]
                                for table in (self, other)]).astype(code_dtype(len(code_of)))
        offsets = np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]])
        return LabelCodes(vocab, offsets, codes)


class Items:
    """Ids, paths, titles and labels of an index's items, in the order of its rows (positions)."""

    def __init__(self, ids: np.ndarray, paths: TextColumn, titles: TextColumn, labels: LabelCodes,
                 path_order: np.ndarray | None = None):
        self.ids, self.paths, self.titles, self.labels = ids, paths, titles, labels
        for name, column in (("paths", paths), ("titles", titles), ("labels", labels)):
            if len(column) != len(ids):
                raise ValueError(f"Got {len(column)} {name} for {len(ids)} items")
        self.path_order = np.argsort(np.array(paths.tolist(), dtype=str)) if path_order is None else path_order

    @classmethod
    def from_lists(cls, ids: np.ndarray, paths: Sequence[str], titles: Sequence[str],
                   labels: Mapping[str, Sequence]) -> "Items":
        """From aligned per-item lists (labels: {group: [[label, ...] per item]})."""
        return cls(ids, TextColumn.from_strings(paths), TextColumn.from_strings(titles),
                   LabelCodes.from_lists(labels, len(ids)))

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, position: int) -> dict:
        """dict(id, path, title, labels) of the item at a position."""
        return {"id": int(self.ids[position]), "path": self.paths[position], "title": self.titles[position],
                "labels": self.labels.labels_at(position)}

    def has_path(self, path: str) -> bool:
        """Whether an item has this image path (a binary search over the sorted paths)."""
        at = bisect_left(range(len(self)), path, key=lambda i: self.paths[int(self.path_order[i])])
        return at < len(self) and self.paths[int(self.path_order[at])] == path

    def take(self, rows: np.ndarray) -> "Items":
        return Items(self.ids[rows], self.paths.take(rows), self.titles.take(rows), self.labels.take(rows))

    def concat(self, other: "Items") -> "Items":
        return Items(np.concatenate([self.ids, other.ids]), self.paths.concat(other.paths),
                     self.titles.concat(other.titles), self.labels.concat(other.labels))

    # ---- files ------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays written as ``items-<name>.npy`` (ITEM_ARRAYS)."""
        lab = self.labels
        return {"ids": self.ids, "path_blob": self.paths.blob, "path_offsets": self.paths.offsets,
                "path_order": self.path_order, "title_blob": self.titles.blob,
                "title_offsets": self.titles.offsets, "label_offsets": lab.offsets, "label_codes": lab.codes,
                "posting_offsets": lab.posting_offsets, "postings": lab.postings}

    def save(self, directory: Path) -> None:
        """Write every array as ``items-<name>.npy`` into directory."""
        for name, array in self.arrays().items():
            np.save(directory / f"items-{name}.npy", np.ascontiguousarray(array))

    @classmethod
    def load(cls, directory: Path, vocab: Mapping[str, list[str]], mmap: bool = False) -> "Items":
        """Read the arrays written by save (memory-mapped when mmap), naming a missing or corrupt file."""
        arrays = {}
        for name in ITEM_ARRAYS:
            path = directory / f"items-{name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"Index item file not found: {path}")
            try:
                # a plain view of the mapping: np.memmap's Python-level indexing costs ~5 us a slice
                arrays[name] = np.asarray(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
            except (ValueError, EOFError, OSError) as err:  # EOFError: an empty file (a copy cut short)
                raise ValueError(f"Corrupt index item file {path}: {err or type(err).__name__}") from err
            if arrays[name].ndim != 1 or arrays[name].dtype.kind not in "iu":
                raise ValueError(f"Corrupt index item file {path}: {arrays[name].dtype} array of shape "
                                 f"{arrays[name].shape}, not a list of whole numbers")
        check_item_arrays(directory, arrays, vocab)
        labels = LabelCodes(vocab, arrays["label_offsets"], arrays["label_codes"], arrays["posting_offsets"],
                            arrays["postings"])
        return cls(arrays["ids"], TextColumn(arrays["path_blob"], arrays["path_offsets"]),
                   TextColumn(arrays["title_blob"], arrays["title_offsets"]), labels, arrays["path_order"])


def check_item_arrays(directory: Path, arrays: dict[str, np.ndarray], vocab: Mapping[str, list[str]]) -> None:
    """Raise a ValueError naming the file when the item arrays do not fit together or the sidecar's label
    vocabulary (a shortened vocabulary made pages fail on the first item of a lost label). Only sizes,
    ends and the largest label code are checked: one pass over the codes, the rest O(1)."""
    def bad(name: str, why: str):
        return ValueError(f"Corrupt index item file {directory / f'items-{name}.npy'}: {why}")

    n = len(arrays["ids"])
    for name in ("path_offsets", "title_offsets", "label_offsets"):
        if len(arrays[name]) != n + 1:
            raise bad(name, f"{len(arrays[name])} offsets for {n} items (items-ids.npy)")
    if len(arrays["path_order"]) != n:
        raise bad("path_order", f"{len(arrays['path_order'])} entries for {n} items (items-ids.npy)")
    for offsets, values in (("path_offsets", "path_blob"), ("title_offsets", "title_blob"),
                            ("label_offsets", "label_codes"), ("posting_offsets", "postings")):
        end = int(arrays[offsets][-1]) if len(arrays[offsets]) else 0
        if end != len(arrays[values]) or (len(arrays[offsets]) and int(arrays[offsets][0]) != 0):
            raise bad(offsets, f"its offsets run from {int(arrays[offsets][0]) if len(arrays[offsets]) else 0} "
                               f"to {end}; items-{values}.npy holds {len(arrays[values])}")
    n_codes = sum(len(labels) for labels in vocab.values())
    if len(arrays["posting_offsets"]) != n_codes + 1:
        raise bad("posting_offsets", f"{len(arrays['posting_offsets']) - 1} labels; the sidecar's vocabulary "
                                     f"(labels) has {n_codes}")
    codes = arrays["label_codes"]
    if len(codes) and not 0 <= int(codes.min()) <= int(codes.max()) < n_codes:
        raise bad("label_codes", f"label codes {int(codes.min())}..{int(codes.max())}; the sidecar's vocabulary "
                                 f"(labels) has {n_codes}")
