"""Browsing an index snapshot: label filters, a title text filter and facet counts over positions."""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


class Facets:
    """Per-group label codes of every indexed item, for filtering and counting without FAISS."""

    def __init__(self, store):
        self.ids = np.asarray(store.ids, dtype=np.int64)
        self.groups = list(store.labels)
        self.vocab, self.code_of, self.codes, self.owners = {}, {}, {}, {}
        for group, per_item in store.labels.items():
            self._index_group(group, per_item)
        self.titles = [title.casefold() for title in store.titles]
        self.paths = frozenset(store.paths)

    def __len__(self) -> int:
        return len(self.ids)

    def _index_group(self, group: str, per_item: list[list[str]]) -> None:
        """Store sorted labels plus flat (label code, item position) pairs of one group."""
        labels = sorted({label for item in per_item for label in item})
        code_of = self.code_of[group] = {label: code for code, label in enumerate(labels)}
        self.vocab[group] = labels
        self.codes[group] = np.array([code_of[lab] for item in per_item for lab in item], dtype=np.int64)
        self.owners[group] = np.repeat(np.arange(len(per_item)), [len(item) for item in per_item])

    def group_mask(self, group: str, wanted: list[str]) -> np.ndarray:
        """Return a bool mask of the items carrying any of the wanted labels (all items when none)."""
        if not wanted:
            return np.ones(len(self), dtype=bool)
        codes = [self.code_of[group][label] for label in wanted]
        mask = np.zeros(len(self), dtype=bool)
        mask[self.owners[group][np.isin(self.codes[group], codes)]] = True
        return mask

    def text_mask(self, text: str) -> np.ndarray:
        """Return a bool mask of the items whose title contains every word of text (case-insensitive)."""
        words = text.casefold().split()
        if not words:
            return np.ones(len(self), dtype=bool)
        return np.fromiter((all(w in title for w in words) for title in self.titles), dtype=bool,
                           count=len(self.titles))

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
        base = self.text_mask(text)
        masks = self.masks(filters)
        out = {}
        for group in self.groups:
            mask = base.copy()
            for other, other_mask in masks.items():
                if other != group:
                    mask &= other_mask
            tally = np.bincount(self.codes[group][mask[self.owners[group]]], minlength=len(self.vocab[group]))
            out[group] = self._facet_rows(group, tally, filters.get(group, []))
        return out

    def _facet_rows(self, group: str, tally: np.ndarray, selected: list[str]) -> list[dict]:
        """Return the facet entries of one group, most frequent first; empty ones only when selected."""
        rows = [{"label": label, "count": int(n), "selected": label in selected}
                for label, n in zip(self.vocab[group], tally) if n or label in selected]
        return sorted(rows, key=lambda r: (-r["count"], r["label"]))


def item_at(store, position: int) -> dict:
    """Return dict(id, path, title, labels) of the item at a position of the store's arrays."""
    labels = {group: list(per_item[position]) for group, per_item in store.labels.items()}
    return {"id": int(store.ids[position]), "path": store.paths[position], "title": store.titles[position],
            "labels": labels}
