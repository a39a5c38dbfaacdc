"""Post hoc (issue 16): a multi-label group's group view ranked by p·q / (|p| |q|)^power, on a trained
model's embeddings file, for several powers (1 = the cosine, the rule before; 0.5 = today's,
``embfile.MULTI_LABEL_VIEW_POWER``; 0 = the expected number of shared labels).

Only the multi-label groups' vectors change; the file's probabilities are re-ranked on the test split and
the group view's mean mAP@50 (paper) printed with each multi-label group's own. The README's table
under "The multi-label group view" came from this.

    python scripts/posthoc_multilabel_view.py --embeddings /tmp/transfer/multicolour/default.h5 --catalog /tmp/standins/multicolour
"""
from __future__ import annotations

import argparse
import logging

import numpy as np

from retrieval.data.catalog import read_catalog
from retrieval.data.embfile import group_vectors, read_paths, read_probabilities, read_rows
from retrieval.evaluate.metrics import evaluate_retrieval
from retrieval.evaluate.report import match_rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", required=True, help="a trained model's EMB.h5 (with probs/)")
    p.add_argument("--catalog", required=True)
    p.add_argument("--powers", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.0])
    p.add_argument("--split", default="test")
    return p


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    logging.disable(logging.WARNING)  # the evaluation's per-group notices, once per power
    try:
        report_powers(args)
    finally:
        logging.disable(logging.NOTSET)


def report_powers(args) -> None:
    catalog = read_catalog(args.catalog, check_files=False)
    rows, items = match_rows(read_paths(args.embeddings), catalog, args.split)
    emb, probs = read_rows(args.embeddings, rows), read_probabilities(args.embeddings, rows)
    sigmoid = sorted(set(emb.sigmoid_groups if emb.sigmoid_groups is not None else catalog.multi_label_groups()))
    if not sigmoid:
        raise SystemExit(f"{args.embeddings}: no multi-label group")
    labels = {g: [it.labels[g] for it in items] for g in catalog.groups}
    print(f"{args.embeddings}: group view mAP@50 (paper), {args.split} split; multi-label groups {', '.join(sigmoid)}")
    for power in args.powers:
        views = {g: v for g, v in group_vectors(probs, sigmoid, power=power).items() if g in labels}
        report = evaluate_retrieval(emb.vectors, labels, k=50, vectors_by_group=views, normalise=False)
        own = ", ".join(f"{g} {100 * report['groups'][g]['group_view']['map_paper']:.1f}" for g in sigmoid)
        print(f"power {power:g}: group view {100 * report['views']['group']['map_paper']:.1f} ({own})")


if __name__ == "__main__":
    main()
