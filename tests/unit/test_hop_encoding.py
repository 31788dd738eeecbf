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
from tagpipe_inference.decoders import PillowDecoder
from tagpipe_inference.items import Decoded, decode

GEOM = Geometry(256, 224, "bicubic")


def coffee_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, format="JPEG", quality=90)  # type: ignore[no-untyped-call]
    return buf.getvalue()


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
