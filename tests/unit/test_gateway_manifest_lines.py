"""Reading a manifest's bytes as numbered items (pure): lines, gzip, resume points,
malformed lines, and the bounded duplicate-URL window."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import pytest
from tagpipe_gateway.intake import MAX_LINE_BYTES
from tagpipe_gateway.manifest import UrlWindow
from tagpipe_gateway.manifest_lines import (
    Entry,
    ManifestError,
    entries,
    gunzip,
    split_lines,
    take,
)


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    """`data` in chunks of `size`: lines and gzip members cut anywhere."""
    return iter([data[i : i + size] for i in range(0, len(data), size)])


MANIFEST = (
    b'{"url": "https://a.example/1.jpg", "id": "one"}\n'
    b"\n"
    b"https://a.example/2.jpg\r\n"
    b'"https://a.example/3.jpg"\n'
    b"{broken\n"
    b'{"url": "ftp://a.example/4.jpg"}\n'
    b'{"uri": "https://a.example/5.jpg"}\n'
    b"https://a.example/6.jpg"  # no final newline
)


def read(
    data: bytes, size: int = 7, gz: bool = False, seq: int = 0, offset: int = 0
) -> list[Entry]:
    return list(entries(pieces(data[offset:] if not gz else data, size), gz, seq, offset, 4096))


def test_each_non_blank_line_is_one_item_in_order() -> None:
    got = read(MANIFEST)
    assert [e.seq for e in got] == [0, 1, 2, 3, 4, 5, 6]
    assert [e.url for e in got] == [
        "https://a.example/1.jpg", "https://a.example/2.jpg", "https://a.example/3.jpg",
        None, None, None, "https://a.example/6.jpg",
    ]  # fmt: skip
    assert got[0].client_id == "one" and got[3].raw == "{broken"
    assert "not valid JSON" in (got[3].error or "")
    assert "http" in (got[4].error or "") and "url" in (got[5].error or "")
    assert got[-1].end == len(MANIFEST)


@pytest.mark.parametrize("size", [1, 5, 64, 1 << 20])
def test_a_resume_at_any_checkpoint_reads_the_same_items(size: int) -> None:
    whole = read(MANIFEST, size)
    for k, e in enumerate(whole):
        rest = read(MANIFEST, size, seq=e.seq + 1, offset=e.end)
        assert rest == whole[k + 1 :]


def test_gzip_members_and_resume_by_seq() -> None:
    data = gzip.compress(MANIFEST[:60]) + gzip.compress(MANIFEST[60:])
    whole = read(data, 11, gz=True)
    assert [e.url for e in whole] == [e.url for e in read(MANIFEST)]
    assert all(e.end == 0 for e in whole)
    assert read(data, 3, gz=True, seq=4) == whole[4:]


def test_a_truncated_or_corrupt_gzip_stream_is_an_error() -> None:
    data = gzip.compress(MANIFEST)
    with pytest.raises(ManifestError, match="truncated"):
        list(gunzip(pieces(data[:-12], 9)))
    with pytest.raises(ManifestError, match="not a valid gzip"):
        list(gunzip(iter([data[:10] + b"\x00garbage" * 20])))


def test_an_over_long_line_is_skipped_not_held() -> None:
    long_line = b"https://a.example/" + b"x" * (3 * MAX_LINE_BYTES)
    data = b"https://a.example/1.jpg\n" + long_line + b"\nhttps://a.example/2.jpg\n"
    lines = list(split_lines(pieces(data, 1 << 16), 0))
    first, last = b"https://a.example/1.jpg", b"https://a.example/2.jpg"
    assert [line for line, _ in lines] == [first, None, last]
    got = read(data, 1 << 16)
    assert [e.url is None for e in got] == [False, True, False] and got[1].error
    assert got[1].end == len(data) - len(last) - 1
    # Whole in one chunk, a line over 1 MiB is refused all the same.
    got = read(data, 8 << 20)
    assert [e.url is None for e in got] == [False, True, False]


def test_take_reads_a_chunk_at_a_time() -> None:
    it = entries(
        iter([b"\n".join(json.dumps(f"https://a/{i}").encode() for i in range(7))]),
        False,
        0,
        0,
        4096,
    )
    assert [len(take(it, 3)[0]) for _ in range(4)] == [3, 3, 1, 0]


def test_take_keeps_the_entries_read_before_a_break() -> None:
    whole = gzip.compress(b"".join(json.dumps(f"https://a/{i}").encode() + b"\n" for i in range(5)))
    it = entries(iter([whole[:-8]]), True, 0, 0, 4096)  # the gzip trailer cut off
    got, broke = take(it, 10)
    assert [e.seq for e in got] == [0, 1, 2, 3, 4]
    assert isinstance(broke, ManifestError) and "truncated" in str(broke)
    assert take(it, 10) == ([], None)


def test_the_duplicate_window_is_bounded() -> None:
    window = UrlWindow(3)
    assert [window.claim(u, s) for s, u in enumerate("abcd")] == [None] * 4
    assert window.claim("d", 9) == 3 and window.claim("b", 10) == 1
    assert window.claim("a", 11) is None  # beyond the window: a new first
    assert len(window.first) == 3
    assert UrlWindow(0).claim("a", 0) is None and UrlWindow(0).claim("a", 1) is None
