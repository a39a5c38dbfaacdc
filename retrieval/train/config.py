"""The training loop: cached-trunk or image inputs, masked multi-group loss, checkpoints, DDP."""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from retrieval.atomic import write_text
from retrieval.data.catalog import Item
from retrieval.net.model import ModelConfig, RetrievalModel

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Options of one training run (the resolved ``retrieval train`` arguments), the one source of
    their defaults (model options default to ``ModelConfig``'s); the argument parser takes them from here."""

    catalog: str
    out: str
    method: str = ModelConfig.method
    backbone: str = ModelConfig.backbone
    weights: str | None = None
    embed_dim: int = ModelConfig.embed_dim
    taps: str = ModelConfig.taps
    gem_p: float = ModelConfig.gem_p
    pool_weighting: str = ModelConfig.pool_weighting
    colour_bins: str = ModelConfig.colour_bins
    colour_weighting: str = ModelConfig.colour_weighting
    dropout: float = ModelConfig.dropout
    head_scale: float = ModelConfig.head_scale
    normalized_heads: bool = ModelConfig.normalized_heads
    flip_average: bool = ModelConfig.flip_average
    embed_hidden: int = ModelConfig.embed_hidden
    shared_layers: str = ModelConfig.shared_layers
    shared_view: str = ModelConfig.shared_view
    label_attention: bool = ModelConfig.label_attention
    label_smoothing: float = 0.0
    metric_scale: float = 6.0
    select_by: str = "map"
    image_size: int = ModelConfig.image_size
    epochs: int | None = None  # None: DEFAULT_EPOCHS, or enough for min_steps (resolve_epochs)
    min_steps: int = 700
    batch_size: int = 128
    lr: float = 2e-3
    trunk_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    lr_steps: str | None = None
    lr_gamma: float = 0.1
    freeze_bn: bool = False
    trainable_blocks: str = "auto"
    input: str = "auto"
    group_loss: str = "auto"
    loss_norm: str = "auto"
    weighting: str = "group"
    smoothing_c: float = 3.0
    label_dropout: str | None = None
    groups: str | None = None
    val_fraction: float = 0.1
    sampling: str = "none"
    sampling_group: str | None = None
    sampling_target: str | None = None
    range_loss: float = 0.0
    contrastive: float = 0.0
    head_fit: float = 1.0
    early_learning: float | str = "auto"  # auto: 0, and a second run at EARLY_LEARNING if the first memorises
    early_learning_momentum: float = 0.7
    early_learning_balance: float = 0.5  # the softmax groups' early targets divided by class share ** this
    early_learning_sigmoid: bool = True  # early learning holds the sigmoid (multi-label) groups' heads too
    fill_missing: float | str = "auto"  # auto: FILL_MISSING where labels are missing (FILL_MIN_MISSING), else off
    range_group: str | None = None
    range_distance: str = "l2"
    device: str = "auto"
    workers: int | None = None
    image_cache: str | None = None
    trunk_cache: str | None = None
    cache_memory: float | None = None  # GB of trunk cache held in memory; None: memory_budget()
    seed: int = 0
    resume: bool = False
    recipe: str | None = None


DEFAULT_EPOCHS = 30
EARLY_LEARNING = 4.0  # the weight --early-learning auto retrains with (Liu et al.'s CIFAR-10 value is 3; with
# balanced targets 4 measured better on the worst stand-ins: README, Wrong labels)
SIGMOID_WEIGHT_UNDER_EARLY_LEARNING = 2.5  # the sigmoid groups' loss weights times this while early learning is on


FILL_MISSING = 0.9  # the confidence --fill-missing auto fills a missing training label at (measured: README)
FILL_MIN_MISSING = 0.05  # auto fills where a softmax group lacks the labels of this share of training items
AUTO_MIN_VALIDATION = 20  # validation items needed before a run's validation decides anything automatically
# (early learning's rule, the filling) or is read as a warning (loop.unlearnt_groups)


def auto_or_number(value, expected: str) -> float | str:
    """``auto`` or a number, from the command line or a config file; ValueError("``expected``, got
    ...") for anything else."""
    if value == "auto":
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{expected}, got {value!r}") from None


def parse_fill_missing(value) -> float | str:
    """``auto``, 0 (off) or a confidence in (0, 1)."""
    expected = "--fill-missing must be auto, 0 (off) or a confidence in (0, 1)"
    confidence = auto_or_number(value, expected)
    if confidence != "auto" and not 0 <= confidence < 1:
        raise ValueError(f"{expected}, got {value!r}")
    return confidence


def parse_early_learning(value) -> float | str:
    """``auto`` or a non-negative weight."""
    weight = auto_or_number(value, "--early-learning must be auto or a weight (0 = off)")
    if weight != "auto" and weight < 0:
        raise ValueError(f"--early-learning must be auto or a weight of 0 (off) or more, got {value!r}")
    return weight


def resolve_epochs(epochs: int | None, steps_per_epoch: int, min_steps: int) -> int:
    """``--epochs`` as given; unset, ``DEFAULT_EPOCHS``, or on a small catalogue as many as it takes
    to make ``min_steps`` optimisation steps (on the 2,000-image stand-ins 30 epochs are ~360 steps,
    and 60 gave +0.2 to +0.7 shared and +0.3 to +1.4 group view; the development catalog makes
    1,600 steps in 30)."""
    if epochs is not None:
        return epochs
    return max(DEFAULT_EPOCHS, -(-min_steps // max(1, steps_per_epoch)))


def split_validation(items: list[Item], fraction: float) -> tuple[list[Item], list[Item]]:
    """Deterministic train/validation split of the training items by a hash of the path."""
    def in_val(item):
        digest = hashlib.sha256(b"val:" + item.image.encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < fraction
    val = [it for it in items if in_val(it)]
    return [it for it in items if not in_val(it)], val


# training items from which ``auto`` fine-tunes the whole trunk on a GPU. Measured on an H100 (mAP@50,
# shared / group view, against the frozen trunk): a 1.4k-item street stand-in, equal validation mAP (two
# trainable units worse); a 3.1k-item part of the development catalog, +0.1 / -0.2, colour +2.7 / +3.1;
# the whole development catalog (6.9k), +0.9 / +0.9, colour +4.1 / +3.9. Training 3-4x as long.
FULL_TUNING_MIN_ITEMS = 3_000


def resolve_blocks(blocks: str, device: torch.device, n_train: int | None = None) -> str:
    """``--trainable-blocks`` with ``auto`` resolved: ``0`` (frozen trunk) on the CPU; on a GPU ``all``,
    unless ``n_train`` (the training items; None: size not considered) is under
    ``FULL_TUNING_MIN_ITEMS``. Anything but N, ``all`` or ``auto`` is refused with a message naming
    the option."""
    if blocks == "auto":
        small = n_train is not None and n_train < FULL_TUNING_MIN_ITEMS
        resolved = "all" if device.type == "cuda" and not small else "0"
    else:
        resolved = str(blocks)
    if resolved != "all" and not resolved.isdigit():
        raise ValueError(f"--trainable-blocks must be a number of trunk units, all or auto; got {blocks!r}")
    return resolved


def resolve_trainable(cfg: TrainConfig, blocks: str, n_units: int) -> tuple[int, str]:
    """First trainable trunk unit and input mode (``cached`` or ``images``) for ``blocks`` as
    ``resolve_blocks`` gives it."""
    n = n_units if blocks == "all" else int(blocks)
    if not 0 <= n <= n_units:
        raise ValueError(f"--trainable-blocks {blocks} out of range; this trunk has {n_units} units")
    start = n_units - n
    mode = cfg.input if cfg.input != "auto" else ("images" if start == 0 else "cached")
    if mode not in ("cached", "images"):
        raise ValueError(f"Unknown --input {cfg.input!r}; choose one of: auto, cached, images")
    if mode == "cached" and start == 0:
        raise ValueError("--input cached needs a frozen part of the trunk; lower --trainable-blocks")
    return start, mode


class CachedForward(nn.Module):
    """Model forward from cached trunk outputs (what DDP wraps in cached mode)."""

    def __init__(self, model: RetrievalModel, start: int):
        super().__init__()
        self.model, self.start = model, start

    def forward(self, prefix, act, weight=None):
        pooled = self.model.pooled_features(act, self.start, prefix, weight)
        emb = self.model.embed_pooled(pooled)
        return emb, self.model.forward_heads(emb), self.model.label_logits(pooled)


def freeze_units(model: RetrievalModel, start: int, batchnorm: bool = False) -> None:
    """Freeze trunk units before ``start``; their batch-norm statistics stay as they are. With
    ``batchnorm`` every BatchNorm of the trunk is frozen too (statistics and affine parameters)."""
    frozen = [m for unit in model.trunk.units[:start] for m in unit.modules()]
    if batchnorm:
        frozen += [m for m in model.trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in frozen:
        module.eval()
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)


OPTIMIZERS = ("adamw", "sgd")
# label attention's layer learns from scratch on each batch's cells at this multiple of --lr: post hoc
# on the default's cached cells (60 epochs, cosine, balanced + item loss), the colour group view of the
# multicolour / multilabel stand-ins at 1x: 67.0 / 67.1, 3x: 70.1 / -, 5x: 70.7 / 70.4, 10x: 71.0 / 70.5
LABEL_HEAD_LR_SCALE = 5.0
SCHEDULES = ("cosine", "step")


def make_optimizer(model: RetrievalModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum, with a smaller learning rate on trainable trunk units and a larger
    one on label attention's layer (``LABEL_HEAD_LR_SCALE``)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown --optimizer {cfg.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    label = [p for n, p in model.named_parameters() if n.startswith("label_head.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("trunk.", "label_head.")) and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr}]
    if trunk:
        groups.append({"params": trunk, "lr": cfg.lr * cfg.trunk_lr_scale})
    if label:
        groups.append({"params": label, "lr": cfg.lr * LABEL_HEAD_LR_SCALE})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def parse_lr_steps(text: str | None) -> list[int]:
    """Epochs at which a step schedule multiplies the learning rate by ``lr_gamma``: "5,8,10"."""
    try:
        return sorted(int(e) for e in text.split(",")) if text else []
    except ValueError:
        raise ValueError(f"Bad --lr-steps {text!r}; use comma-separated epoch numbers, e.g. 5,8,10") from None


def make_scheduler(optimizer, total_steps: int, warmup: int, schedule: str = "cosine",
                   steps_per_epoch: int = 1, lr_steps: list[int] = (), gamma: float = 0.1):
    """Stepped every batch: ``cosine`` = linear warm-up then cosine decay over ``total_steps``;
    ``step`` = the learning rate times ``gamma`` from each epoch in ``lr_steps`` on, no warm-up."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown --schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")

    def cosine(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    def stepped(step):
        return gamma ** sum(step // steps_per_epoch >= e for e in lr_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine if schedule == "cosine" else stepped)


def write_json(path: Path, data) -> None:
    """JSON written to a temporary file and renamed into place."""
    write_text(path, json.dumps(data, indent=2, default=str))


def write_config(path: Path, cfg: TrainConfig) -> None:
    """The resolved configuration as YAML (atomic)."""
    import yaml

    write_text(path, yaml.safe_dump(asdict(cfg), sort_keys=False))
