"""A local aiohttp image server and a photo-like JPEG corpus generator.

Used by the downloader benchmark, the downloader tests and anything else that
needs real HTTP image traffic without the internet. Importable as
`bench.imageserver` (repo root on sys.path) or runnable as a script:

    python bench/imageserver.py --port 8900 --latency-ms 100

Routes:
    /img/{name}                 a registered image (`?latency_ms=` overrides the default)
    /corpus/{w}x{h}/{seed}.jpg  a generated JPEG, cached after the first request
    /status/{code}              that status (`?retry_after=` adds a Retry-After header)
    /flaky/{key}/{n}/{code}     `code` for the first n requests of `key`, then image `?name=`
    /redirect?to=URL            302 to URL;  /loop/{a|b}: a redirect loop
    /slow?delay_s=              waits, then serves image `?name=`
    /endless                    streams bytes forever (no Content-Length)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import struct
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web
from PIL import Image


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients, soft blobs and sensor-like noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    # Build at 1/8 size and upsample: smooth structure without full-size math.
    sw, sh = max(2, width // 8), max(2, height // 8)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    base = np.zeros((sh, sw, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3, size=3)
        base[..., c] = 128 + 90 * np.sin(xx / sw * fx * np.pi + ph) * np.cos(yy / sh * fy * np.pi)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(sw / 20, sw / 4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        base += blob[..., None] * rng.uniform(-80, 80, size=3)
    small = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    big = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    # Grain from a tiled patch: full-size random draws would dominate the run time.
    ph, pw = min(height, 509), min(width, 509)
    patch = (rng.standard_normal((ph, pw, 3), dtype=np.float32) * 10).astype(np.int16)
    grain = np.tile(patch, (-(-height // ph), -(-width // pw), 1))[:height, :width]
    big += grain
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))


def make_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    photo_like(width, height, seed).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height zeros: tens of KB on the wire,
    `width * height` pixels once decoded. A real decompression bomb."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 256) for _ in range(height // 256)]
    parts += [comp.compress(row * (height % 256)), comp.flush()]
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def exif_rotated_jpeg(width: int = 1200, height: int = 600, orientation: int = 6) -> bytes:
    """Left half red, right half blue, stored landscape with an EXIF orientation.
    Orientation 6 displays it rotated 90 degrees clockwise: red on top."""
    img = Image.new("RGB", (width, height), (230, 20, 20))
    img.paste((20, 20, 230), (width // 2, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@dataclass
class Served:
    body: bytes
    content_type: str = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)


class ImageServer:
    """`async with ImageServer(host="127.0.0.2") as srv: srv.url("/img/a")`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0) -> None:
        self.host = host
        self.port = port
        self.latency_ms = latency_ms
        self.images: dict[str, Served] = {}
        self.hits: defaultdict[str, list[float]] = defaultdict(list)  # path -> request times
        self.endless_sent = 0
        self._corpus: dict[tuple[int, int, int], bytes] = {}
        self._runner: web.AppRunner | None = None

    def add(self, name: str, body: bytes, content_type: str = "image/jpeg", **headers: str) -> str:
        self.images[name] = Served(body, content_type, dict(headers))
        return self.url(f"/img/{name}")

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def __aenter__(self) -> ImageServer:
        app = web.Application()
        r = app.router
        r.add_get("/img/{name}", self._img)
        r.add_get("/corpus/{w:\\d+}x{h:\\d+}/{seed:\\d+}.jpg", self._corpus_img)
        r.add_get("/status/{code:\\d+}", self._status)
        r.add_get("/flaky/{key}/{n:\\d+}/{code:\\d+}", self._flaky)
        r.add_get("/redirect", self._redirect)
        r.add_get("/loop/{which}", self._loop)
        r.add_get("/slow", self._slow)
        r.add_get("/endless", self._endless)
        # Cancel handlers of clients that hung up (slow/endless routes), and do
        # not wait a minute for them at shutdown.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the real port when asked for 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _delay(self, request: web.Request) -> None:
        self.hits[request.path].append(time.monotonic())
        ms = float(request.query.get("latency_ms", self.latency_ms))
        if ms > 0:
            await asyncio.sleep(ms / 1000)

    def _serve(self, name: str) -> web.Response:
        item = self.images.get(name)
        if item is None:
            raise web.HTTPNotFound()
        return web.Response(
            body=item.body,
            content_type=None,
            headers={"Content-Type": item.content_type, **item.headers},
        )

    async def _img(self, request: web.Request) -> web.Response:
        await self._delay(request)
        return self._serve(request.match_info["name"])

    async def _corpus_img(self, request: web.Request) -> web.Response:
        await self._delay(request)
        m = request.match_info
        key = (int(m["w"]), int(m["h"]), int(m["seed"]))
        if key not in self._corpus:
            self._corpus[key] = await asyncio.to_thread(make_jpeg, *key)
        return web.Response(body=self._corpus[key], content_type="image/jpeg")

    async def _status(self, request: web.Request) -> web.Response:
        await self._delay(request)
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.Response(status=int(request.match_info["code"]), text="no", headers=headers)

    async def _flaky(self, request: web.Request) -> web.Response:
        await self._delay(request)
        n = len(self.hits[request.path])
        if n <= int(request.match_info["n"]):
            headers = {}
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            return web.Response(status=int(request.match_info["code"]), headers=headers)
        return self._serve(request.query["name"])

    async def _redirect(self, request: web.Request) -> web.Response:
        await self._delay(request)
        raise web.HTTPFound(request.query["to"])

    async def _loop(self, request: web.Request) -> web.Response:
        await self._delay(request)
        other = "b" if request.match_info["which"] == "a" else "a"
        raise web.HTTPFound(f"/loop/{other}")

    async def _slow(self, request: web.Request) -> web.Response:
        await self._delay(request)
        await asyncio.sleep(float(request.query.get("delay_s", "30")))
        return self._serve(request.query.get("name", ""))

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        await self._delay(request)
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await resp.prepare(request)
        chunk = b"\xff\xd8\xff" + bytes(64 * 1024 - 3)
        while True:  # until the client hangs up
            await resp.write(chunk)
            self.endless_sent += len(chunk)


async def _serve_forever(host: str, port: int, latency_ms: float) -> None:
    async with ImageServer(host, port, latency_ms) as srv:
        print(f"serving on {srv.url('/')}  (try /corpus/640x480/1.jpg)", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8900)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    args = ap.parse_args()
    asyncio.run(_serve_forever(args.host, args.port, args.latency_ms))


if __name__ == "__main__":
    main()
