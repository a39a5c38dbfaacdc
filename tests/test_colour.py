"""The colour histogram feature: CIELAB conversion, soft binning, product weighting, cache paths."""
import pytest
import torch

from conftest import TINY
from retrieval.net.checkpoint import load_model
from retrieval.cli import main as cli
from retrieval.net.colour import colour_histogram, parse_bins, srgb_to_lab
from retrieval.net.trunkcache import TrunkCache, frozen_outputs
from retrieval.data.images import IMAGENET_MEAN, IMAGENET_STD
from retrieval.net.model import create_model

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
         "--colour-bins", "3,4,4", "--trunk-cache", str(cache)])
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
                "--colour-bins", "3,4,4", "--trunk-cache", str(plain_cache)]) == 0
    assert TrunkCache(plain_cache).prefix.shape == full.prefix.shape


def test_histogram_stays_float32_under_autocast():
    x = normalised(torch.rand(2, 3, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hist = colour_histogram(x, (4, 6, 6))
    assert hist.dtype == torch.float32
    assert torch.allclose(hist, colour_histogram(x, (4, 6, 6)))
