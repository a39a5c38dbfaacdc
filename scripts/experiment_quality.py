"""Retrieval quality, one row per embedding design (issue 6): what each change buys, with times.

Rows: ImageNet pooled features (last stage; every stage; with the colour histogram); the old
default step by step to the new one (colour histogram, dropout 0.3, unit-length head weights, a
hidden layer, the soft second logit scale, flip-averaged inference); ablations of the default; and
the default with foreground pooling, the last trunk unit fine-tuned from cached activations, and
288 px input. Each row reports the shared embedding and the group-focused view (each group ranked
by its own head), mean over groups and one focus group.

    python scripts/experiment_quality.py --catalog ../shared/datasets/fashion-product-images --work /tmp/quality
"""
from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.atomic import write_text
from retrieval.cli import configure_logging
from retrieval.evaluate.report import compare_reports
from retrieval.experiments import Experiment, format_rows, run_experiment

# the defaults before issue 6's second round, spelled out (the CLI defaults have moved on)
OLD = ["--colour-bins", "none", "--dropout", "0.1", "--no-normalized-heads", "--embed-hidden", "0",
       "--metric-scale", "0", "--no-flip-average", "--image-size", "224"]
AT_224 = ["--image-size", "224"]


def _set(args: list[str], option: str, value: str | None = None) -> list[str]:
    """``args`` with ``option`` (a flag when ``value`` is None) set, replacing an earlier setting."""
    out, tokens = [], iter(args)
    for a in tokens:
        if a == option and value is not None:
            next(tokens)  # its old value
        elif a not in (option, "--no-" + option[2:]):
            out.append(a)
    return out + [option] + ([value] if value is not None else [])


def experiments(epochs: int, blocks: list[int]) -> list[tuple[Experiment, str]]:
    """(experiment, trunk cache name) pairs in display order; rows sharing a cache name share the
    frozen trunk pass (the "frozen" cache, at 224 px, holds the colour histogram, so it serves every
    frozen 224 px row)."""
    e = ["--epochs", str(epochs)]
    steps, args = [], [*e, *OLD]
    for name, option, value in [("+ colour histogram", "--colour-bins", "4,6,6"), ("+ dropout 0.3", "--dropout", "0.3"),
                                ("+ unit-length head weights", "--normalized-heads", None),
                                ("+ hidden layer 1024", "--embed-hidden", "1024"),
                                ("+ soft second scale 6", "--metric-scale", "6"),
                                ("+ flip-averaged inference", "--flip-average", None),
                                ("+ 288 px input (the default)", "--image-size", "288")]:
        args = _set(args, option, value)
        steps.append((Experiment(name, list(args)), "288" if value == "288" else "frozen"))
    rows = [
        (Experiment("imagenet-last-avg", None, embed=["--taps", "last", "--gem-p", "1"]), ""),
        (Experiment("imagenet-all-gem", None, embed=["--taps", "all", "--gem-p", "3"]), "frozen"),
        (Experiment("imagenet-all-gem + colour histogram", None,
                    embed=["--taps", "all", "--gem-p", "3", "--colour-bins", "4,6,6"]), "frozen"),
        (Experiment("old: frozen-last-gem", [*e, *OLD, "--taps", "last"]), "frozen"),
        (Experiment("old default: frozen-all-gem", [*e, *OLD]), "frozen"),
        *steps,
        (Experiment("default at 224 px without colour histogram", [*e, *AT_224, "--colour-bins", "none"]), "frozen"),
        (Experiment("default at 224 px without soft second scale", [*e, *AT_224, "--metric-scale", "0"]), "frozen"),
        (Experiment("default at 224 px, foreground pooling", [*e, *AT_224, "--pool-weighting", "foreground"]),
         "frozen-fg"),
    ]
    for n in blocks:
        rows.append((Experiment(f"default, last {n} unit(s) fine-tuned", [*e, "--trainable-blocks", str(n)]),
                     f"blocks{n}"))
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--epochs", type=int, default=30, help="as the CLI default")
    p.add_argument("--blocks", type=int, nargs="*", default=[1], help="trainable-blocks rows (cached activations)")
    p.add_argument("--skip", nargs="*", default=[], help="leave out these rows")
    p.add_argument("--focus", default="baseColour", help="group shown in its own columns")
    p.add_argument("--only", nargs="*", help="run only these rows")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    configure_logging()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [(exp, cache) for exp, cache in experiments(args.epochs, args.blocks)
            if (not args.only or exp.name in args.only) and exp.name not in args.skip]
    # a cache is built by the first training that uses it: run trained rows with the colour
    # histogram first (their cache serves every row), pretrained rows last (they embed from it)
    done = {}
    for exp, cache in sorted(rows, key=lambda row: (row[0].train is None, "none" in (row[0].train or []))):
        run_experiment(exp, args.catalog, work, work / f"trunk-{cache}.h5" if cache else None)
        done[exp.name] = exp
    ordered = [exp for exp, _ in rows]
    text = "\n\n".join([format_rows(ordered, args.focus), compare_reports([work / f"{e.name}-report" for e in ordered])])
    write_text(work / "quality.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
