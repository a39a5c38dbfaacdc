"""Recipes (the papers' setups as presets) through the real CLI, and the Table II protocol's bookkeeping."""
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from retrieval.cli import main as cli
from retrieval.commands.train import parse_config
from retrieval.net.checkpoint import load_checkpoint
from retrieval.recipes import RECIPES, describe_recipe, load_recipe
from retrieval.recipes.table2 import (format_tables, load_results, protocol_runs, record, run_protocol, spread,
                                      summary_table, train_options, Run)

SMALL = ["--image-size", "64", "--epochs", "1", "--workers", "0", "--device", "cpu"]


def test_recipes_ship_as_package_data():
    root = Path(__file__).resolve().parents[1]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.name for pattern in package_data["retrieval"] for p in (root / "retrieval").glob(pattern)}
    assert {f"{name}.yaml" for name in RECIPES} <= shipped
    assert set(RECIPES) == {"li2017", "dress2019"}


def test_every_recipe_option_is_a_training_option():
    for name in RECIPES:
        assert load_recipe(name)["options"]  # unknown keys raise, naming the file
    with pytest.raises(ValueError, match="Unknown recipe 'x'; choose one of: dress2019, li2017"):
        load_recipe("x")


@pytest.mark.parametrize("text,message", [
    ("epohcs: 3", "no option 'epohcs'; did you mean epochs?"),  # was ignored: 700 epochs by the steps rule
    ("normalized_heads: 'no'", "normalized_heads takes true or false, not 'no'"),  # was taken as true
    ("image_size: 8", "image_size: 8 is under 32"),  # the flag's own check
    ("lr: [1, 2]", "lr takes one value, not [1, 2]"),
    ("optimizer: adam", "optimizer 'adam' is not one of: adamw, sgd"),
    ("- epochs", "holds a list, not option: value lines"),
    ("epochs: [", "--config C.yaml: while parsing"),
])
def test_a_config_file_is_checked_as_the_flags_are(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "C.yaml").write_text(text + "\n")
    with pytest.raises(SystemExit) as done:
        parse_config(["--catalog", "C", "--out", "R", "--config", "C.yaml"])
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_a_config_file_reads_dashes_and_a_runs_own_config_yaml(tiny_run, tmp_path):
    (tmp_path / "c.yaml").write_text("label-attention: false\ntrainable-blocks: '0'\nlabel_dropout: 0.5\n")
    cfg = parse_config(["--catalog", "C", "--out", "R", "--config", str(tmp_path / "c.yaml")])
    assert (cfg.label_attention, cfg.trainable_blocks, cfg.label_dropout) == (False, "0", "0.5")
    again = parse_config(["--catalog", "C", "--out", "R", "--config", str(tiny_run / "config.yaml")])
    assert (again.backbone, again.epochs, again.image_size) == ("tiny", 2, 64)
    alone = parse_config(["--config", str(tiny_run / "config.yaml")])  # its catalog and out are given there
    written = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert (alone.catalog, alone.out) == (written["catalog"], written["out"])


def test_recipe_is_a_default_that_config_and_flags_override(tmp_path):
    base = ["--catalog", "C", "--out", "R"]
    li = parse_config([*base, "--recipe", "li2017"])
    assert (li.backbone, li.shared_layers, li.embed_hidden, li.embed_dim) == ("alexnet", "fc", 4096, 4096)
    assert (li.group_loss, li.loss_norm, li.optimizer, li.momentum, li.recipe) == ("bce", "batch", "sgd", 0.9, "li2017")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"lr": 0.05, "epochs": 3}))
    mixed = parse_config([*base, "--recipe", "li2017", "--config", str(config), "--epochs", "2"])
    assert (mixed.lr, mixed.epochs, mixed.optimizer) == (0.05, 2, "sgd")
    dress = parse_config([*base, "--recipe", "dress2019"])
    assert (dress.lr, dress.lr_steps, dress.batch_size, dress.freeze_bn, dress.image_size) == (1e-3, "5,8,10", 64, True, 224)
    assert (dress.sampling_target, dress.range_distance, dress.backbone) == ("min", "squared", "resnet101")
    plain = parse_config(base)  # no recipe: the product's defaults, (loss norm auto since issue 16)
    assert (plain.optimizer, plain.schedule, plain.loss_norm, plain.shared_layers, plain.freeze_bn) == \
        ("adamw", "cosine", "auto", "embedding", False)


def test_printout_names_the_remaining_deviations():
    cfg = parse_config(["--catalog", "C", "--out", "R", "--recipe", "dress2019", "--backbone", "seresnet50",
                        "--epochs", "3"])
    text = describe_recipe(cfg, torch.device("cpu"))
    assert "--epochs 3 instead of the recipe's 12" in text
    assert "seresnet50 stands in for SENet154" in text
    assert "no ImageNet weights for seresnet50 here" in text
    assert "the trunk is frozen" in text and "frozen BatchNorm changes nothing" in text
    on_gpu = describe_recipe(parse_config(["--catalog", "C", "--out", "R", "--recipe", "li2017", "--weights", "w.pt"]),
                             torch.device("cuda"))
    assert "frozen" not in on_gpu and "random weights" not in on_gpu and "instead of" not in on_gpu


@pytest.mark.parametrize("recipe,extra", [
    ("li2017", ["--method", "multi-label"]),
    ("dress2019", ["--sampling", "under", "--sampling-group", "category"]),
])
def test_recipe_trains_one_epoch_on_the_demo_catalog(recipe, extra, demo_catalog, tmp_path, capsys):
    run = tmp_path / recipe
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(run), "--recipe", recipe, *SMALL, *extra]) == 0
    out = capsys.readouterr().out
    assert f"recipe {recipe}:" in out and "--image-size 64 instead of the recipe's 224" in out
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["train_config"]["recipe"] == recipe
    options = load_recipe(recipe)["options"]
    assert ckpt["model_config"]["backbone"] == options["backbone"]
    assert ckpt["model_config"]["embed_dim"] == options.get("embed_dim", 256)
    assert type(ckpt["optimizer"]["param_groups"][0].get("momentum")) is float  # SGD
    assert (run / "metrics.json").exists()


# ---- the Table II protocol ----

def report(means: dict[str, float]) -> dict:
    groups = {g: {"map_paper": v, "map_standard": v / 2} for g, v in means.items()}
    mean = sum(means.values()) / len(means)
    return {"groups": groups, "mean": {"map_paper": mean, "map_standard": mean / 2}}


def test_protocol_runs_every_setting_seed_by_seed():
    runs = protocol_runs([0, 1])
    assert len(runs) == 2 * 2 * 2 * 3 and len({r.name for r in runs}) == len(runs)
    assert {r.seed for r in runs[:12]} == {0}
    li = train_options(Run("li2017", "paper", "multi-task", 1), 5, {"li2017": ["--backbone", "efficientnet_lite0"]})
    assert li == ["--recipe", "li2017", "--backbone", "efficientnet_lite0", "--method", "multi-task", "--epochs", "5",
                  "--seed", "1", "--label-dropout", "paper"]
    assert train_options(Run("default", None, "multi-label", 0), 5, {}) == \
        ["--method", "multi-label", "--epochs", "5", "--seed", "0"]


def test_table_shows_mean_and_spread_over_seeds_and_paired_differences(tmp_path):
    path = tmp_path / "results.json"
    # multi-weight 0.50 / 0.52, multi-task 0.49 / 0.50 over seeds 0 / 1; multi-label seed 0 only
    for seed, mw, mt in [(0, 0.50, 0.49), (1, 0.52, 0.50)]:
        record(path, Run("li2017", None, "multi-weight", seed), report({"a": mw - 0.1, "b": mw + 0.1}), {}, [])
        record(path, Run("li2017", None, "multi-task", seed), report({"a": mt, "b": mt}), {}, [])
    record(path, Run("li2017", None, "multi-label", 0), report({"a": 0.4, "b": 0.4}), {}, [])
    results = load_results(path)
    assert len(results) == 5
    sd = 100 * math.sqrt(2 * 0.01 ** 2)  # sample sd of two values 0.02 apart
    row = summary_table(results).splitlines()[2]
    assert row == (f"| li2017 | complete | 2 | 51.00 ± {sd:.2f} | 49.50 ± {100 * math.sqrt(2 * 0.005 ** 2):.2f} | "
                   f"40.00 ± 0.00 | 1.50 ± {100 * math.sqrt(2 * 0.005 ** 2):.2f} | 10.00 ± 0.00 |")
    assert "| *Li et al. 2017, Table II* | *their catalog* | 1 | 55.23 | 53.11 | 52.48 | +2.12 | +2.75 |" in summary_table(results)
    groups = format_tables(results)
    assert f"| a | 41.00 ± {sd:.2f} | 49.50 ±" in groups and "| **mean** | 51.00 ±" in groups
    assert spread([0.5]) == "50.00 ± 0.00"


def test_protocol_skips_finished_runs(tmp_path):
    runs = protocol_runs([0], recipes=("default",), dropouts=(None,))
    for run in runs:
        record(tmp_path / "results.json", run, report({"a": 0.5}), {}, [])
    # nothing left to train: a missing catalog is never read
    results = run_protocol(runs, str(tmp_path / "no-catalog"), tmp_path, 1, {})
    assert set(results) == {r.name for r in runs}
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_bad_sampling_target_is_refused_before_training(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--catalog", "C", "--out", "R", "--sampling-target", "smallest"])
    assert "Unknown sampling target 'smallest'; choose min, median, max or a positive number" in capsys.readouterr().err
