"""bench-scale's tiny model is a model directory the real inference loader accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tagpipe_inference.model import load_model

from bench.scale_support import CLASSES, CROP, tiny_model


def test_tiny_model_loads_and_predicts_through_the_real_loader(tmp_path: Path) -> None:
    model = load_model(tiny_model(tmp_path / "tiny"))
    assert model.input_hw == (CROP, CROP)
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, size=(5, CROP, CROP, 3), dtype=np.uint8)
    scores = model.predict(batch)
    assert scores.shape == (5, CLASSES)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    # Different pixels, different scores: the graph computes, it is no constant.
    assert not np.allclose(scores[0], scores[1])
    assert model.top_k(scores[0], 3)[0].label.startswith("class-")
