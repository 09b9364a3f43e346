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
  ``MAX_LINE_SIZE``; ``HEADERS_TOO_LARGE`` 431 for a header over ``MAX_FIELD_SIZE``
  or too many headers), with a request id, ``Connection: close``, and one INFO line
  in the log; neither the answer nor the log line holds the client's bytes;
- a framing error inside a body being read fails that body's stream with
  ``RequestPayloadError``, so the handler stops and ``error_middleware`` answers
  ``BAD_HTTP_REQUEST``;
- an ``HTTPException`` or other exception escaping the app outside the middlewares
  (aiohttp's default expect handler, a bug in an expect handler) is JSON too.

aiohttp has no public hook for any of this (aio-libs/aiohttp#3287), so this module
is the one place the proxy leans on its internals, listed in
``private_api_problems()``, which a test asserts finds nothing missing:

- ``Application._make_handler``, wrapped per app by ``install()`` so that every
  server aiohttp builds for the app (``AppRunner`` in the CLI, ``TestServer`` in the
  tests, ``web.run_app``) makes ``ProxyRequestHandler`` connections;
- ``Server._loop`` and ``Server._kwargs``, to build the handler as ``Server`` does;
- ``RequestHandler.handle_error`` and ``finish_response`` (public names, not documented),
  and ``_current_request``, ``_messages`` and ``web_protocol._ErrInfo`` for the
  body-phase error.

If any is gone, ``install()`` logs a warning and leaves aiohttp's behaviour as it is
(the proxy still runs); tests/test_http_errors.py fails.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from s3proxy.errors import (
    BAD_HTTP_REQUEST,
    HEADERS_TOO_LARGE,
    INTERNAL,
    UPSTREAM_TIMEOUT,
    URI_TOO_LONG,
    ErrorKind,
    error_body,
    http_exception_response,
)
from s3proxy.log import REQUEST_ID

log = logging.getLogger("s3proxy.protocol")

# aiohttp raises the same LineTooLong for a request target and for a header, with the
# limit it hit as args[1]; distinct limits are how 414 is told from 431. The target
# may be 8 KiB (nginx's default large_client_header_buffers); a header line keeps
# aiohttp's default. Both go to the server as handler_args (HANDLER_ARGS).
MAX_LINE_SIZE = 8192
MAX_FIELD_SIZE = 8190
HANDLER_ARGS: dict[str, Any] = {"max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE}
# aiohttp's message for more than max_headers (128) header lines.
_TOO_MANY_HEADERS = "Too many headers received"


def error_kind(exc: HttpProcessingError) -> ErrorKind:
    """The error a parser failure is answered with."""
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
    ("Invalid header token:\\n\\n  b'...'"): the first line, cut at the first quote."""
    if isinstance(exc, LineTooLong):
        return "line too long"
    text = str(exc.message).split("\n", 1)[0]
    cut = min((i for i in (text.find(q) for q in ("'", '"', "bytearray(")) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    text = "".join(c for c in text if c.isascii() and c.isprintable())
    return text.strip().rstrip(":").strip()[:100] or type(exc).__name__


_MESSAGES = {
    BAD_HTTP_REQUEST: "the request is not valid HTTP/1.1",
    URI_TOO_LONG: f"the request target is longer than {MAX_LINE_SIZE} bytes",
    HEADERS_TOO_LARGE: (
        f"a request header is longer than {MAX_FIELD_SIZE} bytes, or there are too many"
    ),
}


class ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what it refuses as the proxy does."""

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
        rid = uuid.uuid4().hex
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
            text = f"{_MESSAGES[kind]} ({reason})"
        elif status == 504:  # asyncio.TimeoutError outside the middlewares
            kind, text = UPSTREAM_TIMEOUT, "timed out"
            log.warning("request.timed_out path=%s", request.path)
        else:
            kind, text = INTERNAL, "internal error; see the proxy's log"
            log.error("request.failed path=%s", request.path, exc_info=exc)
        resp = web.json_response(error_body(kind, text), status=kind.status)
        resp.headers["X-Request-ID"] = rid
        resp.force_close()
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
        return await super().finish_response(request, resp, start_time)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # aiohttp's C parser raises a framing error in a body (a bad chunk size) out of
        # feed_data, and data_received queues it as a new message behind the request
        # being handled, whose body then never ends. Fail that body instead.
        request = self._current_request
        if request is None or not self._messages:
            return
        message = self._messages[-1][0]
        if not isinstance(message, web_protocol._ErrInfo):
            return
        body = request.content
        if body.is_eof() or body.exception() is not None:
            return  # the error belongs to a pipelined request after this one
        reason = safe_reason(message.exc) if isinstance(message.exc, HttpProcessingError) else ""
        body.set_exception(RequestPayloadError(f"malformed body: {reason}"))
        # No byte of this body will come: at EOF, aiohttp does not linger to drain it.
        body.feed_eof()


class ProxyServer(web.Server):
    """aiohttp's low-level server, making ProxyRequestHandler connections."""

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


def private_api_problems() -> list[str]:
    """The aiohttp internals this module needs that are missing (empty: all there)."""
    problems = []
    if not callable(getattr(web.Application, "_make_handler", None)):
        problems.append("Application._make_handler")
    for name in ("handle_error", "finish_response", "data_received"):
        if not callable(getattr(RequestHandler, name, None)):
            problems.append(f"RequestHandler.{name}")
    slots = getattr(RequestHandler, "__slots__", ())
    for name in ("_current_request", "_messages"):
        if name not in slots:
            problems.append(f"RequestHandler.{name}")
    if not hasattr(web_protocol, "_ErrInfo"):
        problems.append("web_protocol._ErrInfo")
    return problems


def install(app: web.Application) -> None:
    """Make every server aiohttp builds for ``app`` use ProxyRequestHandler."""
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
            **server._kwargs,
        )

    app._make_handler = make_proxy_server  # type: ignore[method-assign]
