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
   Since the GetObject holds a pooled S3 connection all along, a client that accepts
   nothing for --client-timeout or less than --min-download-rate is cut off, and
   at most ``download_limits.download_slots`` GETs stream at once (503 OVERLOADED
   past them): see s3proxy.download_limits.
3. ``download_mode=redirect``: 302 to a presigned URL, signed for the endpoint
   browsers reach; S3 then answers the client's Range and validators itself.

S3 implements neither multiple ranges nor If-Range, so the proxy does: a Range it
cannot pass on as one byte range is ignored (RFC 9110 14.2 allows that: the whole
object is sent), and If-Range is checked against the ranged answer's validators.

``Repr-Digest: sha-256=:<base64>:`` (RFC 9530 section 3) is sent when the object's sha256 is
known from its ``x-amz-meta-sha256`` (written by ``POST /upload`` for a file stored with one
PutObject). It describes the whole representation, so a 206 carries the same value as the
200: a client checks it once it holds every byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import socket
import struct
from collections.abc import Mapping

from aiohttp import hdrs, web

from s3proxy.auth import Principal
from s3proxy.digests import sf_digest
from s3proxy.download_limits import (
    RETRY_AFTER,
    ClientStalled,
    DownloadLimits,
    SlotsFull,
    WriteWatch,
)
from s3proxy.errors import (
    INVALID_REQUEST,
    KEY_FORBIDDEN,
    NO_SUCH_KEY,
    PRECONDITION_FAILED,
    RANGE_NOT_SATISFIABLE,
    ProxyError,
    error_response,
)
from s3proxy.http_dates import format_http_date, parse_http_date
from s3proxy.keys import KeyPolicy, KeyRefused, content_disposition
from s3proxy.s3 import (
    Conditions,
    InvalidRange,
    NoSuchKey,
    NotModified,
    ObjectBody,
    ObjectHead,
    ObjectStore,
    PreconditionFailed,
)
from s3proxy.state import STATE, AppState

log = logging.getLogger("s3proxy.downloads")

CHUNK_SIZE = 256 * 1024  # bytes read from S3 and written to the client at a time

# A single byte range (RFC 9110 14.1.2): first-last, first- or -suffix.
_BYTE_RANGE = re.compile(r"bytes=(?:(\d+)-(\d*)|-(\d+))", re.ASCII)
# Past any object S3 holds (5 TiB; AWS now documents 48.8 TiB), and still a signed
# 64-bit integer, which is what S3 implementations parse a Range into.
MAX_POSITION = 2**63 - 1
# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E /
# obs-text. obs-text is left out: S3's ETags are ASCII, and aiohttp hands a non-UTF-8
# byte on as a lone surrogate that botocore cannot send.
_ENTITY_TAG = re.compile(r'(?:W/)?"[\x21\x23-\x7e]*"')
# The hex sha256 the pipeline stores as x-amz-meta-sha256 (hashlib's hexdigest: lowercase).
_SHA256_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)


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


def conditions(headers: Mapping[str, str]) -> Conditions:
    """The client's validators, as S3 is to check them.

    The date conditions are dropped where RFC 9110 13.2.2 says to ignore them (when
    the matching ETag condition is present), so the outcome does not depend on
    how a given S3 implementation orders them. A malformed If-Match or
    If-None-Match is refused (400): ignoring it would turn a conditional request
    into an unconditional one.
    """
    if_match = if_none_match = None
    modified_since = unmodified_since = None
    if value := headers.get(hdrs.IF_MATCH):
        if_match = entity_tags(value, hdrs.IF_MATCH)
    else:
        unmodified_since = parse_http_date(headers.get(hdrs.IF_UNMODIFIED_SINCE))
    if value := headers.get(hdrs.IF_NONE_MATCH):
        # If-None-Match compares weakly; S3 only knows strong tags, so drop the W/.
        if_none_match = re.sub(r'W/(?=")', "", entity_tags(value, hdrs.IF_NONE_MATCH))
    else:
        modified_since = parse_http_date(headers.get(hdrs.IF_MODIFIED_SINCE))
    return Conditions(if_match, if_none_match, modified_since, unmodified_since)


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


def if_range_holds(if_range: str, etag: str | None, last_modified: dt.datetime | None) -> bool:
    """RFC 9110 13.1.5: the range applies only if the validator still matches, strongly."""
    if if_range.startswith('"'):
        return etag is not None and not etag.startswith("W/") and if_range == etag
    given = parse_http_date(if_range)
    return given is not None and given == last_modified


def repr_digest(head: ObjectHead) -> str | None:
    """RFC 9530 ``Repr-Digest`` from the sha256 stored with the object, if there is one."""
    value = head.metadata.get("sha256", "").strip().lower()
    if not _SHA256_HEX.fullmatch(value):
        return None
    return "sha-256=" + sf_digest(bytes.fromhex(value))


def attachment_name(key: str) -> str:
    return content_disposition(key.rsplit("/", 1)[-1])


# --- HTTP --------------------------------------------------------------------


async def get_file(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    principal = state.auth.authenticate(request)
    key = request.match_info["key"]
    check_key(key, principal, state.settings.key_template)
    if state.settings.download_mode == "redirect":
        return await redirect(request, key)
    if request.method == hdrs.METH_HEAD:
        return await stream(request, state, key)  # HeadObject: a short call, no slot
    try:
        async with state.downloads.slot():
            return await stream(request, state, key)
    except SlotsFull as err:
        log.info("download.no_slot key=%s slots=%d", key, state.downloads.size)
        resp = error_response(err)
        resp.headers[hdrs.RETRY_AFTER] = str(RETRY_AFTER)
        return resp


async def stream(request: web.Request, state: AppState, key: str) -> web.StreamResponse:
    bucket = state.require_sink()
    try:
        answer = await ranged_fetch(bucket, key, request)
    except NotModified as outcome:
        return not_modified(outcome)
    except NoSuchKey:
        raise ProxyError(NO_SUCH_KEY, f"no object with key {key!r}") from None
    except PreconditionFailed:
        raise ProxyError(
            PRECONDITION_FAILED, "a condition in If-Match or If-Unmodified-Since failed"
        ) from None
    except InvalidRange as outcome:
        return await not_satisfiable(bucket, key, outcome.size)
    return await send(request, key, answer, state.config.downloads)


async def ranged_fetch(bucket: ObjectStore, key: str, request: web.Request) -> ObjectBody:
    """The client's Range of the object, or all of it where its If-Range no longer holds.

    RFC 9110 13.1.5: a stale If-Range means the Range is ignored, so a range past the
    end of the object as it is now is a 200 with every byte, not a 416.
    """
    head = request.method == hdrs.METH_HEAD
    cond = conditions(request.headers)
    byte_range = single_range(request.headers.get(hdrs.RANGE))
    if_range = request.headers.get(hdrs.IF_RANGE)
    if byte_range is None or not if_range:
        return await fetch(bucket, key, head, byte_range, cond)
    try:
        answer = await fetch(bucket, key, head, byte_range, cond)
    except InvalidRange:
        now = await bucket.head(key, conditions=cond)
        if if_range_holds(if_range, now.etag, now.last_modified):
            raise
        return await fetch(bucket, key, head, None, cond)
    if if_range_holds(if_range, answer.head.etag, answer.head.last_modified):
        return answer
    answer.close()  # the object changed since the client's partial copy: send all of it
    return await fetch(bucket, key, head, None, cond)


async def fetch(
    bucket: ObjectStore, key: str, head: bool, byte_range: str | None, cond: Conditions
) -> ObjectBody:
    """GetObject, or HeadObject as a body of nothing, so both are answered alike."""
    if not head:
        return await bucket.get(key, byte_range=byte_range, conditions=cond)
    found = await bucket.head(key, byte_range=byte_range, conditions=cond)

    async def nothing(n: int) -> bytes:
        return b""

    return ObjectBody(found, nothing, lambda: None)


async def object_size(bucket: ObjectStore, key: str) -> int | None:
    """The object's size, for a 416's ``Content-Range: bytes */size``, if S3 says."""
    try:
        return (await bucket.head(key)).size
    except (NoSuchKey, NotModified, PreconditionFailed, InvalidRange):
        return None


def not_modified(outcome: NotModified) -> web.Response:
    """304 with the validators and caching headers a 200 would carry (RFC 9110 15.4.5)."""
    headers = {"Cache-Control": "private"}
    if etag := sendable(hdrs.ETAG, outcome.etag):
        headers[hdrs.ETAG] = etag
    if last_modified := format_http_date(outcome.last_modified):
        headers[hdrs.LAST_MODIFIED] = last_modified
    return web.Response(status=304, headers=headers)


# What aiohttp refuses to write in a header value (RFC 9110 5.5): control characters but HT.
_UNSENDABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def sendable(name: str, value: str | None) -> str | None:
    """``value`` if it can be sent as header ``name``, else None (and a line in the log).

    S3 keeps what a writer gave it: an object stored around the proxy (a presigned PUT
    binds no Content-Language, any client with the bucket's keys) can carry a control
    character in its Content-Type, Content-Language or Content-Disposition. aiohttp
    refused such a header only once the status line was due: the client got no answer
    at all (reprobe20b). The object is served with the proxy's default in its place."""
    if value is None or not _UNSENDABLE.search(value):
        return value
    log.warning("download.header_dropped header=%s value=%r", name, value[:100])
    return None


async def not_satisfiable(bucket: ObjectStore, key: str, size: int | None) -> web.Response:
    """416 as JSON, with ``Content-Range: bytes */size`` if the size is known (RFC 9110 15.5.17)."""
    if size is None:  # HeadObject's 416 has no body to carry it
        size = await object_size(bucket, key)
    resp = error_response(
        ProxyError(RANGE_NOT_SATISFIABLE, "the range is outside the object's bytes")
    )
    if size is not None:
        resp.headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
    return resp


def response_headers(key: str, head: ObjectHead) -> dict[str, str]:
    """S3's headers passed on as they are; Content-Disposition has a default, the rest is ours.

    Not Content-Encoding: a presigned PUT cannot bind it (SigV4 leaves headers it did not
    sign free), so a client could store 48 KB of gzip under "Content-Encoding: gzip" and
    have every browser that downloads it inflate 50 MB. The stored bytes are served as
    they are (identity), which is also what was counted against the upload's limits.
    """
    passed_on = {
        hdrs.CONTENT_TYPE: head.content_type,
        hdrs.CONTENT_RANGE: head.content_range,
        hdrs.CONTENT_LANGUAGE: head.content_language,
        hdrs.ETAG: head.etag,
        hdrs.LAST_MODIFIED: format_http_date(head.last_modified),
        hdrs.CONTENT_DISPOSITION: head.content_disposition,
    }
    headers: dict[str, str] = {}
    for name, value in passed_on.items():
        if value := sendable(name, value):
            headers[str(name)] = value
    headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
    headers.setdefault(hdrs.CONTENT_DISPOSITION, attachment_name(key))
    headers[hdrs.ACCEPT_RANGES] = "bytes"
    if digest := repr_digest(head):
        headers["Repr-Digest"] = digest  # of the whole object, on a 206 too (RFC 9530 3)
    # Behind credentials: never kept by shared caches.
    headers[hdrs.CACHE_CONTROL] = "private"
    # Uploaded bytes are untrusted: no sniffing them into HTML, no scripts if opened inline.
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Content-Security-Policy"] = "sandbox"
    return headers


async def send(
    request: web.Request, key: str, answer: ObjectBody, limits: DownloadLimits | None = None
) -> web.StreamResponse:
    """Copy the object to the client a chunk at a time; the S3 body is closed on every path.

    Every write is under ``limits`` (``download_limits.WriteWatch``): a client that
    accepts nothing for the idle timeout, or less than the minimum rate, is cut off and
    the S3 body closed, so its pooled connection goes back at once."""
    limits = limits or DownloadLimits()
    head = answer.head
    status = 206 if head.partial else 200
    response = web.StreamResponse(status=status, headers=response_headers(key, head))
    response.content_length = head.length
    watch = WriteWatch(
        lambda: _buffered(request), limits.idle_timeout, limits.min_rate, limits.rate_window
    )
    try:
        await response.prepare(request)
        async with watch.watching():
            if request.method != hdrs.METH_HEAD:
                while chunk := await answer.read(CHUNK_SIZE):
                    await watch.write(response.write(chunk), len(chunk))
            await watch.write(response.write_eof(), 0)
    except asyncio.CancelledError:
        # Cut short by the shutdown's deadline (app.stop_requests): the access line
        # has the status it began with; this says how far it got.
        log.info("download.stopped key=%s sent=%d", key, watch.given)
        raise
    except ClientStalled as stalled:
        # Nothing left to say but to cut the connection short of Content-Length.
        log.info(
            "download.client_stalled key=%s sent=%d accepted=%d reason=%s",
            key,
            watch.given,
            stalled.accepted,
            stalled.reason,
        )
        reset(request)
    except Exception as exc:
        if request.transport is None or request.transport.is_closing():
            # The client went (a reset, a broken pipe, however aiohttp words it): its
            # choice, and nothing to cut. An S3 failure finds the client still there.
            log.info("download.client_gone key=%s sent=%d", key, watch.given)
            return response
        # The status line is out: the only way left to say "failed" is to cut the
        # connection short of Content-Length.
        log.warning("download.failed key=%s sent=%d error=%s", key, watch.given, type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
    finally:
        answer.close()
    return response


def reset(request: web.Request) -> None:
    """Abort the connection with a reset (SO_LINGER 0), as nginx's reset_timedout_connection:
    a plain close leaves what the kernel holds (MiBs) to a client that does not read, on
    an orphaned socket, for minutes."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _buffered(request: web.Request) -> int:
    """Bytes written to the client's socket that still wait in asyncio's buffer."""
    transport = request.transport
    return 0 if transport is None else transport.get_write_buffer_size()


# --- redirect mode -----------------------------------------------------------


async def redirect(request: web.Request, key: str) -> web.Response:
    """302 to a presigned URL for the same method; S3 serves the bytes, ranges and 304s."""
    state = request.app[STATE]
    bucket = state.require_sink()
    head = request.method == hdrs.METH_HEAD
    # SigV4, for the endpoint browsers reach.
    url = await bucket.presign_get(
        key,
        int(state.settings.presign_expiry),
        head=head,
        disposition=None if head else attachment_name(key),
    )
    # The URL is a credential that expires: no cache may keep or replay it.
    return web.Response(status=302, headers={hdrs.LOCATION: url, hdrs.CACHE_CONTROL: "no-store"})


def add_routes(app: web.Application) -> None:
    """GET and HEAD /files/{key}; in redirect mode, the presigning client's lifetime."""
    # [\s\S], not ".": a key with a line feed is refused by the key rule (403), not unrouted
    app.router.add_get(r"/files/{key:[\s\S]+}", get_file)  # add_get also answers HEAD
