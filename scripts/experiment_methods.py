"""Compare multi-weight, multi-task, multi-label and the ImageNet-only baseline on one catalog.

Trains each method on one shared trunk cache, embeds, evaluates (mAP@50 per group, both views,
classification of the heads) and prints the comparison tables with times. Reruns reuse finished runs.

    python scripts/experiment_methods.py --catalog ../shared/datasets/fashion-product-images --work /tmp/methods
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrieval.atomic import write_text
from retrieval.cli import configure_logging
from retrieval.evaluate.report import compare_reports
from retrieval.experiments import Experiment, format_rows, run_experiment
from retrieval.train.loop import selection_score

METHODS = ("multi-weight", "multi-task", "multi-label")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", required=True)
    p.add_argument("--work", required=True, help="folder for runs, embeddings and reports")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--label-dropout", help="e.g. 'paper': train every method with incomplete labels")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more 'retrieval train' options")
    return p


def validation_table(work: Path, names: list[str]) -> str:
    """Per-group validation loss / accuracy at the epoch best.pt holds (highest validation mAP)."""
    lines = ["| run | group | val loss | val accuracy (%) |", "|---|---|---:|---:|"]
    for name in names:
        history = json.loads((work / name / "metrics.json").read_text())
        best = max(history, key=selection_score)
        for g, loss in best["val_group_loss"].items():
            acc = best["val_accuracy"][g]
            lines.append(f"| {name} (epoch {best['epoch']}) | {g} | {loss:.3f} | "
                         f"{'–' if acc is None else f'{100 * acc:.1f}'} |")
    return "\n".join(lines)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    configure_logging()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--epochs", str(args.epochs), *args.extra]
    if args.label_dropout:
        common += ["--label-dropout", args.label_dropout]
    experiments = [Experiment("imagenet", None)]
    experiments += [Experiment(m, ["--method", m, *common]) for m in METHODS]
    cache = work / "trunk-cache.h5"
    for exp in experiments:
        run_experiment(exp, args.catalog, work, cache if exp.train is not None else None)
    tables = [compare_reports([work / f"{e.name}-report" for e in experiments]),
              format_rows(experiments), validation_table(work, list(METHODS))]
    text = "\n\n".join(tables)
    write_text(work / "comparison.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
