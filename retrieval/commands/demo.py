"""``retrieval demo-catalog``: write the built-in demo catalog of drawn garments."""
from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.commands.argtypes import at_least, image_size
from retrieval.data.demo import DEMO_GROUPS, make_demo_catalog


def get_args_parser():
    """Build the argument parser of `retrieval demo-catalog`."""
    parser = argparse.ArgumentParser(prog="retrieval demo-catalog", description=(
        "Generate a small catalog of drawn garments (labels.csv + images/) to try the pipeline "
        "without downloading data."))
    parser.add_argument("out", metavar="OUT", help="output directory (created if needed; one "
                        "that holds a catalog already, a labels.csv, is refused)")
    parser.add_argument("--n-items", type=at_least(10), default=480,
                        help="how many garments (default: 480; at least 10, enough to train and evaluate)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--image-size", type=image_size, default=128, help="side in pixels (default: 128; at least 32)")
    return parser


def main(argv=None):
    """Generate the demo catalog from command-line arguments and print a summary."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if (out / "labels.csv").exists():  # written over, its images would stay beside the new ones (a smaller one's)
        parser.error(f"{out} already holds a catalog (labels.csv); choose another folder or delete it")
    try:
        path = make_demo_catalog(args.out, n_items=args.n_items, seed=args.seed,
                                 image_size=args.image_size, progress=True)
    except ValueError as e:
        parser.error(str(e))
    print(f"Wrote {path}: {args.n_items} items, groups: {', '.join(DEMO_GROUPS)}")
    return 0
