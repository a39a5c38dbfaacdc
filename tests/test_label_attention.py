"""Label attention: multi-label groups scored from the trunk's cells, each label attending to its own."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.data.datasets import Targets
from retrieval.embed.inference import outputs_from_pooled
from retrieval.net.model import (LABEL_ATTENTION_SHARPNESS, LABEL_ATTENTION_WEIGHT, RetrievalModel, create_model,
                                 fingerprint, model_from_config)
from retrieval.net.trunkcache import frozen_outputs
from retrieval.train.loop import LossSettings, TrainState, batch_loss

GROUPS = {"colour": ["red", "blue", "green"], "type": ["dress", "shirt"]}
BINS = 48  # 3 x 4 x 4


def attended_model(**options) -> RetrievalModel:
    options = {"colour_bins": "3,4,4", "multi_label_groups": ["colour"], **options}
    return create_model("tiny", GROUPS, embed_dim=8, weights="none", **options)


def test_multi_label_groups_get_label_attention_where_the_cells_are():
    model = attended_model()
    assert model.attended_groups == ["colour"] and model.label_sizes == [3]
    # per cell: its colour histogram, its log mass and the map's channels
    assert (model.label_head.in_channels, model.label_head.out_channels) == (BINS + 1 + 32, 3)
    for options in ({"label_attention": False}, {"colour_weighting": "border"}, {"colour_bins": "none"},
                    {"method": "multi-label"}, {"multi_label_groups": []}):
        other = attended_model(**options)
        assert other.attended_groups == [] and not hasattr(other, "label_head"), options
        assert other.pooled_features(torch.randn(1, 3, 32, 32)).shape[1] == other.feature_dim


def test_cell_features_hand_worked():
    cells = torch.tensor([[[0.3, 0.0], [0.1, 0.0]]])  # 2 bins x 2 cells: the second cell holds nothing
    cmap = torch.tensor([[[3.0, 0.0], [4.0, 0.0]]])  # 2 channels x 2 cells
    expected = torch.tensor([[math.sqrt(0.75), 0.0], [math.sqrt(0.25), 0.0], [math.log1p(40.0), 0.0],
                             [0.6, 0.0], [0.8, 0.0]])
    assert torch.allclose(RetrievalModel.cell_features(cells, cmap)[0], expected, atol=1e-6)
    # a map as NChw gives the same
    assert torch.equal(RetrievalModel.cell_features(cells, cmap.view(1, 2, 1, 2)),
                       RetrievalModel.cell_features(cells, cmap))


def test_label_logit_is_its_mean_cell_score_plus_its_attended_score():
    model = attended_model().eval()
    with torch.no_grad():
        model.label_head.weight.zero_()
        model.label_head.bias.zero_()
        model.label_head.weight[0, BINS] = 1.0  # red scores each cell by its log colour mass
        model.label_head.bias[1] = 0.5  # blue scores every cell 0.5; green 0
    masses = [0.0, 0.01, 0.02, 0.05]
    cells = torch.zeros(1, BINS, 4)
    cells[0, 7] = torch.tensor(masses)
    z = model._label_scores(cells, torch.rand(1, 32, 4))[0]
    s = [math.log1p(100 * m) for m in masses]  # 0, log 2, log 3, log 6
    share = [math.exp(LABEL_ATTENTION_SHARPNESS * v) for v in s]
    red = sum(s) / 4 + LABEL_ATTENTION_WEIGHT * sum(w * v for w, v in zip(share, s)) / sum(share)
    assert z.tolist() == pytest.approx([red, 0.5 * (1 + LABEL_ATTENTION_WEIGHT), 0.0], rel=1e-5)


@pytest.mark.parametrize("pooling", ["none", "learned", "map"])
def test_label_logits_are_the_same_from_images_and_from_the_cache(pooling):
    torch.manual_seed(0)
    model = attended_model(pool_weighting=pooling).eval()
    torch.nn.init.normal_(model.label_head.weight)
    x = torch.randn(2, 3, 64, 64)
    direct = model.pooled_features(x)
    assert direct.shape == (2, model.feature_dim + 3)
    for start in range(1, len(model.trunk) + 1):  # the map from units still trained, or from the cache
        prefix, act, weight = frozen_outputs(model, x, start=start)
        assert torch.allclose(model.pooled_features(act, start, prefix, weight), direct, atol=1e-4), start


def test_scores_take_label_attention_and_the_embedding_ignores_it():
    torch.manual_seed(0)
    model = attended_model().eval()
    x = torch.randn(2, 3, 64, 64)
    before = model.view_features(x)
    torch.nn.init.normal_(model.label_head.weight)
    pooled = model.view_features(x).detach()
    fd = model.feature_dim
    assert torch.equal(pooled[:, :fd], before[:, :fd]) and not torch.allclose(pooled[:, fd:], before[:, fd:])
    # the mirror view's logits are averaged in, as its features are
    both = (model.pooled_features(x) + model.pooled_features(x.flip(3))) / 2
    assert torch.allclose(pooled, both, atol=1e-6)
    emb = model.embed_pooled(pooled)
    assert torch.equal(emb, F.normalize(model.embed(pooled[:, :fd]), dim=1))
    logits = model.group_logits(emb, pooled)
    assert list(logits) == ["colour", "type"]
    assert torch.equal(logits["colour"], pooled[:, fd:]) and torch.equal(logits["type"], model.forward_heads(emb)["type"])
    out = outputs_from_pooled(model, pooled, np.arange(2))
    np.testing.assert_allclose(out.probs["colour"], torch.sigmoid(pooled[:, fd:]).numpy(), rtol=1e-6)
    _, heads, attended = model(x)
    assert set(heads) == {"colour", "type"} and set(attended) == {"colour"}


def test_several_multi_label_groups_share_one_label_head_each_with_its_own_labels():
    """Catalogues with several multi-label groups (colour and pattern, say): one 1x1 layer scores every
    attended group's labels, split back in the catalogue's group order, whatever order they were named."""
    model = attended_model(multi_label_groups=["type", "colour"]).eval()
    assert model.attended_groups == ["colour", "type"] and model.label_sizes == [3, 2]
    assert model.label_head.out_channels == 5
    with torch.no_grad():
        model.label_head.weight.zero_()
        model.label_head.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))  # every cell scores its bias
    pooled = model.view_features(torch.randn(2, 3, 64, 64))
    logits = model.group_logits(model.embed_pooled(pooled), pooled)
    scale = 1 + LABEL_ATTENTION_WEIGHT  # a label scoring every cell alike: mean + weight x the same score
    assert torch.allclose(logits["colour"], scale * torch.tensor([[1.0, 2.0, 3.0]] * 2))
    assert torch.allclose(logits["type"], scale * torch.tensor([[4.0, 5.0]] * 2))
    _, heads, attended = model(torch.randn(2, 3, 64, 64))
    assert list(attended) == ["colour", "type"] and [z.shape[1] for z in attended.values()] == [3, 2]


def test_label_head_round_trips_and_older_checkpoints_have_none():
    model = attended_model()
    torch.nn.init.normal_(model.label_head.weight)
    rebuilt = model_from_config(model.config.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    assert fingerprint(rebuilt) == fingerprint(model)
    old = model_from_config({k: v for k, v in model.config.to_dict().items() if k != "label_attention"})
    assert old.attended_groups == [] and "label_head.weight" not in old.state_dict()


def test_label_head_learns_at_its_own_rate():
    from retrieval.train.config import LABEL_HEAD_LR_SCALE, TrainConfig, make_optimizer

    model = attended_model()
    groups = make_optimizer(model, TrainConfig(catalog="C", out="R", lr=0.002)).param_groups
    label = [g for g in groups if any(p is model.label_head.weight for p in g["params"])]
    assert len(label) == 1 and label[0]["lr"] == pytest.approx(0.002 * LABEL_HEAD_LR_SCALE)
    assert {id(p) for p in label[0]["params"]} == {id(model.label_head.weight), id(model.label_head.bias)}
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


def _bce(z: float, y: float) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


@pytest.mark.parametrize("head_fit", [0.0, 2.0])
def test_label_attention_learns_on_its_own_with_the_balanced_and_item_losses(head_fit):
    # the attended logits add the balanced loss (mean over an item's positive labels plus mean over its
    # negative ones) and head_fit x the item loss (summed over labels), over the labelled items, with no
    # group weight; the heads, embedding and trunk get exactly the gradients they get without it
    torch.manual_seed(0)
    model = attended_model().eval()
    plain = attended_model(label_attention=False).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("label_head.")})
    colours = [[0, 1], None, [2]]
    multi_hot = {"colour": torch.tensor([[1.0, 1, 0], [0, 0, 0], [0, 0, 1]]),
                 "type": torch.tensor([[1.0, 0], [0, 1], [0, 1]])}
    targets = Targets(multi_hot, {g: t.sum(1) > 0 for g, t in multi_hot.items()})
    settings = LossSettings({"type": "ce", "colour": "bce"}, {"type": 1.0, "colour": 0.5}, norm="balanced",
                            head_fit=head_fit)
    x = torch.randn(3, 3, 64, 64)
    runs = {}
    for name, net in (("attended", model), ("plain", plain)):
        net.zero_grad()
        state = TrainState(net, net, net, None, None, torch.device("cpu"), settings, progress=False)
        total, parts, logits, _ = batch_loss(state, net, x, targets)
        total.backward()
        runs[name] = total.item(), logits, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    z = runs["attended"][1]["colour"].detach()
    balanced = item = 0.0
    for i, labels in enumerate(colours):
        if labels is None:
            continue
        losses = [_bce(z[i, j].item(), float(j in labels)) for j in range(3)]
        pos = [v for j, v in enumerate(losses) if j in labels]
        neg = [v for j, v in enumerate(losses) if j not in labels]
        balanced += sum(pos) / len(pos) + sum(neg) / len(neg)
        item += sum(losses)
    assert runs["attended"][0] - runs["plain"][0] == pytest.approx((balanced + head_fit * item) / 2, rel=1e-4)
    grads, plain_grads = runs["attended"][2], runs["plain"][2]
    assert grads["label_head.weight"].abs().sum() > 0
    assert set(grads) - set(plain_grads) == {"label_head.weight", "label_head.bias"}
    assert all(torch.allclose(grads[n], g, atol=1e-6) for n, g in plain_grads.items())


def test_label_attention_benchmark_prints_both_models(capsys, tmp_path):
    """scripts/bench_label_attention.py end to end on the tiny trunk, with a catalogue's own groups."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_label_attention

    (tmp_path / "labels.csv").write_text("image,split,colour,type\na.jpg,train,red|blue,dress\nb.jpg,test,green,shirt\n")
    assert bench_label_attention.main(["--catalog", str(tmp_path), "--backbone", "tiny", "--batch-size", "2",
                                       "--steps", "1", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "label head" in out and "(colour)" in out
    rows = [line for line in out.splitlines() if line.startswith("| with")]
    assert len(rows) == 2 and rows[0].startswith("| without label attention") and rows[0].endswith("| 1.00x |")
    with pytest.raises(SystemExit, match="no multi-label group"):
        (tmp_path / "labels.csv").write_text("image,split,colour\na.jpg,train,red\n")
        bench_label_attention.main(["--catalog", str(tmp_path), "--backbone", "tiny", "--steps", "1", "--rounds", "1"])
