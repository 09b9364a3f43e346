"""GET/HEAD /files/{key}: an object streamed through the proxy, or a redirect to a presigned URL.

Rules, in the order a request meets them:

1. Credentials first (``auth.py``), then the key, by the one rule of
   ``keys.KeyPolicy``: a caller reads what it may upload (under an upload
   token's prefix plus the key template's literal prefix), and only keys formed
   as the proxy makes them (403 KEY_FORBIDDEN; over S3's 1024 bytes, 400). A
   refused key never reaches S3, so the proxy cannot be used to probe the rest
   of the bucket.
2. ``download_mode=stream``: the client's validators and its Range go to
   GetObject/HeadObject, and S3's answer is passed on (200, 206, 304, 412, 416,
   404). The body is copied in ``CHUNK_SIZE`` reads, each written (and drained
   to the client) before the next is read, so a download holds at most about one
   chunk in memory however large the object, and a slow client slows the S3 read.
3. ``download_mode=redirect``: 302 to a presigned URL, signed for the endpoint
   browsers reach; S3 then answers the client's Range and validators itself.

S3 implements neither multiple ranges nor If-Range, so the proxy does: a Range it
cannot pass on as one byte range is ignored (RFC 9110 14.2 allows that: the whole
object is sent), and If-Range is checked against the ranged answer's validators.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from botocore.exceptions import ClientError

from s3proxy.auth import Principal
from s3proxy.errors import (
    INVALID_REQUEST,
    KEY_FORBIDDEN,
    NO_SUCH_KEY,
    PRECONDITION_FAILED,
    RANGE_NOT_SATISFIABLE,
    ProxyError,
    error_response,
)
from s3proxy.keys import KeyPolicy, KeyRefused, content_disposition
from s3proxy.sink import S3Sink, translate
from s3proxy.state import STATE, AppState

log = logging.getLogger("s3proxy.downloads")

CHUNK_SIZE = 256 * 1024  # bytes read from S3 and written to the client at a time

# Headers of S3's answer passed on as they are (Content-Length is set from the
# parsed response, Content-Disposition has a default, Cache-Control is ours).
_PASSED_ON = (
    hdrs.CONTENT_TYPE,
    hdrs.CONTENT_RANGE,
    hdrs.CONTENT_ENCODING,
    hdrs.CONTENT_LANGUAGE,
    hdrs.ETAG,
    hdrs.LAST_MODIFIED,
)
# The answers S3 gives as errors that are, for the client, ordinary HTTP outcomes.
_OUTCOMES = frozenset({304, 404, 412, 416})
# A single byte range (RFC 9110 14.1.2): first-last, first- or -suffix.
_BYTE_RANGE = re.compile(r"bytes=(?:(\d+)-(\d*)|-(\d+))", re.ASCII)
# Past any object S3 holds (5 TiB; AWS now documents 48.8 TiB), and still a signed
# 64-bit integer, which is what S3 implementations parse a Range into.
MAX_POSITION = 2**63 - 1
# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E /
# obs-text. obs-text is left out: S3's ETags are ASCII, and aiohttp hands a non-UTF-8
# byte on as a lone surrogate that botocore cannot send.
_ENTITY_TAG = re.compile(r'(?:W/)?"[\x21\x23-\x7e]*"')


# --- pure: which keys, which range, which conditions ------------------------


def check_key(key: str, principal: Principal, key_template: str) -> None:
    """Refuse a key this principal may not read (``keys.KeyPolicy``: the rule of every route)."""
    try:
        KeyPolicy.for_grant(key_template, principal.grant).check(key)
    except KeyRefused as exc:
        raise ProxyError(INVALID_REQUEST if exc.too_long else KEY_FORBIDDEN, str(exc)) from None


def single_range(value: str | None) -> str | None:
    """The Range to ask S3 for, or None to send the whole object.

    Only one well-formed byte range is passed on: S3 does not do multiple
    ranges, and some S3-compatible stores fail on malformed ones. Positions are
    rewritten without leading zeros and clamped to ``MAX_POSITION``, which means
    the same thing for any object S3 can hold.
    """
    if not value:
        return None
    m = _BYTE_RANGE.fullmatch(value.replace(" ", ""))
    if m is None:
        return None
    first, last, suffix = m.groups()
    if suffix is not None:
        length = _position(suffix)
        # A suffix longer than any object asks for all of it (RFC 9110 14.1.2).
        return "bytes=0-" if length == MAX_POSITION else f"bytes=-{length}"
    start = _position(first)
    if not last:
        return f"bytes={start}-"
    end = _position(last)
    if end < start:
        return None  # invalid (RFC 9110 14.1.1): ignored, not unsatisfiable
    # A last position past the end means "to the end" (RFC 9110 14.1.2).
    return f"bytes={start}-" if end == MAX_POSITION else f"bytes={start}-{end}"


def _position(digits: str) -> int:
    """A byte position, clamped to MAX_POSITION: never int() on thousands of client digits
    (past 4300 Python refuses, a 500), and never a number a store cannot parse."""
    significant = digits.lstrip("0")
    if len(significant) > len(str(MAX_POSITION)):
        return MAX_POSITION
    return min(int(significant or "0"), MAX_POSITION)


def http_date(value: str | None) -> dt.datetime | None:
    """An HTTP-date as an aware datetime; None for a missing or invalid one (then ignored)."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        # OverflowError: a year or offset of many digits.
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def conditions(headers: Mapping[str, str]) -> dict[str, Any]:
    """The client's validators as GetObject/HeadObject parameters.

    The date conditions are dropped where RFC 9110 13.2.2 says to ignore them (when
    the matching ETag condition is present), so the outcome does not depend on
    how a given S3 implementation orders them. A malformed If-Match or
    If-None-Match is refused (400): ignoring it would turn a conditional request
    into an unconditional one.
    """
    params: dict[str, Any] = {}
    if if_match := headers.get(hdrs.IF_MATCH):
        params["IfMatch"] = entity_tags(if_match, hdrs.IF_MATCH)
    elif since := http_date(headers.get(hdrs.IF_UNMODIFIED_SINCE)):
        params["IfUnmodifiedSince"] = since
    if if_none_match := headers.get(hdrs.IF_NONE_MATCH):
        # If-None-Match compares weakly; S3 only knows strong tags, so drop the W/.
        tags = entity_tags(if_none_match, hdrs.IF_NONE_MATCH)
        params["IfNoneMatch"] = re.sub(r'W/(?=")', "", tags)
    elif since := http_date(headers.get(hdrs.IF_MODIFIED_SINCE)):
        params["IfModifiedSince"] = since
    return params


def entity_tags(value: str, header: str) -> str:
    """``*`` or a list of entity tags, re-joined with ", "; ProxyError 400 otherwise.

    Empty list elements are skipped, as RFC 9110 5.6.1.2 asks of recipients.
    """
    if value.strip() == "*":
        return "*"
    tags = [t for t in (part.strip(" \t") for part in value.split(",")) if t]
    if not tags or not all(_ENTITY_TAG.fullmatch(t) for t in tags):
        raise ProxyError(INVALID_REQUEST, f"{header} must be * or a list of entity tags")
    return ", ".join(tags)


def if_range_holds(if_range: str, etag: str | None, last_modified: str | None) -> bool:
    """RFC 9110 13.1.5: the range applies only if the validator still matches, strongly."""
    if if_range.startswith('"'):
        return etag is not None and not etag.startswith("W/") and if_range == etag
    given, current = http_date(if_range), http_date(last_modified)
    return given is not None and given == current


def attachment_name(key: str) -> str:
    return content_disposition(key.rsplit("/", 1)[-1])


# --- S3 ----------------------------------------------------------------------


@dataclass
class Answer:
    """S3's answer: a status and the parsed response, or the error's response for an outcome."""

    status: int
    response: dict[str, Any]

    @property
    def headers(self) -> Mapping[str, str]:
        headers: Mapping[str, str] = self.response.get("ResponseMetadata", {}).get(
            "HTTPHeaders", {}
        )
        return headers

    @property
    def body(self) -> Any:
        return self.response.get("Body")

    def close(self) -> None:
        if self.body is not None:
            self.body.close()


async def fetch(sink: S3Sink, head: bool, params: dict[str, Any]) -> Answer:
    """Call GetObject or HeadObject; 304, 404, 412 and 416 come back as answers."""
    operation = "HeadObject" if head else "GetObject"
    call = sink.client.head_object if head else sink.client.get_object
    async with sink.call(operation):
        try:
            response = await call(Bucket=sink.bucket, **params)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status not in _OUTCOMES:
                raise
            return Answer(status, dict(exc.response))
    return Answer(int(response["ResponseMetadata"]["HTTPStatusCode"]), response)


async def object_size(sink: S3Sink, key: str) -> int | None:
    """The object's size, for a 416's ``Content-Range: bytes */size``, if S3 says."""
    answer = await fetch(sink, True, {"Key": key})
    if answer.status != 200:
        return None
    return int(answer.response["ContentLength"])


# --- HTTP --------------------------------------------------------------------


async def get_file(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    principal = state.auth.authenticate(request)
    key = request.match_info["key"]
    check_key(key, principal, state.settings.key_template)
    if state.settings.download_mode == "redirect":
        return await redirect(request, key)
    return await stream(request, state, key)


async def stream(request: web.Request, state: AppState, key: str) -> web.StreamResponse:
    sink = state.require_sink()
    head = request.method == hdrs.METH_HEAD
    params = {"Key": key, **conditions(request.headers)}
    byte_range = single_range(request.headers.get(hdrs.RANGE))
    if byte_range is not None:
        params["Range"] = byte_range
    answer = await fetch(sink, head, params)
    if_range = request.headers.get(hdrs.IF_RANGE)
    if (
        answer.status == 206
        and if_range
        and not if_range_holds(
            if_range, answer.headers.get("etag"), answer.headers.get("last-modified")
        )
    ):
        # The object changed since the client's partial copy: send all of it.
        answer.close()
        del params["Range"]
        answer = await fetch(sink, head, params)
    if answer.status == 304:
        return not_modified(answer)
    if answer.status == 404:
        raise ProxyError(NO_SUCH_KEY, f"no object with key {key!r}")
    if answer.status == 412:
        raise ProxyError(
            PRECONDITION_FAILED, "a condition in If-Match or If-Unmodified-Since failed"
        )
    if answer.status == 416:
        return await not_satisfiable(sink, key, answer)
    return await send(request, key, answer)


def not_modified(answer: Answer) -> web.Response:
    """304 with the validators and caching headers a 200 would carry (RFC 9110 15.4.5)."""
    headers = {"Cache-Control": "private"}
    for name in (hdrs.ETAG, hdrs.LAST_MODIFIED):
        if value := answer.headers.get(name.lower()):
            headers[name] = value
    return web.Response(status=304, headers=headers)


async def not_satisfiable(sink: S3Sink, key: str, answer: Answer) -> web.Response:
    """416 as JSON, with ``Content-Range: bytes */size`` if the size is known (RFC 9110 15.5.17)."""
    size = answer.response.get("Error", {}).get("ActualObjectSize")
    if size is None:  # HeadObject's 416 has no body to carry it
        size = await object_size(sink, key)
    resp = error_response(
        ProxyError(RANGE_NOT_SATISFIABLE, "the range is outside the object's bytes")
    )
    if size is not None:
        resp.headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
    return resp


def response_headers(key: str, answer: Answer) -> dict[str, str]:
    s3 = answer.headers
    headers: dict[str, str] = {
        str(name): s3[name.lower()] for name in _PASSED_ON if name.lower() in s3
    }
    headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
    headers[hdrs.CONTENT_DISPOSITION] = s3.get("content-disposition") or attachment_name(key)
    headers[hdrs.ACCEPT_RANGES] = "bytes"
    # Behind credentials: never kept by shared caches.
    headers[hdrs.CACHE_CONTROL] = "private"
    # Uploaded bytes are untrusted: no sniffing them into HTML, no scripts if opened inline.
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Content-Security-Policy"] = "sandbox"
    return headers


async def send(request: web.Request, key: str, answer: Answer) -> web.StreamResponse:
    """Copy the object to the client a chunk at a time; the S3 body is closed on every path."""
    response = web.StreamResponse(status=answer.status, headers=response_headers(key, answer))
    response.content_length = int(answer.response["ContentLength"])
    body = answer.body
    sent = 0
    try:
        await response.prepare(request)
        if body is not None:
            while chunk := await body.read(CHUNK_SIZE):
                await response.write(chunk)
                sent += len(chunk)
        await response.write_eof()
    except ConnectionResetError:
        log.info("download.client_gone key=%s sent=%d", key, sent)
    except Exception as exc:
        # The status line is out: the only way left to say "failed" is to cut the
        # connection short of Content-Length.
        log.warning("download.failed key=%s sent=%d error=%s", key, sent, type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
    finally:
        answer.close()
    return response


# --- redirect mode -----------------------------------------------------------


async def redirect(request: web.Request, key: str) -> web.Response:
    """302 to a presigned URL for the same method; S3 serves the bytes, ranges and 304s."""
    state = request.app[STATE]
    settings = state.settings
    sink = state.require_sink()
    # SigV4, for the endpoint browsers reach: the proxy's one presigning client.
    client = await state.presigner.client(sink)
    head = request.method == hdrs.METH_HEAD
    params = {"Bucket": sink.bucket, "Key": key}
    if not head:
        params["ResponseContentDisposition"] = attachment_name(key)
    with translate("presign"):
        url = await client.generate_presigned_url(
            "head_object" if head else "get_object",
            Params=params,
            ExpiresIn=int(settings.presign_expiry),
        )
    # The URL is a credential that expires: no cache may keep or replay it.
    return web.Response(status=302, headers={hdrs.LOCATION: url, hdrs.CACHE_CONTROL: "no-store"})


def add_routes(app: web.Application) -> None:
    """GET and HEAD /files/{key}; in redirect mode, the presigning client's lifetime."""
    app.router.add_get("/files/{key:.+}", get_file)  # add_get also answers HEAD
