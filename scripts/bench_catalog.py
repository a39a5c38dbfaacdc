"""Benchmark reading labels.csv: the row-by-row reader against the column reader (pyarrow), and
the whole `catalog-info` summary, on synthetic catalogues shaped like e-Clothing1.4M.

Each catalogue has 24 attribute groups (~830 labels; two multi-label groups, 0-60% empty cells
per group) and a title; with ``--files`` an empty image file is written for every row (in 1,000
folders) so that the existence check (one stat per image) is timed too. Each measurement runs in
its own process so that its peak RSS is its own; CPU s (user + system, all threads) moves
less than wall time on a shared machine.

Usage: python scripts/bench_catalog.py --sizes 30000 300000 [--files] [--dir /tmp/bench-catalog]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from retrieval.atomic import write_text

CLASSES = np.round(np.geomspace(2, 145, 24)).astype(int)
MULTI_LABEL = {5, 17}
MODES = ("rows", "columns", "catalog-info")


def write_catalog(root: Path, n: int, files: bool, seed: int = 0) -> None:
    """labels.csv of n rows under root (and empty image files when ``files``)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images = [f"img/{i % 1000:03d}/{i:07d}.jpg" for i in range(n)]
    columns = [images, np.where(rng.random(n) < 0.27, "test", "train"), [f"Product {i}" for i in range(n)]]
    for g, classes in enumerate(CLASSES):
        names = np.array([f"g{g:02d}-{c}" for c in range(classes)])
        cells = names[rng.integers(0, classes, n)].astype(object)
        if g in MULTI_LABEL:
            both = rng.random(n) < 0.3
            cells[both] = cells[both] + "|" + names[rng.integers(0, classes, both.sum())]
        cells[rng.random(n) < rng.uniform(0.0, 0.6)] = ""
        columns.append(cells)
    header = ",".join(["image", "split", "title", *(f"g{g:02d}" for g in range(len(CLASSES)))])
    lines = (",".join(map(str, row)) for row in zip(*columns))
    if files:
        for folder in range(min(n, 1000)):
            (root / "img" / f"{folder:03d}").mkdir(parents=True, exist_ok=True)
        for image in images:
            (root / image).touch()
    # last and whole: a stopped run left labels.csv before its images, and the next reused it
    write_text(root / "labels.csv", header + "\n" + "\n".join(lines) + "\n")


def run_one(root: Path, mode: str, check_files: bool) -> dict:
    """Seconds and peak RSS of one way of reading the catalogue."""
    from retrieval.data.catalog import LABELS_FILE, Catalog, _read_rows, read_catalog
    from retrieval.data.summary import format_summary

    start, cpu = time.perf_counter(), time.process_time()
    if mode == "rows":  # the reader before the column path: row by row, then the vocabularies
        groups, items = _read_rows(root / LABELS_FILE, root, check_files)
        Catalog(root, groups, items)
    elif mode == "columns":
        read_catalog(root, check_files)
    else:
        format_summary(read_catalog(root, check_files))
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[30_000, 300_000])
    parser.add_argument("--files", action="store_true", help="write the image files and check they exist")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-catalog"), help="where catalogues are written")
    parser.add_argument("--one", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table: N, reader, seconds, peak RSS."""
    args = get_args_parser().parse_args(argv)
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), args.one[1], args.files)))
        return 0
    print(f"{len(CLASSES)} groups, {CLASSES.sum()} labels; image files checked: {'yes' if args.files else 'no'}\n")
    print("| N | labels.csv MB | reader | wall s | CPU s | peak RSS GB |\n|---:|---:|---|---:|---:|---:|")
    for n in args.sizes:
        root = args.dir / f"{n}{'-files' if args.files else ''}"
        if not (root / "labels.csv").exists():
            write_catalog(root, n, args.files)
        size = (root / "labels.csv").stat().st_size / 2**20
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "--one", str(root), mode, *(["--files"] if args.files else [])],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {n:,} | {size:.0f} | {mode} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['peak_gb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
