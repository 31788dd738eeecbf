"""A real S3-compatible store for tests: moto in server mode, a subprocess on a free port.

IAM authentication is on (INITIAL_NO_AUTH_ACTION_COUNT): the first calls create a user
and its access key, and every call after them must sign with a key that exists, so
"bad credentials" is really refused.

    from tests.s3kit import moto_s3   # the fixture: env vars of a user allowed s3:*

    def test_x(moto_s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
        for k, v in moto_s3.items():
            monkeypatch.setenv(k, v)   # what boto3's standard chain reads
        client = s3_client(moto_s3)    # a boto3 client for setting the scene
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from tagpipe_cli.servers import free_port, wait_for_port

S3_ALL = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}


def s3_user(
    endpoint: str, name: str = "tagpipe", statements: list[Any] | None = None
) -> dict[str, str]:
    """The env of a new IAM user (allowed s3:* unless `statements` say otherwise)."""
    anon = {"aws_access_key_id": "x", "aws_secret_access_key": "x"}
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", **anon)
    iam.create_user(UserName=name)
    policy = json.dumps({"Version": "2012-10-17", "Statement": statements or [S3_ALL]})
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=policy)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }


def s3_client(env: dict[str, str]) -> Any:
    """A boto3 S3 client signing as the user `env` names."""
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


@contextlib.contextmanager
def moto_server(log_dir: Path, unauthenticated_calls: int) -> Iterator[str]:
    """A moto S3/IAM server; yields its endpoint. The first `unauthenticated_calls`
    need no signature (they create the users); every later one must sign."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(unauthenticated_calls)}
    moto = Path(sys.executable).parent / "moto_server"
    with (log_dir / "moto.log").open("w") as log:
        proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for_port(port, 120, proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The env (AWS_ENDPOINT_URL, region, key) of a user allowed s3:* on a fresh moto."""
    # Three unauthenticated calls (user, policy, key); every later call must sign.
    with moto_server(tmp_path_factory.mktemp("moto"), 3) as endpoint:
        yield s3_user(endpoint)
