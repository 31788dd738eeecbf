"""A manifest's bytes as numbered items: blocking and pure, run in a worker thread.

Each non-blank line is one item, numbered `seq` 0, 1, 2, ... in order: a JSON
object `{"url": ..., "id": ...}` (JSONL), a JSON string, or a bare URL (plain
text). A line that is none of these, or whose URL the gateway refuses, is still an
item: it carries the reason instead of a URL, and ends as an `invalid_url` result.

Resuming: for a plain source every entry says the byte offset just past its line,
so a reader restarts with a ranged read from there. A gzip stream cannot be entered
in the middle: the reader starts it again from byte 0 and skips the items already
published (`skip`), which costs a re-read (not a re-publish) of that part.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import ValidationError

from tagpipe_gateway.intake import MAX_LINE_BYTES, check_url
from tagpipe_gateway.schemas import JobItem

GZIP_MAGIC = b"\x1f\x8b"
_OUT_CHUNK = 1 << 20  # decompressed bytes per step: a bomb cannot fill memory


class ManifestError(Exception):
    """The manifest's bytes cannot be read on (a corrupt or truncated gzip stream)."""


@dataclass(frozen=True)
class Entry:
    seq: int
    url: str | None  # None: the line is malformed; `error` says why
    client_id: str | None
    error: str | None
    end: int  # offset just past this line in the source (plain), else 0
    raw: str = ""  # the start of a malformed line, for its result's `source`


def gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress gzip, several members too (what `cat a.gz b.gz` makes)."""
    d = zlib.decompressobj(wbits=31)
    try:
        for chunk in chunks:
            data = chunk
            while data:
                if d.eof:  # the next member
                    d = zlib.decompressobj(wbits=31)
                out = d.decompress(data, _OUT_CHUNK)
                if out:
                    yield out
                data = d.unused_data if d.eof else d.unconsumed_tail
        tail = d.flush()
    except zlib.error as exc:
        raise ManifestError(f"not a valid gzip stream: {exc}") from exc
    if tail:
        yield tail
    if not d.eof:
        raise ManifestError("the gzip stream is truncated")


def split_lines(chunks: Iterator[bytes], start: int) -> Iterator[tuple[bytes | None, int]]:
    """(line without its newline, offset just past it). A line still without its end
    past 1 MiB comes as None: the rest of its bytes are skipped, not held (a line
    whose end arrives in the same chunk may come whole and longer). `start` is the
    first chunk's offset."""
    pending, base, skipping = b"", start, False
    for chunk in chunks:
        data = pending + chunk if pending else chunk
        i = 0
        while (j := data.find(b"\n", i)) >= 0:
            yield (None if skipping else data[i:j]), base + j + 1
            skipping, i = False, j + 1
        rest = data[i:]
        if skipping or len(rest) > MAX_LINE_BYTES:
            skipping, pending, base = True, b"", base + len(data)
        else:
            pending, base = rest, base + i
    if skipping or pending:
        yield (None if skipping else pending), base + len(pending)


def parse_line(text: str, max_url_len: int) -> tuple[str | None, str | None, str | None]:
    """(url, client id, None) for a good line, (None, None, why) for a malformed one."""
    raw: object = text
    if text[0] in '{"':
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return None, None, f"not valid JSON: {exc}"
    if isinstance(raw, str):
        raw = {"url": raw}
    try:
        item = JobItem.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "line"
        return None, None, f"{where}: {err['msg']}"
    if (why := check_url(item.url, max_url_len)) is not None:
        return None, item.id, why
    return item.url, item.id, None


def entries(
    chunks: Iterator[bytes], gz: bool, seq: int, offset: int, max_url_len: int
) -> Iterator[Entry]:
    """The items from `seq` on. Plain: `chunks` start at byte `offset`. Gzip: `chunks`
    start at byte 0 and the first `seq` items are skipped."""
    lines = split_lines(gunzip(chunks) if gz else chunks, 0 if gz else offset)
    n = 0
    for line, end in lines:
        if line is not None and len(line) > MAX_LINE_BYTES:
            line = None
        text = "" if line is None else line.decode("utf-8", errors="replace").strip()
        if line is not None and not text:
            continue  # blank: not an item
        if gz and n < seq:
            n += 1
            continue
        n += 1
        pos = 0 if gz else end
        if line is None:
            yield Entry(seq, None, None, "line longer than 1 MiB", pos)
        else:
            url, cid, why = parse_line(text, max_url_len)
            yield Entry(seq, url, cid, why, pos, text[:200] if why else "")
        seq += 1


def take(it: Iterator[Entry], n: int) -> tuple[list[Entry], Exception | None]:
    """Up to `n` entries (fewer only at the end): one worker-thread hop per chunk. With
    the error that ended the read early, if one did: the entries before it are items."""
    out: list[Entry] = []
    try:
        for entry in it:
            out.append(entry)
            if len(out) >= n:
                break
    except Exception as exc:  # the caller decides; the iterator is finished either way
        return out, exc
    return out, None
