"""Quality that travels (issue 16): the README defaults against the off-the-shelf trunk on stand-ins.

For each catalog (stand-ins from scripts/make_standins.py, optionally the development catalog):
the off-the-shelf ImageNet trunk (`retrieval embed --pretrained-only`) and the default training run
(no flags, plus any --variant), each embedded and evaluated on the test split; one table of mean
and colour-group mAP@50 (paper / standard; the shared view also by the shared embedding alone,
``evaluate --shared-view embedding``), and one of the gains against issue 16's targets.
The colour group is the first whose name says colour (``--colour-group NAME=GROUP`` picks another);
a catalog without one gets "–" in the colour columns.
Finished runs, embeddings and reports are reused; results.json and transfer.md are written atomically.

    python scripts/experiment_transfer.py --catalog street=/tmp/standins/street \\
        --catalog multicolour=/tmp/standins/multicolour --work /tmp/transfer
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path

from retrieval.atomic import atomic_write, write_text
from retrieval.cli import configure_logging
from retrieval.commands.train import get_args_parser as train_parser
from retrieval.data.catalog import CatalogError, read_catalog
from retrieval.data.standins import colour_group
from retrieval.evaluate.report import evaluate_embeddings
from retrieval.experiments import Experiment, run_experiment
from retrieval.train.config import TrainConfig

TARGETS = {"shared": 8.0, "group view": 14.0, "colour": 10.0}  # points above the off-the-shelf trunk (paper)
# training options that change the frozen trunk pass (what the trunk cache holds)
PASS_OPTIONS = ("backbone", "weights", "image_size", "taps", "gem_p", "pool_weighting", "colour_bins",
                "colour_weighting", "trainable_blocks")


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE")
    return name, value


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", type=_pair, action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--work", required=True, help="folder for runs, embeddings, reports and the table")
    p.add_argument("--variant", type=_pair, action="append", default=[], metavar="NAME='OPTIONS'",
                   help="another training row: 'retrieval train' options added to the defaults; rows whose "
                        "options give the same frozen trunk pass share one trunk cache (trunk_cache_name)")
    p.add_argument("--pass-variant", type=_pair, action="append", default=[], metavar="NAME='OPTIONS'",
                   help="the same as --variant (kept for earlier command lines)")
    p.add_argument("--reuse", type=_pair, action="append", default=[], metavar="NAME=DIR",
                   help="take the trunk caches (trunk-cache*.h5) and imagenet.h5 of catalog NAME from an earlier "
                        "experiment folder of the same images (e.g. scripts/experiment_methods.py's --work)")
    p.add_argument("--colour-group", type=_pair, action="append", default=[], metavar="NAME=GROUP",
                   help="the group in catalog NAME's colour columns (default: the first group whose name "
                        "says colour; none: the columns stay empty)")
    return p


def _cells(report: dict, colour: str | None) -> dict:
    """Mean and colour-group mAP (paper, standard) of both views from a report (colour None: no
    colour group, its cells None)."""
    def pair(entry):
        return None if not entry or entry.get("map_paper") is None else (
            100 * entry["map_paper"], 100 * entry["map_standard"])
    mean, col = report["mean"], report["groups"].get(colour, {}) if colour else {}
    return {"shared": pair(mean), "group view": pair(mean.get("group_view")),
            "colour shared": pair(col), "colour group view": pair(col.get("group_view"))}


def trunk_cache_name(options: list[str]) -> str:
    """The trunk cache file of a training row: ``trunk-cache.h5`` when its options leave the frozen
    pass as the default's, else one named by the options that change it (``PASS_OPTIONS``; every
    option when it takes a --recipe or --config, whose contents are not read here)."""
    args = train_parser().parse_args(["--catalog", "-", "--out", "-", *options])
    if args.recipe or args.config:
        changed = options
    else:
        default = TrainConfig(catalog="-", out="-")
        same = {"pool_weighting": {"auto", "none", "learned", "map"}}  # attended poolings reweight the plain cache
        changed = [f"{k}={getattr(args, k)}" for k in PASS_OPTIONS if getattr(args, k) != getattr(default, k)
                   and not {getattr(args, k), getattr(default, k)} <= same.get(k, set())]
    slug = re.sub(r"[^A-Za-z0-9_.=,]+", "-", "-".join(changed)).strip("-")
    return f"trunk-cache-{slug}.h5" if slug else "trunk-cache.h5"


def pick_colour_group(catalog: str, wanted: str | None = None) -> str | None:
    """The group shown in the colour columns: ``wanted`` (which must be one of the catalog's
    groups), else the first whose name says colour, else None (the columns stay empty)."""
    read = read_catalog(catalog, check_files=False)
    if wanted is not None:
        if wanted not in read.groups:
            raise SystemExit(f"--colour-group: {catalog} has no group {wanted!r} "
                             f"(its groups: {', '.join(read.groups)})")
        return wanted
    try:
        return colour_group(read)
    except ValueError:
        print(f"{catalog}: no group's name says colour, so the colour columns stay empty "
              "(--colour-group NAME=GROUP names one)")
        return None


def run_catalog(name: str, catalog: str, work: Path, variants: list[tuple[str, str]],
                colour: str | None = None) -> dict:
    """Off-the-shelf, default and variants on one catalog: ``{row: cells}``."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    colour = pick_colour_group(catalog, colour)
    rows = [Experiment("imagenet", None), Experiment("default", [])]
    rows += [Experiment(v, shlex.split(options)) for v, options in variants]
    labels = read_catalog(catalog, check_files=False)
    results = {}
    for exp in rows:
        cache = folder / trunk_cache_name(exp.train) if exp.train is not None else None
        run_experiment(exp, catalog, folder, cache)
        results[exp.name] = {**_cells(exp.report, colour), "colour group": colour, "seconds": exp.seconds}
        if exp.train is not None:  # the shared embedding alone, from the same file (the papers' feature)
            alone = evaluate_embeddings(folder / f"{exp.name}.h5", labels, shared_view="embedding")
            results[exp.name]["shared, embedding alone"] = _cells(alone, None)["shared"]
    return results


def _fmt(cell) -> str:
    return "–" if cell is None else f"{cell[0]:.1f} / {cell[1]:.1f}"


def format_tables(results: dict) -> str:
    """The issue's table (a row per catalog and trained row) and the gains against the targets."""
    lines = ["| catalogue | run | off-the-shelf (shared) | shared | shared, embedding alone | group view | "
             "colour, shared (off-the-shelf) | colour, group view |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    gains = ["| catalogue | run | shared gain (≥ 8) | group view gain (≥ 14) | colour shared gain (≥ 10) | "
             "colour group view gain (≥ 10) |", "|---|---|---:|---:|---:|---:|"]
    for catalog, rows in results.items():
        base = rows["imagenet"]
        for name, r in rows.items():
            if name == "imagenet":
                continue
            lines.append(f"| {catalog} | {name} | {_fmt(base['shared'])} | {_fmt(r['shared'])} | "
                         f"{_fmt(r.get('shared, embedding alone'))} | {_fmt(r['group view'])} | "
                         f"{_fmt(r['colour shared'])} ({_fmt(base['colour shared'])}) | "
                         f"{_fmt(r['colour group view'])} |")
            cols = [("shared", "shared", "shared"), ("group view", "shared", "group view"),
                    ("colour shared", "colour shared", "colour"), ("colour group view", "colour shared", "colour")]
            cells = [_gain(r[key], base[against], TARGETS[target]) for key, against, target in cols]
            gains.append(f"| {catalog} | {name} | " + " | ".join(cells) + " |")
    colours = ", ".join(f"{catalog}: {rows['imagenet'].get('colour group') or 'none'}"
                        for catalog, rows in results.items())
    return "mAP@50 %, paper / standard, test split\n\n" + "\n".join(lines) + "\n\n" + \
        "Points above the off-the-shelf trunk (paper normalisation)\n\n" + "\n".join(gains) + \
        f"\n\nColour columns: {colours}"


def _gain(cell, base, target: float) -> str:
    if cell is None or base is None:
        return "–"
    gain = round(cell[0] - base[0], 1)  # judged as shown: 58 - 50 in floats is 7.999...
    return f"{gain:+.1f} {'met' if gain >= target else 'missed'}"


def take_reused(source: Path, folder: Path) -> list[str]:
    """Copy an earlier experiment folder's trunk caches (every ``trunk-cache*.h5``: the default's and
    the variants' passes) and off-the-shelf embeddings (``imagenet.h5``) into ``folder`` where it has
    none of that name; copies, so the runs here never write into the other experiment, each written
    atomically (``atomic_write``), so a stopped copy is never taken for a cache."""
    if not source.is_dir():
        raise SystemExit(f"--reuse: {source} is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    taken = []
    for file in sorted(source.glob("trunk-cache*.h5")) + [source / "imagenet.h5"]:
        if file.is_file() and not (folder / file.name).exists():
            with open(file, "rb") as src, atomic_write(folder / file.name, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
            taken.append(file.name)
    return taken


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    configure_logging()
    work = Path(args.work)
    colours = dict(args.colour_group)
    unknown = set(colours) - {name for name, _ in args.catalog}
    if unknown:  # before any copying or training
        raise SystemExit(f"--colour-group names no --catalog: {', '.join(sorted(unknown))}")
    for name, source in args.reuse:
        take_reused(Path(source), work / name)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, catalog in args.catalog:
        try:
            results[name] = run_catalog(name, catalog, work, args.variant + args.pass_variant, colours.get(name))
        except CatalogError as err:  # a --catalog that is none: one line, the others' results kept
            raise SystemExit(f"experiment_transfer.py: --catalog {name}={catalog}: {err}") from None
        write_text(results_path, json.dumps(results, indent=2))
    text = format_tables(results)
    write_text(work / "transfer.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
