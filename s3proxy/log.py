"""Logging: events as ``name key=value`` lines (or JSON), each carrying the request id.

The request id lives in a ContextVar set by the request-id middleware, so every line
logged while a request is handled (pipeline events, S3 errors, the access log) carries
it without being passed around.

No credential reaches the log: both formats pass every line (message and traceback)
through ``redact``, which masks query parameters that carry one (``?token=``, an
``X-Amz-Signature`` of a presigned URL, ...; judged by the name as the app decodes it,
so ``?%74oken=`` too), the signature of a tus upload URL (``/tus/<body>.<signature>``,
a bearer capability) and ``Bearer`` values. Request headers are never logged (the
access log format has none). No other route carries a credential in its path.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, unquote_plus

from aiohttp import ClientConnectionError, ClientRequest, web
from aiohttp.web_log import AccessLogger as _AiohttpAccessLogger

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def given_request_id(given: str | None) -> str | None:
    """A client's X-Request-ID if it is sane to log and echo (no spaces, quotes or
    control bytes, at most 128 characters), else None: a new one is made then."""
    return given if given is not None and _SANE_REQUEST_ID.fullmatch(given) else None


# Query parameters that carry a credential: ours (``?token=``, auth.TOKEN_QUERY), the
# usual API key names, and SigV4 presigned URLs' (AWS "Authenticating Requests: Using
# Query Parameters": X-Amz-Credential, X-Amz-Signature, X-Amz-Security-Token) and
# SigV2's (AWSAccessKeyId, Signature).
SECRET_PARAMS = (
    "token",
    "key",
    "api_key",
    "apikey",
    "api-key",
    "access_token",
    "secret",
    "password",
    "signature",
    "sig",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "awsaccesskeyid",
    "upload_token",
)
REDACTED = "REDACTED"
_SECRET_NAMES = frozenset(SECRET_PARAMS)
# One query parameter: its name and value as they stand in the raw target. The value
# stops at the next separator ('?' too: a value holding "?token=" is masked either way).
_QUERY_PAIR = re.compile(r"([?&;])([^=&;?\s\"'#]+)=([^&;?\s\"'#]*)")
# A tus upload URL's token (``s3proxy.tus_url``: b64url(json) "." b64url(HMAC)): a
# bearer capability for one upload, so its signature is masked wherever it shows up.
# The path after it, to the query: also ``/TUS/``, ``/tus%2F`` and a token with more after
# it (``<token>%20``, ``<token>;x``): each a 404, its signature still valid elsewhere.
_TUS_SEGMENT = re.compile(r"/tus(?:/|%2f)([^?\s\"'#]+)", re.IGNORECASE)
# What the app accepts as an upload URL, once aiohttp has percent-decoded the path: a
# MAC is 43 characters, a body over a hundred; 16 keeps a key such as tus/a.pdf as it is.
_TUS_TOKEN = re.compile(r"([A-Za-z0-9_-]{16,})\.[A-Za-z0-9_-]{16,}")
# A Bearer credential, as an Authorization value would show it; "$KEY" placeholders in
# the proxy's own usage hints are not credentials.
_BEARER = re.compile(r"(\bBearer\s+)(?![$<])[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def secret_param(raw_name: str) -> bool:
    """Whether a query parameter, named as it stands in the raw request target, carries a
    credential: judged on the name the app reads (``request.query`` percent-decodes it
    and turns ``+`` into a space, so ``%74oken`` is ``token``), case-insensitively."""
    return unquote_plus(raw_name).lower() in _SECRET_NAMES


def _mask_param(m: re.Match[str]) -> str:
    if not secret_param(m.group(2)):
        return m.group(0)
    return f"{m.group(1)}{m.group(2)}={REDACTED}"


def _mask_tus(m: re.Match[str]) -> str:
    token = _TUS_TOKEN.search(unquote(m.group(1)))
    if token is None:
        return m.group(0)  # no upload URL's token in it (nor its signature's bytes)
    return f"/tus/{token.group(1)}.{REDACTED}"  # what followed the token is dropped too


def redact(text: str) -> str:
    """``text`` with every credential-looking query value, tus upload URL signature and
    Bearer value masked."""
    # Each pattern runs only where it can match: every event line has ``key=value``
    # pairs, few have a query (the two regex passes were ~2% of a small upload's CPU).
    if "=" in text and ("?" in text or "&" in text or ";" in text):
        text = _QUERY_PAIR.sub(_mask_param, text)
    if "/tus" in text or "/TUS" in text.upper():
        text = _TUS_SEGMENT.sub(_mask_tus, text)
    if "bearer" in text.lower():
        text = _BEARER.sub(r"\1" + REDACTED, text)
    return text


class RateLimit:
    """At most one event per ``interval`` seconds passes; the others are counted.

    ``hit()`` returns None for a suppressed event, else how many events this one stands
    for (itself and those suppressed since the last that passed).
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def hit(self) -> int | None:
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            self._suppressed += 1
            return None
        self._last = now
        count, self._suppressed = self._suppressed + 1, 0
        return count


# errnos asyncio's accept loop reports as "socket.accept() out of system resource".
_ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def loop_exception_handler(
    limit: RateLimit | None = None,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event loop exception handler that logs accept() failing for want of file
    descriptors once per ``limit`` interval, one line without a traceback.

    asyncio (3.11) reports it once per connection waiting in the backlog, with a
    traceback each, and every report schedules another retry: at the common 1,024-fd
    limit that was megabytes of log a second. Everything else goes to the default.
    """
    limit = limit or RateLimit(1.0)
    logger = logging.getLogger("s3proxy.server")
    s3_logger = logging.getLogger("s3proxy.s3")

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if _orphan_body_write(context.get("future"), exc):
            # aiohttp (3.14) writes a request's body in a task of its own, and when the
            # store closes the connection first (it went down mid-request) that task's
            # error is never awaited: the request itself failed, and was handled, on its
            # own path. Not a fault of ours: no traceback (CI at 26feb33, a store outage).
            s3_logger.warning("s3.body_write_orphaned error=%r", exc)
            return
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_EXHAUSTED:
            count = limit.hit()
            if count is not None:
                logger.error(
                    "accept.failed error=%s times=%d: raise the fd limit or lower "
                    "--max-connections",
                    errno.errorcode.get(exc.errno or 0, exc.errno),
                    count,
                )
            return
        loop.default_exception_handler(context)

    return handle


# aiohttp's private coroutine that writes a request's body (None if a version drops it:
# then asyncio's own report stands, traceback and all).
_BODY_WRITE = getattr(getattr(ClientRequest, "write_bytes", None), "__code__", None)


def _orphan_body_write(task: object, exc: object) -> bool:
    """Whether asyncio reports aiohttp's own request-body task, failed for a lost
    connection, as an exception nobody retrieved."""
    return (
        _BODY_WRITE is not None
        and isinstance(task, asyncio.Task)
        and getattr(task.get_coro(), "cr_code", None) is _BODY_WRITE
        and isinstance(exc, ClientConnectionError | OSError)
    )


def task_site(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: the innermost s3proxy function of its await chain and the
    innermost function overall, ``qualname:line``, for a drain that says what its
    remaining uploads wait on (``asyncio.Task.get_stack`` gives only the outermost
    frame of a suspended coroutine)."""
    ours = last = "?"
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        last = f"{frame.f_code.co_qualname}:{frame.f_lineno}"
        if str(frame.f_globals.get("__name__", "")).startswith("s3proxy"):
            ours = last
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return ours if ours == last else f"{ours}>{last}"


# The access log: peer, request line (redacted like every line), status, body bytes sent,
# seconds. Set as a handler argument in create_app, so tests log as the CLI does.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'
# nginx's status for "the client closed the connection before the answer": what the
# access log and the metrics say of such a request, rather than the answer nobody read.
CLIENT_GONE_STATUS = 499
CLIENT_GONE = web.RequestKey("client_gone", bool)
# The response whose head went out (set as it is prepared): what a request cut short
# after that (a download stopped by the shutdown) is logged and counted with.
PREPARED = web.RequestKey("prepared", web.StreamResponse)


def cut_short_response(request: web.BaseRequest) -> web.StreamResponse:
    """What the access log shows for a request whose handler was cancelled: the response
    already begun (its status, the body bytes sent), else 499, nothing having been sent."""
    return request.get(PREPARED) or web.StreamResponse(status=CLIENT_GONE_STATUS)


def client_gone(request: web.BaseRequest, response: web.StreamResponse) -> bool:
    """Whether the client went away before ``response`` began (its head unsent): a body
    cut mid-upload is answered 400 CLIENT_DISCONNECTED, but nobody is left to read it.

    A response already begun (a download cut short) keeps its status, as nginx's does.
    A body the client's EOF ended (``ProxyRequestHandler.cut_body``) is answered, for a
    client that only half-closed, but counts as gone: a FIN cannot tell the two apart.
    """
    if response.prepared:
        return False
    if getattr(request.protocol, "cut_body", None) is request.content:
        return True
    transport = request.transport
    return transport is None or transport.is_closing()


class AccessLogger(_AiohttpAccessLogger):
    """aiohttp's access logger, with 499 for a request the metrics middleware found its
    client gone for (``CLIENT_GONE``), so the log and the metrics agree."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.get(CLIENT_GONE):
            response = web.StreamResponse(status=CLIENT_GONE_STATUS)
        super().log(request, response, time)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger rid=... message``, credentials redacted."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s rid=%(request_id)s %(message)s",
            "%Y-%m-%dT%H:%M:%S",
        )

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # botocore's debug output would drown the proxy's events.
    for noisy in ("botocore", "aiobotocore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
