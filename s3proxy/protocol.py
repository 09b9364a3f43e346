"""What the client is told when aiohttp, not a handler, refuses a request.

aiohttp parses each request in ``web_protocol.RequestHandler``, before routing and
middlewares. When that fails (a bad request line, a header without a colon, a NUL,
obs-fold, a duplicate Content-Length, a line over the limits, a bad chunk size) it
answers text/plain with the offending bytes quoted back, and logs an ERROR with a
traceback for every such request. Worse, a bad chunk size that arrives while a
handler is reading the body is queued behind that request, whose body then waits
for bytes that never come: the client gets no answer at all.

Here instead (``ProxyRequestHandler``):

- a request that cannot be parsed is answered with the proxy's JSON error body
  (``BAD_HTTP_REQUEST`` 400; ``URI_TOO_LONG`` 414 for a request target over
  ``MAX_LINE_SIZE``; ``HEADERS_TOO_LARGE`` 431 for a header over ``MAX_FIELD_SIZE``,
  too many headers, or a head over ``MAX_HEAD_SIZE`` in all), with a request id,
  ``Connection: close``, the CORS headers the app's responses carry (the Origin read
  from the refused head's bytes), and one INFO line in the log; neither the answer nor
  the log line holds the client's bytes;
- an HTTP/1.0 request with Transfer-Encoding (faulty framing, RFC 9112 section 6.1),
  which llhttp decodes as chunked, is answered ``BAD_HTTP_REQUEST`` before a handler
  runs, and nothing after it on the connection is read;
- a request that closes the connection (``Connection: close``, HTTP/1.0 without
  keep-alive) is answered whatever follows it in the same read, and what follows is
  not read (RFC 9112 section 9.6; llhttp raised on it and aiohttp answered 400);
- a framing error inside a body being read fails that body's stream with
  ``RequestPayloadError``, so the handler stops and ``error_middleware`` answers
  ``BAD_HTTP_REQUEST``;
- an ``HTTPException`` or other exception escaping the app outside the middlewares
  (aiohttp's default expect handler, a bug in an expect handler) is JSON too.

It also holds the connection policy (README "Limits and timeouts"), which aiohttp
leaves to the deployment (its keep-alive timeout is an hour and it has no head timeout
and no cap), as ``Connections``, one per app:

- a request head must be complete ``--header-timeout`` after the connection opened, or
  after its first byte on a kept-alive connection (slowloris); an idle kept-alive
  connection is closed after ``--keepalive-timeout`` (aiohttp's own timer);
- at most ``--max-connections`` are served. Past it the oldest idle connection is closed
  to make room; if none is idle, the new one joins a reserve of ``HEALTH_RESERVE``
  where only ``/healthz`` and ``/readyz`` are answered (anything else gets 503
  ``OVERLOADED``, ``Connection: close``), so a load balancer still sees the instance;
  past the reserve a connection is closed at once. Nothing stops accepting: a full
  backlog would time out the health checks too;
- at drain, idle connections are closed and every response says ``Connection: close``.

aiohttp has no public hook for any of this (aio-libs/aiohttp#3287), so this module
is the one place the proxy leans on its internals, listed in
``private_api_problems()``, which a test asserts finds nothing missing:

- ``Application._make_handler``, wrapped per app by ``install()`` so that every
  server aiohttp builds for the app (``AppRunner`` in the CLI, ``TestServer`` in the
  tests, ``web.run_app``) makes ``ProxyRequestHandler`` connections;
- ``Server._loop`` and ``Server._kwargs``, to build the handler as ``Server`` does;
- ``RequestHandler.handle_error`` and ``finish_response`` (public names, not documented),
  and ``_current_request``, ``_messages`` and ``web_protocol._ErrInfo`` for the
  body-phase error; ``web_protocol.ERROR`` (the stand-in request of a refused head) and
  ``BaseRequest._message``/``_version``, to answer it with an HTTP/1.1 status line;
- ``RequestHandler._waiter`` (pending while the connection waits for a request head, as
  aiohttp's own keep-alive timer reads it), for the head timeout and idleness, and
  ``_keepalive_handle``, that timer, stopped once a head begins, and
  ``_process_keepalive``, what it runs, which leaves a begun head to the head timer;
- ``BaseProtocol._parser``, ``RequestHandler._read_bufsize``, ``_force_close``, ``_close``,
  ``web_protocol.MAX_MSG_QUEUE_SIZE`` and ``HttpRequestParser``'s arguments, for an upload's body
  read past the parser (``ProxyRequestHandler.bypass_parser``);
- ``BaseProtocol._reading_paused``, so that a resume only follows a pause of aiohttp's
  (``ProxyRequestHandler.resume_reading``).

If any is gone, ``install()`` logs a warning and leaves aiohttp's behaviour as it is
(the proxy still runs); tests/test_http_errors.py fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import fcntl
import logging
import re
import sys
import termios
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web, web_protocol
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.http_parser import SINGLETON_HEADERS, HttpRequestParser, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from s3proxy import tus_protocol
from s3proxy.chunked import ChunkedDecoder, joined, over_extensions, over_trailers
from s3proxy.chunks import DATA, MAX_CHUNK_EXTENSIONS, MAX_TRAILERS, ChunkExtensions
from s3proxy.codings import CONTENT_ADVICE, discard, end_check_problems, install_end_check
from s3proxy.cors import Cors
from s3proxy.errors import (
    BAD_HTTP_REQUEST,
    HEADERS_TOO_LARGE,
    HTTP_VERSION_NOT_SUPPORTED,
    INTERNAL,
    OVERLOADED,
    UNSUPPORTED_ENCODING,
    UPSTREAM_TIMEOUT,
    URI_TOO_LONG,
    ErrorKind,
    FramingLimit,
    HeadTooLarge,
    ProxyError,
    VersionNotSupported,
    bad_coding_message,
    error_body,
    forget_tracebacks,
    http_exception_response,
    undecodable_coding,
)
from s3proxy.log import REQUEST_ID, RateLimit, given_request_id

log = logging.getLogger("s3proxy.protocol")

# aiohttp raises the same LineTooLong for a request target and for a header, with the
# limit it hit as args[1]; distinct limits are how 414 is told from 431. The target
# may be 8 KiB (nginx's default large_client_header_buffers); a header's name or value
# keeps aiohttp's default (line end not counted). All go to the server as handler_args.
MAX_LINE_SIZE = 8192
MAX_FIELD_SIZE = 8190
# asyncio's selector transport reads at most this much per recv (its max_size); an
# upload waiting for a part's bytes widens the next read (ProxyRequestHandler.expect),
# down to MIN_RECV when it waits for less.
RECV_SIZE = 256 * 1024
MIN_RECV = 64 * 1024
# At most this many header lines (aiohttp's default), and aiohttp's message past it.
MAX_HEADERS = 128
# A request head's bytes in all, request line and headers (leading empty lines too): the
# parser holds a head until it is whole, in two copies (aiohttp's raw and decoded
# headers), and 128 lines of 8 KiB stalled before the blank line held ~2 MiB a connection
# outside the memory budget (reprobe21a: 200 such connections, +200 MiB). 32 KiB is
# nginx's default (4 x 8 KiB), twice HAProxy's whole buffer, eight Upload-Metadata's most.
MAX_HEAD_SIZE = 32 * 1024
HANDLER_ARGS: dict[str, Any] = {
    "max_line_size": MAX_LINE_SIZE,
    "max_field_size": MAX_FIELD_SIZE,
    "max_headers": MAX_HEADERS,
}
# The failure of a body the client half-closed in (eof_received).
BODY_CUT = "the client closed its sending side before the body was complete"
_TOO_MANY_HEADERS = "Too many headers received"


def error_kind(exc: HttpProcessingError) -> ErrorKind:
    """The error a parser failure is answered with."""
    if isinstance(exc, VersionNotSupported):
        return HTTP_VERSION_NOT_SUPPORTED
    if isinstance(exc, HeadTooLarge):
        return HEADERS_TOO_LARGE
    if isinstance(exc, ContentEncodingError):
        # bytes that are not gzip (deflate): the client's data; else br or zstd, whose
        # decoder is not installed
        return BAD_HTTP_REQUEST if undecodable_coding(exc) else UNSUPPORTED_ENCODING
    if isinstance(exc, LineTooLong) and len(exc.args) > 1:
        limit = exc.args[1]
        if limit == MAX_LINE_SIZE:
            return URI_TOO_LONG
        if limit == MAX_FIELD_SIZE:
            return HEADERS_TOO_LARGE
    if str(exc.message).startswith(_TOO_MANY_HEADERS):
        return HEADERS_TOO_LARGE
    return BAD_HTTP_REQUEST


def safe_reason(exc: HttpProcessingError) -> str:
    """The parser's reason without the client's bytes, which aiohttp quotes after it
    ("Invalid header token:\\n\\n  b'...'"): its first sentence, cut where a quote
    begins (``_QUOTED``)."""
    if isinstance(exc, LineTooLong):
        return "line too long"
    text = str(exc.message)
    if text.startswith("Pause on PRI"):  # llhttp's words for the preface
        return "an HTTP/2 connection preface: this server speaks HTTP/1.1"
    if isinstance(exc, BadStatusLine) and text.startswith("Bad status line"):
        # aiohttp's name for the first line of any message; in a request it is the
        # request line. llhttp's own reason follows on the next line ("Invalid HTTP
        # version:"), then the client's bytes.
        lines = [line.strip() for line in text.split("\n")]
        detail = lines[1].rstrip(":") if len(lines) > 1 else ""
        cut = _QUOTED.search(detail)
        detail = detail[: cut.start()].strip() if cut is not None else detail
        detail = "".join(c for c in detail if c.isascii() and c.isprintable())[:60]
        return (
            f"bad request line: {detail[:1].lower()}{detail[1:]}" if detail else "bad request line"
        )
    text = text.split("\n", 1)[0].split(". ", 1)[0]  # not "Please install ..."
    duplicate = _DUPLICATE.match(text)
    if duplicate is not None and duplicate.group(1).lower() in SINGLETON_HEADERS:
        # a name from aiohttp's fixed list, not the client's bytes: say which
        return f"the {duplicate.group(1)} header is given more than once"
    quoted = _QUOTED.search(text)
    if quoted is not None:
        text = text[: quoted.start()]
    text = "".join(c for c in text if c.isascii() and c.isprintable())
    return text.strip().rstrip(":").strip()[:100] or type(exc).__name__


# aiohttp's words for a second Content-Type, Host, ... (SINGLETON_HEADERS); llhttp's own
# for Content-Length: "Duplicate Content-Length".
_DUPLICATE = re.compile(r"Duplicate '?([A-Za-z0-9-]{1,40})'?(?: header found)?[.:]?$")

# Where the client's bytes begin in a parser's message: a quote, bytes' b'...', or a
# bytearray(...); not an apostrophe inside a word ("can't").
_QUOTED = re.compile(r"""\bb['"]|bytearray\(|(?<![A-Za-z])['"]|['"](?![A-Za-z])""")

_MESSAGES = {
    BAD_HTTP_REQUEST: "the request is not valid HTTP/1.1",
    UNSUPPORTED_ENCODING: "the request's Content-Encoding is not supported: " + CONTENT_ADVICE,
    URI_TOO_LONG: f"the request target is longer than {MAX_LINE_SIZE} bytes",
    HEADERS_TOO_LARGE: (
        f"a request header's name or value is longer than {MAX_FIELD_SIZE} bytes (not "
        f"counting its line end), or there are more than {MAX_HEADERS} headers"
    ),
}


# Connections past --max-connections kept for health checks: enough for a few load
# balancers probing at once; each costs one fd.
HEALTH_RESERVE = 16
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
# A reserve connection's head is due this soon: a health checker sends its request at
# once, and slow heads must not keep the reserve from the health checks.
RESERVE_HEAD_TIMEOUT = 1.0
# Seconds between two log lines about refused or timed-out connections: a flood of
# them must not become a flood of log lines.
LOG_INTERVAL = 1.0
# Seconds a connection made but silent yet is waited for when a drain begins: its client
# (a load balancer) has just connected to send a request, and a connection closed under
# a POST it has sent is a 502 it cannot retry (nginx, in a loaded rolling restart: 1 of
# 373). Sent within this, the request is answered (503 SHUTTING_DOWN for a new upload).
FRESH_GRACE = 1.0


def unread_bytes(sock: Any) -> int:
    """Bytes the kernel holds for ``sock`` (anything with ``fileno()``) that nobody has
    read yet (FIONREAD); 0 when it cannot tell."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(raw, sys.byteorder, signed=True)


def read_state(request: web.BaseRequest | None) -> str:
    """How a request's connection reads now, for the drain's lines on the uploads it
    waits for: is the transport reading, is it paused by aiohttp (its reader over the
    high-water mark, or its message queue), what the kernel holds unread and what the
    request's StreamReader holds. An upload that waited out a drain's whole grace in
    ``StreamReader._wait`` read ``reading=True kernel=0``: its client's bytes had not
    left the client (a test's, whose close asyncio held while its loop was blocked)."""
    if request is None:
        return "-"
    transport, protocol, content = request.transport, request.protocol, request.content
    if transport is None:
        return "transport=none"
    is_reading = getattr(transport, "is_reading", None)
    sock = transport.get_extra_info("socket")
    return (
        f"reading={None if is_reading is None else is_reading()}"
        f" closing={transport.is_closing()}"
        f" aiohttp_paused={getattr(protocol, '_reading_paused', None)}"
        f" buffer_paused={getattr(protocol, '_buffer_paused', None)}"
        f" kernel={-1 if sock is None else unread_bytes(sock)}"
        f" buffered={getattr(content, '_size', None)} eof={content.is_eof()}"
    )


def _head_end(data: bytes, pos: int = 0) -> int:
    """Where the first request head in ``data`` from ``pos`` may end (after its blank
    line), or -1.

    A head's end split across reads shows as ``data`` beginning with LF or CRLF: cut
    there too (a cut is always harmless: the parser reads a stream); after as many
    more as follow, the empty lines the parser skips before a request line (RFC 9112
    section 2.2): a run of them is one piece, not a piece per line."""
    if data.startswith((b"\n", b"\r\n"), pos):
        return _EMPTY_LINES.match(data, pos).end()  # type: ignore[union-attr]  # matches
    end = data.find(b"\r\n\r\n", pos)
    return -1 if end < 0 or end + 4 == len(data) else end + 4


_EMPTY_LINES = re.compile(rb"(?:\r?\n)+")


def _raw_header(head: bytes, field: re.Pattern[bytes]) -> str | None:
    """A header's value in the bytes of a head the parser refused (a browser sends its
    head in one write): the Origin for the error's CORS headers, the X-Request-ID it
    returns as every answer does (README, Logs)."""
    found = field.search(head)
    return None if found is None else found.group(1).decode("latin-1").strip()


_ORIGIN = re.compile(rb"\r\norigin[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_REQUEST_ID_HEADER = re.compile(rb"\r\nx-request-id[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
TUS_ROOT = "/tus/"
# A refused head's request line naming a tus URL (the parser gave no path for it).
_TUS_TARGET = re.compile(rb"[!-~]+ /tus/")


def _taken_upgrade(message: RawRequestMessage) -> bool:
    """Does aiohttp take this request's Upgrade (a websocket, or CONNECT), keeping what
    follows it for after the answer? Any other (``h2c``) it drops what follows."""
    upgrade = message.headers.get(hdrs.UPGRADE, "")
    return message.method == hdrs.METH_CONNECT or upgrade.lower() == "websocket"


# The first line of HTTP/2's connection preface (RFC 9113 section 3.4); with LF only
# too, as llhttp reads request lines (it refuses that one at its line end).
_PREFACE_LINE = re.compile(rb"PRI \* HTTP/2\.0\r?\n")
# llhttp's reason for the whole preface, which safe_reason words for the client.
_PREFACE_REASON = "Pause on PRI/Upgrade"
# llhttp's reason for a byte after a message that closes the connection.
_DATA_AFTER_CLOSE = "Data after `Connection: close`"


def _after_close(exc: BaseException) -> bool:
    return isinstance(exc, HttpProcessingError) and str(exc.message).startswith(_DATA_AFTER_CLOSE)


# A request line: method, target, version (absent in HTTP/0.9's shape); llhttp takes
# more than one space between them (``GET  /x HTTP/1.1``).
_REQUEST_LINE = re.compile(rb"[!-~]+ +[!-~]+(?: +HTTP/(\d+)\.(\d+))?\r?\n")


def content_length(head: RawRequestMessage) -> int | None:
    """The head's Content-Length, None when it has none (the parser refused bad ones)."""
    try:
        return int(head.headers.get(hdrs.CONTENT_LENGTH, ""))
    except ValueError:
        return None


def request_line_version(head: bytes) -> tuple[int, int] | None:
    """The HTTP version a request head's first line names ((0, 9) for a line without
    one), or None when the line is not a request line's shape at all."""
    found = _REQUEST_LINE.match(head)
    if found is None:
        return None
    if found.group(1) is None:
        return (0, 9)
    return (int(found.group(1)), int(found.group(2)))


def first_line(head: bytes) -> bytes | None:
    """The request line, with its line end, in the first bytes of a request head, once
    its line end has come; None until then. Empty lines before it are skipped, as the
    parser skips them (RFC 9112 section 2.2)."""
    head = head.lstrip(b"\r\n")
    end = head.find(b"\n")
    return None if end < 0 else head[: end + 1]


def version_refusal(version: tuple[int, int] | None) -> VersionNotSupported | None:
    """The refusal of a request line's version: any major version but 1 (RFC 9110
    section 15.6.6: 505; this server speaks HTTP/1.1 framing only, and an ``HTTP/2.0``
    request line is no HTTP/2). A 1.x minor version llhttp refuses (``HTTP/1.9``)
    stays its 400."""
    if version is None or version[0] == 1:
        return None
    major, minor = version
    return VersionNotSupported(
        f"HTTP/{major}.{minor} is not supported: this server speaks HTTP/1.1"[:80]
    )


def line_refusal(line: bytes) -> HttpProcessingError | None:
    """The refusal of a whole request line (``first_line``), on that line alone: HTTP/2's
    preface line (400: this server speaks HTTP/1.1; before, alone it waited for
    --header-timeout and with LF only it was a 505), or a version refused
    (``version_refusal``: HTTP/0.9's shape, ``HTTP/2.0``). None: the parser's to judge."""
    if _PREFACE_LINE.fullmatch(line):
        return BadHttpMessage(_PREFACE_REASON)
    return version_refusal(request_line_version(line))


def better_refusal(exc: BaseException, seen: bytes) -> HttpProcessingError | None:
    """What to answer in place of the parser's refusal ``exc`` of a head whose bytes
    so far are ``seen``; None: its own. llhttp refuses a request line it cannot read
    as a bad line (``HTTP/3.1``, the preface line with LF only or followed by headers):
    the line's version or preface is said instead. A bad method (``FOO /x``, ``get``)
    stays a bad method, whatever the line's shape (it was a 505 "HTTP/0.9")."""
    if not isinstance(exc, BadStatusLine) or isinstance(exc, BadHttpMethod):
        return None
    line = first_line(seen)
    return None if line is None else line_refusal(line)


class Admission(enum.Enum):
    SERVE = "serve"
    EVICT_AND_SERVE = "evict"  # close the oldest idle connection, then serve this one
    HEALTH_ONLY = "health"  # the reserve: /healthz and /readyz only
    EVICT_AND_HEALTH_ONLY = "evict-reserve"  # close the oldest reserve one without a head
    REFUSE = "refuse"  # closed at once


def admission(
    served: int, reserve: int, limit: int, *, idle: bool, reserve_headless: bool = False
) -> Admission:
    """What to do with a new connection, given how many are served and in the reserve,
    the cap, whether some served connection is idle (closing it loses nothing), and
    whether some reserve connection has no complete head yet (a health checker sends
    its head at once: a slow one there is a flood, and gives way to a newer one)."""
    if served < limit:
        return Admission.SERVE
    if idle:
        return Admission.EVICT_AND_SERVE
    if reserve < HEALTH_RESERVE:
        return Admission.HEALTH_ONLY
    if reserve_headless:
        return Admission.EVICT_AND_HEALTH_ONLY
    return Admission.REFUSE


class Connections:
    """The open connections of the servers built for one app, and their policy."""

    def __init__(
        self, max_connections: int, header_timeout: float, recv_size: int = RECV_SIZE
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.recv_size = recv_size  # most bytes one widened socket read takes (--read-buffer)
        self.served: set[ProxyRequestHandler] = set()
        self.reserve: set[ProxyRequestHandler] = set()
        self.draining = False
        # Totals since start, for logs and tests.
        self.refused = 0
        self.evicted = 0
        self.head_timeouts = 0
        self.bypassed = 0  # request bodies read past the HTTP parser (bypass_parser)
        self._log_refused = RateLimit(LOG_INTERVAL)
        self._log_timeouts = RateLimit(LOG_INTERVAL)
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self.served) + len(self.reserve)

    def opened(self, conn: ProxyRequestHandler) -> Admission:
        full = len(self.served) >= self.max_connections
        idle = [c for c in self.served if c.idle] if full else []
        headless = [c for c in self.reserve if c.requests_open == 0]
        decision = admission(
            len(self.served),
            len(self.reserve),
            self.max_connections,
            idle=bool(idle),
            reserve_headless=bool(headless),
        )
        if decision is Admission.EVICT_AND_SERVE:
            self._evict(min(idle, key=lambda c: c.idle_since))
        elif decision is Admission.EVICT_AND_HEALTH_ONLY:
            self._evict(min(headless, key=lambda c: c.idle_since))
        if decision in (Admission.SERVE, Admission.EVICT_AND_SERVE):
            self.served.add(conn)
        elif decision in (Admission.HEALTH_ONLY, Admission.EVICT_AND_HEALTH_ONLY):
            self.reserve.add(conn)
        else:
            self.refused += 1
            suppressed = self._log_refused.hit()
            if suppressed is not None:
                log.warning(
                    "connections.refused open=%d max_connections=%d reserve=%d refused=%d",
                    len(self),
                    self.max_connections,
                    HEALTH_RESERVE,
                    suppressed,
                )
        return decision

    def _evict(self, conn: ProxyRequestHandler) -> None:
        self.evicted += 1
        self.closed(conn)
        conn.force_close()

    def closed(self, conn: ProxyRequestHandler) -> None:
        self.served.discard(conn)
        self.reserve.discard(conn)
        self._changed.set()

    def head_timed_out(self) -> None:
        self.head_timeouts += 1
        suppressed = self._log_timeouts.hit()
        if suppressed is not None:
            log.info(
                "connections.head_timeout timeout=%gs closed=%d", self.header_timeout, suppressed
            )

    @property
    def busy(self) -> int:
        """Connections with a request in progress, or with bytes in the kernel the loop
        has not read yet, or fresh (``FRESH_GRACE``): the drain waits for them. Before, a
        kept-alive connection whose next request was sent as the drain began was left
        out, and closed under its client by the stop that followed."""
        return sum(1 for c in (*self.served, *self.reserve) if c.started or c.fresh)

    def close_idle(self) -> int:
        """Close every connection that waits for a request and has none begun (drain),
        but a fresh one: its first request is on its way."""
        idle = [c for c in (*self.served, *self.reserve) if c.idle and not c.fresh]
        for conn in idle:
            self.closed(conn)
            conn.force_close()
        return len(idle)

    async def wait_quiet(self, deadline: float) -> None:
        """Until no request is in progress, or the loop's clock passes ``deadline``.
        A fresh connection stops being waited for once its grace is over, silent."""
        loop = asyncio.get_running_loop()
        while self.busy and loop.time() < deadline:
            self._changed.clear()
            until = deadline
            fresh = [c.made_at + FRESH_GRACE for c in (*self.served, *self.reserve) if c.fresh]
            if fresh:
                until = min(until, min(fresh))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, until - loop.time()))

    def request_done(self) -> None:
        """A response finished or a connection closed: ``wait_quiet`` looks again."""
        self._changed.set()


def closing(request: web.BaseRequest) -> bool:
    """Should this connection close after its response (draining, or in the reserve)?"""
    conn = request.protocol
    return isinstance(conn, ProxyRequestHandler) and (conn.health_only or conn.pool.draining)


def refuse_over_capacity(request: web.BaseRequest) -> None:
    """Raise OVERLOADED for a reserve connection asking anything but a health check."""
    conn = request.protocol
    if (
        isinstance(conn, ProxyRequestHandler)
        and conn.health_only
        and request.path not in HEALTH_PATHS
    ):
        raise ProxyError(
            OVERLOADED,
            f"the proxy has {conn.pool.max_connections} connections open; "
            "retry shortly or on another instance",
        )


@web.middleware
async def capacity_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Only health checks on a reserve connection (see ``Connections``)."""
    refuse_over_capacity(request)
    return await handler(request)


async def mark_closing(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: ``Connection: close`` while draining or in the reserve."""
    if closing(request):
        response.force_close()
        response.headers["Connection"] = "close"


def _error_info(exc: HttpProcessingError) -> Any:
    """A refusal queued in a request's place, as aiohttp queues a parse failure."""
    return web_protocol._ErrInfo(error_kind(exc).status, exc, exc.message)


class ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what it refuses as the proxy does, with
    the head timeout and the connection cap of ``Connections``."""

    def __init__(self, manager: ProxyServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.pool = manager.pool
        self.cors = manager.cors
        # The Origin of a request the parser refused (its head is not the request's).
        self._error_origin: str | None = None
        # ... and whether it was a tus request, whose answers all carry the tus headers.
        self._error_tus = False
        # ... and its X-Request-ID, which its error answer returns as any answer does.
        self._error_rid: str | None = None
        # The body of an answered request aiohttp reads on to its end: not decoded
        # (``codings.discard``).
        self.discarded_body: StreamReader | None = None
        self.health_only = False
        self.requests_open = 0  # heads parsed whose response is not finished
        self.heads = 0  # heads parsed over the connection's life
        self.idle_since = self.made_at = self._loop.time()
        self._head_begun = False  # bytes of the next request have come
        self._head_timer: asyncio.TimerHandle | None = None
        # A body read past the parser (bypass_parser): its StreamReader, bytes still due.
        self._bypass: StreamReader | None = None
        self._bypass_left = 0
        # ... a chunked one's decoder, and a chunked body waiting to be bypassed at the
        # first read that begins where the parser is at a clean point (_start_chunked).
        self._decoder: ChunkedDecoder | None = None
        self._chunked_wanted: StreamReader | None = None
        # The newest head came in a piece given to the parser as the body before it (the
        # read's rest): the parser may have read into its body too, so the walk of that
        # body, which starts at the head, is not where the parser is (reprobe12c F1).
        self._walk_behind = False
        self._walk_ended = False  # the newest body's walk ended in the piece just followed
        # What came after a body the parser holds the tail of (its reader full): it is
        # parsed once the parser has ended the body (``_held_on``): the reads, in order.
        self._after_body: list[bytes] | None = None
        self._auto_decompress = bool(kwargs.get("auto_decompress", True))
        # The connection closes after what is queued: bytes that come now are not parsed.
        self._ignore_rest = False
        # The client half-closed after complete requests: answer them, then close.
        self._eof = False
        # ... while the parser held a whole body's end: the EOF ends what follows it
        # once the parser has parsed it (``_held_eof``).
        self._eof_held = False
        # The body the client's EOF ended (eof_received): its request is answered, and
        # logged 499 as a client gone (log.client_gone), for a FIN is all the proxy sees.
        self.cut_body: StreamReader | None = None
        # The newest request head the parser gave, and its body (_parse, _screen).
        self._last_head: RawRequestMessage | None = None
        self._last_payload: StreamReader | None = None
        # ... and its chunk extensions, while it is a chunked body (_over_extensions).
        self._extensions: ChunkExtensions | None = None
        # The bytes of the head being read until its request line has come (_judge_line);
        # None once judged, or when where the head began is not known (after a body).
        self._line: bytes | None = b""
        # ... and the bytes of that body the parser was given (body_seen), and, once
        # a chunked one ended, how many of the last ones given came after its end.
        self._body_read = 0
        self._chunked_past = 0
        # ... and the newest head's Content-Length (None when chunked or none given).
        self._body_length: int | None = None
        # When the first byte of a head not complete yet came (loop time; --header-timeout
        # counts from it), also when it came behind a request in the same read.
        self._head_since: float | None = None
        # ... and how many of its bytes have come (MAX_HEAD_SIZE).
        self._head_size = 0

    @property
    def waiting(self) -> bool:
        """Waiting for a request head (as aiohttp's keep-alive timer tells it)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    @property
    def idle(self) -> bool:
        """Waiting, and no byte of the next head has come: closing it loses nothing.

        "Come" includes bytes in the kernel's buffer that the loop has not read yet: a
        client reuses a kept-alive connection the moment it has its answer, and when a
        new connection is admitted in the same turn of the loop, closing this one would
        reset a request already sent (measured: a 2 MiB upload at --max-connections 1 lost
        that way, its body all sent, in 2 runs of 8; uploads retried as SEND_FAILED in all).
        """
        transport = self.transport
        return (
            transport is not None
            and self.requests_open == 0
            and not self._head_begun
            and not self.lingering
            and unread_bytes(transport.get_extra_info("socket")) == 0
        )

    @property
    def lingering(self) -> bool:
        """Its requests are answered and the newest one's body is still coming (a
        refusal sent before the body: a 413, a 503 SHUTTING_DOWN): aiohttp reads it on to
        its end, up to 10 s, so that the client, still sending, gets its answer and a clean
        close rather than a reset. A load balancer cut that way closes its own connection
        to the client after passing the answer on (nginx, HAProxy), and the client's next
        request there fails."""
        transport = self.transport
        return (
            transport is not None
            and not transport.is_closing()
            and self.requests_open == 0
            and (self._bypass is not None or self._in_body())
        )

    @property
    def fresh(self) -> bool:
        """Made less than ``FRESH_GRACE`` ago, and not a byte has come yet: its first
        request is surely on its way (``Connections.close_idle``)."""
        return (
            self.heads == 0
            and not self._head_begun
            and self._loop.time() - self.made_at < FRESH_GRACE
        )

    @property
    def started(self) -> bool:
        """A request is open, or its answered body still coming (``lingering``), or bytes
        wait in the kernel, unread (the loop reads them on its next turn: a request, or the
        start of one). A head already partly read is not a started request: the drain does
        not wait for it, or a slowloris client would hold every stop for --header-timeout
        (measured: 10.8 s to exit with 20 of them)."""
        transport = self.transport
        return transport is not None and (
            self.requests_open > 0
            or self.lingering
            or unread_bytes(transport.get_extra_info("socket")) > 0
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._widened = False
        # A new connection's head is due header_timeout from now, first byte or not.
        self._arm_head_timer()
        decision = self.pool.opened(self)
        if decision in (Admission.HEALTH_ONLY, Admission.EVICT_AND_HEALTH_ONLY):
            self.health_only = True
            self._cancel_head_timer()
            self._arm_head_timer(min(self.pool.header_timeout, RESERVE_HEAD_TIMEOUT))
        elif decision is Admission.REFUSE:
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.pool.closed(self)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self, timeout: float | None = None) -> None:
        if self._head_timer is None:
            delay = self.pool.header_timeout if timeout is None else timeout
            # In no request's context: once a request resumed reading (flow control), asyncio
            # reads the socket in a copy of that request's, and this timer is the next head's.
            self._head_timer = self._loop.call_later(
                delay, self._head_timed_out, context=contextvars.Context()
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_due(self) -> float:
        """Seconds until the head begun at ``_head_since`` is due."""
        since = self._loop.time() if self._head_since is None else self._head_since
        return max(0.0, since + self.pool.header_timeout - self._loop.time())

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # Still no complete head: slowloris, or a client gone quiet. A head begun while a
        # request was open is timed again when that request is answered (log_access).
        if self.waiting or (self.requests_open == 0 and not self._messages):
            self.pool.head_timed_out()
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A parse failure (400 from aiohttp), or an exception that escaped the app."""
        if request.writer.output_size > 0:
            # As aiohttp does: a response is under way, only the connection can go.
            raise ConnectionError("a response was already being sent")
        refused = request._message is web_protocol.ERROR  # a head the parser refused
        given = (
            self._error_rid if refused else given_request_id(request.headers.get("X-Request-ID"))
        )
        rid = given or uuid.uuid4().hex
        REQUEST_ID.set(rid)  # this runs in the request's own task
        if isinstance(exc, HttpProcessingError):
            kind = error_kind(exc)
            reason = safe_reason(exc)
            log.info(
                "http.bad_request status=%d code=%s reason=%r peer=%s",
                kind.status,
                kind.code,
                reason,
                request.remote,
            )
            coding = undecodable_coding(exc)
            if coding:
                text = bad_coding_message(coding, exc)
            elif isinstance(exc, FramingLimit | VersionNotSupported | HeadTooLarge):
                text = str(exc.message)
            else:
                text = f"{_MESSAGES[kind]} ({reason})"
        elif status == 504:  # asyncio.TimeoutError outside the middlewares
            kind, text = UPSTREAM_TIMEOUT, "timed out"
            log.warning("request.timed_out path=%s", request.path)
        else:
            kind, text = INTERNAL, "internal error; see the proxy's log"
            log.error("request.failed path=%s", request.path, exc_info=exc)
        resp = web.json_response(error_body(kind, text), status=kind.status)
        resp.headers["X-Request-ID"] = rid
        if self.cors is not None:
            # No on_response_prepare here: the app's signal marks its own responses only.
            self.cors.add_headers(request.headers.get(hdrs.ORIGIN, self._error_origin), resp)
        if self._error_tus or request.path.startswith(TUS_ROOT):
            # As every answer under /tus/ (tus.add_routes' hook, which never sees this one).
            resp.headers.update(tus_protocol.ANSWER_HEADERS)
        resp.force_close()
        if request._message is web_protocol.ERROR:
            # aiohttp's stand-in for a head it could not parse is HTTP/1.0, and the
            # status line repeats the request's version: answer as the HTTP/1.1 server
            # this is (RFC 9110 section 6.2), also to an HTTP/2.0 or 0.9 line.
            request._version = HttpVersion11
        return resp

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # An HTTPException here escaped the middlewares (error_middleware renders every
        # other one): aiohttp's default expect handler raises 417 "Unknown Expect: <value>".
        if isinstance(resp, web.HTTPException) and resp.status >= 400 and not resp.prepared:
            json_resp = http_exception_response(resp)
            json_resp.force_close()
            resp = json_resp
        if not request.content.is_eof():
            discard(request.content)  # read on by aiohttp only to its end
        if request.content.exception() is not None:
            drop_unread(request.content)
        return await super().finish_response(request, resp, start_time)

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        # Called once per request, when its response is finished (finish_response).
        self.requests_open = max(0, self.requests_open - 1)
        self._head_begun = bool(self._messages) or self._head_since is not None
        if self._head_since is not None and not self._messages:
            self._arm_head_timer(self._head_due())  # it may have fired while this was open
        self.idle_since = self._loop.time()
        self.pool.request_done()
        if (self._ignore_rest or self._eof) and not self._messages:
            self.close()  # what was queued is answered; nothing after it is read
        super().log_access(request, response, time)

    def expect(self, size: int) -> None:
        """An upload waits for up to ``size`` bytes to fill a part it holds memory for:
        let the next socket read take that much, up to --read-buffer (asyncio reads
        256 KiB). Fewer, larger chunks through the parser, the multipart scan and the
        pipeline; after that one read, reads are 256 KiB again, so bytes nobody waits
        for (an upload queued for memory) arrive in the usual sizes."""
        transport = self.transport
        if transport is not None and hasattr(transport, "max_size"):  # not uvloop's
            want = min(size, self.pool.recv_size)
            if want > RECV_SIZE:
                # Past asyncio's size only as far as the kernel holds bytes now: recv
                # allocates all it may take, then shrinks to what came, and a slow
                # client's small reads cut from 1 MiB blocks left the heap fragmented
                # (24 clients sending 4-10 KiB writes: 93 MiB over idle, against 72 at
                # 256 KiB reads).
                held = unread_bytes(transport.get_extra_info("socket"))
                want = max(RECV_SIZE, min(want, held))
            transport.max_size = max(MIN_RECV, want)
            self._widened = True

    def bypass_parser(self, request: web.BaseRequest) -> bool:
        """From now on, hand the rest of ``request``'s body to its StreamReader as the
        socket brings it, past the HTTP parser; True if it will.

        aiohttp's C parser copies every body chunk it passes on (llhttp gives it a span
        of the socket's bytes, ``cb_on_body`` makes new bytes of it): 0.15 CPU s/GiB of a
        1 GiB upload here. A Content-Length body without Transfer-Encoding or
        Content-Encoding is its bytes as sent, so the socket's chunks can go on as they
        are. Only a body still arriving: up to now the parser passed on every body byte
        that came (it holds bytes back only after a message's end), so Content-Length
        minus the StreamReader's ``total_bytes`` are still due. At the body's end the
        StreamReader gets its EOF, as from the parser, and a new parser takes the
        connection's next request (the old one still waits for the body it never saw).

        A chunked body (no Content-Encoding) is decoded here instead (``s3proxy.chunked``):
        the parser's callbacks cost ~1.5 us per HTTP chunk, each a StreamReader piece of
        its own (1-byte chunks: 1,956 CPU s per GiB of file). It takes over at the first
        read that begins where the parser stands at a clean point (``_start_chunked``):
        at once, or at a later read.
        """
        headers = request.headers
        length = request.content_length
        payload = request.content
        if (
            self._bypass is not None
            or request.protocol is not self
            or any(h in headers for h in (hdrs.CONTENT_ENCODING, hdrs.UPGRADE))
            or payload.is_eof()
            or payload.exception() is not None
        ):
            return False
        head = self._last_head
        if hdrs.TRANSFER_ENCODING in headers:
            if (
                head is None
                or not head.chunked
                or payload is not self._last_payload
                or request.version != HttpVersion11
            ):
                return False
            self._chunked_wanted = payload
            self._start_chunked()
            return True
        if length is None or self._parser_holds():
            return False
        left = length - payload.total_bytes
        if left <= 0:
            return False
        self._bypass, self._bypass_left = payload, left
        self.pool.bypassed += 1
        return True

    def _start_chunked(self) -> None:
        """Bypass the chunked body wanted (``bypass_parser``) if the parser, which has
        read every byte given it, stands at its start, at a size line's start or inside
        a chunk's data (known from the body's walk, ``_extensions``): from there the
        decoder goes on exactly. Elsewhere (inside a size line, say) the next read still
        goes to the parser."""
        payload, walk, head = self._chunked_wanted, self._extensions, self._last_head
        if (
            payload is None
            or payload is not self._last_payload
            or payload.is_eof()
            or payload.exception() is not None
            or walk is None
            or head is None
            or self._walk_behind
        ):
            # its body ended or broke; or the parser read an unknown part of it with the
            # body before it (pipelined): it stays with the parser
            self._chunked_wanted = None
            return
        if self._body_read > 0 and walk.phase != DATA and not walk.at_size_line:
            return
        if self._parser_holds():
            # It holds bytes it was given (its tail): the walk is past where it stands.
            # Begun there, the decoder skipped them (reprobe14a N2: 201 with 19 KB of
            # 100 KB missing); a later read, once it has parsed them, begins it.
            return
        self._chunked_wanted = None
        names = {name.lower() for name in head.headers}
        self._decoder = ChunkedDecoder(
            fields=len(head.raw_headers),
            singletons=frozenset(names & SINGLETON_HEADERS),
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            phase=walk.phase,
            left=walk.left,
            total=walk.total,
        )
        self._bypass = payload
        self.pool.bypassed += 1

    def _feed_bypassed(self, data: bytes) -> bytes:
        """Feed the bypassed body from ``data``; what follows the body (the next request)."""
        payload = self._bypass
        assert payload is not None
        if self._force_close or self._close:
            return b""  # aiohttp reads nothing more once it closes
        decoder = self._decoder
        if decoder is not None:
            try:
                pieces, rest = decoder.feed(data)
            except HttpProcessingError as exc:
                self._bypass = self._decoder = None
                self._messages.append((_error_info(exc), EMPTY_PAYLOAD))
                self._body_broke(len(self._messages) - 1)
                return b""
            self._body_read += len(data) - (0 if rest is None else len(rest))
            if pieces:
                payload.feed_data(joined(pieces))
            if rest is None:
                return b""
            self._decoder = None
            body = b""
        else:
            left = self._bypass_left
            if len(data) < left:
                self._bypass_left = left - len(data)
                payload.feed_data(data)
                return b""
            body, rest = (data, b"") if len(data) == left else (data[:left], data[left:])
        self._bypass, self._bypass_left = None, 0
        self._line = b""  # the next head begins with rest
        if body:
            payload.feed_data(body)
        payload.feed_eof()
        head = self._last_head
        if head is not None and head.should_close:
            self._ignore_rest = True  # its answer closes the connection: nothing after it
        self._parser = self._new_parser()
        return rest

    def _new_parser(self) -> HttpRequestParser:
        """A parser for the connection's next request, as aiohttp's RequestHandler makes."""
        return HttpRequestParser(
            self,
            self._loop,
            self._read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=self._auto_decompress,
            max_msg_queue_size=web_protocol.MAX_MSG_QUEUE_SIZE,
        )

    def _trailers_ended(self, piece: bytes, queued: int) -> bool:
        """The newest request's chunked body, with trailer fields, ended in ``piece`` (the
        parser took it whole): then parse what follows it with a new parser (True).

        aiohttp's C parser (3.14) keeps a chunked body's last trailer field in its header
        list, and the next request on the connection gets it as its first header:
        ``X-Request-ID``, ``Authorization``, ``Origin`` sent as one request's trailers
        were read as the next request's own (``headers.get`` takes the first), and
        behind a load balancer that reuses a connection, the next request may be another
        client's. Messages the old parser made of the bytes after the body are dropped
        and those bytes parsed again. An upload's body read past the parser
        (``bypass_parser``) ends with a new parser too."""
        walk, payload, head = self._extensions, self._last_payload, self._last_head
        if (
            walk is None
            or not walk.trailed
            or not walk.done  # (where the body ended is the walk's: it must agree)
            or not self._walk_ended
            or self._walk_behind
            or payload is None
            or head is None
            or not payload.is_eof()
            or payload.exception() is not None
        ):
            return False
        messages = self._messages
        while len(messages) > queued:
            messages.pop()
        self._parser = self._new_parser()
        self._line = b""  # the next head begins after the body
        if head.should_close:
            self._ignore_rest = True  # its answer closes the connection: nothing after it
            return True
        past = self._chunked_past
        if past > 0:
            self._parse(piece[len(piece) - past :])
        return True

    def data_received(self, data: bytes) -> None:
        self._received(data)
        if self._eof_held:
            self._held_eof()

    def _received(self, data: bytes) -> None:
        if self._widened:
            self._widened = False
            self.transport.max_size = RECV_SIZE  # type: ignore[union-attr]
        if self._chunked_wanted is not None and data and self._bypass is None:
            self._start_chunked()
        if self._bypass is not None and data:
            data = self._feed_bypassed(data)
            if not data:
                return
        if self._ignore_rest:
            return
        queued = len(self._messages)
        self._parse(data)
        parsed = len(self._messages) - queued
        if data and self.requests_open == 0:
            self._head_begun = True
            # A head has begun: from now only the head timer may close the connection.
            # aiohttp's keep-alive timer closes it while no head is complete, counting
            # from the last answer (or the connection's start), so it cut heads that had
            # begun well within --header-timeout. aiohttp arms it again after the answer.
            handle = self._keepalive_handle
            if handle is not None:
                handle.cancel()
                self._keepalive_handle = None
            if self.pool.draining:  # bytes with no request open: the drain looks again
                self.pool.request_done()
        if parsed > 0:  # a head is complete
            self.requests_open += parsed
            self.heads += parsed
            self._cancel_head_timer()
        if self._head_since is not None:
            # A head has begun (also behind a request in the same read, or after its
            # body: those waited for --keepalive-timeout): due --header-timeout after its
            # first byte, or sooner on a new connection (armed at its start).
            self._arm_head_timer(self._head_due())

    def _process_keepalive(self) -> None:
        """aiohttp's keep-alive timer, armed after every answer, closes the connection
        while no head is complete. A head that has begun is the head timer's: due
        --header-timeout after its first byte (README), also when that byte came in the
        read of the request before it, or while that request was open, where nothing
        stopped this timer (with --keepalive-timeout below --header-timeout, such a head
        was cut at the keep-alive timeout; reprobe10b N4)."""
        if self._head_since is not None:
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    def resume_reading(self, resume_parser: bool = True) -> None:
        """aiohttp's StreamReader calls this after every read below its low-water mark,
        paused or not, and aiohttp's resume then parses again (``data_received(b"")``)
        and resumes the transport. Read a piece at a time (a chunked body's HTTP chunks,
        ``form.next_chunk``), that was ~1 us per 1-byte chunk for nothing: only a pause
        of aiohttp's (``pause_reading``) holds bytes to parse. The transport is left as
        it is too: paused otherwise, by ``TransportFlow`` for an upload waiting for
        memory or by aiohttp's message queue, it stays so until they resume it."""
        if self._reading_paused:
            super().resume_reading(resume_parser)
        elif resume_parser and self._parser_holds():
            # A pause aiohttp asked for at a chunk's end is honoured at the next body
            # bytes the parser gets, after the resume that cleared ``_reading_paused``:
            # it then holds them with no pause of its own standing, and only a parse
            # here ends the body (reprobe14a N1: a complete upload never answered, 408).
            self.data_received(b"")

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio: bool | None
        """The client half-closed (``shutdown(SHUT_WR)``, ``nc -N``): keep the transport
        open for writing and answer what it sent.

        aiohttp returns None here, so asyncio closes the transport: the request was
        cancelled unanswered, and a complete upload stored and rolled back. Now every
        complete request is answered; a body still due ends as the parser ends one at
        EOF (``ContentLengthError``, ``TransferEncodingError``: 400 CLIENT_DISCONNECTED,
        the upload rolled back), and that answer is written too (before, the client read
        only an EOF). With no request begun, the EOF ends the connection as before. True
        keeps the socket open for writing only (asyncio stops reading it); the connection
        closes once what was queued is answered."""
        if self._eof:
            return True  # a read resumed by flow control saw the EOF again
        if self.requests_open == 0:
            return False
        self._eof = True
        if self._bypass is None and self._in_body() and self._given_whole():
            # The parser holds the body's end (its reader is full): the body is whole,
            # and ends, with the requests after it, as the handler reads it (it was cut:
            # 400 CLIENT_DISCONNECTED for a complete upload; reprobe14a N1). The EOF
            # ends what follows once it has (``_held_eof``).
            self._eof_held = True
            return True
        self._end_at_eof()
        return True

    def _held_eof(self) -> None:
        """The client's EOF came while the parser held a whole body's end: once it has
        parsed it, the EOF ends what came after (a body still due is cut, a partial head
        dropped), as it would have at once (reprobe15a: a body cut after such a body
        waited out the client timeout)."""
        if not self._parser_holds():  # (data_received tested _eof_held)
            self._eof_held = False
            self._end_at_eof()

    def _end_at_eof(self) -> None:
        """No byte comes after the client's EOF: a body still due ends as the parser ends
        one at EOF, and nothing after the requests is read."""
        payload = self._bypass if self._bypass is not None else self._last_payload
        if self._bypass is not None or self._in_body():
            assert payload is not None
            chunked = self._last_head is not None and self._last_head.chunked
            ended = TransferEncodingError if chunked else ContentLengthError
            self._bypass = self._decoder = None
            self.cut_body = payload
            payload.set_exception(ended(BODY_CUT))
            payload.feed_eof()  # no byte of it will come: aiohttp does not linger on it
        self._ignore_rest = True  # a partial head after the requests is dropped

    def _parse(self, data: bytes) -> None:
        """aiohttp's ``data_received``, given ``data`` a request head at a time.

        llhttp stops at the end of some messages, and aiohttp then loses what came with
        them in the same read: after a request that closes the connection (``Connection:
        close``, or HTTP/1.0 without keep-alive) it raises "Data after `Connection: close`"
        on any further byte, and aiohttp answers that 400 in place of the request (RFC
        9112 section 9.6: answer it, then close, ignoring what follows); after a request
        with an ``Upgrade`` aiohttp does not take (``h2c``, as ``curl --http2`` sends), the
        bytes after it are dropped, so a request pipelined behind it is never answered.
        Cut at each head's end, a head is parsed in a read of its own, nothing comes after
        it in that read, and ``_screen`` decides about what follows. Bodies go on whole
        (an upload's body does not come here at all: ``bypass_parser``)."""
        if self._after_body is not None:
            data = self._held_on(data)
            if not data:
                return
        pos = 0  # (an offset, not a slice per piece: a read of 256 KiB of CRLFs was
        # 131,072 pieces, each a copy of the rest)
        cut = False
        while True:
            in_body = self._in_body()
            end = -1 if in_body else _head_end(data, pos)
            piece = data[pos:] if end < 0 else data[pos:end]
            pos = len(data) if end < 0 else end
            if not in_body and self._head_too_large(piece):
                return
            if in_body and self._over_extensions(piece):
                return
            if in_body and 0 < (past := self._past_body(len(piece))) < len(piece):
                # The body ends inside the piece: the parser gets it up to its end, and
                # the next head a piece of its own, as every head. Given on, the parser
                # read the next head and into its body at once, while that body's walk
                # (``_screen``) began at its start: a chunked body then bypassed took
                # file bytes for framing (reprobe12c F1: 201 with 1,000 of 2,096 bytes
                # stored; file bytes answered as a request).
                pos -= past
                piece = piece[: len(piece) - past]
                self._body_read -= past
                self._chunked_past = 0
                cut = True
            queued = len(self._messages)
            super().data_received(piece)
            if cut and self._in_body():
                if len(self._messages) > queued:
                    # The parser refused the body at its end (a coded stream cut short,
                    # ``codings.checked_feed_eof``: the reader got no EOF): that error
                    # answers it, and nothing after it is read. Taken for a held tail,
                    # what followed waited for good (reprobe16a F1: 408 after 30 s).
                    self._screen(queued)
                    return
                # The parser holds the body's tail (its reader is full) and ends it on
                # resume: what follows waits for that, so the parser never reads it with
                # the body (``_held_on``).
                self._after_body = [data[pos:]]
                return
            cut = False
            if in_body and self._trailers_ended(piece, queued):
                if pos >= len(data) or self._ignore_rest:
                    return
                continue
            if len(self._messages) == queued:
                if in_body:
                    # A body's end and the next head's first bytes may share a piece.
                    if not self._in_body():
                        self._line = None
                        if (past := self._past_body(len(piece))) > 0:
                            self._head_came()
                            if self._head_too_large(piece[len(piece) - past :]):
                                return
                        elif (walk := self._extensions) is not None and walk.trailed:
                            # Ended from the tail the parser held (its reader was full),
                            # with trailers: the next head, in a later read, goes to a new
                            # parser, or it gets the last trailer (reprobe13b N1).
                            self._parser = self._new_parser()
                elif piece:  # (resume_reading calls data_received with no bytes)
                    self._head_came()
                    if self._judge_line(piece):
                        return
            else:
                seen = piece if self._line is None else self._line + piece
                self._line = b""  # a head ended: the next one begins after it (or its body)
                self._head_since = None
                self._head_size = 0
                refused = self._messages[-1][0]
                if isinstance(refused, web_protocol._ErrInfo):
                    better = better_refusal(refused.exc, seen)
                    if better is not None:
                        self._messages[-1] = (_error_info(better), EMPTY_PAYLOAD)
                    self._error_tus = _TUS_TARGET.match(piece) is not None
                    self._error_rid = given_request_id(_raw_header(seen, _REQUEST_ID_HEADER))
                    if self.cors is not None:
                        self._error_origin = _raw_header(piece, _ORIGIN)
                self._walk_behind = in_body
                self._screen(queued)
            if pos >= len(data) or self._ignore_rest or self._force_close or self._close:
                return

    def _held_on(self, data: bytes) -> bytes:
        """The bytes after a body the parser had not ended (``_after_body``), with ``data``,
        once it has: b"" while it has not. Given to the parser with the body's held tail,
        they were parsed by it before it ended the body: a pipelined request then got the
        body's last trailer as its first header (reprobe13b N1). The parser parses its tail
        again now (aiohttp's resume does so too); if it ends the body, what follows goes to
        a new parser where the body had trailers, and nowhere after a request that closes
        the connection."""
        held = self._after_body
        assert held is not None
        if data:
            held.append(data)  # (joined once the body has ended: a copy per read was quadratic)
        queued = len(self._messages)
        super().data_received(b"")
        if len(self._messages) > queued:
            # It refused the body at the held end (a coded stream cut short): as in
            # ``_parse``, that error answers it and nothing after it is read.
            self._after_body = None
            self._screen(queued)
            return b""
        if self._in_body():
            return b""
        self._after_body = None
        head, walk = self._last_head, self._extensions
        if head is not None and head.should_close:
            self._ignore_rest = True
            return b""
        if walk is not None and walk.trailed:
            self._parser = self._new_parser()
            self._line = b""
        return held[0] if len(held) == 1 else b"".join(held)

    def _head_came(self) -> None:
        """Bytes of a request head not complete yet came: --header-timeout counts from
        the first of them (``_head_since``)."""
        if self._head_since is None:
            self._head_since = self._loop.time()

    def _past_body(self, size: int) -> int:
        """How many of the last ``size`` bytes given to the parser, in which the newest
        request's body ended, came after that end (the next head's first bytes)."""
        head = self._last_head
        if head is None:
            return 0
        if head.chunked:
            return self._chunked_past
        length = self._body_length
        if length is None:
            return 0
        return min(size, max(0, self._body_read - length))

    def _head_too_large(self, piece: bytes) -> bool:
        """Count ``piece``, more bytes of the head being read; past ``MAX_HEAD_SIZE`` in
        all, refuse it (True): 431 before the parser has them, whatever reads they came
        in, and nothing after it is read. Empty lines before a head are not counted: the
        parser skips them, holding nothing (a run of them is --header-timeout's)."""
        if self._head_size == 0 and piece[:1] in (b"\r", b"\n"):
            piece = piece.lstrip(b"\r\n")
        self._head_size += len(piece)
        if self._head_size <= MAX_HEAD_SIZE:
            return False
        refusal = HeadTooLarge(
            f"the request head (its request line and headers) is over "
            f"{MAX_HEAD_SIZE // 1024} KiB in all"
        )
        self._refuse_head(refusal)
        return True

    def _refuse_head(self, refusal: HttpProcessingError) -> None:
        """Answer ``refusal`` in place of the head being read, after the requests before
        it, and read nothing more (as aiohttp queues a parse failure)."""
        self._messages.append((_error_info(refusal), EMPTY_PAYLOAD))
        self._ignore_rest = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _judge_line(self, piece: bytes) -> bool:
        """Refuse the head being read on its request line alone, as soon as that line has
        come (True), when its version is refused or it is HTTP/2's preface line
        (``line_refusal``).

        llhttp judges most request lines as they come (a bad method or version, a line
        over ``MAX_LINE_SIZE``), but not those of HTTP/0.9 (``GET /path``, no version,
        all an HTTP/0.9 client sends: it waits for no headers), ``HTTP/2.0``, which
        it parses as a version, and the preface's ``PRI * HTTP/2.0`` (refused only with
        the preface's ``SM`` line): those were refused only at the blank line that ends
        a head, and HTTP/0.9's never comes, so its client waited out --header-timeout for
        nothing. Now they are answered at once, before their headers (if any come)."""
        if self._line is None:
            return False
        # Empty lines before it are skipped (the parser skips them too): 5000 CRLFs and
        # then a line were past the limit below, and never judged.
        self._line = (self._line + piece).lstrip(b"\r\n")
        line = first_line(self._line)
        if line is None:
            if len(self._line) > MAX_LINE_SIZE + 2:
                self._line = None  # llhttp refuses it (LineTooLong): nothing to keep
            return False
        self._line = None
        refusal = line_refusal(line)
        if refusal is None:
            return False
        self._error_tus = _TUS_TARGET.match(line) is not None
        self._refuse_head(refusal)
        return True

    def body_seen(self, payload: StreamReader) -> tuple[int, ChunkExtensions | None] | None:
        """What the connection read of ``payload``'s body as sent (chunk framing and
        codings on): its bytes, and a chunked body's framing followed over them (None
        when not chunked); None unless ``payload`` is the newest request's body.

        Every byte read is counted and followed as it is given to the parser, including
        those aiohttp's parser holds unparsed (its tail, while a coded body's reader is
        full). A Content-Length body read past the parser (``bypass_parser``) is not
        counted; a chunked one is, and its walk is the decoder's."""
        if payload is not self._last_payload:
            return None
        if self._decoder is not None:
            return self._body_read, self._decoder.walk()
        return self._body_read, self._extensions

    def _over_extensions(self, piece: bytes) -> bool:
        """Count the chunk extensions in ``piece`` of the newest request's chunked body;
        past ``MAX_CHUNK_EXTENSIONS``, or its trailer section past ``MAX_TRAILERS``, that
        body breaks as on a bad chunk size (True).
        (Any body's ``piece`` is counted for ``body_seen`` too.)"""
        self._body_read += len(piece)
        self._walk_ended = False
        scan = self._extensions
        if scan is None or scan.done:
            return False
        stop, _ = scan.follow(piece)
        self._walk_ended = scan.done
        self._chunked_past = len(piece) - stop if scan.done else 0
        if scan.total > MAX_CHUNK_EXTENSIONS:
            exc = over_extensions()
        elif scan.trailers > MAX_TRAILERS:
            exc = over_trailers()
        else:
            return False
        self._extensions = None
        self._messages.append((_error_info(exc), EMPTY_PAYLOAD))
        self._body_broke(len(self._messages) - 1)
        return True

    def _in_body(self) -> bool:
        """Is the parser inside the newest request's body (its next bytes are body)?"""
        payload = self._last_payload
        return payload is not None and not payload.is_eof()

    def _given_whole(self) -> bool:
        """The parser was given the newest body's last byte (it may not have parsed it)."""
        walk = self._extensions
        if walk is not None:
            return walk.done
        length = self._body_length
        return length is not None and self._body_read >= length

    def _parser_holds(self) -> bool:
        """aiohttp's parser holds bytes of the newest body it was given, unparsed (its
        tail, kept while the body's reader is full), as the body's walk tells: data not
        passed on, or the body's end. Only a later parse hands them on. (A coded body's
        walk counts coded bytes and its reader decoded ones: a needless parse at worst;
        its held end shows in ``_given_whole``, and it is never read past the parser.)"""
        payload = self._last_payload
        if payload is None or payload.is_eof() or self._bypass is not None:
            return False
        walk = self._extensions
        if walk is not None and walk.data > payload.total_bytes:
            return True
        return self._given_whole()

    def _screen(self, first: int) -> None:
        """Look at the heads queued from ``first`` on, for framing llhttp accepts and
        HTTP/1.1 does not.

        RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing
        (a 1.0 intermediary may not know chunked), and the server must close after it.
        llhttp decodes it as chunked: here it is answered 400 before a handler runs, and
        nothing after it on the connection is read."""
        messages = self._messages
        for i in range(first, len(messages)):
            message, payload = messages[i]
            if isinstance(message, web_protocol._ErrInfo):
                last = self._last_head
                if last is not None and last.should_close and _after_close(message.exc):
                    # Bytes after a request that closes the connection: not a request.
                    del messages[i]
                    self._ignore_rest = True
                    return
                if self._in_body():
                    self._body_broke(i)
                    return
                # A head that cannot be parsed: answered after the requests before it,
                # then the connection closes (handle_error); the parser can go no further.
                self._ignore_rest = True
                return
            exc: BadHttpMessage | None = version_refusal(tuple(message.version))  # type: ignore[arg-type]
            if exc is None and (
                message.version == HttpVersion10 and hdrs.TRANSFER_ENCODING in message.headers
            ):
                exc = BadHttpMessage("Transfer-Encoding in an HTTP/1.0 request is faulty framing")
            if exc is not None:
                self._error_from(message)
                messages[i] = (_error_info(exc), EMPTY_PAYLOAD)
                while len(messages) > i + 1:
                    messages.pop()
                self._ignore_rest = True
                return
            if message.upgrade and not payload.is_eof() and not _taken_upgrade(message):
                # llhttp stops at the end of this body for the Upgrade, and aiohttp drops
                # what follows it in that read, which cannot be cut out here (the body's
                # end is the parser's to find): close after the answer, so the client
                # sends again what was dropped, rather than waiting on it.
                message = message._replace(should_close=True)
                messages[i] = (message, payload)
            self._last_head, self._last_payload = message, payload
            chunked = message.chunked and not payload.is_eof()
            self._extensions = ChunkExtensions() if chunked else None
            self._body_read = self._chunked_past = 0
            self._body_length = None if message.chunked else content_length(message)
            if message.should_close and payload.is_eof():
                # Its answer closes the connection: what follows is not read (RFC 9112
                # section 9.6). A body still due comes first; bytes after it raise
                # "Data after `Connection: close`", dropped above.
                self._ignore_rest = True
                return

    def _error_from(self, head: RawRequestMessage) -> None:
        """What the error answer in place of ``head`` takes from it (handle_error): its
        Origin, whether it was a tus request, its X-Request-ID."""
        self._error_origin = head.headers.get(hdrs.ORIGIN)
        self._error_tus = head.path.startswith(TUS_ROOT)
        self._error_rid = given_request_id(head.headers.get("X-Request-ID"))

    def _body_broke(self, i: int) -> None:
        """The parse error queued at ``i`` is in the newest request's body (a bad chunk
        size): aiohttp's C parser raises it out of feed_data, and data_received queues it
        as a new message, behind a request whose body then never ends.

        A request not yet handled is answered as that error in its place; a body being
        read fails, so its handler stops and ``error_middleware`` answers
        ``BAD_HTTP_REQUEST``. Either way nothing after it is parsed."""
        messages, payload = self._messages, self._last_payload
        assert payload is not None
        error = messages[i]
        while len(messages) > i:
            messages.pop()
        self._ignore_rest = True
        for j, (_, queued) in enumerate(messages):
            if queued is payload:
                head = messages[j][0]
                if isinstance(head, RawRequestMessage):
                    self._error_from(head)
                messages[j] = error
                while len(messages) > j + 1:
                    messages.pop()
                return
        exc = error[0].exc  # type: ignore[union-attr]
        reason = safe_reason(exc) if isinstance(exc, HttpProcessingError) else ""
        failure = RequestPayloadError(f"malformed body: {reason}")
        failure.__cause__ = exc  # StreamReader sets it only on a waiting read
        payload.set_exception(failure)
        # No byte of this body will come: at EOF, aiohttp does not linger to drain it.
        payload.feed_eof()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp reads the rest of an answered request's body to drain the connection
        (its lingering close), and logs what that read raises as "Unhandled exception"
        with a traceback. A body that breaks there (Content-Encoding gzip, and not gzip;
        the answer already went, perhaps a refusal before the body was read) is the
        client's fault: one line. aiohttp closes the connection either way. Its
        traceback goes too, as ``error_middleware`` drops an answered error's: it holds
        aiohttp's connection frame, which holds the body's reader, which holds the error
        (a cycle only the cyclic GC frees, with the reader's decoder in it)."""
        exc = kw.get("exc_info")
        if isinstance(exc, RequestPayloadError):
            log.info("http.bad_body_unread error=%s", " ".join(str(exc).split()))
            forget_tracebacks(exc)
            return
        super().log_exception(*args, **kw)


def drop_unread(body: StreamReader) -> None:
    """Empty a broken body's reader. No read returns its bytes (each raises the body's
    error first), but the reader lives on in aiohttp's reference cycles (the connection,
    its handler's task) until the cyclic GC runs, and its bytes with it: up to its
    high-water mark of decoded bytes per request refused for its coding (reprobe18a F1:
    400 such gzip uploads grew the proxy by 0.28 MB each, never given back)."""
    buffer = getattr(body, "_buffer", None)
    if buffer:
        buffer.clear()
        body._size = 0


class ProxyServer(web.Server):
    """aiohttp's low-level server, making ProxyRequestHandler connections."""

    def __init__(
        self, *args: Any, pool: Connections, cors: Cors | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pool = pool
        self.cors = cors

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


def private_api_problems() -> list[str]:
    """The aiohttp internals this module needs that are missing (empty: all there)."""
    problems = []
    if not callable(getattr(web.Application, "_make_handler", None)):
        problems.append("Application._make_handler")
    for name in (
        "handle_error",
        "finish_response",
        "data_received",
        "eof_received",
        "log_access",
        "log_exception",
        "_process_keepalive",
    ):
        if not callable(getattr(RequestHandler, name, None)):
            problems.append(f"RequestHandler.{name}")
    slots = (*getattr(RequestHandler, "__slots__", ()), *getattr(BaseProtocol, "__slots__", ()))
    for name in (
        "_current_request",
        "_messages",
        "_waiter",
        "_parser",
        "_read_bufsize",
        "_force_close",
        "_close",
        "_keepalive_handle",
        "_reading_paused",
    ):
        if name not in slots:
            problems.append(f"RequestHandler.{name}")
    for name in ("_ErrInfo", "MAX_MSG_QUEUE_SIZE", "ERROR"):
        if not hasattr(web_protocol, name):
            problems.append(f"web_protocol.{name}")
    for name in ("_message", "_version"):
        if name not in web.BaseRequest.ATTRS:
            problems.append(f"BaseRequest.{name}")
    return problems


def install(app: web.Application, pool: Connections, cors: Cors | None = None) -> None:
    """Make every server aiohttp builds for ``app`` use ProxyRequestHandler, under ``pool``;
    its own answers carry ``cors``'s headers, as the app's do."""
    if not install_end_check():
        log.warning(
            "http.hook_unavailable missing=%s: a gzip body cut short is not refused",
            ",".join(end_check_problems()),
        )
    problems = private_api_problems()
    if problems:
        log.warning(
            "http.hook_unavailable missing=%s: malformed requests get aiohttp's own answers",
            ",".join(problems),
        )
        return
    make_handler = app._make_handler

    def make_proxy_server(**kwargs: Any) -> web.Server:
        server = make_handler(**kwargs)
        return ProxyServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            pool=pool,
            cors=cors,
            **server._kwargs,
        )

    app._make_handler = make_proxy_server  # type: ignore[method-assign]
