"""Model directory validation and postprocessing, on the real model built by `make model`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tagpipe_common.manifest import MANIFEST_FILE, ModelManifest
from tagpipe_inference.model import Model, ModelLoadError, load_model, softmax
from tagpipe_inference.providers import choose_providers


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Model:
    return load_model(model_dir, intra_op_threads=1)


def copy_model_dir(src: Path, dst: Path) -> Path:
    """A writable copy; the big ONNX file is linked, not copied."""
    dst.mkdir()
    m = ModelManifest.load(src)
    (dst / m.file).symlink_to((src / m.file).resolve())
    shutil.copy(src / m.labels_file, dst / m.labels_file)
    shutil.copy(src / MANIFEST_FILE, dst / MANIFEST_FILE)
    return dst


def edit_manifest(d: Path, **changes: object) -> None:
    doc = json.loads((d / MANIFEST_FILE).read_text())
    doc.update(changes)
    (d / MANIFEST_FILE).write_text(json.dumps(doc))


def test_the_default_model_loads(model: Model) -> None:
    assert model.name == "efficientnet-lite0"
    assert len(model.labels) == model.manifest.num_classes == 1000
    assert "CPUExecutionProvider" in model.providers


def test_a_wrong_checksum_stops_loading(model_dir: Path, tmp_path: Path) -> None:
    d = copy_model_dir(model_dir, tmp_path / "m")
    edit_manifest(d, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(d)


def test_missing_labels_stop_loading(model_dir: Path, tmp_path: Path) -> None:
    d = copy_model_dir(model_dir, tmp_path / "m")
    (d / "labels.txt").unlink()
    with pytest.raises(ModelLoadError, match=r"labels file .* is missing"):
        load_model(d)


def test_a_short_labels_file_stops_loading(model_dir: Path, tmp_path: Path) -> None:
    d = copy_model_dir(model_dir, tmp_path / "m")
    lines = (d / "labels.txt").read_text().splitlines()
    (d / "labels.txt").write_text("\n".join(lines[:999]) + "\n")
    with pytest.raises(ModelLoadError, match="999 labels"):
        load_model(d)


def test_an_output_size_not_matching_the_classes_stops_loading(
    model_dir: Path, tmp_path: Path
) -> None:
    # Manifest and labels agree on 10 classes, but the network outputs 1000.
    d = copy_model_dir(model_dir, tmp_path / "m")
    edit_manifest(d, num_classes=10)
    (d / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    with pytest.raises(ModelLoadError, match=r"output shape .* does not match 10 classes"):
        load_model(d)


def test_a_wrong_input_name_stops_loading(model_dir: Path, tmp_path: Path) -> None:
    d = copy_model_dir(model_dir, tmp_path / "m")
    edit_manifest(d, input={"name": "pixels", "layout": "NCHW", "dtype": "float32"})
    with pytest.raises(ModelLoadError, match="no input 'pixels'"):
        load_model(d)


def test_a_missing_manifest_names_make_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="make model"):
        load_model(tmp_path)


def test_the_service_exits_2_on_a_bad_model_dir(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tagpipe_inference"],
        env={"TAGPIPE_MODEL_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "cannot serve model" in proc.stderr


def test_providers_keep_preference_order_and_fall_back_to_cpu() -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(preferred, available) == available
    assert choose_providers(["TensorrtExecutionProvider"], ["CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]


def test_softmax_rows_sum_to_one_and_keep_order() -> None:
    logits = np.array([[1.0, 3.0, 2.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    p = softmax(logits.copy())
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert list(np.argsort(-p[0])) == [1, 2, 0]
    assert np.isfinite(p).all()  # no overflow on large logits


def test_top_k_is_sorted_labelled_and_respects_min_score(model: Model) -> None:
    scores = np.zeros(1000, dtype=np.float32)
    scores[[281, 967, 504, 7]] = [0.5, 0.3, 0.15, 0.05]
    tags = model.top_k(scores, k=3)
    assert [t.class_id for t in tags] == [281, 967, 504]
    assert [t.label for t in tags] == ["tabby cat", "espresso", "coffee mug"]
    assert tags[0].score == pytest.approx(0.5)
    assert [t.class_id for t in model.top_k(scores, k=5, min_score=0.1)] == [281, 967, 504]
    assert model.top_k(scores, k=5000)[0].class_id == 281  # k is clamped to the classes


def test_preprocess_normalises_and_transposes(model: Model) -> None:
    batch = np.zeros((2, 224, 224, 3), dtype=np.uint8)
    batch[0, 0, 0] = [0, 127, 255]
    batch[1] = 255
    x = model.preprocess(batch)
    assert x.shape == (2, 3, 224, 224) and x.dtype == np.float32
    # (v/255 - 127/255) / (128/255) = (v - 127) / 128
    np.testing.assert_allclose(x[0, :, 0, 0], [-127 / 128, 0.0, 128 / 128], atol=1e-6)
    np.testing.assert_allclose(x[1], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="batch shape"):
        model.preprocess(np.zeros((1, 200, 200, 3), dtype=np.uint8))


def test_predict_returns_probabilities_per_image(model: Model) -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    p = model.predict(batch)
    assert p.shape == (3, 1000)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-4)
    single = model.predict(batch[1:2])
    np.testing.assert_allclose(single[0], p[1], atol=1e-5)  # batching changes nothing


def test_the_memory_pattern_is_off_unless_asked(model: Model, model_dir: Path) -> None:
    # Off: a planned block per batch size grew the CPU arena under dynamic batches.
    assert model.session.get_session_options().enable_mem_pattern is False
    with_pattern = load_model(model_dir, intra_op_threads=1, mem_pattern=True)
    assert with_pattern.session.get_session_options().enable_mem_pattern is True
    x = np.random.default_rng(3).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.predict(x), with_pattern.predict(x), atol=1e-5)


def test_run_at_most_gives_the_session_no_batch_past_the_cap(model: Model) -> None:
    x = model.preprocess(np.random.default_rng(4).integers(0, 256, (7, 224, 224, 3), np.uint8))
    seen: list[int] = []
    real = model.session.run

    def spy(out: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        seen.append(len(next(iter(feed.values()))))
        return real(out, feed)

    model.session.run = spy  # type: ignore[method-assign]
    try:
        scores = model.run_at_most(x, 3)
    finally:
        del model.session.run
    assert seen == [3, 3, 1]
    np.testing.assert_allclose(scores, model.run(x), atol=1e-5)
