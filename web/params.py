"""Query-string parsing shared by the pages and the API: filters, pagination, k and view."""
from __future__ import annotations

import math
from urllib.parse import urlencode

from flask import abort
from werkzeug.datastructures import MultiDict

RESERVED = ("q", "page", "per_page", "k", "view")
# a group's filter parameter is its name, but a group named like a parameter above (a photo's "view":
# front, back) filters as filter.<group>; filter.<group> is accepted for every group
FILTER_PREFIX = "filter."
FIND_PREFIX = "find."  # find.<group>=text narrows the labels a facet lists (a group of many labels: brands)
MAX_FIND_CHARS = 100
PER_PAGE = 24
MAX_PER_PAGE = 100
DEFAULT_K = 12
MAX_K = 200
MAX_TEXT_CHARS = 200  # the title filter q: longer queries are refused (400), never scanned
MAX_TEXT_WORDS = 12


def parse_int(args: MultiDict, name: str, default: int, low: int, high: int) -> int:
    """Return an integer parameter, aborting with 400 when it is not an integer in [low, high]."""
    raw = args.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        abort(400, f"Parameter {name!r} must be an integer, got {raw!r}")
    if not low <= value <= high:
        abort(400, f"Parameter {name!r} must be between {low} and {high}, got {value}")
    return value


def parse_text(args: MultiDict) -> str:
    """Return the title filter q, aborting with 400 when it is longer than the limits allow."""
    text = args.get("q", "").strip()
    if len(text) > MAX_TEXT_CHARS:
        abort(400, f"Parameter 'q' is too long ({len(text)} characters); the limit is {MAX_TEXT_CHARS}")
    words = len(text.split())
    if words > MAX_TEXT_WORDS:
        abort(400, f"Parameter 'q' has too many words ({words}); the limit is {MAX_TEXT_WORDS}")
    return text


def split_values(raw_values: list[str], labels: list[str]) -> list[str]:
    """Return the labels of repeated and/or comma-separated values (a value that is a label stays whole)."""
    out = []
    for raw in raw_values:
        parts = [raw] if raw in labels else raw.split(",")
        out += [p.strip() for p in parts if p.strip()]
    return list(dict.fromkeys(out))


def filter_param(group: str) -> str:
    """The query parameter that filters a group: its name, or filter.<name> for a name in RESERVED."""
    return FILTER_PREFIX + group if group in RESERVED else group


def parse_filters(args: MultiDict, vocab: dict[str, list[str]]) -> dict[str, list[str]]:
    """Return {group: [labels]} from the parameters named after groups (``filter_param``, or
    filter.<group>), 400 listing valid labels."""
    filters = {}
    for group, labels in vocab.items():
        raw = [value for name in dict.fromkeys([filter_param(group), FILTER_PREFIX + group])
               for value in args.getlist(name)]
        if not raw:
            continue
        wanted = split_values(raw, labels)
        if wanted and not labels:
            abort(400, f"No indexed item is labelled in {group!r}, so it cannot filter (the index was built "
                       f"from a catalog without that column?)")
        unknown = [label for label in wanted if label not in labels]
        if unknown:
            abort(400, f"Unknown {group} label(s) {', '.join(map(repr, unknown))}; "
                       f"choose from: {', '.join(labels)}")
        if wanted:
            filters[group] = wanted
    return filters


def parse_finds(args: MultiDict, groups) -> dict[str, str]:
    """Return {group: text} of the find.<group> parameters given (400 past MAX_FIND_CHARS)."""
    finds = {}
    for group in groups:
        text = args.get(FIND_PREFIX + group, "").strip()
        if len(text) > MAX_FIND_CHARS:
            abort(400, f"Parameter {FIND_PREFIX + group!r} is too long ({len(text)} characters); "
                       f"the limit is {MAX_FIND_CHARS}")
        if text:
            finds[group] = text
    return finds


def parse_view(args: MultiDict, views) -> str:
    """Return the view parameter ("shared" by default), 400 listing the index's views."""
    view = args.get("view", "").strip() or "shared"
    if view not in views:
        abort(400, f"Unknown view {view!r}; choose one of: {', '.join(views)}")
    return view


def page_bounds(total: int, page: int, per_page: int) -> tuple[int, int, int]:
    """Return (start, stop, pages); 404 for a page past the last (page 1 of nothing is empty, not 404)."""
    pages = math.ceil(total / per_page)
    if page > max(1, pages):
        abort(404, f"Page {page} is past the last page ({pages}) of {total} items")
    start = (page - 1) * per_page
    return start, min(total, start + per_page), pages


def group_pairs(group: str, labels: list[str]) -> list[tuple[str, str]]:
    """One group's filter as query pairs: its labels comma-joined in one parameter, or the parameter
    repeated once a label when a label holds a comma (``a, b`` joined with ``sport`` would read as
    three labels: ``split_values`` keeps a whole value that is a label)."""
    if not labels:
        return []
    if any("," in label for label in labels):
        return [(filter_param(group), label) for label in labels]
    return [(filter_param(group), ",".join(labels))]


def filter_params(filters: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Return the filters as query pairs (``filter_param``, ``group_pairs``)."""
    return [pair for group, labels in filters.items() for pair in group_pairs(group, labels)]


def query_string(filters: dict[str, list[str]], **extra) -> str:
    """Return "?..." for filters plus extra parameters (None values left out)."""
    pairs = filter_params(filters) + [(k, str(v)) for k, v in extra.items() if v not in (None, "")]
    return "?" + urlencode(pairs) if pairs else ""


def toggle_links(prefix: str, filters: dict[str, list[str]], group: str, labels: list[str], **extra) -> list[str]:
    """Return prefix + query_string(toggled(filters, group, label), **extra) for every label, encoding the
    other groups and extra once per group instead of once per label (a facet sidebar links every label)."""
    keys = list(filters) if group in filters else [*filters, group]  # toggled() appends a new group
    at = keys.index(group)
    before = urlencode(filter_params({g: filters[g] for g in keys[:at]}))
    after = urlencode(filter_params({g: filters[g] for g in keys[at + 1:]}) +
                      [(k, str(v)) for k, v in extra.items() if v not in (None, "")])
    current = filters.get(group, [])
    links = []
    for label in labels:
        own = [x for x in current if x != label] if label in current else [*current, label]
        query = "&".join(part for part in (before, urlencode(group_pairs(group, own)), after) if part)
        links.append(prefix + ("?" + query if query else ""))
    return links


def toggled(filters: dict[str, list[str]], group: str, label: str) -> dict[str, list[str]]:
    """Return a copy of filters with label added to or removed from its group."""
    out = {g: list(v) for g, v in filters.items()}
    current = out.setdefault(group, [])
    if label in current:
        current.remove(label)
    else:
        current.append(label)
    return out
