"""Decoding compressed inference frames (`encoded_crop`, `original`) into crops.

A raw frame is already the model's uint8 crop; the two compressed encodings
need decoding, and an `original` also the same resize and centre crop the
downloader applies (torchvision's Resize(resize) + CenterCrop(crop)), so the
model sees the same pixels whichever side decoded them.

Two decoders, one interface (`BatchDecoder.decode`: payloads in, NHWC uint8 crops out):

- `PillowDecoder`, on this process's CPU: the decoder for `decode: cpu`, the
  stand-in for the GPU one in unit tests, and the per-item retry that finds
  which payload of a failed GPU batch is corrupt;
- `DaliDecoder` (`decode: gpu`, `gpu_decoder: dali`, the default): NVIDIA DALI
  from PyPI (`nvidia-dali-cuda130`). Chosen over nvImageCodec because one DALI
  pipeline does the whole contract on the GPU in batches (nvJPEG decode with
  hybrid Huffman, shorter-side cubic resize, centre crop), as Triton's DALI
  backend does; nvImageCodec only decodes, and resize and crop would need a
  second GPU library (CV-CUDA) and glue;
- `nvjpeg.NvjpegDecoder` (`gpu_decoder: nvjpeg`): torchvision's nvJPEG decode and
  the same crop in torch, for machines with torch + torchvision but no DALI.

GPU decoders are imported only when `decode: gpu` asks for one, so CPU images
never carry them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image
from tagpipe_common.manifest import draft_size, resample_plan

from tagpipe_inference.providers import GpuUnavailable

log = logging.getLogger(__name__)

U8Batch = npt.NDArray[np.uint8]
# The downloader shrinks photos to a few times the crop before forwarding them;
# anything far larger is refused before its pixels are decoded.
MAX_PIXELS = 16_000_000


class DecodeFailed(ValueError):
    """A payload that is not a decodable image."""


class BatchDecoder(Protocol):
    name: str

    def decode(self, payloads: Sequence[bytes], crops: Sequence[bool]) -> U8Batch:
        """NHWC uint8 crops; `crops[i]` marks an `encoded_crop` (decode only)."""
        ...


class PillowDecoder:
    name = "cpu"

    def __init__(self, resize: int, crop: int) -> None:
        self.resize, self.crop = resize, crop

    def one(self, payload: bytes, is_crop: bool) -> npt.NDArray[np.uint8]:
        try:
            img: Image.Image = Image.open(io.BytesIO(payload))
            if img.width * img.height > MAX_PIXELS:
                raise DecodeFailed(f"{img.width}x{img.height} is over {MAX_PIXELS} pixels")
            if not is_crop and img.format == "JPEG" and min(img.size) > self.resize:
                # DCT-scaled decode asked as the downloader asks: the same scale, so
                # a forwarded original gives the crop the downloader would have made.
                img.draft("RGB", draft_size(img.width, img.height, self.resize))
            img = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DecodeFailed(f"cannot decode the payload: {exc}") from exc
        if not is_crop:
            to, src, box = resample_plan(img.width, img.height, self.resize, self.crop)
            img = img.resize(to, Image.Resampling.BICUBIC, box=src).crop(box)
        out = np.asarray(img, dtype=np.uint8)
        if out.shape != (self.crop, self.crop, 3):
            raise DecodeFailed(f"decoded to {out.shape}, expected ({self.crop}, {self.crop}, 3)")
        return out

    def decode(self, payloads: Sequence[bytes], crops: Sequence[bool]) -> U8Batch:
        return np.stack([self.one(p, c) for p, c in zip(payloads, crops, strict=True)])


class DaliDecoder:  # pragma: no cover - needs a GPU and the DALI wheel
    """Decode, resize and crop on the GPU, one DALI pipeline run per batch."""

    name = "gpu"

    def __init__(self, resize: int, crop: int, device_id: int, max_batch: int) -> None:
        from nvidia.dali import fn, pipeline_def, types

        self.crop = crop

        @pipeline_def(batch_size=max_batch, num_threads=2, device_id=device_id)  # type: ignore[untyped-decorator]
        def pipe(decode_only: bool) -> Any:
            data = fn.external_source(name="payloads", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(data, device="mixed", output_type=types.RGB)
            if not decode_only:
                img = fn.resize(img, resize_shorter=resize, interp_type=types.INTERP_CUBIC)
                img = fn.crop(img, crop=(crop, crop), out_of_bounds_policy="pad")
            return img

        self._pipes = {flag: pipe(decode_only=flag) for flag in (False, True)}
        for p in self._pipes.values():
            p.build()

    def _run(self, payloads: list[bytes], decode_only: bool) -> U8Batch:
        pipe = self._pipes[decode_only]
        pipe.feed_input("payloads", [np.frombuffer(p, dtype=np.uint8) for p in payloads])
        (out,) = pipe.run()
        arr: U8Batch = np.asarray(out.as_cpu().as_array(), dtype=np.uint8)
        return arr

    def decode(self, payloads: Sequence[bytes], crops: Sequence[bool]) -> U8Batch:
        out = np.empty((len(payloads), self.crop, self.crop, 3), dtype=np.uint8)
        for flag in (False, True):  # originals and crops take different pipelines
            idx = [i for i, c in enumerate(crops) if c == flag]
            if idx:
                out[idx] = self._run([payloads[i] for i in idx], decode_only=flag)
        return out


GpuFactory = Callable[[int, int, int, int], BatchDecoder]


def _dali(resize: int, crop: int, device_id: int, max_batch: int) -> BatchDecoder:
    return DaliDecoder(resize, crop, device_id, max_batch)


def _nvjpeg(resize: int, crop: int, device_id: int, max_batch: int) -> BatchDecoder:
    from tagpipe_inference.nvjpeg import NvjpegDecoder

    return NvjpegDecoder(resize, crop, f"cuda:{device_id}")


GPU_DECODERS: dict[str, GpuFactory] = {"dali": _dali, "nvjpeg": _nvjpeg}


def make_decoder(
    mode: str,
    resize: int,
    crop: int,
    *,
    device_id: int = 0,
    max_batch: int = 32,
    require_gpu: bool = False,
    gpu_decoder: str = "dali",
    gpu_factory: GpuFactory | None = None,
) -> BatchDecoder:
    """The decoder for `decode: cpu|gpu`, `gpu_decoder` naming the GPU one. A GPU
    decoder that cannot start is one warning line and the CPU decoder, or
    GpuUnavailable when the GPU is required."""
    if mode != "gpu":
        return PillowDecoder(resize, crop)
    factory = gpu_factory or GPU_DECODERS[gpu_decoder]
    try:
        return factory(resize, crop, device_id, max_batch)
    except Exception as exc:  # ImportError without the wheel; the library's errors without a GPU
        if require_gpu:
            raise GpuUnavailable(f"GPU decode required but unavailable: {exc}") from exc
        log.warning("GPU decode unavailable (%s); decoding on CPU", exc)
        return PillowDecoder(resize, crop)


def decode_each(
    decoder: BatchDecoder, fallback: PillowDecoder, payloads: Sequence[bytes], crops: Sequence[bool]
) -> list[npt.NDArray[np.uint8] | DecodeFailed]:
    """One crop or failure per payload: the batch at once, and only when the batch
    fails (one corrupt photo fails a whole GPU batch) each payload on its own."""
    try:
        return list(decoder.decode(payloads, crops))
    except Exception as exc:
        log.info("batch decode failed (%s); decoding its %d items one by one", exc, len(payloads))
    out: list[npt.NDArray[np.uint8] | DecodeFailed] = []
    for p, c in zip(payloads, crops, strict=True):
        try:
            out.append(fallback.one(p, c))
        except DecodeFailed as exc:
            out.append(exc)
    return out
