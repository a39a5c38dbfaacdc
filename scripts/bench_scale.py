"""Every stage of the product at catalogue sizes N, through the real CLI: time, peak memory, growth.

    python scripts/bench_scale.py --sizes 30000,100000,300000,1000000 --out /tmp/scale
    python scripts/bench_scale.py --sizes 2000 --stages catalog-info,evaluate,floor --timeout 60

Per size, a synthetic catalogue in the catalogue format and its EMB.h5 (24 groups, 830 labels,
multi-label and missing cells, clustered vectors: see scripts/bench_scale_data.py) are generated
into OUT/N/ (kept and reused with --out; a temporary folder otherwise). Each stage runs as a child
process; its wall time, CPU time and peak memory (the child's own rusage, from os.wait4) are measured.
Serve stages time the start-up until /api/health answers, then measure p50 latencies of sequential
requests (the peak memory of a serve stage covers start-up and those requests). ``floor`` is the
CPU matrix-product floor of evaluation: blocked X @ X.T over every view of the test split.
The table ends with the growth exponent of each row: the least-squares slope of log time against
log N (1 = linear, 2 = quadratic). A stage that fails or passes --timeout is reported, not fatal.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules beside this script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_scale_data import generate  # noqa: E402
from bench_scale_run import Result, free_port, growth_exponent, matmul_floor, run_stage, serve_stage  # noqa: E402
from retrieval.atomic import write_text  # noqa: E402

# The stages, as the CLI is called today: edit here when a command's options change.
# {catalog} {emb} {work} {port} are filled per size.
COMMANDS = {
    "catalog-info": ["catalog-info", "{catalog}"],
    "evaluate": ["evaluate", "--embeddings", "{emb}", "--catalog", "{catalog}", "--split", "test",
                 "--out", "{work}/report"],
    "index-flat": ["index", "build", "--embeddings", "{emb}", "--out", "{work}/index-flat", "--type", "flat"],
    "index-ivf": ["index", "build", "--embeddings", "{emb}", "--out", "{work}/index-ivf", "--type", "ivf"],
    "index-ivfpq": ["index", "build", "--embeddings", "{emb}", "--out", "{work}/index-ivfpq", "--type", "ivfpq"],
    "serve-flat": ["serve", "--index", "{work}/index-flat", "--catalog", "{catalog}", "--port", "{port}"],
    "serve-ivf": ["serve", "--index", "{work}/index-ivf", "--catalog", "{catalog}", "--port", "{port}"],
}
NEEDS = {"serve-flat": "index-flat", "serve-ivf": "index-ivf"}  # skipped when this one ran here and failed
# API latencies, measured while a serve stage runs: {id} is a random item, {word} a title word,
# {group}={label} a facet filter.
REQUESTS = {
    "serve-flat": {"similar k=50, flat": "/api/items/{id}/similar?k=50",
                   "browse ?q=": "/?q={word}",
                   "browse, facet filter": "/?{group}={label}"},
    "serve-ivf": {"similar k=50, ivf": "/api/items/{id}/similar?k=50"},
}
STAGES = ["catalog-info", "evaluate", "floor", *list(COMMANDS)[2:]]
ROW_NAMES = {"catalog-info": "`catalog-info`", "evaluate": "`evaluate --split test` (query = candidate)",
             "floor": "evaluation floor: blocked X·Xᵀ, every view, test split",
             "index-flat": "`index build --type flat`", "index-ivf": "`index build --type ivf`",
             "index-ivfpq": "`index build --type ivfpq`", "serve-flat": "`serve` start-up (flat) until /api/health",
             "serve-ivf": "`serve` start-up (ivf) until /api/health"}
DATA_ROW = "generate data (not a product stage; ~0 s when reused)"
RATIO_ROW = "evaluate / floor, CPU time"
QUERY_WORD, FACET = "g20l000", ("group00", "g00l000")  # a title word in ~1 item in 4; a 2-label group


def get_args_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="30000,100000", help="comma-separated catalogue sizes N (default: 30000,100000)")
    p.add_argument("--out", type=Path, help="work folder, kept; data of a size and seed is reused (default: temporary)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of: {', '.join(STAGES)}")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a stage may run before it is killed")
    p.add_argument("--requests", type=int, default=50, help="timed requests per API latency (default: 50)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_list(text: str, allowed=None) -> list[str]:
    """Comma-separated values, checked against allowed (a ValueError lists the valid ones)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if allowed is not None and v not in allowed]
    if unknown:
        raise ValueError(f"Unknown stage(s) {', '.join(unknown)}; choose from: {', '.join(allowed)}")
    return values


def command(stage: str, paths: dict) -> list[str]:
    """The child's argv of a CLI stage."""
    return [sys.executable, "-m", "retrieval.cli", *[a.format(**paths) for a in COMMANDS[stage]]]


def bench_size(n: int, stages: list[str], args, work: Path) -> dict[str, Result]:
    """Generate the data of size n, then run the stages; returns {row: Result}."""
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    catalog, emb = generate(work, n, args.seed)
    results = {DATA_ROW: Result(time.perf_counter() - start, None, "ok")}
    print(f"N={n:,}: data ready in {results[DATA_ROW].seconds:.0f} s ({work})",
          file=sys.stderr, flush=True)
    paths = {"catalog": str(catalog), "emb": str(emb), "work": str(work)}
    requests = {"n": n, "word": QUERY_WORD, "group": FACET[0], "label": FACET[1]}
    for stage in stages:
        need = NEEDS.get(stage)
        if need in results and results[need].status != "ok":  # not run here: an earlier run's output may do
            results[stage] = Result(None, None, f"needs {need}")
        elif stage == "floor":
            results[stage] = matmul_floor(emb, catalog)
        elif stage in REQUESTS:
            cmd = command(stage, {**paths, "port": free_port()})
            results.update(serve_stage(cmd, stage, REQUESTS[stage], requests, args.requests, args.timeout,
                                       work / f"{stage}.log"))
        else:
            results[stage] = run_stage(command(stage, paths), args.timeout, work / f"{stage}.log")
        print(f"N={n:,} {stage}: {results[stage].cell()}", file=sys.stderr, flush=True)
    if "evaluate" in results and "floor" in results:
        results[RATIO_ROW] = Result.ratio(results["evaluate"], results["floor"])
    return results


def row_order(stages: list[str]) -> list[str]:
    """Table rows: the stages, each serve stage followed by its latencies, then the derived rows."""
    rows = [DATA_ROW]
    for stage in stages:
        rows.append(stage)
        rows += list(REQUESTS.get(stage, {}))
        if stage == "floor" and "evaluate" in stages:
            rows.append(RATIO_ROW)
    return rows


def format_table(sizes: list[int], table: dict[int, dict[str, Result]], stages: list[str]) -> str:
    """One markdown table: a row per stage, a column per N, then the growth exponents of wall and CPU time."""
    lines = ["| stage | " + " | ".join(f"{n:,}" for n in sizes) + " | growth exponent, wall | cpu |",
             "|---|" + "---:|" * len(sizes) + "---:|---:|"]
    for row in row_order(stages):
        cells = [table[n].get(row, Result(None, None, "-")) for n in sizes]
        slopes = []
        for measure in ("seconds", "cpu_s"):
            points = [(n, getattr(c, measure)) for n, c in zip(sizes, cells)
                      if c.status == "ok" and getattr(c, measure)]
            slope = growth_exponent(points) if row != RATIO_ROW else None
            slopes.append("-" if slope is None else f"{slope:.2f}")
        lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(c.cell() for c in cells)
                     + f" | {' | '.join(slopes)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the benchmark and print the table (also written to OUT/bench_scale.md and .json)."""
    args = get_args_parser().parse_args(argv)
    sizes = [int(s) for s in parse_list(args.sizes)]
    stages = [s for s in STAGES if s in parse_list(args.stages, STAGES)]  # always in flow order
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    table = {}
    try:
        for n in sizes:
            table[n] = bench_size(n, stages, args, out / str(n))
    finally:
        done = [n for n in sizes if n in table]
        text = format_table(done, table, stages) if done else "(no size finished)"
        print(text, flush=True)
        if args.out:
            write_text(out / "bench_scale.md", text + "\n")
            write_text(out / "bench_scale.json", json.dumps(
                {str(n): {row: r.__dict__ for row, r in table[n].items()} for n in done}, indent=1))
        else:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
