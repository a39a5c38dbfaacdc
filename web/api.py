"""The JSON API under /api: items, similar items, search by photo, health."""
from __future__ import annotations

import logging

from flask import Blueprint, abort, jsonify, request

from web import params
from web.resources import get_model, get_snapshot, resources
from web.search import lookup, read_query, search_query, similar_to_item, with_urls

logger = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api")


def search_args(snapshot) -> tuple[int, str, dict]:
    """Return (k, view, filters) of a similarity request."""
    args = request.args if request.method == "GET" else request.values
    k = params.parse_int(args, "k", params.DEFAULT_K, 1, params.MAX_K)
    view = params.parse_view(args, snapshot.store.views)
    return k, view, params.parse_filters(args, snapshot.facets.filter_vocab)


@bp.get("/items")
def items():
    """List indexed items, filtered by label and title text, one page at a time."""
    snapshot = get_snapshot()
    filters = params.parse_filters(request.args, snapshot.facets.filter_vocab)
    page = params.parse_int(request.args, "page", 1, 1, 10**9)
    per_page = params.parse_int(request.args, "per_page", params.PER_PAGE, 1, params.MAX_PER_PAGE)
    positions = snapshot.facets.select(filters, params.parse_text(request.args))
    start, stop, pages = params.page_bounds(len(positions), page, per_page)
    found = [with_urls(snapshot.store.items.item(int(p))) for p in positions[start:stop]]
    return jsonify(items=found, page=page, per_page=per_page, total=len(positions), pages=pages)


@bp.get("/items/<int:item_id>")
def item(item_id: int):
    """Return one item."""
    return jsonify(with_urls(lookup(get_snapshot().store, item_id)))


@bp.get("/items/<int:item_id>/similar")
def similar(item_id: int):
    """Return the k items most similar to an item (itself excluded), best first, from its stored vector."""
    snapshot = get_snapshot()
    lookup(snapshot.store, item_id)
    k, view, filters = search_args(snapshot)
    query, found = similar_to_item(snapshot.store, item_id, k, view, filters)
    return jsonify(item=with_urls(query), view=view, k=k, filters=filters,
                   results=[with_urls(r) for r in found])


@bp.post("/search")
def search():
    """Search by photo: multipart field `image`; returns predicted labels and similar items."""
    model, ckpt = get_model()
    snapshot = get_snapshot()
    k, view, filters = search_args(snapshot)
    upload = request.files.get("image")
    if upload is None or not upload.filename:
        abort(400, "Send the photo as multipart/form-data field 'image'")
    query = read_query(model, upload, resources().model.device)
    query_id = resources().queries.add(query)
    return jsonify(query_id=query_id, predicted=query.predicted, view=view, k=k, filters=filters,
                   results=[with_urls(r) for r in search_query(snapshot.store, query, k, view, filters)])


@bp.get("/search/<query_id>")
def search_again(query_id: str):
    """Search again with an earlier upload (other k, view or filters) without running the model."""
    query = resources().queries.get(query_id)
    if query is None:
        abort(404, f"Unknown or expired query {query_id!r}; upload the photo again")
    snapshot = get_snapshot()
    k, view, filters = search_args(snapshot)
    return jsonify(query_id=query_id, predicted=query.predicted, view=view, k=k, filters=filters,
                   results=[with_urls(r) for r in search_query(snapshot.store, query, k, view, filters)])


@bp.get("/labels")
def labels():
    """Return {group: labels} that filters accept."""
    return jsonify(get_snapshot().facets.vocab)


@bp.get("/health")
def health():
    """Return index size, fingerprints, views and whether search by photo is available."""
    res = resources()
    snapshot = get_snapshot()
    store = snapshot.store
    model_fp = res.model.get()[1]["fingerprint"] if res.model.checkpoint else None
    return jsonify(status="ok", index_size=len(store), index_fingerprint=store.fingerprint,
                   model_fingerprint=model_fp, views=list(store.views), index_type=store.index_type,
                   shared_view=store.shared_view,
                   index_created=store.created, search_by_photo=model_fp is not None,
                   reload_error=res.index().error)
