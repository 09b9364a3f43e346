"""A file part's bytes as the stream received them (s3proxy.form.PartSource, whole chunks).

The reader scans each chunk aiohttp's StreamReader holds for the part's delimiter and
hands it on as the same ``bytes`` object; these tests check it gives what aiohttp's own
``read_chunk`` gives, byte for byte and in the state it leaves the stream and the part
in, on bodies built to be hard (CRLFs, dashes and pieces of the boundary everywhere),
cut into stream chunks at random points. No socket: bodies are fed to aiohttp's own
StreamReader and MultipartReader.
"""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Any

import pytest
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.streams import EmptyStreamReader, StreamReader

from s3proxy import form
from s3proxy.body_end import PENDING, TAIL_LINES, Looked, Looks, peek
from s3proxy.chunks import ChunkExtensions
from s3proxy.errors import MALFORMED_MULTIPART, ProxyError
from s3proxy.form import (
    JOIN_BYTES,
    JOIN_PIECES,
    SMALL_PIECE,
    ClientWatch,
    Field,
    FilePart,
    FormLimits,
    PartSource,
    TransportFlow,
    iter_form,
    next_part,
    small_run,
)
from tests import bodies
from tests.fake_client import Wire, payload

B = bodies.BOUNDARY.encode()
DELIM = b"\r\n--" + B
LIMITS = FormLimits(
    max_files=50, max_fields=50, max_field_size=1 << 20, max_request_size=1 << 30, chunk_size=4096
)


def stream_of(pieces: list[bytes], *, http_chunks: bool = False) -> StreamReader:
    """A StreamReader that received ``pieces`` (one chunk each) and then the body's end;
    with ``http_chunks`` each piece came as one chunk of a chunked transfer coding."""
    loop = asyncio.get_running_loop()
    stream = StreamReader(Wire(loop), 2**16, loop=loop)
    for piece in pieces:
        if http_chunks:
            stream.begin_http_chunk_receiving()
        stream.feed_data(piece)
        if http_chunks:
            stream.end_http_chunk_receiving()
    stream.feed_eof()
    return stream


def cut(data: bytes, rng: random.Random, most: int) -> list[bytes]:
    """``data`` in pieces of 1..``most`` bytes."""
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, most)
        out.append(data[i : i + n])
        i += n
    return out


def watch(stream: StreamReader) -> ClientWatch:
    return ClientWatch(lambda: stream.total_bytes, 60.0, 1 << 40)


async def read_form(pieces: list[bytes], **kw: bool) -> list[tuple[str, str | None, bytes]]:
    """What s3proxy's iter_form reads: (name, filename or None, bytes) per part."""
    stream = stream_of(pieces, **kw)
    got: list[tuple[str, str | None, bytes]] = []
    async for item in iter_form(MultipartReader(bodies.headers(), stream), LIMITS, lambda: 0):
        if isinstance(item, FilePart):
            data = bytearray()
            while chunk := await item.source.read(LIMITS.chunk_size):
                data += chunk
            got.append((item.field, item.filename, bytes(data)))
        else:
            assert isinstance(item, Field)
            got.append((item.name, None, item.value.encode()))
    return got


async def read_form_aiohttp(pieces: list[bytes]) -> list[tuple[str, str | None, bytes]]:
    """The same body read by aiohttp alone."""
    reader = MultipartReader(bodies.headers(), stream_of(pieces))
    got: list[tuple[str, str | None, bytes]] = []
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader) and part.name is not None
        got.append((part.name, part.filename, bytes(await part.read())))
    return got


def hard_bytes(rng: random.Random, n: int) -> bytes:
    """Bytes a boundary scan finds hard: CRs, LFs, dashes and near-delimiters."""
    alphabet = [b"\r", b"\n", b"-", b"\r\n", b"\r\n--", DELIM[:-1], DELIM[:10], b"q", b"\x00"]
    return b"".join(rng.choices(alphabet, k=n))


async def test_a_file_part_s_chunks_are_the_bytes_the_stream_received() -> None:
    head = bodies.part_head(bodies.file("f", "a.bin", b""))
    c1, c2 = b"a" * 100_000, b"b" * 70_000
    c3 = b"c" * 5000 + b"\r\n--" + B + b"--\r\n"
    got = []
    stream = stream_of([head, c1, c2, c3])
    async for item in iter_form(MultipartReader(bodies.headers(), stream), LIMITS, lambda: 0):
        assert isinstance(item, FilePart)
        while chunk := await item.source.read(4096):  # a chunk, though 4 KiB were asked
            got.append(chunk)
    assert got[0] is c1 and got[1] is c2  # no copy
    assert got[2] == b"c" * 5000 and len(got) == 3


@pytest.mark.parametrize("seed", range(40))
async def test_forms_read_as_aiohttp_reads_them(seed: int) -> None:
    """Fields and files (empty ones too) of hard bytes, cut into stream chunks of 1 byte
    to 300 at random: the same parts, byte for byte, as aiohttp's own reader gives."""
    rng = random.Random(seed)
    parts = []
    for i in range(rng.randint(1, 5)):
        size = rng.choice([0, 1, 2, len(DELIM) - 1, len(DELIM), rng.randint(0, 3000)])
        data = hard_bytes(rng, size)
        if rng.random() < 0.3:
            parts.append(bodies.field(f"n{i}", data.decode("latin-1").replace("\x00", "z")))
        else:
            parts.append(bodies.file(f"f{i}", f"f{i}.bin", data))
    body = bodies.body(parts)
    pieces = cut(body, rng, rng.choice([1, 7, 60, 300]))
    ours = await read_form(pieces)
    assert ours == await read_form_aiohttp(pieces)
    assert ours == [(p.name, p.filename, p.data) for p in parts]


async def part_end_state(pieces: list[bytes], ours: bool) -> tuple[bytes, bool, bytes]:
    """Read the first part to its end with our reader or aiohttp's: (its bytes, at its
    end, what is left in the stream)."""
    stream = stream_of(pieces)
    reader = MultipartReader(bodies.headers(), stream)
    part = await next_part(reader)
    assert isinstance(part, BodyPartReader)
    data = bytearray()
    if ours:
        source = PartSource(part, watch(stream), whole_chunks=True)
        while chunk := await source.read(4096):
            data += chunk
    else:
        while chunk := await part.read_chunk(4096):
            data += chunk
    return bytes(data), part.at_eof(), await stream.read()


@pytest.mark.parametrize("seed", range(30))
async def test_a_part_ends_in_the_state_aiohttp_leaves_it_in(seed: int) -> None:
    rng = random.Random(100 + seed)
    first = bodies.file("a", "a.bin", hard_bytes(rng, rng.choice([0, 1, 5, 500])))
    body = bodies.body([first, bodies.field("after", "1")])
    pieces = cut(body, rng, rng.choice([1, 3, 40, 1000]))
    ours = await part_end_state(pieces, ours=True)
    assert ours == await part_end_state(pieces, ours=False)
    assert ours[0] == first.data and ours[1]
    assert ours[2].startswith(b"--" + B + b"\r\n")  # the next boundary line comes next


@pytest.mark.parametrize(
    "end",
    [b"", b"\r", b"\r\n", b"\r\n--", DELIM[:-1], b"more data"],
    ids=["data", "cr", "crlf", "crlf-dashes", "delimiter-but-last", "more"],
)
async def test_a_body_that_ends_inside_a_file_part_is_malformed(end: bytes) -> None:
    body = bodies.part_head(bodies.file("f", "a.bin", b"")) + b"x" * 1000 + end
    for most in (1, 10, 5000):
        with pytest.raises(ProxyError) as err:
            await read_form(cut(body, random.Random(most), most))
        assert err.value.kind == MALFORMED_MULTIPART
        assert "ended inside a file part" in err.value.message


async def test_a_chunked_body_s_http_chunk_ends_are_not_its_end() -> None:
    """Part headers that fill an HTTP chunk exactly: aiohttp's readchunk then answers
    b"" for that chunk's end before the file's first byte, which is not the part's end."""
    data = payload(50_000, seed=3)
    file = bodies.file("f", "a.bin", data)
    head = bodies.part_head(file)
    rest = data + b"\r\n--" + B + b"--\r\n"
    pieces = [head, *cut(rest, random.Random(4), 9000)]
    assert await read_form(pieces, http_chunks=True) == [("f", "a.bin", data)]


async def test_a_part_with_a_transfer_encoding_is_read_by_aiohttp() -> None:
    """Content-Transfer-Encoding: binary means the bytes as they are (RFC 7578 section
    4.7): aiohttp's read_chunk reads such a part, with the same result."""
    data = b"\r\n--" + B[:-1] + b"\r\n" + b"z" * 3000
    part = bodies.raw_part(
        b'form-data; name="f"; filename="a.bin"', data, b"Content-Transfer-Encoding: binary"
    )
    pieces = cut(bodies.raw_body(part), random.Random(5), 100)
    assert await read_form(pieces) == [("f", "a.bin", data)]


@pytest.mark.parametrize(
    ("sizes", "offset", "room", "run"),
    [
        ([], 0, JOIN_BYTES, 0),
        ([1, 1, 1], 0, JOIN_BYTES, 3),
        ([5, 7], 3, JOIN_BYTES, 2 + 7),  # the first piece read up to its offset
        ([1, SMALL_PIECE, 1], 0, JOIN_BYTES, 1),  # a big piece stops the run, not joined
        ([SMALL_PIECE - 1, 1], 0, JOIN_BYTES, SMALL_PIECE),
        ([SMALL_PIECE + 4], 5, JOIN_BYTES, SMALL_PIECE - 1),  # what is left of it is small
        ([100, 100, 100], 0, 250, 200),  # whole pieces only, within room
        ([1] * (JOIN_PIECES + 10), 0, JOIN_BYTES, JOIN_PIECES),
    ],
)
def test_small_run(sizes: list[int], offset: int, room: int, run: int) -> None:
    assert small_run([b"x" * n for n in sizes], offset, room) == run


async def test_tiny_http_chunks_are_read_a_run_at_a_time() -> None:
    """A file in 1-byte HTTP chunks (the parser passes each on as a piece of its own)
    comes in a few reads of joined pieces, not one read per chunk (reprobe10b N2: ~20 us
    of reading, scanning and hashing per chunk, the event loop held 17 s by one upload);
    a big piece behind them still comes as it is."""
    data = payload(20_000, seed=9)
    big = b"B" * 100_000
    head = bodies.part_head(bodies.file("f", "a.bin", b""))
    pieces = [head, *(data[i : i + 1] for i in range(len(data))), big]
    stream = stream_of([*pieces, b"\r\n--" + B + b"--\r\n"], http_chunks=True)
    got = []
    async for item in iter_form(MultipartReader(bodies.headers(), stream), LIMITS, lambda: 0):
        assert isinstance(item, FilePart)
        while chunk := await item.source.read(4096):
            got.append(chunk)
    assert b"".join(got) == data + big
    assert any(chunk is big for chunk in got)  # no copy of a big piece
    assert len(got) <= 2 + len(data) // JOIN_PIECES + 1


def test_a_pending_look_walks_on_over_the_bytes_it_copied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """reprobe10b N3: a waiter whose walk spans passes copied its whole tail out of the
    kernel (up to a MiB) in every pass; while no byte comes, the next pass goes on over
    the same copy. The walk ends within TAIL_LINES lines: bytes owed."""
    peeks = 0

    def counted_peek(sock: Any, size: int) -> bytes | None:
        nonlocal peeks
        peeks += 1
        return peek(sock, size)

    monkeypatch.setattr(form, "peek", counted_peek)
    flow = TransportFlow.__new__(TransportFlow)  # only its look: no request behind it
    flow._looked = flow._tail_walk = flow._tail = None
    framing = ChunkExtensions()
    framing.feed(b"5\r\nhello\r\n")
    tail = b"1\r\nx\r\n" * (2 * TAIL_LINES)
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(tail)
        answers: list[Looked] = []
        while not answers or answers[-1] is PENDING:
            answers.append(flow._look(b, 10, len(tail), framing, Looks(500)))
        assert answers[-1] is False and len(answers) == -(-TAIL_LINES // 500)
        assert peeks == 1
        assert flow._tail is None  # not kept once the walk ended
        assert flow._look(b, 10, len(tail), framing, Looks(500)) is False and peeks == 1


async def test_next_chunk_of_an_empty_body_is_its_end() -> None:
    """A request without a body has aiohttp's EmptyStreamReader, with no buffer to join."""
    assert await form.next_chunk(EmptyStreamReader()) == b""


async def test_the_arrival_of_a_request_without_a_body(aiohttp_client: Any) -> None:
    """reprobe17a F2: a tus creation with Upload-Length: 0 (or a PATCH with Content-Length:
    0) waiting for memory was judged by its arrival, which read the body's buffered size
    off aiohttp's EmptyStreamReader, which has none: 500 AttributeError with a traceback
    (17 of 20 such creations while the budget was spent)."""
    seen: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(TransportFlow(request).arrival())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/x", handler)
    client = await aiohttp_client(app)
    resp = await client.post("/x", headers={"Content-Length": "0"})
    assert resp.status == 200, await resp.text()
    (arrival,) = seen
    assert arrival is not None and arrival.ended and arrival.unread == 0
