"""Li et al. 2017's Table II protocol on any catalog: the three methods under a recipe and under our
defaults, with complete and incomplete (``--label-dropout paper``) labels, several seeds; results kept
in one JSON file written atomically, so an interrupted experiment resumes with the runs left."""
from __future__ import annotations

import fcntl
import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from retrieval.atomic import write_text
from retrieval.net.model import METHODS

logger = logging.getLogger(__name__)

# Li et al. 2017, Table II: mean mAP (%) of the three methods
PAPER_TABLE2 = {"multi-weight": 55.23, "multi-task": 53.11, "multi-label": 52.48}
RECIPE_SETTINGS = ("li2017", "default")
LABELS = {None: "complete", "paper": "paper dropout"}


@dataclass(frozen=True)
class Run:
    """One training run of the protocol."""

    recipe: str
    dropout: str | None
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.recipe}-{self.dropout or 'full'}-{self.method}-s{self.seed}"

    @property
    def setting(self) -> tuple[str, str | None]:
        return self.recipe, self.dropout


def protocol_runs(seeds: list[int], recipes=RECIPE_SETTINGS, dropouts=(None, "paper")) -> list[Run]:
    """Every run, seed by seed, so that the first seeds of every setting finish first."""
    return [Run(r, d, m, s) for s in seeds for r in recipes for d in dropouts for m in METHODS]


def train_options(run: Run, epochs: int, recipe_options: dict[str, list[str]]) -> list[str]:
    """``retrieval train`` options of a run: ``--recipe NAME`` plus ``recipe_options[NAME]`` (the
    overrides that let it run here), or nothing for the defaults."""
    options = ["--method", run.method, "--epochs", str(epochs), "--seed", str(run.seed)]
    if run.recipe != "default":
        options = ["--recipe", run.recipe, *recipe_options.get(run.recipe, []), *options]
    return options + (["--label-dropout", run.dropout] if run.dropout else [])


def load_results(path: Path) -> dict:
    """Finished runs by name (empty when the file does not exist yet)."""
    return json.loads(path.read_text()) if path.exists() else {}


def record(path: Path, run: Run, report: dict, seconds: dict, options: list[str]) -> None:
    """Add a finished run (its training options, per-group and mean mAP@50 of the shared embedding)
    to the results file. Read, merged and written atomically under a lock, so
    several processes (say, one per recipe) can share one results file."""
    entry = {
        "recipe": run.recipe, "dropout": run.dropout, "method": run.method, "seed": run.seed, "options": options,
        "groups": {g: {"map_paper": v["map_paper"], "map_standard": v["map_standard"]}
                   for g, v in report["groups"].items()},
        "mean": {"map_paper": report["mean"]["map_paper"], "map_standard": report["mean"]["map_standard"]},
        "seconds": seconds,
    }
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_text(path, json.dumps({**load_results(path), run.name: entry}, indent=2))


def run_protocol(runs: list[Run], catalog: str, work: Path, epochs: int, recipe_options: dict[str, list[str]],
                 trunk_cache: Path | None = None, keep_files: bool = False) -> dict:
    """Train, embed and evaluate every run not yet in ``work/results.json``; returns all results.
    Embeddings and ``last.pt`` are removed once a run is recorded unless ``keep_files``."""
    from retrieval.experiments import Experiment, run_experiment

    path = work / "results.json"
    for i, run in enumerate(runs):
        results = load_results(path)
        if run.name in results:
            continue
        logger.info("Table II run %d/%d: %s", i + 1, len(runs), run.name)
        options = train_options(run, epochs, recipe_options)
        exp = run_experiment(Experiment(run.name, options), catalog, work, trunk_cache)
        record(path, run, exp.report, exp.seconds, options)
        if not keep_files:
            (work / f"{run.name}.h5").unlink(missing_ok=True)
            (work / run.name / "last.pt").unlink(missing_ok=True)
    return load_results(path)


def spread(values: list[float]) -> str:
    """``mean ± sample standard deviation`` in percent (± 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"


def _settings(results: dict) -> list[tuple[str, str | None]]:
    """The (recipe, dropout) settings present, the recipe first, complete labels first."""
    order = {r: i for i, r in enumerate(RECIPE_SETTINGS)}
    return sorted({(r["recipe"], r["dropout"]) for r in results.values()},
                  key=lambda s: (order.get(s[0], len(order)), s[0], s[1] or ""))


def _by_seed(results: dict, recipe: str, dropout: str | None, method: str, key) -> dict[int, float]:
    return {r["seed"]: key(r) for r in results.values()
            if r["recipe"] == recipe and r["dropout"] == dropout and r["method"] == method}


def summary_table(results: dict, metric: str = "map_paper") -> str:
    """Mean over groups per run, then mean ± sd over seeds for each setting and method, and the paired
    (same seed, same dropped labels) differences of multi-weight to the other two."""
    head = ["recipe", "labels", "seeds", *METHODS, "multi-weight − multi-task", "multi-weight − multi-label"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * (len(head) - 3)]
    for recipe, dropout in _settings(results):
        means = {m: _by_seed(results, recipe, dropout, m, lambda r: r["mean"][metric]) for m in METHODS}
        cells = [spread(list(v.values())) if v else "–" for v in means.values()]
        for other in METHODS[1:]:
            paired = [means["multi-weight"][s] - means[other][s] for s in means["multi-weight"] if s in means[other]]
            cells.append(spread(paired) if paired else "–")
        seeds = len(set().union(*[set(v) for v in means.values()]))
        lines.append(f"| {recipe} | {LABELS.get(dropout, dropout)} | {seeds} | " + " | ".join(cells) + " |")
    paper = [f"{PAPER_TABLE2[m]:.2f}" for m in METHODS]
    diffs = [f"{PAPER_TABLE2['multi-weight'] - PAPER_TABLE2[m]:+.2f}" for m in METHODS[1:]]
    lines.append("| *Li et al. 2017, Table II* | *their catalog* | 1 | " + " | ".join(paper + diffs) + " |")
    return "\n".join(lines)


def group_table(results: dict, recipe: str, dropout: str | None, metric: str = "map_paper") -> str:
    """Per group: mean ± sd over seeds of each method's mAP@50."""
    runs = [r for r in results.values() if r["recipe"] == recipe and r["dropout"] == dropout]
    groups = list(dict.fromkeys(g for r in runs for g in r["groups"]))
    lines = [f"| group ({recipe}, {LABELS.get(dropout, dropout)}) | " + " | ".join(METHODS) + " |",
             "|---|" + "---:|" * len(METHODS)]
    for g in [*groups, "mean"]:
        cells = []
        for m in METHODS:
            values = [(r["mean"] if g == "mean" else r["groups"][g])[metric] for r in runs if r["method"] == m]
            cells.append(spread(values) if values else "–")
        lines.append(f"| {'**mean**' if g == 'mean' else g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_tables(results: dict, metric: str = "map_paper") -> str:
    """The summary table and one per-group table per setting, as markdown."""
    return "\n\n".join([summary_table(results, metric)] + [group_table(results, *s, metric) for s in _settings(results)])
