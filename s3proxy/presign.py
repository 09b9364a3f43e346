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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import hdrs, web

from s3proxy import keys, parts, presign_record, sniff
from s3proxy.auth import Principal
from s3proxy.disposition import parse_form_disposition
from s3proxy.errors import (
    CLIENT_DISCONNECTED,
    COMPLETE_IN_PROGRESS,
    FILE_TOO_LARGE,
    INVALID_REQUEST,
    KEY_EXISTS,
    KEY_FORBIDDEN,
    NO_SUCH_UPLOAD,
    SHUTTING_DOWN,
    TOKEN_SCOPE,
    TYPE_NOT_ALLOWED,
    UPLOAD_COMPLETE,
    UPSTREAM_KINDS,
    WEBHOOK_FAILED,
    ProxyError,
    error_response,
)
from s3proxy.handlers import notify, notify_rolled_back, rollback_reason, webhook_failed
from s3proxy.janitor import Cleanup, Kind, late_delays, recheck_late, run_cleanup
from s3proxy.log import REQUEST_ID
from s3proxy.presign_claim import RETRY_AFTER, Claim, new_claim
from s3proxy.presign_record import Record, Verdict
from s3proxy.s3 import (
    InvalidParts,
    NoSuchKey,
    NoSuchUpload,
    ObjectHead,
    ObjectOptions,
    ObjectStore,
    PartInfo,
    PreconditionFailed,
    S3Error,
    refuse_stored,
)
from s3proxy.settings import Settings
from s3proxy.state import STATE, AppState

log = logging.getLogger("s3proxy.presign")

SIZE_META = "s3proxy-size"  # x-amz-meta-s3proxy-size: the size a multipart upload was signed for
MAX_PARTS_PER_CALL = 1000  # part URLs signed per request, as S3 pages ListParts
METHODS = ("put", "post")

_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+", re.ASCII)


# --- routes -----------------------------------------------------------------------


def add_routes(app: web.Application) -> None:
    """Register the signing routes."""
    app.router.add_post("/sign", sign)
    app.router.add_post("/sign/multipart", create_multipart)
    app.router.add_post("/sign/multipart/parts", sign_parts)
    app.router.add_get("/sign/multipart/parts", list_parts)
    app.router.add_post("/sign/multipart/complete", complete_multipart)
    app.router.add_post("/sign/multipart/abort", abort_multipart)


# --- requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileRequest:
    """One file a client wants to upload straight to S3, as it declared it."""

    filename: str
    content_type: str
    size: int
    method: str
    sha256: bytes | None = None  # declared: signed into a PUT, so S3 refuses other bytes


@dataclass(frozen=True)
class Context:
    """What every signing request needs: who asks, and the bucket to ask and sign for."""

    state: AppState
    principal: Principal
    sink: ObjectStore
    # Each upload's record (``presign_record``) as this request read it: once per request,
    # whichever of its paths asks first (a missing one is None).
    records: dict[tuple[str, str], Record | None] = field(
        default_factory=dict, compare=False, repr=False
    )
    # Whose the object at each upload's shared key was, as ``_completed_object`` last
    # judged it (``presign_record.judge``); "none": no object of a presigned upload there.
    # For the 404's hint (``gone_hint``).
    seen: dict[tuple[str, str], Verdict | Literal["none"]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def bucket(self) -> str:
        return self.sink.bucket

    @property
    def expires_in(self) -> int:
        return max(1, math.ceil(self.settings.presign_expiry))

    @property
    def writes(self) -> keys.WritePolicy:
        """--no-overwrite with the key template, as for ``POST /upload``."""
        return keys.write_policy(self.settings.key_template, self.settings.no_overwrite)

    @property
    def key_policy(self) -> keys.KeyPolicy:
        """The keys this principal gets and may touch: the same rule as every route."""
        return keys.KeyPolicy.for_grant(self.settings.key_template, self.principal.grant)


async def _context(request: web.Request, *, new_upload: bool = False) -> Context:
    """Authenticate; while draining, refuse to start uploads but let running ones finish."""
    state = request.app[STATE]
    if new_upload and state.draining:
        raise ProxyError(SHUTTING_DOWN, "the proxy is shutting down; retry on another instance")
    principal = state.auth.authenticate(request)
    return Context(state, principal, state.require_sink())


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; anything else is the client's fault, never a 500.

    Read like an upload's body (form.ClientWatch): 408 once the client sends nothing
    for ``--client-timeout`` or too slowly, 413 past ``--max-sign-body`` (declared or
    as it arrives), so a stalled or huge body holds at most that many bytes.
    """
    from s3proxy.digests import SIGN_DIGEST_HINT, refuse_body_digests
    from s3proxy.errors import REQUEST_TOO_LARGE
    from s3proxy.form import ClientWatch

    refuse_body_digests(request.headers, SIGN_DIGEST_HINT)  # before a byte of the body is read
    settings = request.app[STATE].settings
    limit = settings.max_sign_body
    length = request.content_length
    if length is not None and length > limit:
        raise ProxyError(
            REQUEST_TOO_LARGE, f"request body of {length} bytes is over the limit of {limit} bytes"
        )
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
    if length is not None and len(raw) < length:  # aiohttp raises this; to be sure
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
    upload_id = await ctx.sink.create(key, options)
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


async def _record(ctx: Context, key: str, upload_id: str) -> Record | None:
    """The upload's record, read once per request (``Context.records``); None on a
    ``{uuid}`` key (none is written) or if it has none."""
    if ctx.writes.unique_keys:
        return None
    ref = (key, upload_id)
    if ref not in ctx.records:
        ctx.records[ref] = await presign_record.read(ctx.sink, key, upload_id)
    return ctx.records[ref]


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


_HEX_ETAG = re.compile(r"[0-9a-fA-F]+(-[0-9]+)?")


def etag_value(etag: str) -> str:
    """An ETag as parts lists are compared: unquoted, and a hex one (an MD5, S3's part
    ETags) in lower case, as S3 writes it: ``ABC...`` names the same part as ``abc...``,
    on a first complete as on a retry (``parts_make_etag`` reads the hex either way).
    Pure."""
    bare = etag.strip('"')
    return bare.lower() if _HEX_ETAG.fullmatch(bare) else bare


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


PARTS_DIFFER = "'parts' does not match the parts S3 holds for this upload"


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


_MD5_HEX = re.compile(r"[0-9a-fA-F]{32}")


def parts_make_etag(claimed: Mapping[int, str], etag: str | None) -> bool | None:
    """Do these part ETags make a multipart object's ETag? None: it cannot be told. Pure.

    S3 (and moto, and SeaweedFS: tests/test_presign.py checks both stores) gives a
    completed multipart object the ETag ``md5(etag 1 + ... + etag N)-N``, the parts'
    ETags (32 hex digits: their MD5s, or with SSE-KMS another digest) taken as bytes. A
    store whose object ETags are made so gives its parts such ETags: any other cannot be
    one of its parts. Objects with another kind of ETag cannot be told."""
    digest, dash, count = (etag or "").strip('"').partition("-")
    if not dash or not count.isdigit() or not _MD5_HEX.fullmatch(digest):
        return None  # not a multipart ETag this rule makes
    if sorted(claimed) != list(range(1, int(count) + 1)):
        return False
    if not all(_MD5_HEX.fullmatch(claimed[n]) for n in claimed):
        return False
    joined = b"".join(bytes.fromhex(claimed[n]) for n in sorted(claimed))
    return hashlib.md5(joined, usedforsecurity=False).hexdigest() == digest.lower()


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
SHARED_KEY_HINT = (  # to an upload with no record: made before records (a rolling upgrade)
    "keys are shared here (no {uuid}): list the upload's 'parts' to have its completed "
    "object recognised"
)
# What stands at a shared key whose object carries a nonce while the upload has no record.
UNTOLD = (
    "the object at the key carries an upload's nonce but this upload's record is gone, so "
    "the proxy cannot tell whether it is this upload's"
)


def gone_hint(seen: Verdict | Literal["none"] | None, parts_given: bool, retention: float) -> str:
    """What a shared-key complete's 404 adds, by the object it found (``Context.seen``): an
    object with no nonce and no record is an upload's made before records (a rolling
    upgrade), recognised by its ``parts``; one with a nonce and no record cannot be told:
    listing the parts told nothing (the record was swept or forgotten), and the log blamed
    "another upload" for the upload's own object (reprobe12b F4). "" for none. Pure."""
    if seen == "untold":
        return (
            f"{UNTOLD} (its record goes {retention / 60:.0f} minutes after the upload was "
            "completed, or with its abort): it is not answered for"
        )
    if seen == "legacy" and not parts_given:
        return SHARED_KEY_HINT
    return ""


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
        if (done := await _done_meanwhile(ctx, claim, body, key, upload_id)) is None:
            seen = ctx.seen.get((key, upload_id))
            parts_given = _claimed_parts(body) is not None
            hint = gone_hint(seen, parts_given, presign_record.retention(ctx.settings))
            if not hint:
                raise
            raise ProxyError(NO_SUCH_UPLOAD, f"{exc.message}; {hint}") from exc
        return done
    # SeaweedFS lists no part for a moment after a complete
    if not found and (done := await _done_meanwhile(ctx, claim, body, key, upload_id)):
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
                done = await _done_meanwhile(ctx, claim, body, key, upload_id, listed=listed)
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
            done = await _done_meanwhile(ctx, claim, body, key, upload_id, listed=listed, late=True)
        finally:
            if done is None and exc.kind in UPSTREAM_KINDS:
                # Not stored yet, or not found (HeadObject failed): S3 may carry the Complete
                # out after this answer. Checked later, as a retried complete would.
                _check_later(ctx, key, upload_id, listed)
        if done is not None:
            return done
        if exc.kind in UPSTREAM_KINDS:
            raise ProxyError(exc.kind, f"{exc.message}; {LATE_ADVICE}") from exc
        raise
    progress.stage = "checking"
    try:
        head = await ctx.sink.head(key)
    except S3Error:
        # Not held to its size, and the client is told it failed: it must not stay. Unless
        # the delete fails too: a retried complete may then find it, check it and answer
        # 200, so the janitor checks it too rather than delete what the client was told
        # is stored.
        skipped = _LeftStanding(ctx, claim, key, upload_id, listed)
        whose = await _whose(ctx, key, upload_id)
        delete = claim.guarded(
            _OwnDelete(ctx, key, upload_id, written.etag, "size_unchecked"),
            f"key={key} delete=size_unchecked",
            skipped,
        )
        if written.may_land_late:
            _again_later(ctx, delete, key, hold=claim, whose=whose)
        await run_cleanup(
            delete,
            f"delete {whose} reason=size_unchecked",
            ctx.state.janitor,
            kind=Kind.OBJECT_SIZE_UNCHECKED,
            retry=_as_request(lambda: _hold_later(ctx, key, upload_id, listed)),
        )
        action = "kept" if skipped.ran else "delete"
        log.info("presign.size_unchecked key=%s upload_id=%s action=%s", key, upload_id, action)
        raise
    late = written.may_land_late
    out = await _held_to_size(ctx, key, upload_id, head, len(found), late=late)
    progress.stage = "notifying"
    return await _answer(ctx, claim, out, head, upload_id, late=late, ours=True, parts=listed)


async def _whose(ctx: Context, key: str, upload_id: str) -> str:
    """What names this upload's object in a cleanup's log line (``cleanup.abandoned`` at
    shutdown tells an operator what to delete by hand): its upload id and, on a shared
    key, the nonce its object carries, as ``POST /upload``'s lines do; without it the
    failed upload's object and one that replaced it could not be told (reprobe13a N2).
    The record is read once per request; unread (S3 failing), the line goes without."""
    with contextlib.suppress(S3Error, ProxyError):
        await _record(ctx, key, upload_id)
    return _named(ctx, key, upload_id)


def _named(ctx: Context, key: str, upload_id: str) -> str:
    """``_whose`` from the record as this request read it, if it did (no S3 call: for a
    rollback, which nothing may hold up)."""
    record = ctx.records.get((key, upload_id))
    nonce = "" if record is None else f" nonce={record.nonce}"
    return f"key={key} upload_id={upload_id}{nonce}"


def _again_later(
    ctx: Context,
    delete: Callable[[], Awaitable[None]],
    key: str,
    hold: Claim | None,
    whose: str = "",
) -> None:
    """Make a delete of the completed object again later (``janitor.recheck_late``): an
    attempt of its Complete went unanswered and S3 may carry it out after the delete.
    ``hold``: the object may be the right size, so the claim is held until the last
    recheck has landed (a complete that took it over sooner could answer 200 for the
    object the recheck then deletes); a wrong-sized one nobody answers 200 for."""
    log.info("presign.late_write_possible key=%s action=recheck", key)
    window = 2 * ctx.settings.s3_read_timeout
    what = f"delete {whose or f'key={key}'}"
    recheck_late(ctx.state.janitor, _as_request(delete), what, window)
    if hold is not None:
        hold.hold_for = max((*late_delays(window), 0.0)) + hold.bound


async def _done_meanwhile(
    ctx: Context,
    claim: Claim,
    body: Mapping[str, Any],
    key: str,
    upload_id: str,
    *,
    listed: Mapping[int, str] | None = None,
    late: bool = False,
) -> web.Response | None:
    """The answer to a complete whose upload an earlier complete may have completed (a
    client's retry, through another instance or after a lost answer; under the claim,
    that one has decided, or died): S3 then refuses the upload, lists no parts
    (SeaweedFS, for a moment), refuses the parts or the precondition. The object found is
    checked against the client's ``parts`` (400 if they cannot have made it) and held to
    its size as a retried complete would; None if there is none, and the refusal stands.
    Only this upload's object is found (``_completed_object``: on a shared key the one
    carrying its record's nonce, so the client's ``parts`` are only checked against it;
    for an upload made before records, by the parts S3 ``listed`` before the Complete,
    else the client's, and, where S3 listed them and so may not have completed this
    upload, only once it no longer lists the upload). It is not rolled back if the
    webhook fails: the complete that made it may have answered 200 for it."""
    claimed = _claimed_parts(body)
    parts = claimed if listed is None else listed
    # no listing: S3 said the upload is gone
    head = await _completed_object(ctx, key, upload_id, parts, maybe_open=listed is not None)
    if head is None:
        return None
    if claimed is not None and parts_make_etag(claimed, head.etag) is False:
        raise ProxyError(INVALID_REQUEST, PARTS_DIFFER)
    out = await _held_to_size(ctx, key, upload_id, head, late=late)
    return await _answer(ctx, claim, out, head, upload_id, late=late, ours=False)


async def _completed_object(
    ctx: Context,
    key: str,
    upload_id: str,
    parts: Mapping[int, str] | None,
    *,
    maybe_open: bool,
) -> ObjectHead | None:
    """The object this presigned upload's complete made at ``key``, if it stands: one with
    the signed size in its metadata (one of ours), and where keys are shared (no
    ``{uuid}``) only one carrying the nonce of the upload's record (``presign_record``),
    which also proves S3 carried this upload's Complete out. Another upload's object there
    is not ours, even of the same bytes: the same multipart ETag made the ETag alone
    answer 200 for it, announce it and delete it (reprobe11a R1-R4). With no record, an
    object with a nonce cannot be told (it may be this upload's, its record swept or
    forgotten: ``presign.untold``) and is not taken; one with none (an upload made before
    records, in a rolling upgrade) is told as it was: by the multipart ETag these
    ``parts`` make (``parts_make_etag``; with no parts to tell it, none is), and,
    ``maybe_open`` (S3 may not have completed this upload), only once S3 no longer lists
    the upload (``_upload_open``: while it does, its Complete was refused or never carried
    out). What it found is noted in ``Context.seen`` (for the 404's hint). S3's failures
    propagate, and a record that cannot be read (``presign_record.CorruptRecord``)."""
    ref = (key, upload_id)
    try:
        head = await ctx.sink.head(key)
    except NoSuchKey:
        ctx.seen[ref] = "none"
        return None
    if SIZE_META not in head.metadata:
        ctx.seen[ref] = "none"
        return None
    if ctx.writes.unique_keys:
        return head
    verdict = ctx.seen[ref] = await _own_object(ctx, key, upload_id, head)
    if verdict != "legacy":
        if verdict != "ours":
            _left(key, upload_id, verdict)
        return head if verdict == "ours" else None
    if not parts or parts_make_etag(parts, head.etag) is not True:
        return None
    if maybe_open and await _upload_open(ctx, key, upload_id):
        log.info(
            "presign.not_ours key=%s upload_id=%s reason=upload_open; the object there is "
            "another upload's of the same bytes",
            key,
            upload_id,
        )
        return None
    return head


async def _own_object(ctx: Context, key: str, upload_id: str, head: ObjectHead) -> Verdict:
    """Whose the object ``head`` saw at a shared key is, by its nonce and the upload's
    record (``presign_record.judge``). A record that cannot be read raises."""
    record = await _record(ctx, key, upload_id)
    return presign_record.judge(
        head.metadata.get(keys.NONCE_META), None if record is None else record.nonce
    )


def _left(key: str, upload_id: str, verdict: Verdict, delete: str | None = None) -> None:
    """The log line of an object left standing at a shared key: another upload's, or one
    that cannot be told (a nonce, and no record: it may be this upload's own)."""
    purpose = "" if delete is None else f" delete={delete}"
    if verdict == "untold":
        log.warning(
            "presign.untold key=%s upload_id=%s reason=no_record%s; the object there carries "
            "a nonce and this upload has no record (swept after the retention, or forgotten "
            "with an abort): it may be this upload's or another's, and stays",
            key,
            upload_id,
            purpose,
        )
        return
    log.info(
        "presign.not_ours key=%s upload_id=%s reason=nonce%s; the object there is another "
        "upload's and stays",
        key,
        upload_id,
        purpose,
    )


async def _upload_open(ctx: Context, key: str, upload_id: str) -> bool:
    """Does S3 still list this upload with its parts? Then no Complete of it has been
    carried out (SeaweedFS lists no parts for a moment after one: that counts as done)."""
    try:
        return bool(await ctx.sink.list_parts(key, upload_id, max_parts=1))
    except NoSuchUpload:
        return False


async def _hold_later(
    ctx: Context,
    key: str,
    upload_id: str,
    parts: Mapping[int, str] | None = None,
    *,
    completed: bool = True,
) -> None:
    """The janitor's retry of a failed complete's delete, or its check of a Complete that
    may have landed after the complete answered: hold the object to its size as a retried
    complete would (delete it if wrong, keep it if right: that complete may have answered
    200 for it). A kept object is told to the webhook, so the application hears of it even
    if no complete is retried (at least once: a retried one told it too); its failure then
    only logs, as ``--webhook-failure keep`` would: a retried complete may have reported
    the object stored. On a shared key only this upload's object (its nonce; before
    records its ``parts``, and unless its Complete is known ``completed``, only once S3 no
    longer lists the upload: ``_completed_object``) is touched."""
    if ctx.writes.unique_keys:
        try:
            head = await ctx.sink.head(key)
        except NoSuchKey:
            return
    elif found := await _completed_object(ctx, key, upload_id, parts, maybe_open=not completed):
        head = found
    else:
        return
    signed = head.metadata.get(SIZE_META, "")
    readable = signed.isascii() and signed.isdigit() and len(signed) <= 20
    if not readable or int(signed) == head.length:  # as _held_to_size judges it
        log.info(
            "presign.checked_later key=%s upload_id=%s size=%d action=kept",
            key,
            upload_id,
            head.length,
        )
        if ctx.state.webhook is not None:
            out = await _held_to_size(ctx, key, upload_id, head)
            body = {"files": [completed_file(out, head)], "fields": {}}
            await notify(ctx.state, body, keep=True)
        return
    # Through the janitor: a check made last (8 x --s3-read-timeout on) whose delete
    # failed was only logged, and the wrong-sized object stayed.
    delete = _OwnDelete(ctx, key, upload_id, head.etag, "checked_later")
    done = await run_cleanup(
        delete,
        f"delete {await _whose(ctx, key, upload_id)} reason=checked_later",
        ctx.state.janitor,
        kind=Kind.OBJECT,
    )
    log.info(
        "presign.checked_later key=%s upload_id=%s signed=%s action=%s",
        key,
        upload_id,
        signed,
        delete_outcome(done, delete)[0],
    )


def _check_later(
    ctx: Context, key: str, upload_id: str, listed: Mapping[int, str], why: str = "late_write"
) -> None:
    """Check the object again 2 x and 8 x --s3-read-timeout on (``janitor.recheck_late``):
    the Complete went unanswered and S3 may carry it out after the complete answered, which
    found nothing (reprobe9a F1: the object stayed, the webhook never heard of it). Each
    check does what a retried complete would (``_check_claimed``), so a retry in between
    and the checks agree. A check holds the claim while it decides (its HeadObject, and a
    kept object's webhook delivery): a retry then is answered 409 COMPLETE_IN_PROGRESS,
    Retry-After 2 (reprobe10a N4; releasing it before the delivery would need
    ``_hold_later`` split in two, for a retryable 409)."""
    if why == "late_write":
        log.info("presign.late_write_possible key=%s upload_id=%s action=check", key, upload_id)
    else:
        log.info(
            "presign.check_owed key=%s upload_id=%s reason=%s action=check", key, upload_id, why
        )

    @_as_request
    async def check() -> None:
        await _check_claimed(ctx, key, upload_id, listed)

    window = 2 * ctx.settings.s3_read_timeout
    recheck_late(ctx.state.janitor, check, f"check key={key}", window, Kind.COMPLETE_UNANSWERED)


async def _check_claimed(ctx: Context, key: str, upload_id: str, listed: Mapping[int, str]) -> None:
    """``_hold_later`` under the upload's claim, as a complete: never while a complete of
    the upload is deciding (it answers for the object, and could roll it back after this
    check told the webhook it is kept); that one is left to decide, and a later check
    looks again."""
    janitor = ctx.state.janitor
    claim = new_claim(ctx.sink, ctx.settings, key, upload_id)
    try:
        await claim.take(key, upload_id, ctx.settings.cleanup_clock_skew, janitor)
    except ProxyError as exc:
        if exc.kind is not COMPLETE_IN_PROGRESS:
            raise
        log.info(
            "presign.checked_later key=%s upload_id=%s action=none reason=complete_in_progress",
            key,
            upload_id,
        )
        return
    try:
        await _hold_later(ctx, key, upload_id, listed, completed=False)
    finally:
        await claim.release(janitor)


@dataclass
class _LeftStanding:
    """What follows a delete the claim skipped (``Claim.guarded``): the object stands.
    Another complete that took the claim over answers for it; if none did (the renewals
    failed, and the claim lapsed on its own), it is checked later under the claim, as after
    a Complete unanswered (``_check_later``), so it is not kept unannounced (reprobe10a
    N2). ``ran``: a delete was skipped; the checks are scheduled once."""

    ctx: Context
    claim: Claim
    key: str
    upload_id: str
    parts: Mapping[int, str] | None
    ran: bool = False

    def __call__(self) -> None:
        first, self.ran = not self.ran, True
        if first and not self.claim.lost:
            _check_later(self.ctx, self.key, self.upload_id, self.parts or {}, "claim_lapsed")


def _as_request(fn: Cleanup) -> Cleanup:
    """``fn``, run under this request's id whenever the janitor runs it: at shutdown it
    runs in the janitor's own task, whose log lines and webhook events said
    ``"request_id": "-"`` (reprobe10a N5)."""
    rid = REQUEST_ID.get()

    async def run() -> None:
        REQUEST_ID.set(rid)
        await fn()

    return run


def _parts_in(etag: str | None) -> int:
    """A multipart object's part count from its ETag (``"<md5>-N"``); 1 if it has none."""
    count = (etag or "").strip('"').rpartition("-")[2]
    return int(count) if count.isdigit() else 1


async def _held_to_size(
    ctx: Context,
    key: str,
    upload_id: str,
    head: ObjectHead,
    parts_count: int | None = None,
    *,
    late: bool = False,
) -> dict[str, Any]:
    """Delete the object if its size is not the one signed at create (400); else its JSON.
    ``late``: the Complete that made it may still land, so a delete is made again later.
    No complete of this upload answers 200 for a wrong size, so this delete needs no
    claim; on a shared key another upload's complete may answer 200 for an object of the
    same bytes meanwhile, which the delete leaves (``_OwnDelete``: by the nonce). For the
    same reason a delete that fails goes to the janitor as it is (``_hold_later`` would
    need the parts to tell an upload's made before records): awaited bare, a DeleteObject
    refused (or the record's GET, or the HeadObject before it) answered 502 and left the
    wrong-sized object for good (reprobe12b F1). The 400 says what became of it."""
    signed = head.metadata.get(SIZE_META)
    stored = head.length
    if signed is None or not (signed.isascii() and signed.isdigit() and len(signed) <= 20):
        # The proxy wrote it at create; anything else is not a size to hold the object to.
        log.warning("presign.size_unchecked key=%s reason=metadata_missing", key)
    elif int(signed) != stored:
        # Only this upload's object: on a shared key another upload's may be there now.
        delete = _OwnDelete(ctx, key, upload_id, head.etag, "size_mismatch")
        whose = await _whose(ctx, key, upload_id)
        done = await run_cleanup(
            delete,
            f"delete {whose} reason=size_mismatch",
            ctx.state.janitor,
            kind=Kind.OBJECT,
        )
        if late:
            _again_later(ctx, delete, key, hold=None, whose=whose)
        action, outcome = delete_outcome(done, delete)
        log.info(
            "presign.size_mismatch key=%s upload_id=%s signed=%s stored=%d action=%s",
            key,
            upload_id,
            signed,
            stored,
            action,
        )
        raise ProxyError(
            INVALID_REQUEST, f"the parts hold {stored} bytes but {signed} were signed; {outcome}"
        )
    if parts_count is None:  # a complete retried after a lost answer: S3 knows
        parts_count = _parts_in(head.etag)
    log.info(
        "presign.multipart_completed key=%s upload_id=%s size=%d parts=%d by=%s",
        key,
        upload_id,
        stored,
        parts_count,
        ctx.principal.subject,
    )
    return {
        "key": key,
        "bucket": ctx.bucket,
        "size": stored,
        "parts": parts_count,
        "etag": (head.etag or "").strip('"'),
        "content_type": head.content_type,
        "object_url": await ctx.sink.object_url(key),
    }


def delete_outcome(done: bool, delete: _OwnDelete) -> tuple[str, str]:
    """(log action, what the answer says) of a wrong-sized object's delete: ``done``, it
    ran to its end (False: it failed and the janitor retries it). Pure."""
    if not done:
        return "delete_owed", "its delete did not finish: the proxy retries it"
    if delete.sent:
        return "deleted", "the object was deleted"
    return "none", left_by(delete.found)


def completed_file(out: Mapping[str, Any], head: ObjectHead) -> dict[str, Any]:
    """The completed object as ``POST /upload`` describes a stored file. Pure. What the
    proxy never saw is null: no form field, no sha256 (it never read the bytes), no
    checksum it verified; the filename is the one signed at create, read back from the
    object's Content-Disposition."""
    disposition = head.content_disposition or ""
    filename = parse_form_disposition(disposition.encode("latin-1", "replace")).filename
    return {
        "field": None,
        "filename": filename,
        "key": out["key"],
        "size": out["size"],
        "content_type": out["content_type"],
        "etag": out["etag"],
        "sha256": None,
        "checksum": None,
        "metadata": {},
    }


@dataclass
class _OwnDelete:
    """Delete this upload's completed object at ``key``; safe to repeat. The one delete
    of every path (rollback, size mismatch, size_unchecked, their repeats after a Complete
    that may land late, the janitor's), so none can forget what follows.

    On a ``{uuid}`` key the key is the upload's own. On a shared key HeadObject first: only
    an object carrying this upload's nonce (its record's; with no record, an upload made
    before records, one with no nonce and this ``etag``) is deleted, with If-Match on the
    ETag read; another upload's stays (``presign.not_ours ... reason=nonce``), even of
    the same bytes (the same ETag: reprobe11a R1, R2, where A's deletes made again later,
    or A's rollback, deleted B's object after B's 200). A HeadObject that fails fails the
    delete (the janitor retries). What remains: with --no-overwrite false another upload
    may replace the object between the HeadObject and the DELETE; if its bytes are the
    same (the same ETag), If-Match lets the DELETE through: S3 has no condition on
    metadata. An object carrying a nonce while the upload has no record cannot be told
    (``presign_record.judge``): it stays (``presign.untold``), as does one whose record
    cannot be read (that fails the delete). ``sent``: a DELETE was sent (it may have
    landed); ``found``: whose object the last run found (``left_by`` words it)."""

    ctx: Context
    key: str
    upload_id: str
    etag: str | None  # the object's as this upload's complete saw it
    purpose: str  # for the log: rollback, size_mismatch, size_unchecked, checked_later
    sent: bool = False
    found: Verdict | Literal["none"] | None = None

    async def __call__(self) -> None:
        ctx, key = self.ctx, self.key
        if ctx.writes.unique_keys:
            self.sent, self.found = True, "ours"
            await ctx.sink.delete(key)
            return
        try:
            now = await ctx.sink.head(key)
        except NoSuchKey:
            self.found = "none"
            return
        verdict = await _own_object(ctx, key, self.upload_id, now)
        if verdict == "legacy":  # an upload made before records: told by its ETag, as it was
            same = self.etag is not None and etag_value(now.etag or "") == etag_value(self.etag)
            verdict = "ours" if same else "another"
        self.found = verdict
        if verdict != "ours":
            _left(key, self.upload_id, verdict, self.purpose)
            return
        self.sent = True
        with contextlib.suppress(PreconditionFailed):
            await ctx.sink.delete(key, if_match=now.etag)


def left_by(found: Verdict | Literal["none"] | None) -> str:
    """What stands at the key after an ``_OwnDelete`` that sent no DELETE, for an answer's
    message. Pure."""
    if found == "untold":
        return f"{UNTOLD}: it was not deleted"
    if found == "another":
        return "the object now at the key is another upload's and stays"
    return "no object of this upload is at the key"


def _cut_by_shutdown(state: AppState) -> bool:
    """Is this request being cut by shutdown's drain (its cancellation not taken back yet)?"""
    task = asyncio.current_task()
    return task is not None and task in state.stopped


async def _answer(
    ctx: Context,
    claim: Claim,
    out: dict[str, Any],
    head: ObjectHead,
    upload_id: str,
    *,
    late: bool = False,
    ours: bool,
    parts: Mapping[int, str] | None = None,
) -> web.Response:
    """The complete's 200, once the webhook (if any) has heard of the object, as for
    ``POST /upload``: if it cannot be told, ``--webhook-failure rollback`` deletes the
    object and answers 502 WEBHOOK_FAILED, ``keep`` answers 200 with ``"webhook":
    {"delivered": false, ...}``. Anything else that stops the request once delivery has
    begun deletes the object too; the receiver then gets ``upload.rolled_back``.

    Not so for an object this request did not complete (``ours`` false: an earlier
    complete may have answered 200 for it), kept as ``keep`` would; nor for one cut by
    shutdown: the client is told to retry, and the retry answers for the object and tells
    the webhook. The rollback's delete is made only while the claim stands; if it fails,
    the janitor holds the object to its size instead of deleting it blindly, as for
    ``size_unchecked`` (a retried complete may have answered for it meanwhile; on a shared
    key only this upload's object, told by its nonce), and the 502 and the log say the
    rollback did not finish rather than that it was done (reprobe9a F6)."""
    state = ctx.state
    if state.webhook is None:
        return web.json_response(out)
    key = out["key"]
    try:
        files = {"files": [completed_file(out, head)], "fields": {}}
        out["webhook"] = await notify(state, files, keep=not ours)
    except BaseException as exc:
        if not ours or _cut_by_shutdown(state):
            raise
        reason = rollback_reason(state, exc)
        deleted: list[bool] = []
        version = _OwnDelete(ctx, key, upload_id, head.etag, "rollback")

        async def delete_version() -> None:
            await version()
            if version.sent:  # and landed; not when it found no object of ours to delete
                deleted.append(True)

        skipped = _LeftStanding(ctx, claim, key, upload_id, parts)
        delete = claim.guarded(delete_version, f"key={key} delete=rollback", skipped)
        whose = _named(ctx, key, upload_id)
        done = False
        try:
            done = await run_cleanup(
                delete,
                f"rollback {whose}",
                state.janitor,
                kind=Kind.OBJECT,
                retry=_as_request(lambda: _hold_later(ctx, key, upload_id, parts)),
            )
            if late:
                _again_later(ctx, delete, key, hold=claim, whose=whose)
        finally:
            # Told once a delete was sent, even if it failed: the receiver may have the
            # event, and the object may be gone; one kept after all is told again
            # (``_hold_later``). Not if none was: the claim skipped it, the object stands;
            # or another upload's object had replaced ours (same key and ETag: it stands).
            if version.sent:
                await notify_rolled_back(state, [key], reason)
        if deleted:
            log.info("presign.rolled_back key=%s reason=%s", key, reason)
            raise
        if done and not skipped.ran:
            # It ran and found no object of this upload's to delete: nothing was rolled
            # back (it logged presign.rolled_back and answered "rolled back": reprobe12b).
            left = left_by(version.found)
            log.warning("presign.rollback_none key=%s reason=%s; %s", key, reason, left)
            if isinstance(exc, ProxyError) and exc.kind is WEBHOOK_FAILED:
                raise nothing_rolled_back(exc, left) from exc
            raise
        advice = unfinished_advice(skipped.ran, claim.lost)
        log.warning("presign.rollback_unfinished key=%s reason=%s; %s", key, reason, advice)
        if isinstance(exc, ProxyError) and exc.kind is WEBHOOK_FAILED:
            raise webhook_failed(exc, False, UNFINISHED_ROLLBACK) from exc
        raise
    return web.json_response(out)


def nothing_rolled_back(err: ProxyError, left: str) -> ProxyError:
    """The 502 WEBHOOK_FAILED of a rollback that found nothing of this upload's to delete
    (``left``: what stands), as ``handlers.webhook_failed`` words one that did not
    finish. Pure."""
    why = getattr(err.__cause__, "reason", None)
    failed = "the webhook failed" + (f" ({why})" if why else "")
    return ProxyError(WEBHOOK_FAILED, f"{failed}; nothing was rolled back: {left}")


def unfinished_advice(skipped: bool, lost: bool) -> str:
    """What becomes of the object of a rollback whose delete did not land, for its log
    line: it failed (reprobe9a F6), or the claim skipped it, lapsed or taken over by
    another complete (reprobe10a N2). Pure."""
    if skipped and lost:
        return "the object stands: the complete that took the claim over answers for it"
    held = "a right-sized one is kept and told to the webhook, a wrong-sized one deleted"
    if skipped:
        return f"the object stands: it is checked later under the claim ({held})"
    return f"the janitor holds the object to its size ({held})"


# What a presigned complete's 502 says of an object its rollback did not delete.
UNFINISHED_ROLLBACK = (
    "the object may be kept; retry the complete to learn (200 with the object if it is "
    "kept, 404 NO_SUCH_UPLOAD if it is gone)"
)


async def abort_multipart(request: web.Request) -> web.Response:
    """Abort; an upload already gone counts as aborted, so retries are safe. Not one S3
    had completed (it answers that abort NoSuchUpload too): its object stands, and the
    abort is answered 403 UPLOAD_COMPLETE, as a tus DELETE of a finished upload (it said
    "aborted": true while the object stayed stored; reprobe13a N1)."""
    ctx = await _context(request)
    body = await _json_body(request)
    key, upload_id = _client_key(ctx, body), _upload_id(body)
    await ctx.sink.abort(key, upload_id)  # an upload already gone counts as aborted
    if await _completed_upload(ctx, key, upload_id):
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


async def _completed_upload(ctx: Context, key: str, upload_id: str) -> bool:
    """Had S3 completed the upload whose abort has just returned? Its object stands: on a
    ``{uuid}`` key any object of a presigned upload (only this upload writes the key), on
    a shared one the object carrying its record's nonce. Then its record stays, for its
    rollback, size delete, later checks and retries: forgotten, that object was another's
    to them, and stayed wrong-sized or unannounced (reprobe12b F2). Once the abort has
    returned no Complete of the upload can be carried out any more. S3's failures
    propagate (the abort is answered 5xx, and a retry asks again)."""
    try:
        head = await ctx.sink.head(key)
    except NoSuchKey:
        return False
    if SIZE_META not in head.metadata:
        return False
    if ctx.writes.unique_keys:
        return True
    record = await _record(ctx, key, upload_id)
    if record is None or head.metadata.get(keys.NONCE_META) != record.nonce:
        return False
    log.info(
        "presign.record_kept key=%s upload_id=%s reason=completed; S3 had completed the "
        "upload: its record stays for its completes (the sweep removes it)",
        key,
        upload_id,
    )
    return True
