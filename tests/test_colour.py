"""The colour histogram feature: CIELAB conversion, soft binning, product weighting, cache paths."""
import json

import pytest
import torch

from conftest import TINY
from retrieval.net.checkpoint import load_model
from retrieval.cli import main as cli
from retrieval.data.catalog import read_catalog
from retrieval.net.colour import (attention_prior, attention_weights, colour_cells, colour_histogram, parse_bins,
                                  pool_cells, srgb_to_lab)
from retrieval.net.trunkcache import TrunkCache, cache_key, cache_serves, frozen_outputs
from retrieval.data.images import IMAGENET_MEAN, IMAGENET_STD
from retrieval.net.model import create_model, model_from_config

GROUPS = {"colour": ["red", "blue"], "type": ["dress", "shirt"]}


def normalised(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_srgb_to_lab_reference_colours():
    rgb = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0], [0.5, 0.5, 0.5]]).view(4, 3, 1, 1)
    lab = srgb_to_lab(rgb).view(4, 3)
    # published CIELAB (D65) values of white, black, sRGB red and mid grey
    expected = torch.tensor([[100.0, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20], [53.39, 0, 0]])
    assert torch.allclose(lab, expected, atol=0.02)


def test_soft_bins_split_between_neighbours():
    # grey L = 53.39 on 3 L-bins (centres 0, 50, 100): 1 - 3.39/50 in the middle bin, the rest above;
    # a = b = 0 is the centre bin of 3 along a and b
    grey = normalised(torch.full((1, 3, 8, 8), 0.5))
    hist = colour_histogram(grey, (3, 3, 3)).view(3, 3, 3) ** 2  # undo the square root
    assert hist[1, 1, 1].item() == pytest.approx(1 - 3.39 / 50, abs=1e-3)
    assert hist[2, 1, 1].item() == pytest.approx(3.39 / 50, abs=1e-3)
    assert hist.sum().item() == pytest.approx(1.0)


def test_weights_pick_the_product_colour():
    image = torch.ones(1, 3, 16, 16)  # white studio background
    image[:, :, 4:12, 4:12] = torch.tensor([0.0, 0, 1]).view(1, 3, 1, 1)  # a blue product
    weight = torch.zeros(1, 1, 16, 16)
    weight[:, :, 4:12, 4:12] = 1
    x = normalised(image)
    blue = colour_histogram(normalised(torch.tensor([0.0, 0, 1]).view(1, 3, 1, 1).expand(1, 3, 4, 4)), (4, 6, 6))
    assert torch.allclose(colour_histogram(x, (4, 6, 6), weight), blue, atol=1e-5)
    assert not torch.allclose(colour_histogram(x, (4, 6, 6)), blue, atol=0.1)


def test_parse_bins():
    assert parse_bins("4,6,6") == (4, 6, 6)
    assert parse_bins("none") is None and parse_bins("") is None
    with pytest.raises(ValueError, match="three counts"):
        parse_bins("4,6")


def test_model_with_histogram_pools_consistently_from_cache():
    """The histogram enters the features first, from the image or from a cached prefix alike."""
    model = create_model("tiny", GROUPS, embed_dim=8, colour_bins="3,4,4").eval()
    assert model.feature_dim == 48 + sum(model.trunk.channels[i] for i in model.taps)
    x = torch.randn(2, 3, 64, 64)
    direct = model.pooled_features(x)
    prefix, act, weight = frozen_outputs(model, x, start=2)
    assert torch.allclose(model.pooled_features(act, 2, prefix, weight), direct, atol=1e-5)
    assert torch.allclose(direct[:, :48].pow(2).sum(1), torch.ones(2))  # a Hellinger histogram


def test_cache_with_histogram_serves_models_with_and_without_it(demo_catalog, tmp_path):
    cache = tmp_path / "trunk.h5"
    cli(["train", "--catalog", str(demo_catalog), "--out", str(tmp_path / "colour"), *TINY, "--epochs", "1",
         "--colour-bins", "3,4,4", "--colour-weighting", "border", "--trunk-cache", str(cache)])
    before = cache.stat().st_mtime_ns
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(tmp_path / "plain"), *TINY, "--epochs", "1",
                "--colour-bins", "none", "--trunk-cache", str(cache)]) == 0
    assert cache.stat().st_mtime_ns == before  # reused, not rebuilt
    full = TrunkCache(cache)
    model, ckpt = load_model(tmp_path / "plain" / "last.pt")
    plain = TrunkCache(cache, model, ckpt["start_unit"])
    stem = model.trunk.channels[0]  # cached (every unit below the cut) but not tapped
    assert torch.equal(plain.prefix, full.prefix[..., 48 + stem:])
    model, ckpt = load_model(tmp_path / "colour" / "last.pt")
    assert model.config.colour_bins == "3,4,4"
    with_colour = TrunkCache(cache, model, ckpt["start_unit"]).prefix
    assert torch.equal(with_colour, torch.cat([full.prefix[..., :48], full.prefix[..., 48 + stem:]], -1))

    # a cache without the histogram cannot serve a model that needs one: it is rebuilt
    plain_cache = tmp_path / "plain.h5"
    cli(["train", "--catalog", str(demo_catalog), "--out", str(tmp_path / "p2"), *TINY, "--epochs", "1",
         "--colour-bins", "none", "--trunk-cache", str(plain_cache)])
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(tmp_path / "c2"), *TINY, "--epochs", "1",
                "--colour-bins", "3,4,4", "--colour-weighting", "border", "--trunk-cache", str(plain_cache)]) == 0
    assert TrunkCache(plain_cache).prefix.shape == full.prefix.shape


def test_histogram_stays_float32_under_autocast():
    x = normalised(torch.rand(2, 3, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hist = colour_histogram(x, (4, 6, 6))
    assert hist.dtype == torch.float32
    assert torch.allclose(hist, colour_histogram(x, (4, 6, 6)))


def test_attention_weights_peak_where_the_trunk_responds():
    act = torch.zeros(1, 4, 3, 3, requires_grad=True)
    hot = act.detach().clone()
    hot[0, :, 0, 2] = 2.0  # one cell responds on every channel, another weakly on one
    hot[0, 0, 2, 0] = 1.0
    w = attention_weights(hot, (12, 12))
    assert w.shape == (1, 1, 12, 12) and not w.requires_grad
    assert w.max().item() == pytest.approx(1.0, abs=1e-6)
    assert w[0, 0, 1, 10] > 0.9 and w[0, 0, 10, 1] < 0.01 and w[0, 0, 6, 6] < 0.01
    assert attention_weights(act, (4, 4)).abs().sum() == 0  # silence: no weight, not NaN


def test_attention_finds_the_garment_where_the_border_does_not():
    # a street-like scene: a blue garment in clutter of reds and greens, unlike its border everywhere
    torch.manual_seed(0)
    clutter = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2]])[torch.randint(0, 2, (16, 16))]
    image = clutter.permute(2, 0, 1)[None].clone()
    image[:, :, 0:8, 8:16] = torch.tensor([0.1, 0.1, 0.9]).view(1, 3, 1, 1)
    x = normalised(image)
    activation = torch.zeros(1, 8, 2, 2)
    activation[0, :, 0, 1] = 1.0  # the trunk responds at the garment
    blue = colour_histogram(normalised(torch.tensor([0.1, 0.1, 0.9]).view(1, 3, 1, 1).expand(1, 3, 4, 4)), (4, 6, 6))
    border = create_model("tiny", GROUPS, embed_dim=8, colour_bins="4,6,6", colour_weighting="border")
    attention = create_model("tiny", GROUPS, embed_dim=8, colour_bins="4,6,6", colour_weighting="attention")
    near_border = (border.colour_features(x)[0] * blue).sum()  # Bhattacharyya coefficient with pure blue
    near_attention = (attention.colour_features(x, outputs=[activation])[0] * blue).sum()
    assert near_border < 0.6 and near_attention > 0.85  # the coarse map, upsampled, bleeds a little


def test_attention_histogram_is_the_same_from_images_and_from_the_cache():
    model = create_model("tiny", GROUPS, embed_dim=8, colour_bins="3,4,4", colour_weighting="attention").eval()
    x = torch.randn(2, 3, 64, 64)
    direct = model.pooled_features(x)
    for start in (2, len(model.trunk)):  # the rest of the trunk runs for the map, or the map is at hand
        prefix, act, weight = frozen_outputs(model, x, start=start)
        assert torch.allclose(model.pooled_features(act, start, prefix, weight), direct, atol=1e-5)
    border = create_model("tiny", GROUPS, embed_dim=8, colour_bins="3,4,4", colour_weighting="border").eval()
    border.load_state_dict(model.state_dict())
    assert not torch.allclose(border.pooled_features(x)[:, :48], direct[:, :48], atol=1e-3)
    with pytest.raises(ValueError, match="border, attention, learned"):
        create_model("tiny", GROUPS, colour_weighting="saliency")


def test_caches_serve_only_the_colour_weighting_they_hold(demo_catalog, tmp_path):
    cache = tmp_path / "trunk.h5"
    common = ["--catalog", str(demo_catalog), *TINY, "--epochs", "1", "--colour-bins", "3,4,4", "--trunk-cache", str(cache)]
    assert cli(["train", "--out", str(tmp_path / "border"), *common, "--colour-weighting", "border"]) == 0
    border = TrunkCache(cache).prefix.clone()
    assert cli(["train", "--out", str(tmp_path / "attention"), *common, "--colour-weighting", "attention"]) == 0
    attention = TrunkCache(cache).prefix  # rebuilt: the histograms differ, the pooled taps do not
    assert not torch.allclose(attention[..., :48], border[..., :48], atol=1e-3)
    assert torch.equal(attention[..., 48:], border[..., 48:])
    model, _ = load_model(tmp_path / "attention" / "last.pt")
    assert model.config.colour_weighting == "attention"
    # a checkpoint or cache key from before the option existed means border weighting
    old = model_from_config({k: v for k, v in model.config.to_dict().items() if k != "colour_weighting"})
    assert old.config.colour_weighting == "border"
    stored = json.loads(cache_key(old, 4, read_catalog(demo_catalog).items))
    del stored["colour_weighting"]
    assert cache_serves(json.dumps(stored), cache_key(old, 4, read_catalog(demo_catalog).items), old, 4)
    assert not cache_serves(json.dumps(stored), cache_key(model, 4, read_catalog(demo_catalog).items), model, 4)


def test_cells_pooled_evenly_are_the_weighted_histogram():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 3, 64, 64), torch.rand(2, 1, 64, 64)
    cells = colour_cells(x, (3, 4, 4), weight, (8, 8))
    assert cells.shape == (2, 48, 64)
    assert torch.allclose(pool_cells(cells, torch.zeros(2, 64)), colour_histogram(x, (3, 4, 4), weight), atol=1e-5)
    # all the softmax on one cell: that cell's colour alone
    one = torch.full((2, 64), -1e4)
    one[:, 5] = 0
    alone = cells[:, :, 5] / cells[:, :, 5].sum(1, keepdim=True)
    assert torch.allclose(pool_cells(cells, one), alone.sqrt(), atol=1e-4)


def _learned(bins="3,4,4"):
    return create_model("tiny", GROUPS, embed_dim=8, colour_bins=bins, colour_weighting="learned", pool_weighting="none")


def test_learned_histogram_is_the_same_from_images_and_from_the_cache():
    torch.manual_seed(0)
    model = _learned().eval()
    torch.nn.init.normal_(model.colour_attention.weight)  # a trained weighting, not the prior alone
    x = torch.randn(2, 3, 64, 64)
    direct = model.pooled_features(x)
    assert direct.shape == (2, model.feature_dim) and model.colour_unit == 2
    for start in range(1, len(model.trunk) + 1):  # the map from the units still trained, or from the cache
        prefix, act, weight = frozen_outputs(model, x, start=start)
        cells = 48 * 8 * 8
        assert prefix.shape[1] == cells + (32 * 8 * 8 if start > 2 else 0) + sum(model.trunk.channels[t] for t in
                                                                                   model.taps if t < start)
        assert torch.allclose(model.pooled_features(act, start, prefix, weight), direct, atol=1e-5)


def test_learned_weighting_starts_as_the_attention_prior_and_learns_where_the_garment_is():
    torch.manual_seed(0)
    model = _learned("4,6,6")
    cells = torch.zeros(1, 144, 4)
    red = colour_histogram(normalised(torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1).expand(1, 3, 4, 4)), (4, 6, 6))
    blue = colour_histogram(normalised(torch.tensor([0.1, 0.1, 0.9]).view(1, 3, 1, 1).expand(1, 3, 4, 4)), (4, 6, 6))
    cells[0, :, :3] = (red ** 2).T  # clutter in three cells, the garment in the fourth
    cells[0, :, 3] = blue[0] ** 2
    cmap = torch.zeros(1, 32, 4)
    cmap[0, 0] = 1.0  # every cell responds alike on channel 0 (the prior is uniform)...
    cmap[0, 5, 3] = 1.0  # ...and channel 5 marks the garment
    start = model.pool_colour(cells, cmap)[0]
    assert torch.allclose(start, pool_cells(cells, attention_prior(cmap)), atol=1e-6)
    optimiser = torch.optim.SGD(model.colour_attention.parameters(), lr=1.0)
    for _ in range(50):  # a colour label (blue) is all it learns from
        loss = -(model.pool_colour(cells, cmap)[0] * blue).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    score = model.colour_attention(cmap.transpose(1, 2)).squeeze(2)
    share = torch.softmax(attention_prior(cmap) + score, 1)[0]
    assert share[3] > 0.95  # from 0.25: the garment's cell
    assert (start * blue).sum() < (model.pool_colour(cells, cmap)[0] * blue).sum() - 0.05


def test_learned_weighting_trains_and_embeds_from_the_cache(demo_catalog, tmp_path):
    cache = tmp_path / "trunk.h5"
    run = tmp_path / "learned"
    assert cli(["train", "--catalog", str(demo_catalog), *TINY, "--epochs", "2", "--colour-bins", "3,4,4",
                "--colour-weighting", "learned", "--trunk-cache", str(cache), "--out", str(run)]) == 0
    model, _ = load_model(run / "last.pt")
    assert model.config.colour_weighting == "learned" and model.colour_attention.weight.abs().sum() > 0
    assert model.config.pool_weighting == "map"  # a frozen, cached trunk: auto pools the cached map
    assert model.attended_groups == ["colours"] and model.label_head.weight.abs().sum() > 0  # label attention
    for source in (["--trunk-cache", str(cache)], []):  # the same vectors from the cache as from the images
        assert cli(["embed", "--checkpoint", str(run / "last.pt"), "--catalog", str(demo_catalog),
                    "--out", str(tmp_path / f"emb{len(source)}.h5"), *source]) == 0
    import h5py
    with h5py.File(tmp_path / "emb2.h5") as a, h5py.File(tmp_path / "emb0.h5") as b:
        assert torch.allclose(torch.from_numpy(a["vectors"][:]), torch.from_numpy(b["vectors"][:]), atol=1e-3)
        assert torch.allclose(torch.from_numpy(a["probs/colours"][:]), torch.from_numpy(b["probs/colours"][:]),
                              atol=1e-3)


def _attended(pool_weighting: str, x: torch.Tensor):
    """A model pooling with the trained attention, its twin with uniform pooling (same weights),
    and both one's pooled features of ``x``; asserts that every cut of a trunk cache gives the same."""
    torch.manual_seed(0)
    model = create_model("tiny", GROUPS, embed_dim=8, colour_bins="3,4,4", colour_weighting="learned",
                         pool_weighting=pool_weighting).eval()
    torch.nn.init.normal_(model.colour_attention.weight)
    direct = model.pooled_features(x)
    plain = _learned().eval()
    plain.load_state_dict(model.state_dict())
    for start in range(1, len(model.trunk) + 1):  # at 4 the attended unit comes from the cache
        prefix, act, weight = frozen_outputs(model, x, start=start)
        assert torch.allclose(model.pooled_features(act, start, prefix, weight), direct, atol=1e-5)
    assert cache_key(model, 4, []) == cache_key(plain, 4, [])  # the same cache serves both
    return model, plain, direct, plain.pooled_features(x)


def test_learned_pooling_weights_the_last_unit_alike_from_images_and_from_the_cache():
    model, plain, direct, uniform = _attended("learned", torch.randn(2, 3, 64, 64))
    assert torch.allclose(direct[:, :-32], uniform[:, :-32]) and not torch.allclose(direct[:, -32:], uniform[:, -32:])
    with pytest.raises(ValueError, match="needs --colour-weighting learned"):
        create_model("tiny", GROUPS, colour_bins="3,4,4", colour_weighting="border", pool_weighting="learned")
    # auto: learned where the learned colour's attention is there, else none; checkpoints record which
    assert create_model("tiny", GROUPS, colour_bins="3,4,4", colour_weighting="learned").config.pool_weighting == "learned"
    assert create_model("tiny", GROUPS, colour_bins="3,4,4", colour_weighting="learned",
                        taps="1,2").config.pool_weighting == "none"  # the last unit is not pooled
    assert create_model("tiny", GROUPS, colour_bins="3,4,4", colour_weighting="attention").config.pool_weighting == "none"
    assert create_model("tiny", GROUPS, colour_bins="none", colour_weighting="learned").config.pool_weighting == "none"
    assert model_from_config({"backbone": "tiny", "groups": GROUPS}).config.pool_weighting == "none"  # old checkpoint


def test_map_pooling_weights_the_attended_unit_alike_from_images_and_from_the_cache():
    x = torch.randn(2, 3, 64, 64)
    model, plain, direct, uniform = _attended("map", x)
    # only the columns of the unit whose map the attention reads (unit 2, after the histogram and unit 1)
    at = model.colour_dim + model.trunk.channels[1]
    span = slice(at, at + model.trunk.channels[2])
    assert model.colour_unit == 2 and not torch.allclose(direct[:, span], uniform[:, span])
    assert torch.allclose(direct[:, :at], uniform[:, :at]) and torch.allclose(direct[:, span.stop:], uniform[:, span.stop:])
    # by hand: GeM (p = 3) of the map with the softmax of the attention's logits as weights
    cmap = model.trunk(x)[2]
    logits = model.pool_colour(model._cells(x, None, cmap), cmap.flatten(2))[1]
    w = torch.softmax(logits, 1).view(2, 1, *cmap.shape[-2:])
    by_hand = ((cmap.clamp(min=1e-6) ** 3 * w).sum((2, 3)) / w.sum((2, 3))) ** (1 / 3)
    assert torch.allclose(direct[:, span], by_hand, atol=1e-5)
    assert model.feature_dim == plain.feature_dim
    # auto on a frozen trunk: map where the attention's unit is pooled
    frozen = dict(colour_bins="3,4,4", colour_weighting="learned", frozen_trunk=True)
    assert create_model("tiny", GROUPS, **frozen).config.pool_weighting == "map"
    assert create_model("tiny", GROUPS, taps="1,3", **frozen).config.pool_weighting == "none"
    with pytest.raises(ValueError, match="taps must include it"):
        create_model("tiny", GROUPS, colour_bins="3,4,4", colour_weighting="learned", pool_weighting="map", taps="3")
