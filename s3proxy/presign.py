"""Direct-to-S3 uploads: the proxy decides and signs, the browser sends the bytes to S3.

The proxy never sees the file, so it cannot sniff it: the content type is what
the client declares, checked against ``--allow-type`` and the upload token's
types, and then fixed in the signature (S3 refuses any other). The size is fixed
too: a presigned PUT signs ``Content-Length``, a presigned POST carries
``content-length-range [size, size]``. Keys come from ``--key-template`` (under
an upload token's prefix), exactly as for ``POST /upload``.

Endpoints (JSON in, JSON out; the same credentials as ``/upload``)::

    POST /sign {filename, content_type?, size, method?: "put"|"post"}
      put:  {multipart: false, key, bucket, method: "PUT", url, headers, expires_at, object_url}
      post: {multipart: false, key, bucket, method: "POST", url, fields, expires_at, object_url}
      size > --presign-multipart-threshold: {multipart: true, endpoint: "/sign/multipart"}
    POST /sign/multipart {same body}
      -> {key, bucket, upload_id, size, content_type, part_size, part_count, object_url}
    POST /sign/multipart/parts {key, upload_id, part_numbers}
      -> {key, upload_id, parts: [{part_number, url}], expires_at}
    GET  /sign/multipart/parts?key=&upload_id=
      -> {key, upload_id, parts: [{part_number, etag, size}]}    (to resume)
    POST /sign/multipart/complete {key, upload_id, parts?: [{part_number, etag}]}
      -> {key, bucket, size, parts, etag, content_type, object_url, webhook?}
    POST /sign/multipart/abort {key, upload_id} -> {key, upload_id, aborted: true}

A multipart upload has no server-side state here: the signed size rides in the
upload's own metadata (``x-amz-meta-s3proxy-size``), which S3 only shows once the
object exists. So ``complete`` first checks the listed parts against the limits
(all parts 1..N present, total within ``--max-file-size`` and the token's
``max_size``), completes, then compares the object's size with the signed one and
deletes the object if they differ. Part URLs do not sign a Content-Length (the
size is not known when they are signed), so oversized parts are only refused at
``complete``; an upload that is never completed is left to abort or to
``s3proxy cleanup`` / an ``AbortIncompleteMultipartUpload`` lifecycle rule.

The proxy completes a multipart upload itself, so it tells the webhook as ``POST
/upload`` does (``upload.completed``, ``--webhook-failure``); a single presigned PUT or
POST goes to S3 without the proxy, which never hears of it. With no server-side state,
a complete retried after a lost answer cannot tell whether the event went out: it sends
it again (at least once; receivers deduplicate on the key).

This module is the routes: parse, check, call S3, answer. Whose object stands at a key
(and deletes that remove only our own) is ``presign_identity``; what follows a Complete
(the size check, the webhook or rollback, the later checks of a Complete that may land
late) is ``presign_completed``; one complete at a time is ``presign_claim``, and an
upload's nonce on a shared key ``presign_record``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web

from s3proxy import keys, parts, presign_record, sniff
from s3proxy.codings import check_request, read_length
from s3proxy.digests import SIGN_DIGEST_HINT, refuse_body_digests
from s3proxy.errors import (
    CLIENT_DISCONNECTED,
    COMPLETE_IN_PROGRESS,
    FILE_TOO_LARGE,
    INVALID_REQUEST,
    KEY_EXISTS,
    KEY_FORBIDDEN,
    NO_SUCH_UPLOAD,
    REQUEST_TOO_LARGE,
    SHUTTING_DOWN,
    TOKEN_SCOPE,
    TYPE_NOT_ALLOWED,
    UPLOAD_COMPLETE,
    UPSTREAM_KINDS,
    ProxyError,
    error_response,
)
from s3proxy.expect import answer as expect_answer
from s3proxy.janitor import Kind, run_cleanup
from s3proxy.presign_claim import RETRY_AFTER, Claim, new_claim
from s3proxy.presign_completed import (
    PARTS_DIFFER,
    answer,
    check_later,
    delete_unchecked,
    done_meanwhile,
    held_to_size,
)
from s3proxy.presign_identity import (
    SIZE_META,
    Context,
    completed_upload,
    etag_value,
    gone_hint,
    replaced,
)
from s3proxy.s3 import (
    InvalidParts,
    NoSuchUpload,
    ObjectOptions,
    PartInfo,
    PreconditionFailed,
    S3Error,
    refuse_stored,
)
from s3proxy.state import STATE

log = logging.getLogger("s3proxy.presign")

MAX_PARTS_PER_CALL = 1000  # part URLs signed per request, as S3 pages ListParts
METHODS = ("put", "post")

_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+", re.ASCII)


# --- routes -----------------------------------------------------------------------


def add_routes(app: web.Application) -> None:
    """Register the signing routes."""
    app.router.add_post("/sign", sign, expect_handler=expect)
    app.router.add_post("/sign/multipart", create_multipart, expect_handler=expect)
    app.router.add_post("/sign/multipart/parts", sign_parts, expect_handler=expect)
    app.router.add_get("/sign/multipart/parts", list_parts, expect_handler=expect)
    app.router.add_post("/sign/multipart/complete", complete_multipart, expect_handler=expect)
    app.router.add_post("/sign/multipart/abort", abort_multipart, expect_handler=expect)


#: The routes that start an upload: refused while draining (``_context``).
_NEW_UPLOADS = frozenset({"/sign", "/sign/multipart"})


async def expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: what the headers alone refuse (shutdown, credentials, a
    coding, a digest of the body, a Content-Length over --max-sign-body) is answered
    before the client sends a byte of body, as on /upload. aiohttp's default handler
    sent 100 Continue first (reprobe20b: a client with no credentials was asked for its
    body, then refused 401)."""

    async def check() -> None:
        await _context(request, new_upload=request.path in _NEW_UPLOADS)
        check_request(request)
        _check_body_headers(request)

    return await expect_answer(request, check)


# --- requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileRequest:
    """One file a client wants to upload straight to S3, as it declared it."""

    filename: str
    content_type: str
    size: int
    method: str
    sha256: bytes | None = None  # declared: signed into a PUT, so S3 refuses other bytes


async def _context(request: web.Request, *, new_upload: bool = False) -> Context:
    """Authenticate; while draining, refuse to start uploads but let running ones finish."""
    state = request.app[STATE]
    if new_upload and state.draining:
        raise ProxyError(SHUTTING_DOWN, "the proxy is shutting down; retry on another instance")
    principal = state.auth.authenticate(request)
    return Context(state, principal, state.require_sink())


def _check_body_headers(request: web.Request) -> None:
    """What a body's headers refuse: a digest of it, a Content-Length over the limit."""
    refuse_body_digests(request.headers, SIGN_DIGEST_HINT)
    limit = request.app[STATE].settings.max_sign_body
    length = request.content_length
    if length is not None and length > limit:
        raise ProxyError(
            REQUEST_TOO_LARGE, f"request body of {length} bytes is over the limit of {limit} bytes"
        )


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; anything else is the client's fault, never a 500.

    Read like an upload's body (form.ClientWatch): 408 once the client sends nothing
    for ``--client-timeout`` or too slowly, 413 past ``--max-sign-body`` (declared or
    as it arrives), so a stalled or huge body holds at most that many bytes.
    """
    from s3proxy.form import ClientWatch

    _check_body_headers(request)  # before a byte of the body is read
    settings = request.app[STATE].settings
    limit = settings.max_sign_body
    content = request.content
    watch = ClientWatch(
        lambda: content.total_bytes,
        settings.client_timeout,
        limit,
        settings.min_upload_rate,
        settings.min_rate_window,
    )
    raw = bytearray()
    while chunk := await watch.read(content.readany):
        raw += chunk
    # aiohttp raises this; to be sure. Not for a coded body: its Content-Length counts coded
    # bytes (a gzip JSON body is longer than the JSON; reprobe17a F1: 400 CLIENT_DISCONNECTED)
    due = read_length(request)
    if due is not None and len(raw) < due:
        raise ProxyError(
            CLIENT_DISCONNECTED, "the client closed the connection before the body was complete"
        )
    try:
        # ValueError covers bad UTF-8 and numbers past Python's int-string limit;
        # RecursionError, nesting past the interpreter's limit ("[" * 100_000).
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProxyError(INVALID_REQUEST, "the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ProxyError(INVALID_REQUEST, "the request body must be a JSON object")
    return body


def _string(body: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ProxyError(INVALID_REQUEST, f"{name!r} must be a non-empty string")
    return value


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProxyError(INVALID_REQUEST, f"{name!r} must be a non-negative integer")
    return value


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def parse_file_request(body: Mapping[str, Any]) -> FileRequest:
    """The declared file; an empty or missing type is guessed from the name."""
    filename = _string(body, "filename")
    size = _integer(body.get("size"), "size")
    method = body.get("method", "put")
    if method not in METHODS:
        raise ProxyError(INVALID_REQUEST, '\'method\' must be "put" or "post"')
    declared = _string(body, "content_type", required=False)
    ctype = declared.split(";")[0].strip().lower()
    if not ctype:
        ctype = sniff.guess_from_name(filename) or sniff.OCTET_STREAM
    if not _TYPE.fullmatch(ctype):
        raise ProxyError(INVALID_REQUEST, f"'content_type' {declared!r} is not like image/png")
    digest = body.get("sha256")
    sha256 = None
    if digest is not None:
        if not (isinstance(digest, str) and _SHA256_HEX.fullmatch(digest)):
            raise ProxyError(INVALID_REQUEST, "'sha256' must be 64 hex digits (as /upload reports)")
        if method != "put":
            raise ProxyError(
                INVALID_REQUEST,
                '\'sha256\' needs "method": "put" (S3\'s POST policy cannot hold a checksum)',
            )
        sha256 = bytes.fromhex(digest)
    return FileRequest(filename, ctype, size, str(method), sha256)


def check_file(ctx: Context, file: FileRequest) -> None:
    """The proxy's and the token's limits on a declared file (nothing can be sniffed)."""
    settings = ctx.settings
    if file.size > settings.max_file_size:
        raise ProxyError(
            FILE_TOO_LARGE,
            f"file of {file.size} bytes is over the limit of {settings.max_file_size} bytes",
        )
    if not sniff.allowed(file.content_type, settings.allow_type):
        raise ProxyError(
            TYPE_NOT_ALLOWED,
            f"type {file.content_type} is not allowed; allowed: {', '.join(settings.allow_type)}",
        )
    grant = ctx.principal.grant
    if grant is None:
        return
    if grant.max_size is not None and file.size > grant.max_size:
        raise ProxyError(
            TOKEN_SCOPE, f"the upload token allows {grant.max_size} bytes; the file has {file.size}"
        )
    if grant.types and not sniff.allowed(file.content_type, grant.types):
        raise ProxyError(
            TOKEN_SCOPE,
            f"type {file.content_type} is outside the upload token's {', '.join(grant.types)}",
        )


def _new_key(ctx: Context, filename: str) -> str:
    try:
        return ctx.key_policy.new_key(filename, "file")
    except ValueError as exc:
        raise ProxyError(INVALID_REQUEST, f"cannot make an object key: {exc}") from None


def _client_key(ctx: Context, body: Mapping[str, Any]) -> str:
    """A key the client sends back: well-formed, and under what it may touch."""
    key = _string(body, "key")
    try:
        ctx.key_policy.check(key)
    except keys.KeyRefused as exc:
        raise ProxyError(INVALID_REQUEST if exc.too_long else KEY_FORBIDDEN, str(exc)) from None
    return key


def plausible_upload_id(text: str) -> bool:
    """Could a store have made this upload id? Pure. Stores make opaque tokens (AWS:
    base64url; moto drops ``/`` from its base64; SeaweedFS: hex) that go into a URL's query;
    a path (``/``, ``\\``, ``.``, ``..``) is none, and SeaweedFS refuses it as InvalidRequest,
    which would be a 502 counted against S3 for the client's fault."""
    return (
        0 < len(text) <= 1024
        and text.isprintable()
        and not any(c in text for c in "/\\")
        and text not in (".", "..")
    )


def _upload_id(body: Mapping[str, Any]) -> str:
    upload_id = _string(body, "upload_id")
    if not plausible_upload_id(upload_id):
        raise ProxyError(INVALID_REQUEST, "'upload_id' is not a multipart upload id")
    return upload_id


def _options(ctx: Context, file: FileRequest, metadata: Mapping[str, str]) -> ObjectOptions:
    """What the object is created with: as ``POST /upload`` sets it, type as declared."""
    return ctx.state.config.objects.options(file.content_type, file.filename, metadata)


@contextlib.contextmanager
def _client_faults() -> Iterator[None]:
    """A missing upload or a bad part list is the client's fault, not an upstream one."""
    try:
        yield
    except NoSuchUpload as exc:
        raise ProxyError(
            NO_SUCH_UPLOAD, "no such multipart upload (completed, aborted or never made)"
        ) from exc
    except InvalidParts as exc:
        raise ProxyError(INVALID_REQUEST, f"S3 refused the parts: {exc.reason}") from exc


# --- single-request uploads ---------------------------------------------------------


async def sign(request: web.Request) -> web.Response:
    """A presigned PUT or POST for one file of at most --presign-multipart-threshold."""
    ctx = await _context(request, new_upload=True)
    file = parse_file_request(await _json_body(request))
    check_file(ctx, file)
    if file.size > ctx.settings.presign_multipart_threshold:
        return web.json_response(
            {
                "multipart": True,
                "endpoint": "/sign/multipart",
                "threshold": ctx.settings.presign_multipart_threshold,
            }
        )
    key = _new_key(ctx, file.filename)
    options = _options(ctx, file, {})
    expires_at = int(time.time()) + ctx.expires_in
    out: dict[str, Any] = {"multipart": False, "key": key, "bucket": ctx.bucket}
    if file.method == "put":
        only_new = ctx.writes.if_none_match
        if only_new:
            await refuse_stored(ctx.sink, key)
        put = await ctx.sink.presign_put(
            key, file.size, options, ctx.expires_in, if_none_match=only_new, sha256=file.sha256
        )
        out.update(method="PUT", url=put.url, headers=dict(put.headers))
    elif ctx.writes.if_none_match and not ctx.writes.unique_keys:  # a shared key, no overwrite
        raise ProxyError(
            INVALID_REQUEST,
            "a presigned POST cannot refuse to overwrite (S3's POST policy has no "
            'If-None-Match) and keys here are shared (--no-overwrite): use "method": "put"',
        )
    else:
        # Exactly the declared size, as a PUT signs Content-Length: the size the
        # limits were checked against is the size stored.
        post = await ctx.sink.presign_post(key, file.size, options, ctx.expires_in)
        out.update(method="POST", url=post.url, fields=dict(post.fields))
    out.update(expires_at=expires_at, object_url=await ctx.sink.object_url(key))
    log.info(
        "presign.signed key=%s method=%s size=%d by=%s",
        key,
        out["method"],
        file.size,
        ctx.principal.subject,
    )
    return web.json_response(out)


# --- multipart uploads --------------------------------------------------------------


async def create_multipart(request: web.Request) -> web.Response:
    """Start a multipart upload the browser fills with presigned part PUTs. On a shared
    key it gets a nonce, carried by S3 onto its object, and a record of it that tells its
    completes which object is its own (``presign_record``)."""
    ctx = await _context(request, new_upload=True)
    file = parse_file_request(await _json_body(request))
    check_file(ctx, file)
    key = _new_key(ctx, file.filename)
    if ctx.writes.if_none_match:
        await refuse_stored(ctx.sink, key)
    nonce = None if ctx.writes.unique_keys else uuid.uuid4().hex
    options = _options(ctx, file, upload_metadata(file.size, nonce))
    upload_id = await ctx.sink.create(key, options, shared=not ctx.writes.unique_keys)
    if nonce is not None:
        await _write_record(ctx, key, upload_id, nonce)
    plan = parts.plan_parts(ctx.settings.part_size, file.size, ctx.settings.max_file_size)
    log.info(
        "presign.multipart_created key=%s upload_id=%s size=%d by=%s",
        key,
        upload_id,
        file.size,
        ctx.principal.subject,
    )
    return web.json_response(
        {
            "key": key,
            "bucket": ctx.bucket,
            "upload_id": upload_id,
            "size": file.size,
            "content_type": file.content_type,
            "part_size": plan.base,
            "part_count": plan.parts_for(file.size),
            "object_url": await ctx.sink.object_url(key),
        }
    )


def upload_metadata(size: int, nonce: str | None) -> dict[str, str]:
    """A presigned multipart upload's metadata: the signed size and, on a shared key, its
    nonce (``keys.NONCE_META``). Two small values of the proxy's own, always well within
    S3's 2 KB (``keys.NONCE_BYTES`` is the nonce's share), since a presigned upload stores
    no client metadata. Pure."""
    meta = {SIZE_META: str(size)}
    if nonce is not None:
        meta[keys.NONCE_META] = nonce
    return meta


async def _write_record(ctx: Context, key: str, upload_id: str, nonce: str) -> None:
    """Write the upload's record; if that fails (or is cancelled), abort the upload and
    raise: an upload whose completes could not tell its object is not handed out."""
    try:
        await presign_record.write(ctx.sink, key, upload_id, nonce)
    except BaseException:
        aborted = await run_cleanup(
            lambda: ctx.sink.abort(key, upload_id),
            f"abort key={key} upload_id={upload_id}",
            ctx.state.janitor,
            kind=Kind.UPLOAD,
        )
        # abort_owed: the janitor retries it (said "aborted" while it had failed)
        action = "aborted" if aborted else "abort_owed"
        log.warning("presign.record_failed key=%s upload_id=%s action=%s", key, upload_id, action)
        raise


def _part_numbers(body: Mapping[str, Any]) -> list[int]:
    numbers = body.get("part_numbers")
    if not isinstance(numbers, list) or not numbers:
        raise ProxyError(INVALID_REQUEST, "'part_numbers' must be a non-empty list")
    if len(numbers) > MAX_PARTS_PER_CALL:
        raise ProxyError(INVALID_REQUEST, f"at most {MAX_PARTS_PER_CALL} part numbers per request")
    out = [_integer(n, "part_numbers[]") for n in numbers]
    if any(not 1 <= n <= parts.MAX_PARTS for n in out) or len(set(out)) != len(out):
        raise ProxyError(
            INVALID_REQUEST, f"part numbers must be distinct and within 1..{parts.MAX_PARTS}"
        )
    return out


async def sign_parts(request: web.Request) -> web.Response:
    """Presigned UploadPart URLs; ask again for fresh ones when they expire."""
    ctx = await _context(request)
    body = await _json_body(request)
    key, upload_id = _client_key(ctx, body), _upload_id(body)
    numbers = _part_numbers(body)
    # One cheap call so a wrong or finished upload fails here, not in the browser.
    with _client_faults():
        await ctx.sink.list_parts(key, upload_id, max_parts=1)
    expires_at = int(time.time()) + ctx.expires_in
    urls = []
    for n in numbers:
        url = await ctx.sink.presign_part(key, upload_id, n, ctx.expires_in)
        urls.append({"part_number": n, "url": url})
    return web.json_response(
        {"key": key, "upload_id": upload_id, "parts": urls, "expires_at": expires_at}
    )


async def _uploaded_parts(ctx: Context, key: str, upload_id: str) -> list[PartInfo]:
    """Every part S3 holds for the upload."""
    with _client_faults():
        return await ctx.sink.list_parts(key, upload_id)


def _parts_json(found: Sequence[PartInfo]) -> list[dict[str, Any]]:
    # Unquoted, as /upload reports etags: JSON needs no HTTP entity-tag quotes.
    return [{"part_number": p.number, "etag": p.etag.strip('"'), "size": p.size} for p in found]


async def list_parts(request: web.Request) -> web.Response:
    """The parts already uploaded, so a browser can resume after a reload."""
    ctx = await _context(request)
    key, upload_id = _client_key(ctx, request.query), _upload_id(request.query)
    found = await _uploaded_parts(ctx, key, upload_id)
    return web.json_response({"key": key, "upload_id": upload_id, "parts": _parts_json(found)})


def _claimed_parts(body: Mapping[str, Any]) -> dict[int, str] | None:
    """The client's ``parts`` list as {number: etag, ``etag_value``}; None if it sent none.
    A part listed twice is refused (400), as S3 refuses such a list: a dict would keep
    one of them and so accept a list S3 would not."""
    given = body.get("parts")
    if given is None:
        return None
    if not isinstance(given, list):  # an object was read as its keys: {} as no parts
        raise ProxyError(INVALID_REQUEST, "'parts' must be a list of {part_number, etag}")
    try:
        pairs = [
            (_integer(p["part_number"], "part_number"), etag_value(str(p["etag"]))) for p in given
        ]
    except (TypeError, KeyError):
        raise ProxyError(INVALID_REQUEST, "'parts' must be a list of {part_number, etag}") from None
    claimed = dict(pairs)
    if len(claimed) != len(pairs):  # (counted once: a pairwise count of 10,000 parts took 5 s)
        counts = collections.Counter(n for n, _ in pairs)
        twice = min(n for n, times in counts.items() if times > 1)
        raise ProxyError(INVALID_REQUEST, f"'parts' lists part {twice} more than once")
    return claimed


def _listed(found: Sequence[PartInfo]) -> dict[int, str]:
    """The parts S3 listed, as ``_claimed_parts`` gives a client's."""
    return {p.number: etag_value(p.etag) for p in found}


def _check_parts(ctx: Context, body: Mapping[str, Any], found: Sequence[PartInfo]) -> int:
    """Refuse to complete a gappy, unexpected or oversized upload; return its size."""
    if not found:
        raise ProxyError(INVALID_REQUEST, "no part has been uploaded")
    numbers = [p.number for p in found]
    if numbers != list(range(1, len(found) + 1)):
        missing = min(set(range(1, max(numbers) + 1)) - set(numbers))
        raise ProxyError(INVALID_REQUEST, f"part {missing} has not been uploaded")
    claimed = _claimed_parts(body)
    if claimed is not None and claimed != _listed(found):
        raise ProxyError(INVALID_REQUEST, PARTS_DIFFER)
    size = sum(p.size for p in found)
    limit = ctx.settings.max_file_size
    if size > limit:
        raise ProxyError(FILE_TOO_LARGE, f"the parts hold {size} bytes; the limit is {limit}")
    grant = ctx.principal.grant
    if grant is not None and grant.max_size is not None and size > grant.max_size:
        raise ProxyError(
            TOKEN_SCOPE, f"the upload token allows {grant.max_size} bytes; the parts hold {size}"
        )
    return size


@dataclass
class _Progress:
    """How far a complete got: what a shutdown that cuts it logs."""

    stage: str = "claiming"


# What a complete cut by shutdown tells the client, and its log line the operator.
CUT_MESSAGE = (
    "the proxy is shutting down before this complete was decided: retry the complete (on "
    "another instance); it answers 200 with the object once it is stored, 404 NO_SUCH_UPLOAD "
    "if it never was"
)
# What a complete whose Complete went unanswered tells the client (reprobe9a F1).
LATE_ADVICE = (
    "S3 may still carry the complete out: retry the complete; it answers 200 with the "
    "object once S3 stored it, or completes the upload itself"
)


CUT_ADVICE = (
    "the object (if S3 stored it) is owed its webhook and size check to the client's retried "
    "complete; if none comes, nothing reports it: check it by hand (its size must be its "
    "x-amz-meta-s3proxy-size)"
)


async def complete_multipart(request: web.Request) -> web.Response:
    """Complete from the parts S3 holds, then hold the object to the size signed at create.

    One complete of an upload at a time, on every instance (``presign_claim``): another
    is answered 409 COMPLETE_IN_PROGRESS with Retry-After, so no complete answers 200 for
    an object another may still delete. No object that was not held to its size stays
    while the client is told of a failure: if S3 may have completed (Complete's answer
    lost) the object is looked for and checked; if it cannot be checked (HeadObject fails)
    it is deleted. A complete retried after a lost answer finds the upload gone and the
    object there, and checks it then (its parts too, if the client lists them).

    Counted as an upload at shutdown: given --shutdown-timeout, then cut and answered 503
    SHUTTING_DOWN, the object (if any) kept for the retried complete to answer for."""
    ctx = await _context(request)
    body = await _json_body(request)
    key, upload_id = _client_key(ctx, body), _upload_id(body)
    state = ctx.state
    task = asyncio.current_task()
    progress = _Progress()
    with state.track(task):
        try:
            return await _complete_claimed(ctx, body, key, upload_id, progress)
        except asyncio.CancelledError:
            shutdown = task is not None and state.stopped_by_shutdown(task)
            log.warning(
                "presign.complete_cut key=%s upload_id=%s stage=%s reason=%s; %s",
                key,
                upload_id,
                progress.stage,
                SHUTTING_DOWN.code if shutdown else "cancelled",
                CUT_ADVICE,
            )
            if not shutdown:
                raise
        except ProxyError as err:
            if err.kind is not COMPLETE_IN_PROGRESS:
                raise
            log.info("presign.complete_in_progress key=%s upload_id=%s", key, upload_id)
            resp = error_response(err)
            resp.headers[hdrs.RETRY_AFTER] = str(RETRY_AFTER)
            return resp
    resp = error_response(ProxyError(SHUTTING_DOWN, CUT_MESSAGE))
    resp.force_close()
    return resp


async def _complete_claimed(
    ctx: Context, body: Mapping[str, Any], key: str, upload_id: str, progress: _Progress
) -> web.Response:
    """The complete, under the upload's claim; released once it has decided (after the
    rechecks of a write that may land late, if it owes any)."""
    janitor = ctx.state.janitor
    claim = new_claim(ctx.sink, ctx.settings, key, upload_id)
    await claim.take(key, upload_id, ctx.settings.cleanup_clock_skew, janitor)
    try:
        return await _complete(ctx, claim, body, key, upload_id, progress)
    finally:
        if claim.hold_for:
            claim.release_after(janitor, claim.hold_for)
        else:
            await claim.release(janitor)


async def _complete(
    ctx: Context,
    claim: Claim,
    body: Mapping[str, Any],
    key: str,
    upload_id: str,
    progress: _Progress,
) -> web.Response:
    progress.stage = "listing"
    try:
        found = await _uploaded_parts(ctx, key, upload_id)
    except ProxyError as exc:
        # S3's refusal: completed (by another complete, or ours with its answer lost),
        # aborted or never made. Only then is the object looked for; any other failure
        # is S3's and is answered as such.
        if exc.kind is not NO_SUCH_UPLOAD:
            raise
        if (done := await done_meanwhile(ctx, claim, _claimed_parts(body), key, upload_id)) is None:
            seen = ctx.seen.get((key, upload_id))
            parts_given = _claimed_parts(body) is not None
            hint = gone_hint(seen, parts_given, presign_record.retention(ctx.settings))
            if not hint:
                raise
            raise ProxyError(NO_SUCH_UPLOAD, f"{exc.message}; {hint}") from exc
        return done
    # SeaweedFS lists no part for a moment after a complete
    if not found and (
        done := await done_meanwhile(ctx, claim, _claimed_parts(body), key, upload_id)
    ):
        return done
    _check_parts(ctx, body, found)
    listed = _listed(found)
    progress.stage = "completing"
    try:
        with _client_faults():
            try:
                written = await ctx.sink.complete(
                    key,
                    upload_id,
                    [(p.number, p.etag) for p in found],
                    if_none_match=ctx.writes.if_none_match,
                )
            except PreconditionFailed:
                # ours, if an earlier attempt stored it (recognised by its parts on a shared key)
                done = await done_meanwhile(
                    ctx, claim, _claimed_parts(body), key, upload_id, listed=listed
                )
                if done is not None:
                    return done
                # A refused Complete leaves the upload open: abort it, whatever happens.
                await run_cleanup(
                    lambda: ctx.sink.abort(key, upload_id),
                    f"abort key={key} upload_id={upload_id}",
                    ctx.state.janitor,
                    kind=Kind.UPLOAD,
                )
                raise ProxyError(
                    KEY_EXISTS,
                    f"an object is already stored at {key!r}; uploads do not replace objects "
                    "(--no-overwrite); the multipart upload was aborted",
                ) from None
    except ProxyError as exc:
        # S3 may have completed and only its answer was lost (a retry then says
        # NoSuchUpload), or an earlier complete of this upload did (S3 refuses the parts).
        # That Complete may still land late (its answer was lost, or another's was).
        if exc.kind is KEY_EXISTS:
            raise
        done = None
        try:
            done = await done_meanwhile(
                ctx, claim, _claimed_parts(body), key, upload_id, listed=listed, late=True
            )
        finally:
            if done is None and exc.kind in UPSTREAM_KINDS:
                # Not stored yet, or not found (HeadObject failed): S3 may carry the Complete
                # out after this answer. Checked later, as a retried complete would.
                check_later(ctx, key, upload_id, listed)
        if done is not None:
            return done
        if exc.kind in UPSTREAM_KINDS:
            raise ProxyError(exc.kind, f"{exc.message}; {LATE_ADVICE}") from exc
        raise
    progress.stage = "checking"
    try:
        head = await ctx.sink.head(key)
        other = await replaced(ctx, key, upload_id, head)
    except S3Error:
        await delete_unchecked(ctx, claim, key, upload_id, listed, written)
        raise
    if other:
        log.info(
            "presign.replaced key=%s upload_id=%s; another upload's object stands", key, upload_id
        )
        why = (
            "S3 completed another upload of it at the same moment"
            if ctx.writes.if_none_match
            else "another upload replaced this one's at once (--no-overwrite false)"
        )
        raise ProxyError(
            KEY_EXISTS,
            f"another upload's object is stored at {key!r}: {why}; this upload's bytes "
            "are not stored",
        )
    late = written.may_land_late
    out = await held_to_size(ctx, key, upload_id, head, len(found), late=late)
    progress.stage = "notifying"
    return await answer(ctx, claim, out, head, upload_id, late=late, ours=True, parts=listed)


async def abort_multipart(request: web.Request) -> web.Response:
    """Abort; an upload already gone counts as aborted, so retries are safe. Not one S3
    had completed (it answers that abort NoSuchUpload too): its object stands, and the
    abort is answered 403 UPLOAD_COMPLETE, as a tus DELETE of a finished upload (it said
    "aborted": true while the object stayed stored; reprobe13a N1)."""
    ctx = await _context(request)
    body = await _json_body(request)
    key, upload_id = _client_key(ctx, body), _upload_id(body)
    await ctx.sink.abort(key, upload_id)  # an upload already gone counts as aborted
    if await completed_upload(ctx, key, upload_id):
        log.info("presign.abort_refused key=%s upload_id=%s reason=completed", key, upload_id)
        raise ProxyError(
            UPLOAD_COMPLETE,
            f"S3 had completed the upload before the abort: its object is stored at {key!r} "
            "(unless the complete still deciding rolls it back); nothing was aborted",
        )
    if not ctx.writes.unique_keys:
        # One left by a failure here goes with the sweep.
        await run_cleanup(
            lambda: presign_record.forget(ctx.sink, key, upload_id),
            f"forget key={key} upload_id={upload_id}",
            None,
            kind=Kind.OBJECT,
        )
    log.info("presign.multipart_aborted key=%s upload_id=%s", key, upload_id)
    return web.json_response({"key": key, "upload_id": upload_id, "aborted": True})
