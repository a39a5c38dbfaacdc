"""train_one_epoch and validate on their own: synthetic batches, no catalog, no files."""
import math
import time

import numpy as np
import pytest
import torch

from retrieval.data.catalog import Item
from retrieval.data.datasets import Targets
from retrieval.net.model import create_model
from retrieval.train.config import make_scheduler
from retrieval.train.loop import LossSettings, TrainState, batch_loss, memorising, train_one_epoch, validate

GROUPS = {"type": ["dress", "shirt", "skirt"], "colour": ["red", "blue"]}


def one_hot(rows, n):
    t = torch.zeros(len(rows), n)
    for i, c in enumerate(rows):
        if c is not None:
            t[i, c] = 1
    return t


def targets_of(type_rows, colour_rows):
    multi_hot = {"type": one_hot(type_rows, 3), "colour": one_hot(colour_rows, 2)}
    return Targets(multi_hot, {g: t.sum(1) > 0 for g, t in multi_hot.items()})


def state_for(model, net=None, start=0):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    settings = LossSettings({"type": "ce", "colour": "ce"}, {"type": 1.0, "colour": 0.5}, metric_scale=6.0)
    return TrainState(model, net or model, net or model, optimizer, make_scheduler(optimizer, 10, 1),
                      torch.device("cpu"), settings, start=start, progress=False)


def test_train_one_epoch_steps_the_trained_part_only():
    torch.manual_seed(0)
    model = create_model("tiny", GROUPS, embed_dim=8, weights="none", image_size=32)
    for p in model.trunk.units[0].parameters():
        p.requires_grad_(False)
    frozen = [p.clone() for p in model.trunk.units[0].parameters()]
    head = model.heads["0_type"].weight.clone()
    state = state_for(model, start=1)
    targets = targets_of([0, 1, 2, 0, 1, 2, None, 0], [0, 1, None, 1, 0, 0, 1, 1])
    batches = [(torch.arange(0, 4), torch.randn(4, 3, 32, 32)), (torch.arange(4, 8), torch.randn(4, 3, 32, 32))]
    record = train_one_epoch(state, batches, targets)
    assert set(record) == {"train_loss", "images_per_s", "seconds", "waiting_s", "first_step_s"}
    assert np.isfinite(record["train_loss"]) and 0 <= record["waiting_s"] <= record["seconds"]
    assert not torch.equal(model.heads["0_type"].weight, head)
    assert all(torch.equal(a, b) for a, b in zip(model.trunk.units[0].parameters(), frozen))
    assert not model.trunk.units[0].training  # frozen units keep their batch-norm statistics
    assert state.scheduler.last_epoch == 2


def test_train_one_epoch_times_the_wait_for_batches_and_the_first_step():
    torch.manual_seed(0)
    model = create_model("tiny", GROUPS, embed_dim=8, weights="none", image_size=32)
    targets = targets_of([0, 1, 2, 0, 1, 2, None, 0], [0, 1, None, 1, 0, 0, 1, 1])

    def slow_batches():  # a data path that takes 0.2 s a batch
        for start in (0, 4):
            time.sleep(0.2)
            yield torch.arange(start, start + 4), torch.randn(4, 3, 32, 32)

    record = train_one_epoch(state_for(model), slow_batches(), targets)
    assert 0.4 <= record["waiting_s"] <= record["seconds"]
    assert 0.2 <= record["first_step_s"] < record["seconds"] - 0.2  # the second batch came after the first step


class Fixed(torch.nn.Module):
    """A net that always says 'shirt', with embeddings one-hot on the true type."""

    def __init__(self, types):
        super().__init__()
        self.types = types

    def forward(self, x):
        rows = x[:, 0].long()
        emb = torch.nn.functional.one_hot(torch.as_tensor(self.types)[rows], 3).float()
        return emb, {"type": torch.tensor([[0.0, 5.0, 0.0]]).repeat(len(x), 1)}, {}


def test_validate_hand_worked():
    types = [0, 1, 1, 2, 1, 0]
    items = [Item(i, f"{i}.jpg", "train", "", {"type": (GROUPS["type"][t],)}) for i, t in enumerate(types)]
    model = create_model("tiny", {"type": GROUPS["type"]}, embed_dim=3, weights="none")
    state = state_for(model, net=Fixed(types))
    state.loss = LossSettings({"type": "ce"}, {"type": 1.0})
    targets = Targets({"type": one_hot(types, 3)}, {"type": torch.ones(6, dtype=torch.bool)})
    batches = [(torch.tensor([0, 1, 2]), torch.tensor([[0.0], [1.0], [2.0]])),
               (torch.tensor([3, 4, 5]), torch.tensor([[3.0], [4.0], [5.0]]))]
    out = validate(state, batches, targets, items, ["type"])
    assert out["val_accuracy"] == {"type": pytest.approx(3 / 6)}  # 'shirt' is right for 3 of 6
    # the embedding is the true type, so every item's same-type items come first: AP 1, except the
    # lone skirt, which has no relevant item (AP 0): 5/6
    assert out["val_map_shared"] == pytest.approx(5 / 6)
    assert out["val_map"] == pytest.approx((out["val_map_shared"] + out["val_map_group"]) / 2)
    assert validate(state, [], targets, [], ["type"]) == {}


def test_multi_label_loss_is_one_sigmoid_cross_entropy_over_all_labels():
    # Li et al.'s multi-label baseline: one sigmoid layer over the labels of every group and one
    # loss in which every label counts equally, summed over labels and averaged over the batch. An
    # item with no label in a group leaves that group's labels out: neither positive nor negative.
    torch.manual_seed(0)
    model = create_model("tiny", GROUPS, embed_dim=8, weights="none", method="multi-label").eval()
    state = state_for(model)
    state.loss = LossSettings({"type": "bce", "colour": "bce"}, {"type": 1.0, "colour": 1.0}, norm="batch",
                              multi_label_method=True)
    types, colours = [0, 2, None], [1, None, 0]  # item 1 has no colour, item 2 no type
    x = torch.randn(3, 3, 32, 32)
    total, _, logits, _ = batch_loss(state, model, x, targets_of(types, colours))
    z = model.heads["all"](model.forward_features(x, views=1) * model.config.head_scale)  # the one layer
    expected = 0.0
    for i, (t, c) in enumerate(zip(types, colours)):
        for j in range(5):  # labels 0-2: type, 3-4: colour
            given = t if j < 3 else c
            if given is None:
                continue
            y = 1.0 if j == (given if j < 3 else given + 3) else 0.0
            p = 1 / (1 + math.exp(-z[i, j].item()))
            expected -= y * math.log(p) + (1 - y) * math.log(1 - p)
    assert total.item() == pytest.approx(expected / 3, rel=1e-5)
    assert torch.equal(torch.cat([logits["type"], logits["colour"]], 1), z)


def test_step_schedule_and_sgd_with_momentum():
    from retrieval.train.config import TrainConfig, make_optimizer

    model = create_model("tiny", GROUPS, embed_dim=8, weights="none")
    cfg = TrainConfig(catalog="C", out="R", optimizer="sgd", lr=0.1, momentum=0.8)
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.8
    scheduler = make_scheduler(optimizer, 12, 0, "step", steps_per_epoch=2, lr_steps=[1, 3], gamma=0.1)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(ValueError, match="choose one of: cosine, step"):
        make_scheduler(optimizer, 12, 0, "linear")


def test_frozen_batchnorm_keeps_the_trunk_statistics_and_affine_parameters():
    torch.manual_seed(0)
    model = create_model("tiny", GROUPS, embed_dim=8, weights="none", image_size=32)
    from retrieval.train.config import freeze_units

    freeze_units(model, 0, batchnorm=True)
    bn, conv = model.trunk.units[1][1], model.trunk.units[1][0]
    before = [bn.running_mean.clone(), bn.weight.clone(), conv.weight.clone()]
    state = state_for(model)
    state.freeze_bn = True
    train_one_epoch(state, [(torch.arange(0, 4), torch.randn(4, 3, 32, 32))], targets_of([0, 1, 2, 0], [0, 1, 1, 0]))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.weight, before[1])
    assert not bn.training and not bn.weight.requires_grad
    assert not torch.equal(conv.weight, before[2])  # the convolutions still train


def test_head_fit_fits_the_sigmoid_heads_on_the_embedding_held_fixed():
    # --head-fit W adds W x the group weight x each labelled item's summed sigmoid cross-entropy
    # (item norm), computed on the detached embedding: the heads get its gradient, the embedding none
    torch.manual_seed(0)
    model = create_model("tiny", GROUPS, embed_dim=8, weights="none", multi_label_groups=["colour"],
                         label_attention=False).eval()
    kinds, weights = {"type": "ce", "colour": "bce"}, {"type": 1.0, "colour": 0.5}
    types, colours = [0, 2, 1], [[0, 1], None, [1]]
    multi_hot = {"type": one_hot(types, 3), "colour": torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])}
    targets = Targets(multi_hot, {g: t.sum(1) > 0 for g, t in multi_hot.items()})
    x = torch.randn(3, 3, 32, 32)
    grads = {}
    for fit in (0.0, 2.0):
        state = state_for(model)
        state.loss = LossSettings(kinds, weights, norm="balanced", head_fit=fit)
        model.zero_grad()
        total, _, logits, _ = batch_loss(state, model, x, targets)
        total.backward()
        grads[fit] = (total.item(), logits["colour"].detach(),
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    z = grads[2.0][1]
    expected = 0.0
    for i, labels in enumerate(colours):
        if labels is None:
            continue  # unlabelled in colour: no loss
        for j in range(2):
            y, p = float(j in labels), 1 / (1 + math.exp(-z[i, j].item()))
            expected -= y * math.log(p) + (1 - y) * math.log(1 - p)
    assert grads[2.0][0] - grads[0.0][0] == pytest.approx(2.0 * 0.5 * expected / 2, rel=1e-5)  # 2 labelled items
    with_fit, without = grads[2.0][2], grads[0.0][2]
    assert not torch.allclose(with_fit["heads.1_colour.weight"], without["heads.1_colour.weight"])
    assert torch.equal(with_fit["heads.0_type.weight"], without["heads.0_type.weight"])
    assert all(torch.allclose(with_fit[n], without[n]) for n in without if n.startswith(("embed.", "trunk.")))


def test_memorising_names_an_early_peak_or_an_early_low_in_validation_loss():
    def run(peak, epochs, low=None, end=1.0):
        low = epochs - 1 if low is None else low
        return [{"epoch": e, "train_loss": 1.0, "val_map": 0.5 - abs(e - peak) / 100,
                 "val_loss": 1.0 + (end - 1.0) * max(0, e - low) / max(1, epochs - 1 - low) + (low - e) * (e < low)}
                for e in range(epochs)]
    assert memorising(run(3, 59), 59) == "best.pt is epoch 3 of 59"  # the noisy street stand-in
    assert memorising(run(14, 59), 59) is not None and memorising(run(15, 59), 59) is None  # 59 / 4 = 14.75
    assert memorising(run(21, 30), 30) is None  # the clean product shots: best 21-45, loss lowest late
    # validation loss lowest at epoch 1 and 11% above it at the end (the noisy multicolour stand-in)
    assert memorising(run(40, 59, low=1, end=1.11), 59) == (
        "the validation loss was lowest at epoch 1 of 59 and ends 11% above it")
    assert memorising(run(40, 59, low=1, end=1.04), 59) is None  # a rise under 5%
    assert memorising(run(40, 59, low=15, end=1.5), 59) is None  # lowest after the first quarter
    assert memorising(run(3, 59)[:10], 59) is None  # unfinished (interrupted, to be resumed)
    assert memorising(run(0, 4), 4) is None  # too short to say
    by_loss = [{"epoch": e, "train_loss": 1.0, "val_loss": abs(e - 2) + 1.0} for e in range(20)]
    assert memorising(by_loss, 20, "loss") == "best.pt is epoch 2 of 20"


def test_unlearnt_groups_are_those_no_better_than_the_largest_class():
    # 40 validation items. size: largest training class "M" (3 of 5 training items) is 25 of the
    # 40 validation labels, 0.625: accuracy 0.600 at the best epoch (by val_map, epoch 1) is no
    # better; type: largest class "a" is 20 of 40, 0.5, accuracy 0.9 is; "rare" has 10 labelled
    # validation items (under 20: not judged); "price" is 0.5 at the best epoch although 0.1 at epoch 0
    from retrieval.data.datasets import Targets
    from retrieval.train.loop import unlearnt_groups

    def targets(columns, n, known=None):
        multi_hot = {g: torch.nn.functional.one_hot(torch.tensor(c), k).float() for g, (c, k) in columns.items()}
        return Targets(multi_hot, {g: torch.ones(n, dtype=torch.bool) if known is None or g not in known
                                   else known[g] for g in columns})

    # "usage": its largest class is 38 of 40 (0.95, over 0.9): accuracy cannot tell, not judged
    train = targets({"size": ([1, 1, 1, 0, 2], 3), "type": ([0, 0, 1, 1, 0], 2), "rare": ([0, 1, 1, 1, 1], 2),
                     "price": ([0, 1, 2, 2, 2], 3), "usage": ([0, 0, 0, 0, 1], 2)}, 5)
    val = targets({"size": ([1] * 25 + [0] * 15, 3), "type": ([0] * 20 + [1] * 20, 2), "rare": ([0] * 40, 2),
                   "price": ([2] * 20 + [0] * 20, 3), "usage": ([0] * 38 + [1] * 2, 2)}, 40,
                  known={"rare": torch.arange(40) < 10})
    history = [{"epoch": 0, "val_map": 0.3, "val_accuracy": {"size": 0.9, "type": 0.9, "rare": 0.0, "price": 0.1,
                                                             "usage": 0.95}},
               {"epoch": 1, "val_map": 0.4, "val_accuracy": {"size": 0.6, "type": 0.9, "rare": 0.0, "price": 0.5,
                                                             "usage": 0.95}}]
    assert unlearnt_groups(history, train, val) == {"size": (0.6, 0.625, 1), "price": (0.5, 0.5, 2)}
    assert unlearnt_groups([], train, val) == {}
