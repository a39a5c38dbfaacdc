"""Li et al. 2017's Table II protocol on a catalog: multi-weight, multi-task and multi-label under the
li2017 recipe and under our defaults, with complete and paper-like incomplete labels, several seeds.

Every run trains from one shared trunk cache; results go to WORK/results.json (written atomically,
finished runs skipped on a rerun) and the tables (mean ± sd over seeds, mAP@50 of the shared
embedding, paper normalisation) to WORK/table2.md.

    python scripts/experiment_table2.py --catalog ../shared/datasets/fashion-product-images --work /tmp/table2 \\
        --trunk-cache RUN/trunk-cache.h5 --seeds 0 1 2 --epochs 10 --fc-width 1024
"""
from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.atomic import write_text
from retrieval.cli import configure_logging
from retrieval.recipes.table2 import RECIPE_SETTINGS, format_tables, protocol_runs, run_protocol


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", required=True)
    p.add_argument("--work", required=True, help="folder for runs, reports, results.json and table2.md")
    p.add_argument("--trunk-cache", help="shared trunk cache (default WORK/trunk-cache.h5, built by the first run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30, help="epochs of every run")
    p.add_argument("--recipes", nargs="+", default=list(RECIPE_SETTINGS), choices=RECIPE_SETTINGS)
    p.add_argument("--labels", nargs="+", default=["complete", "paper"], choices=("complete", "paper"),
                   help="complete labels and/or --label-dropout paper")
    p.add_argument("--li2017-backbone", default="efficientnet_lite0",
                   help="trunk under the li2017 recipe (alexnet has no ImageNet weights here)")
    p.add_argument("--image-size", type=int, default=288, help="li2017's input size (the trunk cache's)")
    p.add_argument("--gem-p", type=float, default=3.0, help="li2017's pooling exponent (the trunk cache's)")
    p.add_argument("--fc-width", type=int, default=4096, help="li2017's fc6/fc7 width")
    p.add_argument("--keep-files", action="store_true", help="keep each run's embeddings and last.pt")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    configure_logging()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    li2017 = ["--backbone", args.li2017_backbone, "--image-size", str(args.image_size), "--gem-p", str(args.gem_p),
              "--embed-hidden", str(args.fc_width), "--embed-dim", str(args.fc_width),
              "--lr-steps", str(max(1, round(args.epochs * 2 / 3)))]  # the recipe's drop at 2/3 of the epochs
    runs = protocol_runs(args.seeds, args.recipes, [None if x == "complete" else x for x in args.labels])
    cache = Path(args.trunk_cache) if args.trunk_cache else work / "trunk-cache.h5"
    results = run_protocol(runs, args.catalog, work, args.epochs, {"li2017": li2017}, cache, args.keep_files)
    text = format_tables({r.name: results[r.name] for r in runs if r.name in results})
    write_text(work / "table2.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
