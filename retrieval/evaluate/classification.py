"""Classification side of the evaluation: per-group accuracy, per-class P/R/F1, charts."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retrieval.data.catalog import Catalog
from retrieval.evaluate.metrics import classification_report, multilabel_report

logger = logging.getLogger(__name__)


def group_report(probs: np.ndarray, items, group: str, vocab: list[str], multi_label: bool) -> dict | None:
    """Classification report of one group over the items labelled in it (None when none are)."""
    known = np.array([bool(it.labels[group]) for it in items])
    if not known.any():
        return None
    position = {label: i for i, label in enumerate(vocab)}
    if multi_label:
        truth = np.zeros((known.sum(), len(vocab)), dtype=bool)
        for r, it in enumerate(i for i, k in zip(items, known) if k):
            truth[r, [position[l] for l in it.labels[group]]] = True
        p = probs[known]
        predicted = p >= 0.5
        predicted[np.arange(len(p)), p.argmax(1)] = True  # at least one label each
        report = multilabel_report(truth, predicted, vocab)
        report["accuracy"] = report["sample_accuracy"]
        return report
    truth = [position[it.labels[group][0]] for it, k in zip(items, known) if k]
    return classification_report(truth, probs[known].argmax(1).tolist(), vocab)


def classify(probs: dict[str, np.ndarray], items, catalog: Catalog) -> dict:
    """Per-group classification reports of head probabilities aligned with ``items``."""
    multi = set(catalog.multi_label_groups())
    reports = {}
    for g in catalog.groups:
        if g in probs:
            reports[g] = group_report(probs[g], items, g, catalog.vocab[g], g in multi)
    return {g: r for g, r in reports.items() if r is not None}


def draw_class_chart(report: dict, group: str, path: Path) -> None:
    """Per-class accuracy (recall) of one group, rarest classes last, as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = report["classes"]
    names = sorted((n for n in classes if classes[n]["support"]), key=lambda n: -classes[n]["support"])
    fig = Figure(figsize=(max(6, 0.28 * len(names)), 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), [100 * classes[n]["recall"] for n in names], color="#3b6ea5")
    ax.set_xticks(range(len(names)), [f"{n} ({classes[n]['support']})" for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("per-class accuracy (%)")
    ax.set_title(f"{group}: accuracy {100 * report['accuracy']:.1f}%, macro-F1 {100 * report['macro_f1']:.1f}%")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path)
