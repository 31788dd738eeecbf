"""Stable error codes and the one exception hierarchy every worker maps to NATS acks.

A retryable error means "NAK with a delay"; a permanent error means "write an
error result, then ack/term". Codes are part of the public API: clients match on
them, so never rename one.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # URL and network (downloader)
    INVALID_URL = "invalid_url"
    BLOCKED_ADDRESS = "blocked_address"
    DNS_ERROR = "dns_error"
    CONNECT_TIMEOUT = "connect_timeout"
    DOWNLOAD_TIMEOUT = "download_timeout"
    CONNECTION_ERROR = "connection_error"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    REDIRECT_LOOP = "redirect_loop"
    TOO_LARGE = "too_large"
    # Content (downloader)
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels"
    IMAGE_TOO_SMALL = "image_too_small"
    DECODE_ERROR = "decode_error"
    BLOB_MISSING = "blob_missing"
    # Inference
    BAD_TENSOR = "bad_tensor"
    INFERENCE_ERROR = "inference_error"
    # Lifecycle
    RETRIES_EXHAUSTED = "retries_exhausted"
    # No item is written with it any more (a cancelled job counts its items without a
    # result as cancelled); kept so results stored before that still read, and counted.
    CANCELLED = "cancelled"
    # Real-time: the caller's deadline passed before the item was served; skipped.
    DEADLINE_EXCEEDED = "deadline_exceeded"
    # Bulk: the same URL appeared earlier in the job; the message names that item.
    DUPLICATE_URL = "duplicate_url"
    # Manifest job: the manifest could not be read on from this item (deleted, access
    # revoked, corrupt gzip); the job ends here, the message says why.
    MANIFEST_UNREADABLE = "manifest_unreadable"
    BAD_MESSAGE = "bad_message"


def http_code(status: int) -> str:
    """`http_404` and friends: one code per upstream HTTP status, by design."""
    return f"http_{status}"


class TagpipeError(Exception):
    """Base of every error a worker raises on purpose."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message or code


class PermanentError(TagpipeError):
    """Retrying cannot help: the item ends as an error result."""


class RetryableError(TagpipeError):
    """A transient fault: NAK with `delay_s` and let JetStream redeliver."""

    def __init__(self, code: str, message: str = "", delay_s: float = 1.0) -> None:
        super().__init__(code, message)
        self.delay_s = delay_s
