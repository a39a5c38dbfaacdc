"""``retrieval cache``: pre-decode resized catalog images into HDF5 (resumable)."""
from __future__ import annotations

import argparse

from retrieval.commands.argtypes import image_size
from retrieval.data.catalog import read_catalog
from retrieval.data.imagecache import build_image_cache


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval cache", description=(
        "Decode every catalog image once, letterbox it to SIZE and store it as uint8 in HDF5; "
        "'retrieval train --image-cache' then reads it instead of JPEGs. Interrupted runs resume."))
    p.add_argument("--catalog", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="IMAGES.h5")
    p.add_argument("--image-size", type=image_size, default=288, help="must equal the training --image-size")
    p.add_argument("--workers", type=int)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    catalog = read_catalog(args.catalog)
    bad = build_image_cache(catalog, args.out, args.image_size, args.workers)
    print(f"Wrote {args.out}: {len(catalog) - bad} images at {args.image_size}px ({bad} unreadable)")
    return 0
