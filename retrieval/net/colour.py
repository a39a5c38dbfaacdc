"""A colour histogram of the product: the colour a trunk's deep pooled features have mostly lost.

Pixels are converted to CIELAB (lightness apart from hue, distances roughly perceptual), weighted
towards the product (pixels unlike the image border, see ``model.foreground_weights``) and soft-
binned on a regular L×a×b grid with triangular kernels, so a colour near a bin edge splits
between neighbours instead of jumping. The square root of the normalised histogram (Hellinger)
enters the embedding layer beside the pooled trunk features.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from retrieval.data.images import IMAGENET_MEAN, IMAGENET_STD

# L in [0, 100]; a and b clamped to [-80, 80], which covers the clothing colours of sRGB
LAB_RANGES = ((0.0, 100.0), (-80.0, 80.0), (-80.0, 80.0))
SIDE = 64  # histograms are taken at this resolution: colour needs no detail


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
    # devices without autocast (meta, in the device-placement tests) need no guard
    off = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cuda", "cpu") else nullcontext()
    with off:
        return _histogram(x.float(), bins, None if weight is None else weight.float())


def _histogram(x: torch.Tensor, bins: tuple[int, int, int], weight: torch.Tensor | None) -> torch.Tensor:
    x = F.adaptive_avg_pool2d(x, (min(SIDE, x.shape[-2]), min(SIDE, x.shape[-1])))
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    lab = srgb_to_lab((x * std + mean).clamp(0, 1)).flatten(2)  # N3P
    w = x.new_ones(len(x), lab.shape[-1]) if weight is None else \
        F.adaptive_avg_pool2d(weight, x.shape[-2:]).flatten(1)
    (nl, na, nb), ranges = bins, LAB_RANGES
    ml, ma, mb = (_soft_bins(lab[:, c], n, *ranges[c]) for c, n in enumerate((nl, na, nb)))
    hist = torch.einsum("np,npi,npj,npk->nijk", w, ml, ma, mb).flatten(1)
    return (hist / hist.sum(1, keepdim=True).clamp_min(1e-12)).sqrt()


def histogram_size(bins: tuple[int, int, int] | None) -> int:
    return 0 if bins is None else bins[0] * bins[1] * bins[2]
