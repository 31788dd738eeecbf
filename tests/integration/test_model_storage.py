"""The model fetcher against real servers: HTTPS (trustme's CA) and an S3-compatible store.

The S3 store is moto in server mode with IAM authentication on (tests/s3kit.py): every
call must sign with a key that exists. The
model is the real default model; the fetched directory is loaded by inference's own
checks, so "fetched" means "servable".
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from tagpipe_common.manifest import ModelManifest

from tests.s3kit import moto_server, s3_client, s3_user

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "efficientnet-lite0"
SHA = ModelManifest.load(MODEL).sha256
FETCH = [sys.executable, "-m", "tagpipe_common.storage"]

pytestmark = pytest.mark.integration


def fetch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The fetcher as the init container runs it: a process, one line on failure."""
    return subprocess.run(
        [*FETCH, *args], env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def assert_fails_with(proc: subprocess.CompletedProcess[str], words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one clear line, no traceback
    assert lines[0].startswith("tagpipe model fetch: ") and words in lines[0], lines[0]


def assert_servable(dest: Path) -> None:
    from tagpipe_inference.model import load_manifest, read_labels, verify_file

    manifest = load_manifest(dest)
    verify_file(dest, manifest)
    read_labels(dest / manifest.labels_file, manifest.num_classes)
    # Every file the manifest names (a built model may carry an fp16 variant), nothing else.
    named = {"manifest.json", manifest.labels_file, manifest.file}
    named |= {v.file for v in manifest.variants.values()}
    assert sorted(p.name for p in dest.iterdir()) == sorted(named)


# --- HTTPS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """(base URL, served directory, CA file) of a local HTTPS server."""
    served = tmp_path_factory.mktemp("www")
    shutil.copytree(MODEL, served / "good")
    ca = trustme.CA()
    ca_file = served.parent / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", served, ca_file
    server.shutdown()
    server.server_close()


def test_https_fetches_a_pinned_model_that_inference_can_serve(
    https_root: tuple[str, Path, Path], tmp_path: Path
) -> None:
    base, _, ca = https_root
    proc = fetch("--uri", f"{base}/good/", "--dest", str(tmp_path / "m"), "--sha256", SHA,
                 env={"SSL_CERT_FILE": str(ca)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_servable(tmp_path / "m")


def test_https_downloader_fetches_the_manifest_alone(
    https_root: tuple[str, Path, Path], tmp_path: Path
) -> None:
    base, _, ca = https_root
    args = ["--uri", f"{base}/good", "--dest", str(tmp_path), "--sha256", SHA, "--manifest-only"]
    assert fetch(*args, env={"SSL_CERT_FILE": str(ca)}).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_https_without_a_pin_is_refused(https_root: tuple[str, Path, Path], tmp_path: Path) -> None:
    proc = fetch("--uri", f"{https_root[0]}/good", "--dest", str(tmp_path))
    assert_fails_with(proc, "needs a sha256 pin")
    assert not list(tmp_path.iterdir())


def test_https_a_pin_the_manifest_does_not_match_stops_before_the_download(
    https_root: tuple[str, Path, Path], tmp_path: Path
) -> None:
    base, _, ca = https_root
    proc = fetch("--uri", f"{base}/good", "--dest", str(tmp_path), "--sha256", "0" * 64,
                 env={"SSL_CERT_FILE": str(ca)})  # fmt: skip
    assert_fails_with(proc, "checksum mismatch")
    assert not list(tmp_path.iterdir())


def test_https_a_model_file_that_is_not_what_the_manifest_says(
    https_root: tuple[str, Path, Path], tmp_path: Path
) -> None:
    base, served, ca = https_root
    shutil.copytree(MODEL, served / "corrupt", dirs_exist_ok=True)
    with (served / "corrupt" / "model.onnx").open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    proc = fetch("--uri", f"{base}/corrupt", "--dest", str(tmp_path / "m"), "--sha256", SHA,
                 env={"SSL_CERT_FILE": str(ca)})  # fmt: skip
    assert_fails_with(proc, "checksum mismatch")
    assert not (tmp_path / "m" / "manifest.json").exists()  # never a half model directory


def test_https_a_missing_model_directory(
    https_root: tuple[str, Path, Path], tmp_path: Path
) -> None:
    base, _, ca = https_root
    proc = fetch("--uri", f"{base}/nothing-here", "--dest", str(tmp_path), "--sha256", SHA,
                 env={"SSL_CERT_FILE": str(ca)})  # fmt: skip
    assert_fails_with(proc, "HTTP 404")


def test_https_an_untrusted_certificate(https_root: tuple[str, Path, Path], tmp_path: Path) -> None:
    # Without the test CA the server's certificate is refused: TLS is really checked.
    proc = fetch("--uri", f"{https_root[0]}/good", "--dest", str(tmp_path), "--sha256", SHA)
    assert_fails_with(proc, "CERTIFICATE_VERIFY_FAILED")


# --- S3 (moto server) ----------------------------------------------------------------


def _s3_upload(env: dict[str, str]) -> None:
    """models/efficientnet-lite0/ (the real model) and models/corrupt/ (a wrong model file)."""
    client = s3_client(env)
    client.create_bucket(Bucket="models")
    for f in MODEL.iterdir():
        client.upload_file(str(f), "models", f"efficientnet-lite0/{f.name}")
        body = b"not the model" if f.name == "model.onnx" else f.read_bytes()
        client.put_object(Bucket="models", Key=f"corrupt/{f.name}", Body=body)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Env for the fetcher: endpoint and a valid key of a moto S3 with auth enforced."""
    # Three unauthenticated calls (user, policy, key); every later call must sign.
    with moto_server(tmp_path_factory.mktemp("moto"), 3) as endpoint:
        creds = s3_user(endpoint, "fetcher")
        _s3_upload(creds)
        yield creds


def test_s3_fetches_a_model_that_inference_can_serve(s3: dict[str, str], tmp_path: Path) -> None:
    proc = fetch("--uri", "s3://models/efficientnet-lite0", "--dest", str(tmp_path), env=s3)
    assert proc.returncode == 0, proc.stderr
    assert_servable(tmp_path)


def test_s3_a_model_file_that_is_not_what_the_manifest_says(
    s3: dict[str, str], tmp_path: Path
) -> None:
    proc = fetch("--uri", "s3://models/corrupt", "--dest", str(tmp_path), env=s3)
    assert_fails_with(proc, "checksum mismatch")
    assert not (tmp_path / "manifest.json").exists()


def test_s3_a_missing_object(s3: dict[str, str], tmp_path: Path) -> None:
    proc = fetch("--uri", "s3://models/no-such-model", "--dest", str(tmp_path), env=s3)
    assert_fails_with(proc, "missing: s3://models/no-such-model/manifest.json")


def test_s3_bad_credentials(s3: dict[str, str], tmp_path: Path) -> None:
    wrong = {**s3, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc = fetch("--uri", "s3://models/efficientnet-lite0", "--dest", str(tmp_path), env=wrong)
    assert_fails_with(proc, "access denied")
    unknown = {**s3, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000"}
    proc = fetch("--uri", "s3://models/efficientnet-lite0", "--dest", str(tmp_path), env=unknown)
    assert_fails_with(proc, "access denied")
    assert not list(tmp_path.iterdir())


def test_unsupported_scheme(tmp_path: Path) -> None:
    assert_fails_with(
        fetch("--uri", "ftp://x/y", "--dest", str(tmp_path)), "unsupported storage URI"
    )


def test_a_manifest_naming_a_file_outside_the_directory(
    https_root: tuple[str, Path, Path], tmp_path: Path
) -> None:
    base, served, ca = https_root
    (served / "escape").mkdir(exist_ok=True)
    manifest = json.loads((MODEL / "manifest.json").read_text())
    (served / "escape" / "manifest.json").write_text(
        json.dumps({**manifest, "labels_file": "../../x"})
    )
    proc = fetch("--uri", f"{base}/escape", "--dest", str(tmp_path / "m"), "--sha256", SHA,
                 env={"SSL_CERT_FILE": str(ca)})  # fmt: skip
    assert_fails_with(proc, "outside the model directory")
