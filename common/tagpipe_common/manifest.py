"""The model manifest: what a model directory promises about its model.

Both tiers read it: the downloader takes the resize/crop geometry (it ships
uint8 crops, the cheapest thing to move), and inference takes the normalisation,
layout and output shape. One model directory therefore fully defines a model,
and swapping models is configuration, not code (like a Triton/KServe repository).

A model directory holds `manifest.json`, the ONNX file and a labels file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"


class PreprocessSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resize: Annotated[int, Field(ge=8, le=4096)]  # shorter side after resize
    crop: Annotated[int, Field(ge=8, le=4096)]  # centre crop, square
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"
    # Applied by inference to [0, 1] pixels: (x - mean) / std, per channel (RGB).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def draft_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """The size a JPEG's DCT-scaled decode (Pillow's `draft`) is asked for: the
    smallest one, same aspect, whose shorter side is still >= `resize`.

    Both tiers decode JPEGs (the downloader its downloads, inference the
    originals it is forwarded), and draft picks its 1/2-1/8 scale from this
    request: asked the same, they decode the same pixels.
    """
    scale = resize / min(width, height)
    return max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))


Box = tuple[int, int, int, int]


def centre_crop(width: int, height: int, resize: int, crop: int) -> tuple[tuple[int, int], Box]:
    """torchvision's Resize(resize) + CenterCrop(crop): the size the shorter side
    is resized to, and the crop's box inside that size."""
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    left = round((size[0] - crop) / 2.0)
    top = round((size[1] - crop) / 2.0)
    return size, (left, top, left + crop, top + crop)


# Past this many times the crop's area, the resized photo (a long strip: a
# 1 x 65000 PNG is a few hundred bytes) is never made: only the crop's own box
# is resampled, in both directions.
_MAX_STRIP = 16


def resample_plan(
    width: int, height: int, resize: int, crop: int
) -> tuple[tuple[int, int], tuple[float, float, float, float], Box]:
    """Resize + CenterCrop as one Pillow resample: the size to resample to, the
    source box to resample, and the box to crop from the result.

    Pillow resamples in two passes, horizontal first. Only the crop's columns
    go through both, so a landscape 640x480 photo costs about a third less; its
    rows are still all resampled, with the textbook's weights. The box's float
    edges move about one value in ten thousand by a grey level or two against
    the full resize (portrait photos: none); on `make bench-hop`'s 480 crops of
    real photos the top-1 agrees on all. (A box that also cuts the rows changes
    the vertical pass: up to 4 grey levels in a sixth of the values, so only
    strips get one.) Both tiers resample through this, so a forwarded original
    still decodes to exactly the downloader's crop.
    """
    size, (left, top, right, bottom) = centre_crop(width, height, resize, crop)
    if size == (width, height):  # already at size: Pillow copies, the crop is exact
        return size, (0.0, 0.0, float(width), float(height)), (left, top, right, bottom)
    sx, sy = width / size[0], height / size[1]
    if size[0] * size[1] > _MAX_STRIP * resize * resize:
        return (crop, crop), (left * sx, top * sy, right * sx, bottom * sy), (0, 0, crop, crop)
    return (crop, size[1]), (left * sx, 0.0, right * sx, float(height)), (0, top, crop, bottom)


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "float16"] = "float32"


class ModelVariant(BaseModel):
    """Another file of the same model, e.g. `fp16`: weights in half precision with
    float32 inputs and outputs, so preprocessing and results read it unchanged."""

    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    # What the build checked before it wrote the variant: top-1 agreement with
    # the main file on real photos (a fraction), and how many photos.
    top1_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    checked_images: int | None = None


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    file: str = "model.onnx"
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    labels_file: str = "labels.txt"
    num_classes: Annotated[int, Field(ge=1)]
    input: TensorSpec
    output: TensorSpec
    output_kind: Literal["logits", "probabilities"] = "logits"
    preprocess: PreprocessSpec
    variants: dict[str, ModelVariant] = Field(default_factory=dict)

    @classmethod
    def load(cls, model_dir: Path) -> ModelManifest:
        return cls.model_validate_json((model_dir / MANIFEST_FILE).read_bytes())

    def save(self, model_dir: Path) -> None:
        # No empty `variants`: a manifest without one stays readable by older builds.
        skip = None if self.variants else {"variants"}
        text = self.model_dump_json(indent=2, exclude=skip)
        # Atomic: a service or test reading the directory never sees half a manifest.
        tmp = model_dir / f".{MANIFEST_FILE}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(model_dir / MANIFEST_FILE)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
