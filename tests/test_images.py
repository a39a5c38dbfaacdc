"""Image decoding: every PIL mode a catalog image or an upload may have decodes to what it shows."""
import io

import numpy as np
import pytest
from PIL import Image

from retrieval.data.images import ImageError, load_image

W, H = 48, 32


def reference_rgb() -> np.ndarray:
    """An asymmetric 8-bit RGB test card: gradients and a dark block in the top-left corner."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (W + H - 2)], -1).astype(np.uint8)
    rgb[2:10, 3:15] = (20, 30, 40)
    return rgb


def grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def alpha_mask() -> np.ndarray:
    """Transparent left third, half-transparent middle third, opaque right third."""
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:, : W // 3], alpha[:, W // 3: 2 * W // 3] = 0, 128
    return alpha


def encode(img: Image.Image, fmt: str, **kw) -> io.BytesIO:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kw)
    buffer.seek(0)
    buffer.name = f"upload.{fmt.lower()}"
    return buffer


def as_rgb(levels: np.ndarray) -> np.ndarray:
    return np.repeat(levels[..., None], 3, -1)


def case_16bit(fmt: str, dtype: str):
    g = grey(reference_rgb())
    return encode(Image.fromarray((g.astype(np.uint32) * 257).astype(dtype)), fmt), as_rgb(g)


def case_transparent_palette():
    rgb = reference_rgb()
    p = Image.fromarray(rgb).quantize(64)
    index = np.asarray(p).copy()
    index[:, : W // 2] = 63  # the left half shows the transparent palette entry
    p = Image.fromarray(index, "P")
    p.putpalette(Image.fromarray(rgb).quantize(64).getpalette())
    expected = np.asarray(p.convert("RGB")).copy()
    expected[:, : W // 2] = 255
    return encode(p, "PNG", transparency=63), expected


def case_exif_rotated():
    rgb = reference_rgb()
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees clockwise
    return encode(img, "JPEG", quality=95, exif=exif), np.rot90(rgb, -1)


CASES = {
    "RGB": lambda: (encode(Image.fromarray(reference_rgb()), "PNG"), reference_rgb()),
    "L": lambda: (encode(Image.fromarray(grey(reference_rgb())), "PNG"), as_rgb(grey(reference_rgb()))),
    "1": lambda: (encode(Image.fromarray(grey(reference_rgb()) > 127), "PNG"),
                  as_rgb(np.where(grey(reference_rgb()) > 127, 255, 0).astype(np.uint8))),
    "I;16 png": lambda: case_16bit("PNG", "uint16"),
    "I;16B tiff": lambda: case_16bit("TIFF", ">u2"),
    "I 16-bit range": lambda: case_16bit("TIFF", "int32"),
    "F 0..1": lambda: (encode(Image.fromarray(grey(reference_rgb()).astype(np.float32) / 255), "TIFF"),
                       as_rgb(grey(reference_rgb()))),
    "LA": lambda: (encode(Image.fromarray(np.stack([grey(reference_rgb()), alpha_mask()], -1), "LA"), "PNG"),
                   as_rgb(on_white(grey(reference_rgb())[..., None], alpha_mask())[..., 0])),
    "RGBA": lambda: (encode(Image.fromarray(np.dstack([reference_rgb(), alpha_mask()]), "RGBA"), "PNG"),
                     on_white(reference_rgb(), alpha_mask())),
    "P transparency": case_transparent_palette,
    "CMYK": lambda: (encode(Image.fromarray(reference_rgb()).convert("CMYK"), "TIFF"), reference_rgb()),
    "EXIF orientation": case_exif_rotated,
}


@pytest.mark.parametrize("case", CASES)
def test_every_mode_decodes_to_what_it_shows(case):
    source, expected = CASES[case]()
    decoded = load_image(source)
    assert decoded.mode == "RGB" and decoded.size == (expected.shape[1], expected.shape[0])
    difference = np.abs(np.asarray(decoded, dtype=np.int16) - expected.astype(np.int16)).mean()
    assert difference < 3, f"{case}: mean absolute difference {difference:.1f} from the 8-bit original"


def test_16bit_png_keeps_its_dark_levels(tmp_path):
    """A dark 16-bit photo is not stretched: level 2570 of 65535 is 10 of 255, not white."""
    path = tmp_path / "dark.png"
    Image.fromarray(np.full((8, 8), 2570, np.uint16)).save(path)
    assert np.asarray(load_image(path)).max() == 10


def test_errors_name_the_path(tmp_path):
    path = tmp_path / "sub" / "broken.jpg"
    path.parent.mkdir()
    path.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ImageError, match=str(path)):
        load_image(path)
    with pytest.raises(ImageError, match="^sub/broken.jpg: cannot read image"):
        load_image(path, name="sub/broken.jpg")


@pytest.mark.parametrize("mode, orientation", [("RGB", 1), ("RGB", 6), ("L", 1), ("CMYK", 1)])
def test_large_jpeg_is_decoded_at_a_reduced_scale_for_its_size(mode, orientation):
    # a 1,920 x 1,280 photo for 64 px: libjpeg's 1/8 scale (240 x 160: the longer side still >= 3 x 64,
    # as uploads are decoded), the same picture letterboxed as from the full decode (EXIF rotation,
    # grey and CMYK kept)
    from retrieval.data.images import to_uint8_array

    y, x = np.mgrid[0:1280, 0:1920]
    rgb = np.stack([x * 255 // 1919, y * 255 // 1279, (x // 160 % 2) * 255], -1).astype(np.uint8)
    img = Image.fromarray(rgb).convert(mode)
    exif = img.getexif()
    exif[0x0112] = orientation
    full, reduced = (load_image(encode(img, "JPEG", quality=95, exif=exif), size=size) for size in (None, 64))
    assert full.size == ((1280, 1920) if orientation == 6 else (1920, 1280))
    assert reduced.size == tuple(side // 8 for side in full.size) and reduced.mode == "RGB"
    a, b = (to_uint8_array(im, 64).astype(np.int16) for im in (full, reduced))
    assert np.abs(a - b).mean() < 3
    png = load_image(encode(Image.fromarray(rgb), "PNG"), size=64)  # other formats: decoded whole
    assert png.size == (1920, 1280)


def test_the_pixel_limit_counts_the_pixels_decoded(monkeypatch):
    """A JPEG past the limit is read at the reduced scale its size allows (a 50-100 Mpx studio photo
    at 1/8), not refused; in full, or in another format, it is refused before decoding. PIL's own
    warning past its bomb size no longer refuses such a JPEG; its error past twice that still does."""
    y, x = np.mgrid[0:600, 0:800]
    img = Image.fromarray(np.stack([x * 255 // 799, y * 255 // 599, x * 0], -1).astype(np.uint8))
    jpeg, png = encode(img, "JPEG", quality=95), encode(img, "PNG")
    assert load_image(jpeg, max_pixels=100_000, size=32).size == (100, 75)  # 1/8: 7,500 pixels decoded
    with pytest.raises(ImageError, match="800x600 exceeds 100000 pixels"):
        load_image(jpeg, max_pixels=100_000)
    with pytest.raises(ImageError, match="800x600 decoded at 400x300 exceeds 100000 pixels"):
        load_image(jpeg, max_pixels=100_000, size=100)  # 1/2 scale (>= 3 x 100 a side): 120,000
    with pytest.raises(ImageError, match="800x600 exceeds 100000 pixels"):
        load_image(png, max_pixels=100_000, size=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300_000)  # PIL warns past 300k, refuses past 600k
    assert load_image(jpeg, size=32).size == (100, 75)
    big = encode(Image.new("RGB", (1000, 700)), "JPEG")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(big, size=32)


def test_heic_photos_read_as_any_other(tmp_path):
    """A phone's HEIC photo (pillow-heif) decodes to the picture it holds, with its size or without,
    and the web makes its catalogue thumbnail."""
    from web.media import write_thumbnail

    y, x = np.mgrid[0:120, 0:180]
    rgb = np.stack([x * 255 // 179, y * 255 // 119, (x // 30 % 2) * 255], -1).astype(np.uint8)
    path = tmp_path / "street.heic"
    Image.fromarray(rgb).save(path, "HEIF", quality=95)
    for size in (None, 32):
        decoded = np.asarray(load_image(path, size=size), dtype=float)
        assert decoded.shape == rgb.shape and np.abs(decoded - rgb).mean() < 6
    assert write_thumbnail(path, tmp_path / "thumb.jpg", 64)
    assert Image.open(tmp_path / "thumb.jpg").size == (64, 43)
