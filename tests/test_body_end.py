"""body_end: has a waiting upload's body all arrived? Decided from bytes, as tables."""

from __future__ import annotations

import socket

import pytest

from s3proxy.body_end import (
    LOOK_LINES,
    PEEK_LIMIT,
    PENDING,
    TAIL_LINES,
    Looked,
    Looks,
    TailWalk,
    chunked_ended,
    length_ended,
    peek,
)
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


def test_a_look_walks_no_more_than_its_pass_allows_and_goes_on_later() -> None:
    """reprobe9b F2: a MiB of 1-byte chunks in the kernel is 175,000 chunks to walk,
    0.41 s of event loop each, paid for every waiter judged in one budget check (40 of
    them stalled /healthz 2.3 s). Each pass of the budget shares ``LOOK_LINES`` lines
    among its waiters; a walk stopped short goes on where it stopped in the next."""
    chunks = TAIL_LINES - 1  # the last chunk is the walk's last line it may take
    tail = b"1\r\nx\r\n" * chunks + b"0\r\n\r\n"
    walks = [TailWalk(framing(DATA)) for _ in range(3)]
    passes, walked = 0, 0
    answers: list[Looked] = [PENDING] * 3
    while PENDING in answers:
        looks = Looks()
        answers = [walk.go(len(tail), tail, looks) for walk in walks]
        assert looks.walked <= LOOK_LINES  # the bound, whatever the number of waiters
        walked += looks.walked
        passes += 1
    assert answers == [True] * 3
    assert walked == 3 * (chunks + 1)  # nothing walked twice
    assert passes == -(-walked // LOOK_LINES) > 1
    # shared: each look takes its share, and a short walk is answered at once
    looks = Looks(ways=3)
    assert TailWalk(framing(DATA)).go(len(tail), tail, looks) is PENDING
    assert TailWalk(framing(DATA)).go(len(tail), tail, looks) is PENDING
    assert TailWalk(framing(DATA)).go(6, b"0\r\n\r\n", looks) is True
    assert looks.walked == 2 * (LOOK_LINES // 3) + 1


@pytest.mark.parametrize(
    ("tail", "kernel", "looked"),
    [
        (b"1\r\nx\r\n" * 10, ALL, False),  # all walked: bytes still owed
        (b"1\r\nx\r\n" * 10, 100, None),  # the kernel holds more than was looked at
        (b"1\r\nx\r\n" * 9 + b"0\r\n\r\n", ALL, True),  # 10 size lines
        (b"1\r\nx\r\n" * 10 + b"0\r\n\r\n", ALL, PENDING),  # 11 size lines, 10 allowed
        (b"9" * 10 + b"\r\n" + b"x" * 100, ALL, False),  # data: no line to walk
    ],
)
def test_a_look_within_its_lines(tail: bytes, kernel: int, looked: Looked) -> None:
    kernel = len(tail) if kernel == ALL else kernel
    looks = Looks(10)
    assert TailWalk(framing(DATA)).go(kernel, tail, looks) is looked
    assert looks.walked <= 10


def test_a_walk_gives_up_after_its_lines_and_counts_bytes_as_owed() -> None:
    """reprobe10b N3: a MiB of 1-byte chunks is 175,000 lines; 40 such waiters took ~854
    passes (107 s) to be judged, and were granted memory meanwhile. A walk now gives up
    after TAIL_LINES lines without the end: bytes owed, so a silent client times out."""
    chunks = (PEEK_LIMIT - 5) // 6
    tail = b"1\r\nx\r\n" * chunks + b"0\r\n\r\n"
    walk = TailWalk(framing(DATA))
    answers: list[Looked] = []
    while not answers or answers[-1] is PENDING:
        answers.append(walk.go(len(tail), tail, Looks()))
    assert answers[-1] is False and walk.lines == TAIL_LINES
    assert len(answers) == -(-TAIL_LINES // LOOK_LINES)
    assert walk.go(len(tail), tail, Looks()) is False  # asked again: the same, no walk
    # a tail of bigger chunks is walked to its end: a MiB of 256-byte ones
    chunk = b"100\r\n" + b"y" * 256 + b"\r\n"
    tail = chunk * (PEEK_LIMIT // len(chunk)) + b"0\r\n\r\n"
    assert PEEK_LIMIT // len(chunk) < TAIL_LINES
    assert TailWalk(framing(DATA)).go(len(tail), tail, Looks()) is True
