"""tagpipe_common.objectstore against a real S3-compatible store (moto server, auth on)
and a local HTTPS server."""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from tagpipe_common import objectstore

from tests.s3kit import moto_s3, s3_client

__all__ = ["moto_s3"]  # the fixture, imported for pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def s3(moto_s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in moto_s3.items():
        monkeypatch.setenv(k, v)
    client = s3_client(moto_s3)
    if "objs" not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket="objs")
    return moto_s3


def test_put_bytes_then_read_whole_and_from_an_offset(s3: dict[str, str]) -> None:
    data = bytes(range(256)) * 9000  # over two chunks
    objectstore.put_bytes("s3://objs/a/b.bin", data, "application/octet-stream")
    head = s3_client(s3).head_object(Bucket="objs", Key="a/b.bin")
    assert head["ContentType"] == "application/octet-stream"
    assert b"".join(objectstore.read_stream("s3://objs/a/b.bin")) == data
    assert b"".join(objectstore.read_stream("s3://objs/a/b.bin", 1_000_001)) == data[1_000_001:]
    assert b"".join(objectstore.read_stream("s3://objs/a/b.bin", len(data))) == b""


def test_a_writable_prefix_keeps_no_probe(s3: dict[str, str]) -> None:
    objectstore.check_writable("s3://objs/out/")
    listed = s3_client(s3).list_objects_v2(Bucket="objs", Prefix="out/")
    assert listed.get("KeyCount", 0) == 0


def test_missing_objects_and_buckets(s3: dict[str, str]) -> None:
    with pytest.raises(objectstore.ObjectError) as err:
        b"".join(objectstore.read_stream("s3://objs/nothing"))
    assert err.value.kind == objectstore.MISSING_KIND
    with pytest.raises(objectstore.ObjectError) as err:
        objectstore.check_writable("s3://no-such-bucket/out/")
    assert err.value.kind == objectstore.MISSING_KIND


def test_bad_credentials_are_denied(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    objectstore.put_bytes("s3://objs/x", b"x", "text/plain")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(objectstore.ObjectError) as err:
        b"".join(objectstore.read_stream("s3://objs/x"))
    assert err.value.kind == objectstore.DENIED_KIND
    with pytest.raises(objectstore.ObjectError) as err:
        objectstore.put_bytes("s3://objs/y", b"y", "text/plain")
    assert err.value.kind == objectstore.DENIED_KIND


def test_an_object_replaced_mid_read_fails_rather_than_mixing_versions(s3: dict[str, str]) -> None:
    size = objectstore.WINDOW + 1000  # two ranged GETs
    objectstore.put_bytes("s3://objs/v", b"a" * size, "text/plain")
    chunks = objectstore.read_stream("s3://objs/v")
    assert next(chunks) == b"a" * objectstore.CHUNK
    objectstore.put_bytes("s3://objs/v", b"b" * size, "text/plain")
    with pytest.raises(objectstore.ObjectError) as err:
        b"".join(chunks)
    assert err.value.kind == objectstore.CHANGED_KIND


class RangeHandler(SimpleHTTPRequestHandler):
    """http.server with `Range: bytes=a-b` (it ignores ranges): 206 or 416."""

    def do_GET(self) -> None:
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if ranged is None or not path.is_file():
            super().do_GET()
            return
        data = path.read_bytes()
        start, end = int(ranged[1]), min(int(ranged[2]), len(data) - 1)
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start : end + 1])


@pytest.fixture(params=[SimpleHTTPRequestHandler, RangeHandler], ids=["no-ranges", "ranges"])
def https_named(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, Path]]:
    """(port, served directory) of an HTTPS server on 127.0.0.1 whose certificate names
    only `tagpipe.test`, a host no DNS knows; the client trusts its CA."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("tagpipe.test").configure_cert(ctx)
    handler = partial(request.param, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], tmp_path
    server.shutdown()
    server.server_close()


def test_https_reads_dial_the_vetted_address_under_the_urls_name(
    https_named: tuple[int, Path],
) -> None:
    port, served = https_named
    data = b"0123456789" * (objectstore.WINDOW // 4)  # two and a half windows
    (served / "m.txt").write_bytes(data)
    url = f"https://tagpipe.test:{port}/m.txt"
    # Only through `dial`: the name does not resolve, the certificate is checked against it.
    assert b"".join(objectstore.read_stream(url, 0, dial="127.0.0.1")) == data
    assert b"".join(objectstore.read_stream(url, len(data) - 5, dial="127.0.0.1")) == b"56789"
    assert b"".join(objectstore.read_stream(url, len(data), dial="127.0.0.1")) == b""
    with pytest.raises(objectstore.ObjectError, match="HTTP 404"):
        b"".join(objectstore.read_stream(f"https://tagpipe.test:{port}/none", 0, "127.0.0.1"))
    with pytest.raises(objectstore.ObjectError, match="CERTIFICATE_VERIFY_FAILED"):
        b"".join(objectstore.read_stream(f"https://127.0.0.1:{port}/m.txt"))


def test_a_window_is_tried_again_only_after_a_failure_that_may_pass() -> None:
    calls: list[str] = []

    def flaky(kinds: list[str]) -> bytes:
        calls.append("x")
        if kinds:
            raise objectstore.ObjectError(kinds.pop(0), "boom")
        return b"ok"

    failed = [objectstore.FAILED_KIND, objectstore.FAILED_KIND]
    assert objectstore._retrying(lambda: flaky(failed), (0.0, 0.0, 0.0)) == b"ok"
    assert len(calls) == 3
    with pytest.raises(objectstore.ObjectError):  # retries spent: the error
        objectstore._retrying(lambda: flaky([objectstore.FAILED_KIND] * 3), (0.0, 0.0))
    calls.clear()
    with pytest.raises(objectstore.ObjectError):  # missing: at once
        objectstore._retrying(lambda: flaky([objectstore.MISSING_KIND]), (0.0, 0.0))
    assert len(calls) == 1
