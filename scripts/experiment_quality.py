"""Retrieval quality, one row per embedding design (issue 6): what each change buys, with times.

Rows: ImageNet pooled features; frozen trunk + trained embedding (last stage only); pooled
features of every stage (standardised); the default multi-scale GeM model; the same with the last
trunk units fine-tuned from cached activations. Each row reports the shared embedding and the
group-focused view (each group ranked by its own head), mean over groups and one focus group.

    python scripts/experiment_quality.py --catalog ../shared/datasets/fashion-product-images --work /tmp/quality
"""
from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.cli import configure_logging
from retrieval.evaluation import compare_reports
from retrieval.experiments import Experiment, format_rows, run_experiment


def experiments(epochs: int, blocks: list[int]) -> list[tuple[Experiment, str]]:
    """(experiment, trunk cache name) pairs; runs sharing a cache name share the frozen trunk pass."""
    e = ["--epochs", str(epochs)]
    rows = [
        (Experiment("imagenet-last-avg", None, embed=["--taps", "last", "--gem-p", "1"]), ""),
        (Experiment("imagenet-all-gem", None, embed=["--taps", "all", "--gem-p", "3"]), "frozen"),
        (Experiment("frozen-last-gem", ["--taps", "last", *e]), "frozen"),
        (Experiment("frozen-all-gem (default)", ["--taps", "all", *e]), "frozen"),
        (Experiment("frozen-all-gem-512d", ["--taps", "all", "--embed-dim", "512", *e]), "frozen"),
        (Experiment("frozen-all-gem-foreground", ["--pool-weighting", "foreground", *e]), "frozen-fg"),
    ]
    for n in blocks:
        rows.append((Experiment(f"finetune-last-{n}", ["--trainable-blocks", str(n), *e]), f"blocks{n}"))
        rows.append((Experiment(f"finetune-last-{n}-foreground",
                                ["--trainable-blocks", str(n), "--pool-weighting", "foreground", *e]), f"blocks{n}-fg"))
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--blocks", type=int, nargs="*", default=[1], help="trainable-blocks rows (cached activations)")
    p.add_argument("--focus", default="baseColour", help="group shown in its own columns")
    p.add_argument("--only", nargs="*", help="run only these rows")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    configure_logging()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    done = []
    for exp, cache in experiments(args.epochs, args.blocks):
        if args.only and exp.name not in args.only:
            continue
        exp.name = exp.name.replace(" (default)", "")
        run_experiment(exp, args.catalog, work, work / f"trunk-{cache}.h5" if cache else None)
        done.append(exp)
    text = "\n\n".join([format_rows(done, args.focus), compare_reports([work / f"{e.name}-report" for e in done])])
    (work / "quality.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
