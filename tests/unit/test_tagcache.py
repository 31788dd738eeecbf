"""The tag cache's pure rules: which model an entry belongs to, and that an entry
answers an item's options exactly as the model's own top-k would."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import TaskOptions
from tagpipe_common.tagcache import CachedTags, ModelIdentity, content_digest
from tagpipe_inference.model import Model

LABELS = SimpleNamespace(labels=[f"class-{i}" for i in range(50)])


def top_k(row: np.ndarray, k: int, min_score: float = 0.0) -> list:  # type: ignore[type-arg]
    return Model.top_k(LABELS, row, k, min_score)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(5))
def test_an_entry_answers_any_shallower_options_as_the_model_would(seed: int) -> None:
    row = np.random.default_rng(seed).random(50).astype(np.float32)
    entry = CachedTags(model="m", model_version="1", top_k=10, tags=top_k(row, 10))
    for k in (1, 3, 10):
        for floor in (0.0, 0.5, 0.9, 0.99):
            assert entry.answer(TaskOptions(top_k=k, min_score=floor)) == top_k(row, k, floor)
    assert entry.answer(TaskOptions(top_k=11)) is None  # deeper than stored: a miss


def test_the_key_names_model_version_and_file() -> None:
    a = ModelIdentity("m", "1.0.0", "ab" * 32)
    assert len({a.key, ModelIdentity("m", "1.0.1", "ab" * 32).key}) == 2
    assert len({a.key, ModelIdentity("m", "1.0.0", "cd" * 32).key}) == 2
    digest = content_digest(b"\xff\xd8 the same bytes")
    assert RedisKeys("p").tag_cache(a.key, digest) == f"p:tagcache:m:1.0.0:{'ab' * 8}:{digest}"
    assert content_digest(b"x") != content_digest(b"y") and len(digest) == 64


def test_cached_reaches_every_result_the_api_serves() -> None:
    from tagpipe_common.messages import TagResult
    from tagpipe_gateway.schemas import ItemResult, JobResultLine

    hit = TagResult(item_id="i", job_id="j", status="ok", cached=True)
    miss = hit.model_copy(update={"cached": False})
    assert ItemResult.of(0, "i", "u", hit).cached  # real-time responses, GET /v1/results
    assert not ItemResult.of(0, "i", "u", miss).cached
    line = {**hit.model_dump(mode="json"), "cursor": "1-0"}
    assert JobResultLine.model_validate(line).cached  # job result lines
