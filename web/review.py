"""Label review: the issues of a ``retrieval audit`` (AUDIT_DIR/issues.csv) with their photo, given and
suggested labels and nearest labelled neighbours; accept / reject / skip (keyboard: a / r / s).
Decisions are appended to AUDIT_DIR/decisions.csv only when the server was started with --review."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from flask import Blueprint, abort, current_app, g, jsonify, redirect, render_template, request, url_for

from retrieval.audit.decisions import DECISIONS, append_decision, read_decisions
from retrieval.audit.labels import KINDS, Issue
from web.resources import get_snapshot

logger = logging.getLogger(__name__)
bp = Blueprint("review", __name__)
PAGE_SIZE = 12
OFF = "Decisions are off: start the server with --review to record them (the audit is read-only now)."


class AuditFiles:
    """issues.csv and the catalog's labels, read once and again when the files change."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key, self.issues, self.labels, self.groups = None, [], {}, []

    def load(self, directory: Path, catalog_dir: Path | None) -> "AuditFiles":
        from retrieval.audit.labels import read_issues
        from retrieval.data.catalog import read_catalog

        issues_csv = directory / "issues.csv"
        labels_csv = catalog_dir / "labels.csv" if catalog_dir is not None else None
        key = [stat_or_503(issues_csv, "the audit's issues")]
        if labels_csv is not None:
            key.append(stat_or_503(labels_csv, "the catalog's labels"))
        with self._lock:
            if key != self._key:
                try:
                    issues = read_issues(issues_csv)
                except (KeyError, TypeError, ValueError, OSError) as err:  # hand-edited or not one
                    abort(503, f"{issues_csv} cannot be read as an audit's issues ({err!r}); "
                               "run 'retrieval audit' again")
                try:  # a malformed labels.csv was a 500 (CatalogError)
                    catalog = read_catalog(catalog_dir, check_files=False) if catalog_dir else None
                except (ValueError, OSError) as err:
                    abort(503, f"The catalog {labels_csv} cannot be read for the review's neighbour labels ({err})")
                self.issues, self.groups = issues, sorted({i.group for i in issues})
                self.labels = {it.image: it.labels for it in catalog.items} if catalog else {}
                self._key = key
        return self


def stat_or_503(path: Path, what: str) -> int:
    """A file's modification time (the key of the files read), 503 naming it when it cannot be read."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError as err:
        abort(503, f"{path} ({what}) cannot be read: {err.strerror or err}")


FILES = AuditFiles()


def audit_dir() -> Path:
    """The configured audit directory (503 naming how to configure one)."""
    configured = current_app.config.get("AUDIT_DIR")
    if not configured or not (Path(configured) / "issues.csv").is_file():
        abort(503, "No label audit configured: run 'retrieval audit ... --out AUDIT_DIR', then start the "
                   "server with --audit AUDIT_DIR (add --review to record decisions)")
    return Path(configured)


def audit_files() -> AuditFiles:
    """The audit's files, checked for changes once per request."""
    if "audit_files" not in g:
        catalog = current_app.config.get("CATALOG_DIR")
        g.audit_files = FILES.load(audit_dir(), Path(catalog) if catalog else None)
    return g.audit_files


def pending(group: str | None, kind: str | None) -> list[Issue]:
    """Issues of a group and kind (None = all) without a decision yet, in ranked order."""
    try:
        rows = read_decisions(audit_dir() / "decisions.csv", strict=False)  # a bad row: skipped
    except ValueError as err:  # not a decisions file at all (its columns): named, not a 500
        abort(503, f"{err}; move it aside to start the review's decisions afresh")
    # an issue is its image, group and kind: deciding an item's wrong label leaves its duplicate conflict
    decided = {(d["image"], d["group"], d.get("kind")) for d in rows}
    return [i for i in audit_files().issues if (group is None or i.group == group)
            and (kind is None or i.kind == kind) and (i.image, i.group, i.kind) not in decided]


def chosen_filters() -> tuple[str | None, str | None]:
    """group= and kind= of the request (empty = all); 400 naming the valid values."""
    group, kind = request.values.get("group") or None, request.values.get("kind") or None
    groups = audit_files().groups
    if group is not None and group not in groups:
        abort(400, f"Unknown group {group!r}; choose one of: {', '.join(groups)}")
    if kind is not None and kind not in KINDS:
        abort(400, f"Unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return group, kind


def as_dict(issue: Issue) -> dict:
    """An issue for the page and the API; ``indexed`` says whether its photo (each neighbour's too) is
    in the index, which ``/images`` serves (an image removed since the audit: the page says so, no
    broken picture)."""
    labels, items = audit_files().labels, get_snapshot().store.items
    near = [n for n in issue.neighbours.split("|") if n]
    return {"image": issue.image, "group": issue.group, "given": issue.given, "suggested": issue.suggested,
            "score": issue.score, "kind": issue.kind, "indexed": items.has_path(issue.image),
            "neighbours": [{"image": n, "labels": list(labels.get(n, {}).get(issue.group, ())),
                            "indexed": items.has_path(n)} for n in near]}


def page_of(issues: list, page: int) -> list:
    return issues[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]


def record(values) -> dict:
    """Append the decision of a pending issue; 403 without --review, 400/404 naming what is wrong."""
    if not current_app.config.get("REVIEW"):
        abort(403, OFF)
    missing = [f for f in ("image", "group", "kind", "decision") if not values.get(f)]
    if missing:
        abort(400, f"Missing field(s): {', '.join(missing)}")
    if values["decision"] not in DECISIONS:
        abort(400, f"Unknown decision {values['decision']!r}; choose one of: {', '.join(DECISIONS)}")
    match = [i for i in audit_files().issues if (i.image, i.group, i.kind) ==
             (values["image"], values["group"], values["kind"])]
    if not match:
        abort(404, f"No {values['kind']} issue of {values['image']!r} in group {values['group']!r}")
    issue = match[0]
    path = audit_dir() / "decisions.csv"
    try:
        return append_decision(path, issue.image, issue.group, issue.kind, issue.given, issue.suggested,
                               values["decision"])
    except OSError as err:  # a folder, no permission, a full disk: was a 500
        logger.error("Cannot record a review decision in %s: %s", path, err)
        abort(503, f"The decision was not recorded: {err.strerror or err}")


@bp.get("/review")
def page():
    """The pending issues of the chosen group and kind, a page at a time."""
    group, kind = chosen_filters()
    issues = pending(group, kind)
    pages = max(1, -(-len(issues) // PAGE_SIZE))
    # past the last page (its last issue just decided, or a stale link): the last page, not "nothing left"
    number = min(pages, max(1, request.args.get("page", 1, type=int) or 1))
    groups = audit_files().groups
    return render_template("review.html", issues=[as_dict(i) for i in page_of(issues, number)], total=len(issues),
                           page=number, pages=pages, group=group, kind=kind,
                           groups=groups, kinds=KINDS, review_enabled=bool(current_app.config.get("REVIEW")),
                           off=OFF)


@bp.post("/review/decide")
def decide():
    """Form post (the page's buttons and keyboard shortcuts): record, then back to the list."""
    record(request.form)
    page = request.form.get("filter_page", type=int)
    return redirect(url_for("review.page", group=request.form.get("filter_group") or None,
                            kind=request.form.get("filter_kind") or None, page=page if page and page > 1 else None))


@bp.get("/api/review/issues")
def api_issues():
    """JSON: the pending issues (``group``, ``kind``, ``page`` as on the page)."""
    group, kind = chosen_filters()
    issues = pending(group, kind)
    number = max(1, request.args.get("page", 1, type=int) or 1)
    return jsonify(issues=[as_dict(i) for i in page_of(issues, number)], total=len(issues), page=number,
                   review=bool(current_app.config.get("REVIEW")))


@bp.post("/api/review/decisions")
def api_decide():
    """JSON or form body {image, group, kind, decision}: the recorded row (201)."""
    values = request.form
    if request.is_json:
        values = request.get_json(silent=True)
        if not isinstance(values, dict):
            abort(400, "The body is not a JSON object {image, group, kind, decision}" if values is not None
                  else "The body is not valid JSON")
    return jsonify(record(values or {})), 201
