"""``retrieval evaluate``: mAP@k reports from an embeddings file, and run comparisons."""
from __future__ import annotations

import argparse
import logging
import urllib.parse
from pathlib import Path

from retrieval.atomic import atomic_write
from retrieval.data.catalog import CatalogError, read_catalog
from retrieval.devices import DEVICES
from retrieval.evaluate.classification import draw_class_chart
from retrieval.evaluate.metrics import CANDIDATES
from retrieval.data.embfile import SHARED_VIEW_READS
from retrieval.evaluate.report import (SPLITS, EvaluationError, compare_reports, evaluate_embeddings, format_table,
                                       write_report)

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of ``retrieval evaluate``."""
    parser = argparse.ArgumentParser(prog="retrieval evaluate", description=__doc__)
    run = parser.add_argument_group("evaluate embeddings")
    run.add_argument("--embeddings", type=Path, help="EMB.h5 written by 'retrieval embed'")
    run.add_argument("--catalog", type=Path, help="catalog directory (labels.csv + images)")
    run.add_argument("--split", default="test", choices=SPLITS, help="items to evaluate (default: test)")
    run.add_argument("--k", type=int, default=50, help="retrieval depth of mAP@k (default: 50)")
    run.add_argument("--out", type=Path, help="report directory (default: <embeddings stem>-report beside it)")
    run.add_argument("--title", help="title of the table and chart (default: the embeddings file name)")
    run.add_argument("--device", default="auto", choices=DEVICES, help="where to rank neighbours (default: auto)")
    run.add_argument("--sample-queries", type=int, metavar="N",
                     help="quick estimate: N random queries ranked against every candidate, each mAP with its "
                          "95%% bootstrap interval (default: every item is a query)")
    run.add_argument("--seed", type=int, default=0, help="seed of --sample-queries (default: 0)")
    run.add_argument("--candidates", default="labelled", choices=CANDIDATES,
                     help="a group's candidates: 'labelled' = the other items labelled in it, as its queries are "
                          "(an unlabelled item is unknown there); 'all' = every other item, the unlabelled "
                          "counted as misses (default: labelled)")
    run.add_argument("--shared-view", default="file", choices=SHARED_VIEW_READS,
                     help="what the shared view ranks by: 'file' = the file's vectors (the shared embedding "
                          "followed by the group probabilities, or the embedding alone, as the model was "
                          "trained); 'embedding' = the shared embedding alone (default: file)")
    run.add_argument("--fuse", type=Path, metavar="EMB_B.h5",
                     help="score fusion: average the head probabilities of a second model's embeddings")
    run.add_argument("--class-chart", metavar="GROUP",
                     help="also draw per-class accuracy of GROUP (class_GROUP.png) to see rare classes")
    compare = parser.add_argument_group("compare reports")
    compare.add_argument("--compare", nargs="+", metavar="REPORT_DIR",
                         help="print one table comparing report directories instead of evaluating")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``retrieval evaluate``."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.compare:
            print(compare_reports(args.compare))
            return 0
        if args.embeddings is None or args.catalog is None:
            parser.error("--embeddings and --catalog are required (or use --compare REPORT_DIR ...)")
        if args.k < 1:
            parser.error(f"--k must be at least 1, got {args.k}")
        if args.sample_queries is not None and args.sample_queries < 1:
            parser.error(f"--sample-queries must be at least 1, got {args.sample_queries}")
        catalog = read_catalog(args.catalog, check_files=False)
        if args.class_chart and args.class_chart not in catalog.groups:  # before the evaluation, not after it
            raise EvaluationError(f"--class-chart {args.class_chart!r}: no such group; choose one of: "
                                  f"{', '.join(catalog.groups)}")
        report = evaluate_embeddings(args.embeddings, catalog,
                                     args.split, args.k, device=args.device, fuse=args.fuse,
                                     sample_queries=args.sample_queries, seed=args.seed,
                                     candidates=args.candidates, shared_view=args.shared_view)
        report["settings"]["title"] = args.title or args.embeddings.stem
        out = write_report(report, args.out or args.embeddings.with_name(f"{args.embeddings.stem}-report"))
        if args.class_chart:
            classes = report.get("classification", {})
            if args.class_chart not in classes:
                raise EvaluationError(f"--class-chart {args.class_chart!r}: no classification for it; "
                                      f"choose one of: {', '.join(classes) or '(no head probabilities)'}")
            with atomic_write(out / f"class_{urllib.parse.quote(args.class_chart, safe='')}.png", "wb") as f:
                draw_class_chart(classes[args.class_chart], args.class_chart, f)  # as chart.png: whole or not at all
    except (EvaluationError, CatalogError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(format_table(report))
    logger.info("wrote %s", out)
    return 0
