"""The torch runtime (`runtime: torch`) on the CPU: the model directory's ONNX file,
converted by `onnx_torch`, answers as onnxruntime does on real photos.

The GPU machine runs the same module on CUDA (FP32, FP16 channels-last, CUDA
graphs); here the conversion, the session surface, the FP16 channels-last path and
the settings wiring run on the CPU, against onnxruntime's own answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from tagpipe_downloader.decode import Geometry, decode_image
from tagpipe_inference.model import Model, load_model
from tagpipe_inference.providers import CPU, CUDA, GpuOptions, GpuUnavailable
from tagpipe_inference.settings import InferenceSettings

torch = pytest.importorskip("torch")  # the dev venv has it (the `model` extra)

from tagpipe_inference.onnx_torch import UnsupportedGraph, convert  # noqa: E402
from tagpipe_inference.torch_runtime import (  # noqa: E402
    TORCH_CPU,
    TorchOptions,
    TorchRuntimeError,
    TorchSession,
)

from tests.unit.test_gpu_decode import real_photos  # noqa: E402

GEOM = Geometry(256, 224, "bicubic")


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """The downloader's crops of the sample photos (scikit-image), 24 of them."""
    return np.stack([decode_image(b, GEOM, 50_000_000).pixels for _, b in real_photos()])


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Model:
    return load_model(model_dir, intra_op_threads=1)


@pytest.fixture(scope="module")
def torch_model(model_dir: Path) -> Model:
    return load_model(model_dir, [CPU], intra_op_threads=1, runtime="torch")


def test_torch_agrees_with_onnxruntime_on_real_photos(
    reference: Model, torch_model: Model, crops: np.ndarray
) -> None:
    assert torch_model.providers == [TORCH_CPU]
    x = reference.preprocess(crops)
    ort_scores, torch_scores = reference.run(x), torch_model.run(x)
    assert np.array_equal(ort_scores.argmax(1), torch_scores.argmax(1))
    # Same float32 arithmetic in another order: probabilities within rounding.
    assert np.abs(ort_scores - torch_scores).max() < 1e-4
    top_ort = reference.top_k(ort_scores[0], 5)
    assert [t.label for t in torch_model.top_k(torch_scores[0], 5)] == [t.label for t in top_ort]


def test_fp16_channels_last_keeps_top1_on_real_photos(
    model_dir: Path, reference: Model, crops: np.ndarray
) -> None:
    # The CUDA path's precision and layout, run on the CPU: slow, but the same module.
    session = TorchSession(model_dir / "model.onnx", TorchOptions(fp16=True))
    assert session.precision == "fp16"
    assert session.module.layers["l0"].weight.is_contiguous(memory_format=torch.channels_last)
    x = reference.preprocess(crops[:8])
    (half,) = session.run(["logits"], {"input": x})
    assert half.dtype == np.float32 and half.shape == (8, 1000)
    assert np.array_equal(half.argmax(1), reference.run(x).argmax(1))


def test_the_session_answers_as_onnxruntime_does(model_dir: Path, torch_model: Model) -> None:
    session = torch_model.session
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.shape[1:]) == ("input", [3, 224, 224])
    assert (out.name, out.shape[1:]) == ("logits", [1000])
    # Any batch size: the flatten before the classifier reads the batch at run time.
    for n in (1, 3):
        (y,) = session.run(["logits"], {"input": np.zeros((n, 3, 224, 224), np.float32)})
        assert y.shape == (n, 1000)


def test_padding_is_folded_and_fused_into_the_convolutions(model_dir: Path) -> None:
    graph = onnx.load(str(model_dir / "model.onnx"))
    module = convert(graph)
    ops = [s.op for s, _ in module.steps]
    assert len(graph.graph.node) > 3 * len(ops)  # the padding arithmetic is folded away
    assert "Constant" not in ops and "ConstantOfShape" not in ops
    # Only the stride-2 layers keep a Pad: TF's "same" padding is one-sided there.
    assert 0 < ops.count("Pad") < ops.count("Conv") // 4


def test_an_unsupported_operator_is_named(model_dir: Path) -> None:
    graph = onnx.load(str(model_dir / "model.onnx"))
    first = next(n for n in graph.graph.node if n.op_type == "Clip")
    first.op_type = "Erf"
    with pytest.raises(UnsupportedGraph, match="Erf"):
        convert(graph)


def test_gpu_asked_without_cuda_warns_or_refuses(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback cannot happen here")
    with caplog.at_level(logging.WARNING):
        m = load_model(model_dir, [CUDA, CPU], gpu=GpuOptions(fp16=True), runtime="torch")
    assert m.providers == [TORCH_CPU]  # and FP32: the CPU runs FP16 slower
    assert m.session.precision == "fp32"  # type: ignore[attr-defined]
    assert any("no CUDA device" in r.getMessage() for r in caplog.records)
    with pytest.raises(GpuUnavailable, match="torch runtime"):
        load_model(model_dir, [CUDA, CPU], gpu=GpuOptions(require_gpu=True), runtime="torch")


def test_a_file_that_is_not_onnx_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(TorchRuntimeError, match=r"cannot convert .*model\.onnx"):
        TorchSession(bad)


def test_the_settings_select_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGPIPE_RUNTIME", "torch")
    monkeypatch.setenv("TAGPIPE_CUDA_GRAPHS", "true")
    s = InferenceSettings()
    assert s.runtime == "torch" and s.gpu_options.cuda_graphs
    assert InferenceSettings(runtime="onnxruntime").runtime == "onnxruntime"
    with pytest.raises(ValueError):
        InferenceSettings(runtime="tensorflow")
