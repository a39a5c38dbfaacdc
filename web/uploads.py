"""Uploaded photos decoded with bounded memory: JPEG at reduced scale (draft), other formats reduced
right after decoding, every PIL mode converted to RGB as catalogue images are (``retrieval.data.images.to_rgb``), EXIF
orientation applied.

A 25-megapixel JPEG is decoded at 1/2 to 1/8 scale, never at full size; PNG, WebP and HEIC cannot be decoded
at reduced scale, so their peak is the full raster (at most UPLOAD_MAX_PIXELS x 4 bytes), dropped
before the model runs. The JPEG scale is chosen as for catalogue images (``retrieval.data.images.draft_size``),
so that a photo and the same file in the catalogue are decoded alike.
"""
from __future__ import annotations

import io
import struct
import warnings

from PIL import Image

from retrieval.data.images import SUPERSAMPLE, ImageError, draft_size, to_rgb

UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")  # HEIF: a phone's HEIC photo (pillow-heif)
OPEN_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)  # what PIL raises on garbage
REDUCIBLE = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr", "RGBX", "PA")
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
EXIF_ORIENTATION = 0x0112


def open_upload(stream, name: str, max_pixels: int, size: int = 320) -> Image.Image:
    """Return the RGB image of an upload with its longer side reduced towards SUPERSAMPLE x size;
    ImageError with the reason for non-images, other formats, corrupt files and too many pixels."""
    name = name or "upload"
    source = stream if getattr(stream, "seekable", lambda: False)() else io.BytesIO(stream.read())
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as img:
                check_upload(img, name, max_pixels)
                return decode(img, SUPERSAMPLE * size, name)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageError(f"{name}: too many pixels ({err})") from err
        except OPEN_ERRORS as err:
            raise ImageError(f"{name}: not an image file, or a corrupt one; upload a JPEG, PNG, WebP or HEIC photo") from err


def check_upload(img: Image.Image, name: str, max_pixels: int) -> None:
    """Refuse formats other than JPEG, PNG, WebP and HEIF, and images over max_pixels, before decoding."""
    if img.format not in UPLOAD_FORMATS:
        raise ImageError(f"{name}: unsupported image format {img.format}; upload a JPEG, PNG, WebP or HEIC photo")
    if img.width * img.height > max_pixels:
        raise ImageError(f"{name}: {img.width}x{img.height} exceeds {max_pixels} pixels")


def decode(img: Image.Image, longest: int, name: str) -> Image.Image:
    """Decode an opened upload to RGB with its longer side reduced towards longest (never below it)."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION)
        if img.format == "JPEG":
            img.draft(None, draft_size(img.size, longest))  # the decoder scales by 1/2, 1/4 or 1/8
        img.load()
        small = to_rgb(shrink(img, longest))
    except OPEN_ERRORS as err:
        raise ImageError(f"{name}: cannot read the image ({err})") from err
    return small.transpose(ORIENTATIONS[orientation]) if orientation in ORIENTATIONS else small


def shrink(img: Image.Image, longest: int) -> Image.Image:
    """Return img reduced by the largest integer factor that keeps its longer side >= longest."""
    factor = max(img.size) // longest
    if factor < 2:
        return img
    if img.mode not in REDUCIBLE:  # I;16, P and 1 cannot be reduced as they are
        img = img.convert("I" if img.mode.startswith("I;16") else "RGBA" if img.mode == "P" else "L")
    return img.reduce(factor)
