"""`make model`'s build script: the torch-vs-onnxruntime check and the up-to-date skip."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import onnxruntime as ort
import pytest
from tagpipe_common.manifest import MANIFEST_FILE, ModelManifest

SCRIPT = Path(__file__).resolve().parents[2] / "services/inference/build_model.py"


@pytest.fixture(scope="module")
def build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_built_directory_is_up_to_date_until_its_file_changes(
    build: ModuleType, model_dir: Path, tmp_path: Path
) -> None:
    assert build.is_up_to_date(model_dir)
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.onnx").symlink_to((model_dir / "model.onnx").resolve())
    shutil.copy(model_dir / "labels.txt", d / "labels.txt")
    doc = json.loads((model_dir / MANIFEST_FILE).read_text())
    (d / MANIFEST_FILE).write_text(json.dumps(doc))
    assert build.is_up_to_date(d)
    (d / MANIFEST_FILE).write_text(json.dumps({**doc, "sha256": "f" * 64}))
    assert not build.is_up_to_date(d)
    (d / MANIFEST_FILE).unlink()
    assert not build.is_up_to_date(d)


def test_the_manifest_describes_the_lite0_preprocessing(model_dir: Path) -> None:
    doc = json.loads((model_dir / MANIFEST_FILE).read_text())
    pre = doc["preprocess"]
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == (256, 224, "bicubic")
    assert pre["mean"] == [127 / 255] * 3 and pre["std"] == [128 / 255] * 3
    assert doc["num_classes"] == 1000 and doc["output_kind"] == "logits"


@pytest.mark.slow
def test_the_export_check_rejects_onnx_that_disagrees_with_torch(
    build: ModuleType, tmp_path: Path
) -> None:
    import torch

    net = build.build_torch_net()
    path = tmp_path / "model.onnx"
    build.export(net, path)
    assert build.verify(net, path) <= build.TOLERANCE
    with torch.no_grad():
        net._fc.bias += 1e-3  # a drift far below what top-1 would notice, above tolerance
    with pytest.raises(build.BuildError, match="disagree"):
        build.verify(net, path)


def linked_copy(model_dir: Path, d: Path) -> Path:
    d.mkdir()
    (d / "model.onnx").symlink_to((model_dir / "model.onnx").resolve())
    shutil.copy(model_dir / "labels.txt", d / "labels.txt")
    doc = json.loads((model_dir / MANIFEST_FILE).read_text())
    doc.pop("variants", None)  # a directory built before FP16 variants existed
    (d / MANIFEST_FILE).write_text(json.dumps(doc))
    return d


def test_the_fp16_variant_agrees_with_fp32_on_real_photos(
    build: ModuleType, model_dir: Path, tmp_path: Path
) -> None:
    d = linked_copy(model_dir, tmp_path / "m")
    assert build.is_up_to_date(d) and not build.fp16_up_to_date(d)
    build.add_fp16(d)
    v = ModelManifest.load(d).variants["fp16"]
    assert v.file == "model.fp16.onnx" and build.fp16_up_to_date(d)
    assert v.checked_images == 42  # 7 photos: whole, mirrored, four halves
    assert v.top1_agreement is not None and v.top1_agreement >= build.FP16_MIN_AGREEMENT
    # Half the bytes, float32 in and out: the service feeds it unchanged.
    assert (d / v.file).stat().st_size < 0.6 * (d / "model.onnx").stat().st_size
    session = ort.InferenceSession(str(d / v.file), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]


def test_an_fp16_variant_that_disagrees_is_never_written(
    build: ModuleType, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = linked_copy(model_dir, tmp_path / "m")
    monkeypatch.setattr(build, "top1_agreement", lambda *_: 0.9)
    with pytest.raises(build.BuildError, match=r"FP16 top-1 agrees with FP32 on 90\.0% of 42"):
        build.add_fp16(d)
    assert not (d / "model.fp16.onnx").exists()
    assert "fp16" not in ModelManifest.load(d).variants
