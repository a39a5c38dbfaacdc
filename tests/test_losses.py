"""Loss weights on hand-worked numbers, masking of unknown labels, Range loss on hand-worked batches."""
import math

import pytest
import torch

from retrieval.data.datasets import Targets
from retrieval.train.losses import (EarlyLearning, attention_key, balancing_divisors, group_weights, label_weights, masked_group_loss, multi_group_loss,
                                    range_loss, resolve_group_loss, smoothed_weights)


def test_smoothed_weights_hand_worked():
    # r = [1, .5, .1, .02]; mean(r) = 0.405; floor = 0.405 / 3 = 0.135
    assert smoothed_weights([100, 50, 10, 2]) == pytest.approx([1.0, 0.5, 0.135, 0.135])
    # c = 1: floor = mean(r) = 0.405 lifts .1 and .02 and leaves .5
    assert smoothed_weights([100, 50, 10, 2], c=1) == pytest.approx([1.0, 0.5, 0.405, 0.405])
    assert smoothed_weights([7, 7]) == [1.0, 1.0]


def test_group_weights_per_method():
    counts = {"a": 100, "b": 50, "c": 10, "d": 2}
    assert group_weights("multi-weight", counts) == pytest.approx({"a": 1, "b": 0.5, "c": 0.135, "d": 0.135})
    assert group_weights("multi-task", counts) == {g: 1.0 for g in counts}


def test_label_weights_apply_within_each_group():
    w = label_weights({"g": torch.tensor([10.0, 5.0, 1.0])})
    # r = [1, .5, .1]; floor = (1.6 / 3) / 3 = 0.1778
    assert w["g"].tolist() == pytest.approx([1.0, 0.5, 1.6 / 9])


def test_resolve_group_loss():
    assert resolve_group_loss("auto", "colour", ["colour"], "multi-weight") == "bce"
    assert resolve_group_loss("auto", "type", ["colour"], "multi-weight") == "ce"
    assert resolve_group_loss("ce", "type", [], "multi-label") == "bce"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_group_loss("focal", "type", [], "multi-task")


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_unknown_labels_contribute_nothing(kind):
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
    known = y.sum(1) > 0
    loss = masked_group_loss(logits, y, known, kind)
    loss.backward()
    assert logits.grad[~known].abs().sum() == 0
    other = logits.detach().clone()
    other[~known] = 100.0  # whatever the model says about unlabelled items
    assert masked_group_loss(other, y, known, kind) == pytest.approx(loss.item())
    expected = (torch.nn.functional.cross_entropy(logits[known], y[known].argmax(1)) if kind == "ce" else
                torch.nn.functional.binary_cross_entropy_with_logits(logits[known], y[known]))
    assert loss.item() == pytest.approx(expected.item())


def test_group_with_no_labels_in_batch_is_zero_but_connected():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = masked_group_loss(logits, torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool), "ce")
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None


def test_multi_group_loss_is_weighted_sum():
    y = {"a": torch.tensor([[1.0, 0]]), "b": torch.tensor([[0.0, 1]])}
    t = Targets(y, {g: torch.tensor([True]) for g in y})
    logits = {"a": torch.tensor([[0.0, 0.0]]), "b": torch.tensor([[0.0, 0.0]])}
    total, parts = multi_group_loss(logits, t, {"a": "ce", "b": "ce"}, {"a": 1.0, "b": 0.25})
    assert parts["a"].item() == pytest.approx(math.log(2))
    assert total.item() == pytest.approx(1.25 * math.log(2))


def test_range_loss_hand_worked():
    # class 0: points (0,0), (3,0), (0,4): pairwise distances 3, 4, 5; k=2 largest 5, 4
    #   harmonic mean = 2 / (1/5 + 1/4) = 40/9
    # class 1: one point (10, 0): no intra term
    # centres: (1, 4/3) and (10, 0): distance sqrt(81 + 16/9) > m = 1, so inter = 0
    emb = torch.tensor([[0.0, 0], [3, 0], [0, 4], [10, 0], [5, 5]])
    labels = torch.tensor([0, 0, 0, 1, -1])  # -1: unlabelled, ignored
    loss, intra, inter = range_loss(emb, labels)
    assert intra.item() == pytest.approx(40 / 9)
    assert inter.item() == 0
    assert loss.item() == pytest.approx(40 / 9)


def test_range_loss_inter_margin():
    # two classes with two points each; centres (0, 0.1) and (0.3, 0.1): distance 0.3 -> 1 - 0.3
    emb = torch.tensor([[0.0, 0], [0, 0.2], [0.3, 0], [0.3, 0.2]])
    loss, intra, inter = range_loss(emb, torch.tensor([0, 0, 1, 1]), margin=1.0)
    assert inter.item() == pytest.approx(0.7)
    # each class has one pair at distance 0.2: harmonic mean of one value = the value
    assert intra.item() == pytest.approx(0.4)
    assert loss.item() == pytest.approx(1.1)


def test_label_overlap_contrastive_hand_worked():
    from retrieval.train.losses import label_overlap_targets, overlap_contrastive_loss

    # item 0: (A, X), item 1: (A, Y), item 2: (B, Y); item 3 unlabelled in g2
    t = Targets({"g1": torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]),
                 "g2": torch.tensor([[1.0, 0], [0, 1], [0, 1], [0, 0]])},
                {"g1": torch.tensor([True, True, True, True]), "g2": torch.tensor([True, True, True, False])})
    agreement = label_overlap_targets(t, {"g1": 1.0, "g2": 1.0})
    # (0,1): share g1 only -> 1/2; (1,2): g2 only -> 1/2; (0,2): none; (2,3): g1 only, g2 unknown on 3 -> 1
    assert agreement[0, 1].item() == pytest.approx(0.5) and agreement[1, 2].item() == pytest.approx(0.5)
    assert agreement[0, 2].item() == 0 and agreement[2, 3].item() == pytest.approx(1.0)
    # orthogonal embeddings: every other item gets softmax 1/3, so each row's loss is log 3
    loss = overlap_contrastive_loss(torch.eye(4), t, {"g1": 1.0, "g2": 1.0})
    assert loss.item() == pytest.approx(math.log(3))
    # descending it brings agreeing items together: item 2 ends nearer 3 (agreement 1) than 0 (0)
    free = torch.eye(4, requires_grad=True)
    optimizer = torch.optim.SGD([free], lr=0.5)
    for _ in range(50):
        optimizer.zero_grad()
        emb = torch.nn.functional.normalize(free, dim=1)
        overlap_contrastive_loss(emb, t, {"g1": 1.0, "g2": 1.0}).backward()
        optimizer.step()
    emb = torch.nn.functional.normalize(free.detach(), dim=1)
    assert overlap_contrastive_loss(emb, t, {"g1": 1.0, "g2": 1.0}).item() < loss.item()
    assert emb[2] @ emb[3] > emb[2] @ emb[0]


def test_label_smoothing_hand_worked():
    # 4 labels, target label 0, logits equal: log_softmax = -log 4 everywhere, so any target costs log 4
    z = torch.zeros(1, 4)
    y = torch.tensor([[1.0, 0, 0, 0]])
    known = torch.tensor([True])
    assert masked_group_loss(z, y, known, "ce", smoothing=0.2).item() == pytest.approx(math.log(4))
    # logits [2, 0, 0, 0]: log p = [2 - L, -L, -L, -L] with L = log(e^2 + 3);
    # smoothed target [0.85, 0.05, 0.05, 0.05] costs L - 0.85 * 2
    z = torch.tensor([[2.0, 0, 0, 0]])
    expected = math.log(math.exp(2) + 3) - 0.85 * 2
    assert masked_group_loss(z, y, known, "ce", smoothing=0.2).item() == pytest.approx(expected, rel=1e-6)
    assert masked_group_loss(z, y, known, "ce").item() == pytest.approx(math.log(math.exp(2) + 3) - 2, rel=1e-6)


def test_batch_normalisation_sums_over_labels_and_averages_over_the_batch():
    # 4 items, 2 labelled; zero logits: every sigmoid entry costs log 2, every softmax item log 3
    y = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
    known = y.sum(1) > 0
    z = torch.zeros(4, 3)
    # Li et al. Eq. 1: (2 items x 3 labels x log 2) / 4 items in the batch
    assert masked_group_loss(z, y, known, "bce", norm="batch").item() == pytest.approx(6 * math.log(2) / 4)
    assert masked_group_loss(z, y, known, "bce").item() == pytest.approx(math.log(2))  # mean over 2 x 3 entries
    assert masked_group_loss(z, y, known, "ce", norm="batch").item() == pytest.approx(2 * math.log(3) / 4)
    # item: summed over the 3 sigmoid labels, averaged over the 2 labelled items; softmax as labelled
    assert masked_group_loss(z, y, known, "bce", norm="item").item() == pytest.approx(3 * math.log(2))
    assert masked_group_loss(z, y, known, "ce", norm="item").item() == pytest.approx(math.log(3))
    weights = torch.tensor([1.0, 2.0, 3.0])  # per-label weights: their mean takes the place of 1 per label
    assert masked_group_loss(z, y, known, "bce", weights, norm="item").item() == pytest.approx(3 * math.log(2))
    # balanced: per item, mean over its positive labels plus mean over its negatives: 2 log 2
    assert masked_group_loss(z, y, known, "bce", norm="balanced").item() == pytest.approx(2 * math.log(2))
    z = torch.tensor([[2.0, 0, 0], [0, 0, 0], [0, 0, -1], [0, 0, 0]])
    # item 0: positive costs log(1 + e^-2), negatives log 2 each; item 2: positive log 2, negatives log 2, log(1 + e^-1)
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(2) + (math.log(2) + math.log(1 + math.exp(-1))) / 2) / 2
    assert masked_group_loss(z, y, known, "bce", norm="balanced").item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="choose one of: auto, labelled, item, balanced, batch"):
        masked_group_loss(z, y, known, "bce", norm="mean")


def test_range_loss_on_squared_distances():
    # class 0: (0,0), (2,0): one pair at 2 (squared 4); class 1: (1, 0.5) alone
    # centres (1, 0) and (1, 0.5): distance 0.5 (squared 0.25); margin 1
    emb = torch.tensor([[0.0, 0], [2, 0], [1, 0.5]])
    labels = torch.tensor([0, 0, 1])
    _, intra, inter = range_loss(emb, labels)
    assert (intra.item(), inter.item()) == pytest.approx((2.0, 0.5))
    loss, intra, inter = range_loss(emb, labels, distance="squared")
    assert (intra.item(), inter.item(), loss.item()) == pytest.approx((4.0, 0.75, 4.75))
    with pytest.raises(ValueError, match="choose one of: l2, squared"):
        range_loss(emb, labels, distance="cosine")


def test_auto_norm_is_balanced_for_per_group_heads_and_labelled_for_the_multi_label_baseline():
    from retrieval.train.losses import resolve_loss_norm
    assert resolve_loss_norm("auto", "multi-weight") == resolve_loss_norm("auto", "multi-task") == "balanced"
    assert resolve_loss_norm("auto", "multi-label") == "labelled"
    assert resolve_loss_norm("batch", "multi-weight") == "batch"


def test_early_learning_hand_worked():
    # one softmax group of 2 labels, 3 training items, momentum 0.5, group weight 0.5, weight 2.
    # Batch = items 0 and 2 with logits [0, 0] and [ln 3, 0]: p = [.5, .5] and [.75, .25].
    # Step 1: t = 0.5 x 0 + 0.5 p = [.25, .25], [.375, .125]; <p, t> = .25 and .3125.
    # Step 2 (same logits): t = [.375, .375], [.5625, .1875]; <p, t> = .375 and .46875.
    elr = EarlyLearning({"type": 2}, 3, weight=2.0, momentum=0.5)
    logits = {"type": torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])}
    y = Targets({"type": torch.tensor([[1.0, 0], [0, 1]])}, {"type": torch.tensor([True, True])})
    positions, weights = torch.tensor([0, 2]), {"type": 0.5}
    first = elr(logits, y, positions, weights)
    assert first.item() == pytest.approx(2 * 0.5 * (math.log(0.75) + math.log(0.6875)) / 2)
    assert torch.allclose(elr.targets["type"], torch.tensor([[0.25, 0.25], [0, 0], [0.375, 0.125]]))
    second = elr(logits, y, positions, weights)
    assert second.item() == pytest.approx(0.5 * (math.log(0.625) + math.log(0.53125)))
    # an unlabelled item moves its target but adds nothing
    unknown = Targets(y.multi_hot, {"type": torch.tensor([True, False])})
    assert elr(logits, unknown, positions, weights).item() == pytest.approx(math.log(1 - 0.4375))
    # the term pulls a prediction towards its target: a step down its gradient raises <p, t>
    z = torch.tensor([[math.log(3), 0.0]], requires_grad=True)
    target = torch.tensor([[0.9, 0.1]])
    held = EarlyLearning({"type": 2}, 1, weight=1.0, momentum=0.99)
    held.targets["type"][0] = target[0]
    one = Targets({"type": torch.tensor([[0.0, 1]])}, {"type": torch.tensor([True])})
    held({"type": z}, one, torch.tensor([0]), {"type": 1.0}).backward()
    before = (torch.softmax(z.detach(), 1) * target).sum()
    assert (torch.softmax(z.detach() - 0.1 * z.grad, 1) * target).sum() > before


def test_early_learning_sigmoid_group_hand_worked():
    # one multi-label group of 2 labels held label by label, 1 item, momentum 0.5, weight 1.
    # Step 1, logits [0, 0]: p = [.5, .5], t = [.25, .25]; each label's <(p, 1-p), (t, 1-t)> = .5.
    # Step 2, logits [ln 3, -ln 3]: p = [.75, .25], t = [.5, .25]; agreements .5 and .625.
    elr = EarlyLearning({"colour": 2}, 1, weight=1.0, momentum=0.5, sigmoid={"colour"})
    y = Targets({"colour": torch.tensor([[1.0, 1.0]])}, {"colour": torch.tensor([True])})
    first = elr({"colour": torch.zeros(1, 2)}, y, torch.tensor([0]), {"colour": 1.0})
    assert first.item() == pytest.approx(math.log(0.5))
    z = torch.tensor([[math.log(3), -math.log(3)]], requires_grad=True)
    second = elr({"colour": z}, y, torch.tensor([0]), {"colour": 1.0})
    assert second.item() == pytest.approx((math.log(0.5) + math.log(0.375)) / 2)
    assert torch.allclose(elr.targets["colour"], torch.tensor([[0.5, 0.25]]))
    # the gradient pushes each label to the side of 1/2 its target is on: none at t = .5 (label 1);
    # label 2 (t = .25) down: d/dz of (1/2) log(t + p - 2tp) = (1/2) (1 - 2t) p (1 - p) / .375 = .125
    second.backward()
    assert z.grad[0, 0].abs() < 1e-6 and z.grad[0, 1].item() == pytest.approx(0.125)


def test_early_learning_holds_label_attention_beside_the_head():
    # the colour group's head and its label attention each keep a target and add a term: the head's
    # at the group weight (3), attention's at 1; step 1 from zero logits: each log(1/2)
    elr = EarlyLearning({"type": 2, "colour": 2}, 1, weight=1.0, momentum=0.5, sigmoid={"colour"},
                        attended=["colour"])
    key = attention_key("colour")
    assert sorted(elr.targets) == sorted(["type", "colour", key]) and key in elr.sigmoid
    y = Targets({"type": torch.tensor([[1.0, 0]]), "colour": torch.tensor([[1.0, 1.0]])},
                {"type": torch.tensor([False]), "colour": torch.tensor([True])})
    z = torch.tensor([[math.log(3), -math.log(3)]])
    term = elr({"type": torch.zeros(1, 2), "colour": torch.zeros(1, 2), key: z}, y, torch.tensor([0]),
               {"type": 1.0, "colour": 3.0})
    # attention's p = [.75, .25], t = p / 2 = [.375, .125]; agreements pt + (1-p)(1-t):
    # .75 * .375 + .25 * .625 = .4375 and .25 * .125 + .75 * .875 = .6875, the logs averaged
    expected = 3 * math.log(0.5) + (math.log(1 - 0.4375) + math.log(1 - 0.6875)) / 2
    assert term.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(elr.targets[key], torch.tensor([[0.375, 0.125]]))
    # a checkpoint saved before attention was held resumes, its attention targets from zero
    before = {g: t for g, t in elr.state_dict().items() if g != key}
    again = EarlyLearning({"type": 2, "colour": 2}, 1, weight=1.0, sigmoid={"colour"}, attended=["colour"])
    assert again.load_state_dict(before) == [key] and again.targets[key].abs().sum() == 0
    assert torch.equal(again.targets["colour"], elr.targets["colour"])
    with pytest.raises(ValueError, match="do not fit"):
        again.load_state_dict({"type": before["type"]})


def test_balanced_early_targets_hand_worked():
    # usage: 6 Casual, 2 Formal, 1 Sports, no Ethnic (counted as one): shares 0.6, 0.2, 0.1, 0.1; those
    # below uniform (1/4) count as uniform, so only Casual is lowered
    divisors = balancing_divisors({"usage": torch.tensor([6.0, 2, 1, 0])}, tau=1.0)
    assert divisors["usage"].tolist() == pytest.approx([0.6, 0.25, 0.25, 0.25])
    assert balancing_divisors({"usage": torch.tensor([6.0, 2, 1, 0])}, tau=0.5)["usage"].tolist() == \
        pytest.approx([0.6 ** 0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="--early-learning-balance must be 0"):
        balancing_divisors({"usage": torch.tensor([6.0, 2, 1, 0])}, tau=-0.5)
    divisors = {"usage": torch.tensor([0.75, 0.25, 0.25, 0.25])}  # given directly, for round numbers below
    elr = EarlyLearning({"usage": 4, "colour": 2}, 1, weight=1.0, momentum=0.5, sigmoid={"colour"},
                        divisors={**divisors, "colour": torch.tensor([0.9, 0.1])})
    assert set(elr.divisors) == {"usage"}  # a multi-label group's targets are never divided
    p = torch.tensor([[0.6, 0.2, 0.1, 0.1]])
    t = Targets({"usage": torch.tensor([[1.0, 0, 0, 0]]), "colour": torch.tensor([[1.0, 0]])},
                {"usage": torch.tensor([True]), "colour": torch.tensor([False])})
    term = elr({"usage": p.log(), "colour": torch.zeros(1, 2)}, t, torch.tensor([0]), {"usage": 1.0, "colour": 1.0})
    # the early prediction divided by the shares: [0.8, 0.8, 0.4, 0.4], renormalised [1/3, 1/3, 1/6, 1/6];
    # the target moves half way from zero: [1/6, 1/6, 1/12, 1/12]; <p, t> = 0.1 + 0.2/6 + 0.2/12 = 0.15
    assert elr.targets["usage"][0].tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 12, 1 / 12])
    assert term.item() == pytest.approx(math.log(0.85), rel=1e-5)
    plain = EarlyLearning({"usage": 4}, 1, weight=1.0, momentum=0.5)
    plain({"usage": p.log()}, t, torch.tensor([0]), {"usage": 1.0})
    assert plain.targets["usage"][0].tolist() == pytest.approx([0.3, 0.1, 0.05, 0.05])  # without: half of p


def test_early_learning_shares_every_ranks_new_targets():
    # two ranks, batch size 3: this one steps item 0 (p = [.5, .5]: t = .5 x p = [.25, .25]), the
    # other items 2 and 3 (their new targets arrive through gather, its padding row -1 ignored);
    # item 1, seen by neither, stays at zero
    other = {torch.int64: torch.tensor([2, 3, -1]),
             torch.float32: torch.tensor([[0.1, 0.9, 0.5], [0.6, 0.4, 0.0], [0.0, 0.0, 0.0]])}
    sent = []
    def gather(x):
        sent.append(x.clone())
        return torch.cat([x, other[x.dtype]])
    elr = EarlyLearning({"type": 2, "colour": 1}, 4, weight=1.0, momentum=0.5, gather=gather, batch_size=3)
    logits = {"type": torch.zeros(1, 2), "colour": torch.zeros(1, 1)}
    y = Targets({"type": torch.tensor([[1.0, 0]]), "colour": torch.tensor([[1.0]])},
                {"type": torch.tensor([True]), "colour": torch.tensor([True])})
    elr(logits, y, torch.tensor([0]), {"type": 1.0, "colour": 1.0})
    assert sent[0].tolist() == [0, -1, -1] and sent[1].shape == (3, 3)  # one gather each: rows, then values
    assert torch.allclose(elr.targets["type"], torch.tensor([[0.25, 0.25], [0, 0], [0.1, 0.9], [0.6, 0.4]]))
    assert torch.allclose(elr.targets["colour"], torch.tensor([[0.5], [0], [0.5], [0.0]]))
    with pytest.raises(ValueError, match="larger than the batch size"):
        elr({g: z.repeat(4, 1) for g, z in logits.items()}, Targets({g: m.repeat(4, 1) for g, m in y.multi_hot.items()},
            {g: k.repeat(4) for g, k in y.known.items()}), torch.arange(4), {"type": 1.0, "colour": 1.0})


def test_early_learning_state_round_trip_and_checks():
    elr = EarlyLearning({"type": 2, "colour": 3}, 4, weight=3.0)
    elr.targets["colour"][1] = torch.tensor([0.2, 0.3, 0.5])
    again = EarlyLearning({"type": 2, "colour": 3}, 4, weight=3.0)
    again.load_state_dict(elr.state_dict())
    assert all(torch.equal(again.targets[g], elr.targets[g]) for g in elr.targets)
    with pytest.raises(ValueError, match="do not fit"):
        EarlyLearning({"type": 2, "colour": 3}, 5, weight=3.0).load_state_dict(elr.state_dict())
    with pytest.raises(ValueError, match="momentum"):
        EarlyLearning({"type": 2}, 1, weight=1.0, momentum=1.0)
