"""Imbalanced labels on one group: baseline, over-/under-sampling, fusion, Range loss, multi-task.

After the women's-dress-attributes study: every model is trained on the chosen group (the
multi-task row adds a related group), embedded and evaluated; the fusion row averages the class
scores of the baseline and the over-sampled model. Prints accuracy, macro-F1 and mAP@50 per method
and writes a per-class accuracy chart for each.

    python scripts/experiment_imbalance.py --catalog ../shared/datasets/fashion-product-images \
        --group articleType --related subCategory --work /tmp/imbalance
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from retrieval.atomic import write_text
from retrieval.cli import configure_logging
from retrieval.cli import main as cli
from retrieval.experiments import Experiment, run_experiment


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--group", required=True, help="the imbalanced group studied")
    p.add_argument("--related", required=True, help="the related group added in the multi-task row")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--range-weight", type=float, default=0.1)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more 'retrieval train' options")
    return p


def plan(args) -> list[Experiment]:
    """The compared methods (the fusion row reuses the baseline and over-sampled models)."""
    g = args.group
    base = ["--groups", g, "--method", "multi-task", "--epochs", str(args.epochs), *args.extra]
    chart = ["--class-chart", g]
    return [
        Experiment("baseline", base, evaluate=chart),
        Experiment("over-sampling", [*base, "--sampling", "over", "--sampling-group", g], evaluate=chart),
        Experiment("under-sampling", [*base, "--sampling", "under", "--sampling-group", g], evaluate=chart),
        Experiment("range-loss", [*base, "--range-loss", str(args.range_weight), "--range-group", g], evaluate=chart),
        Experiment("multi-task", [*base[:1], f"{g},{args.related}", *base[2:]], evaluate=chart),
    ]


def row(name: str, report: dict, group: str, seconds: float) -> str:
    c = report["classification"][group]
    m = report["groups"][group]
    view = m.get("group_view") or {}
    rare = sum(1 for v in c["classes"].values() if v["support"] and v["recall"] > 0)
    present = sum(1 for v in c["classes"].values() if v["support"])
    return (f"| {name} | {100 * c['accuracy']:.1f} | {100 * c['macro_f1']:.1f} | {rare}/{present} | "
            f"{100 * m['map_paper']:.1f} / {100 * m['map_standard']:.1f} | "
            f"{100 * view.get('map_paper', 0):.1f} / {100 * view.get('map_standard', 0):.1f} | {seconds:.0f} |")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    configure_logging()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "trunk-cache.h5"
    began = time.perf_counter()
    lines = [f"### {args.group}: test split", "",
             "| method | accuracy (%) | macro-F1 (%) | classes recognised | mAP@50 shared | mAP@50 group view | s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for exp in plan(args):
        run_experiment(exp, args.catalog, work, cache)
        lines.append(row(exp.name, exp.report, args.group, sum(exp.seconds.values())))
    run_fusion(args, work, lines)
    lines.append(f"\nTotal {time.perf_counter() - began:.0f} s. Per-class charts: {work}/*-report/class_{args.group}.png")
    text = "\n".join(lines)
    write_text(work / "imbalance.md", text + "\n")
    print(text)


def run_fusion(args, work: Path, lines: list[str]) -> None:
    """Evaluate the baseline fused with the over-sampled model (score fusion)."""
    out = work / "fusion-report"
    began = time.perf_counter()
    code = cli(["evaluate", "--embeddings", str(work / "baseline.h5"), "--catalog", args.catalog, "--out", str(out),
                "--title", "baseline + over-sampling", "--fuse", str(work / "over-sampling.h5"),
                "--class-chart", args.group])
    if code:
        raise RuntimeError(f"fused evaluation failed with exit code {code}")
    report = json.loads((out / "report.json").read_text())
    lines.append(row("baseline + over-sampling (fusion)", report, args.group, time.perf_counter() - began))


if __name__ == "__main__":
    main()
