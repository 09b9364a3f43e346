"""s3proxy.delimiter: a part's end found in its chunks, pure, no event loop.

The reference is aiohttp's rule: the part is what comes before the first
``CRLF--boundary`` in ``CRLF + body`` (the header's CRLF counted as the body's start),
and the stream resumes right after that delimiter's CRLF.
"""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from bench import body as bench_body
from s3proxy.delimiter import DelimiterScan

D = b"\r\n--XbOuNdArY"
AFTER = b"--XbOuNdArY--\r\n"  # what follows the delimiter's CRLF at a form's end


def reference(stream: bytes, d: bytes = D) -> tuple[bytes, bytes | None]:
    """(the part's bytes, the stream after the delimiter's CRLF, or None: not found)."""
    whole = b"\r\n" + stream
    at = whole.find(d)
    if at < 0:
        return stream, None
    return whole[2:at], whole[at + 2 :]


def run(chunks: list[bytes], d: bytes = D) -> tuple[bytes, bytes | None, DelimiterScan]:
    """Feed ``chunks`` until the delimiter is found: (emitted, pushed back, the scan)."""
    scan = DelimiterScan(d)
    out: list[bytes] = []
    for i, chunk in enumerate(chunks):
        pieces, rest = scan.feed(chunk)
        assert all(pieces), "no empty piece is emitted"
        out += pieces
        if rest is not None:
            assert scan.found
            return b"".join(out), rest + b"".join(chunks[i + 1 :]), scan
    assert not scan.found
    return b"".join(out), None, scan


def check(chunks: list[bytes], d: bytes = D) -> DelimiterScan:
    """Assert that the scan over these chunks agrees with the reference."""
    stream = b"".join(chunks)
    data, rest = reference(stream, d)
    got, got_rest, scan = run(chunks, d)
    if rest is None:
        # Not found: everything was emitted but what is held back, which may be a delimiter.
        assert got + scan.held == stream and got_rest is None
        assert len(scan.held) < len(d)
    else:
        assert (got, got_rest) == (data, rest)
    return scan


STREAMS = [
    b"hello" + D + b"--\r\n",
    D[2:] + b"--\r\n",  # an empty part: the body starts with --boundary
    b"\r" + D + b"\r\n",  # a CR right before the delimiter
    b"\r\n--XbOuNdAr" + b"\r\n--XbOuNdArYZ",  # a near miss, then the delimiter
    b"-" * 20 + b"\r\n" * 10 + D + b"\r\n",
    b"\r\n\r\n" + D[:-1] + b"\r" + D + b"tail",
]


@pytest.mark.parametrize("stream", STREAMS)
def test_the_delimiter_split_over_two_chunks_at_every_offset(stream: bytes) -> None:
    for i in range(len(stream) + 1):
        check([stream[:i], stream[i:]])


@pytest.mark.parametrize("stream", STREAMS)
def test_the_delimiter_split_over_three_chunks_at_every_pair_of_offsets(stream: bytes) -> None:
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            check([stream[:i], stream[i:j], stream[j:]])


@pytest.mark.parametrize("stream", STREAMS)
def test_one_byte_chunks(stream: bytes) -> None:
    check([stream[i : i + 1] for i in range(len(stream))])


@pytest.mark.parametrize("tail", [b"\r", b"\r\n", b"\r\n-", b"\r\n--", D[:-1]])
def test_a_possible_start_of_the_delimiter_is_held_then_released(tail: bytes) -> None:
    scan = DelimiterScan(D)
    pieces, rest = scan.feed(b"data" + tail)
    assert pieces == [b"data"] and rest is None and scan.held == tail
    # The next chunk shows it was not the delimiter: the tail comes first, then the chunk.
    nxt = b"X" * 100
    pieces, rest = scan.feed(nxt)
    assert pieces == [tail, nxt] and pieces[1] is nxt and rest is None and scan.held == b""


@pytest.mark.parametrize("tail", [b"\r", b"\r\n", b"\r\n--", D[:-1]])
def test_a_held_tail_that_is_the_delimiter_ends_the_part(tail: bytes) -> None:
    scan = DelimiterScan(D)
    assert scan.feed(b"data" + tail) == ([b"data"], None)
    pieces, rest = scan.feed(D[len(tail) :] + b"--\r\n" + b"y" * 50)
    assert pieces == [] and rest == D[2:] + b"--\r\n" + b"y" * 50 and scan.found


def test_a_chunk_without_a_possible_delimiter_is_passed_on_as_it_is() -> None:
    scan = DelimiterScan(D)
    first = b"a" * 1000 + b"\r" + b"b" * (len(D) - 1)  # its CR is too early to matter
    second = bytes(range(256)).replace(b"\r", b"") * 10
    assert scan.feed(first)[0][0] is first
    assert scan.feed(second)[0][0] is second


def test_the_file_ends_exactly_at_a_chunk_edge() -> None:
    scan = DelimiterScan(D)
    data = b"z" * 4096
    pieces, rest = scan.feed(data)
    assert pieces == [data] and pieces[0] is data and rest is None
    pieces, rest = scan.feed(D + b"--\r\n")
    assert pieces == [] and rest == AFTER and scan.found


def test_an_empty_part_emits_nothing() -> None:
    scan = DelimiterScan(D)
    assert scan.feed(AFTER) == ([], AFTER)
    # Its first bytes one at a time: the header's CRLF is never emitted.
    check([AFTER[i : i + 1] for i in range(len(AFTER))])
    assert run([AFTER[:1], AFTER[1:]])[:2] == (b"", AFTER)


def test_the_header_crlf_is_not_the_part_s() -> None:
    # A body that starts with CRLF keeps it; one that starts with "--" is not a delimiter
    # unless the whole boundary follows.
    assert run([b"\r\nabc" + D])[0] == b"\r\nabc"
    assert run([b"--XbOuNdAr", b"x" + D])[0] == b"--XbOuNdArx"


def test_feeding_after_the_end_is_a_bug() -> None:
    scan = DelimiterScan(D)
    scan.feed(b"a" + D)
    with pytest.raises(RuntimeError):
        scan.feed(b"more")


def test_a_delimiter_must_start_with_crlf() -> None:
    with pytest.raises(ValueError):
        DelimiterScan(b"--boundary")


def junk_chunks(rng: random.Random, stream: bytes, most: int) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, len(stream) // most)))
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in pairwise(edges)]


def test_random_bodies_cut_at_random_edges_match_the_reference() -> None:
    """Bodies made mostly of the delimiter's own bytes (CRs, LFs, dashes, pieces of it),
    so near misses and held tails are everywhere."""
    rng = random.Random(15)
    alphabet = [b"\r", b"\n", b"-", b"X", b"b", D[:3], D[:-1], D[:7], b"\r\n", D]
    for _ in range(3000):
        pieces = rng.choices(alphabet, weights=[8, 8, 8, 4, 4, 3, 3, 3, 6, 1], k=rng.randint(0, 40))
        stream = b"".join(pieces)
        if not stream:
            continue
        edges = sorted({0, len(stream), *(rng.randint(0, len(stream)) for _ in range(6))})
        check([stream[a:b] for a, b in pairwise(edges)])


def test_the_junk_body_passes_whole_and_is_held_back_at_about_half_the_cuts() -> None:
    """bench/body.py's junk (CRLF runs, near-boundaries, dash runs) holds no delimiter: all
    of it comes out, cut at random edges. It is what the module header's figure counts:
    how often a chunk ends in a possible delimiter start (one slice copy each)."""
    block = bench_body.junk_block(1)
    d = bench_body.DELIMITER
    rng = random.Random(1)
    scan = DelimiterScan(d)
    out: list[bytes] = []
    held = fed = 0
    for start in range(0, len(block) - 1024, 4096):
        cut = rng.randrange(start + 1, start + 4096)
        pieces, rest = scan.feed(block[start:cut])
        pieces2, rest2 = scan.feed(block[cut : start + 4096])
        assert rest is None and rest2 is None
        out += pieces + pieces2
        held += bool(scan.held)
        fed += 1
    assert b"".join(out) + scan.held == block[: fed * 4096]
    share = held / fed
    assert 0.2 < share < 0.8, share  # about half: the figure in s3proxy.delimiter's header
    # The whole junk body with its closing delimiter, in 256 KiB-ish chunks.
    stream = block * 2 + d + b"--\r\n"
    check(junk_chunks(rng, stream, 200_000), d)


def test_near_and_crlf_only_bodies() -> None:
    """bench.parser_cost's hostile bodies: CRLFs only, and the delimiter but its last byte
    back to back; cut at random edges, then the real delimiter."""
    rng = random.Random(2)
    d = bench_body.DELIMITER
    for unit in (b"\r\n", d[:-1]):
        stream = unit * (300_000 // len(unit)) + d + b"--\r\n"
        check(junk_chunks(rng, stream, 10_000), d)
        check(junk_chunks(rng, stream, 7), d)
