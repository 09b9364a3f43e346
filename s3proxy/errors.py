"""The one list of errors a client can see, and the one place they become HTTP responses.

Exception tree::

    ProxyError            every error a client is told about: stable code, HTTP status, message
      kind.status 4xx     the client's fault (bad input, limits, disconnects)
      kind.status 5xx     upstream S3 faults (502/503/504) or shutdown; INTERNAL for bugs

Handlers raise ``ProxyError(KIND, "message")``; ``error_middleware`` renders it as
``{"error": {"code": ..., "message": ...}}``. Anything else that escapes a handler is
logged with its traceback and rendered as INTERNAL without one. What never reaches a
middleware (a request aiohttp cannot parse, an error in an expect handler) is
rendered the same way by ``protocol.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    ContentEncodingError,
    ContentLengthError,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestPayloadError

from s3proxy.log import RateLimit

log = logging.getLogger("s3proxy.errors")


@dataclass(frozen=True)
class ErrorKind:
    """A stable error code with its HTTP status; the code is part of the API."""

    code: str
    status: int


# 400
INVALID_REQUEST = ErrorKind("INVALID_REQUEST", 400)
BAD_HTTP_REQUEST = ErrorKind("BAD_HTTP_REQUEST", 400)  # not parseable HTTP/1.1 (protocol.py)
MALFORMED_MULTIPART = ErrorKind("MALFORMED_MULTIPART", 400)
NO_FILE = ErrorKind("NO_FILE", 400)
INVALID_FIELD = ErrorKind("INVALID_FIELD", 400)
CLIENT_DISCONNECTED = ErrorKind("CLIENT_DISCONNECTED", 400)
INVALID_DIGEST = ErrorKind("INVALID_DIGEST", 400)  # a Content-Digest/-MD5 that cannot be read
DIGEST_MISMATCH = ErrorKind("DIGEST_MISMATCH", 400)  # the bytes are not what the client declared
# 401 / 403
AUTH_REQUIRED = ErrorKind("AUTH_REQUIRED", 401)
INVALID_CREDENTIALS = ErrorKind("INVALID_CREDENTIALS", 401)
TOKEN_EXPIRED = ErrorKind("TOKEN_EXPIRED", 401)
TOKEN_SCOPE = ErrorKind("TOKEN_SCOPE", 403)
KEY_FORBIDDEN = ErrorKind("KEY_FORBIDDEN", 403)
ORIGIN_NOT_ALLOWED = ErrorKind("ORIGIN_NOT_ALLOWED", 403)  # a CORS preflight from elsewhere
# 404 / 405 from routing
NOT_FOUND = ErrorKind("NOT_FOUND", 404)
METHOD_NOT_ALLOWED = ErrorKind("METHOD_NOT_ALLOWED", 405)
NO_SUCH_KEY = ErrorKind("NO_SUCH_KEY", 404)
NO_SUCH_UPLOAD = ErrorKind("NO_SUCH_UPLOAD", 404)  # a multipart upload id S3 does not know
# 408
CLIENT_TIMEOUT = ErrorKind("CLIENT_TIMEOUT", 408)
# 409: an object is already stored at the key and --no-overwrite is on
KEY_EXISTS = ErrorKind("KEY_EXISTS", 409)
# 409: another presigned complete of the upload is deciding (s3proxy.presign_claim)
COMPLETE_IN_PROGRESS = ErrorKind("COMPLETE_IN_PROGRESS", 409)
# tus (s3proxy.tus): the protocol's own statuses
OFFSET_MISMATCH = ErrorKind("OFFSET_MISMATCH", 409)  # Upload-Offset is not the stored offset
UPLOAD_EXPIRED = ErrorKind("UPLOAD_EXPIRED", 410)  # a tus upload URL past its Upload-Expires
# A DELETE of a finished tus upload: its object is kept (a URL never deletes a stored file);
# 403 as tus answers a PATCH to a finished (final) upload, and clients do not retry it.
UPLOAD_COMPLETE = ErrorKind("UPLOAD_COMPLETE", 403)
# A tus header of an extension not served (Upload-Concat...): ignored, it would change what
# is stored; 400 as tus answers a checksum algorithm the server lacks.
UNSUPPORTED_EXTENSION = ErrorKind("UNSUPPORTED_EXTENSION", 400)
UNSUPPORTED_VERSION = ErrorKind("UNSUPPORTED_VERSION", 412)  # Tus-Resumable other than 1.0.0
NOT_OFFSET_STREAM = ErrorKind("NOT_OFFSET_STREAM", 415)  # a PATCH not application/offset+...
UPLOAD_LOCKED = ErrorKind("UPLOAD_LOCKED", 423)  # another PATCH holds the upload
CHECKSUM_MISMATCH = ErrorKind("CHECKSUM_MISMATCH", 460)  # a PATCH's bytes against Upload-Checksum
# 411 / 413
FILE_TOO_LARGE = ErrorKind("FILE_TOO_LARGE", 413)
TOO_MANY_FILES = ErrorKind("TOO_MANY_FILES", 413)
TOO_MANY_FIELDS = ErrorKind("TOO_MANY_FIELDS", 413)
FIELD_TOO_LARGE = ErrorKind("FIELD_TOO_LARGE", 413)
REQUEST_TOO_LARGE = ErrorKind("REQUEST_TOO_LARGE", 413)
METADATA_TOO_LARGE = ErrorKind("METADATA_TOO_LARGE", 413)
# 412 / 416
PRECONDITION_FAILED = ErrorKind("PRECONDITION_FAILED", 412)
RANGE_NOT_SATISFIABLE = ErrorKind("RANGE_NOT_SATISFIABLE", 416)
# 414 / 431: a request line or header section over aiohttp's limits (protocol.py)
URI_TOO_LONG = ErrorKind("URI_TOO_LONG", 414)
HEADERS_TOO_LARGE = ErrorKind("HEADERS_TOO_LARGE", 431)
# 415
NOT_MULTIPART = ErrorKind("NOT_MULTIPART", 415)
TYPE_NOT_ALLOWED = ErrorKind("TYPE_NOT_ALLOWED", 415)
UNSUPPORTED_ENCODING = ErrorKind("UNSUPPORTED_ENCODING", 415)  # a Content-Encoding not decoded
# 417
EXPECTATION_FAILED = ErrorKind("EXPECTATION_FAILED", 417)
# 5xx
INTERNAL = ErrorKind("INTERNAL", 500)
UNSUPPORTED_TRANSFER_CODING = ErrorKind("UNSUPPORTED_TRANSFER_CODING", 501)  # not chunked
UPSTREAM_ERROR = ErrorKind("UPSTREAM_ERROR", 502)
UPSTREAM_CORRUPTION = ErrorKind("UPSTREAM_CORRUPTION", 502)  # S3 refused bytes as corrupted
WEBHOOK_FAILED = ErrorKind("WEBHOOK_FAILED", 502)
UPSTREAM_UNAVAILABLE = ErrorKind("UPSTREAM_UNAVAILABLE", 503)
SHUTTING_DOWN = ErrorKind("SHUTTING_DOWN", 503)
OVERLOADED = ErrorKind("OVERLOADED", 503)  # past --max-connections (protocol.py)
UPSTREAM_TIMEOUT = ErrorKind("UPSTREAM_TIMEOUT", 504)
# a request line's major version other than 1 (RFC 9110 section 15.6.6; protocol.py)
HTTP_VERSION_NOT_SUPPORTED = ErrorKind("HTTP_VERSION_NOT_SUPPORTED", 505)

_BY_STATUS = {
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    413: REQUEST_TOO_LARGE,
    417: EXPECTATION_FAILED,
}


class ProxyError(Exception):
    """An error with a stable code and HTTP status, safe to show to the client."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"ProxyError({self.kind.code}, {self.message!r})"


# The most of a client's own text (a field name, a header's value) an error message
# quotes back: enough to find it, never the client's bytes by the kilobyte.
QUOTED_LIMIT = 64


def quoted(text: str, limit: int = QUOTED_LIMIT) -> str:
    """``text`` as an error message quotes it: repr'd (so control characters show as
    escapes), cut to ``limit`` characters with a trailing "..." when longer."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + "..."


def error_body(kind: ErrorKind, message: str) -> dict[str, Any]:
    return {"error": {"code": kind.code, "message": message}}


# aiohttp's ContentEncodingError says either "no decoder" (br, zstd without their
# packages: "Can not decode content-encoding: brotli (br). Please install ...") or "these
# bytes are not data of a coding it decodes" ("...: gzip", or just "deflate" at the end).
DECODED_CODINGS = ("gzip", "deflate")  # what aiohttp decodes (codings.py's policy too)
_DECODE_PREFIX = "Can not decode content-encoding: "


def undecodable_coding(exc: BaseException | None) -> str | None:
    """The coding (gzip, deflate) whose data in the body was not valid, if that is what
    ``exc`` or one of its causes says; None otherwise (a missing decoder included)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ContentEncodingError):
            name = str(exc.message).removeprefix(_DECODE_PREFIX).strip().lower()
            return name if name in DECODED_CODINGS else None
        exc, seen = exc.__cause__, seen + 1
    return None


class FramingLimit(BadHttpMessage):
    """A request's framing past a limit of the proxy's own (chunk extensions): raised as
    the parser's errors are, answered ``BAD_HTTP_REQUEST`` with its message, which is
    ours and holds none of the client's bytes."""


class HeadTooLarge(BadHttpMessage):
    """A request head over the proxy's limit in all (``protocol.MAX_HEAD_SIZE``), each of
    its lines within aiohttp's: answered 431 ``HEADERS_TOO_LARGE`` with its message,
    which is ours."""


class VersionNotSupported(BadHttpMessage):
    """A request line whose HTTP major version is not 1 (``HTTP/2.0`` over HTTP/1.1
    framing, ``HTTP/3.1``, an HTTP/0.9 line without a version): answered 505
    ``HTTP_VERSION_NOT_SUPPORTED`` with its message, which is ours."""


def framing_limit(exc: BaseException | None) -> FramingLimit | None:
    """The FramingLimit ``exc`` is or was caused by, if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, FramingLimit):
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


class TooManyMembers(ValueError):
    """A coded body of too many small members (``codings.too_many_members``): raised in
    aiohttp's decoder, which turns it into a ContentEncodingError with this as its
    context; the answer gives this message."""


def bad_coding_message(coding: str, exc: BaseException | None = None) -> str:
    """What a 400 for an undecodable body says: why, when ``exc`` was caused by a rule of
    the proxy's own (``TooManyMembers``)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, TooManyMembers):
            return str(exc)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return f"the request body is not valid {coding} data (its Content-Encoding)"


# An upstream failure that ends a request is a WARNING naming the S3 call and S3's code
# (the client's JSON has them, the log did not: an outage was invisible at
# --log-level warning). Once per UPSTREAM_LOG_INTERVAL per (operation, code), with how
# many it stands for: a store that fails every call must not flood the log.
UPSTREAM_KINDS = frozenset(
    {UPSTREAM_ERROR, UPSTREAM_CORRUPTION, UPSTREAM_UNAVAILABLE, UPSTREAM_TIMEOUT}
)
UPSTREAM_LOG_INTERVAL = 10.0
_MAX_LIMITS = 256  # (operation, code) pairs are few; past this, start counting afresh
_upstream_limits: dict[tuple[str, str], RateLimit] = {}


def upstream_cause(err: BaseException) -> tuple[str, str]:
    """(S3 operation, S3's error code) of the S3 call that caused ``err``, found on it or
    its causes (an ``s3.S3Error`` carries ``operation`` and ``reason``); else ("-", its code)."""
    exc: BaseException | None = err
    for _ in range(8):
        if exc is None:
            break
        operation, reason = getattr(exc, "operation", None), getattr(exc, "reason", None)
        if isinstance(operation, str) and isinstance(reason, str):
            return operation, reason
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    code = err.kind.code if isinstance(err, ProxyError) else type(err).__name__
    return "-", code


def log_upstream_failure(err: ProxyError) -> None:
    """Log an upstream error that ends a request (rate-limited per operation and code)."""
    if err.kind not in UPSTREAM_KINDS:
        return
    operation, code = upstream_cause(err)
    if len(_upstream_limits) >= _MAX_LIMITS:
        _upstream_limits.clear()
    limit = _upstream_limits.setdefault((operation, code), RateLimit(UPSTREAM_LOG_INTERVAL))
    times = limit.hit()
    if times is not None:
        log.warning(
            "request.upstream_failed operation=%s code=%s error=%s status=%d times=%d",
            operation,
            code,
            err.kind.code,
            err.kind.status,
            times,
        )


def error_response(err: ProxyError) -> web.Response:
    """Render an error as JSON; close the connection when the body was not fully read.

    Every ProxyError a client is answered with passes here (the middleware, tus, the
    expect handlers), so an upstream one is logged here too."""
    log_upstream_failure(err)
    resp = web.json_response(error_body(err.kind, err.message), status=err.kind.status)
    if err.kind.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="s3proxy"'
    if err.kind.status in (400, 401, 403, 408, 409, 413, 414, 415, 431, 501):
        # The rest of the body may still be on the wire; do not try to parse it
        # as the next request.
        resp.force_close()
    return resp


def http_exception_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's HTTPException (a text/plain page) as our JSON, with its reason, never its
    text (aiohttp puts client input there, e.g. "Unknown Expect: <value>")."""
    kind = _BY_STATUS.get(exc.status, ErrorKind(exc.reason.upper().replace(" ", "_"), exc.status))
    resp = web.json_response(error_body(kind, exc.reason), status=exc.status)
    for name in ("Allow",):
        if name in exc.headers:
            resp.headers[name] = exc.headers[name]
    return resp


def forget_tracebacks(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and of the errors it chains (cause, context).

    A request's failure is often kept by what it failed on: aiohttp's StreamReader keeps
    the body's error (``set_exception``) and raises that same object in the handler,
    whose traceback then holds the handler's frames, which hold the request and so the
    reader: a reference cycle that only the cyclic GC frees, with the request's decoder,
    its buffered body and the frames' locals in it. Once the error is answered (and
    logged) nothing reads its traceback, and without it refcounts free all that at once.
    (Measured: 150 gzip uploads refused 400 mid-body grew the proxy by 332 kB each.)"""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        err.__traceback__ = None
        todo += [err.__cause__, err.__context__]


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every exception escaping a handler into a JSON error response."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except Exception as exc:
        try:
            return _answer(request, exc)
        finally:
            forget_tracebacks(exc)


def _answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The response to a handler's failure (logged where it is not the client's)."""
    if isinstance(exc, ProxyError):
        return error_response(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return http_exception_response(exc)
    if isinstance(exc, RequestPayloadError):
        # The body's framing broke mid-read (a bad chunk size, see protocol.py): the
        # client's fault, one line, and the message is ours, not the client's bytes.
        log.info("request.bad_body path=%s error=%s", request.path, " ".join(str(exc).split()))
        coding = undecodable_coding(exc)
        limit = framing_limit(exc)
        if coding is not None:
            message = bad_coding_message(coding, exc)
        elif limit is not None:
            message = str(limit.message)
        else:
            message = "the request body is not valid HTTP/1.1 framing"
        return error_response(ProxyError(BAD_HTTP_REQUEST, message))
    if isinstance(exc, ContentLengthError | TransferEncodingError):
        # The body ended before its length or its last chunk: the client half-closed
        # (protocol.eof_received), and is still there to read this.
        log.info("request.body_cut path=%s error=%s", request.path, " ".join(str(exc).split()))
        return error_response(
            ProxyError(
                CLIENT_DISCONNECTED, "the client closed the connection before the body was complete"
            )
        )
    if isinstance(exc, ConnectionResetError):
        transport = request.transport
        if transport is None or transport.is_closing():
            log.info("request.client_gone path=%s", request.path)
            return error_response(
                ProxyError(CLIENT_DISCONNECTED, "the client closed the connection")
            )
    log.error("request.failed path=%s", request.path, exc_info=exc)
    return error_response(ProxyError(INTERNAL, "internal error; see the proxy's log"))
