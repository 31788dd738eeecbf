"""Reading a bulk job's item list as a stream, validated, in bounded batches.

A job may hold millions of items, so the body is never held in memory: it is
parsed as it arrives (NDJSON line by line, a JSON array element by element),
each item validated, and handed on in batches (the gateway appends them to a
Redis Stream that any gateway replica can resume publishing from). A bad item
stops the upload with a 422 naming it (`body[12].url`, or `line[13]` for NDJSON).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from pydantic import ValidationError

from tagpipe_gateway.problems import ProblemCode, ProblemError, field_path
from tagpipe_gateway.schemas import JobItem

# One item is a URL of a few KiB: a longer NDJSON line or array element is refused.
MAX_LINE_BYTES = 1 << 20
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson", "text/plain")
_WS = " \t\r\n"


def check_url(url: str, max_len: int) -> str | None:
    """Why a URL is refused at the door, or None; the downloader checks the rest."""
    if len(url) > max_len:
        return f"URL longer than {max_len} characters"
    if not url.lower().startswith(("http://", "https://")):
        return "only http:// and https:// URLs are accepted"
    return None


def invalid(field: str, message: str) -> ProblemError:
    return ProblemError(
        422,
        ProblemCode.VALIDATION_ERROR,
        "Request validation failed",
        f"invalid field(s): {field}",
        errors=[{"field": field, "message": message}],
    )


Sink = Callable[[int, list[list[str | None]]], Awaitable[None]]


class Spool:
    """Validated items, handed to `sink(start_index, [[url, client_id], ...])` in batches."""

    def __init__(self, sink: Sink, max_items: int, max_url_len: int, batch: int = 256) -> None:
        self.sink = sink
        self.max_items = max_items
        self.max_url_len = max_url_len
        self.batch = batch
        self.count = 0
        self._pending: list[list[str | None]] = []

    async def add(self, raw: Any, where: str) -> None:
        if isinstance(raw, str):
            raw = {"url": raw}
        try:
            item = JobItem.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise invalid(field_path((where, *err["loc"])), err["msg"]) from None
        if (why := check_url(item.url, self.max_url_len)) is not None:
            raise invalid(f"{where}.url", why)
        self.count += 1
        if self.count > self.max_items:
            raise ProblemError(
                413,
                ProblemCode.PAYLOAD_TOO_LARGE,
                "Too many items",
                f"a job holds at most {self.max_items} items",
            )
        self._pending.append([item.url, item.id])
        if len(self._pending) >= self.batch:
            await self.flush()

    async def flush(self) -> None:
        if self._pending:
            start = self.count - len(self._pending)
            batch, self._pending = self._pending, []
            await self.sink(start, batch)


async def spool_ndjson(chunks: AsyncIterator[bytes], spool: Spool) -> None:
    """NDJSON objects, JSON strings, or bare URLs (a plain list), one per line."""
    buf = b""
    lineno = 0
    async for chunk in chunks:
        buf += chunk
        # Split only when a line ended: re-splitting a growing line on every
        # chunk is quadratic, and a line with no end must not fill memory.
        if b"\n" in chunk:
            *lines, buf = buf.split(b"\n")
            for line in lines:
                lineno += 1
                if len(line) > MAX_LINE_BYTES:
                    raise invalid(f"line[{lineno}]", "line longer than 1 MiB")
                await _ndjson_line(line, lineno, spool)
        if len(buf) > MAX_LINE_BYTES:
            raise invalid(f"line[{lineno + 1}]", "line longer than 1 MiB")
    if buf:
        await _ndjson_line(buf, lineno + 1, spool)
    await spool.flush()


async def _ndjson_line(line: bytes, lineno: int, spool: Spool) -> None:
    text = line.decode("utf-8", errors="replace").strip()
    if not text or text.startswith("#"):
        return
    where = f"line[{lineno}]"
    if text[0] in '{"':
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise invalid(where, f"not valid JSON: {exc}") from None
        except RecursionError:  # json's C scanner gives up on deep nesting
            raise invalid(where, "JSON nested too deeply") from None
    else:
        raw = text
    await spool.add(raw, where)


async def spool_json_array(chunks: AsyncIterator[bytes], spool: Spool) -> None:
    """A top-level JSON array of URLs or `{url, id}` objects, parsed element by element."""
    decoder = json.JSONDecoder()
    parser = _ArrayParser(decoder)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks may split a char
    async for chunk in chunks:
        for index, element in parser.feed(utf8.decode(chunk)):
            await spool.add(element, f"body[{index}]")
    parser.finish()
    await spool.flush()


class _ArrayParser:
    def __init__(self, decoder: json.JSONDecoder) -> None:
        self.decoder = decoder
        self.buf = ""
        self.started = False
        self.ended = False
        self.index = 0
        self.need_comma = False

    def feed(self, text: str) -> Iterator[tuple[int, Any]]:
        self.buf += text
        while True:
            self.buf = self.buf.lstrip(_WS)
            if not self.buf:
                return
            if self.ended:
                raise invalid("body", "unexpected data after the JSON array")
            if not self.started:
                if self.buf[0] != "[":
                    raise invalid("body", "expected a JSON array of items")
                self.started, self.buf = True, self.buf[1:]
                continue
            if self.buf[0] == "]":
                self.ended, self.buf = True, self.buf[1:]
                continue
            if self.need_comma:
                if self.buf[0] != ",":
                    raise invalid(f"body[{self.index}]", "expected ',' between items")
                self.need_comma, self.buf = False, self.buf[1:]
                continue
            try:
                value, end = self.decoder.raw_decode(self.buf)
            except RecursionError:
                raise invalid(f"body[{self.index}]", "JSON nested too deeply") from None
            except json.JSONDecodeError as exc:
                # An element cut by the chunk boundary: wait for more, unless it
                # is already too long to be one item.
                if len(self.buf) > 1 << 20:
                    raise invalid(f"body[{self.index}]", f"not valid JSON: {exc}") from None
                return
            if end == len(self.buf) and isinstance(value, int | float):
                return  # a number may continue in the next chunk
            self.buf = self.buf[end:]
            yield self.index, value
            self.index += 1
            self.need_comma = True

    def finish(self) -> None:
        if self.buf.strip(_WS):
            raise invalid(f"body[{self.index}]", "not valid JSON")
        if not self.ended:
            raise invalid("body", "the JSON array is not closed")
