from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from tagpipe_gateway.auth import ApiKeys, bearer_token, parse_entries


def test_plain_and_hashed_entries_both_accept_their_key(tmp_path: Path) -> None:
    hashed = "sha256:" + hashlib.sha256(b"from-file").hexdigest()
    secret = tmp_path / "keys"
    secret.write_text(f"# mounted secret\n{hashed}\n")
    keys = ApiKeys.load("alpha, beta", secret)
    assert keys.enabled
    assert keys.check("alpha") and keys.check("beta") and keys.check("from-file")
    assert not keys.check("gamma") and not keys.check("")
    assert not keys.check(hashed)  # the digest itself is not a key


def test_plain_keys_are_not_kept() -> None:
    keys = ApiKeys(tuple(parse_entries("s3cret")))
    assert b"s3cret" not in b"".join(keys.digests)
    assert "s3cret" not in repr(keys)


def test_bad_digest_is_refused() -> None:
    with pytest.raises(ValueError, match="digest"):
        parse_entries("sha256:abc")
    with pytest.raises(ValueError, match="digest"):
        parse_entries("sha256:zz")


def test_no_keys_turns_auth_off_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        keys = ApiKeys.load("", None)
    assert not keys.enabled
    assert "authentication is OFF" in caplog.text


def test_principal_is_stable_and_not_the_key() -> None:
    keys = ApiKeys(tuple(parse_entries("k1")))
    assert keys.principal("k1") == keys.principal("k1") != keys.principal("k2")
    assert "k1" not in keys.principal("k1")


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("", None), (None, None)],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
