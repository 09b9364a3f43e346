"""body_end: has a waiting upload's body all arrived? Decided from bytes, as tables."""

from __future__ import annotations

import socket

import pytest

from s3proxy.body_end import chunked_ended, length_ended, peek
from s3proxy.chunks import ChunkExtensions

DATA = b"5\r\nhello\r\n"  # one whole chunk
ALL = -1  # the kernel holds just the tail


def framing(read: bytes) -> ChunkExtensions:
    walk = ChunkExtensions()
    walk.feed(read)
    return walk


@pytest.mark.parametrize(
    ("read", "tail", "kernel", "ended"),
    [
        # what was read tells alone when the kernel holds nothing, or the end was read
        (DATA, None, 0, False),
        (DATA + b"0\r\n", None, 0, False),  # the last chunk begun, its trailer's end due
        (DATA + b"0\r\n\r\n", None, 0, True),
        (DATA + b"0\r\n\r\n", None, 10, True),  # what follows is the next request's
        (DATA, None, 5, None),  # the end may be in the kernel: look
        # the kernel's bytes continue the walk
        (DATA, b"0\r\n\r\n", ALL, True),
        (DATA + b"0\r\n", b"\r\n", ALL, True),  # the last chunk split between reads
        (DATA + b"0", b"\r\n\r\n", ALL, True),
        (DATA, b"0\r\n", ALL, False),
        (DATA, b"000\r\n\r\n", ALL, True),  # leading zeros
        (DATA, b"0;name=value\r\n\r\n", ALL, True),  # chunk extensions
        (DATA, b"0\r\nDigest: x\r\n\r\n", ALL, True),  # trailer fields
        (DATA, b"0\r\nDigest: x\r\n", ALL, False),
        (DATA, b"0\r\n\r\nPOST / HTTP/1.1\r\n", ALL, True),
        (b"5\r\nhel", b"lo\r\n0\r\n\r\n", ALL, True),  # the chunk's data ends in the kernel
        (b"1", b"0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", ALL, True),  # its size line too
        # data that looks like the end is data: 7 of the chunk's 11 bytes
        (b"b\r\n", b"\r\n0\r\n\r\n", ALL, False),
        (b"7\r\n", b"\r\n0\r\n\r\n" + b"\r\n" + b"0\r\n\r\n", ALL, True),  # then the end
        (DATA, b"3\r\nabc\r\n", ALL, False),  # more chunks, more due
        # only the beginning of the kernel's bytes looked at: the end may be further
        (DATA, b"3\r\nabc\r\n", 100, None),
        (DATA, b"0\r\n\r\n", 100, True),
        # framing the parser will refuse: granted, the upload fails at once
        (b"5\r\nhelloXX", None, 0, True),
        (DATA, b"zz\r\n", ALL, False),  # a bad size, read as 0 and trailers due (refused once read)
    ],
)
def test_chunked_ended(read: bytes, tail: bytes | None, kernel: int, ended: bool | None) -> None:
    walk = framing(read)
    if kernel == ALL:
        assert tail is not None
        kernel = len(tail)
    before = (walk.total, walk.done)
    assert chunked_ended(walk, kernel, tail) is ended
    assert (walk.total, walk.done) == before  # the connection's own walk is left alone


@pytest.mark.parametrize(
    ("received", "length", "ended"),
    [(0, 0, True), (99, 100, False), (100, 100, True), (101, 100, True)],
)
def test_length_ended(received: int, length: int, ended: bool) -> None:
    assert length_ended(received, length) is ended


def test_peek_leaves_the_bytes_to_read() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(b"0\r\n\r\nnext")
        assert peek(b, 5) == b"0\r\n\r\n"
        assert peek(b, 100) == b"0\r\n\r\nnext"
        assert b.recv(100) == b"0\r\n\r\nnext"
        assert peek(b, 10) is None  # nothing there: it does not wait
        assert b.fileno() >= 0  # still open: the descriptor was only borrowed
    assert peek(b, 10) is None  # closed
