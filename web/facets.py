"""Browsing an index snapshot: label filters, a title text filter and facet counts over positions."""
from __future__ import annotations

import logging
import re
from functools import lru_cache

import numpy as np

from indexer.items import csr_gather, csr_offsets

logger = logging.getLogger(__name__)

TEXT_MASKS = 8  # title-query masks kept (N bytes each)
FACET_ROWS = 40  # labels a facet lists beyond the selected ones; find.<group> reaches the others


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
        word_of = np.fromiter((word_id[w] for words in per_title for w in words), dtype=np.int64)
        title_of = np.repeat(np.arange(len(titles), dtype=np.int32), [len(words) for words in per_title])
        order = np.argsort(word_of, kind="stable")  # word -> the titles holding it (CSR)
        self.titles_of_word = title_of[order]
        self.offsets = csr_offsets(np.bincount(word_of, minlength=len(self.vocab)))
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
            found[csr_gather(self.offsets, self.titles_of_word, np.flatnonzero(self.words_containing(word)))] = True
            mask &= found
        return mask


class Facets:
    """Label codes and title words of every indexed item, for filtering and counting without FAISS.

    Labels come from the index's precomputed codes (``indexer.items.LabelCodes``): a label filter marks
    the items listed for that label, and the counts of every group come from one bincount over the
    selected items' codes (plus one per group that has a filter of its own, whose counts ignore it)."""

    def __init__(self, store):
        self.items = store.items
        self.labels = store.items.labels
        self.vocab = self.labels.vocab
        # what a filter parameter may name: every labelled group, and a group the index has a view of
        # but no label for (a catalog without that column at the build): a filter on it is refused, not ignored
        self.filter_vocab = {**{view[len("group-"):]: [] for view in store.views if view.startswith("group-")},
                             **self.vocab}
        self.titles = TitleWords(store.items.titles.tolist())
        self.totals = np.diff(self.labels.posting_offsets)  # items per label code, before any filter
        self._text_mask = lru_cache(maxsize=TEXT_MASKS)(self._read_only_mask)

    def __len__(self) -> int:
        return len(self.items)

    def _read_only_mask(self, text: str) -> np.ndarray:
        mask = self.titles.mask(text)
        mask.flags.writeable = False  # shared between requests
        return mask

    def group_mask(self, group: str, wanted: list[str]) -> np.ndarray:
        """Return a bool mask of the items carrying any of the wanted labels (all items when none)."""
        mask = np.zeros(len(self), dtype=bool) if wanted else np.ones(len(self), dtype=bool)
        for label in wanted:
            mask[self.labels.items_with(self.labels.code(group, label))] = True
        return mask

    def text_mask(self, text: str) -> np.ndarray | None:
        """Return a bool mask of the items whose title contains every word of text (None: no text);
        the latest few are kept, since a page asks for the same one to select and to count (read-only)."""
        return self._text_mask(" ".join(sorted(set(text.casefold().split())))) if text.split() else None

    def masks(self, filters: dict[str, list[str]]) -> dict[str, np.ndarray]:
        """Return {group: mask} for the groups that have a constraint."""
        return {g: self.group_mask(g, wanted) for g, wanted in filters.items() if wanted}

    def select(self, filters: dict[str, list[str]], text: str = "") -> np.ndarray:
        """Return the positions passing every filter (OR within a group, AND across) and the text."""
        mask = combine([self.text_mask(text), *self.masks(filters).values()])
        return np.arange(len(self)) if mask is None else np.flatnonzero(mask)

    def tally(self, mask: np.ndarray | None) -> np.ndarray:
        """Return items per label code among the masked items: one pass over the smaller of the selected
        and the unselected items' codes (the totals minus the unselected ones' counts)."""
        if mask is None:
            return self.totals
        selected = int(np.count_nonzero(mask))
        inverse = selected > len(self) // 2
        rows = np.flatnonzero(~mask if inverse else mask)
        counts = np.bincount(csr_gather(self.labels.offsets, self.labels.codes, rows), minlength=len(self.totals))
        return self.totals - counts if inverse else counts

    def counts(self, filters: dict[str, list[str]], text: str = "") -> dict[str, list[dict]]:
        """Return {group: [{label, count, selected}]}: items per label given the other groups' filters."""
        base, masks = self.text_mask(text), self.masks(filters)
        everything = self.tally(combine([base, *masks.values()]))  # the groups without a filter of their own
        out = {}
        for group in self.labels.groups:
            tally = everything
            if group in masks:
                tally = self.tally(combine([base, *(m for g, m in masks.items() if g != group)]))
            out[group] = self.rows(group, tally, filters.get(group, []))
        return out

    def rows(self, group: str, tally: np.ndarray, selected: list[str]) -> list[dict]:
        """Return a group's facet entries, most frequent first then by label; empty ones only when selected."""
        base, vocab = self.labels.base[group], self.vocab[group]
        counts = tally[base:base + len(vocab)]
        keep = counts > 0
        keep[[self.labels.code(group, label) - base for label in selected]] = True
        codes = np.flatnonzero(keep)
        codes = codes[np.lexsort((codes, -counts[codes]))]  # codes follow the sorted labels
        return [{"label": vocab[c], "count": int(counts[c]), "selected": vocab[c] in selected} for c in codes]


def shown_rows(rows: list[dict], find: str = "", limit: int | None = None) -> tuple[list[dict], int]:
    """The facet rows a page lists, in their order: every selected one and the first ``limit`` others
    whose label holds ``find`` (any letter case); and how many others hold it beyond those. A group of
    thousands of labels (brands) would otherwise put a link for each on every page."""
    needle = find.casefold()
    wanted = [r for r in rows if r["selected"] or needle in r["label"].casefold()]
    others = [i for i, r in enumerate(wanted) if not r["selected"]]
    cut = set(others[FACET_ROWS if limit is None else limit:])
    return [r for i, r in enumerate(wanted) if i not in cut], len(cut)


def combine(masks: list[np.ndarray | None]) -> np.ndarray | None:
    """Return the AND of the masks that are not None (None when all are)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].copy()
    for mask in present[1:]:
        out &= mask
    return out
