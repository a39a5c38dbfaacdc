"""Browsing an index snapshot: label filters, a title text filter and facet counts over positions."""
from __future__ import annotations

import logging
import re

import numpy as np

logger = logging.getLogger(__name__)


def csr_gather(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Return the concatenated values of the given rows of a CSR table (offsets has one entry per row + 1)."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    if not lengths.sum():
        return values[:0]
    shift = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return values[shift + np.arange(lengths.sum())]


class TitleWords:
    """The distinct words of every title (casefolded, split on whitespace) and where each occurs.

    A query word is a substring of a title exactly when it is a substring of one of the title's words
    (a query word holds no whitespace), so matching scans the vocabulary once per query word, never
    every title: the cost is linear in the catalogue's text and independent of the query's length.
    """

    def __init__(self, titles: list[str]):
        per_title = [set(title.casefold().split()) for title in titles]
        self.vocab = sorted(set().union(*per_title))
        word_id = {word: i for i, word in enumerate(self.vocab)}
        self.n_titles = len(titles)
        self.word_of = np.fromiter((word_id[w] for words in per_title for w in words), dtype=np.int64)
        self.title_of = np.repeat(np.arange(len(titles)), [len(words) for words in per_title])
        self.blob = "\n".join(self.vocab)  # words hold no whitespace, so a match never spans two
        self.starts = np.cumsum([0] + [len(w) + 1 for w in self.vocab[:-1]]) if self.vocab else np.zeros(0, int)

    def words_containing(self, word: str) -> np.ndarray:
        """Return a bool mask over the vocabulary: the words that contain word."""
        hits = np.zeros(len(self.vocab), dtype=bool)
        offsets = np.fromiter((m.start() for m in re.finditer(re.escape(word), self.blob)), dtype=np.int64)
        hits[np.searchsorted(self.starts, offsets, side="right") - 1] = True
        return hits

    def mask(self, text: str) -> np.ndarray:
        """Return a bool mask of the titles containing every word of text (case-insensitive substrings)."""
        mask = np.ones(self.n_titles, dtype=bool)
        for word in set(text.casefold().split()):
            found = np.zeros(self.n_titles, dtype=bool)
            found[self.title_of[self.words_containing(word)[self.word_of]]] = True
            mask &= found
        return mask


class GroupCodes:
    """The label codes of one group, item by item (a CSR table: several labels per item are allowed)."""

    def __init__(self, per_item: list[list[str]]):
        self.vocab = sorted({label for item in per_item for label in item})
        self.code_of = {label: code for code, label in enumerate(self.vocab)}
        self.codes = np.array([self.code_of[lab] for item in per_item for lab in item], dtype=np.int64)
        self.owners = np.repeat(np.arange(len(per_item)), [len(item) for item in per_item])
        self.offsets = np.concatenate([[0], np.cumsum([len(item) for item in per_item])]).astype(np.int64)

    def mask(self, wanted: list[str], n: int) -> np.ndarray:
        """Return a bool mask of the n items carrying any of the wanted labels."""
        chosen = np.zeros(len(self.vocab), dtype=bool)
        chosen[[self.code_of[label] for label in wanted]] = True
        mask = np.zeros(n, dtype=bool)
        mask[self.owners[chosen[self.codes]]] = True
        return mask

    def tally(self, positions: np.ndarray) -> np.ndarray:
        """Return the number of items among positions that carry each label (bincount over their codes)."""
        return np.bincount(csr_gather(self.offsets, self.codes, positions), minlength=len(self.vocab))

    def rows(self, tally: np.ndarray, selected: list[str]) -> list[dict]:
        """Return the facet entries, most frequent first then by label; empty ones only when selected."""
        keep = tally > 0
        keep[[self.code_of[label] for label in selected]] = True
        codes = np.flatnonzero(keep)
        codes = codes[np.lexsort((codes, -tally[codes]))]  # codes follow the sorted labels
        return [{"label": self.vocab[c], "count": int(tally[c]), "selected": self.vocab[c] in selected}
                for c in codes]


class Facets:
    """Per-group label codes and title words of every indexed item, for filtering and counting without FAISS."""

    def __init__(self, store):
        self.ids = np.asarray(store.ids, dtype=np.int64)
        self.groups = list(store.labels)
        self.by_group = {group: GroupCodes(per_item) for group, per_item in store.labels.items()}
        self.vocab = {group: codes.vocab for group, codes in self.by_group.items()}
        self.titles = TitleWords(store.titles)
        self.paths = frozenset(store.paths)

    def __len__(self) -> int:
        return len(self.ids)

    def group_mask(self, group: str, wanted: list[str]) -> np.ndarray:
        """Return a bool mask of the items carrying any of the wanted labels (all items when none)."""
        if not wanted:
            return np.ones(len(self), dtype=bool)
        return self.by_group[group].mask(wanted, len(self))

    def text_mask(self, text: str) -> np.ndarray:
        """Return a bool mask of the items whose title contains every word of text (case-insensitive)."""
        return self.titles.mask(text)

    def masks(self, filters: dict[str, list[str]]) -> dict[str, np.ndarray]:
        """Return {group: mask} for the groups that have a constraint."""
        return {g: self.group_mask(g, wanted) for g, wanted in filters.items() if wanted}

    def select(self, filters: dict[str, list[str]], text: str = "") -> np.ndarray:
        """Return the positions passing every filter (OR within a group, AND across) and the text."""
        mask = self.text_mask(text)
        for group_mask in self.masks(filters).values():
            mask &= group_mask
        return np.flatnonzero(mask)

    def counts(self, filters: dict[str, list[str]], text: str = "") -> dict[str, list[dict]]:
        """Return {group: [{label, count, selected}]}: items per label given the other groups' filters."""
        base, masks = self.text_mask(text), self.masks(filters)
        everything = base.copy()
        for mask in masks.values():
            everything &= mask
        selected = np.flatnonzero(everything)  # what every group without a filter of its own counts over
        out = {}
        for group, codes in self.by_group.items():
            positions = self._positions_without(group, base, masks) if group in masks else selected
            out[group] = codes.rows(codes.tally(positions), filters.get(group, []))
        return out

    @staticmethod
    def _positions_without(group: str, base: np.ndarray, masks: dict[str, np.ndarray]) -> np.ndarray:
        """Return the positions passing the text and every filter except the group's own."""
        mask = base.copy()
        for other, other_mask in masks.items():
            if other != group:
                mask &= other_mask
        return np.flatnonzero(mask)


def item_at(store, position: int) -> dict:
    """Return dict(id, path, title, labels) of the item at a position of the store's arrays."""
    labels = {group: list(per_item[position]) for group, per_item in store.labels.items()}
    return {"id": int(store.ids[position]), "path": store.paths[position], "title": store.titles[position],
            "labels": labels}
