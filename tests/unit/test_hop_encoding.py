"""The inference hop's encodings: the downloader compresses the crop
(`TAGPIPE_HOP_ENCODING`), the inference tier decodes it back to the model's crop.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image
from tagpipe_common.messages import InferenceTask
from tagpipe_downloader.decode import Geometry, decode_image
from tagpipe_downloader.hop import crop_decoder
from tagpipe_downloader.settings import DownloaderSettings
from tagpipe_inference.decoders import DecodeFailed, PillowDecoder
from tagpipe_inference.items import Decoded, decode

GEOM = Geometry(256, 224, "bicubic")


def coffee_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, format="JPEG", quality=90)  # type: ignore[no-untyped-call]
    return buf.getvalue()


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).resize((w, h)).save(buf, format="PNG")  # type: ignore[no-untyped-call]
    return buf.getvalue()


def rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # displays rotated 90 degrees clockwise
    return exif


def through_the_hop(encoding: str) -> tuple[InferenceTask, np.ndarray]:
    """Downloader side to wire bytes to inference side: (the task read, its crop)."""
    d = crop_decoder(encoding)(coffee_jpeg(), GEOM, 50_000_000)  # type: ignore[arg-type]
    wire = InferenceTask(item_id="i", request_id="r", **d.frame()).to_wire()
    got = decode(wire, GEOM.crop)
    assert isinstance(got, Decoded), got
    if got.needs_decode:
        return got.task, PillowDecoder(GEOM.resize, GEOM.crop).one(got.task.pixels, True)
    return got.task, got.pixels


def test_the_default_hop_is_the_raw_crop() -> None:
    assert DownloaderSettings().hop_encoding == "raw"
    task, pixels = through_the_hop("raw")
    assert (task.encoding, task.media_type) == ("raw", None)
    assert len(task.pixels) == 224 * 224 * 3
    assert np.array_equal(pixels, decode_image(coffee_jpeg(), GEOM, 50_000_000).pixels)


def test_a_lossless_hop_carries_the_same_pixels_in_fewer_bytes() -> None:
    task, pixels = through_the_hop("webp-lossless")
    assert (task.encoding, task.media_type) == ("encoded_crop", "image/webp")
    assert len(task.pixels) < 224 * 224 * 3 * 0.7
    assert np.array_equal(pixels, decode_image(coffee_jpeg(), GEOM, 50_000_000).pixels)


def test_a_jpeg_hop_is_a_fifth_of_raw_and_close_to_it() -> None:
    task, pixels = through_the_hop("jpeg")
    assert (task.encoding, task.media_type, task.shape) == (
        "encoded_crop",
        "image/jpeg",
        (224, 224, 3),
    )
    assert len(task.pixels) < 224 * 224 * 3 / 4
    raw = decode_image(coffee_jpeg(), GEOM, 50_000_000).pixels
    # q95 with full chroma: about one grey level on average, never a shifted image.
    assert np.abs(pixels.astype(int) - raw).mean() < 2.0


def test_an_unknown_hop_encoding_is_refused_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGPIPE_HOP_ENCODING", "gif")
    with pytest.raises(ValueError, match="hop_encoding"):
        DownloaderSettings()


# --- `original`: small JPEGs forwarded as downloaded ---------------------------------


def photo_jpeg(
    w: int, h: int, name: str = "astronaut", quality: int = 90, mode: str = "RGB", **save: object
) -> bytes:
    img = Image.fromarray(getattr(skimage.data, name)()).convert(mode).resize((w, h))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **save)  # type: ignore[arg-type]
    return buf.getvalue()


def forwarded(data: bytes) -> InferenceTask:
    d = crop_decoder("original")(data, GEOM, 50_000_000)
    return InferenceTask(item_id="i", request_id="r", **d.frame())


# Around the edges the draft scale depends on: a shorter side of 256 (no draft),
# 511/512/513 (scale 1 or 2, depending on how the draft is asked), odd widths.
FORWARDED_SIZES = [
    (600, 400),
    (400, 600),
    (300, 300),
    (257, 256),
    (512, 512),
    (513, 512),
    (700, 512),
    (512, 1023),
    (1000, 511),
    (1200, 300),
]


@pytest.mark.parametrize(("w", "h"), FORWARDED_SIZES)
@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_an_original_frame_decodes_to_exactly_the_raw_crop(name: str, w: int, h: int) -> None:
    data = photo_jpeg(w, h, name)
    task = forwarded(data)
    assert (task.encoding, task.media_type, task.shape) == ("original", "image/jpeg", (h, w, 3))
    assert task.pixels == data  # the file itself: nothing decoded on the downloader
    got = decode(task.to_wire(), GEOM.crop)
    assert isinstance(got, Decoded) and got.needs_decode
    crop = PillowDecoder(GEOM.resize, GEOM.crop).one(got.task.pixels, False)
    # The pixel-exact contract: inference's decode of the file is the downloader's crop.
    assert np.array_equal(crop, decode_image(data, GEOM, 50_000_000).pixels)


@pytest.mark.parametrize(
    ("why", "data"),
    [
        ("larger than twice the resize target", photo_jpeg(1200, 800)),
        ("not a JPEG", png_bytes(600, 400)),
        ("grey, not RGB", photo_jpeg(600, 400, mode="L")),
        ("EXIF-rotated", photo_jpeg(600, 400, exif=rotated_exif())),
        ("bigger than the raw crop", photo_jpeg(512, 512, quality=100, subsampling=0)),
        ("a strip", photo_jpeg(4500, 300)),
    ],
)
def test_anything_else_goes_as_the_raw_crop(why: str, data: bytes) -> None:
    task = forwarded(data)
    assert task.encoding == "raw", why
    assert len(task.pixels) == 224 * 224 * 3
    assert task.pixels == decode_image(data, GEOM, 50_000_000).pixels.tobytes()


def test_a_real_time_item_is_never_forwarded() -> None:
    data = photo_jpeg(600, 400)
    d = crop_decoder("original", realtime=True)(data, GEOM, 50_000_000)
    assert d.frame()["encoding"] == "raw"
    assert np.array_equal(d.pixels, decode_image(data, GEOM, 50_000_000).pixels)


def test_an_original_that_is_corrupt_past_its_header_fails_on_the_inference_side() -> None:
    data = photo_jpeg(600, 400)
    task = forwarded(data[: len(data) // 2])  # only the header is read here
    assert task.encoding == "original"
    with pytest.raises(DecodeFailed):
        PillowDecoder(GEOM.resize, GEOM.crop).one(task.pixels, False)
