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
    """Return one row per group (plus the mean) with mAP values in percent, None when undefined."""
    def pct(entry, key):
        value = (entry or {}).get(key)
        return None if value is None else 100 * value

    rows = []
    for name, entry in [*report.get("groups", {}).items(), ("mean", report.get("mean", {}))]:
        view = entry.get("group_view")
        rows.append({"group": name, "queries": entry.get("queries"), "mean": name == "mean",
                     "paper": pct(entry, "map_paper"), "standard": pct(entry, "map_standard"),
                     "view_paper": pct(view, "map_paper"), "view_standard": pct(view, "map_standard")})
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
    has_view = any(r["view_paper"] is not None for r in table_rows(report))
    settings = report.get("settings", {})
    served = get_snapshot().store.fingerprint
    other = (f"This report is of model {str(settings['fingerprint'])[:12]}; the index serves model {served[:12]}."
             if settings.get("fingerprint") and served and str(settings["fingerprint"]) != served else None)
    return render_template("evaluation.html", report=report, reason=other, rows=table_rows(report),
                           has_view=has_view, chart=(directory / CHART).is_file(), settings=settings)


@bp.get("/chart.png")
def chart():
    """Serve the report's chart."""
    directory = report_dir()
    if directory is None:
        abort(404, "No evaluation report is configured")
    return send_from_directory(directory, CHART, max_age=60)
