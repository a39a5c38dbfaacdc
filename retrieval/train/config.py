"""The training loop: cached-trunk or image inputs, masked multi-group loss, checkpoints, DDP."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
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
    label_smoothing: float = 0.0
    metric_scale: float = 6.0
    select_by: str = "map"
    image_size: int = ModelConfig.image_size
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    trunk_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    trainable_blocks: str = "auto"
    input: str = "auto"
    group_loss: str = "auto"
    weighting: str = "group"
    smoothing_c: float = 3.0
    label_dropout: str | None = None
    groups: str | None = None
    val_fraction: float = 0.1
    sampling: str = "none"
    sampling_group: str | None = None
    range_loss: float = 0.0
    contrastive: float = 0.0
    range_group: str | None = None
    device: str = "auto"
    workers: int | None = None
    image_cache: str | None = None
    trunk_cache: str | None = None
    seed: int = 0
    resume: bool = False


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when launched by torchrun; returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return dist.get_rank(), world, device


def split_validation(items: list[Item], fraction: float) -> tuple[list[Item], list[Item]]:
    """Deterministic train/validation split of the training items by a hash of the path."""
    def in_val(item):
        digest = hashlib.sha256(b"val:" + item.image.encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < fraction
    val = [it for it in items if in_val(it)]
    return [it for it in items if not in_val(it)], val


def resolve_trainable(cfg: TrainConfig, n_units: int, device: torch.device) -> tuple[int, str]:
    """First trainable trunk unit and input mode (``cached`` or ``images``)."""
    blocks = cfg.trainable_blocks
    if blocks == "auto":
        blocks = "all" if device.type == "cuda" else "0"
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
        return emb, self.model.forward_heads(emb)


def freeze_units(model: RetrievalModel, start: int) -> None:
    """Freeze trunk units before ``start``; their batch-norm statistics stay as they are."""
    for unit in model.trunk.units[:start]:
        unit.eval()
        for p in unit.parameters():
            p.requires_grad_(False)


def make_optimizer(model: RetrievalModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with a smaller learning rate on trainable trunk units."""
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("trunk.") and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr}]
    if trunk:
        groups.append({"params": trunk, "lr": cfg.lr * cfg.trunk_lr_scale})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, total_steps: int, warmup: int):
    """Linear warm-up then cosine decay, stepped every batch."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_json(path: Path, data) -> None:
    """JSON written to a temporary file and renamed into place."""
    write_text(path, json.dumps(data, indent=2, default=str))


def write_config(path: Path, cfg: TrainConfig) -> None:
    """The resolved configuration as YAML (atomic)."""
    import yaml

    write_text(path, yaml.safe_dump(asdict(cfg), sort_keys=False))
