"""Fetch a model directory from `https://` or `s3://` into a local directory.

Run by the init container of the downloader and inference pods when a TagPipeline's
`spec.model.storageUri` is remote (`pvc://` is a volume mount and never comes here):

    python -m tagpipe_common.storage --uri s3://models/efficientnet-lite0 --dest /models/model

The URI names a model directory (as `make model` writes it): `manifest.json` is read
first, then the files it names are fetched and the model file checked against the
manifest's sha256. `https://` must be pinned (`--sha256`, the model file's sha256 as the
manifest states it), because nothing else vouches for what a web server returns; with
`s3://` the pin is optional. S3 is any S3-compatible store: boto3 reads the endpoint
(`AWS_ENDPOINT_URL`) and the credentials from the environment, which the operator fills
from a Secret. Every failure is one line on stderr and exit status 2, so the pod's
status shows why it does not start.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from tagpipe_common.manifest import MANIFEST_FILE, ModelManifest
from tagpipe_common.objectstore import DENIED, MISSING, s3_client

EXIT_FETCH_FAILED = 2
CHUNK = 1 << 20
SCHEMES = ("https", "s3")


class FetchError(RuntimeError):
    """The model cannot be fetched or does not keep its promises (one line, for the pod)."""


class Source(Protocol):
    def describe(self, name: str) -> str: ...

    def chunks(self, name: str) -> Iterator[bytes]: ...


class HttpsSource:
    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/") + "/"
        # trust_env: a private CA comes in through SSL_CERT_FILE, proxies through HTTPS_PROXY.
        self.client = httpx.Client(timeout=httpx.Timeout(30.0), follow_redirects=True)

    def describe(self, name: str) -> str:
        return self.base + name

    def chunks(self, name: str) -> Iterator[bytes]:
        url = self.describe(name)
        try:
            with self.client.stream("GET", url) as resp:
                if resp.status_code == 404:
                    raise FetchError(f"missing: {url} answered HTTP 404")
                if resp.status_code != 200:
                    raise FetchError(f"{url} answered HTTP {resp.status_code}")
                yield from resp.iter_bytes(CHUNK)
        except httpx.HTTPError as exc:
            raise FetchError(f"cannot read {url}: {exc!r}") from exc


class S3Source:
    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client: Any = s3_client()  # AWS_ENDPOINT_URL and the standard credential chain

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def chunks(self, name: str) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.describe(name)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
            yield from body.iter_chunks(CHUNK)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in MISSING:
                raise FetchError(f"missing: {where} does not exist ({code})") from exc
            if code in DENIED:
                raise FetchError(
                    f"access denied to {where} ({code}): check the credentials Secret"
                ) from exc
            raise FetchError(f"cannot read {where}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise FetchError(f"cannot read {where}: {exc}") from exc


def open_source(uri: str) -> Source:
    parts = urlsplit(uri)
    if parts.scheme == "https" and parts.netloc:
        return HttpsSource(uri)
    if parts.scheme == "s3" and parts.netloc:
        return S3Source(parts.netloc, parts.path)
    raise FetchError(f"unsupported storage URI {uri!r}: expected one of {', '.join(SCHEMES)}://")


def _safe_name(name: str) -> str:
    # The manifest comes from the store: it must not write outside the model directory.
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise FetchError(f"manifest names a file outside the model directory: {name!r}")
    return str(path)


def fetch_file(source: Source, name: str, dest: Path, sha256: str | None = None) -> Path:
    """Stream one file to dest/name through a temporary name; check its sha256 if given."""
    target = dest / _safe_name(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for chunk in source.chunks(name):
            digest.update(chunk)
            out.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        partial.unlink()
        raise FetchError(
            f"checksum mismatch: {source.describe(name)} has sha256 {digest.hexdigest()}, "
            f"the manifest says {sha256}"
        )
    partial.replace(target)
    return target


def fetch_model(
    uri: str, dest: Path, pin: str | None = None, manifest_only: bool = False
) -> ModelManifest:
    """Fetch the model directory at `uri` into `dest`; the manifest is written last."""
    if urlsplit(uri).scheme == "https" and pin is None:
        raise FetchError(f"{uri}: an https:// model needs a sha256 pin (spec.model.sha256)")
    source = open_source(uri)
    where = source.describe(MANIFEST_FILE)
    raw = b"".join(source.chunks(MANIFEST_FILE))
    try:
        manifest = ModelManifest.model_validate_json(raw)
    except (ValidationError, ValueError) as exc:
        raise FetchError(f"{where} is not a model manifest: {exc}") from exc
    if pin is not None and manifest.sha256 != pin:
        raise FetchError(
            f"checksum mismatch: {where} says the model's sha256 is {manifest.sha256}, "
            f"spec.model.sha256 pins {pin}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    if not manifest_only:
        fetch_file(source, manifest.labels_file, dest)
        fetch_file(source, manifest.file, dest, manifest.sha256)
        for variant in manifest.variants.values():
            fetch_file(source, variant.file, dest, variant.sha256)
    # Last: until every file is in place, dest is not a model directory.
    (dest / MANIFEST_FILE).write_bytes(raw)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tagpipe_common.storage", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--uri", required=True, help="https://... or s3://bucket/prefix of a model directory"
    )
    parser.add_argument(
        "--dest", required=True, type=Path, help="the (empty) model directory to fill"
    )
    parser.add_argument(
        "--sha256", default=None, help="the model file's sha256 (required for https)"
    )
    parser.add_argument(
        "--manifest-only", action="store_true", help="fetch manifest.json alone (downloader)"
    )
    args = parser.parse_args(argv)
    try:
        m = fetch_model(args.uri, args.dest, args.sha256, args.manifest_only)
    except FetchError as exc:
        print(f"tagpipe model fetch: {exc}", file=sys.stderr)
        return EXIT_FETCH_FAILED
    print(f"tagpipe model fetch: {m.name}:{m.version} from {args.uri} into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
