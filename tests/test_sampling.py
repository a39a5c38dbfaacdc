"""Random over/under-sampling class counts and their sharding across ranks."""
from collections import Counter

import numpy as np
import pytest
import torch

from retrieval.train.sampling import balanced_indices, batches, epoch_order, item_classes


def test_item_classes_use_the_rarest_label():
    y = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 0, 0]])
    # label counts: 4, 1, 1 -> item 1 is class 1, item 3 class 2 (tie of 1 and 1: first), item 2 unlabelled
    assert item_classes(y).tolist() == [0, 1, -1, 2, 0]


def test_over_sampling_balances_every_class_to_the_largest():
    classes = np.array([0] * 10 + [1] * 3 + [2] * 1 + [-1] * 2)
    idx = balanced_indices(classes, "over", np.random.default_rng(0))
    counts = Counter(classes[idx].tolist())
    assert counts == {0: 10, 1: 10, 2: 10, -1: 2}
    assert set(np.flatnonzero(classes == 1)) <= set(idx.tolist())  # every original kept


def test_under_sampling_cuts_classes_to_the_median():
    classes = np.array([0] * 10 + [1] * 4 + [2] * 1 + [-1] * 2)
    idx = balanced_indices(classes, "under", np.random.default_rng(0))
    counts = Counter(classes[idx].tolist())
    assert counts == {0: 4, 1: 4, 2: 1, -1: 2}  # median class size is 4
    assert len(set(idx.tolist())) == len(idx)  # without replacement


def test_none_and_unknown_modes():
    classes = np.array([0, 0, 1])
    assert balanced_indices(classes, "none", np.random.default_rng(0)).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="choose one of: none, over, under"):
        balanced_indices(classes, "smote", np.random.default_rng(0))


def test_epoch_order_shards_like_distributed_sampler():
    classes = np.array([0] * 7 + [1] * 2)
    shards = [epoch_order(9, epoch=3, seed=1, rank=r, world=2, classes=classes, mode="over") for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 7  # 14 samples split evenly
    together = Counter(np.concatenate(shards).tolist())
    assert sum(c for i, c in together.items() if classes[i] == 1) == 7
    again = epoch_order(9, epoch=3, seed=1, rank=0, world=2, classes=classes, mode="over")
    assert again.tolist() == shards[0].tolist()  # deterministic per (seed, epoch)
    assert epoch_order(9, epoch=4, seed=1).tolist() != epoch_order(9, epoch=3, seed=1).tolist()


def test_batches_cover_the_order():
    order = np.arange(10)
    assert [b.tolist() for b in batches(order, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_under_sampling_to_min_balances_every_epoch():
    classes = np.array([0] * 9 + [1] * 5 + [2] * 3 + [-1] * 2)
    seen = set()
    for epoch in range(3):
        order = epoch_order(len(classes), epoch, seed=0, classes=classes, mode="under", target="min")
        counts = Counter(classes[order].tolist())
        assert counts == {0: 3, 1: 3, 2: 3, -1: 2}  # every class at the smallest class's size
        assert len(set(order.tolist())) == len(order)
        seen |= set(order[classes[order] == 0].tolist())
    assert len(seen) > 3  # a new draw of the large class every epoch


def test_sampling_targets_by_number_and_name():
    classes = np.array([0] * 10 + [1] * 4 + [2] * 1)
    rng = np.random.default_rng(0)
    assert Counter(classes[balanced_indices(classes, "under", rng, "2")].tolist()) == {0: 2, 1: 2, 2: 1}
    assert Counter(classes[balanced_indices(classes, "over", rng, "4")].tolist()) == {0: 10, 1: 4, 2: 4}
    assert Counter(classes[balanced_indices(classes, "under", rng, "median")].tolist()) == {0: 4, 1: 4, 2: 1}
    assert len(balanced_indices(classes, "under", rng, "max")) == len(classes)
    for bad in ("mode", "0"):
        with pytest.raises(ValueError, match="min, median, max or a positive number|positive number"):
            balanced_indices(classes, "under", rng, bad)
