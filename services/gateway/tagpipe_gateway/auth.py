"""API keys: kept only as sha256 digests, compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DIGEST_PREFIX = "sha256:"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_entries(text: str) -> list[bytes]:
    """Entries separated by commas or newlines; `#` starts a comment.

    `sha256:<hex>` is taken as a digest, anything else is a plain key that is
    hashed here and dropped, so no plain key outlives start-up.
    """
    digests = []
    for raw_line in text.splitlines():
        line = raw_line.split("#", 1)[0]
        for entry in line.split(","):
            entry = entry.strip()
            if not entry:
                continue
            if entry.startswith(DIGEST_PREFIX):
                hex_digest = entry[len(DIGEST_PREFIX) :]
                try:
                    value = bytes.fromhex(hex_digest)
                except ValueError:
                    raise ValueError("an API key entry has an invalid sha256 digest") from None
                if len(value) != 32:
                    raise ValueError("an API key entry has a sha256 digest of the wrong length")
                digests.append(value)
            else:
                digests.append(digest(entry))
    return digests


@dataclass(frozen=True)
class ApiKeys:
    digests: tuple[bytes, ...]

    @classmethod
    def load(cls, env_value: str, file: Path | None) -> ApiKeys:
        digests = parse_entries(env_value)
        if file is not None:
            digests += parse_entries(file.read_text())
        keys = cls(tuple(digests))
        if not keys.enabled:
            log.warning("no API keys configured: authentication is OFF, every caller is accepted")
        else:
            log.info("API key authentication on (%d key(s))", len(digests))
        return keys

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def check(self, presented: str) -> bool:
        """Constant time in the key: every digest is compared, with no early exit."""
        candidate = digest(presented)
        ok = False
        for d in self.digests:
            ok |= hmac.compare_digest(candidate, d)
        return ok

    def principal(self, presented: str) -> str:
        """A stable, non-secret id of a key (to scope idempotency keys per caller)."""
        return hashlib.sha256(b"principal:" + presented.encode()).hexdigest()[:16]


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
