"""What the downloader refuses before it spends a byte: hostile URLs, private
addresses and content that is not a supported image.

The URL and content checks are pure functions. Addresses are vetted by the shared
tagpipe_common.netguard (`check_address`, `resolve_vetted`; the gateway uses it too),
and the fetcher connects only to addresses that passed it (see fetch.PinnedResolver),
so a DNS answer that changes between the check and the connect (rebinding)
cannot reach an internal host.
"""

from __future__ import annotations

from dataclasses import dataclass

from tagpipe_common.errors import ErrorCode, PermanentError
from tagpipe_common.netguard import (
    IPAddress,
    IPNetwork,
    blocked_reason,
    check_address,
    literal_ip,
    parse_cidrs,
    resolve_vetted,
)
from yarl import URL

# Re-exported: the downloader's callers and tests name the address checks here too.
__all__ = [
    "IPAddress",
    "IPNetwork",
    "TargetURL",
    "blocked_reason",
    "check_address",
    "check_pixels",
    "parse_cidrs",
    "parse_target",
    "resolve_vetted",
    "sniff_format",
]

ALLOWED_SCHEMES = ("http", "https")
MAX_URL_LENGTH = 8192


@dataclass(frozen=True)
class TargetURL:
    url: URL  # what the request is made with
    scheme: str
    host: str  # lower-case hostname, or the canonical IP text for a literal
    port: int
    ip: IPAddress | None  # set when the URL names an IP literal (any spelling)


def _parse(url: str) -> URL:
    if len(url) > MAX_URL_LENGTH:
        raise PermanentError(ErrorCode.INVALID_URL, "URL longer than 8192 characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise PermanentError(ErrorCode.INVALID_URL, "URL contains whitespace or control characters")
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except (ValueError, TypeError, UnicodeError) as exc:
        raise PermanentError(ErrorCode.INVALID_URL, f"unparseable URL: {exc}") from None
    return parsed


def parse_target(url: str) -> TargetURL:
    """Syntax checks: scheme, host, no credentials. Raises PermanentError(invalid_url).

    Parsed with yarl, the parser aiohttp itself uses, so the host we vet is the
    host it dials: yarl IDNA-normalises `①②⑦.0.0.1` to 127.0.0.1, which a
    different parser would have passed on as an ordinary name.
    """
    parsed = _parse(url)
    scheme = parsed.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise PermanentError(ErrorCode.INVALID_URL, f"scheme {scheme or '(none)'!r} not allowed")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise PermanentError(ErrorCode.INVALID_URL, "credentials in the URL are not allowed")
    host = (parsed.host or "").lower()
    if not host:
        raise PermanentError(ErrorCode.INVALID_URL, "URL has no host")
    if "%" in host:
        raise PermanentError(ErrorCode.INVALID_URL, "percent signs (zone ids, escapes) in host")
    port = parsed.port or (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise PermanentError(ErrorCode.INVALID_URL, f"port {port} out of range")
    ip = literal_ip(host)
    return TargetURL(parsed, scheme, str(ip) if ip else host, port, ip)


# --- content -----------------------------------------------------------------

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_BMP_DIB_SIZES = {n.to_bytes(4, "little") for n in (12, 40, 52, 56, 64, 108, 124)}


def sniff_format(head: bytes) -> str:
    """The image format from magic bytes; Content-Type proves nothing.

    Returns a Pillow format name from SUPPORTED_FORMATS, or raises
    PermanentError: unsupported_format for images we recognise but do not take,
    not_an_image for everything else.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    # "BM" alone is too weak (any text may start so): require a known DIB header size.
    if head[:2] == b"BM" and len(head) >= 26 and head[14:18] in _BMP_DIB_SIZES:
        return "BMP"
    other = _recognised_unsupported(head)
    if other is not None:
        raise PermanentError(ErrorCode.UNSUPPORTED_FORMAT, f"{other} images are not supported")
    if not head:
        raise PermanentError(ErrorCode.NOT_AN_IMAGE, "empty body")
    raise PermanentError(ErrorCode.NOT_AN_IMAGE, "content is not a recognised image format")


def _recognised_unsupported(head: bytes) -> str | None:
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and len(head) > 6:
        return "ICO"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand.startswith((b"avi", b"avs")):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    if head[:4] == b"8BPS":
        return "PSD"
    if head.startswith((b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if head[:2] == b"\xff\x0a" or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "JPEG XL"
    text = head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<?xml", b"<svg", b"<!doctype svg")) and b"<svg" in text:
        return "SVG"
    return None


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Decompression-bomb guard, from the header, before any pixel is decoded."""
    if width <= 0 or height <= 0:
        raise PermanentError(ErrorCode.DECODE_ERROR, f"invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise PermanentError(
            ErrorCode.IMAGE_TOO_MANY_PIXELS,
            f"{width}x{height} is {width * height} pixels, over the limit of {max_pixels}",
        )
