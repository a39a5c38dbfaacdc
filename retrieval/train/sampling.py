"""Per-epoch sample orders: plain shuffling, random over- and under-sampling, sharded per rank."""
from __future__ import annotations

import numpy as np
import torch

SAMPLINGS = ("none", "over", "under")


def item_classes(multi_hot: torch.Tensor) -> np.ndarray:
    """Class of each item for sampling: its rarest label; -1 when unlabelled."""
    y = multi_hot.numpy() > 0
    counts = y.sum(0)
    rarity = np.where(y, counts[None, :], np.iinfo(np.int64).max)
    classes = rarity.argmin(1)
    classes[~y.any(1)] = -1
    return classes


def parse_target(target: str | int) -> str | int:
    """A sampling target: ``min``, ``median``, ``max`` or a positive number of items per class."""
    if str(target) in ("min", "median", "max"):
        return str(target)
    try:
        value = int(target)
    except ValueError:
        raise ValueError(f"Unknown sampling target {target!r}; choose min, median, max or a positive number") from None
    if value < 1:
        raise ValueError(f"Sampling target {value} must be a positive number of items per class")
    return value


def class_target(sizes: np.ndarray, mode: str, target: str | int | None = None) -> int:
    """Class size an epoch is balanced to (see ``parse_target``); None = ``max`` for over-sampling,
    ``median`` for under-sampling."""
    target = parse_target(target or ("max" if mode == "over" else "median"))
    named = {"min": sizes.min, "median": lambda: int(np.median(sizes)), "max": sizes.max}
    return int(named[target]()) if target in named else target


def balanced_indices(classes: np.ndarray, mode: str, rng: np.random.Generator,
                     target: str | int | None = None) -> np.ndarray:
    """Indices of one epoch: ``over`` repeats every class smaller than ``target`` up to it (default:
    the largest class's size); ``under`` cuts classes larger than ``target`` down to it (default:
    the median class size; ``min`` balances every class to the smallest). Unlabelled items stay once."""
    if mode not in SAMPLINGS:
        raise ValueError(f"Unknown sampling {mode!r}; choose one of: {', '.join(SAMPLINGS)}")
    labelled = classes >= 0
    if mode == "none" or not labelled.any():
        return np.arange(len(classes))
    members = {c: np.flatnonzero(classes == c) for c in np.unique(classes[labelled])}
    size = class_target(np.array([len(m) for m in members.values()]), mode, target)
    parts = [np.flatnonzero(~labelled)]
    for idx in members.values():
        if mode == "over":
            extra = rng.choice(idx, size - len(idx), replace=True) if size > len(idx) else idx[:0]
            parts += [idx, extra]
        else:
            parts.append(rng.choice(idx, min(len(idx), size), replace=False))
    return np.concatenate(parts)


def epoch_order(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                classes: np.ndarray | None = None, mode: str = "none",
                exclude: np.ndarray | None = None, target: str | int | None = None) -> np.ndarray:
    """This rank's shuffled sample order for an epoch, padded so every rank gets as many
    (the sharding of torch's DistributedSampler, applied after re-sampling). ``exclude`` (item
    positions, e.g. unreadable images known to every rank) is left out *before* sharding, so
    ranks still get orders of the same length and take the same number of steps. ``target``: the
    class size re-sampling balances to (see ``balanced_indices``)."""
    rng = np.random.default_rng([seed, epoch])
    order = np.arange(n) if classes is None else balanced_indices(classes, mode, rng, target)
    order = rng.permutation(order)
    if exclude is not None and len(exclude):
        order = order[~np.isin(order, exclude)]
    per_rank = -(-len(order) // world)
    order = np.resize(order, per_rank * world)  # repeats from the start, as DistributedSampler pads
    return order[rank::world]


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split an order into batches (the last may be short)."""
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class EpochBatches:
    """A batch sampler over ``order``, which the trainer sets before each epoch: one DataLoader (and
    its worker processes) then serves every epoch. The loader reads the order when an epoch's
    iteration starts."""

    def __init__(self, batch_size: int):
        self.batch_size, self.order = batch_size, np.empty(0, dtype=np.int64)

    def __iter__(self):
        return iter(batches(self.order, self.batch_size))

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)
