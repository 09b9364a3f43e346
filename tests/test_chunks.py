"""chunks.ChunkExtensions: the chunk-extension bytes of a chunked body, fed as it comes."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from s3proxy import chunks
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


def reference(body: bytes) -> tuple[int, bool]:
    """What ChunkExtensions counts, byte by byte: the rule its fast walk must keep."""
    total, state, digits, in_size, left, line = 0, "size", b"", True, 0, 0
    for byte in body:
        char = bytes([byte])
        if state == "size":
            if char == b"\n":
                size = int(digits or b"0", 16)
                digits, in_size = b"", True
                state, left, line = ("trailers", 0, 0) if size == 0 else ("data", size, 0)
            elif in_size and char in b"0123456789abcdefABCDEF":
                digits = (digits + char).lstrip(b"0")
                if len(digits) > 16:
                    return total, True
            else:
                in_size = False
                total += char != b"\r"
        elif state == "data":
            left -= 1
            state = "data" if left else "data end"
        elif state == "data end":
            if char == b"\n":
                state = "size"
            elif char != b"\r":
                return total, True
        else:
            if char == b"\n":
                if line == 0:
                    return total, True
                line = 0
            elif char != b"\r":
                line += 1
    return total, False


def random_body(rng: random.Random) -> bytes:
    """Framing as clients send it, and as they may get it wrong."""
    out = b""
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.6:
            size = rng.choice([0, 1, 2, 3, 16])
            digits = b"%x" % size if rng.random() < 0.9 else b"0%x" % size
            ext = rng.choice([b"", b";a=b", b" ;x"]) if rng.random() < 0.3 else b""
            out += digits + ext + rng.choice([b"\r\n", b"\r\n", b"\n", b"\r\r\n"]) + b"y" * size
            out += rng.choice([b"\r\n", b"\r\n", b"\n", b"\r\r\n", b"X", b""])
        else:
            out += rng.choice(
                [b"\r\n", b"\n", b"\r", b"0", b"1", b"F", b";e=1", b" ", b"T: 1", b"0" * 19 + b"1"]
            )
    return out


def test_the_fast_walk_counts_as_the_byte_by_byte_rule() -> None:
    rng = random.Random(15)
    for _ in range(20_000):
        body = random_body(rng)
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randint(0, 4))))
        scan, start = ChunkExtensions(), 0
        for cut in [*cuts, len(body)]:
            scan.feed(body[start:cut])
            start = cut
        assert (scan.total, scan.done) == reference(body), body
        # a size line per step, gone on with from where it stopped: the same walk
        step, pos = ChunkExtensions(), 0
        while True:
            pos, lines = step.follow(body, pos, 1)
            assert lines <= 1
            if lines == 0:
                break
        assert (step.total, step.done) == reference(body), body


def python_lines(walk: Callable[[], object]) -> int:
    """Lines of s3proxy/chunks.py that ``walk`` runs: its work in Python, as a count."""
    count = 0

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if frame.f_code.co_filename != chunks.__file__:
            return None
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        walk()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(
    ("body", "most"),
    [
        # reprobe9b F2: 0.41 s per MiB of 1-byte chunks byte by byte (~70 lines a chunk),
        # 0.12 s per MiB of trailer lines. Now a chunk is a regular expression's match
        # and a few lines; trailers, data and extensions are skipped in C.
        (b"1\r\nx\r\n" * 1000, 12 * 1000),
        (b"1\nx\n" * 1000, 12 * 1000),
        (b"1;e\r\nx\r\n" * 1000, 12 * 1000),
        (b"0\r\n" + b"a: b\r\n" * 10_000, 100),
        (b"1\r\nx" + b"\r" * 10_000, 100),
        (b"1;" + b"e" * 10_000 + b"\r\n", 100),
    ],
)
def test_the_walk_costs_python_work_per_chunk_not_per_byte(body: bytes, most: int) -> None:
    assert python_lines(lambda: ChunkExtensions().feed(body)) <= most


def test_follow_stops_after_its_lines_and_goes_on_from_there() -> None:
    body = b"1\r\nx\r\n" * 100 + b"0\r\n\r\n"
    scan = ChunkExtensions()
    stop, lines = scan.follow(body, 0, 40)
    assert lines == 40 and 6 * 39 < stop <= 6 * 40  # before the 41st size line
    assert not scan.done
    assert scan.follow(body, stop, 0) == (stop, 0)  # no lines left: no step
    assert scan.follow(body, stop, 1000) == (len(body), 61)
    assert scan.done


@pytest.mark.parametrize(
    "body",
    [
        b"1\r\na\r\n21\r\n" + b"b" * 33 + b"\r\n0\r\n\r\n",
        b"".join(b"1\r\n%c\r\n" % c for c in b"xyz" * 50) + b"0\r\nT: 1\r\n\r\n",
        b"a;e=1\r\n0123456789\r\n3\r\nabc\r\n0\r\n\r\n",
        b"10\r\n" + b"q" * 16 + b"\r\n",  # not ended
    ],
)
def test_counts_the_data_bytes_a_parser_passes_on(body: bytes) -> None:
    """``data``: the chunk data walked, whole or a byte per read (protocol tells by it
    whether aiohttp's parser passed on all it was given; reprobe14a N2)."""
    want = len(decoded_data(body))
    whole = ChunkExtensions()
    whole.feed(body)
    split = ChunkExtensions()
    for i in range(len(body)):
        split.feed(body[i : i + 1])
    assert whole.data == split.data == want


def decoded_data(body: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return out
        size = int(body[pos:line_end].split(b";")[0], 16)
        if size == 0:
            return out
        start = line_end + 2
        out += body[start : start + size]
        pos = start + size + 2
        if pos > len(body):
            return out
