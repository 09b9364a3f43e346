"""chunked.ChunkedDecoder against aiohttp's own HttpRequestParser (llhttp), fed the same bytes.

Every framing below, valid or not, goes through both: they must agree on whether it is
refused, whether the body ended, and on the data it holds. The short ones are also cut
at every byte offset (two reads), and fed a byte per read.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from aiohttp.web_protocol import RequestPayloadError

from s3proxy import chunked, chunks
from s3proxy.chunked import MAX_FIELD_SIZE, MAX_HEADERS, ChunkedDecoder, joined
from s3proxy.chunks import MAX_CHUNK_EXTENSIONS, MAX_TRAILERS, ChunkExtensions
from s3proxy.errors import FramingLimit

HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
HEAD_FIELDS, HEAD_SINGLETONS = 2, frozenset({"host", "transfer-encoding"})
END = b"1\r\na\r\n0\r\n\r\n"  # a valid body's last bytes

# ("refused" | "ended" | "open", the data given so far; none for a refused body, which
# fails whatever came of it)
Outcome = tuple[str, bytes]


def llhttp(pieces: Iterable[bytes]) -> Outcome:
    """What aiohttp's C parser makes of a chunked body fed as ``pieces``."""
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(
            BaseProtocol(loop),
            loop,
            2**30,
            max_line_size=8192,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
            payload_exception=RequestPayloadError,
        )
        messages, _, _ = parser.feed_data(HEAD)
        payload = messages[0][1]
        for piece in pieces:
            try:
                parser.feed_data(piece)
            except HttpProcessingError:
                return "refused", b""
            if payload.is_eof():
                break
        return ("ended" if payload.is_eof() else "open"), b"".join(payload._buffer)
    finally:
        loop.close()


def decoded(pieces: Iterable[bytes]) -> Outcome:
    """What ChunkedDecoder makes of the same."""
    decoder = ChunkedDecoder(fields=HEAD_FIELDS, singletons=HEAD_SINGLETONS)
    data: list[bytes] = []
    for piece in pieces:
        try:
            got, rest = decoder.feed(piece)
        except HttpProcessingError:
            return "refused", b""
        if got:
            data.append(joined(got))
        if rest is not None:
            return "ended", b"".join(data)
    return "open", b"".join(data)


def trailers(*lines: bytes) -> bytes:
    return b"1\r\na\r\n0\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def ext(text: bytes) -> bytes:
    return b"1" + text + b"\r\na\r\n0\r\n\r\n"


LONG = b"x" * (MAX_FIELD_SIZE - 1)
CORPUS = [
    # valid framings
    END,
    b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n",
    b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
    b"0001\r\na\r\n0\r\n\r\n",
    b"0" * 40 + b"1\r\na\r\n0\r\n\r\n",
    b"0\r\n\r\n",
    b"1\r\n\r\r\n1\r\n\n\r\n0\r\n\r\n",  # CR and LF as data
    b"4\r\n\r\n0\r\n\r\n0\r\n\r\n",  # the end's bytes as data
    *(
        ext(e)
        for e in (
            b";x",
            b";x=y",
            b';x="y z"',
            b";x=",
            b";=y",
            b";=",
            b";;x",
            b";x;y",
            b";x=;y",
            b";x=a;y=b",
            b';x=""',
            b';x="";y',
            b';x="a\tb"',
            b'x="a\x80b"',
            b';x="a\\"b"',
            b';x="\\\\"',
            b';x="a\\\tb"',
            b';x="a\\\x80b"',
            b';x=a"b"',
            b';x="ab";c',
            b";!#$%&*+-.^_`|~09azAZ=!#$%&*+-.^_`|~09azAZ",
        )
    ),
    b"1\r\na\r\n0;e=1\r\n\r\n",
    trailers(b"X: y"),
    trailers(b"X:y"),
    trailers(b"X:"),
    trailers(b"X:   "),
    trailers(b"X: \t y"),
    trailers(b"X: a\tb "),
    trailers(b"X: y z"),
    trailers(b"X: \x80\xff"),
    trailers(b"X: y", b"Y: z"),
    trailers(b"A: y", b"A: b", b"A: c"),
    trailers(b"A: b", b"Host: y"),  # the last field is not checked (aiohttp)
    trailers(b"Host: y"),
    trailers(b"Content-Type: y", b"A: b"),
    trailers(b"Connection: close"),
    trailers(b"Upgrade: h2c"),
    trailers(b"!#$%&*+-.^_`|~09azAZ: y"),
    trailers(b"X: " + b"v" * (MAX_FIELD_SIZE - 1)),
    trailers(b"X" * MAX_FIELD_SIZE + b":"),
    trailers(*[b"T%d: v" % i for i in range(MAX_HEADERS - HEAD_FIELDS + 1)]),
    # refused framings
    b"\r\na\r\n0\r\n\r\n",
    b"g\r\n",
    b"+1\r\na\r\n0\r\n\r\n",
    b"0x1\r\na\r\n0\r\n\r\n",
    b"1 \r\na\r\n0\r\n\r\n",
    b"1\t\r\na\r\n0\r\n\r\n",
    b"1 ;x\r\na\r\n0\r\n\r\n",
    b"1\na\r\n0\r\n\r\n",  # bare LF after the size
    b"1\r\na\n0\r\n\r\n",  # ... after data
    b"1\r\na\r\n0\n\r\n",
    b"1\r\na\r\n0\r\n\n",  # ... ending the trailers
    b"1\r\nab\r\n",  # data past its size
    b"1\r\na\r\r\n0\r\n\r\n",
    b"1\r\na\r\n\r\n",  # an empty size line
    b"1\r\na\r\n0\r\r\n\r\n",
    b"1\r\na\r\n0\r\n\r\r\n",
    b"1\r\na\r\n0\r\n\rx",
    b"f" * 17 + b"\r\n",
    b"10000000000000000\r\n",
    b"ffffffffffffffff\r\n",  # (valid, and open)
    *(
        ext(e)
        for e in (
            b";",
            b"; x",
            b";\tx",
            b";x ;y",
            b";x=y ;z",
            b";x=y;",
            b";x=a;",
            b";x==y",
            b";x=y\t",
            b";x\t",
            b";x=(",
            b";x=a b",
            b";x=\x80",
            b";x\x01",
            b';x="a\x01"',
            b';x="a\x7fb"',
            b';x="a\x00"',
            b';x="a\\\x01b"',
            b';x="a\\\x7f"',
            b';x="ab"c',
            b';x="a"=',
            b';x="""',
            b";x=y\n",
            b";x\n",
            b";x=y\r",
            b";x\r",
        )
    ),
    b'1;x="a\r\na\r\n0\r\n\r\n',
    trailers(b"X : y"),
    trailers(b" X: y"),
    trailers(b"X: y", b" z"),
    trailers(b"X: a", b"\tb"),
    trailers(b"X"),
    trailers(b"X(: y"),
    trailers(b":y"),
    trailers(b"X: y\rz"),
    trailers(b"X: \x01"),
    trailers(b"X: \x7f"),
    trailers(b"X: \x00"),
    trailers(b"X\x80: y"),
    trailers(b"Host: y", b"A: b"),
    trailers(b"host: y", b"A: b"),
    trailers(b"Content-Type: a", b"Content-Type: b", b"A: b"),
    trailers(b"Transfer-Encoding: chunked"),
    trailers(b"Transfer-Encoding: gzip", b"A: b"),
    trailers(b"Content-Length: 5"),
    trailers(b"X: " + b"v" * MAX_FIELD_SIZE),
    trailers(b"X" * (MAX_FIELD_SIZE + 1) + b":"),
    trailers(LONG + b": vv"),
    trailers(*[b"T%d: v" % i for i in range(MAX_HEADERS - HEAD_FIELDS + 2)]),
    b"1\r\na\r\n0\r\nX: y\n\r\n",
    b"1\r\na\r\n0\r\nX: y\r\n\n",
    b"1\r\na\r\n0\r\nX: y\r\r\n\r\n",
    b"1\r\na\r\n0\r\nX: y\r\n\rz",
    # cut short: open
    b"1\r\na\r\n0\r\nX: y\r\n\r",
    b"1\r\na\r\n0\r\n\r",
    b"5\r\nhel",
    b'5;x="a',
]


@pytest.mark.parametrize("body", CORPUS, ids=[repr(b[:40]) for b in CORPUS])
def test_the_decoder_refuses_and_decodes_what_llhttp_does(body: bytes) -> None:
    expected = llhttp([body])
    assert decoded([body]) == expected
    if len(body) <= 80:
        for cut in range(1, len(body)):
            pieces = [body[:cut], body[cut:]]
            assert decoded(pieces) == llhttp(pieces), cut
        single = [body[i : i + 1] for i in range(len(body))]
        assert decoded(single) == llhttp(single)


def test_random_chunkings_decode_as_llhttp_does() -> None:
    rng = __import__("random").Random(15)
    for _ in range(50):
        data = os.urandom(rng.randrange(0, 3000))
        sizes, body, i = [], b"", 0
        while i < len(data):
            size = rng.choice((1, 2, 7, 100, 1000))
            sizes.append(size)
            body += b"%x\r\n" % len(data[i : i + size]) + data[i : i + size] + b"\r\n"
            i += size
        body += b"0\r\n\r\n"
        cuts = sorted(rng.sample(range(1, len(body)), min(5, len(body) - 1)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert decoded(pieces) == llhttp(pieces) == ("ended", data)


def test_a_read_of_tiny_chunks_is_one_object_and_a_read_of_data_is_itself() -> None:
    decoder = ChunkedDecoder()
    read = b"".join(b"1\r\n%c\r\n" % (97 + i % 26) for i in range(10_000))
    got, rest = decoder.feed(read)
    assert rest is None and len(joined(got)) == 10_000
    decoder = ChunkedDecoder()
    got, _ = decoder.feed(b"100000\r\n")
    data = os.urandom(64 * 1024)
    got, _ = decoder.feed(data)
    assert joined(got) is data  # no copy: the read goes on as it is


def test_what_follows_the_body_is_handed_back() -> None:
    decoder = ChunkedDecoder()
    _, rest = decoder.feed(END + b"GET / HTTP/1.1\r\n")
    assert rest == b"GET / HTTP/1.1\r\n" and decoder.done


def test_a_connection_trailer_is_read_and_dropped() -> None:
    """A connection's control is no trailer's (RFC 9110 section 6.5.1): the body ends,
    and nothing says to close (reprobe12c F4: the parser's path read on)."""
    decoder = ChunkedDecoder()
    _, rest = decoder.feed(trailers(b"Connection: keep-alive, close") + b"GET")
    assert decoder.done and rest == b"GET"
    assert not hasattr(decoder, "close")


def test_extensions_over_the_limit_are_refused_also_across_reads() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"1;e=" + b"a" * (MAX_CHUNK_EXTENSIONS - 3) + b"\r\na")
    with pytest.raises(FramingLimit):
        decoder.feed(b"\r\n1;e=")
    decoder = ChunkedDecoder()
    decoder.feed(b"1;e=")
    with pytest.raises(FramingLimit):
        for _ in range(MAX_CHUNK_EXTENSIONS // 1000 + 1):
            decoder.feed(b"a" * 1000)


def test_kept_bytes_stay_bounded() -> None:
    """Leading zeros and the whitespace before a trailer's value are not kept."""
    decoder = ChunkedDecoder()
    for _ in range(1000):
        decoder.feed(b"0" * 1000)
    assert len(decoder._carry) <= 1
    decoder.feed(b"1\r\na\r\n0\r\nX:")
    for _ in range(30):  # within MAX_TRAILERS: the whitespace counts, is not kept
        decoder.feed(b" " * 1000)
    assert len(decoder._carry) <= 3
    assert decoder.feed(b"y\r\n\r\n")[1] == b""
    decoder = ChunkedDecoder()
    decoder.feed(b"1\r\na\r\n0\r\nX:")
    with pytest.raises(HttpProcessingError, match="trailer section"):
        for _ in range(40):
            decoder.feed(b" " * 1000)


def test_the_walk_it_hands_on_goes_on_as_chunk_extensions_would() -> None:
    """body_end.TailWalk goes on from ``walk()``: as from a ChunkExtensions fed the same."""
    body = b"3;a=b\r\nabc\r\n" + END
    for first in range(len(body) + 1):
        decoder = ChunkedDecoder()
        decoder.feed(body[:first])
        walk, plain = decoder.walk(), ChunkExtensions()
        plain.feed(body[:first])
        assert (walk.done, walk.total) == (plain.done, plain.total), first
        walk.feed(body[first:])
        assert walk.done and walk.total == 4
    assert ChunkedDecoder(phase=chunks.DONE).walk().phase == chunks.DONE


@pytest.mark.parametrize("size", [1, 3, 7, 100, 5000])
def test_the_benchs_prebuilt_chunked_bodies_are_valid(size: int) -> None:
    """bench.chunked_cost builds its bodies by strided slices: llhttp and the decoder read
    them back as the data."""
    from bench.chunked_cost import chunk_framed

    data = os.urandom(12_345)
    framed = chunk_framed(data, size)
    assert llhttp([framed]) == decoded([framed]) == ("ended", data)


def test_a_client_cannot_fill_the_run_patterns_for_everyone() -> None:
    """reprobe12c F2: run patterns were kept per size line as sent, 32 at most, and none
    taken past that: 32 uploads with size lines like ``02``, ``002`` filled it for the
    process's life, and every later upload's tiny chunks went one by one (1-byte chunks
    1,382-1,439 CPU s/GiB against 92-133). Old ones now make room."""
    for zeros in range(1, 40):
        digits = b"0" * zeros + b"1"
        run = (b"\r\n" + digits + b"\r\nx") * 10
        chunked._run(run, 0, digits, 1, [])
    data = (b"\r\nA\r\n" + b"k" * 10) * 50
    out: list[memoryview] = []
    assert chunked._run(data, 0, b"A", 10, out) == len(data)
    assert b"".join(out) == b"k" * 500


def test_size_lines_cycling_through_spellings_compile_no_pattern_per_spelling() -> None:
    """reprobe13b N3: run patterns were kept per spelling (least recently used out of
    256): pairs of chunks cycling through ~500 spellings (leading zeros, case) missed
    every time, a compile per two chunks (~1,150 CPU s/GiB of file, decoder alone). A
    pattern now serves every spelling of one width and size."""
    spellings = [
        b"0" * zeros + (b"%x" % size if lower else b"%X" % size)
        for size in range(1, chunked.RUN_MAX + 1)
        for zeros in range(16 - len(b"%x" % size) + 1)
        for lower in (True, False)
    ]
    assert len(set(spellings)) > 500
    for visit in range(2):
        before = chunked._run_pattern.cache_info().misses
        for digits in spellings:
            size = int(digits, 16)
            run = (b"\r\n" + digits + b"\r\n" + b"x" * size) * 2
            out: list[memoryview] = []
            assert chunked._run(run, 0, digits, size, out) == len(run)
            assert b"".join(out) == b"x" * 2 * size
        if visit:
            assert chunked._run_pattern.cache_info().misses == before


def test_a_run_ends_where_the_spelling_of_its_size_lines_changes() -> None:
    """The data are strided slices of one period: lines of one width but another spelling
    (``0a``, ``0A``) or another size end the run, and the chunk-by-chunk path goes on."""
    data = (b"\r\n0a\r\n" + b"a" * 10) * 3 + (b"\r\n0A\r\n" + b"b" * 10) * 2
    out: list[memoryview] = []
    assert chunked._run(data, 0, b"0a", 10, out) == 3 * 16
    assert b"".join(out) == b"a" * 30
    assert chunked._run(data, 0, b"0A", 10, []) == 0
    body = b"1\r\nx" + (b"\r\n1\r\ny") * 40 + b"\r\n01\r\nz" * 3 + b"\r\n2\r\nuv\r\n" + END
    assert llhttp([body]) == decoded([body]) == ("ended", b"x" + b"y" * 40 + b"zzz" + b"uva")


def trailer_section(size: int, spaces: int = 1) -> bytes:
    """Trailer field lines and the blank line, ``size`` bytes in all (``size`` >= 10),
    each value after ``spaces`` spaces (whitespace the decoder skips must count too)."""
    lines, i = [], 0
    while size > 2:
        name = b"T%d:" % i + b" " * spaces
        take = min(4000, size - 2)
        if 0 < size - 2 - take < len(name) + 3:  # leave room for a whole last line
            take -= len(name) + 3
        lines.append(name + b"v" * (take - len(name) - 2) + b"\r\n")
        size, i = size - take, i + 1
    return b"".join(lines) + b"\r\n"


@pytest.mark.parametrize("spaces", [0, 1, 5])
@pytest.mark.parametrize("split", [1, 7, 100, 4096, None])
@pytest.mark.parametrize("over", [0, 1])
def test_the_trailer_section_is_bounded_in_all(over: int, split: int | None, spaces: int) -> None:
    """MAX_TRAILERS bytes of trailer section pass, a byte more is refused, however the
    body is split: the decoder and the parser's walk (ChunkExtensions) count alike."""
    section = trailer_section(MAX_TRAILERS + over, spaces)
    assert len(section) == MAX_TRAILERS + over
    body = b"1\r\na\r\n0\r\n" + section
    pieces = [body] if split is None else [body[i : i + split] for i in range(0, len(body), split)]
    assert decoded(pieces)[0] == ("refused" if over else "ended")
    walk = ChunkExtensions()
    for piece in pieces:
        walk.follow(piece)
    assert walk.done and (walk.trailers > MAX_TRAILERS) == bool(over)
