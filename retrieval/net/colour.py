"""A colour histogram of the product: the colour a trunk's deep pooled features have mostly lost.

Pixels are converted to CIELAB (lightness apart from hue, distances roughly perceptual), weighted
towards the product and soft-binned on a regular L×a×b grid with triangular kernels, so a colour
near a bin edge splits between neighbours instead of jumping. The square root of the normalised
histogram (Hellinger) enters the embedding layer beside the pooled trunk features.

Which pixels are the product (``COLOUR_WEIGHTINGS``): ``border`` = pixels unlike the image border
(``foreground_weights``), right for product shots on a plain background but nearly uniform on a
street; ``attention`` = those, times where the trunk's last unit responds (``attention_weights``),
which finds the garment in clutter as well.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from retrieval.data.images import IMAGENET_MEAN, IMAGENET_STD

# L in [0, 100]; a and b clamped to [-80, 80], which covers the clothing colours of sRGB
LAB_RANGES = ((0.0, 100.0), (-80.0, 80.0), (-80.0, 80.0))
SIDE = 64  # histograms are taken at this resolution: colour needs no detail
COLOUR_WEIGHTINGS = ("border", "attention", "learned")
# sharpness of the attention map: on 24 street stand-in images (the garment 14% of the frame) the
# weight falling on the garment was 18% with border weights alone, 33 / 41 / 48 / 53% times the
# last unit's activation to the power 1 / 2 / 4 / 8
ATTENTION_POWER = 4


def parse_bins(bins: str | None) -> tuple[int, int, int] | None:
    """``"4,6,6"`` → (4, 6, 6) bins along L, a, b; empty, ``"0"`` or ``"none"`` → no histogram."""
    if bins is None or str(bins).strip().lower() in ("", "0", "none", "off"):
        return None
    try:
        parts = tuple(int(b) for b in str(bins).split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 2:
        raise ValueError(f"Colour bins {bins!r}: give three counts of at least 2 for L, a and b, e.g. 4,6,6")
    return parts


def check_colour_weighting(name: str) -> None:
    """Refuse an unknown colour weighting, listing the valid ones."""
    if name not in COLOUR_WEIGHTINGS:
        raise ValueError(f"Unknown colour weighting {name!r}; choose one of: {', '.join(COLOUR_WEIGHTINGS)}")


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """N3HW sRGB in [0, 1] to CIELAB (D65)."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))
    m = rgb.new_tensor([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
    xyz = torch.einsum("ij,njhw->nihw", m, linear)
    xyz = xyz / rgb.new_tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    delta = 6 / 29
    f = torch.where(xyz > delta ** 3, xyz.clamp_min(1e-12).pow(1 / 3), xyz / (3 * delta ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def _soft_bins(values: torch.Tensor, n: int, lo: float, hi: float) -> torch.Tensor:
    """NP values → NPn triangular memberships of ``n`` evenly spaced bin centres (each row sums to 1)."""
    u = ((values - lo) / (hi - lo)).clamp(0, 1) * (n - 1)
    centres = torch.arange(n, device=values.device, dtype=values.dtype)
    return (1 - (u[..., None] - centres).abs()).clamp_min(0)


def colour_histogram(x: torch.Tensor, bins: tuple[int, int, int], weight: torch.Tensor | None = None) -> torch.Tensor:
    """Hellinger-normalised L×a×b histogram (N, prod(bins)) of an ImageNet-normalised batch N3HW;
    ``weight`` (N1hw, any resolution) weights the pixels. Always float32 (autocast off)."""
    with _full_precision(x.device):
        return _histogram(x.float(), bins, None if weight is None else weight.float())


def _full_precision(device: torch.device):
    """Autocast off: histograms are sums of many small weights. Devices without autocast (meta, in
    the device-placement tests) need no guard."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext()


def _memberships(x: torch.Tensor, bins: tuple[int, int, int], weight: torch.Tensor | None):
    """Pixel weights NP and the L, a, b bin memberships (NPn each) of a batch at ``SIDE`` resolution."""
    x = F.adaptive_avg_pool2d(x, (min(SIDE, x.shape[-2]), min(SIDE, x.shape[-1])))
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    lab = srgb_to_lab((x * std + mean).clamp(0, 1)).flatten(2)  # N3P
    w = x.new_ones(len(x), lab.shape[-1]) if weight is None else \
        F.adaptive_avg_pool2d(weight, x.shape[-2:]).flatten(1)
    return w, [_soft_bins(lab[:, c], n, *LAB_RANGES[c]) for c, n in enumerate(bins)], x.shape[-2:]


def _hellinger(hist: torch.Tensor) -> torch.Tensor:
    """Square root of the normalised histogram (rows of NB); kept off 0, where the root's
    gradient is infinite (only the learned weighting takes gradients through it)."""
    return (hist / hist.sum(1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12).sqrt()


def _histogram(x: torch.Tensor, bins: tuple[int, int, int], weight: torch.Tensor | None) -> torch.Tensor:
    w, (ml, ma, mb), _ = _memberships(x, bins, weight)
    return _hellinger(torch.einsum("np,npi,npj,npk->nijk", w, ml, ma, mb).flatten(1))


def colour_cells(x: torch.Tensor, bins: tuple[int, int, int], weight: torch.Tensor, size) -> torch.Tensor:
    """Per-cell colour mass (N, prod(bins), cells) of an ImageNet-normalised batch: the weighted
    pixels' soft-binned histogram, average-pooled onto a ``size`` (h, w) grid of cells (the trunk
    map's), unnormalised, so that a uniform pooling of cells is the weighted histogram. Float32."""
    with _full_precision(x.device):
        w, (ml, ma, mb), side = _memberships(x.float(), bins, weight.float())
        joint = torch.einsum("np,npi,npj,npk->nijkp", w, ml, ma, mb).flatten(1, 3)
        return F.adaptive_avg_pool2d(joint.unflatten(2, tuple(side)), tuple(size)).flatten(2)


def attention_prior(cmap: torch.Tensor) -> torch.Tensor:
    """Logits (N, cells) of the attention weighting from a trunk map (N, C, cells): ``ATTENTION_POWER``
    x the log of its summed non-negative activation, scaled to peak 1. No gradients."""
    energy = cmap.detach().float().clamp_min(0).sum(1)
    energy = energy / energy.amax(1, keepdim=True).clamp_min(1e-12)
    return ATTENTION_POWER * energy.clamp_min(1e-6).log()


def pool_cells(cells: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Hellinger histogram (N, B) of per-cell colour mass (N, B, cells) pooled by softmax(``logits``)."""
    with _full_precision(cells.device):
        share = torch.softmax(logits.float(), dim=1)
        return _hellinger(torch.einsum("nbc,nc->nb", cells.float(), share))


def histogram_size(bins: tuple[int, int, int] | None) -> int:
    return 0 if bins is None else bins[0] * bins[1] * bins[2]


def foreground_weights(x: torch.Tensor, floor: float = 0.05) -> torch.Tensor:
    """Spatial weights N1HW from a normalised image batch: pixels unlike the border colour count,
    so pooling describes the product rather than a plain studio background. Where nearly
    everything differs from the border (a street photo), the weights are nearly uniform."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    colour = border.median(dim=2).values[:, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    distance = ((x - colour) * std).norm(dim=1, keepdim=True)  # in 0..1 pixel units
    mask = (distance / 0.08).clamp(0, 1)
    mask = F.avg_pool2d(mask, 9, stride=1, padding=4, count_include_pad=False)
    return mask.clamp_min(floor)


def attention_weights(activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Spatial weights N1HW (``size``) from a trunk unit's output NChw: its summed non-negative
    activation, scaled to peak 1 and sharpened (``ATTENTION_POWER``); where the network sees an
    object. Never takes gradients: the weighting stays that of the trunk it was computed with."""
    energy = activation.detach().float().clamp_min(0).sum(1, keepdim=True)
    energy = energy / energy.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return F.interpolate(energy.pow(ATTENTION_POWER), size=size, mode="bilinear", align_corners=False)
