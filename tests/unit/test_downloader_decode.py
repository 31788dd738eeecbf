"""Bytes -> model crop: formats, modes, orientation, geometry and failures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tagpipe_common.errors import PermanentError
from tagpipe_common.manifest import centre_crop
from tagpipe_downloader.decode import Geometry, decode_image, resize_crop

from bench.imageserver import bomb_png, exif_rotated_jpeg, make_jpeg

GEOM = Geometry()
MAX_PIXELS = 50_000_000


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, **kw: object) -> np.ndarray:
    out = decode_image(data, GEOM, MAX_PIXELS, **kw).pixels  # type: ignore[arg-type]
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    return out


def code_of(data: bytes) -> str:
    with pytest.raises(PermanentError) as info:
        decode_image(data, GEOM, MAX_PIXELS)
    return info.value.code


def mean_rgb(px: np.ndarray) -> tuple[int, ...]:
    return tuple(round(float(v)) for v in px.reshape(-1, 3).mean(axis=0))


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (1200, 1000), (0, 255, 255, 0)), "JPEG", quality=95)
    assert close(mean_rgb(decode(data)), (255, 0, 0))


def test_16bit_png_is_scaled_not_clipped() -> None:
    arr = np.full((40, 60), 32768, dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert close(mean_rgb(decode(data)), (128, 128, 128), tol=1)


def test_16bit_rgb_png() -> None:
    # Pillow cannot write 16-bit RGB; build the PNG by hand.
    import struct
    import zlib

    w, h = 4, 3
    px = np.zeros((h, w, 3), ">u2")
    px[..., 0] = 65535  # red
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    assert close(mean_rgb(decode(data)), (255, 0, 0), tol=1)


def test_one_pixel_image() -> None:
    data = encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    assert close(mean_rgb(decode(data)), (10, 200, 30), tol=1)


def test_animated_gif_takes_first_frame() -> None:
    frames = [Image.new("RGB", (50, 50), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert close(mean_rgb(decode(data)), (255, 0, 0))


def test_png_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (100, 100), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, 100, 50))  # opaque blue top half
    px = decode(encode(img, "PNG"))
    assert close(mean_rgb(px[:100]), (0, 0, 255))
    assert close(mean_rgb(px[130:]), (255, 255, 255))


def test_palette_and_grey_and_webp_and_bmp() -> None:
    base = Image.new("RGB", (80, 60), (0, 128, 255))
    for data in (
        encode(base.convert("P"), "PNG"),
        encode(base, "WEBP", lossless=True),
        encode(base, "BMP"),
    ):
        assert close(mean_rgb(decode(data)), (0, 128, 255))
    grey = encode(Image.new("L", (80, 60), 77), "PNG")
    assert close(mean_rgb(decode(grey)), (77, 77, 77), tol=1)


def test_exif_orientation_is_applied() -> None:
    px = decode(exif_rotated_jpeg(1200, 600, orientation=6))
    # Displayed upright the image is portrait with red on top, blue below.
    assert close(mean_rgb(px[:80]), (230, 20, 20), tol=12)
    assert close(mean_rgb(px[-80:]), (20, 20, 230), tol=12)


def test_fast_path_matches_full_decode() -> None:
    data = make_jpeg(2048, 1536, seed=3)
    fast = decode(data, fast=True).astype(np.int16)
    full = decode(data, fast=False).astype(np.int16)
    diff = np.abs(fast - full)
    assert diff.mean() < 3.0, diff.mean()
    assert not np.array_equal(fast, full)  # the DCT-scaled path really ran


def test_resize_and_centre_crop_geometry() -> None:
    # Shorter side already 256: no resize, so the crop must be exact.
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(256, 512, 3), dtype=np.uint8)
    out = resize_crop(Image.fromarray(arr), GEOM)
    assert np.array_equal(out, arr[16:240, 144:368])


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "camera"])
def test_resampling_the_crop_box_is_the_full_resize_but_for_rounding(name: str) -> None:
    """resize_crop resamples only the crop's box; the textbook resizes the whole
    photo and then crops. Same filter and source pixels: a grey level or two, rarely."""
    from skimage import data

    arr = np.asarray(getattr(data, name)())
    img = Image.fromarray(arr).convert("RGB")
    for scaled in (
        img,
        img.resize((640, 480)),
        img.resize((300, 451)),
        img.rotate(90, expand=True),
    ):
        size, box = centre_crop(scaled.width, scaled.height, GEOM.resize, GEOM.crop)
        textbook = np.asarray(scaled.resize(size, Image.Resampling.BICUBIC).crop(box))
        diff = np.abs(resize_crop(scaled, GEOM).astype(int) - textbook.astype(int))
        assert diff.max() <= 2 and np.mean(diff > 0) < 1e-3, (scaled.size, np.mean(diff > 0))


@pytest.mark.parametrize("size", [(65000, 1), (1, 65000), (40000, 3)])
def test_a_long_strip_is_never_resized_whole(size: tuple[int, int]) -> None:
    # Resized whole, 1 x 65000 would be 256 x 16.6 M pixels (12 GB).
    data = encode(Image.new("RGB", size, (200, 10, 10)), "PNG")
    assert len(data) < 10_000
    assert mean_rgb(decode(data)) == (200, 10, 10)


def test_geometry_from_manifest(tmp_path: Path) -> None:
    manifest = {
        "name": "m",
        "version": "1",
        "sha256": "0" * 64,
        "num_classes": 10,
        "input": {"name": "x"},
        "output": {"name": "y"},
        "preprocess": {"resize": 160, "crop": 128, "mean": [0, 0, 0], "std": [1, 1, 1]},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    geom = Geometry.from_manifest(tmp_path)
    assert (geom.resize, geom.crop) == (160, 128)
    out = decode_image(make_jpeg(640, 480), geom, MAX_PIXELS).pixels
    assert out.shape == (128, 128, 3)


def test_svg_is_refused() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    assert code_of(svg) == "unsupported_format"


def test_tiff_is_refused() -> None:
    assert code_of(encode(Image.new("RGB", (8, 8)), "TIFF")) == "unsupported_format"


def test_corrupt_png_crc_is_a_decode_error() -> None:
    data = bytearray(encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG"))
    data[29] ^= 0xFF  # last byte of the IHDR CRC
    assert code_of(bytes(data)) == "decode_error"


def test_corrupt_png_data_is_a_decode_error() -> None:
    data = bytearray(
        encode(Image.fromarray(np.arange(3072, dtype=np.uint8).reshape(32, 32, 3)), "PNG")
    )
    idat = data.index(b"IDAT") + 4
    data[idat + 2 : idat + 40] = bytes(38)
    assert code_of(bytes(data)) == "decode_error"


def test_truncated_jpeg_is_a_decode_error() -> None:
    data = make_jpeg(640, 480)
    assert code_of(data[: len(data) // 2]) == "decode_error"


def test_zero_bytes_and_html() -> None:
    assert code_of(b"") == "not_an_image"
    assert code_of(b"<html><body>not found</body></html>") == "not_an_image"


def test_decompression_bomb_is_refused_from_the_header() -> None:
    assert code_of(bomb_png(20000, 20000)) == "image_too_many_pixels"  # past Pillow's own limit
    assert code_of(bomb_png(10000, 10000)) == "image_too_many_pixels"  # where Pillow only warns
    assert code_of(bomb_png(8000, 8000)) == "image_too_many_pixels"  # ours alone (64M > 50M)


def test_colour_key_transparency_is_composited_on_white() -> None:
    img = Image.new("RGB", (60, 60), (0, 255, 0))
    img.paste((0, 0, 0), (0, 30, 60, 60))
    data = encode(img, "PNG", transparency=(0, 0, 0))  # tRNS: black means transparent
    px = decode(data)
    assert close(mean_rgb(px[:90]), (0, 255, 0))
    assert close(mean_rgb(px[-90:]), (255, 255, 255))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns; the service ignores PIL warnings
def test_broken_exif_costs_the_orientation_not_the_image() -> None:
    img = Image.new("RGB", (300, 300), (40, 90, 160))
    data = encode(img, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    assert close(mean_rgb(decode(data)), (40, 90, 160))
