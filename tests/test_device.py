"""Device placement, caught on the CPU: steps run on tensors on PyTorch's ``meta`` device raise on
any CPU-made tensor they meet ("Tensor on device meta is not on the expected device cpu!"), as a
CUDA step would on a GPU. Code with data-dependent steps (unique, nonzero), which meta tensors
cannot run, is checked instead by a guard that refuses tensor factories called without a device."""
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from retrieval.data.datasets import Targets
from retrieval.data.images import augment_batch, normalize_batch
from retrieval.evaluate.metrics import _topk_block
from retrieval.net.colour import colour_histogram
from retrieval.net.model import create_model, foreground_weights
from retrieval.net.trunkcache import frozen_outputs
from retrieval.train.config import CachedForward, TrainConfig
from retrieval.train.loop import TrainState, batch_loss
from retrieval.train.losses import label_weights, multi_group_loss, overlap_contrastive_loss, range_loss

META = torch.device("meta")
GROUPS = {"colour": ["red", "blue", "green"], "type": ["dress", "shirt"]}


def test_augment_batch_stays_on_the_batch_device():
    batch = torch.empty(4, 40, 30, 3, dtype=torch.uint8, device=META)
    out = augment_batch(batch)
    assert out.device == META and out.shape == batch.shape and out.dtype == torch.uint8
    # a CPU generator (reproducible draws) still gives a batch on the batch's device
    assert augment_batch(batch, torch.Generator().manual_seed(0)).device == META
    assert normalize_batch(out).device == META


def test_augment_batch_flips_and_crops_within_the_padding():
    gen = torch.Generator().manual_seed(0)
    batch = torch.arange(2 * 6 * 6 * 3, dtype=torch.float32).remainder(251).to(torch.uint8).view(2, 6, 6, 3)
    out = augment_batch(batch, gen, pad=0)  # no padding: only the flip remains
    for i in range(2):
        assert torch.equal(out[i], batch[i]) or torch.equal(out[i], batch[i].flip(1))


def test_colour_histogram_and_foreground_weights_on_meta():
    x = torch.empty(2, 3, 32, 32, device=META)
    w = foreground_weights(x)
    assert w.device == META
    assert colour_histogram(x, (4, 6, 6), w).shape == (2, 144)


@pytest.mark.parametrize("method", ["multi-weight", "multi-label"])
def test_model_forward_and_group_vectors_on_meta(method):
    model = create_model("tiny", GROUPS, embed_dim=16, method=method, multi_label_groups=["colour"],
                         colour_bins="4,6,6", pool_weighting="foreground", normalized_heads=True,
                         embed_hidden=32, flip_average=True, weights="none").to(META)
    x = torch.empty(3, 3, 32, 32, device=META).contiguous(memory_format=torch.channels_last)
    emb = model.forward_features(x)
    logits = model.forward_heads(emb)
    vectors = {g: model.probabilities(g, z) for g, z in logits.items()}
    assert emb.device == META and all(v.device == META for v in vectors.values())


@pytest.mark.parametrize("weighting,pooling", [("border", "foreground"), ("learned", "foreground"),
                                               ("learned", "learned")])
@pytest.mark.parametrize("start", [2, 3, 4])
def test_trunk_cache_step_and_cached_forward_on_meta(weighting, pooling, start):
    model = create_model("tiny", GROUPS, embed_dim=16, colour_bins="4,6,6", pool_weighting=pooling,
                         colour_weighting=weighting, multi_label_groups=["colour"], weights="none").to(META).eval()
    x = torch.empty(2, 3, 32, 32, device=META)
    prefix, act, weight = frozen_outputs(model, x, start)
    emb, logits, attended = CachedForward(model, start)(prefix, act, weight)
    assert emb.device == META and logits["type"].shape == (2, 2)
    # the learned weighting's cells give the multi-label group label attention
    assert {g: z.device for g, z in attended.items()} == ({"colour": META} if weighting == "learned" else {})
    assert model.forward_features(x).device == META
    assert all(z.device == META for z in model(x)[2].values())


def test_training_step_on_meta(demo_catalog, tmp_path):
    # the trainer's own loss (both logit scales, contrastive term, head fit, per-label weights, early
    # learning) and backward
    from retrieval.train.trainer import Job

    cfg = TrainConfig(catalog=str(demo_catalog), out=str(tmp_path), backbone="tiny", image_size=32,
                      device="cpu", contrastive=0.1, weighting="label", head_fit=1.0, early_learning=3.0)
    job = Job(cfg)
    job.model.to(META)
    job.device = META
    job.class_weights = {g: w.to(META) for g, w in job.class_weights.items()}
    job.early_learning.targets = {g: t.to(META) for g, t in job.early_learning.targets.items()}  # made on cfg.device
    # the softmax groups' early targets are balanced by default (--early-learning-balance 0.5)
    assert sorted(job.early_learning.divisors) == sorted(set(job.catalog.groups) - {"colours"})
    job.early_learning.divisors = {g: d.to(META) for g, d in job.early_learning.divisors.items()}
    positions = torch.arange(8)
    x = torch.empty(8, 3, 32, 32, device=META)
    prefix, act, weight = frozen_outputs(job.model, x, 2)
    net = CachedForward(job.model, 2).train()
    state = TrainState(job.model, net, net, None, None, META, job.loss_settings(), start=2)
    loss, parts, logits, emb = batch_loss(state, net, (prefix, act, weight), job.targets.take(positions).to(META),
                                          positions)
    loss.backward()
    assert loss.device == META and set(parts) == set(job.catalog.groups)
    assert job.model.attended_groups == ["colours"] and logits["colours"].device == META  # label attention's


def test_losses_on_meta():
    items = 6
    y = {"colour": torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float32),
         "type": torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0], [0, 1], [1, 0]], dtype=torch.float32)}
    targets = Targets({g: t.to(META) for g, t in y.items()}, {g: (t.sum(1) > 0).to(META) for g, t in y.items()})
    logits = {g: torch.empty(items, t.shape[1], device=META, requires_grad=True) for g, t in y.items()}
    cw = {g: w.to(META) for g, w in label_weights({g: t.sum(0) for g, t in y.items()}).items()}
    for kind in ("ce", "bce"):
        total, parts = multi_group_loss(logits, targets, {"colour": "bce", "type": kind}, {"colour": 1.0, "type": 0.5}, cw)
        assert total.device == META
    emb = torch.empty(items, 8, device=META)
    assert overlap_contrastive_loss(emb, targets, {"colour": 1.0, "type": 1.0}).device == META


class RequireDevice(TorchFunctionMode):
    """Fails any tensor factory called without ``device=``: inside a step that would be a CPU tensor."""

    FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.rand, torch.randn,
                 torch.randint, torch.tensor, torch.eye, torch.triu_indices, torch.tril_indices, torch.linspace,
                 torch.randperm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and "device" not in kwargs:
            raise AssertionError(f"torch.{func.__name__} called without a device")
        return func(*args, **kwargs)


def test_guard_catches_a_factory_without_device():
    with pytest.raises(AssertionError, match="torch.arange called without a device"), RequireDevice():
        torch.arange(3)


def test_range_loss_and_topk_create_tensors_on_their_inputs_device():
    emb = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, -1, 0, 1, 2, 2])
    with RequireDevice():
        loss, intra, inter = range_loss(emb, labels)
        vals, idx = _topk_block(emb, 0, 12, 3)
    assert torch.isfinite(loss) and idx.shape == (12, 3)


def test_augment_and_normalize_create_tensors_on_the_batch_device():
    with RequireDevice():
        normalize_batch(augment_batch(torch.zeros(2, 8, 8, 3, dtype=torch.uint8, device="cpu")))


def test_sampling_works_on_host_arrays():
    # epoch orders are numpy on the host by design (they index host-side targets and datasets)
    from retrieval.train.sampling import epoch_order

    order = epoch_order(10, 0, 0, rank=1, world=2, exclude=np.array([3, 4]))
    assert len(order) == 4 and not set(order.tolist()) & {3, 4}


def test_one_device_rule_for_every_command():
    from retrieval.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="choose one of: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        for choice in ("cuda", "cuda:1"):  # both spellings understood, refused for want of a GPU
            with pytest.raises(ValueError, match="no CUDA device is available; use --device cpu"):
                resolve_device(choice)
