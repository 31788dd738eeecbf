"""The output format of jobs with an output prefix (tagpipe_common.output): pure functions."""

from __future__ import annotations

import gzip
import hashlib
import json

from tagpipe_common.messages import Tag, TagResult
from tagpipe_common.output import encode_shard, manifest, output_line, shard_name, shard_of


def _result(seq: int, ok: bool = True) -> TagResult:
    common = {"item_id": f"j-n{seq}", "job_id": "j", "seq": seq, "source": f"https://x/{seq}"}
    if ok:
        return TagResult(**common, status="ok", tags=[Tag(label="cat", score=0.5)])
    return TagResult(**common, status="error", code="dns_error", message="no host")


def test_shards_are_named_and_numbered_by_seq_alone() -> None:
    assert [shard_of(s, 1000) for s in (0, 999, 1000, 123_456)] == [0, 0, 1, 123]
    assert shard_name(7) == "shard-000007.jsonl.gz"


def test_a_line_carries_id_url_status_and_tags_or_code() -> None:
    ok = json.loads(output_line(_result(3).model_copy(update={"client_item_id": "sku-3"})))
    assert ok == {"id": "sku-3", "item_id": "j-n3", "seq": 3, "url": "https://x/3",
                  "status": "ok", "tags": [{"label": "cat", "score": 0.5}]}  # fmt: skip
    err = json.loads(output_line(_result(4, ok=False)))
    assert err["id"] == "j-n4" and (err["code"], err["message"]) == ("dns_error", "no host")
    assert "tags" not in err


def test_the_same_lines_give_the_same_bytes_in_any_order() -> None:
    lines = {str(s).encode(): output_line(_result(s, ok=s % 3 > 0)) for s in range(10)}
    shuffled = dict(reversed(list(lines.items())))
    data, record = encode_shard(0, lines)
    assert encode_shard(0, shuffled)[0] == data
    assert record.sha256 == hashlib.sha256(data).hexdigest() and record.lines == 10
    assert [json.loads(x)["seq"] for x in gzip.decompress(data).splitlines()] == list(range(10))
    assert (record.ok, record.errors) == (6, {"dns_error": 4})


def test_the_manifest_adds_up_its_shards() -> None:
    a = encode_shard(0, {b"0": output_line(_result(0)), b"1": output_line(_result(1, False))})[1]
    b = encode_shard(1, {b"2": output_line(_result(2, False))})[1]
    doc = json.loads(manifest("j", "cancelled", 5, 2, [b, a]))
    assert doc["shards"] == [{"name": s.name, "lines": s.lines, "sha256": s.sha256} for s in (a, b)]
    assert doc["counts"] == {"ok": 1, "error": 2, "not_run": 2}
    assert doc["error_codes"] == {"dns_error": 2} and doc["state"] == "cancelled"
    assert manifest("j", "cancelled", 5, 2, [a, b]) == manifest("j", "cancelled", 5, 2, [b, a])
