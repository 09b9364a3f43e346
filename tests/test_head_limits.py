"""Heads (and trailers) are bounded in all, not only line by line (reprobe21a).

A request head of 128 lines of 8 KiB, or a part's header block of as many, was held whole
until its blank line, outside the memory budget: 100 connections stalled so grew a proxy
process by ~100 MiB (part heads) to ~200 MiB (request heads). Now a request head is
refused past ``MAX_HEAD_SIZE`` (431) and a part's header block past ``MAX_PART_HEAD``
(400), as their bytes come, whatever reads they come in.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from pathlib import Path
from typing import Any

import pytest

from s3proxy.chunks import MAX_TRAILERS
from s3proxy.form import MAX_PART_HEAD
from s3proxy.protocol import MAX_HEAD_SIZE
from tests import bodies
from tests.bodies import MiB
from tests.rawhttp import RawResponse, exchange
from tests.s3util import MotoServer, ProxyProcess, all_keys_async, fake_aws_env, open_uploads_async
from tests.test_resources import proc_status, warm_idle

LINE = 8000  # a header line's bytes with its CRLF, well within aiohttp's 8190 a line


def padding(size: int) -> bytes:
    """Header lines of exactly ``size`` bytes in all, CRLFs included (``size`` >= 8)."""
    lines, i = [], 0
    while size > 0:
        take = LINE if size - LINE >= 8 or size == LINE else size
        name = b"X-P%03d: " % i
        lines.append(name + b"a" * (take - len(name) - 2) + b"\r\n")
        size, i = size - take, i + 1
    return b"".join(lines)


def request_head(size: int, end: bool = True) -> bytes:
    """A GET /healthz head of exactly ``size`` bytes with its blank line (or cut before it)."""
    start = b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
    head = start + padding(size - len(start) - 2) + b"\r\n"
    assert len(head) == size
    return head if end else head[:-2]


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("write", [None, 1024])
@pytest.mark.parametrize("over", [0, 1])
async def test_a_request_head_is_bounded_in_all(proxy: Any, over: int, write: int | None) -> None:
    """Exactly MAX_HEAD_SIZE passes; a byte more is 431 with its reason, in one write or
    in 1 KiB writes (each its own read)."""
    head = request_head(MAX_HEAD_SIZE + over)
    sent = [head] if write is None else pieces(head, write)
    resp = await exchange(proxy.host, proxy.port, *sent, pause=0.002, quiet=3.0)
    if not over:
        assert resp.status == 200, resp.raw[:300]
        return
    assert resp.status == 431, resp.raw[:300]
    assert resp.code == "HEADERS_TOO_LARGE"
    assert f"over {MAX_HEAD_SIZE // 1024} KiB in all" in resp.json()["error"]["message"]
    assert resp.closed


async def test_a_request_head_stalled_past_the_bound_is_refused_at_once(proxy: Any) -> None:
    """128 lines of 8 KiB and no blank line: answered 431 as the bound is passed, not held
    until --header-timeout (before: nothing read was refused, and the connection was
    closed unanswered at the timeout)."""
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\n" + padding(126 * LINE)
    resp = await exchange(proxy.host, proxy.port, head, quiet=2.0)
    assert resp.status == 431, resp.raw[:300]
    assert resp.code == "HEADERS_TOO_LARGE"


def part_head_body(size: int, end: bool = True) -> bytes:
    """A form whose file part's header block (its lines, CRLFs and the blank line) is
    exactly ``size`` bytes."""
    disposition = b'Content-Disposition: form-data; name="file"; filename="a.txt"\r\n'
    lines = padding(size - len(disposition) - 2)
    block = disposition + lines + b"\r\n"
    assert len(block) == size
    delimiter = b"--" + bodies.BOUNDARY.encode() + b"\r\n"
    if not end:
        return delimiter + disposition + lines
    return delimiter + block + b"hello\r\n--" + bodies.BOUNDARY.encode() + b"--\r\n"


@pytest.mark.parametrize("write", [None, 1000])
@pytest.mark.parametrize("over", [0, 1])
async def test_a_part_header_block_is_bounded_in_all(
    proxy: Any, s3: Any, bucket: str, over: int, write: int | None
) -> None:
    """Exactly MAX_PART_HEAD passes and the file is stored; a byte more is 400
    MALFORMED_MULTIPART naming the bound, and nothing is stored."""
    body = part_head_body(MAX_PART_HEAD + over)
    head = bodies.request_head(len(body))
    sent = [head + body] if write is None else [head, *pieces(body, write)]
    resp = await exchange(proxy.host, proxy.port, *sent, pause=0.002, quiet=3.0)
    words = f"over {MAX_PART_HEAD // 1024} KiB in all"
    await stored_or_refused(resp, over, "MALFORMED_MULTIPART", words, s3, bucket)


async def stored_or_refused(
    resp: RawResponse, over: int, code: str, words: str, s3: Any, bucket: str
) -> None:
    """At the bound (``over`` 0) the upload is stored; past it, 400 ``code`` saying
    ``words``, and nothing is stored."""
    if not over:
        assert resp.status == 201, resp.raw[:300]
        return
    assert resp.status == 400, resp.raw[:300]
    assert resp.code == code
    assert words in resp.json()["error"]["message"]
    assert await all_keys_async(s3, bucket) == []
    assert await open_uploads_async(s3, bucket) == []


async def test_a_part_header_block_stalled_past_the_bound_is_refused_at_once(
    proxy_factory: Any,
) -> None:
    """126 lines of 8 KiB and no blank line: 400 as the bound is passed (before: 408 at
    --client-timeout, the lines held until then)."""
    proxy = await proxy_factory(client_timeout=30.0)
    body = part_head_body(126 * LINE, end=False)
    head = bodies.request_head(len(body) + 1000)
    resp = await exchange(proxy.host, proxy.port, head + body, quiet=3.0)
    assert resp.status == 400, resp.raw[:300]
    assert resp.code == "MALFORMED_MULTIPART"


async def _stall(port: int, data: bytes, held: list[asyncio.StreamWriter]) -> None:
    """Send ``data`` and keep the connection open (the proxy may answer and close it)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    held.append(writer)


async def test_stalled_heads_grow_a_proxy_process_by_little(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """A proxy process as a user runs it, 300 connections stalled in their heads: 100 in
    a request head of 1 MiB, 50 in a part header block of 1 MiB, 50 in 1 MiB of a chunked
    body's trailers, 100 just under the head bounds. Before: +300 MiB and more over idle
    (~1-2 MiB a connection); the bound here is README's, the budget plus 32 MiB."""
    args = ["--endpoint-url", moto.endpoint_url, "--bucket", bucket]
    args += ["--memory-budget", "16MiB", "--part-size", "5MiB", "--client-timeout", "30s"]
    proxy = ProxyProcess.start(args, fake_aws_env(), tmp_path / "proxy.log")
    held: list[asyncio.StreamWriter] = []
    try:
        idle = await warm_idle(proxy)
        big_head = b"POST /upload HTTP/1.1\r\nHost: a\r\n" + padding(126 * LINE)
        big_part = part_head_body(126 * LINE, end=False)
        near_part = part_head_body(MAX_PART_HEAD - 10, end=False)
        sends = [big_head] * 100
        sends += [bodies.request_head(len(big_part) + 1000) + big_part] * 50
        sends += [request_head(MAX_HEAD_SIZE - 10, end=False)] * 50
        sends += [bodies.request_head(len(near_part) + 1000) + near_part] * 50
        sends += [b"".join(chunked_form(padding(126 * LINE), coded=False))] * 50
        for i in range(0, len(sends), 50):
            await asyncio.gather(*(_stall(proxy.port, data, held) for data in sends[i : i + 50]))
        await asyncio.sleep(1.0)
        peak = proc_status(proxy.proc.pid, "VmHWM")
    finally:
        for writer in held:
            writer.close()
        proxy.stop()
    print(f"300 stalled heads: idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB")
    assert peak - idle <= 16 * MiB + 32 * MiB, f"+{(peak - idle) / MiB:.0f} MiB"


def chunked_form(trailers: bytes, coded: bool) -> tuple[bytes, bytes]:
    """A chunked POST /upload's head and body: one small file, then ``trailers`` (the
    trailer section's field lines; the blank line that ends it is the caller's)."""
    form = bodies.body([bodies.file("file", "a.txt", b"hello")])
    extra = (b"Content-Encoding: gzip",) if coded else ()
    data = gzip.compress(form) if coded else form
    return bodies.chunked_request_head(*extra), bodies.chunk_frame(data) + b"0\r\n" + trailers


@pytest.mark.parametrize("coded", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("apart", [False, True], ids=["with-head", "own-reads"])
@pytest.mark.parametrize("over", [0, 1])
async def test_a_trailer_section_is_bounded_in_all(
    proxy: Any, s3: Any, bucket: str, over: int, apart: bool, coded: bool
) -> None:
    """A chunked body's trailer section of exactly MAX_TRAILERS (its blank line counted)
    passes; a byte more is 400 BAD_HTTP_REQUEST, nothing stored. Sent with the head, the
    body stays with aiohttp's parser (llhttp held the fields: 100 stalled connections
    with 1 MiB of trailers grew a process by 207 MiB); in reads of its own a plain one is
    read by s3proxy's decoder, which must answer the same; a gzip one stays with the
    parser either way."""
    head, body = chunked_form(padding(MAX_TRAILERS + over - 2) + b"\r\n", coded)
    sent = [head, *pieces(body, 4096)] if apart else [head + body]
    resp = await exchange(proxy.host, proxy.port, *sent, pause=0.05, quiet=3.0)
    words = f"trailer section is over {MAX_TRAILERS // 1024} KiB"
    await stored_or_refused(resp, over, "BAD_HTTP_REQUEST", words, s3, bucket)


@pytest.mark.parametrize("apart", [False, True], ids=["with-head", "own-reads"])
async def test_trailers_stalled_past_the_bound_are_refused_at_once(proxy: Any, apart: bool) -> None:
    """126 trailer fields of 8 KiB and no blank line: 400 as the bound is passed (before:
    held until --client-timeout)."""
    head, body = chunked_form(padding(126 * LINE), coded=False)
    sent = [head, body] if apart else [head + body]
    resp = await exchange(proxy.host, proxy.port, *sent, quiet=3.0)
    assert resp.status == 400, resp.raw[:300]
    assert resp.code == "BAD_HTTP_REQUEST"
