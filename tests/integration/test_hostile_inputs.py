"""Hostile images and hostile URLs through the real download worker (real NATS,
Redis and HTTP), end to end: each ends as one clear error code, or as a correct
tensor where the image is legitimately decodable, and the worker neither crashes
nor hangs. The decoder's unit tests cover most formats one function deep; this
drives them, and what they do not cover, through the worker.

SSRF: the image server is on 127.0.0.2 (allowlisted); a canary server on
127.0.0.1 is not. Every URL spelling and redirect aimed at it must be refused
before a connection: the canary must see zero requests.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tagpipe_common.messages import TagResult

from bench.imageserver import ImageServer, make_jpeg
from tests.integration.test_downloader_worker import (  # noqa: F401 (fixtures)
    Harness,
    Start,
    h,
    start,
)

# How long an item may take before the test calls the worker hung (generous on
# purpose: this bounds a hang on a loaded 2-core runner, it measures no speed).
HANG_S = 60.0

pytestmark = [
    pytest.mark.integration,
    # As tagpipe-downloader does process-wide (its __main__): Pillow's warnings are noise.
    pytest.mark.filterwarnings(r"ignore:::PIL\."),
]


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_chunk_before_iend(png: bytes, chunk: bytes) -> bytes:
    at = png.rindex(b"IEND") - 4
    return png[:at] + chunk + png[at:]


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Main-Class: Evil\n")
        z.writestr("Evil.class", b"\xca\xfe\xba\xbe" + bytes(64))
    return buf.getvalue()


def exif_bomb_jpeg() -> bytes:
    """A JPEG whose 64 KiB EXIF holds an IFD chain that loops on itself and
    thousands of entries pointing far outside the segment."""
    entries = 4000
    ifd = struct.pack("<H", entries)
    for k in range(entries):
        ifd += struct.pack("<HHII", 0x010F + k % 64, 7, 0xFFFFFFF0, 8)  # huge UNDEFINED blobs
    ifd += struct.pack("<I", 8)  # next IFD: itself
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd
    app1 = b"Exif\x00\x00" + tiff[: 65533 - 8]
    base = make_jpeg(320, 240)
    return base[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + base[2:]


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (60, 40), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0, duration=50)


def huge_screen_gif() -> bytes:
    """A 1x1 frame on a declared 65535 x 65535 logical screen."""
    gif = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    return bytes(gif)


def corrupt_crc_png() -> bytes:
    data = bytearray(encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG"))
    data[29] ^= 0xFF  # the IHDR CRC
    return bytes(data)


def ztxt_bomb_png() -> bytes:
    """A tiny PNG carrying a zTXt chunk that inflates to 200 MB."""
    base = encode(Image.new("RGB", (16, 16), (40, 80, 120)), "PNG")
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(bytes(1 << 20)) for _ in range(200)) + comp.flush()
    return with_chunk_before_iend(base, png_chunk(b"zTXt", b"Comment\x00\x00" + body))


RED = (200, 30, 30)
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'

# name -> (bytes, expected error code) for images that must be refused
REFUSED = {
    "zero-bytes": (b"", "not_an_image"),
    "truncated-png": (encode(Image.new("RGB", (64, 64), RED), "PNG")[:60], "decode_error"),
    "corrupt-png-crc": (corrupt_crc_png(), "decode_error"),
    "svg": (SVG, "unsupported_format"),
    "svg-as-xml": (b'<?xml version="1.0"?>\n' + SVG, "unsupported_format"),
    "huge-gif-screen": (huge_screen_gif(), "image_too_many_pixels"),
    "ztxt-bomb": (ztxt_bomb_png(), "decode_error"),
    "zip-alone": (zip_bytes(), "not_an_image"),
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_hostile_image_is_refused_with_its_code(h: Harness, name: str) -> None:  # noqa: F811
    data, code = REFUSED[name]
    assert await h.code(h.images.add(name, data, "image/png")) == code


def mean_rgb(px: np.ndarray) -> np.ndarray:
    return px.reshape(-1, 3).astype(float).mean(axis=0)


# name -> (bytes, the mean colour the tensor must have) for images that are legitimate
DECODED = {
    "1x1": (encode(Image.new("RGB", (1, 1), RED), "PNG"), RED),
    "strip-65000x1": (encode(Image.new("RGB", (65000, 1), RED), "PNG"), RED),
    "strip-1x65000": (encode(Image.new("RGB", (1, 65000), RED), "PNG"), RED),
    "animated-gif-first-frame": (animated_gif(), (250, 10, 10)),
    "cmyk-jpeg": (encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
    "16-bit-png": (encode(Image.new("I;16", (64, 64), 32896), "PNG"), (128, 128, 128)),
    "jpeg+zip-polyglot": (encode(Image.new("RGB", (64, 64), RED), "JPEG") + zip_bytes(), RED),
    "gifar": (encode(Image.new("RGB", (64, 64), RED), "GIF") + zip_bytes(), RED),
    "exif-bomb": (exif_bomb_jpeg(), None),
}


@pytest.mark.parametrize("name", list(DECODED))
async def test_legitimate_odd_image_gives_a_correct_tensor(h: Harness, name: str) -> None:  # noqa: F811
    data, colour = DECODED[name]
    # A hang guard, not a speed claim: the 65,000-px strip once took 100 s and 17 GB.
    px = await asyncio.wait_for(
        h.tensor(h.images.add(name, data, "application/octet-stream")), HANG_S
    )
    if colour is not None:
        assert np.allclose(mean_rgb(px), colour, atol=6), (name, mean_rgb(px))


# --- hostile URLs ---------------------------------------------------------------


@pytest.fixture
async def canary() -> AsyncIterator[ImageServer]:
    async with ImageServer(host="127.0.0.1") as srv:
        srv.add("x", make_jpeg(32, 32))
        yield srv


def hostile_urls(c: int) -> dict[str, tuple[str, str]]:
    """name -> (url, expected code); `c` is the canary's port on 127.0.0.1."""
    return {
        "file": ("file:///etc/passwd", "invalid_url"),
        "ftp": (f"ftp://127.0.0.1:{c}/img/x", "invalid_url"),
        "gopher": (f"gopher://127.0.0.1:{c}/_GET%20/img/x", "invalid_url"),
        "credentials": (f"http://admin:secret@127.0.0.1:{c}/img/x", "invalid_url"),
        "loopback": (f"http://127.0.0.1:{c}/img/x", "blocked_address"),
        "ipv6-loopback": (f"http://[::1]:{c}/img/x", "blocked_address"),
        "ipv4-mapped-ipv6": (f"http://[::ffff:127.0.0.1]:{c}/img/x", "blocked_address"),
        "decimal": (f"http://2130706433:{c}/img/x", "blocked_address"),
        "octal": (f"http://0177.0.0.1:{c}/img/x", "blocked_address"),
        "hex": (f"http://0x7f.0.0.1:{c}/img/x", "blocked_address"),
        "hex-whole": (f"http://0x7f000001:{c}/img/x", "blocked_address"),
        "short": (f"http://127.1:{c}/img/x", "blocked_address"),
        "zero": (f"http://0.0.0.0:{c}/img/x", "blocked_address"),
        "trailing-dot": (f"http://127.0.0.1.:{c}/img/x", "blocked_address"),
        "name-localhost": (f"http://localhost:{c}/img/x", "blocked_address"),
        "metadata": ("http://169.254.169.254/latest/meta-data/", "blocked_address"),
    } | {
        # A name this machine maps to loopback besides localhost (its hostname, usually):
        # the guard must check the address the name resolves to, not the name.
        f"name-from-etc-hosts-{name}": (f"http://{name}:{c}/img/x", "blocked_address")
        for name in loopback_aliases()[:1]
    }


def loopback_aliases() -> list[str]:
    """Names /etc/hosts maps to 127.0.0.0/8, other than localhost (none on some machines)."""
    names = []
    for line in Path("/etc/hosts").read_text().splitlines():
        fields = line.split("#")[0].split()
        if fields and fields[0].startswith("127."):
            names += [n for n in fields[1:] if not n.startswith("localhost")]
    return names


async def test_hostile_urls_get_their_codes_and_never_reach_a_private_address(
    h: Harness,  # noqa: F811
    canary: ImageServer,
) -> None:
    cases = hostile_urls(canary.port)
    redirect = h.images.url("/redirect?to=")
    cases |= {
        f"redirect-{name}": (redirect + url, code)
        for name, (url, code) in cases.items()
        if name in ("loopback", "decimal", "name-localhost", "ipv6-loopback", "file")
    }
    ids = {name: await h.submit(url) for name, (url, _) in cases.items()}
    got = {}
    for name, item_id in ids.items():
        out = await h.outcome(item_id, timeout_s=30)
        got[name] = getattr(out, "code", "TENSOR")
    assert got == {name: code for name, (_, code) in cases.items()}
    assert dict(canary.hits) == {}, f"a private address was reached: {dict(canary.hits)}"


# --- hostile servers --------------------------------------------------------------


class RawServer:
    """A TCP server on 127.0.0.2 that answers every request with `respond`."""

    def __init__(self, respond: object) -> None:
        self.respond = respond
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[object]] = set()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.2", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._handlers:  # a stalling responder would outlive the test
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.2:{self.server.sockets[0].getsockname()[1]}/a.jpg"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await self.respond(writer)  # type: ignore[operator]
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


JPEG = make_jpeg(320, 240)


def head(length: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def slowloris(w: asyncio.StreamWriter) -> None:
    w.write(head(len(JPEG)))
    for b in JPEG:  # a byte at a time, each well inside a per-read timeout
        w.write(bytes([b]))
        await w.drain()
        await asyncio.sleep(0.2)


async def short_body(w: asyncio.StreamWriter) -> None:
    w.write(head(len(JPEG)) + JPEG[:2000])  # claims the whole JPEG, sends 2 kB, hangs up
    await w.drain()


async def long_body(w: asyncio.StreamWriter) -> None:
    w.write(head(2000) + JPEG)  # claims 2 kB, sends it all
    await w.drain()


@pytest.mark.parametrize(
    ("respond", "codes"),
    [
        (slowloris, {"download_timeout"}),
        (short_body, {"connection_error"}),
        (long_body, {"connection_error", "decode_error"}),  # never 2 kB read as an image
    ],
    ids=["slowloris", "content-length-over", "content-length-under"],
)
async def test_lying_servers_end_as_errors_without_hanging(
    h: Harness,  # noqa: F811
    respond: object,
    codes: set[str],
) -> None:
    async with RawServer(respond) as srv:
        # total_timeout_s is 1 s in the harness, three deliveries at most: a
        # result that never comes within the hang guard is a hung worker.
        code = await asyncio.wait_for(h.code(srv.url), HANG_S)
    assert code in codes, code
    # And the worker is still serving.
    assert (await h.tensor(h.images.add("after", JPEG))).shape == (224, 224, 3)


# --- the item deadline --------------------------------------------------------------

# Per-attempt bounds no test reaches: only the item deadline can end these items.
NO_ATTEMPT_BOUND = {"total_timeout_s": 600.0, "read_timeout_s": 600.0, "fetch_retries": 2}


async def trickle(w: asyncio.StreamWriter) -> None:
    w.write(head(len(JPEG)))
    for b in JPEG:  # 1 byte/s: each read is well inside any read timeout
        w.write(bytes([b]))
        await w.drain()
        await asyncio.sleep(1.0)


async def stall_after_headers(w: asyncio.StreamWriter) -> None:
    w.write(head(len(JPEG)))
    await w.drain()
    await asyncio.sleep(3600)


def endless(pause_s: float, chunk: int) -> object:
    async def respond(w: asyncio.StreamWriter) -> None:
        # No Content-Length: the body lasts until the server hangs up, which it never does.
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\xff")
        while True:
            w.write(bytes(chunk))
            await w.drain()
            await asyncio.sleep(pause_s)

    return respond


@pytest.mark.parametrize(
    ("respond", "code"),
    [
        (trickle, "download_timeout"),
        (stall_after_headers, "download_timeout"),
        (endless(0.05, 1024), "download_timeout"),  # never silent, under the cap by the deadline
        (endless(0.0, 64 * 1024), "too_large"),  # the cap ends it first
    ],
    ids=["trickle-1-byte-per-s", "stall-after-headers", "endless-drip", "endless-flood"],
)
async def test_hostile_server_ends_within_the_item_deadline_with_its_code(
    start: Start,  # noqa: F811
    respond: object,
    code: str,
) -> None:
    hh = await start(item_deadline_s=2.0, **NO_ATTEMPT_BOUND)
    async with RawServer(respond) as srv:
        # Without the deadline these would run 600 s an attempt: the guard would fire.
        got = await asyncio.wait_for(hh.code(srv.url), HANG_S)
        assert got == code
        assert srv.connections == 1  # final at the deadline: not retried
    assert (await hh.tensor(hh.images.add("after", JPEG))).shape == (224, 224, 3)


async def test_the_deadline_goes_on_across_redeliveries(start: Start) -> None:  # noqa: F811
    # Every answer is 503 with Retry-After 1 s, which goes back to JetStream as
    # nak(1 s). The deadline (1.8 s) is kept in Redis for the next delivery,
    # which then has too little time for another try: the item is final by its
    # second delivery at the latest, never a third (max_deliver 3).
    hh = await start(item_deadline_s=1.8, retry_after_inline_max_s=0.0, **NO_ATTEMPT_BOUND)
    item_id = await hh.submit(hh.images.url("/status/503?retry_after=1"))
    out = await asyncio.wait_for(hh.outcome(item_id, timeout_s=HANG_S), HANG_S)
    assert isinstance(out, TagResult) and out.code in {"http_503", "download_timeout"}
    assert "deadline" in (out.message or ""), out.message
    assert 1 <= len(hh.images.hits["/status/503"]) <= 2
