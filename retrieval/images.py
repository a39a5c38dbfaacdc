"""Image loading and preprocessing: aspect-preserving letterbox, ImageNet normalisation."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An image that cannot be read (missing, truncated, not an image, too large)."""


def load_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open a path or file object as RGB, refusing corrupt files and decompression bombs."""
    name = getattr(source, "name", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > max_pixels:
                    raise ImageError(f"{name}: {img.width}x{img.height} exceeds {max_pixels} pixels")
                img = ImageOps.exif_transpose(img)
                return img.convert("RGB")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{name}: cannot read image ({err})") from err


def border_colour(img: Image.Image) -> tuple[int, int, int]:
    """Median colour of the outermost pixels, used to pad without inventing a frame."""
    a = np.asarray(img)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def letterbox(img: Image.Image, size: int) -> Image.Image:
    """Resize the longer side to ``size`` and pad to a square with the border colour."""
    scale = size / max(img.width, img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    resized = img.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
    if (w, h) == (size, size):
        return resized
    canvas = Image.new("RGB", (size, size), border_colour(resized))
    canvas.paste(resized, ((size - w) // 2, (size - h) // 2))
    return canvas


def to_uint8_array(img: Image.Image, size: int) -> np.ndarray:
    """Letterboxed HWC uint8 array, the form kept in the image cache."""
    return np.array(letterbox(img, size), dtype=np.uint8)


def normalize_batch(batch: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (or NCHW float 0..255) to ImageNet-normalised float NCHW."""
    if batch.dtype == torch.uint8:
        batch = batch.permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1) * 255
    return (batch - mean) / std


def augment_batch(batch: torch.Tensor, generator: torch.Generator | None = None, pad: int = 16) -> torch.Tensor:
    """Random flip and random crop (from a border-padded copy) of a uint8 NHWC batch.

    Everything happens on the batch's device, with no host round trip: the random draws are made
    there (or on ``generator``'s device and moved), and the crops are one gather."""
    n, h, w, _ = batch.shape
    device = batch.device
    draw_on = generator.device if generator is not None else device
    flips = (torch.rand(n, generator=generator, device=draw_on) < 0.5).to(device)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=draw_on).to(device)
    batch = torch.where(flips.view(n, 1, 1, 1), batch.flip(2), batch)
    padded = torch.nn.functional.pad(batch.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate")
    rows = (offsets[:, 0, None] + torch.arange(h, device=device)).view(n, 1, h, 1)
    cols = (offsets[:, 1, None] + torch.arange(w, device=device)).view(n, 1, 1, w)
    items = torch.arange(n, device=device).view(n, 1, 1, 1)
    channels = torch.arange(padded.shape[1], device=device).view(1, -1, 1, 1)
    crops = padded[items, channels, rows, cols]
    return crops.permute(0, 2, 3, 1).round().to(torch.uint8)


def image_tensor(path: str | Path, size: int) -> torch.Tensor:
    """One image as a normalised 1x3xSxS tensor."""
    array = to_uint8_array(load_image(path), size)
    return normalize_batch(torch.from_numpy(array).unsqueeze(0))
