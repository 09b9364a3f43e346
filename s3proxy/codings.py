"""Whether the proxy can take a request body's codings, from its head alone.

aiohttp decodes a ``Content-Encoding`` of gzip or deflate (br and zstd only with optional
packages this install does not have) and frames ``Transfer-Encoding: chunked``. Any other
coding it passes through as if there were none: a body sent as ``Transfer-Encoding: gzip,
chunked``, or with a Content-Encoding it does not decode (``x-gzip``, ``compress``, two
codings, ``gzip`` on one header line and ``identity`` on a later one), would be stored as
its coded bytes and answered 201. Those requests are refused before a body byte is read:
415 for a content coding (RFC 9110 section 15.5.16), 501 for a transfer coding (RFC 9112
section 6.1).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from s3proxy.errors import (
    DECODED_CODINGS,
    UNSUPPORTED_ENCODING,
    UNSUPPORTED_TRANSFER_CODING,
    ProxyError,
)

DECODED = DECODED_CODINGS  # what aiohttp decodes here
# What a refused client should do instead (here, and for br/zstd, refused by the parser).
CONTENT_ADVICE = f"send the body as it is, or coded once with {' or '.join(DECODED)}"
SHOWN = 60  # characters of a header value a message quotes


def codings(values: Iterable[str]) -> list[str]:
    """The codings of every line of a coding header, in order, lowercased."""
    return [c.strip().lower() for value in values for c in value.split(",") if c.strip()]


def content_coded(headers: CIMultiDictProxy[str]) -> bool:
    """Is the body content-coded (a Content-Encoding other than identity, on any line)?
    Its Content-Length then counts coded bytes, not the file's."""
    return any(c != "identity" for c in codings(headers.getall("Content-Encoding", ())))


def read_length(request: web.BaseRequest) -> int | None:
    """The most bytes a handler can read of the body: its Content-Length, or None when
    unknown or content-coded. A coded body's Content-Length counts coded bytes and bounds
    nothing it decodes to (100 KB of gzip is 100 MiB of zeros): taken for the file's bound,
    it sized every part's reservation to 1 byte, and parts were filled outside the budget."""
    if content_coded(request.headers):
        return None
    return request.content_length


def check_body_codings(headers: CIMultiDictProxy[str], decoded: bool) -> None:
    """Raise if the body's codings are ones the proxy would not undo.

    ``decoded``: aiohttp decodes this body's Content-Encoding (its own decision, read
    from the request's StreamReader, so the two cannot disagree on which header line
    or spelling counts)."""
    transfer = codings(headers.getall("Transfer-Encoding", ()))
    if transfer and transfer != ["chunked"]:
        raise ProxyError(
            UNSUPPORTED_TRANSFER_CODING,
            f"Transfer-Encoding {', '.join(transfer)[:SHOWN]!r} is not supported: send the "
            "body with a Content-Length, or with Transfer-Encoding: chunked alone",
        )
    content = [c for c in codings(headers.getall("Content-Encoding", ())) if c != "identity"]
    if content and (len(content) > 1 or not decoded):
        raise ProxyError(
            UNSUPPORTED_ENCODING,
            f"Content-Encoding {', '.join(content)[:SHOWN]!r} is not supported: " + CONTENT_ADVICE,
        )


def check_request(request: web.BaseRequest) -> None:
    """``check_body_codings`` for a request with a body (the expect handler calls it
    too: it runs before the middlewares, and refuses before the client sends the body)."""
    if request.body_exists:
        decoded = getattr(request.content, "total_compressed_bytes", None) is not None
        check_body_codings(request.headers, decoded)


@web.middleware
async def refuse_unsupported(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every route: a body whose codings would be stored as they came is refused."""
    check_request(request)
    response: web.StreamResponse = await handler(request)
    return response
