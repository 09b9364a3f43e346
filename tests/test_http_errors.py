"""Malformed HTTP gets a JSON error, one log line and a closed connection.

aiohttp answers a request it cannot parse itself, before any middleware runs: by
default text/plain, echoing the offending bytes, with an ERROR traceback per request
(and, for a bad chunk size after the handler started reading, no answer at all).
``s3proxy/protocol.py`` replaces that; these tests send the bytes over raw sockets,
both to the server the tests build (``aiohttp_client(create_app(...))``) and to a
real ``python -m s3proxy serve``, so they fail if aiohttp's behaviour under the hook
changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from s3proxy import protocol
from s3proxy.app import create_app
from tests.conftest import make_settings
from tests.rawhttp import RawResponse, exchange
from tests.s3util import (
    MotoServer,
    ProxyProcess,
    all_keys_async,
    fake_aws_env,
    read_object_async,
)

# Marks the client's bytes: it must never come back in an answer or land in the log.
MARK = b"ZqXmark"
FORM = b"Content-Type: multipart/form-data; boundary=xx\r\n"

MALFORMED = {
    "control-char-in-target": (b"GET /x\x01" + MARK + b" HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "header-without-colon": (b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + MARK + b"\r\n\r\n", 400),
    "duplicate-content-length": (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2"
        + MARK
        + b"\r\n\r\nab",
        400,
    ),
    # the boundary comes from Content-Type: two of them must never reach the form reader
    "duplicate-content-type": (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
        + FORM
        + b"Content-Type: multipart/form-data; boundary="
        + MARK
        + b"\r\n\r\nab",
        400,
    ),
    "content-length-overflow": (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nX-Mark: "
        + MARK
        + b"\r\nContent-Length: "
        + b"9" * 40
        + b"\r\n\r\n",
        400,
    ),
    "obs-fold": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: b\r\n  " + MARK + b"\r\n\r\n", 400),
    "nul-in-header": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: b\x00" + MARK + b"\r\n\r\n", 400),
    "bad-version": (b"GET /" + MARK + b" HTTP/1.9\r\nHost: a\r\n\r\n", 400),
    "other-major-version": (b"GET /" + MARK + b" HTTP/9.9\r\nHost: a\r\n\r\n", 505),
    "not-http": (b"\x16\x03\x01\x02\x00" + MARK + b"\r\n\r\n", 400),
    "bad-chunk-size": (
        b"POST /upload HTTP/1.1\r\nHost: a\r\n"
        + FORM
        + b"Transfer-Encoding: chunked\r\n\r\nZZ"
        + MARK
        + b"\r\nabc\r\n",
        400,
    ),
    "chunked-and-content-length": (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        + FORM
        + b"Transfer-Encoding: chunked\r\n\r\n3\r\n"
        + MARK
        + b"\r\n0\r\n\r\n",
        400,
    ),
    "long-request-line": (b"GET /" + MARK + b"A" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "long-header": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: " + MARK + b"B" * 9000 + b"\r\n\r\n",
        431,
    ),
    "too-many-headers": (
        b"GET /healthz HTTP/1.1\r\nX-Mark: "
        + MARK
        + b"\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(200))
        + b"\r\n",
        431,
    ),
}
CODES = {
    400: "BAD_HTTP_REQUEST",
    414: "URI_TOO_LONG",
    431: "HEADERS_TOO_LARGE",
    505: "HTTP_VERSION_NOT_SUPPORTED",
}

# A bad chunk size that arrives after the handler began reading the body: aiohttp's
# C parser then queued the error behind the running request and left the body
# waiting forever, so the client got no answer at all.
LATE_BAD_CHUNK = {
    "upload": b"POST /upload HTTP/1.1\r\nHost: a\r\n" + FORM,
    "sign": b"POST /sign HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n",
}


def assert_json_error(resp: RawResponse, status: int, code: str) -> None:
    assert resp.status == status, resp.raw[:400]
    assert resp.headers["Content-Type"].startswith("application/json"), resp.raw[:400]
    assert resp.code == code
    assert resp.json()["error"]["message"]
    assert MARK not in resp.raw, resp.raw[:400]
    assert resp.closed, "the connection must be closed after a malformed request"


def own_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Every log record but the access log's one line per request."""
    return [r for r in caplog.records if r.name != "aiohttp.access"]


def assert_one_quiet_line(caplog: pytest.LogCaptureFixture) -> None:
    records = own_records(caplog)
    assert len(records) == 1, [(r.name, r.getMessage()) for r in records]
    (record,) = records
    assert record.levelno in (logging.INFO, logging.WARNING)
    assert record.exc_info is None and "Traceback" not in caplog.text
    assert MARK.decode() not in caplog.text


@pytest.fixture
async def proxy(proxy_factory: Any) -> Any:
    return await proxy_factory()


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_request_is_a_json_error(
    proxy: Any, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    raw, status = MALFORMED[name]
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    caplog.set_level(logging.INFO, logger="s3proxy")
    resp = await exchange(proxy.host, proxy.port, raw)
    assert_json_error(resp, status, CODES[status])
    assert resp.headers["X-Request-ID"]
    # aiohttp's stand-in request for a refused head is HTTP/1.0, and so was the answer
    assert resp.raw.startswith(b"HTTP/1.1 "), resp.raw[:40]
    assert_one_quiet_line(caplog)


# Refused after the request line was read: their heads' X-Request-ID can be answered.
WITH_HEADERS = [
    "header-without-colon",
    "duplicate-content-length",
    "duplicate-content-type",
    "content-length-overflow",
    "obs-fold",
    "nul-in-header",
    "other-major-version",
    "bad-chunk-size",
    "chunked-and-content-length",
    "long-header",
    "too-many-headers",
]


@pytest.mark.parametrize("name", WITH_HEADERS)
async def test_a_refused_heads_request_id_is_returned(proxy: Any, name: str) -> None:
    """reprobe16a F3: every answer returns the client's X-Request-ID (when sane), but the
    answers to heads the parser refused always carried a new one, so a client could not
    match its 400, 415 or 431 to its request or to the proxy's log line."""
    raw, status = MALFORMED[name]
    line, _, rest = raw.partition(b"\r\n")
    resp = await exchange(proxy.host, proxy.port, line + b"\r\nX-Request-ID: rid-42.a\r\n" + rest)
    assert resp.status == status, resp.raw[:400]
    assert resp.headers["X-Request-ID"] == "rid-42.a", resp.raw[:400]
    # one that is not sane to echo (a space, a quote) is replaced, as on any request
    insane = line + b'\r\nX-Request-ID: rid "42"\r\n' + rest
    resp = await exchange(proxy.host, proxy.port, insane)
    assert resp.status == status, resp.raw[:400]
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"]), resp.raw[:400]


async def test_a_refused_codings_request_id_is_returned(proxy: Any) -> None:
    """The same for a Content-Encoding aiohttp cannot decode (br without Brotli): 415."""
    raw = (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nX-Request-ID: rid-br\r\n"
        b"Content-Type: multipart/form-data; boundary=xx\r\nContent-Encoding: br\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    resp = await exchange(proxy.host, proxy.port, raw)
    assert resp.status == 415, resp.raw[:400]
    assert resp.headers["X-Request-ID"] == "rid-br", resp.raw[:400]


@pytest.mark.parametrize("route", list(LATE_BAD_CHUNK))
async def test_bad_chunk_while_the_body_is_read(
    proxy: Any, caplog: pytest.LogCaptureFixture, route: str
) -> None:
    caplog.set_level(logging.INFO)
    head = LATE_BAD_CHUNK[route] + b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"--xx\r\nContent-Disposition: form-data; name=a\r\n\r\n" if route == "upload" else b"{"
    first = b"%x\r\n%s\r\n" % (len(body), body)
    resp = await exchange(proxy.host, proxy.port, head + first, b"ZZ" + MARK + b"\r\nabc\r\n")
    assert_json_error(resp, 400, "BAD_HTTP_REQUEST")
    await asyncio.sleep(0.1)
    bad = [r for r in own_records(caplog) if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
    assert MARK.decode() not in caplog.text


async def test_unknown_expectation_is_json(proxy: Any) -> None:
    """aiohttp's default expect handler raises 417 with the header's value as its text."""
    resp = await exchange(
        proxy.host,
        proxy.port,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nExpect: " + MARK + b"\r\n\r\n",
        quiet=1,
    )
    assert resp.status == 417, resp.raw[:300]
    assert resp.code == "EXPECTATION_FAILED"
    assert MARK not in resp.raw


async def test_error_escaping_the_middlewares_is_json(
    aiohttp_client: Any, moto: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug outside the middlewares (in an expect handler, say) is a JSON 500."""

    async def broken(request: web.Request) -> None:
        raise RuntimeError("a bug")

    async def never(request: web.Request) -> web.Response:
        raise AssertionError("not reached")

    app = create_app(make_settings(moto.endpoint_url, bucket="b"))
    app.router.add_post("/broken", never, expect_handler=broken)
    client = await aiohttp_client(app)
    resp = await exchange(
        client.host,
        client.port,
        b"POST /broken HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\nhello",
    )
    assert_json_error(resp, 500, "INTERNAL")
    # A 500 is the proxy's fault: its traceback is logged, once.
    assert [r.exc_info is not None for r in own_records(caplog)] == [True]


async def test_the_hook_is_on_every_server_built_for_the_app(
    aiohttp_client: Any, moto: MotoServer
) -> None:
    """Guard for the private aiohttp API protocol.py relies on (see its docstring)."""
    app = create_app(make_settings(moto.endpoint_url, bucket="b"))
    client = await aiohttp_client(app)
    server = client.server.runner.server
    assert server is not None
    handler = server()
    try:
        assert isinstance(handler, protocol.ProxyRequestHandler)
    finally:
        handler.force_close()
    assert protocol.private_api_problems() == []


async def test_http2_prior_knowledge_is_told_the_server_speaks_http_1_1(proxy: Any) -> None:
    """curl --http2-prior-knowledge: the preface was "Pause on PRI/Upgrade" (llhttp's)."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for chunks in ((preface,), (preface[:16], preface[16:])):  # its first line alone too
        resp = await exchange(proxy.host, proxy.port, *chunks)
        assert_json_error(resp, 400, "BAD_HTTP_REQUEST")
        assert "speaks HTTP/1.1" in resp.json()["error"]["message"]


@pytest.mark.parametrize("name", ["Content-Type", "Content-Length", "Host"])
async def test_a_repeated_single_header_is_named(proxy: Any, name: str) -> None:
    """Two Content-Type headers (two boundaries: which one a proxy in front obeys is
    anyone's guess) were refused as just "(Duplicate)"."""
    value = {"Content-Type": b"text/plain", "Content-Length": b"0", "Host": b"b"}[name]
    head = (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Type: multipart/form-data; boundary=A\r\n"
        b"Content-Length: 0\r\n" + name.encode() + b": " + value + b"\r\n\r\n"
    )
    resp = await exchange(proxy.host, proxy.port, head)
    assert_json_error(resp, 400, "BAD_HTTP_REQUEST")
    assert f"the {name} header is given more than once" in resp.json()["error"]["message"]


@pytest.mark.parametrize(("value", "status"), [(8190, 200), (8191, 431)])
async def test_the_request_header_limit_is_told_as_it_is(
    proxy: Any, value: int, status: int
) -> None:
    """A header value of 8190 bytes passes, its line end not counted; the 431 says so
    and names the header count too (it said "longer than 8190 bytes, or too many")."""
    head = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: " + b"v" * value + b"\r\n\r\n"
    resp = await exchange(proxy.host, proxy.port, head, quiet=1.0)
    assert resp.status == status, resp.raw[:200]
    if status == 431:
        message = resp.json()["error"]["message"]
        assert "name or value is longer than 8190 bytes (not counting its line end)" in message
        assert "more than 128 headers" in message


def test_status_from_parser_errors() -> None:
    """The 414/431 split depends on the limits being different: keep them so."""
    from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

    line, field = protocol.MAX_LINE_SIZE, protocol.MAX_FIELD_SIZE
    assert line != field
    assert protocol.error_kind(LineTooLong(b"x", line)).status == 414
    assert protocol.error_kind(LineTooLong(b"x", field)).status == 431
    assert protocol.error_kind(BadHttpMessage("Too many headers received")).status == 431
    assert protocol.error_kind(BadStatusLine("x")).status == 400


# --- the real CLI process ---------------------------------------------------------------


@pytest.fixture
def served(moto: MotoServer, tmp_path: Path, s3: Any) -> Iterator[ProxyProcess]:
    name = f"t-{int(time.time() * 1000)}"
    s3.create_bucket(Bucket=name)
    env = fake_aws_env()
    args = ["--endpoint-url", moto.endpoint_url, "--bucket", name]
    proxy = ProxyProcess.start(args, env, tmp_path / "proxy.log")
    yield proxy
    proxy.stop()
    s3.delete_bucket(Bucket=name)


async def test_served_process_answers_malformed_http_as_json(served: ProxyProcess) -> None:
    log = served.log_path
    before = log.stat().st_size
    sent = 0
    for raw, status in MALFORMED.values():
        sent += len(raw)
        resp = await exchange("127.0.0.1", served.port, raw)
        assert_json_error(resp, status, CODES[status])
    for route, head in LATE_BAD_CHUNK.items():
        body = b"{" if route == "sign" else b"--xx\r\n"
        resp = await exchange(
            "127.0.0.1",
            served.port,
            head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(body), body),
            b"ZZ" + MARK + b"\r\n",
        )
        assert_json_error(resp, 400, "BAD_HTTP_REQUEST")
    # A client that goes away mid-body is not the proxy's error either.
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(
            b"POST /sign HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        await asyncio.sleep(0.3)
    await asyncio.sleep(0.5)
    text = log.read_text()[before:]
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    assert MARK.decode() not in text
    # One event line and one access line per bad request, nothing more.
    lines = [line for line in text.splitlines() if "aiohttp.access" not in line]
    assert len(lines) <= len(MALFORMED) + len(LATE_BAD_CHUNK) + 1, text[-3000:]


# --- framing the parser accepts and HTTP/1.1 does not (RFC 9112) -------------------------

FORM_BODY = (
    b'--xx\r\nContent-Disposition: form-data; name="f"; filename="a.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\nhello\r\n--xx--\r\n"
)
NEXT = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"


async def test_http_1_0_with_transfer_encoding_is_refused_and_closed(
    proxy: Any, s3: Any, bucket: str
) -> None:
    """RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
    llhttp decoded it as chunked: the file was stored (201), the connection kept alive and
    the next request answered."""
    raw = (
        b"POST /upload HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n"
        + FORM
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(FORM_BODY), FORM_BODY)
    )
    resp = await exchange(proxy.host, proxy.port, raw + NEXT)
    assert_json_error(resp, 400, "BAD_HTTP_REQUEST")
    assert "HTTP/1.0" in resp.json()["error"]["message"]
    # the next request is not answered
    assert len(re.findall(rb"HTTP/1\.[01] \d{3} ", resp.raw)) == 1, resp.raw
    assert await all_keys_async(s3, bucket) == []


CLOSE_THEN_DATA = {
    "connection-close": b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + NEXT,
    "http-1.0": b"GET /healthz HTTP/1.0\r\n\r\n" + NEXT,
    "pipelined-then-close": NEXT
    + b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    + NEXT,
    "close-then-junk": b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n\x16\x03",
}


@pytest.mark.parametrize("name", list(CLOSE_THEN_DATA))
async def test_a_request_closing_the_connection_is_answered_whatever_follows(
    proxy: Any, name: str
) -> None:
    """RFC 9112 section 9.6: answer a request with ``Connection: close`` (or HTTP/1.0
    without keep-alive), then close, ignoring what follows. llhttp raised "Data after
    `Connection: close`" on bytes after it in the same read, and aiohttp answered that
    400 in place of the request."""
    raw = CLOSE_THEN_DATA[name]
    resp = await exchange(proxy.host, proxy.port, raw)
    expected = 2 if name == "pipelined-then-close" else 1
    assert re.findall(rb"HTTP/1\.[01] (\d+)", resp.raw) == [b"200"] * expected, resp.raw
    assert resp.closed


@pytest.mark.parametrize("late", [False, True])
async def test_an_upload_closing_the_connection_is_stored_whatever_follows(
    proxy: Any, s3: Any, bucket: str, late: bool
) -> None:
    """The same for an upload, its body in the head's read or after it (read past the
    parser: bypass_parser); one byte follows it."""
    head = (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        + FORM
        + b"Content-Length: %d\r\n\r\n" % len(FORM_BODY)
    )
    chunks = (head, FORM_BODY + b"X") if late else (head + FORM_BODY + b"X",)
    resp = await exchange(proxy.host, proxy.port, *chunks)
    assert resp.status == 201, resp.raw
    assert resp.closed
    [f] = resp.json()["files"]
    assert await read_object_async(s3, bucket, f["key"]) == b"hello"


ORIGIN = b"http://app.example"
# What the protocol layer answers itself, each head carrying an allowed Origin.
PARSER_ERRORS = {
    "uri-too-long": (b"GET /files/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n", 414),
    "header-too-large": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 9000 + b"\r\n",
        431,
    ),
    "bad-chunk-with-head": (
        b"POST /upload HTTP/1.1\r\nHost: a\r\n" + FORM + b"Transfer-Encoding: chunked\r\n",
        400,
    ),
    "br-not-installed": (
        b"POST /upload HTTP/1.1\r\nHost: a\r\n" + FORM + b"Content-Encoding: br\r\n"
        b"Content-Length: 5\r\n",
        415,
    ),
}


@pytest.mark.parametrize("name", list(PARSER_ERRORS))
@pytest.mark.parametrize("origin", [ORIGIN, b"http://other.example"])
async def test_protocol_errors_carry_the_cors_headers(
    proxy_factory: Any, name: str, origin: bytes
) -> None:
    """A page on an allowed origin reads the JSON error of the protocol layer as it reads
    a handler's (before, a 414, 431 or parser 400/415 had no CORS headers: the browser
    saw a network error); another origin gets none."""
    proxy = await proxy_factory(cors_origin=(ORIGIN.decode(),))
    head, status = PARSER_ERRORS[name]
    tail = b"ZZ\r\nabc\r\n" if name == "bad-chunk-with-head" else b"hello"
    raw = head + b"Origin: " + origin + b"\r\n\r\n" + tail
    resp = await exchange(proxy.host, proxy.port, raw, quiet=2)
    assert resp.status == status, resp.raw[:300]
    assert resp.headers.get("Content-Type", "").startswith("application/json")
    if origin == ORIGIN:
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN.decode()
        assert "X-Request-ID" in resp.headers["Access-Control-Expose-Headers"]
    else:
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert resp.headers["Vary"] == "Origin"


H2C = (
    b"Host: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
)


@pytest.mark.parametrize("body", [False, True])
async def test_a_request_pipelined_after_an_h2c_upgrade_is_not_dropped(
    proxy_factory: Any, body: bool
) -> None:
    """``curl --http2`` to http:// asks to upgrade to h2c; the proxy answers in HTTP/1.1.
    llhttp stops at the end of such a request and aiohttp dropped the rest of the read:
    a request pipelined behind it was never answered, and the client waited for the
    keep-alive timeout. It is answered now; behind a request with a body (where the rest
    of that read cannot be told), the connection closes at once after the first answer,
    so the client retries."""
    proxy = await proxy_factory(keepalive_timeout=30.0)
    first = b"GET /healthz HTTP/1.1\r\n" + H2C + b"\r\n"
    if body:
        first = b"POST /nowhere HTTP/1.1\r\n" + H2C + b"Content-Length: 5\r\n\r\nhello"
    started = time.monotonic()
    resp = await exchange(proxy.host, proxy.port, first + NEXT, quiet=5)
    statuses = re.findall(rb"HTTP/1\.1 (\d+)", resp.raw)
    if body:
        assert statuses in ([b"404", b"200"], [b"404"]), resp.raw
        assert resp.closed and time.monotonic() - started < 2, resp.raw
    else:
        assert statuses == [b"200", b"200"], resp.raw


async def half_closed(host: str, port: int, raw: bytes) -> bytes:
    """Send ``raw``, half-close (shutdown SHUT_WR, as ``nc -N`` does), read to the end."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("close", [False, True])
async def test_a_complete_request_then_a_half_close_is_answered(
    proxy: Any, s3: Any, bucket: str, close: bool
) -> None:
    """aiohttp took the client's EOF for a lost connection: no answer at all, and a
    complete upload was stored, then rolled back. The transport stays open for the answer
    when every request sent is complete, and closes after it."""
    connection = b"Connection: close\r\n" if close else b""
    health = b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + connection + b"\r\n"
    upload = (
        b"POST /upload HTTP/1.1\r\nHost: a\r\n"
        + connection
        + FORM
        + b"Content-Length: %d\r\n\r\n" % len(FORM_BODY)
        + FORM_BODY
    )
    got = await half_closed(proxy.host, proxy.port, health + upload)
    assert re.findall(rb"HTTP/1\.1 (\d+)", got) == ([b"200"] if close else [b"200", b"201"])
    if not close:
        key = json.loads(got[got.rindex(b"\r\n\r\n") + 4 :])["files"][0]["key"]
        assert await read_object_async(s3, bucket, key) == b"hello"


async def test_a_half_close_mid_body_stores_nothing(proxy: Any, s3: Any, bucket: str) -> None:
    upload = (
        b"POST /upload HTTP/1.1\r\nHost: a\r\n"
        + FORM
        + b"Content-Length: %d\r\n\r\n" % (len(FORM_BODY) + 10)
        + FORM_BODY
    )
    got = await half_closed(proxy.host, proxy.port, upload)
    assert b" 201 " not in got
    assert await all_keys_async(s3, bucket) == []


def _chunked_upload(*chunks: bytes) -> tuple[bytes, bytes]:
    """A chunked /upload (its head, its body) of FORM_BODY in chunks, the n-th chunk's
    size line followed by ``chunks[n]`` (an extension, or nothing)."""
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\n" + FORM + b"Transfer-Encoding: chunked\r\n\r\n"
    step = -(-len(FORM_BODY) // len(chunks))
    pieces = [FORM_BODY[i : i + step] for i in range(0, len(FORM_BODY), step)]
    framed = zip(pieces, chunks, strict=False)  # fewer pieces than extensions: the rest unused
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p, ext in framed)
    return head, body + b"0\r\n\r\n"


@pytest.mark.parametrize("segments", ["one-segment", "head-then-body"])
@pytest.mark.parametrize("shape", ["one-long", "many-short"])
async def test_chunk_extensions_past_the_limit_are_a_400(
    proxy_factory: Any, s3: Any, bucket: str, segments: str, shape: str
) -> None:
    """llhttp skips chunk extensions without a limit and nothing counted them: 50 MB of
    extension on one chunk passed --max-request-size 1MiB (201). RFC 9112 7.1.1."""
    proxy = await proxy_factory(max_request_size=1024 * 1024)
    if shape == "one-long":
        head, body = _chunked_upload(b";e=" + MARK + b"a" * 2 * 1024 * 1024)
    else:  # 22 KiB in all, none of them long
        head, body = _chunked_upload(*[b";e=" + MARK + b"a" * 400] * 100)
    chunks = (head + body,) if segments == "one-segment" else (head, body)
    resp = await exchange(proxy.host, proxy.port, *chunks)
    assert_json_error(resp, 400, "BAD_HTTP_REQUEST")
    assert "chunk extensions are over 16384 bytes" in resp.json()["error"]["message"]
    assert await all_keys_async(s3, bucket) == []


async def test_chunk_extensions_under_the_limit_are_taken(proxy: Any, s3: Any, bucket: str) -> None:
    head, body = _chunked_upload(b";a=1", b";b", b";c=" + b"x" * 10000)
    resp = await exchange(proxy.host, proxy.port, head, body)
    assert resp.status == 201, resp.raw[:400]
    key = resp.json()["files"][0]["key"]
    assert await read_object_async(s3, bucket, key) == b"hello"


async def test_chunk_extensions_past_the_limit_on_sign_are_a_400(proxy: Any) -> None:
    """Every route: the limit is the connection's, not the upload's."""
    body = b'{"filename": "a.txt", "size": 3}'
    raw = LATE_BAD_CHUNK["sign"] + b"Transfer-Encoding: chunked\r\n\r\n"
    raw += b"%x;e=%s\r\n%s\r\n0\r\n\r\n" % (len(body), b"a" * 17000, body)
    resp = await exchange(proxy.host, proxy.port, raw)
    assert_json_error(resp, 400, "BAD_HTTP_REQUEST")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("route", ["upload", "sign"])
async def test_a_half_close_mid_body_is_answered(
    proxy: Any, s3: Any, bucket: str, route: str, framing: str
) -> None:
    """A client that shuts down its sending side mid-body is still there to read: it got
    only an EOF; now the 400 the early end of its body is (and nothing is stored)."""
    body = FORM_BODY if route == "upload" else b'{"filename": "a.txt", "size": 3}'
    head = LATE_BAD_CHUNK[route]
    if framing == "chunked":
        raw = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(body), body)
    else:
        raw = head + b"Content-Length: %d\r\n\r\n" % (len(body) + 10) + body
    got = await half_closed(proxy.host, proxy.port, raw)
    assert got.startswith(b"HTTP/1.1 400 "), got
    answer = json.loads(got[got.index(b"\r\n\r\n") + 4 :])
    assert answer["error"]["code"] == "CLIENT_DISCONNECTED", answer
    assert await all_keys_async(s3, bucket) == []


async def test_a_half_close_mid_tus_patch_is_answered(proxy: Any) -> None:
    from tests.test_tus import _new

    url = await _new(proxy, 100)
    raw = (
        b"PATCH " + url.encode() + b" HTTP/1.1\r\nHost: a\r\nTus-Resumable: 1.0.0\r\n"
        b"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
        b"Content-Length: 100\r\n\r\n" + b"x" * 50
    )
    got = await half_closed(proxy.host, proxy.port, raw)
    assert got.startswith(b"HTTP/1.1 400 ") and b"CLIENT_DISCONNECTED" in got, got
    assert b"Tus-Resumable: 1.0.0" in got
    head = await proxy.head(url, headers={"Tus-Resumable": "1.0.0"})
    assert head.headers["Upload-Offset"] == "0"  # no whole part came


VERSION_ROUTES = [b"GET /healthz", b"POST /upload", b"POST /tus/", b"POST /sign", b"GET /files/a"]


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.1", b"HTTP/9.9", b""])
@pytest.mark.parametrize("line", VERSION_ROUTES, ids=lambda line: line.decode())
async def test_a_request_line_of_another_major_version_is_a_505(
    proxy: Any, line: bytes, version: bytes
) -> None:
    """RFC 9110 section 15.6.6. ``HTTP/2.0`` was served and answered ``HTTP/2.0 201``;
    ``HTTP/3.1`` was a 400 "Bad status line"; a bare ``GET /healthz`` (HTTP/0.9's
    shape) was answered ``HTTP/0.9 200 OK``."""
    head = line + (b" " + version if version else b"") + b"\r\n"
    if version:
        head += b"Host: a\r\nContent-Length: 0\r\n"
    resp = await exchange(proxy.host, proxy.port, head + b"\r\n")
    assert resp.raw.startswith(b"HTTP/1.1 505 "), resp.raw[:200]
    assert_json_error(resp, 505, "HTTP_VERSION_NOT_SUPPORTED")
    shown = (version or b"HTTP/0.9").decode()
    assert (
        resp.json()["error"]["message"] == f"{shown} is not supported: this server speaks HTTP/1.1"
    )


@pytest.mark.parametrize(
    "line",
    [b"GET /healthz\r\n", b"GET /healthz\n", b"\r\nGET /healthz\r\n", b"POST /tus/ HTTP/2.0\r\n"],
)
async def test_a_request_line_refused_alone_is_answered_before_any_header(
    proxy: Any, line: bytes
) -> None:
    """HTTP/0.9's ``GET /path`` line is all its client sends: no header, no blank line.
    It was answered only at a blank line, so the client waited out --header-timeout
    (10 s) for nothing, or read an EOF at its half-close (probe reprobe8 F3). Now the
    line alone gets its 505, as does an ``HTTP/2.0`` line whose headers are not sent."""
    start = time.monotonic()
    resp = await exchange(proxy.host, proxy.port, line[:5], line[5:], quiet=5.0)
    assert time.monotonic() - start < 2.0
    assert resp.raw.startswith(b"HTTP/1.1 505 "), resp.raw[:200]
    assert_json_error(resp, 505, "HTTP_VERSION_NOT_SUPPORTED")
    if b"/tus/" in line:
        assert resp.headers["Tus-Resumable"] == "1.0.0"


async def test_a_refused_line_pipelined_after_a_request_is_answered_in_turn(proxy: Any) -> None:
    """The line of a head pipelined after another request is judged alone too, once
    the request before it is answered."""
    first = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    resp = await exchange(proxy.host, proxy.port, first + b"GET /healthz\r\n", quiet=5.0)
    assert resp.raw.startswith(b"HTTP/1.1 200 "), resp.raw[:200]
    assert b"HTTP/1.1 505 " in resp.raw and resp.closed, resp.raw[-400:]


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"G@T /healthz HTTP/1.1\r\n", 400),  # a bad method token
        (b"GET /healthz HTTP/1.9\r\n", 400),  # an HTTP/1.x llhttp does not know
        (b"GET /healthz HTTP/3.1\r\n", 505),
        (b"GET /healthz XTTP/1.1\r\n", 400),
        (b"GET /" + b"a" * protocol.MAX_LINE_SIZE, 414),  # no line end needed
    ],
)
async def test_every_request_line_judged_alone_is_answered_at_once(
    proxy: Any, line: bytes, status: int
) -> None:
    """The rest of the class: llhttp refuses these on the line alone (pinned here, so
    that a parser that waits for the head shows)."""
    start = time.monotonic()
    resp = await exchange(proxy.host, proxy.port, line, quiet=5.0)
    assert time.monotonic() - start < 2.0
    assert_json_error(resp, status, CODES[status])


@pytest.mark.parametrize(
    ("sent", "status", "says"),
    [
        # probe reprobe9b F4: HTTP/2's preface line, whole or not: alone it waited for
        # --header-timeout, with LF only it was a 505
        ((b"PRI * HTTP/2.0\r\n",), 400, "speaks HTTP/1.1"),
        ((b"PRI * HTTP/2.0\n",), 400, "speaks HTTP/1.1"),
        ((b"PRI * HTTP/2.0\r\n\r\n",), 400, "speaks HTTP/1.1"),
        ((b"PRI * HTT", b"P/2.0\r\n"), 400, "speaks HTTP/1.1"),
        ((b"PRI * HTTP/2.0\r\nHost: a\r\n\r\n",), 400, "speaks HTTP/1.1"),  # was a 505
        # F6: a bad method is a bad method, whatever the line's shape (was 505 HTTP/0.9)
        ((b"FOO /x\r\n",), 400, "invalid method"),
        ((b"get /x\r\n",), 400, "invalid method"),
        ((b"FOO /x HTTP/2.0\r\n",), 400, "invalid method"),
        # llhttp takes more spaces between the parts: an HTTP/0.9 line all the same
        ((b"GET  /healthz\r\n",), 505, "HTTP/0.9"),
        # empty lines before the line do not count to its length (they were past it)
        ((b"\r\n" * 5000 + b"GET /healthz\r\n",), 505, "HTTP/0.9"),
        ((b"\r\n" * 5000, b"GET /healthz\r\n"), 505, "HTTP/0.9"),
    ],
)
async def test_a_request_line_is_judged_as_the_parser_would_and_at_once(
    proxy: Any, sent: tuple[bytes, ...], status: int, says: str
) -> None:
    start = time.monotonic()
    resp = await exchange(proxy.host, proxy.port, *sent, quiet=5.0)
    assert time.monotonic() - start < 2.0  # not at the header timeout
    assert resp.raw.startswith(f"HTTP/1.1 {status} ".encode()), resp.raw[:200]
    assert_json_error(resp, status, CODES[status])
    assert says.lower() in resp.json()["error"]["message"].lower()


@pytest.mark.parametrize(
    "head",
    [
        b"GET  /healthz  HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\r\n" * 5000 + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
async def test_a_valid_request_line_sent_byte_by_byte_is_served(proxy: Any, head: bytes) -> None:
    """What the parser takes is served, however it comes: its request line a byte
    per read (each judged as it comes)."""
    begin = head.index(b"GET")
    end = head.index(b"\r\n", begin) + 2
    pieces = [head[i : i + 1] for i in range(begin, end)]
    resp = await exchange(
        proxy.host, proxy.port, head[:begin] or b"\r\n", *pieces, head[end:], pause=0.01
    )
    assert resp.raw.startswith(b"HTTP/1.1 200 "), resp.raw[:200]


async def test_a_run_of_empty_lines_is_one_piece_for_the_parser(
    proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of 256 KiB of CRLFs was cut into 131,072 pieces, each a copy of the rest
    of the read (quadratic: gigabytes copied). Counted as the parser's calls."""
    calls = 0
    feed = web.RequestHandler.data_received

    def counted(self: web.RequestHandler, data: bytes) -> None:
        nonlocal calls
        calls += 1
        feed(self, data)

    monkeypatch.setattr(web.RequestHandler, "data_received", counted)
    resp = await exchange(
        proxy.host, proxy.port, b"\r\n" * 100_000 + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert resp.raw.startswith(b"HTTP/1.1 200 "), resp.raw[:200]
    assert calls < 20


def test_the_first_line_of_a_head() -> None:
    assert protocol.first_line(b"GET / HTTP/1.1") is None
    assert protocol.first_line(b"GET /x\r\nHost") == b"GET /x\r\n"
    assert protocol.first_line(b"\r\n\nGET /x\n") == b"GET /x\n"
    assert protocol.first_line(b"\r\n") is None


@pytest.mark.parametrize("version", [b"HTTP/1.9", b"HTTP/1.1x", b"FOO/1.1"])
async def test_a_bad_version_names_the_request_line(proxy: Any, version: bytes) -> None:
    """llhttp refuses these as a "Bad status line": a request has a request line."""
    resp = await exchange(
        proxy.host, proxy.port, b"GET /healthz " + version + b"\r\nHost: a\r\n\r\n"
    )
    assert_json_error(resp, 400, "BAD_HTTP_REQUEST")
    message = resp.json()["error"]["message"]
    assert "bad request line" in message and "status line" not in message, message
    assert resp.raw.startswith(b"HTTP/1.1 400 "), resp.raw[:40]


def test_the_version_of_a_request_line() -> None:
    version = protocol.request_line_version
    assert version(b"GET / HTTP/1.1\r\nHost: a\r\n") == (1, 1)
    assert version(b"GET / HTTP/2.0\r\n") == (2, 0)
    assert version(b"GET /x\r\n\r\n") == (0, 9)
    assert version(b"GET /x HTTP/1.1") is None  # no line end yet
    assert version(b"\x16\x03\x01") is None
    assert protocol.version_refusal((1, 9)) is None
    assert protocol.version_refusal(None) is None
    refusal = protocol.version_refusal((2, 0))
    assert refusal is not None and protocol.error_kind(refusal).status == 505


@pytest.mark.parametrize("split", ["one-read", "two-reads", "trailer-split"])
async def test_a_chunked_bodys_trailers_never_become_the_next_requests_headers(
    proxy: Any, split: str
) -> None:
    """aiohttp's C parser (3.14) kept a chunked body's last trailer field and gave it to
    the connection's next request as its first header: ``X-Request-ID: smuggled`` sent as
    a trailer came back on the next request's answer (and ``Authorization`` or ``Origin``
    would be read as the next request's own; behind a load balancer reusing connections,
    another client's). A route that leaves the body to the parser, then a pipelined GET."""
    first = (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nAuthorization: Bearer other\r\nX-Request-ID: smuggled\r\n\r\n"
    )
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    if split == "one-read":
        chunks = [first + second]
    elif split == "two-reads":
        chunks = [first, second]
    else:
        cut = first.index(b"smuggled")
        chunks = [first[:cut], first[cut:] + second]
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.2)
        received = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]
    assert len(statuses) == 2 and statuses[1] == 200, received
    assert b"smuggled" not in received, received


@pytest.mark.parametrize(
    "head",
    [
        b"POST /upload HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nBad Name: x\r\n\r\n",
        b"POST /upload HTTP/1.0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    ],
)
async def test_a_refused_http10_head_is_answered_http11(proxy: Any, head: bytes) -> None:
    """README (505 row): a head the parser refuses is answered with an ``HTTP/1.1`` status
    line whatever its version (RFC 9110 section 6.2); a handler's answer to an HTTP/1.0
    request has ``HTTP/1.0`` (reprobe14b F1: the README said all of them did)."""
    resp = await exchange(proxy.host, proxy.port, head)
    assert_json_error(resp, 400, "BAD_HTTP_REQUEST")
    assert resp.raw.startswith(b"HTTP/1.1 400 "), resp.raw[:40]
    handled = await exchange(proxy.host, proxy.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert handled.raw.startswith(b"HTTP/1.0 200 "), handled.raw[:40]
