"""Bytes -> the model's uint8 HWC RGB crop. Pure and synchronous: the worker
runs it in a thread pool (Pillow and numpy release the GIL while they work).

Preprocessing follows the model manifest (torchvision's Resize(shorter side,
bicubic) + CenterCrop), so what inference sees is what the model was built for.

The fast path: a JPEG is decoded at a DCT scale of 1/2, 1/4 or 1/8 (libjpeg
does that almost for free) to the smallest size whose shorter side is still at
least the resize target. A 12 MP photo then never exists at full size.
"""

from __future__ import annotations

import io
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, ImageOps
from tagpipe_common.errors import ErrorCode, PermanentError
from tagpipe_common.manifest import (
    MANIFEST_FILE,
    ModelManifest,
    draft_size,
    resample_plan,
)
from tagpipe_common.messages import Encoding

from tagpipe_downloader.guard import check_pixels, sniff_format

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)

# A truncated file must fail, never come out as half an image padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Geometry:
    resize: int = 256  # shorter side after resize
    crop: int = 224  # square centre crop
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")

    @classmethod
    def from_manifest(cls, path: Path) -> Geometry:
        """`path` is a model directory or its manifest.json."""
        model_dir = path.parent if path.name == MANIFEST_FILE else path
        spec = ModelManifest.load(model_dir).preprocess
        return cls(spec.resize, spec.crop, spec.interpolation)


class FrameFields(TypedDict, total=False):
    """InferenceTask fields: the payload, its decoded shape and encoding."""

    pixels: bytes
    shape: tuple[int, int, int]
    encoding: Encoding
    media_type: str


@dataclass
class Decoded:
    pixels: npt.NDArray[np.uint8]  # crop x crop x 3 (empty when `original` is set)
    format: str
    source_size: tuple[int, int]  # width, height as stored in the file
    decode_ms: float
    preprocess_ms: float
    # decode: gpu: the JPEG to forward instead of pixels (forward.py), and its HWC shape.
    original: bytes | None = None
    original_shape: tuple[int, int, int] | None = None
    # The crop compressed for the inference hop (hop.py), and its media type.
    encoded: tuple[bytes, str] | None = None

    def frame(self) -> FrameFields:
        """The InferenceTask fields that carry this image: the forwarded original,
        the compressed crop, or the raw crop."""
        if self.original is not None and self.original_shape is not None:
            return FrameFields(
                pixels=self.original,
                shape=self.original_shape,
                encoding="original",
                media_type="image/jpeg",
            )
        h, w, c = self.pixels.shape
        if self.encoded is not None:
            payload, media_type = self.encoded
            return FrameFields(
                pixels=payload, shape=(h, w, c), encoding="encoded_crop", media_type=media_type
            )
        return FrameFields(pixels=self.pixels.tobytes(), shape=(h, w, c), encoding="raw")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify and header-check an image without decoding its pixels."""
    fmt = sniff_format(data[:1024])
    try:
        # Pillow's own warnings (bomb threshold, corrupt EXIF) are silenced
        # process-wide by __main__: catch_warnings is not thread-safe.
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PermanentError(ErrorCode.IMAGE_TOO_MANY_PIXELS, str(exc)) from None
    except _DECODE_ERRORS as exc:
        raise PermanentError(ErrorCode.DECODE_ERROR, f"{fmt}: {exc}") from None
    check_pixels(img.width, img.height, max_pixels)
    return img


def load_rgb(img: Image.Image, geom: Geometry, *, fast: bool = True) -> Image.Image:
    """Decode pixels, apply EXIF orientation and convert any mode to 8-bit RGB."""
    if fast and img.format == "JPEG" and min(img.size) > geom.resize:
        img.draft("RGB", draft_size(img.width, img.height, geom.resize))
    try:
        img.load()
        return to_rgb(_upright(img))
    except _DECODE_ERRORS as exc:
        raise PermanentError(ErrorCode.DECODE_ERROR, f"{img.format}: {exc}") from None


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. Broken EXIF is common in real photos whose
    pixels are fine, so it costs the orientation, not the image."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode; transparency is composited on white."""
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # a tRNS colour key is transparency too
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(img)
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit) grey scaled to 8 bits; Pillow's convert would clip instead."""
    arr = np.asarray(img)
    if img.mode == "F":
        grey = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        wide = np.clip(arr.astype(np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def resize_crop(img: Image.Image, geom: Geometry) -> npt.NDArray[np.uint8]:
    """torchvision Resize(geom.resize) + CenterCrop(geom.crop), as uint8 HWC.

    Only the crop's columns are resampled (see `resample_plan`).
    """
    to, src, box = resample_plan(img.width, img.height, geom.resize, geom.crop)
    crop = img.resize(to, _RESAMPLE[geom.interpolation], box=src).crop(box)
    out = np.asarray(crop, dtype=np.uint8)
    if out.shape != (geom.crop, geom.crop, 3):
        raise PermanentError(ErrorCode.DECODE_ERROR, f"unexpected decoded shape {out.shape}")
    return out


def decode_image(data: bytes, geom: Geometry, max_pixels: int, *, fast: bool = True) -> Decoded:
    """The whole bytes -> tensor path, timed per stage."""
    t0 = time.perf_counter()
    img = open_image(data, max_pixels)
    fmt, source_size = str(img.format), img.size
    rgb = load_rgb(img, geom, fast=fast)
    t1 = time.perf_counter()
    pixels = resize_crop(rgb, geom)
    t2 = time.perf_counter()
    return Decoded(pixels, fmt, source_size, (t1 - t0) * 1000, (t2 - t1) * 1000)
