"""HTML pages: browse the catalogue, a product with similar items, search by photo."""
from __future__ import annotations

import logging
from functools import partial

from flask import Blueprint, Response, abort, current_app, g, redirect, render_template, request, url_for

from web import params
from web.facets import shown_rows
from web.resources import get_model, get_snapshot, resources
from web.search import lookup, read_query, search_query, similar_to_item, with_urls

logger = logging.getLogger(__name__)

bp = Blueprint("views", __name__)


def link_to(endpoint: str, route: dict, filters: dict, **extra) -> str:
    """Return the URL of endpoint with filters and extra parameters in the query string."""
    return url_for(endpoint, **route) + params.query_string(filters, **extra)


def view_choices(views) -> list[tuple[str, str]]:
    """Return (view, caption) pairs for the "Similar in" control."""
    from web import group_title

    return [(v, "Overall" if v == "shared" else group_title(v.removeprefix("group-"))) for v in views]


def page_context(snapshot, filters: dict, text: str, link: partial) -> dict:
    """Return the template variables every page with a facet sidebar needs; each facet lists its
    selected labels and the most frequent others (``facets.shown_rows``, narrowed by find.<group>),
    each row with the href that toggles its label (link: partial(link_to, endpoint, route, **extra));
    a facet with more gets a find box that keeps the page's other parameters."""
    counts = snapshot.facets.counts(filters, text)
    finds = params.parse_finds(request.args, counts)
    endpoint, route = link.args
    prefix = url_for(endpoint, **route)
    more, kept = {}, {}
    for group in counts:
        counts[group], more[group] = shown_rows(counts[group], finds.get(group, ""))
        hrefs = params.toggle_links(prefix, filters, group, [row["label"] for row in counts[group]], **link.keywords)
        for row, href in zip(counts[group], hrefs):
            row["href"] = href
        if more[group] or group in finds:
            kept[group] = [(k, v) for k, v in request.args.items(multi=True)
                           if k not in ("page", params.FIND_PREFIX + group)]
    return {"facets": counts, "filters": filters, "q": text, "link": link, "toggle": partial(params.toggled, filters),
            "facet_more": more, "facet_find": finds, "facet_kept": kept, "find_prefix": params.FIND_PREFIX}


def upload_enabled() -> bool:
    """Return True when the server has a checkpoint for search by photo."""
    return bool(current_app.config.get("CHECKPOINT"))


@bp.app_context_processor
def inject_globals() -> dict:
    """Make the upload switch and the filter query string available to every template."""
    return {"upload_enabled": upload_enabled(), "qs": params.query_string}


@bp.get("/")
def browse():
    """The catalogue as a paginated grid with facet filters and a title filter."""
    snapshot = get_snapshot()
    filters = params.parse_filters(request.args, snapshot.facets.filter_vocab)
    text = params.parse_text(request.args)
    page = params.parse_int(request.args, "page", 1, 1, 10**9)
    per_page = params.parse_int(request.args, "per_page", params.PER_PAGE, 1, params.MAX_PER_PAGE)
    positions = snapshot.facets.select(filters, text)
    start, stop, pages = params.page_bounds(len(positions), page, per_page)
    items = [with_urls(snapshot.store.items.item(int(p))) for p in positions[start:stop]]
    link = partial(link_to, "views.browse", {}, q=text or None,
                   per_page=per_page if per_page != params.PER_PAGE else None)  # facet links keep it
    return render_template("browse.html", items=items, page=page, pages=pages, total=len(positions),
                           per_page=per_page, **page_context(snapshot, filters, text, link))


@bp.get("/items/<int:item_id>")
def product(item_id: int):
    """One product: photo, title, labels and its most similar products."""
    snapshot = get_snapshot()
    lookup(snapshot.store, item_id)
    filters = params.parse_filters(request.args, snapshot.facets.filter_vocab)
    view = params.parse_view(request.args, snapshot.store.views)
    k = params.parse_int(request.args, "k", params.DEFAULT_K, 1, params.MAX_K)
    item, similar = similar_to_item(snapshot.store, item_id, k, view, filters)
    link = partial(link_to, "views.product", {"item_id": item_id}, view=view if view != "shared" else None,
                   k=k if k != params.DEFAULT_K else None)
    return render_template("product.html", item=with_urls(item), results=[with_urls(r) for r in similar],
                           view=view, views=view_choices(snapshot.store.views), k=k,
                           **page_context(snapshot, filters, "", link))


@bp.get("/search")
def search_page():
    """The search-by-photo page: a drop zone and a file chooser."""
    snapshot = get_snapshot()
    filters = params.parse_filters(request.args, snapshot.facets.filter_vocab)
    view = params.parse_view(request.args, snapshot.store.views)
    return render_template("search.html", filters=filters, view=view if view != "shared" else None)


@bp.post("/search")
def search_upload():
    """Run the model on an uploaded photo, remember the query and redirect to its results."""
    model, _ = get_model()
    snapshot = get_snapshot()
    filters = params.parse_filters(request.values, snapshot.facets.filter_vocab)
    view = params.parse_view(request.values, snapshot.store.views)
    upload = request.files.get("image")
    if upload is None or not upload.filename:
        abort(400, "Choose a photo (JPEG, PNG, WebP or HEIC) to search with")
    query_id = resources().queries.add(read_query(model, upload, resources().model.device))
    extra = {"view": view} if view != "shared" else {}
    return redirect(link_to("views.search_results", {"query_id": query_id}, filters, **extra), code=303)


@bp.get("/search/<query_id>")
def search_results(query_id: str):
    """The results of an uploaded photo: predicted labels and similar products, filtered."""
    query = stored_query(query_id)
    snapshot = get_snapshot()
    filters = params.parse_filters(request.args, snapshot.facets.filter_vocab)
    view = params.parse_view(request.args, snapshot.store.views)
    k = params.parse_int(request.args, "k", params.DEFAULT_K * 2, 1, params.MAX_K)
    results = [with_urls(r) for r in search_query(snapshot.store, query, k, view, filters)]
    link = partial(link_to, "views.search_results", {"query_id": query_id},
                   view=view if view != "shared" else None, k=k if k != params.DEFAULT_K * 2 else None)
    return render_template("results.html", query=query, query_id=query_id, results=results, view=view,
                           views=view_choices(snapshot.store.views), k=k,
                           **page_context(snapshot, filters, "", link))


@bp.get("/search/<query_id>/query.jpg")
def query_image(query_id: str):
    """The uploaded photo of a query, as a small JPEG."""
    return Response(stored_query(query_id).thumbnail, mimetype="image/jpeg",
                    headers={"Cache-Control": "private, max-age=3600"})


def stored_query(query_id: str):
    """Return a remembered upload, 404 when it expired."""
    query = resources().queries.get(query_id)
    if query is None:
        # the error page then offers photo search again, with the filters and view the search had
        g.back = (url_for("views.search_page", **request.args.to_dict(flat=False)), "Search by photo again")
        abort(404, "This search has expired; upload the photo again.")
    return query
