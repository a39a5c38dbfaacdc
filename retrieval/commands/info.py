"""``retrieval catalog-info DIR``: validate a catalog and summarise its groups."""
from __future__ import annotations

import argparse

from retrieval.data.catalog import read_catalog
from retrieval.data.summary import format_summary, unreadable_images


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrieval catalog-info",
                                     description="Check DIR/labels.csv and its images; print a per-group summary "
                                                 "(classes, labelled share, largest/smallest class).")
    parser.add_argument("catalog", metavar="DIR", help="catalog directory holding labels.csv")
    parser.add_argument("--verify-images", action="store_true",
                        help="also decode every image (on a thread pool) and list the unreadable ones; "
                             "exit status 1 when there are any")
    parser.add_argument("--workers", type=int, help="threads of --verify-images (default: 2 per CPU, at most 16)")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    catalog = read_catalog(args.catalog)
    print(format_summary(catalog))
    if args.verify_images:
        bad = unreadable_images(catalog, args.workers, progress=True)
        print(f"{len(bad)} unreadable images" + "".join(f"\n  {b}" for b in bad))
        if bad:  # a check that fails (a script or CI), though training and embedding skip them
            return 1
    return 0
