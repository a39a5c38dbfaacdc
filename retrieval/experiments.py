"""Experiment helpers: train → embed → evaluate one configuration, timed, and tabulate the results."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from retrieval.atomic import write_text
from retrieval.cli import main as cli

logger = logging.getLogger(__name__)


@dataclass
class Experiment:
    """One row of a comparison: training options (None = pretrained-only embedding) and results."""

    name: str
    train: list[str] | None = None
    embed: list[str] = field(default_factory=list)
    evaluate: list[str] = field(default_factory=list)
    checkpoint: str = "best.pt"
    seconds: dict[str, float] = field(default_factory=dict)
    report: dict | None = None


def _timed(exp: Experiment, stage: str, argv: list[str]) -> None:
    began = time.perf_counter()
    code = cli(argv)
    exp.seconds[stage] = time.perf_counter() - began
    if code:
        raise RuntimeError(f"{exp.name}: 'retrieval {' '.join(argv)}' failed with exit code {code}")


def finished(output: Path, catalog: str) -> bool:
    """Whether a stage's output can be reused: it exists and is newer than the catalog's labels.csv
    (a catalog written again, e.g. a regenerated stand-in, makes every stage run again)."""
    labels = Path(catalog) / "labels.csv"
    return output.exists() and (not labels.exists() or output.stat().st_mtime > labels.stat().st_mtime)


TRAINED = "experiment-trained"  # written in RUN once `retrieval train` has returned 0


def trained(run: Path, catalog: str) -> bool:
    """Whether a training stage can be reused: ``retrieval train`` returned 0 on it since the catalog
    was written (``TRAINED``). best.pt alone does not say so: training writes it from the first epoch,
    so a stopped run has one. A run from before the marker counts when best.pt is newer than the
    catalog and metrics.json reached the epochs in config.yaml."""
    if finished(run / TRAINED, catalog):
        return True
    if (run / TRAINED).exists() or not finished(run / "best.pt", catalog):
        return False
    try:
        epochs = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("epochs")
        history = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(epochs, int) and bool(history) and history[-1]["epoch"] + 1 >= epochs


def run_experiment(exp: Experiment, catalog: str, workdir: Path, trunk_cache: Path | None = None) -> Experiment:
    """Train (unless pretrained-only), embed and evaluate; reuses the stages a rerun finished since
    the catalog was last written, and resumes a stopped training (``trained``)."""
    run, emb, report = workdir / exp.name, workdir / f"{exp.name}.h5", workdir / f"{exp.name}-report"
    cache = ["--trunk-cache", str(trunk_cache)] if trunk_cache else []
    retrain = exp.train is not None and not trained(run, catalog)
    if retrain:
        resume = ["--resume"] if finished(run / "last.pt", catalog) else []
        if not resume and (run / "last.pt").exists():  # made before the catalog was written: set aside
            stale = run.with_name(run.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            run.rename(stale)
            logger.info("%s predates %s/labels.csv: moved to %s, training again", run, catalog, stale)
        _timed(exp, "train", ["train", "--catalog", catalog, "--out", str(run), *cache, *exp.train, *resume])
        write_text(run / TRAINED, " ".join(["retrieval", "train", *exp.train]) + "\n")
    if retrain or not finished(emb, catalog):
        source = ["--checkpoint", str(run / exp.checkpoint)] if exp.train is not None else ["--pretrained-only"]
        _timed(exp, "embed", ["embed", *source, "--catalog", catalog, "--out", str(emb), *cache, *exp.embed])
    _timed(exp, "evaluate", ["evaluate", "--embeddings", str(emb), "--catalog", catalog, "--out", str(report),
                             "--title", exp.name, *exp.evaluate])
    exp.report = json.loads((report / "report.json").read_text())
    return exp


def _pct(entry: dict | None, key: str) -> str:
    value = entry.get(key) if entry else None
    return "–" if value is None else f"{100 * value:.1f}"


def format_rows(experiments: list[Experiment], focus: str | None = None) -> str:
    """Markdown table: mean mAP@50 (paper / standard) for both views, a focus group, times."""
    head = "| embedding | mean (shared) | mean (group view) |"
    rule = "|---|---:|---:|"
    if focus:
        head += f" {focus} (shared) | {focus} (group view) | {focus} acc / macro-F1 |"
        rule += "---:|---:|---:|"
    lines = [head + " train s | embed s |", rule + "---:|---:|"]
    for e in experiments:
        r = e.report
        mean, view = r["mean"], r["mean"].get("group_view")
        row = f"| {e.name} | {_pct(mean, 'map_paper')} / {_pct(mean, 'map_standard')} | " \
              f"{_pct(view, 'map_paper')} / {_pct(view, 'map_standard')} |"
        if focus:
            g = r["groups"].get(focus, {})
            c = r.get("classification", {}).get(focus)
            row += f" {_pct(g, 'map_paper')} / {_pct(g, 'map_standard')} | " \
                   f"{_pct(g.get('group_view'), 'map_paper')} / {_pct(g.get('group_view'), 'map_standard')} | " \
                   f"{_pct(c, 'accuracy')} / {_pct(c, 'macro_f1')} |"
        row += f" {e.seconds.get('train', 0):.0f} | {e.seconds.get('embed', 0):.0f} |"
        lines.append(row)
    return "\n".join(lines)
