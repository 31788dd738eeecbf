"""`decode: gpu`: forward the compressed photo, for the inference tier to decode
on its GPU, instead of decoding and cropping it here.

Decode is the binding stage of the whole pipeline (about 360 downloader cores
against 3 GPUs at 6,250 images/s), and a GPU decodes JPEG in batches far faster
than a core. What stays here is what keeps every frame small and every decoder
on the same contract:

- a JPEG whose shorter side is at most `SHRINK_ABOVE` x the resize target, upright
  (no EXIF rotation) and plain RGB, goes as it is: no pixel is decoded here;
- a larger one is decoded with the DCT draft (1/2 to 1/8 scale, nearly free in
  libjpeg), made upright, and re-encoded at `QUALITY` with full chroma: the frame's shorter side
  ends between the resize target and twice it, never a 12 MP frame on the wire;
- a small JPEG is only header-checked, so one whose body is corrupt is caught by
  the inference tier, which answers it with `decode_error` as this tier would;
- anything else (PNG, WebP, CMYK, grey, ...) takes the CPU path (`decode_image`):
  a raw crop, which every inference worker reads. The GPU path is for the bulk
  of real traffic, camera JPEGs, not for every format a CPU can read.
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from tagpipe_downloader.decode import Decoded, Geometry, decode_image, load_rgb, open_image

SHRINK_ABOVE = 2
# Measured on the scikit-image photos (tests/unit/test_gpu_decode.py): at quality
# 90 with 4:2:0 chroma the re-encode moved crops by ~2 levels and flipped the
# top-1 class of 6 in 24; at 95 with full chroma (4:4:4), ~0.8 levels and none.
QUALITY = 95
# Past this aspect ratio a photo goes raw. It once kept pixel-exactness (the tiers
# resampled strips differently); both now resample through manifest.resample_plan,
# so it only keeps odd strips on the downloader's long-standing path.
_MAX_ASPECT = 8
_ORIENTATION = 0x0112
_EMPTY = np.empty((0, 0, 3), dtype=np.uint8)


def _forwardable(img: Image.Image) -> bool:
    return img.format == "JPEG" and img.mode == "RGB"


def _upright(img: Image.Image) -> bool:
    return bool(img.getexif().get(_ORIENTATION, 1) == 1)


def _goes_as_is(img: Image.Image, geom: Geometry) -> bool:
    """A plain RGB JPEG, upright, its shorter side at most `SHRINK_ABOVE` x the resize
    target: the inference tier decodes it as it is (cheap checks first)."""
    return _forwardable(img) and min(img.size) <= SHRINK_ABOVE * geom.resize and _upright(img)


def _the_file(data: bytes, img: Image.Image, t0: float) -> Decoded:
    """The downloaded file itself as the frame: header-checked, not decoded."""
    w, h = img.size
    return Decoded(_EMPTY, "JPEG", (w, h), (time.perf_counter() - t0) * 1000, 0.0, data, (h, w, 3))


def forward_small(data: bytes, geom: Geometry, max_pixels: int) -> Decoded:
    """`hop_encoding: original`, for a CPU inference tier: a small JPEG goes as it
    is, anything else as the raw crop (`decode_image`). Same answers as raw.

    Small means it goes as is for the GPU path too (`_goes_as_is`: the inference
    side's draft then picks the scale this side would), it is of photo
    proportions (`_MAX_ASPECT`), and no bigger than the raw crop it replaces.
    Inference decodes it with the same draft request and `resample_plan`
    (`PillowDecoder`), so the model sees exactly the pixels a raw frame would
    carry: what is saved is this tier's decode hand-off and the bigger frame
    through JetStream, not a single pixel.
    """
    t0 = time.perf_counter()
    img = open_image(data, max_pixels)
    w, h = img.size
    photo = max(w, h) <= _MAX_ASPECT * min(w, h) and len(data) <= geom.crop * geom.crop * 3
    if photo and _goes_as_is(img, geom):
        return _the_file(data, img, t0)
    return decode_image(data, geom, max_pixels)


def decode_for_gpu(data: bytes, geom: Geometry, max_pixels: int) -> Decoded:
    """A Decoded carrying `original` (the JPEG to forward) or, for other formats,
    the usual CPU crop. Raises what `decode_image` raises, with the same codes."""
    t0 = time.perf_counter()
    img = open_image(data, max_pixels)
    if not _forwardable(img):
        return decode_image(data, geom, max_pixels)
    if _goes_as_is(img, geom):
        return _the_file(data, img, t0)
    w, h = img.size
    rgb = load_rgb(img, geom)  # draft decode + EXIF orientation, as the CPU path
    t1 = time.perf_counter()
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=QUALITY, subsampling=0)
    t2 = time.perf_counter()
    shape = (rgb.height, rgb.width, 3)
    return Decoded(
        _EMPTY, "JPEG", (w, h), (t1 - t0) * 1000, (t2 - t1) * 1000, buf.getvalue(), shape
    )
