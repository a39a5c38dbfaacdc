"""Similarity search for the pages and the API: by catalog id (no model) and by uploaded photo."""
from __future__ import annotations

import io
import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from flask import abort, current_app, url_for

from web.uploads import open_upload

logger = logging.getLogger(__name__)

TOP_LABELS = 3
QUERY_THUMB = 320


@dataclass
class Query:
    """An uploaded photo reduced to what searching needs: its shared embedding and head probabilities
    (the shared view is formed from them as the index searched holds it: an index rebuilt with another
    ``--shared-view`` still serves the queries remembered before) and its predicted labels."""

    embedding: np.ndarray
    probs: dict[str, np.ndarray]
    sigmoid_groups: tuple[str, ...]
    predicted: dict[str, list[dict]]
    labels: dict[str, list[str]]
    thumbnail: bytes
    own_shared_view: str  # the model's ``shared_view``, for indexes that do not say theirs
    name: str = ""
    shared_view_weights: dict[str, float] = field(default_factory=dict)  # the model's (the index was embedded with it)
    group_view_prior: dict = field(default_factory=dict)  # the model's (cooccurrence.py), as embed mixed the views

    def vector(self, view: str, shared_view: str | None, multi_label_view_power: float | None = None) -> np.ndarray:
        """The query's [1, D] vector in an index view (``shared`` or ``group-<name>``); ``shared_view``:
        what the index's shared view holds (``embfile.shared_vectors``; None: the model's own);
        ``multi_label_view_power``: the index's multi-label group-view rule (``embfile.group_vectors``;
        None, an index that records none: one built before the rule, the cosine's, or one without
        multi-label groups, where it does not matter), so scores are on the index's scale."""
        from retrieval.data.embfile import group_vectors, index_view_power, shared_vectors

        if view == "shared":
            return shared_vectors(self.embedding, self.probs, self.sigmoid_groups, shared_view or self.own_shared_view,
                                  self.shared_view_weights)
        group = view.removeprefix("group-")
        return group_vectors(self.probs, self.sigmoid_groups, index_view_power(multi_label_view_power),
                             self.group_view_prior)[group]


def shared_labels(labels: dict[str, list[str]], query_labels: dict[str, list[str]]) -> dict[str, list[str]]:
    """Return {group: labels an item shares with the query}."""
    return {g: [x for x in labels.get(g, []) if x in query_labels.get(g, [])] for g in labels}


def ranked_results(store, scores: np.ndarray, ids: np.ndarray, k: int, query_labels: dict,
                   exclude: int | None = None) -> list[dict]:
    """Return result dicts (item + score + shared labels) best first, without empty slots or exclude."""
    keep = (ids[0] >= 0) & (ids[0] != (-1 if exclude is None else exclude))
    results = store.items_by_id(ids[0][keep][:k])
    for item, score in zip(results, scores[0][keep]):
        item["score"] = round(float(score), 4)
        item["shared"] = shared_labels(item["labels"], query_labels)
    return results


def similar_to_item(store, item_id: int, k: int, view: str, filters: dict) -> tuple[dict, list[dict]]:
    """Return (item, its k most similar other items) in a view, filtered (KeyError for unknown ids)."""
    item = store.item(item_id)
    scores, ids = store.search(store.vector(item_id, view), k + 1, filters or None, view)
    return item, ranked_results(store, scores, ids, k, item["labels"], exclude=item_id)


def search_query(store, query: Query, k: int, view: str, filters: dict) -> list[dict]:
    """Return the k items most similar to an uploaded photo in a view, filtered."""
    scores, ids = store.search(query.vector(view, store.shared_view, store.multi_label_view_power), k,
                               filters or None, view)
    return ranked_results(store, scores, ids, k, query.labels)


def predicted_labels(model, probs: dict[str, np.ndarray]) -> dict[str, list[dict]]:
    """Return {group: top labels [{label, prob}] by probability}."""
    out = {}
    for group, labels in model.config.groups.items():
        p = probs[group][0]
        order = np.argsort(-p)[:TOP_LABELS]
        out[group] = [{"label": labels[i], "prob": round(float(p[i]), 4)} for i in order]
    return out


def query_labels(model, probs: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Return the labels taken as the photo's own: top-1, or every label over 0.5 in multi-label groups."""
    out = {}
    for group, labels in model.config.groups.items():
        p = probs[group][0]
        chosen = np.flatnonzero(p >= 0.5) if model.is_multi_label(group) else []
        out[group] = [labels[i] for i in (chosen if len(chosen) else [int(np.argmax(p))])]
    return out


def thumbnail_bytes(image, size: int = QUERY_THUMB) -> bytes:
    """Return a small JPEG of the query photo for the results page."""
    small = image.copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def describe_upload(model, image, device: str = "cpu", name: str = "") -> Query:
    """Run the model once over an uploaded photo: shared embedding, probabilities, predicted labels."""
    from retrieval.embed.inference import describe_image

    out = describe_image(model, image, device, "embedding")
    return Query(out.vectors[:1], {g: p[:1] for g, p in out.probs.items()}, tuple(model.sigmoid_groups),
                 predicted_labels(model, out.probs), query_labels(model, out.probs), thumbnail_bytes(image),
                 model.config.shared_view, name, dict(model.shared_view_weights), model.group_view_prior)


def with_urls(item: dict) -> dict:
    """Return an item dict with its image and thumbnail URLs added."""
    item["image_url"] = url_for("media.image", filename=item["path"])
    item["thumb_url"] = url_for("media.thumb", item_id=item["id"])
    return item


def lookup(store, item_id: int) -> dict:
    """Return an indexed item, 404 when the id is not in the index."""
    try:
        return store.item(item_id)
    except KeyError:
        abort(404, f"No item with id {item_id}")


def read_query(model, upload, device: str = "cpu") -> Query:
    """Return the Query of an uploaded file, 400 with the reason when it is not a usable photo."""
    from retrieval.data.images import ImageError

    try:
        image = open_upload(upload.stream, upload.filename, current_app.config["UPLOAD_MAX_PIXELS"],
                            size=max(model.config.image_size, QUERY_THUMB))  # decoded near the sizes used
    except ImageError as err:
        abort(400, f"Not a usable photo: {err}")
    return describe_upload(model, image, device, upload.filename)


class QueryCache:
    """The latest uploaded queries by random id, so filters and views can change without re-uploading."""

    def __init__(self, size: int = 256):
        self.size = size
        self._items: OrderedDict[str, Query] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, query: Query) -> str:
        """Store a query and return its new id (the oldest query is dropped when full)."""
        query_id = secrets.token_urlsafe(9)
        with self._lock:
            self._items[query_id] = query
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return query_id

    def get(self, query_id: str) -> Query | None:
        """Return a stored query, or None when it expired or never existed."""
        with self._lock:
            query = self._items.get(query_id)
            if query is not None:
                self._items.move_to_end(query_id)
            return query
