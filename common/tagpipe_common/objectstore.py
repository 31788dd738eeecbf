"""Objects named by URL: `s3://bucket/key` (any S3-compatible store) and `https://`.

What the gateway's manifest jobs need of a store: stream an object from a byte offset
(a manifest, resumed where a reader stopped), write one (`put_bytes`: the output
shards) and check that a prefix is writable before a job is accepted.

S3 is configured the standard AWS way: the endpoint from `AWS_ENDPOINT_URL`, the
credentials from the boto3 chain (environment, shared files, web identity, instance
role). `https://` is read with httpx, with a private CA from `SSL_CERT_FILE` (no proxy);
redirects are not followed, because the caller vetted the host it named, not
wherever a redirect points, and a caller that vetted the host's addresses passes
one as `dial` so the connection goes where it was vetted (netguard.py).

Everything here is blocking (boto3 is): async callers use `asyncio.to_thread`.
Failures raise ObjectError, whose `kind` tells a missing object from refused
credentials from anything else, so callers can answer each one clearly.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 1 << 20
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0)  # a window's retries, then the error
WINDOW = 4 << 20  # bytes per ranged GET of a read (read_stream)
SCHEMES = ("s3", "https")
# S3 error codes that mean "these credentials may not do this", as opposed to "no such object".
DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
MISSING = {"NoSuchKey", "NoSuchBucket", "404"}
MISSING_KIND, DENIED_KIND, FAILED_KIND = "missing", "denied", "failed"
CHANGED_KIND = "changed"  # the object was replaced in the middle of a read

_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()


class ObjectError(RuntimeError):
    """An object cannot be read or written; `kind` is missing, denied, changed or failed
    (only `failed` may be transient)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ObjectURL:
    scheme: str  # "s3" or "https"
    bucket: str  # the bucket, or the https host[:port]
    key: str  # the key, or the https path

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


def parse(url: str) -> ObjectURL:
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise ValueError(f"expected an s3:// or https:// URL, got {url!r}")
    if parts.scheme == "s3" and (parts.query or parts.fragment):
        raise ValueError(f"an s3:// URL has no query or fragment: {url!r}")
    return ObjectURL(parts.scheme, parts.netloc, parts.path.lstrip("/"))


def s3_client() -> Any:
    """A boto3 S3 client for the current endpoint and credentials (built once per set:
    building one costs tens of milliseconds and boto3's default session is not
    thread-safe)."""
    import boto3  # only s3:// needs it

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    ident = (endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"))
    with _clients_lock:
        if ident not in _clients:
            _clients[ident] = boto3.session.Session().client("s3", endpoint_url=endpoint)
        return _clients[ident]


def _s3_error(exc: Exception, where: str, verb: str) -> ObjectError:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return ObjectError(DENIED_KIND, f"cannot {verb} {where}: no S3 credentials found")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in MISSING:
            return ObjectError(MISSING_KIND, f"{where} does not exist ({code})")
        if code in DENIED:
            return ObjectError(DENIED_KIND, f"access denied to {where} ({code})")
        return ObjectError(FAILED_KIND, f"cannot {verb} {where}: {code or exc}")
    return ObjectError(FAILED_KIND, f"cannot {verb} {where}: {exc}")


def _s3_call(where: str, verb: str, call: Any, **kwargs: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(exc, where, verb) from exc


def put_bytes(url: str, data: bytes, content_type: str) -> None:
    """Write one whole object (s3:// only); a second write replaces the first."""
    target = parse(url)
    if target.scheme != "s3":
        raise ValueError(f"objects are written to s3:// only, not {url!r}")
    client = s3_client()
    _s3_call(url, "write", client.put_object, Bucket=target.bucket, Key=target.key,
             Body=data, ContentType=content_type)  # fmt: skip


def delete(url: str) -> None:
    target = parse(url)
    client = s3_client()
    _s3_call(url, "delete", client.delete_object, Bucket=target.bucket, Key=target.key)


def check_writable(prefix: str) -> None:
    """Prove that objects can be written under `prefix` (put, then delete, a probe)."""
    probe = f"{prefix}.tagpipe-write-probe-{uuid.uuid4().hex}"
    put_bytes(probe, b"", "application/octet-stream")
    delete(probe)


def read_stream(
    url: str, offset: int = 0, dial: str | None = None, retry: bool = True
) -> Iterator[bytes]:
    """The object's bytes from `offset` on, in chunks; nothing past its end.

    Read as a series of ranged GETs of WINDOW bytes, each made when the previous one is
    used up, so no connection sits idle while the caller pauses (a manifest reader held
    by backpressure may not read for minutes, and stores drop idle downloads). S3 reads
    are pinned to the first answer's ETag: an object replaced mid-read fails (`changed`)
    rather than mixing two versions. `dial`: for https, the address to connect to (one
    the caller vetted) instead of a fresh DNS answer; Host header and TLS name stay the
    URL's. `retry`: an S3 window that fails in a way that may pass is tried again
    (RETRY_DELAYS_S) before the error is raised."""
    target = parse(url)
    if target.scheme == "s3":
        return _s3_stream(url, target, offset, RETRY_DELAYS_S if retry else ())
    return _https_stream(url, offset, dial)


def _s3_window(url: str, target: ObjectURL, start: int, etag: str | None) -> tuple[bytes, int, str]:
    """(bytes from `start`, the object's size, its ETag); empty at the end."""
    from botocore.exceptions import BotoCoreError, ClientError

    kwargs = {
        "Bucket": target.bucket,
        "Key": target.key,
        "Range": f"bytes={start}-{start + WINDOW - 1}",
    }
    if etag is not None:
        kwargs["IfMatch"] = etag
    try:
        got = s3_client().get_object(**kwargs)
        data: bytes = got["Body"].read()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code == "InvalidRange":
            return b"", start, etag or ""  # `start` is the object's end
        if code in ("PreconditionFailed", "412"):
            raise ObjectError(CHANGED_KIND, f"{url} was replaced while being read") from exc
        raise _s3_error(exc, url, "read") from exc
    except BotoCoreError as exc:
        raise _s3_error(exc, url, "read") from exc
    size = int(str(got.get("ContentRange", "")).rpartition("/")[2] or start + len(data))
    return data, size, str(got.get("ETag", ""))


def _s3_stream(
    url: str, target: ObjectURL, offset: int, delays: tuple[float, ...]
) -> Iterator[bytes]:
    pos, etag = offset, None
    while True:
        data, size, etag = _retrying(partial(_s3_window, url, target, pos, etag), delays)
        yield from _pieces(data)
        pos += len(data)
        if not data or pos >= size:
            return


def _retrying(window: Callable[[], T], delays: tuple[float, ...]) -> T:
    """A window again after a failure that may pass (a dropped connection, a 5xx past
    boto3's own retries): a window is idempotent, and a reader that gave up here would
    have to start over (a gzip manifest from its first byte)."""
    for delay in delays:
        try:
            return window()
        except ObjectError as exc:
            if exc.kind != FAILED_KIND:
                raise
            log.warning("%s; again in %.0f s", exc, delay)
            time.sleep(delay)
    return window()


def _pieces(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i : i + CHUNK]


def _https_stream(url: str, offset: int, dial: str | None) -> Iterator[bytes]:
    request_url, headers, extensions = httpx.URL(url), {}, {}
    if dial is not None and dial != request_url.host:
        headers["Host"] = request_url.netloc.decode("ascii")
        extensions["sni_hostname"] = request_url.host  # also the name the cert must match
        request_url = request_url.copy_with(host=dial)
    client = httpx.Client(
        timeout=httpx.Timeout(30.0), follow_redirects=False, verify=tls_verify(), trust_env=False
    )
    pos = offset
    try:
        with client:
            while True:
                window = {**headers, "Range": f"bytes={pos}-{pos + WINDOW - 1}"}
                with client.stream(
                    "GET", request_url, headers=window, extensions=extensions
                ) as resp:
                    if resp.status_code == 416:
                        return  # `pos` is the object's end
                    _check_status(url, resp.status_code)
                    if resp.status_code == 200:
                        # No ranges here: the whole body, once, from `pos` on.
                        yield from _skip(resp.iter_bytes(CHUNK), pos)
                        return
                    size = int(resp.headers.get("content-range", "").rpartition("/")[2] or 0)
                    data = resp.read()
                yield from _pieces(data)
                pos += len(data)
                if not data or (size and pos >= size) or len(data) < WINDOW:
                    return
    except httpx.HTTPError as exc:
        raise ObjectError(FAILED_KIND, f"cannot read {url}: {exc!r}") from exc


def tls_verify() -> ssl.SSLContext | bool:
    """httpx's `verify` for a vetted address (here and the gateway's webhook sender): a
    private CA from SSL_CERT_FILE, else httpx's bundle. Nothing else is taken from the
    environment: a proxy would dial the host again, unvetted."""
    cafile = os.environ.get("SSL_CERT_FILE")
    return ssl.create_default_context(cafile=cafile) if cafile else True


def _skip(chunks: Iterator[bytes], skip: int) -> Iterator[bytes]:
    for chunk in chunks:
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        yield chunk[skip:]
        skip = 0


def _check_status(url: str, status: int) -> None:
    if status in (200, 206):
        return
    if status in (404, 410):
        raise ObjectError(MISSING_KIND, f"{url} answered HTTP {status}")
    if status in (401, 403):
        raise ObjectError(DENIED_KIND, f"{url} answered HTTP {status}")
    if 300 <= status < 400:
        raise ObjectError(FAILED_KIND, f"{url} answered HTTP {status}: redirects are not followed")
    raise ObjectError(FAILED_KIND, f"{url} answered HTTP {status}")
