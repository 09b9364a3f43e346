"""An upload's Content-Length body read past aiohttp's HTTP parser (``bypass_parser``).

The parser copies every body chunk; s3proxy's protocol hands the socket's chunks to the
request's StreamReader itself once the upload handler reads the body. These tests hold
it to what the parser did: the same bytes stored, the body's end where Content-Length
puts it, the connection's next request parsed (pipelined in the same read or sent
later), a body drained after an early answer, a client gone mid-body; a chunked body
decoded past it (s3proxy.chunked) likewise, and as few pieces as socket reads.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
from aiohttp.streams import StreamReader

from s3proxy.protocol import ProxyRequestHandler
from s3proxy.state import STATE
from tests import bodies
from tests.bodies import MiB
from tests.faults import Fault, FaultyS3
from tests.polling import eventually
from tests.s3util import all_keys_async, open_uploads_async, read_object_async


def pool(proxy: Any) -> Any:
    return proxy.server.app[STATE].connections


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response on a kept-alive connection: its status and its body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status = int(head.split(b" ", 2)[1])
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return status, await asyncio.wait_for(reader.readexactly(length), 30)


def upload(data: bytes, name: str) -> bytes:
    raw = bodies.body([bodies.file("f", name, data)])
    return bodies.request_head(len(raw)) + raw


async def stored_files(reader: asyncio.StreamReader, s3: Any, bucket: str, n: int) -> list[bytes]:
    """The next ``n`` answers, each a 201 for one file: the bytes stored for each."""
    stored = []
    for _ in range(n):
        status, body = await read_response(reader)
        assert status == 201, body
        [f] = json.loads(body)["files"]
        stored.append(await read_object_async(s3, bucket, f["key"]))
    return stored


async def test_a_body_still_arriving_bypasses_the_parser_and_the_next_request_is_parsed(
    proxy: Any, s3: Any, bucket: str
) -> None:
    """The first upload's body arrives after its handler began: read past the parser.
    Its last bytes come in one write with a whole second upload (pipelined): the body
    ends at its Content-Length, and a new parser reads the second request."""
    first, second = os.urandom(3 * MiB + 17), os.urandom(300 * 1024)
    request = upload(first, "first.bin")
    head_end = request.index(b"\r\n\r\n") + 4
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(request[: head_end + 1000])
    await eventually(lambda: pool(proxy).bypassed == 1, within=5, what="the body bypassed")
    writer.write(request[head_end + 1000 : -5000])
    await writer.drain()
    writer.write(request[-5000:] + upload(second, "second.bin"))
    await writer.drain()
    stored = []
    for data in (first, second):
        status, body = await read_response(reader)
        assert status == 201, body
        [f] = json.loads(body)["files"]
        assert f["size"] == len(data)
        stored.append(await read_object_async(s3, bucket, f["key"]))
    assert stored == [first, second]
    # The second request came whole with the first's last bytes: the new parser read
    # its body, nothing was left to bypass.
    assert pool(proxy).bypassed == 1
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # and the connection goes on
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_a_body_answered_early_is_drained_past_the_parser(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """A 5xx answer before the body's end keeps the connection (aiohttp drains the rest
    of the body, lingering): the drain goes through the bypass to the body's end, and the
    next request on the connection is parsed from its first byte."""
    async with FaultyS3(
        moto.endpoint_url, lambda op, n: Fault(status=500) if op == "UploadPart" else None
    ) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url, s3_max_attempts=1)
        request = upload(os.urandom(20 * MiB), "big.bin")
        head_end = request.index(b"\r\n\r\n") + 4
        reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
        writer.write(request[: head_end + 1000])
        await eventually(lambda: pool(proxy).bypassed == 1, within=5, what="the body bypassed")
        answered = asyncio.ensure_future(read_response(reader))
        for i in range(head_end + 1000, len(request), MiB):
            writer.write(request[i : i + MiB])
            await writer.drain()
        status, body = await answered
        assert status == 502, body
        assert json.loads(body)["error"]["code"] == "UPSTREAM_ERROR"
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        writer.close()
    assert await all_keys_async(s3, bucket) == []


async def test_a_client_gone_mid_body_leaves_nothing(proxy: Any, s3: Any, bucket: str) -> None:
    request = upload(os.urandom(12 * MiB), "gone.bin")
    _, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(request[: 9 * MiB])  # past the first part: an upload was begun in S3
    await writer.drain()
    await eventually(lambda: pool(proxy).bypassed == 1, within=5, what="the body bypassed")
    await asyncio.sleep(0.5)
    writer.close()

    async def left() -> tuple[list[str], list[Any]]:
        return await all_keys_async(s3, bucket), await open_uploads_async(s3, bucket)

    await eventually(left, until=lambda got: got == ([], []), within=10, what="nothing stored")


async def test_a_chunked_body_bypasses_the_parser(proxy: Any, s3: Any, bucket: str) -> None:
    """A chunked body read while it arrives is decoded past the parser too, and the
    connection's next request, pipelined behind its last chunk, is parsed."""
    data = os.urandom(MiB + 5)
    raw = bodies.body([bodies.file("f", "c.bin", data)])
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(bodies.chunked_request_head() + bodies.chunk_frame(raw[:1000]))
    await asyncio.sleep(0.3)  # the handler reads the body before the rest comes
    framed = b"".join(bodies.chunk_frame(raw[i : i + 7000]) for i in range(1000, len(raw), 7000))
    writer.write(framed + bodies.chunk_frame(b"") + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = await read_response(reader)
    assert status == 201, body
    [f] = json.loads(body)["files"]
    assert await read_object_async(s3, bucket, f["key"]) == data
    assert pool(proxy).bypassed == 1
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_tiny_chunks_reach_the_body_as_one_piece_per_socket_read(
    proxy: Any, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MiB in 1-byte HTTP chunks: the parser gave the StreamReader a bytes object per
    chunk (a million pieces, ~1.5 us each in its callbacks); the decoder gives one per
    socket read."""
    reads, feeds = [0], [0]
    data_received, feed_data = ProxyRequestHandler.data_received, StreamReader.feed_data

    def counted_read(self: Any, data: bytes) -> None:
        reads[0] += 1
        data_received(self, data)

    def counted_feed(self: Any, data: bytes, size: int = 0) -> bool:
        feeds[0] += 1
        return feed_data(self, data, size)

    monkeypatch.setattr(ProxyRequestHandler, "data_received", counted_read)
    monkeypatch.setattr(StreamReader, "feed_data", counted_feed)
    data = os.urandom(MiB)
    raw = bodies.body([bodies.file("f", "tiny.bin", data)])
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(bodies.chunked_request_head() + bodies.chunk_frame(raw[:100]))
    await eventually(lambda: pool(proxy).bypassed == 1, within=5, what="the body bypassed")
    framed = b"".join(b"1\r\n%c\r\n" % byte for byte in raw[100:])
    writer.write(framed + bodies.chunk_frame(b""))
    status, body = await read_response(reader)
    assert status == 201, body
    [f] = json.loads(body)["files"]
    assert await read_object_async(s3, bucket, f["key"]) == data
    assert feeds[0] <= reads[0] + 2, (feeds, reads)  # (+ the parser's first pieces)
    writer.close()


async def test_a_chunked_body_with_connection_close_is_the_last_request(proxy: Any) -> None:
    """Connection: close in the head: after the answer nothing is read (RFC 9112 section
    9.6), also a request pipelined behind the body's end."""
    head = bodies.chunked_request_head(b"Connection: close")
    raw = bodies.body([bodies.file("f", "c.bin", b"hello")])
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(head + bodies.chunk_frame(raw[:10]))
    await eventually(lambda: pool(proxy).bypassed == 1, within=5, what="the body bypassed")
    writer.write(bodies.chunk_frame(raw[10:]) + b"0\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
    status, body = await read_response(reader)
    assert status == 201, body
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, the GET unanswered
    writer.close()


@pytest.mark.parametrize("bypassed", [True, False])
async def test_a_connection_close_trailer_is_ignored_on_both_paths(
    proxy: Any, bypassed: bool
) -> None:
    """A Connection trailer controls nothing (RFC 9110 section 6.5.1): the decoder closed
    the connection after it, the parser's path went on (a new parser reads on after a
    body with trailers), so one client's pipelined GET was answered or dropped by timing
    (reprobe12c F4). Both read on."""
    raw = bodies.body([bodies.file("f", "c.bin", b"hello")])
    end = bodies.chunk_frame(raw[10:]) + b"0\r\nConnection: close\r\n\r\n"
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    if bypassed:
        writer.write(bodies.chunked_request_head() + bodies.chunk_frame(raw[:10]))
        await eventually(lambda: pool(proxy).bypassed == 1, within=5, what="the body bypassed")
        writer.write(end + get)
    else:
        writer.write(bodies.chunked_request_head() + bodies.chunk_frame(raw[:10]) + end + get)
    status, body = await read_response(reader)
    assert status == 201, body
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_a_chunked_upload_pipelined_behind_another_is_decoded_from_its_start(
    proxy: Any, s3: Any, bucket: str
) -> None:
    """reprobe12c F1: a chunked upload pipelined in the read of the one before it, cut
    inside its chunk's data. The parser read into its body with the body before; the
    bypass then started decoding at the body's start as if nothing had been read, and
    took file bytes for framing: 201 with 1,000 of 2,096 bytes stored, and file bytes
    shaped as a request answered as one. Such a body stays with the parser."""
    first = bodies.body([bodies.file("f", "a.bin", b"12345")])
    inner = (
        b"".join(
            bodies.chunk_frame(p) for p in (b"\r\n", b"--", bodies.BOUNDARY.encode() + b"--\r\n")
        )
        + b"0\r\n\r\n"
    )
    inner += b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: SMUGGLED\r\n\r\n"
    data = b"A" * 1000 + inner + b"B" * 1000
    second = bodies.body([bodies.file("f", "b.bin", data)])
    cut = second.index(inner)
    framed = b"%x\r\n" % len(second) + second + b"\r\n0\r\n\r\n"  # one chunk
    split = len(b"%x\r\n" % len(second)) + cut
    head = bodies.chunked_request_head()
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(head + bodies.chunk_frame(first) + bodies.chunk_frame(b"") + head + framed[:split])
    await asyncio.sleep(0.5)
    writer.write(framed[split:] + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await stored_files(reader, s3, bucket, 2) == [b"12345", data]
    status, body = await read_response(reader)  # the client's GET, not one from the file
    assert status == 200, body
    writer.close()


@pytest.mark.parametrize(
    "bad", [b"1\na", b"1 \r\na", b"zz\r\n", b"1\r\nab", b"1;\r\na", b"0\r\nX : y\r\n\r\n"]
)
async def test_bad_chunked_framing_past_the_parser_is_a_400(proxy: Any, bad: bytes) -> None:
    raw = bodies.body([bodies.file("f", "c.bin", b"hello")])
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(bodies.chunked_request_head() + bodies.chunk_frame(raw[:10]))
    await eventually(lambda: pool(proxy).bypassed == 1, within=5, what="the body bypassed")
    writer.write(bad + b"\r\n" + raw)
    status, body = await read_response(reader)
    assert status == 400, body
    error = json.loads(body)["error"]
    # as the parser's refusal of a body being read (RequestPayloadError)
    assert error == {
        "code": "BAD_HTTP_REQUEST",
        "message": "the request body is not valid HTTP/1.1 framing",
    }, error
    writer.close()


async def test_requests_pipelined_behind_a_content_length_body_are_parsed_in_place(
    proxy: Any, s3: Any, bucket: str
) -> None:
    """reprobe12c: a Content-Length upload, a chunked upload and a GET in one write. The
    parser was given the first body with what followed it, read the chunked head and
    into its body at once, and that body's walk began at its start: taken for the end
    of a body with trailers (a43ed15's new parser), the GET was refused 400 "Invalid
    method" (4 runs in 5). Each head now comes to the parser in a piece of its own."""
    f0, f1 = os.urandom(70000), os.urandom(70000)
    up0 = bodies.body([bodies.file("f", "a.bin", f0)])
    up1 = bodies.body([bodies.file("f", "b.bin", f1)])
    head0 = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(up0)
    head0 += b"Content-Type: multipart/form-data; boundary=%s\r\n\r\n" % bodies.BOUNDARY.encode()
    framed = b"".join(bodies.chunk_frame(up1[i : i + 1000]) for i in range(0, len(up1), 1000))
    raw = head0 + up0 + bodies.chunked_request_head() + framed + bodies.chunk_frame(b"")
    raw += b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(3):
        reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
        writer.write(raw)
        assert await stored_files(reader, s3, bucket, 2) == [f0, f1]
        assert (await read_response(reader))[0] == 200
        writer.close()


async def test_requests_pipelined_behind_a_held_body_with_trailers_are_answered(
    proxy: Any,
) -> None:
    """reprobe13b N1: a chunked upload with a trailer (70,000 bytes in 7-byte chunks, its
    reader full, so aiohttp's parser held the body's tail), then a chunked request with a
    trailer and a GET, in one write: a43ed15's new parser after trailers was made when the
    parser finally ended the body, after it had parsed the requests behind it, and they
    were dropped unanswered (the connection just closed); and a trailer of the request
    before it was read as the GET's own header. What follows such a body now waits until
    the parser has ended it, and goes to a new parser."""
    form = bodies.body([bodies.file("f", "a.bin", os.urandom(70000))])
    framed = b"".join(bodies.chunk_frame(form[i : i + 7]) for i in range(0, len(form), 7))
    upload = bodies.chunked_request_head() + framed + b"0\r\nX-T: 1\r\n\r\n"
    other = (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nX-Request-ID: leaked\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(upload + other + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    statuses = [(await read_response(reader))[0] for _ in range(2)]
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert statuses == [201, 405] and head.startswith(b"HTTP/1.1 200"), (statuses, head)
    assert b"leaked" not in head, head  # the trailer is no header of the GET's
    writer.close()


async def test_a_held_bodys_trailer_never_reaches_a_later_request(proxy: Any) -> None:
    """reprobe13b N1, the later-read shape: the upload with a trailer in one write (its
    reader full: the parser held the body's tail and ended it on resume), the GET in a
    later read: the GET was answered with the upload's trailer as its X-Request-ID."""
    form = bodies.body([bodies.file("f", "a.bin", os.urandom(70000))])
    framed = b"".join(bodies.chunk_frame(form[i : i + 7]) for i in range(0, len(form), 7))
    upload = bodies.chunked_request_head() + framed + b"0\r\nX-Request-ID: leaked\r\n\r\n"
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(upload)
    assert (await read_response(reader))[0] == 201
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200") and b"leaked" not in head, head
    writer.close()


def framed_upload(data: bytes, sizes: list[int], *extra: bytes, trailers: bytes = b"") -> bytes:
    """A chunked upload of ``data`` as a form's file, in chunks of ``sizes`` in turn."""
    form = bodies.body([bodies.file("f", "a.bin", data)])
    pieces, i, k = [], 0, 0
    while i < len(form):
        size = sizes[k % len(sizes)]
        pieces.append(bodies.chunk_frame(form[i : i + size]))
        i, k = i + size, k + 1
    return bodies.chunked_request_head(*extra) + b"".join(pieces) + b"0\r\n" + trailers + b"\r\n"


@pytest.mark.parametrize("split", [300_000, 311_712, 420_000])
async def test_a_held_body_is_not_bypassed_past_the_bytes_the_parser_holds(
    proxy: Any, s3: Any, bucket: str, split: int
) -> None:
    """reprobe14a N2: a chunked upload of 1-byte chunks pipelined behind another, its
    first part in one write, the rest 0.2 s later. Its reader full, aiohttp's parser held
    the tail of what it was given (~115 KB of framing, ~19 KB of the file) with no pause
    standing, and the decoder began where the walk was, past them: 201 with 80,790 of
    100,000 bytes stored. The decoder now begins only where the parser has passed on all
    it was given."""
    first, second = os.urandom(100_000), os.urandom(100_000)
    raw = framed_upload(first, [1, 33], trailers=b"X-A: 1\r\n") + framed_upload(second, [1])
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(raw[:split])
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(raw[split:])
    assert await stored_files(reader, s3, bucket, 2) == [first, second]
    writer.close()


@pytest.mark.parametrize("pad", range(1, 7))
@pytest.mark.parametrize("eof", [False, True])
async def test_a_held_body_ends_as_its_reader_reads(
    proxy: Any, s3: Any, bucket: str, pad: int, eof: bool
) -> None:
    """reprobe14a N1: two chunked uploads in one write, the second of 1-byte chunks. A
    pause aiohttp asked for at a chunk's end was honoured at the next read's first chunk,
    after the resume that cleared it: the parser held the rest with no pause standing,
    and reads, which resume only a standing pause, never parsed it. The second upload
    was never answered (408 after 41 s) or, with the client's EOF after it, answered 400
    CLIENT_DISCONNECTED though its body had all come."""
    first, second = os.urandom(100_000), os.urandom(20_000)
    raw = framed_upload(first, [1, 33], b"X-Pad: " + b"p" * pad) + framed_upload(second, [1])
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(raw + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    if eof:
        writer.write_eof()
    stored = await asyncio.wait_for(stored_files(reader, s3, bucket, 2), 20)
    assert stored == [first, second]
    status, _ = await asyncio.wait_for(read_response(reader), 10)
    assert status == 200
    writer.close()


def probe_upload(rid: bytes, data: bytes, sizes: list[int], extra: bytes = b"") -> bytes:
    """A chunked upload framed as reprobe15a's scripts frame theirs (its boundary, its
    header order): the held-tail cases depend on where reads and chunks fall."""
    form = (
        b'--XyZbound42\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--XyZbound42--\r\n"
    )
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + rid + b"\r\n"
    head += b"Content-Type: multipart/form-data; boundary=XyZbound42\r\n" + extra
    pieces, i, k = [], 0, 0
    while i < len(form):
        size = sizes[k % len(sizes)]
        pieces.append(bodies.chunk_frame(form[i : i + size]))
        i, k = i + size, k + 1
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize("pad", range(1, 25))
@pytest.mark.parametrize("after", ["cut body", "partial head"])
async def test_an_eof_behind_a_held_body_ends_what_follows_it(
    proxy: Any, s3: Any, bucket: str, pad: int, after: str
) -> None:
    """reprobe15a: the EOF after a body the parser held waited for that body; what came
    after it was then left as it stood: a third upload cut mid-body waited out the client
    timeout (not 400 at once), a partial head held the connection open. The EOF now ends
    them once the held body has ended."""
    first, second = os.urandom(100_000), os.urandom(20_000)
    raw = probe_upload(b"A", first, [1, 33], b"X-Pad: " + b"p" * pad + b"\r\n")
    raw += probe_upload(b"B", second, [1])
    third = probe_upload(b"C", os.urandom(30_000), [1000])
    cut = third.index(b"\r\n\r\n") + 4 + 100 if after == "cut body" else 15
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(raw + third[:cut])
    writer.write_eof()
    stored = await asyncio.wait_for(stored_files(reader, s3, bucket, 2), 10)
    assert stored == [first, second]
    if after == "cut body":
        status, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 400 and b"CLIENT_DISCONNECTED" in body, body
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing more
    writer.close()
    await eventually(
        lambda: all_keys_async(s3, bucket),
        until=lambda k: len(k) == 2,
        within=5,
        what="two files",
    )
