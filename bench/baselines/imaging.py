"""Decode -> crop -> batched onnxruntime, on Pillow and onnxruntime directly.

The same preprocessing the model manifest promises (torchvision Resize(256,
bicubic) + CenterCrop(224)), with the JPEG DCT-scaled decode (`Image.draft`)
that any competent Pillow user reaches for: a 12 MP photo is decoded at 1/8
scale instead of in full. Every baseline uses this, so none is handicapped by
a slower decode than tagpipe's.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from PIL import Image

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelFiles:
    path: Path
    input_name: str
    output_name: str
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: list[str]

    @classmethod
    def load(cls, model_dir: Path) -> ModelFiles:
        m = json.loads((model_dir / "manifest.json").read_text())
        pre = m["preprocess"]
        labels = (model_dir / m["labels_file"]).read_text().splitlines()
        return cls(
            model_dir / m["file"],
            m["input"]["name"],
            m["output"]["name"],
            pre["resize"],
            pre["crop"],
            tuple(pre["mean"]),
            tuple(pre["std"]),
            [s.strip() for s in labels if s.strip()],
        )


def decode_crop(data: bytes, resize: int = 256, crop: int = 224) -> U8:
    src = Image.open(io.BytesIO(data))
    if src.format == "JPEG" and min(src.size) > resize:
        scale = resize / min(src.size)
        src.draft("RGB", (int(src.width * scale + 0.999), int(src.height * scale + 0.999)))
    img = src.convert("RGB")
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize(
        (max(crop, round(w * scale)), max(crop, round(h * scale))), Image.Resampling.BICUBIC
    )
    left, top = (img.width - crop) // 2, (img.height - crop) // 2
    return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


class Classifier:
    """One onnxruntime session; `classify` takes a uint8 NHWC batch."""

    def __init__(self, files: ModelFiles, threads: int, spinning: bool = False) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # ORT's spinning threads steal the cores decode needs on a small box.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.files = files
        self.session = ort.InferenceSession(
            str(files.path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        std = np.asarray(files.std, dtype=np.float32)
        self._scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1).astype(np.float32)
        self._bias = (np.asarray(files.mean, dtype=np.float32) / std).reshape(1, 3, 1, 1)

    def classify(self, batch: U8, k: int = 5) -> list[list[tuple[str, float]]]:
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
        x *= self._scale
        x -= self._bias
        (logits,) = self.session.run([self.files.output_name], {self.files.input_name: x})
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        top = np.argsort(-probs, axis=1)[:, :k]
        return [
            [(self.files.labels[i], round(float(p[i]), 6)) for i in row]
            for row, p in zip(top, probs, strict=True)
        ]
