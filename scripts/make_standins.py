"""Write stand-in catalogues (street, multicolour, multilabel, missing labels, noisy labels, many groups, phone snapshots) drawn from a catalog of photos.

    python scripts/make_standins.py --source ../shared/datasets/fashion-product-images --out /tmp/standins
    python scripts/make_standins.py --source /tmp/standins/street --kinds noisy --out /tmp/standins/street  # street/noisy
    python scripts/make_standins.py --source /tmp/standins/multilabel/street --kinds wide --out /tmp/standins/multilabel/street
"""
from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.cli import configure_logging
from retrieval.commands.argtypes import at_least
from retrieval.data.standins import KINDS, make_standin


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="catalog of product photos on white")
    p.add_argument("--out", required=True, help="parent folder: one stand-in catalog per kind beneath it")
    p.add_argument("--kinds", default="street,multicolour,missing",
                   help=f"comma-separated, of: {', '.join(KINDS)} (noisy: best made from a street stand-in; wide: from the street, multi-label one)")
    p.add_argument("--n-items", type=at_least(10), default=2000,
                   help="images of the street, snapshot, multicolour and multilabel stand-ins (at most the source's: more is capped, with a warning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes drawing the images (same catalog for any number)")
    return p


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        parser.error(f"--kinds {args.kinds!r}: choose among {', '.join(KINDS)}")
    configure_logging()
    for kind in kinds:
        labels = Path(args.out) / kind / "labels.csv"
        if labels.exists():  # a stand-in is drawn once: another --n-items or --seed needs another --out
            print(f"{labels} exists: kept (drawn before; delete it or choose another --out to draw it anew)")
            continue
        try:
            print(f"Wrote {make_standin(args.source, labels.parent, kind, args.n_items, args.seed, args.workers)}")
        except ValueError as err:  # CatalogError too: the source, a group it lacks, too few items
            raise SystemExit(f"make_standins.py: error: {err}") from None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; a stand-in's labels.csv is written last
        raise SystemExit("make_standins.py: interrupted; run it again to draw the unfinished stand-ins") from None
