"""Image loading and preprocessing: aspect-preserving letterbox, ImageNet normalisation."""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

try:  # HEIC / HEIF (a phone camera's default format) opens as any other image, here and in the web
    from pillow_heif import register_heif_opener
except ImportError:  # an environment set up before the dependency: HEIC stays unreadable until setup.sh runs again
    logger.debug("pillow-heif is not installed: HEIC photos cannot be read")
else:
    register_heif_opener()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the most pixels decoded: a JPEG's at the reduced scale it is decoded at (``load_image``'s ``size``), so
# that a 50-100 Mpx studio photo is read (at 1/8 scale) where any other format of that size is refused
MAX_PIXELS = 40_000_000
SUPERSAMPLE = 3  # a JPEG is decoded with its longer side >= 3x the size it is letterboxed to (letterbox's reducing_gap)


class ImageError(ValueError):
    """An image that cannot be read (missing, truncated, not an image, too large)."""


def load_image(source, max_pixels: int = MAX_PIXELS, name: str | None = None, size: int | None = None
               ) -> Image.Image:
    """Open a path or file object as 8-bit RGB (EXIF orientation applied, see ``to_rgb``), refusing
    corrupt files and decompression bombs; errors start with ``name`` (default: the path).

    ``size``: the side the image will be letterboxed to. A JPEG is then decoded at the smallest of
    1/8, 1/4, 1/2 or full scale (libjpeg's DCT scaling) that keeps its longer side at SUPERSAMPLE x
    ``size`` or more, as uploads are (``web/uploads.py``): a 4032x3024 photo for 288 px is read at
    1008x756, decoded and letterboxed in 52 ms instead of 115 (2-core machine).

    ``max_pixels`` bounds the pixels decoded, checked before decoding: a JPEG's at that reduced scale
    (a 100 Mpx one for 288 px is decoded at 1/8, 1.6 Mpx), any other image's in full. PIL's own
    warning past 89 Mpx is left to that check; its error past 179 Mpx still refuses the file."""
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below counts what is decoded
            with Image.open(source) as img:
                width, height = img.size
                if size and img.format == "JPEG":
                    img.draft(None, draft_size(img.size, SUPERSAMPLE * size))  # the mode is kept (grey, CMYK)
                if img.width * img.height > max_pixels:
                    scale = "" if img.size == (width, height) else f" decoded at {img.width}x{img.height}"
                    raise ImageError(f"{name}: {width}x{height}{scale} exceeds {max_pixels} pixels")
                return to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{name}: cannot read image ({err})") from err


def draft_size(size: tuple[int, int], longest: int) -> tuple[int, int] | None:
    """Return the smallest (w, h) keeping the aspect ratio with max(w, h) >= longest; None when already there."""
    scale = longest / max(size)
    if scale >= 1:
        return None
    return max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale))


# the value a full-intensity pixel has, by mode; None: inferred from the values (see grey_to_uint8)
_WHITE_LEVEL = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": None, "F": None}


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of an image in any PIL mode: 16/32-bit and float grey scaled from their range
    (PIL's own conversion clips them, so a 16-bit PNG turns white), anything with an alpha channel
    or a transparent colour composited onto white, CMYK / 1 / L / P as PIL converts them."""
    if img.mode in _WHITE_LEVEL:
        img = Image.fromarray(grey_to_uint8(np.asarray(img), _WHITE_LEVEL[img.mode]), "L")
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def grey_to_uint8(values: np.ndarray, white: float | None) -> np.ndarray:
    """Grey levels as uint8 given the level of white; when unknown (modes I and F), the smallest
    of 1 (float), 255 and 65535 that holds every value, else the values' own min..max."""
    a = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(a.min()), float(a.max())
    if white is None:
        levels = (1.0, 255.0, 65535.0) if values.dtype.kind == "f" else (255.0, 65535.0)
        white = next((w for w in levels if low >= 0 and high <= w), None)
    if white is None:
        a, white = a - low, max(high - low, 1e-12)
    return np.clip(np.rint(a * (255.0 / white)), 0, 255).astype(np.uint8)


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
    array = to_uint8_array(load_image(path, size=size), size)
    return normalize_batch(torch.from_numpy(array).unsqueeze(0))
