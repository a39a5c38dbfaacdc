"""The evaluation page: the latest per-group mAP@k report (REPORT_DIR/report.json + chart.png)."""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Blueprint, abort, current_app, render_template, send_from_directory

from web.resources import get_snapshot

logger = logging.getLogger(__name__)

bp = Blueprint("evaluation", __name__, url_prefix="/evaluation")
CHART = "chart.png"


def report_dir() -> Path | None:
    """Return the configured report directory, or None."""
    configured = current_app.config.get("REPORT_DIR")
    return Path(configured) if configured else None


def read_report(directory: Path) -> tuple[dict | None, str | None]:
    """Return (report, None), or (None, a friendly reason) when it is missing or unreadable."""
    from retrieval.evaluate.report import EvaluationError, load_report

    if not (directory / "report.json").is_file():
        return None, f"No report.json in {directory} yet. Write one with: retrieval evaluate --out {directory} ..."
    try:
        return load_report(directory), None
    except (OSError, ValueError, EvaluationError) as err:  # not JSON, not a report: named, not "none yet"
        logger.warning("Cannot read the report in %s: %s", directory, err)
        return None, f"The report in {directory} cannot be read ({err})."


def table_rows(report: dict) -> list[dict]:
    """Return one row per group (plus the mean) with mAP values in percent, None when undefined; a
    ValueError naming the entry when the report is not shaped as 'retrieval evaluate' writes it (a
    hand-edited group that is a string, a ``group_view`` that is no object, a mAP that is no number)."""
    def pct(entry, key, where):
        value = (entry or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}.{key} is {value!r}, not a number")
        return None if value is None else 100 * value

    rows = []
    for name, entry in [*report.get("groups", {}).items(), ("mean", report.get("mean", {}))]:
        where = "mean" if name == "mean" and entry is report.get("mean") else f"groups.{name}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is {str(entry)[:40]!r}, not an object of mAP values")
        view = entry.get("group_view")
        if view is not None and not isinstance(view, dict):
            raise ValueError(f"{where}.group_view is {str(view)[:40]!r}, not an object of mAP values")
        queries = entry.get("queries")
        if queries is not None and (isinstance(queries, bool) or not isinstance(queries, (int, float))):
            raise ValueError(f"{where}.queries is {str(queries)[:40]!r}, not a number")
        rows.append({"group": name, "queries": queries, "mean": name == "mean",
                     "paper": pct(entry, "map_paper", where), "standard": pct(entry, "map_standard", where),
                     "view_paper": pct(view, "map_paper", f"{where}.group_view"),
                     "view_standard": pct(view, "map_standard", f"{where}.group_view")})
    return rows


@bp.get("")
def page():
    """Show the per-group mAP chart and table, or say how to produce a report."""
    directory = report_dir()
    if directory is None:
        return render_template("evaluation.html", report=None,
                               reason="No evaluation report is configured. Start the server with "
                                      "--report REPORT_DIR (written by 'retrieval evaluate').")
    report, reason = read_report(directory)
    if report is None:
        return render_template("evaluation.html", report=None, reason=reason)
    try:  # a hand-edited report.json of the right keys but wrong values was a 500
        rows = table_rows(report)
    except ValueError as err:
        logger.warning("Cannot read the report in %s: %s", directory, err)
        return render_template("evaluation.html", report=None,
                               reason=f"The report in {directory} cannot be read ({directory / 'report.json'}: {err}).")
    has_view = any(r["view_paper"] is not None for r in rows)
    settings = report.get("settings", {})
    served = get_snapshot().store.fingerprint
    other = (f"This report is of model {str(settings['fingerprint'])[:12]}; the index serves model {served[:12]}."
             if settings.get("fingerprint") and served and str(settings["fingerprint"]) != served else None)
    return render_template("evaluation.html", report=report, reason=other, rows=rows,
                           has_view=has_view, chart=(directory / CHART).is_file(), settings=settings)


@bp.get("/chart.png")
def chart():
    """Serve the report's chart."""
    directory = report_dir()
    if directory is None:
        abort(404, "No evaluation report is configured")
    return send_from_directory(directory, CHART, max_age=60)
