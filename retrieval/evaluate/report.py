"""The ``retrieval evaluate`` command: mAP@k reports from an embeddings file, and run comparisons."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from retrieval.atomic import atomic_write
from retrieval.data.catalog import Catalog
from retrieval.data.embfile import (HEAD_LABELS, MULTI_LABEL_VIEW_POWER, SHARED_VIEW_READS, SIGMOID_GROUPS,
                                    EmbeddingsError, fuse_probabilities, group_vectors, multi_label_view_power,
                                    ranks_by_cosine, read_attrs, read_paths,
                                    read_probabilities, read_rows, shared_view_name, shared_view_rows)
from retrieval.evaluate.classification import classify
from retrieval.evaluate.metrics import evaluate_retrieval

logger = logging.getLogger(__name__)

SPLITS = ("test", "val", "train", "all")
REPORT_FILE = "report.json"


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated; the message says which file and why."""


# --------------------------------------------------------------------------- matching

def match_rows(paths: list[str], catalog: Catalog, split: str) -> tuple[np.ndarray, list]:
    """Embedding rows of the split and their catalog items, matched by image path."""
    by_image = catalog.by_image()
    unknown = [p for p in paths if p not in by_image]
    if unknown:
        shown = ", ".join(repr(p) for p in unknown[:5])
        raise EvaluationError(f"{len(unknown)} embedded image path(s) are not in the catalog {catalog.root}: "
                              f"{shown}{' ...' if len(unknown) > 5 else ''}; was EMB.h5 made from this catalog?")
    if len(set(paths)) != len(paths):
        raise EvaluationError("the embeddings list some image paths more than once")
    wanted = {item.image for item in catalog.split_items(split)}
    rows = np.array([i for i, p in enumerate(paths) if p in wanted], dtype=np.int64)
    return rows, [by_image[paths[i]] for i in rows]


def evaluate_embeddings(emb_path: str | Path, catalog: Catalog, split: str = "test", k: int = 50,
                        device: str = "cpu", fuse: str | Path | None = None, sample_queries: int | None = None,
                        seed: int = 0, candidates: str = "labelled", shared_view: str = "file") -> dict:
    """Report dict (docs/formats.md) of mAP@k on one split, plus classification of the heads.

    Only the split's rows are read from the embeddings file. With ``fuse``, a second embeddings
    file's head probabilities are averaged in (score fusion): classification and the group view
    use the fused scores, the shared view stays the first's. With ``sample_queries``, that many
    random queries (seeded) are ranked against every candidate and each mAP gets a 95% interval.
    ``candidates``: a group's candidates, the items labelled in it or ``all`` (``evaluate_retrieval``).
    ``shared_view``: ``file`` ranks the shared view by the file's vectors; ``embedding`` by the
    shared embedding alone (``embfile.shared_view_rows``: the papers' retrieval features).
    """
    if shared_view not in SHARED_VIEW_READS:
        raise EvaluationError(f"Unknown shared view {shared_view!r}; choose one of: {', '.join(SHARED_VIEW_READS)}")
    if split not in SPLITS:
        raise EvaluationError(f"Unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    rows, items = match_rows(read_paths(emb_path), catalog, split)
    if len(rows) < 2:
        held = {s: len(catalog.split_items(s)) for s in SPLITS if s != "all"}
        others = ", ".join(f"{s} ({n} items)" for s, n in held.items() if n >= 2 and s != split)
        raise EvaluationError(f"only {len(rows)} embedded item(s) in split {split!r}; "
                              f"choose another split: {others or 'none holds two items'}, or all")
    n_missing = len(catalog.split_items(split)) - len(rows)
    if n_missing:
        logger.warning("%d item(s) of split %r have no embedding (skipped images); evaluating %d",
                       n_missing, split, len(rows))
    emb = read_rows(emb_path, rows)
    labels = {g: [item.labels[g] for item in items] for g in catalog.groups}
    for g in sorted(set(emb.group_vectors) - set(catalog.groups)):
        logger.warning("group vectors %r have no matching catalog group; ignored", g)
    views = {g: v for g, v in emb.group_vectors.items() if g in labels}
    probs = read_probabilities(emb_path, rows)
    view_power = multi_label_view_power(emb.attrs)  # the rule the file's group views were written with
    if fuse:
        position = {p: i for i, p in enumerate(read_paths(fuse))}
        missing = [p for p in emb.paths if p not in position]
        if missing:
            raise EvaluationError(f"{fuse}: lacks {len(missing)} image(s) of {emb_path}, e.g. {missing[:3]}")
        probs = fuse_probabilities(probs, read_probabilities(fuse, np.array([position[p] for p in emb.paths])),
                                   f"{emb_path} and {fuse}", emb.attrs.get(HEAD_LABELS),
                                   read_attrs(fuse).get(HEAD_LABELS))
        sigmoid = set(emb.sigmoid_groups if emb.sigmoid_groups is not None else catalog.multi_label_groups())
        sigmoid |= set(read_attrs(fuse).get(SIGMOID_GROUPS) or ())  # a group either model scores by sigmoids
        views = {g: v for g, v in group_vectors(probs, sigmoid).items() if g in labels}
        view_power = MULTI_LABEL_VIEW_POWER if sigmoid & set(views) else None
    try:
        vectors = shared_view_rows(emb.vectors, emb.attrs, shared_view)
    except EmbeddingsError as err:
        raise EvaluationError(f"{emb_path}: {err}") from None
    name = shared_view_name(emb.attrs, shared_view)
    report = evaluate_retrieval(vectors, labels, k=k, vectors_by_group=views, device=device, progress=True,
                                sample_queries=sample_queries, seed=seed, candidates=candidates,
                                normalise=ranks_by_cosine(name))
    for g, entry in report["groups"].items():
        if entry.get("uninformative"):
            logger.warning("group %r: %s in split %r, so every ranking scores %s in it; shown, but left out "
                           "of the means", g, why_uninformative(entry), split, "100" if entry["map_paper"] else "0")
    settings = {"split": split, "k": k, "fingerprint": emb.fingerprint, "embeddings": str(Path(emb_path).resolve()),
                "n_items": len(rows), "n_missing": n_missing, "candidates": candidates,
                "catalog": str(Path(catalog.root).resolve()),
                "fused_with": str(Path(fuse).resolve()) if fuse else None,
                "shared_view": name,
                "multi_label_view_power": view_power}  # None without a multi-label group
    if sample_queries is not None:
        settings.update({"sample_queries": min(sample_queries, len(rows)), "seed": seed,
                         "interval": "95% percentile bootstrap over the sampled queries"})
    report = {"settings": settings, **report}
    if probs:
        report["classification"] = classify(probs, items, catalog, emb.attrs.get(HEAD_LABELS))
    return report


# --------------------------------------------------------------------------- writing


def why_uninformative(entry: dict) -> str:
    """Why a group marked uninformative scores the same for every ranking (its mAP 100: one label
    shared by every evaluated item; 0: no label shared by two), worded once for the log and the table."""
    return "one label shared by all" if entry.get("map_paper") else "no label shared by two"

def write_report(report: dict, out_dir: str | Path) -> Path:
    """Write report.json, table.md and chart.png into ``out_dir``; return the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # every file written to its temporary first, then the three renamed in a row, report.json last (the
    # blocks end in reverse order): a new report beside the chart of the one before lasted as long as the
    # chart took to draw, and stayed when the run was killed then
    with atomic_write(out_dir / REPORT_FILE) as report_file, atomic_write(out_dir / "table.md") as table, \
            atomic_write(out_dir / "chart.png", "wb") as chart:
        report_file.write(json.dumps(report, indent=2) + "\n")
        table.write(format_table(report) + "\n")
        draw_chart(report, chart)
    return out_dir


def _pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal, or a dash when undefined."""
    return "–" if value is None else f"{100 * value:.1f}"


def _pair(entry: dict | None) -> str:
    """``paper / standard`` cell of a mAP entry, each with its 95% interval when sampled."""
    if not entry:
        return "–"
    return " / ".join(_pct(entry.get(key)) + _interval((entry.get("ci95") or {}).get(key))
                      for key in ("map_paper", "map_standard"))


def _interval(bounds: list[float] | None) -> str:
    """`` [low–high]`` in percent, or nothing."""
    return f" [{_pct(bounds[0])}–{_pct(bounds[1])}]" if bounds else ""


def format_table(report: dict) -> str:
    """Markdown table of one report: per-group mAP@k (paper / standard), group view, mean."""
    settings, groups = report["settings"], report["groups"]
    k, has_view = settings["k"], "group" in report.get("views", {})
    title = settings.get("title") or Path(settings["embeddings"]).stem
    sampled = f", {settings['sample_queries']} sampled queries, 95% intervals" if settings.get("sample_queries") else ""
    lines = [f"### {title}: mAP@{k} on split {settings['split']} ({settings['n_items']} items{sampled})", "",
             f"| group | queries | mAP@{k} paper / standard (%)" + (" | group view (%)" if has_view else "") + " |",
             "|---|---:|---:" + ("|---:" if has_view else "") + "|"]
    for g, entry in groups.items():
        view = f" | {_pair(entry.get('group_view'))}" if has_view else ""
        name = f"{g} ({why_uninformative(entry)}: not in the mean)" if entry.get("uninformative") else g
        lines.append(f"| {name} | {entry['queries']} | {_pair(entry)}{view} |")
    views = report.get("views", {})
    view = f" | {_pair(views.get('group'))}" if has_view else ""
    lines.append(f"| **mean** | | {_pair(views.get('shared', report['mean']))}{view} |")
    if report.get("classification"):
        lines += ["", "| group | accuracy (%) | macro-F1 (%) |", "|---|---:|---:|"]
        lines += [f"| {g} | {_pct(c.get('accuracy'))} | {_pct(c.get('macro_f1'))} |"
                  for g, c in report["classification"].items()]
    return "\n".join(lines)


def draw_chart(report: dict, path: Path) -> None:
    """Grouped bar chart of per-group mAP@k (paper variant), shared vs group view, as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(report["groups"])
    views = {"shared view": [report["groups"][g]["map_paper"] for g in groups]}
    if "group" in report.get("views", {}):
        views["group view"] = [report["groups"][g].get("group_view", {}).get("map_paper") for g in groups]
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) + 2), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(views)
    for i, (name, values) in enumerate(views.items()):
        heights = [100 * v if v is not None else 0.0 for v in values]
        ax.bar(np.arange(len(groups)) + (i - (len(views) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20)
    ax.set_ylabel(f"mAP@{report['settings']['k']} (paper, %)")
    ax.set_ylim(0, 105)
    ax.set_title(report["settings"].get("title") or Path(report["settings"]["embeddings"]).stem)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


# --------------------------------------------------------------------------- comparing runs

def load_report(report_dir: str | Path) -> dict:
    """The report.json of a report directory."""
    path = Path(report_dir) / REPORT_FILE
    if not path.is_file():
        raise EvaluationError(f"{path} not found; --compare takes directories written by 'retrieval evaluate'")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvaluationError(f"{path} is not a report ({err}); write it again with 'retrieval evaluate'") from None
    missing = [key for key in ("settings", "groups", "mean")
               if not isinstance(report, dict) or not isinstance(report.get(key), dict)]
    if missing:
        raise EvaluationError(f"{path} is not a report of 'retrieval evaluate' (no {', '.join(missing)})")
    wrong = report_problem(report)
    if wrong:  # a hand-edited one: --compare's AttributeError, "error: k"
        raise EvaluationError(f"{path}: {wrong}; write it again with 'retrieval evaluate'")
    return report


def report_problem(report: dict) -> str | None:
    """What in a report.json the tables cannot read (a field of the wrong type), or None."""
    k = report["settings"].get("k")
    if not isinstance(k, int) or isinstance(k, bool):
        return f"settings.k is {k!r}, not a whole number"
    views = report.get("views", {})
    if not isinstance(views, dict) or not all(isinstance(v, dict) for v in views.values()):
        return "views is not an object of objects"
    entries = {f"groups.{g}": e for g, e in report["groups"].items()}
    entries.update({"mean": report["mean"], **{f"views.{v}": e for v, e in views.items()}})
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            return f"{name} is {entry!r}, not an object"
        for sub, part in [(name, entry), *((f"{name}.group_view", entry[key]) for key in ("group_view",)
                                            if key in entry)]:
            if not isinstance(part, dict):
                return f"{sub} is {part!r}, not an object"
            for key in ("map_paper", "map_standard"):
                value = part.get(key)
                if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                    return f"{sub}.{key} is {value!r}, not a number"
    return None


RANKING_SETTINGS = {"shared_view": "what the shared view ranks by",
                    "multi_label_view_power": "the multi-label group views' rule (p·q / (|p| |q|)^power; "
                                              "reports before 2026-11-29 do not record it: 1.0, the cosine, then)"}


UNRECORDED = {"multi_label_view_power": {"None", "1.0"}}  # what a report without the setting had


def compare_reports(dirs: list[str | Path]) -> str:
    """Markdown table, a row per group and a column per run: mAP@k paper / standard in %."""
    reports = {Path(d).resolve().name: load_report(d) for d in dirs}
    if len(reports) != len(dirs):
        reports = {str(d): load_report(d) for d in dirs}
    columns = []
    for name, report in reports.items():
        columns.append((name, report, None))
        if "group" in report.get("views", {}):
            columns.append((f"{name} (group view)", report, "group_view"))
    groups = list(dict.fromkeys(g for r in reports.values() for g in r["groups"]))
    ks = sorted({r["settings"]["k"] for r in reports.values()})
    lines = [f"mAP@{'/'.join(map(str, ks))}, paper / standard (%)", "",
             "| group | " + " | ".join(name for name, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for g in groups:
        cells = [_pair(_view(r["groups"].get(g), view)) for _, r, view in columns]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(_pair(_view(r["mean"], view)) for _, r, view in columns) + " |")
    for key, what in RANKING_SETTINGS.items():  # the same files ranked by another rule score otherwise
        told = {name: r["settings"].get(key, "not recorded") for name, r in reports.items()}
        recorded = {str(v) for v in told.values() if v != "not recorded"}
        if "not recorded" in told.values() and key in UNRECORDED:
            # a report from before the record agrees with any rule it could have had (the power: none, or 1.0)
            differ = len(recorded) > 1 or bool(recorded - UNRECORDED[key])
        else:
            differ = len(set(map(str, told.values()))) > 1
        if differ:
            lines += ["", f"The runs differ in {what} ({key}): " + "; ".join(f"{n}: {v}" for n, v in told.items()) + "."]
    averaged = {name: r.get("views", {}).get("shared", {}).get("groups") for name, r in reports.items()}
    if len({tuple(g) for g in averaged.values() if g is not None}) > 1:  # the means do not compare
        lines += ["", "The means are over different groups: " + "; ".join(
            f"{name}: {', '.join(g)}" for name, g in averaged.items() if g is not None) + "."]
    return "\n".join(lines)


def _view(entry: dict | None, view: str | None) -> dict | None:
    """The shared entry itself, or its group-view sub-entry."""
    return entry if entry is None or view is None else entry.get(view)


# --------------------------------------------------------------------------- command line
