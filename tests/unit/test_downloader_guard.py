"""The downloader's URL, address and content guards (pure functions)."""

from __future__ import annotations

import ipaddress

import pytest
from tagpipe_common.errors import PermanentError, RetryableError
from tagpipe_downloader.fetch import parse_retry_after
from tagpipe_downloader.guard import (
    blocked_reason,
    check_address,
    check_pixels,
    parse_cidrs,
    parse_target,
    resolve_vetted,
    sniff_format,
)


def code_of(fn: object, *args: object) -> str:
    with pytest.raises(PermanentError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.code


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "gopher://example.com:70/_x",
        "javascript:alert(1)",
        "data:image/png;base64,AAAA",
        "http://user:pass@example.com/a.jpg",
        "http://user@example.com/a.jpg",
        "https://example.com:99999/a.jpg",
        "http:///a.jpg",
        "http://exa mple.com/a.jpg",
        "http://example.com/a\n.jpg",
        "http://[fe80::1%25eth0]/a.jpg",
        "http://999.0.0.1/",
        "http://%31%32%37.0.0.1/",
        "example.com/a.jpg",
    ],
)
def test_hostile_url_forms_are_invalid(url: str) -> None:
    assert code_of(parse_target, url) == "invalid_url"


@pytest.mark.parametrize(
    ("url", "ip"),
    [
        ("http://2130706433/", "127.0.0.1"),  # decimal
        ("http://0177.0.0.1/", "127.0.0.1"),  # octal
        ("http://0x7f.0.0.1/", "127.0.0.1"),  # hex
        ("http://0x7f000001/", "127.0.0.1"),
        ("http://127.1/", "127.0.0.1"),  # short form
        ("http://[::1]/", "::1"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1"),
        ("http://\u2460\u2461\u2466.0.0.1/", "127.0.0.1"),  # circled digits, IDNA-normalised
        ("http://127\u30020\u30020\u30021/", "127.0.0.1"),  # ideographic full stops
        ("http://127.0.0.1./", "127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("HTTP://EXAMPLE.com:8080/x", None),
    ],
)
def test_ip_spellings_are_canonicalised(url: str, ip: str | None) -> None:
    target = parse_target(url)
    assert (str(target.ip) if target.ip else None) == ip
    if ip is None:
        assert (target.scheme, target.host, target.port) == ("http", "example.com", 8080)


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "::127.0.0.1",  # IPv4-compatible
        "2001:db8::1",  # documentation
    ],
)
def test_non_public_addresses_are_blocked(addr: str) -> None:
    ip = ipaddress.ip_address(addr)
    assert blocked_reason(ip) is not None
    assert code_of(check_address, ip) == "blocked_address"


@pytest.mark.parametrize("addr", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(addr: str) -> None:
    assert blocked_reason(ipaddress.ip_address(addr)) is None
    check_address(ipaddress.ip_address(addr))


def test_allowlist_exempts_only_its_cidr() -> None:
    allow = parse_cidrs(["127.0.0.2/32", " "])
    check_address(ipaddress.ip_address("127.0.0.2"), allow)
    assert code_of(check_address, ipaddress.ip_address("127.0.0.1"), allow) == "blocked_address"


async def test_resolution_vets_every_answer() -> None:
    with pytest.raises(PermanentError) as info:
        await resolve_vetted("localhost", 80)
    assert info.value.code == "blocked_address"
    with pytest.raises(PermanentError) as info:
        await resolve_vetted("0177.0.0.1", 80)
    assert info.value.code == "blocked_address"
    assert [
        str(a) for a in await resolve_vetted("127.0.0.1", 80, parse_cidrs(["127.0.0.0/8"]))
    ] == ["127.0.0.1"]
    # NXDOMAIN is permanent; a resolver that cannot answer at all is retryable.
    with pytest.raises((PermanentError, RetryableError)) as failed:
        await resolve_vetted("no-such-host.invalid", 80)
    assert failed.value.code == "dns_error"


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"GIF89a\x01\x00", "GIF"),
        (b"BM" + bytes(12) + (40).to_bytes(4, "little") + bytes(12), "BMP"),
    ],
)
def test_sniff_supported(head: bytes, fmt: str) -> None:
    assert sniff_format(head) == fmt


@pytest.mark.parametrize(
    ("head", "code"),
    [
        (b"II*\x00\x08\x00\x00\x00", "unsupported_format"),  # TIFF
        (b"\x00\x00\x01\x00\x01\x00\x10\x10", "unsupported_format"),  # ICO
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported_format"),
        (b"  <svg width='1'/>", "unsupported_format"),
        (b"\x00\x00\x00\x1cftypavif", "unsupported_format"),
        (b"\x00\x00\x00\x18ftypheic", "unsupported_format"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "not_an_image"),
        (b"%PDF-1.7", "not_an_image"),
        (b"BMW drivers are a menace to society, said nobody", "not_an_image"),
        (b"", "not_an_image"),
        (b"\xff\xd8", "not_an_image"),  # too short to be a JPEG
    ],
)
def test_sniff_refuses(head: bytes, code: str) -> None:
    assert code_of(sniff_format, head) == code


def test_pixel_limit() -> None:
    check_pixels(4032, 3024, 50_000_000)
    assert code_of(check_pixels, 20000, 20000, 50_000_000) == "image_too_many_pixels"
    assert code_of(check_pixels, 0, 10, 50_000_000) == "decode_error"


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
