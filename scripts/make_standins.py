"""Write stand-in catalogues (street, multicolour, multilabel, missing labels, noisy labels, many groups) drawn from a catalog of photos.

    python scripts/make_standins.py --source ../shared/datasets/fashion-product-images --out /tmp/standins
    python scripts/make_standins.py --source /tmp/standins/street --kinds noisy --out /tmp/standins/street  # street/noisy
    python scripts/make_standins.py --source /tmp/standins/multilabel/street --kinds wide --out /tmp/standins/multilabel/street
"""
from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.cli import configure_logging
from retrieval.data.standins import KINDS, make_standin


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="catalog of product photos on white")
    p.add_argument("--out", required=True, help="parent folder: one stand-in catalog per kind beneath it")
    p.add_argument("--kinds", default="street,multicolour,missing",
                   help=f"comma-separated, of: {', '.join(KINDS)} (noisy: best made from a street stand-in; wide: from the street, multi-label one)")
    p.add_argument("--n-items", type=int, default=2000, help="images of the street, multicolour and multilabel stand-ins")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes drawing the images (same catalog for any number)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    configure_logging()
    for kind in args.kinds.split(","):
        labels = Path(args.out) / kind / "labels.csv"
        if labels.exists():
            print(f"{labels} exists: kept")
            continue
        print(f"Wrote {make_standin(args.source, labels.parent, kind, args.n_items, args.seed, args.workers)}")


if __name__ == "__main__":
    main()
