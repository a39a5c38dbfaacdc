"""Classification side of the evaluation: confusion matrices, per-group accuracy, per-class P/R/F1, charts."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.data.catalog import Catalog
from retrieval.evaluate.metrics import safe_divide

logger = logging.getLogger(__name__)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts [n_classes, n_classes]: rows are true classes, columns predicted classes."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y_true.shape} vs {y_pred.shape}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} has class ids outside 0..{n_classes - 1}")
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and macro-F1 of single-label predictions.

    Undefined ratios (0/0) count as 0, like sklearn's ``zero_division=0``. Classes with neither
    support nor predictions carry no information about the model and are left out of macro-F1.
    """
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    tp = np.diag(cm)
    report = _per_class_report(tp, cm.sum(axis=0), cm.sum(axis=1), class_names)
    report["accuracy"] = float(tp.sum() / cm.sum()) if cm.sum() else 0.0
    return report


def multilabel_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """Per-class P/R/F1, macro-F1, exact-match and sample-averaged accuracy of multi-hot predictions.

    Sample-averaged accuracy is the mean of |true & pred| / |true | pred| per sample, where a sample
    with both sets empty scores 1. Macro-F1 follows ``classification_report``.
    """
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape or y_true.shape[1:] != (len(class_names),):
        raise ValueError(f"Expected two [N, {len(class_names)}] arrays, got {y_true.shape} and {y_pred.shape}")
    tp = (y_true & y_pred).sum(axis=0)
    report = _per_class_report(tp, y_pred.sum(axis=0), y_true.sum(axis=0), class_names)
    inter, union = (y_true & y_pred).sum(axis=1), (y_true | y_pred).sum(axis=1)
    report["exact_match"] = float((y_true == y_pred).all(axis=1).mean()) if len(y_true) else 0.0
    report["sample_accuracy"] = float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean()) \
        if len(y_true) else 0.0
    return report


def _per_class_report(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray,
                      class_names: Sequence[str]) -> dict:
    """Per-class precision/recall/F1 from true positives, predicted and true counts; macro-F1."""
    precision = safe_divide(tp.astype(np.float64), predicted)
    recall = safe_divide(tp.astype(np.float64), support)
    f1 = safe_divide(2 * precision * recall, precision + recall)
    classes = {name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                      "support": int(support[c])} for c, name in enumerate(class_names)}
    present = (support > 0) | (predicted > 0)
    macro = float(f1[present].mean()) if present.any() else 0.0
    return {"classes": classes, "macro_f1": macro}



def group_report(probs: np.ndarray, items, group: str, vocab: list[str], multi_label: bool) -> dict | None:
    """Classification report of one group over the items labelled in it (None when none are).
    ``vocab``: the labels of ``probs``'s columns (the model's); a label of the items' that the model
    has none for (the catalog gained it since training) is a class of the report that is never
    predicted, so its items count as wrong (warned)."""
    known = np.array([bool(it.labels[group]) for it in items])
    if not known.any():
        return None
    labelled = [it.labels[group] for it, k in zip(items, known) if k]
    unseen = sorted({label for labels in labelled for label in labels} - set(vocab))
    if unseen:
        n = sum(any(label in unseen for label in labels) for labels in labelled)
        logger.warning("group %r: %d evaluated item(s) carry labels the model has no class for (%s); they count "
                       "as wrong: train again to learn them", group, n, ", ".join(map(repr, unseen[:5])) +
                       (f" and {len(unseen) - 5} more" if len(unseen) > 5 else ""))
    names = [*vocab, *unseen]
    position = {label: i for i, label in enumerate(names)}
    p = probs[known]
    if multi_label:
        truth = np.zeros((len(p), len(names)), dtype=bool)
        for r, labels in enumerate(labelled):
            truth[r, [position[label] for label in labels]] = True
        predicted = np.zeros_like(truth)
        predicted[:, :len(vocab)] = p >= 0.5
        predicted[np.arange(len(p)), p.argmax(1)] = True  # at least one label each
        report = multilabel_report(truth, predicted, names)
        report["accuracy"] = report["sample_accuracy"]
        return report
    truth = [position[labels[0]] for labels in labelled]
    return classification_report(truth, p.argmax(1).tolist(), names)


def classify(probs: dict[str, np.ndarray], items, catalog: Catalog, head_labels: dict | None = None) -> dict:
    """Per-group classification reports of head probabilities aligned with ``items``. ``head_labels``:
    each group's labels in the order of its columns (the embeddings file's ``head_labels``); a file
    without them (embedded before 2026-11-29) is read by the catalog's labels, and a group whose
    label count no longer matches its columns is left out (warned)."""
    multi = set(catalog.multi_label_groups())
    reports = {}
    for g in catalog.groups:
        if g not in probs:
            continue
        vocab = (head_labels or {}).get(g, catalog.vocab[g])
        if len(vocab) != probs[g].shape[1]:
            logger.warning("group %r: the embeddings hold %d class scores, the catalog %d labels (changed since "
                           "embedding, by a file that does not name its columns); no classification report: "
                           "embed again", g, probs[g].shape[1], len(vocab))
            continue
        reports[g] = group_report(probs[g], items, g, vocab, g in multi)
    return {g: r for g, r in reports.items() if r is not None}


def draw_class_chart(report: dict, group: str, path) -> None:
    """Per-class accuracy (recall) of one group, rarest classes last, as PNG into ``path`` (a file name or an open binary file)."""
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
    fig.savefig(path, format="png")
