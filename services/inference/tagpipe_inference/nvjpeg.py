"""`decode: gpu` with `gpu_decoder: nvjpeg`: torchvision's `decode_jpeg(device="cuda")`
(nvJPEG, batched), then the CPU path's resize and centre crop on the GPU.

The second GPU decoder next to DALI (decoders.DaliDecoder), for machines that have
torch and torchvision with CUDA but not DALI's ~200 MB wheel (the GPU machine lent
for measurements). Imported only when chosen: CPU images carry no torch.

The crop is the CPU path's: `tagpipe_common.manifest.centre_crop`, the box that
`resample_plan` (the Pillow path) also crops, resized with bicubic weights and
antialiasing as Pillow's BICUBIC resamples. Two differences remain, both measured
by `make bench-gpu` as nvJPEG-against-Pillow top-1 agreement: nvJPEG's IDCT is not
libjpeg's, and Pillow decodes a large forwarded photo DCT-scaled (`draft`), which
nvJPEG does not.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tagpipe_common.manifest import centre_crop

from tagpipe_inference.decoders import MAX_PIXELS, DecodeFailed, U8Batch

# (JPEG byte tensors, device) -> CHW uint8 RGB tensors on that device.
JpegDecode = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def torchvision_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """nvJPEG through torchvision: one batched call for the whole list."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return out if isinstance(out, list) else [out]


def resize_crop(img: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """CHW uint8 -> the crop x crop centre of its shorter-side-`resize` resize (CHW uint8)."""
    h, w = img.shape[-2:]
    size, (left, top, right, bottom) = centre_crop(w, h, resize, crop)
    if size != (w, h):
        x = F.interpolate(
            img[None].float(), size=(size[1], size[0]), mode="bicubic", antialias=True
        )
        img = x.round_().clamp_(0, 255).to(torch.uint8)[0]
    return img[:, top:bottom, left:right]


def _header(payload: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; refuses what nvJPEG should not see."""
    try:
        with Image.open(io.BytesIO(payload)) as img:
            if img.format != "JPEG":
                raise DecodeFailed(f"nvJPEG decodes JPEG only, not {img.format}")
            w, h = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DecodeFailed(f"cannot read the payload's header: {exc}") from exc
    if w * h > MAX_PIXELS:
        raise DecodeFailed(f"{w}x{h} is over {MAX_PIXELS} pixels")
    return w, h


class NvjpegDecoder:
    """A batch of JPEGs decoded by nvJPEG; originals resized and cropped on the GPU."""

    name = "nvjpeg"

    def __init__(
        self, resize: int, crop: int, device: str = "cuda:0", jpeg: JpegDecode | None = None
    ) -> None:
        self.resize, self.crop = resize, crop
        self.device = torch.device(device)
        if jpeg is None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        self._jpeg = jpeg or torchvision_decode
        if jpeg is None:
            import torchvision.io  # noqa: F401  (an ImportError here means: no nvJPEG)

    def decode(self, payloads: Sequence[bytes], crops: Sequence[bool]) -> U8Batch:
        for p in payloads:
            _header(p)  # one bad payload fails the batch; decode_each retries each
        data = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads]
        images = self._jpeg(data, self.device)
        out = torch.empty(
            (len(payloads), 3, self.crop, self.crop), dtype=torch.uint8, device=self.device
        )
        for i, (img, is_crop) in enumerate(zip(images, crops, strict=True)):
            img = img if is_crop else resize_crop(img, self.resize, self.crop)
            if tuple(img.shape) != (3, self.crop, self.crop):
                raise DecodeFailed(
                    f"decoded to {tuple(img.shape)}, expected (3, {self.crop}, {self.crop})"
                )
            out[i] = img
        # One copy back for the batch; NHWC as every decoder answers.
        arr: U8Batch = np.ascontiguousarray(out.permute(0, 2, 3, 1).cpu().numpy())
        return arr


def pillow_jpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A stand-in for nvJPEG on machines without it (the CPU tests, the bench's dry
    run): a full Pillow decode to the same CHW tensors, so the rest of the decoder's
    path (geometry, batching, copies) runs as on the GPU."""
    out = []
    for t in data:
        with Image.open(io.BytesIO(t.numpy().tobytes())) as img:
            arr = np.asarray(img.convert("RGB"))
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).to(device))
    return out
