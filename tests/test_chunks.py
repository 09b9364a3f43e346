"""chunks.ChunkExtensions: the chunk-extension bytes of a chunked body, fed as it comes."""

from __future__ import annotations

import pytest

from s3proxy.chunks import ChunkExtensions

BODY = b"5\r\nhello\r\n3;a=b\r\nabc\r\n10 ; x\r\n" + b"y" * 16 + b"\r\n0;z\r\nT: 1\r\n\r\n"


@pytest.mark.parametrize(
    ("body", "total", "done"),
    [
        (b"5\r\nhello\r\n0\r\n\r\n", 0, True),
        (BODY, len(b";a=b") + len(b" ; x") + len(b";z"), True),
        (b"000005;e=" + b"a" * 1000 + b"\r\nhello\r\n", 1003, False),  # leading zeros
        (b"5\r\nhelloXX", 0, True),  # data past its size: the parser's to refuse
        (b"f" * 17 + b"\r\n", 0, True),  # a size over 64 bits: the parser's to refuse
        (b"4\r\n;x=\r\n\r\n", 0, False),  # an extension's bytes inside data are data
        (b"0\r\n\r\nPOST /x;e=1 HTTP/1.1\r\n", 0, True),  # the next request is not counted
    ],
)
def test_counts_the_extension_bytes_of_size_lines(body: bytes, total: int, done: bool) -> None:
    whole = ChunkExtensions()
    assert whole.feed(body) == total
    assert whole.done is done
    split = ChunkExtensions()  # the same, a byte per read
    for i in range(len(body)):
        split.feed(body[i : i + 1])
    assert (split.total, split.done) == (total, done)


def test_a_long_extension_is_counted_as_it_comes() -> None:
    scan = ChunkExtensions()
    scan.feed(b"1;e=")
    for _ in range(100):
        scan.feed(b"a" * 1000)
    assert scan.total == 100_003 and not scan.done
