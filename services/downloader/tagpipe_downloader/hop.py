"""The inference hop's payload: the model's crop, compressed (`encoded_crop`).

A raw crop is 224 x 224 x 3 = 150,528 bytes, and every byte of it is written
into JetStream, stored, read back and copied through two clients: at the
design rate of 6,250 images/s that is about 0.94 GB/s into the stream, three
times that with replicated streams.

The codec is a setting (`TAGPIPE_HOP_ENCODING`), because it trades bytes
against the model's answers and a little CPU on each side. `make bench-hop`
measures the candidates on real photographs (bench/results/hop-encoding.json):

- `raw` (the default): the pixels as they are. On one node it is also the
  cheapest in CPU: the whole hop costs ~1 ms per frame through nats-server,
  less than JPEG's encode and decode alone (~1.1 ms);
- `jpeg`: quality 95, full chroma (4:4:4; 4:2:0 is what flips classes): about
  27 KB, a fifth of raw, but it changes the top-1 class of about 6 % of those
  crops, all of them near-ties (+-1 grey level of noise alone flips ~10 %).
  For deployments where the stream's bytes bind (replicated streams, the
  network), accepting that;
- `webp-lossless`: the same pixels, so the same answers, at about 55 KB, for
  ~4 ms more CPU per image;
- `original`: a small JPEG (shorter side up to twice the resize target: web
  photos, thumbnails) is sent as downloaded, and inference decodes and crops it
  with the same draft, resize and crop: the same pixels, so the same answers,
  in the file's own bytes. Larger photos and other formats go raw. It moves
  that decode to the inference tier, and saves this tier's decode hand-off and
  the bigger frame: 0.2-1.6 ms of CPU per such photo in four runs on this box
  (docs/benchmarks.md). The downloader's header check still refuses what is
  not an image; a body that is corrupt past its header gets its decode_error
  from inference instead.

The inference tier decodes whatever it is sent (tagpipe_inference.decoders),
so the setting can change one downloader at a time.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from tagpipe_downloader.decode import Decoded, Geometry, decode_image
from tagpipe_downloader.forward import forward_small

HopEncoding = Literal["raw", "jpeg", "webp-lossless", "original"]


@dataclass(frozen=True)
class Codec:
    media_type: str
    pillow_format: str
    options: dict[str, Any]


CODECS: dict[str, Codec] = {
    "jpeg": Codec("image/jpeg", "JPEG", {"quality": 95, "subsampling": 0}),
    # method 0: the fastest effort; a higher one saves a few % for several times the CPU.
    "webp-lossless": Codec("image/webp", "WEBP", {"lossless": True, "method": 0}),
}


def encode_crop(pixels: npt.NDArray[np.uint8], codec: Codec) -> bytes:
    """The crop (HWC uint8 RGB) compressed with `codec`."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=codec.pillow_format, **codec.options)
    return buf.getvalue()


def hop_payload(pixels: npt.NDArray[np.uint8], encoding: HopEncoding) -> tuple[bytes, str | None]:
    """(payload, media_type) for an InferenceTask: compressed, or raw (media_type None).
    A crop under `original` is one that could not go as its file: raw."""
    if encoding in ("raw", "original"):
        return pixels.tobytes(), None
    codec = CODECS[encoding]
    return encode_crop(pixels, codec), codec.media_type


def crop_decoder(
    encoding: HopEncoding, realtime: bool = False
) -> Callable[[bytes, Geometry, int], Decoded]:
    """`decode_image`, then the crop compressed for the hop (in the same decode thread);
    for `original`, the small JPEGs forwarded as they are (forward.py). A real-time
    item is never forwarded: decoded here on the downloader's real-time threads, it
    does not queue behind bulk decodes on the inference side (p95 in benchmarks.md)."""
    if encoding == "original":
        return decode_image if realtime else forward_small

    def decode(data: bytes, geom: Geometry, max_pixels: int) -> Decoded:
        decoded = decode_image(data, geom, max_pixels)
        if encoding != "raw":
            t0 = time.perf_counter()
            payload, media_type = hop_payload(decoded.pixels, encoding)
            decoded.encoded = (payload, media_type or "")
            decoded.preprocess_ms += (time.perf_counter() - t0) * 1000
        return decoded

    return decode
