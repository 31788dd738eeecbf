"""The output of a job with an output prefix: gzip JSONL shards and `_manifest.json`.

Pure functions, shared by the result store (which stages each result as its line)
and the gateway's sink (which writes the shards and the manifest).

- Shard k holds the items with seq in [k*S, (k+1)*S), S the job's `shard_size`; its
  object is `{output}shard-{k:06d}.jsonl.gz`. Membership and names depend only on the
  manifest, and the bytes only on the lines (sorted by seq, gzip mtime 0), so a shard
  written again after a crash is the same object.
- One JSON line per item (`FORMAT`):
  `{"id", "item_id", "seq", "url", "status": "ok", "tags": [{"label", "score",
  "class_id"}], "model_version"}` or, for an error, `"status": "error", "code",
  "message"` instead of tags. `id` is the client's id when the manifest line had one,
  else the item id; keys with no value are left out.
- `_manifest.json`: every shard (name, lines, sha256 of the object's bytes), counts by
  status and by error code, and the job's final state.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tagpipe_common.messages import TagResult

FORMAT = "tagpipe.results.v1"
MANIFEST_NAME = "_manifest.json"
SHARD_CONTENT_TYPE = "application/gzip"
MANIFEST_CONTENT_TYPE = "application/json"


def shard_of(seq: int, shard_size: int) -> int:
    return seq // shard_size


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.jsonl.gz"


def output_line(r: TagResult) -> bytes:
    """The item's line in its shard (no newline)."""
    line: dict[str, Any] = {
        "id": r.client_item_id or r.item_id,
        "item_id": r.item_id,
        "seq": r.seq,
        "url": r.source,
        "status": r.status,
    }
    if r.status == "ok":
        line["tags"] = [t.model_dump(exclude_none=True) for t in r.tags]
        line["model_version"] = r.model_version
    else:
        line["code"], line["message"] = r.code, r.message
    return json.dumps(
        {k: v for k, v in line.items() if v is not None}, separators=(",", ":")
    ).encode()


@dataclass
class Shard:
    """A written shard, as `_manifest.json` lists it (plus the counts it adds up)."""

    name: str
    lines: int
    sha256: str
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Shard:
        return cls(**json.loads(raw))


def encode_shard(shard: int, staged: Mapping[bytes, bytes]) -> tuple[bytes, Shard]:
    """A shard's object bytes from its staged lines (seq -> line), and its record.

    Sorted by seq and gzipped with mtime 0 (no name in the header): the same lines
    always give the same bytes.
    """
    ordered = [staged[s] for s in sorted(staged, key=int)]
    body = b"".join(line + b"\n" for line in ordered)
    data = gzip.compress(body, compresslevel=6, mtime=0)
    record = Shard(shard_name(shard), len(ordered), hashlib.sha256(data).hexdigest())
    for line in ordered:
        item = json.loads(line)
        if item["status"] == "ok":
            record.ok += 1
        else:
            record.errors[item["code"]] = record.errors.get(item["code"], 0) + 1
    return data, record


def manifest(
    job_id: str, state: str, total: int | None, shard_size: int, shards: Iterable[Shard]
) -> bytes:
    """`_manifest.json`: deterministic for the same job, state and shards."""
    listed = sorted(shards, key=lambda s: s.name)
    lines = sum(s.lines for s in listed)
    errors: dict[str, int] = {}
    for s in listed:
        for code, n in s.errors.items():
            errors[code] = errors.get(code, 0) + n
    ok = sum(s.ok for s in listed)
    doc = {
        "format": FORMAT,
        "job_id": job_id,
        "state": state,
        "total": total,
        "shard_size": shard_size,
        "lines": lines,
        # Items with no line: only a cancelled job has any (never run).
        "counts": {"ok": ok, "error": lines - ok, "not_run": max((total or lines) - lines, 0)},
        "error_codes": dict(sorted(errors.items())),
        "shards": [{"name": s.name, "lines": s.lines, "sha256": s.sha256} for s in listed],
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
