"""Resumable uploads: tus 1.0.0 at ``/tus/``, with no local state and no sticky sessions.

Thin handlers over three pure parts and one driver:

- ``tus_protocol``: the headers (version, offsets, metadata, checksums);
- ``tus_url``: the upload URL, a signed capability naming the key, length, expiry, part
  plan and the creating credential's limits, so any instance serves any request
  (``tus_keys``: the key it is signed with, which every instance shares);
- ``tus_state``: the progress, one state object in S3 swapped with If-Match (the commit
  point and the lock; its docstring states the crash invariants);
- the bytes go through the same ``FileUpload`` driver and ``UploadMachine`` as
  ``POST /upload`` (``pipeline.Resumed``): the same memory budget and backpressure, part
  sizes, parts in flight, checksums S3 verifies, sniffing and ``--allow-type`` on the
  first bytes, client idle timeout and minimum rate, metrics and completion webhook;
- ``tus_append`` (what one PATCH reads and adds), ``tus_lease`` (its lock, renewed while
  it runs) and ``tus_ending`` (completion, a completion found after a lost answer, removal).

Routes: ``POST /tus/`` creates (creation, creation-with-upload, creation-defer-length;
auth as ``/upload``: API key or upload token, whose prefix, size and types bind the
upload); ``HEAD``, ``PATCH``, ``DELETE`` ``/tus/{url}`` need only the URL; ``OPTIONS``
announces the extensions. ``X-HTTP-Method-Override`` on a POST to an upload URL is honoured.

A PATCH: read the state (404 none, 409 offset, 423 locked) -> swap in the lock -> stream
(parts it fills go to S3 as UploadPart, staged bytes of the part it continues are read
back and put in front) -> the tail it leaves is one segment object -> swap in the new
state (the 204's offset). The last PATCH completes the multipart upload (or, for a file
within one part, PutObject from its segments and its own bytes) and removes the state
and segments: a finished upload is an ordinary object, nothing is left under the prefix.
A failed PATCH commits nothing (see ``tus_state``): the upload stays resumable where it
was, and that PATCH's bytes are discarded (checksum mismatch: 460).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from s3proxy import codings, keys, tus_ending, tus_protocol, tus_url
from s3proxy.auth import Principal
from s3proxy.digests import Declared, DigestCheck
from s3proxy.errors import (
    CHECKSUM_MISMATCH,
    DIGEST_MISMATCH,
    FILE_TOO_LARGE,
    INVALID_FIELD,
    INVALID_REQUEST,
    KEY_EXISTS,
    METHOD_NOT_ALLOWED,
    NO_SUCH_UPLOAD,
    NOT_OFFSET_STREAM,
    OFFSET_MISMATCH,
    SHUTTING_DOWN,
    UPLOAD_COMPLETE,
    UPLOAD_EXPIRED,
    UPLOAD_LOCKED,
    ProxyError,
    error_response,
    quoted,
)
from s3proxy.expect import answer as expect_answer
from s3proxy.form import ClientWatch
from s3proxy.handlers import notify_rolled_back
from s3proxy.janitor import (
    Kind,
    by_deadline,
    finish,
    late_delays,
    recheck_late,
    run_cleanup,
    run_cleanups,
)
from s3proxy.machine import Resume
from s3proxy.parts import plan_parts
from s3proxy.pipeline import FileSpec, FileUpload, PipelineConfig, Resumed, StoredFile, abort_reason
from s3proxy.s3 import (
    ChecksumDiffers,
    NoSuchKey,
    NoSuchUpload,
    PreconditionFailed,
    refuse_stored,
)
from s3proxy.state import STATE, AppState
from s3proxy.tus_append import Appended, BodySource
from s3proxy.tus_keys import UrlKeys
from s3proxy.tus_lease import Lease
from s3proxy.tus_protocol import OFFSET_STREAM, VERSION
from s3proxy.tus_state import (
    COMPLETED,
    FAILED,
    TERMINATED,
    TERMINATING,
    TUS_META,
    Lock,
    TusState,
    TusStore,
)
from s3proxy.tus_url import TusUpload, UrlError
from s3proxy.uploads import field_metadata

log = logging.getLogger("s3proxy.tus")

ROOT = "/tus/"
KEY_HEADER = "S3Proxy-Key"  # the stored object of a finished upload, percent-encoded
SHA256_HEADER = "S3Proxy-Sha256"
# Upload-Metadata keys the proxy reads itself: the file's name and declared type. Every
# other key is stored as the object's S3 metadata.
OWN_KEYS = ("filename", "name", "filetype", "type")


T = TypeVar("T")

TUS = web.AppKey("tus", UrlKeys)  # what upload URLs are signed with (tus_keys)


def add_routes(app: web.Application) -> None:
    app.router.add_route("OPTIONS", ROOT, options)
    app.router.add_post(ROOT, create, expect_handler=expect)
    app.router.add_route("OPTIONS", ROOT + "{url}", options)
    app.router.add_route("HEAD", ROOT + "{url}", head)
    app.router.add_route("PATCH", ROOT + "{url}", patch, expect_handler=expect)
    app.router.add_delete(ROOT + "{url}", terminate)
    app.router.add_post(ROOT + "{url}", override, expect_handler=expect)
    app.on_response_prepare.append(_mark_tus)
    app.cleanup_ctx.append(_url_keys)


async def _mark_tus(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer under /tus/, whoever made it (a handler, an error,
    the expect handler, a 405 of the router), says the protocol version and is not kept
    by caches (tus requires no-store on HEAD; a cached 404 or 423 would mislead too)."""
    if request.path.startswith(ROOT):
        response.headers.update(tus_protocol.ANSWER_HEADERS)


async def _url_keys(app: web.Application) -> AsyncIterator[None]:
    """The keys upload URLs are signed with, from what all instances share (tus_keys):
    no S3 call here, so the proxy starts whether or not the store answers yet."""
    state = app[STATE]
    keys = UrlKeys(state.settings.token_secrets(), state.require_sink, state.pipeline.checksum)
    app[TUS] = keys
    try:
        yield
    finally:
        await keys.close()


# --- answers --------------------------------------------------------------------------


def _answer(status: int, headers: dict[str, str] | None = None) -> web.Response:
    """A tus answer (``_mark_tus`` adds Tus-Resumable and Cache-Control)."""
    resp = web.Response(status=status)
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


@dataclass(frozen=True)
class PatchResult:
    """What a PATCH leaves: the committed offset, and once the upload is complete the
    stored object (``S3Proxy-Key``; ``S3Proxy-Sha256`` when one PATCH carried the whole
    file, the only case its sha256 is known)."""

    offset: int
    key: str | None = None
    sha256: str = ""

    def headers(self) -> dict[str, str]:
        out = {"Upload-Offset": str(self.offset)}
        if self.key is not None:
            out[KEY_HEADER] = tus_protocol.key_header(self.key)
        if self.sha256:
            out[SHA256_HEADER] = self.sha256
        return out


def _tus_errors(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Errors as JSON like everywhere, with Tus-Version on a 412 (``_mark_tus`` adds the
    headers every tus answer has). A request whose body was not read to its end closes
    the connection."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as err:
            resp = _error(err)
            if request.can_read_body and not request.content.is_eof():
                resp.force_close()
            return resp

    return wrapped


def _error(err: ProxyError) -> web.Response:
    resp = error_response(err)
    if err.kind.status == 412:
        resp.headers["Tus-Version"] = VERSION
    return resp


async def expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: what the headers (and, for a PATCH, the upload's offset)
    already refuse is answered before the client sends a byte of body, as on /upload."""

    async def check() -> None:
        codings.check_request(request)
        _check_headers(request)
        if "url" not in request.match_info:
            await _precheck_create(request)
        elif request.method == "PATCH" or (
            request.headers.get("X-HTTP-Method-Override", "").upper() == "PATCH"
        ):
            await _precheck_patch(request)

    return await expect_answer(request, check, _error)


async def _precheck_create(request: web.Request) -> None:
    """What a creation's headers refuse (``plan_creation``); a creation-with-upload's digest
    headers, and its body past its Upload-Length."""
    await plan_creation(request, request.app[STATE])
    if request.content_type != OFFSET_STREAM:
        return
    tus_protocol.refuse_other_digests(request.headers)
    tus_protocol.parse_checksum(request.headers.get("Upload-Checksum"))
    if "Upload-Length" not in request.headers:
        return
    length = tus_protocol.parse_count("Upload-Length", request.headers.get("Upload-Length"))
    _refuse_past_length(request, 0, length)


async def _precheck_patch(request: web.Request) -> None:
    """A PATCH's headers, then where the upload stands (one GetObject of its state)."""
    state = request.app[STATE]
    upload, offset = await _patch_target(request, state)
    _check_patch(request, upload, offset)
    found = await TusStore(state.require_sink(), upload).read()
    if found is None:
        return  # finished or gone: the handler tells which
    current = found[0]
    _refuse_ended(current)
    at = _at(current)
    if at != offset:
        raise ProxyError(OFFSET_MISMATCH, f"Upload-Offset is {offset}; the upload is at {at}")


def _refuse_ended(current: TusState) -> None:
    """404 for an upload whose state is still here though it ended without a file
    (rolled back, ended, terminated: its removal is owed), as once that removal is done:
    at once, never 423 for the lock its last request left, nor an offset to resume at."""
    ended = current.ended()
    if ended == FAILED:
        raise ProxyError(
            NO_SUCH_UPLOAD,
            "this upload failed and its file is not kept (the completion webhook failed, "
            "another upload stored its key, or S3 stored other bytes); upload it again",
        )
    if ended == TERMINATED:
        raise ProxyError(NO_SUCH_UPLOAD, "no such upload (terminated)")


def _at(current: TusState) -> int:
    """The offset a state stands at: its length once it is noted COMPLETED (the object
    stored and told, the state's removal owed), else its committed offset."""
    if current.ended() == COMPLETED and current.length is not None:
        return current.length
    return current.offset


def _expires(upload: TusUpload) -> dict[str, str]:
    return {"Upload-Expires": tus_protocol.http_date(upload.expires)}


async def _upload(request: web.Request) -> TusUpload:
    keys = await request.app[TUS].get()
    try:
        return tus_url.verify(request.match_info["url"], keys, time.time())
    except UrlError as exc:
        if exc.expired:
            raise ProxyError(UPLOAD_EXPIRED, "this upload expired") from None
        raise ProxyError(NO_SUCH_UPLOAD, f"no such upload ({exc.reason})") from None


def _check_headers(request: web.Request) -> None:
    """Every tus request: its tus headers once each, tus 1.0.0, no extension not served."""
    tus_protocol.check_single(name.decode("latin-1") for name, _ in request.raw_headers)
    tus_protocol.check_version(request.headers.get("Tus-Resumable"))
    tus_protocol.check_extensions(request.headers.items())


def _check_creation(request: web.Request) -> None:
    headers = request.headers
    tus_protocol.check_creation(headers.get("Upload-Offset"), headers.get("X-HTTP-Method-Override"))


def _refuse_draining(state: AppState) -> None:
    if state.draining:
        raise ProxyError(SHUTTING_DOWN, "the proxy is shutting down; retry on another instance")


# --- OPTIONS, POST, HEAD, DELETE ---------------------------------------------------------


async def options(request: web.Request) -> web.Response:
    settings = request.app[STATE].settings
    resp = web.Response(status=204)
    resp.headers.update(tus_protocol.options_headers(settings.max_file_size))
    return resp


@dataclass(frozen=True)
class Creation:
    """What a creation's headers decide, before anything is stored: refused whole by
    ``plan_creation`` (also at ``Expect: 100-continue``, before the body is sent)."""

    principal: Principal
    upload: TusUpload
    token: str
    stored_meta: dict[str, str]
    fields: dict[str, str]


async def plan_creation(request: web.Request, state: AppState) -> Creation:
    """The upload a creation makes, from its headers alone: its size against the limits,
    its metadata as S3 metadata, its key (not taken, where uploads do not replace
    objects), its URL."""
    _check_creation(request)
    principal = state.auth.authenticate(request)
    deferred = request.headers.get("Upload-Defer-Length")
    length: int | None = None
    if deferred is not None and "Upload-Length" in request.headers:
        raise ProxyError(INVALID_REQUEST, "Upload-Length and Upload-Defer-Length together")
    if deferred is None:
        length = tus_protocol.parse_count("Upload-Length", request.headers.get("Upload-Length"))
        _check_size(state, principal, length)
    elif deferred != "1":
        raise ProxyError(INVALID_REQUEST, "Upload-Defer-Length must be 1")
    limit = _size_limit(state, principal) if length is None else length
    meta = tus_protocol.parse_metadata(request.headers.get("Upload-Metadata"))
    filename = keys.sanitize_filename(meta.get("filename") or meta.get("name"))
    declared = meta.get("filetype") or meta.get("type") or None
    try:
        key = keys.KeyPolicy.for_grant(state.settings.key_template, principal.grant).new_key(
            filename, "file"
        )
    except ValueError as exc:
        raise ProxyError(INVALID_FIELD, f"cannot make an object key: {exc}") from None
    cfg = state.pipeline
    expires = int(time.time() + state.settings.tus_expiry)
    plan = plan_parts(cfg.part_size, limit, cfg.max_file_size)
    if length is None:  # parts grow as for a stream of unknown length, up to the limit
        plan = plan_parts(cfg.part_size, None, limit)
    grant = principal.grant
    upload = TusUpload(
        id=tus_url.new_id(expires, key),
        key=key,
        length=length,
        expires=expires,
        part_size=plan.base,
        growing=plan.growing,
        filename=filename,
        declared_type=declared,
        types=() if grant is None else grant.types,
        limit=limit,
    )
    stored_meta, fields = _object_metadata(meta, upload.id)
    token = tus_url.issue(upload, (await request.app[TUS].get())[0])
    if len(token) > tus_url.MAX_URL_TOKEN:
        # A Location the proxy would not take back (nor, past 8 KiB, read): refuse now.
        raise ProxyError(
            INVALID_REQUEST,
            f"Upload-Metadata makes the upload URL {len(token)} characters long, over "
            f"{tus_url.MAX_URL_TOKEN}; send a shorter filename or filetype",
        )
    if cfg.writes.if_none_match:
        await refuse_stored(state.require_sink(), key)
    return Creation(principal, upload, token, stored_meta, fields)


@_tus_errors
async def create(request: web.Request) -> web.StreamResponse:
    """POST /tus/. An upload from its start: its state write (and a creation-with-upload's
    body) gets the drain's grace period, and cut by shutdown it is undone and answered
    503, never cut with no answer while its state write lands later (reprobe9a F4)."""
    state = request.app[STATE]
    _refuse_draining(state)
    _check_headers(request)
    made = tus_ending.Made()
    return await _as_upload(
        state, lambda: _create(request, state, made), lambda: _not_created(state, made)
    )


async def _as_upload(state: AppState, run: Callable[[], Awaitable[T]], cut: Callable[[], str]) -> T:
    """Run a handler's part that writes to S3 as an upload at shutdown (``state.track``):
    the drain gives it the grace period, and cut then it is answered 503 ``cut()``,
    never cut short with no answer like a download while its writes land later."""
    task = asyncio.current_task()
    with state.track(task):
        try:
            return await run()
        except asyncio.CancelledError:
            if task is None or not state.stopped_by_shutdown(task):
                raise
    raise ProxyError(SHUTTING_DOWN, cut())


def _not_created(state: AppState, made: tus_ending.Made) -> str:
    """The 503 of a creation cut by shutdown: its client has no URL, so nothing of the
    upload is kept, but an object write S3 had not answered (``made.sent``) may still land
    after its rollback (``tus._undo_creation``), and the answer says so."""
    if not made.sent:
        return (
            "the proxy is shutting down; the upload was not created and nothing of it is "
            "kept: create it again on another instance"
        )
    within = max(late_delays(_late_window(state)), default=0.0)
    return (
        "the proxy is shutting down; the upload was not created and what it stored is "
        f"removed, but a write S3 had not answered may still land within {within:g}s: "
        "create it again on another instance"
    )


async def _create(request: web.Request, state: AppState, made: tus_ending.Made) -> web.Response:
    creation = await plan_creation(request, state)
    upload, token, principal = creation.upload, creation.token, creation.principal
    key, length, cfg = upload.key, upload.length, state.pipeline
    store = TusStore(state.require_sink(), upload)
    with_body = request.content_type == OFFSET_STREAM and request.can_read_body
    if with_body:
        _check_patch(request, upload, 0)  # what can be refused is refused before state
    checksum = None if cfg.checksum is None else cfg.checksum.value
    sent = TusState(
        key=key, checksum=checksum, metadata=creation.stored_meta, fields=creation.fields
    )
    try:
        created = await store.create(sent)
    except BaseException:
        # The write may have landed (its answer lost, or a 500 after S3 stored it), or
        # still land (held on the way, or cut by shutdown or the client going): with no
        # Location, nothing of the upload may stay.
        what = f"tus creation id={upload.id}"
        # Scheduled first: cut by shutdown, the undo re-raises that cancellation when done.
        recheck_late(state.janitor, _undo(store), what, _late_window(state), Kind.TUS_UPLOAD)
        await run_cleanup(_undo(store), what, state.janitor, kind=Kind.TUS_UPLOAD)
        raise
    ended = False  # this request ended the upload (completed it, or undid it)
    if created.may_land_late:
        # An attempt of the state write may land after the upload ended and its state
        # went, bringing it back: looked for again later (``creation_recheck``).
        recheck = tus_ending.creation_recheck(store, sent, lambda: ended)
        what = f"tus state id={upload.id}"
        recheck_late(state.janitor, recheck, what, _late_window(state), Kind.TUS_UPLOAD)
    state.metrics.uploads_started.inc()
    log.info("tus.created key=%s length=%s id=%s by=%s", key, length, upload.id, principal.subject)
    headers = {"Location": ROOT + token, **_expires(upload)}
    if with_body or length == 0:
        try:
            result = await _append(request, state, store, 0, made=made)
        except BaseException as exc:
            # Refused, failed or cut: the client has no Location, so nothing of the
            # upload may stay.
            ended = True
            await finish(_undo_creation(state, store, made, abort_reason(exc)))
            if not isinstance(exc, tus_ending.Ended):  # it started: it ends here
                state.metrics.uploads_aborted.labels(abort_reason(exc)).inc()
            raise
        ended = result.key is not None
        headers.update(result.headers())
    return _answer(201, headers)


def _late_window(state: AppState) -> float:
    """Seconds after which a removal is made again for a write that may land late."""
    return state.pipeline.late_write_window


def _object_metadata(meta: dict[str, str], upload_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """Upload-Metadata's keys but the name and type as the object's S3 metadata (encoded),
    and as sent: stored as /upload stores form fields, with its limits and errors (the
    upload's id counted in, as it is stored too), so refused now if they cannot be."""
    fields = {k: v for k, v in meta.items() if k not in OWN_KEYS}
    try:
        stored = field_metadata(
            dict(fields), _unstorable_key, noun="key", own={TUS_META: upload_id}
        )
    except ProxyError as err:
        raise ProxyError(err.kind, f"Upload-Metadata: {err.message}") from None
    stored.pop(TUS_META, None)  # added with each PATCH's object (tus_ending.finished reads it)
    return stored, fields


def _unstorable_key(name: str) -> str:
    return (
        f"key {quoted(name)} would be the object's S3 metadata name, which may hold only ASCII "
        "letters, digits, '_', '.' and '-'"
    )


def _undo(store: TusStore) -> Callable[[], Awaitable[None]]:
    """Remove an upload whose creation was refused: its state, staged bytes and parts."""

    async def undo() -> None:
        found = await store.read()
        await tus_ending.remove_upload(
            store.bucket, store.upload, None if found is None else found[0]
        )
        log.info("tus.creation_undone key=%s id=%s", store.upload.key, store.upload.id)

    return undo


async def _undo_creation(
    state: AppState, store: TusStore, made: tus_ending.Made, reason: str
) -> None:
    """Undo a creation-with-upload that failed in its own request (refused, failed, or cut
    by shutdown at any point: mid-body, its PutObject or Complete unanswered, the webhook
    not yet answering). Its client got no URL to resume with or ask about, so nothing of
    the upload stays: its state (``_undo``); the object, if a write went out (only this
    upload's: ``drop_object``, If-Match), and again later for a write that may land late;
    and a webhook that may have heard ``upload.completed`` hears ``upload.rolled_back``,
    once the delete has decided: not if the key holds another upload's object (reprobe12a
    F1: its receiver would forget a file another client was told is stored). All within
    the shutdown's deadline: past it each is logged abandoned (``cleanup.abandoned
    what=rollback key=...``: delete the object by hand)."""
    upload = store.upload
    calls = [(_undo(store), f"tus creation id={upload.id}", Kind.TUS_UPLOAD)]
    stays = False
    decided = asyncio.Event()  # whose object the key holds is known (the delete may wait)
    if made.sent:
        what = f"rollback key={upload.key} tus_id={upload.id}"

        async def drop() -> None:
            nonlocal stays
            try:
                stays = not await tus_ending.drop_object(store, reason, decided)
            finally:
                decided.set()

        async def late() -> None:
            await tus_ending.drop_object(store, "late_write")

        calls.append((drop, what, Kind.OBJECT))
        recheck_late(state.janitor, late, what, _late_window(state))
    else:
        decided.set()

    async def tell() -> None:
        await decided.wait()
        if not stays:
            log.info("upload.rolled_back key=%s reason=%s tus_id=%s", upload.key, reason, upload.id)
            await notify_rolled_back(state, [upload.key], reason)

    undone = run_cleanups(calls, state.janitor)
    if not made.told:
        await undone
        return
    await asyncio.gather(undone, tell())


def _size_limit(state: AppState, principal: Principal) -> int:
    """The most bytes a file of this caller may have."""
    grant = principal.grant
    limit = state.settings.max_file_size
    if grant is not None and grant.max_size is not None:
        limit = min(limit, grant.max_size)
    return limit


def _check_size(state: AppState, principal: Principal, length: int) -> None:
    limit = state.settings.max_file_size
    if length > limit:
        raise ProxyError(
            FILE_TOO_LARGE, f"Upload-Length {length} is over the limit of {limit} bytes"
        )
    grant = principal.grant
    if grant is not None and grant.max_size is not None and length > grant.max_size:
        raise ProxyError(
            FILE_TOO_LARGE,
            f"the upload token allows {grant.max_size} bytes; Upload-Length is {length}",
        )


@_tus_errors
async def head(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    _check_headers(request)
    upload = await _upload(request)
    store = TusStore(state.require_sink(), upload)
    found = await store.read()
    length = upload.length
    finished: dict[str, str] = {}
    if found is None:
        head = await tus_ending.finished(store)
        if head is None:
            raise ProxyError(NO_SUCH_UPLOAD, "no such upload (terminated, or never created)")
        offset = length = head
        finished = {KEY_HEADER: tus_protocol.key_header(upload.key)}
    elif (size := await tus_ending.resurrected(store, *found)) is not None:
        offset = length = size  # completed; its state came back (a late creation write)
        finished = {KEY_HEADER: tus_protocol.key_header(upload.key)}
    else:
        current = found[0]
        _refuse_ended(current)
        offset = _at(current)
        length = length if length is not None else current.length
        if current.owed:  # its PATCH was cut by shutdown before the webhook heard of it
            try:
                await _as_upload(
                    state,
                    lambda: finish_owed(state, store, current, found[1]),
                    lambda: "the proxy is shutting down; ask again (HEAD) on another instance",
                )
            except tus_ending.Ended as err:  # rolled back: the upload failed
                raise ProxyError(NO_SUCH_UPLOAD, f"this upload failed: {err.message}") from err
        if current.ended() == COMPLETED:
            finished = {KEY_HEADER: tus_protocol.key_header(upload.key)}
    sizes = {"Upload-Length": str(length)} if length is not None else {"Upload-Defer-Length": "1"}
    return _answer(200, {"Upload-Offset": str(offset), **sizes, **_expires(upload), **finished})


@_tus_errors
async def terminate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    _check_headers(request)
    upload = await _upload(request)
    await _as_upload(
        state,
        lambda: _terminate(state, TusStore(state.require_sink(), upload)),
        lambda: "the proxy is shutting down; send the DELETE again (on another instance)",
    )
    return _answer(204)


async def _terminate(state: AppState, store: TusStore) -> None:
    found = await store.read()
    if found is None:
        raise await _not_terminable(store)
    current, etag = found
    if current.ended() == COMPLETED:
        raise _complete()
    if current.ended() == FAILED:
        _refuse_ended(current)  # its rollback (the janitor's, or the sweep) deletes its object
    now = time.time()
    # A termination's lock left by a DELETE that failed, or whose swap landed unseen: the
    # removal is safe to repeat, so this DELETE carries it on (no 423 for the lease).
    if not _terminating(current):
        if current.locked(now, state.settings.cleanup_clock_skew):
            raise ProxyError(UPLOAD_LOCKED, "a PATCH is in progress on this upload; retry later")
        # Take the lock for good: a PATCH starting meanwhile gets 423, not a half-removed upload.
        current.lock = Lock(TERMINATING, now + state.settings.tus_lock_lease)
        try:
            await store.swap(current, etag)
        except (PreconditionFailed, NoSuchKey):
            found = await store.read()  # our own swap, landed with its answer lost?
            if found is None or not _terminating(found[0]):
                raise ProxyError(UPLOAD_LOCKED, "the upload changed meanwhile; retry") from None
            current = found[0]
    await tus_ending.remove_upload(store.bucket, store.upload, current)
    log.info("tus.terminated key=%s id=%s", store.upload.key, store.upload.id)
    state.metrics.uploads_aborted.labels("TERMINATED").inc()


def _terminating(current: TusState) -> bool:
    return current.ended() == TERMINATED


async def _not_terminable(store: TusStore) -> ProxyError:
    """Why an upload without a state is not terminated: finished (HEAD says complete; its
    object is an ordinary stored file now, which an upload URL never deletes) or gone."""
    if await tus_ending.finished(store) is not None:
        return _complete()
    return ProxyError(NO_SUCH_UPLOAD, "no such upload (terminated, or never created)")


def _complete() -> ProxyError:
    return ProxyError(
        UPLOAD_COMPLETE,
        "this upload is complete: its object is stored and is kept (an upload URL "
        "does not delete a stored file)",
    )


@_tus_errors
async def override(request: web.Request) -> web.StreamResponse:
    """``X-HTTP-Method-Override``: a POST standing in for PATCH or DELETE (for clients
    and networks that cannot send those)."""
    method = request.headers.get("X-HTTP-Method-Override", "").upper()
    if method == "PATCH":
        return await patch(request)
    if method == "DELETE":
        return await terminate(request)
    raise ProxyError(METHOD_NOT_ALLOWED, "POST to an upload URL needs X-HTTP-Method-Override")


# --- PATCH ------------------------------------------------------------------------------


@_tus_errors
async def patch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    _check_headers(request)
    upload, offset = await _patch_target(request, state)
    store = TusStore(state.require_sink(), upload)
    result = await _append(request, state, store, offset)
    return _answer(204, {**result.headers(), **_expires(upload)})


async def _patch_target(request: web.Request, state: AppState) -> tuple[TusUpload, int]:
    """A PATCH's upload and Upload-Offset, or why it is refused (the handler and the
    expect handler read a PATCH alike)."""
    _refuse_draining(state)
    upload = await _upload(request)
    if request.content_type != OFFSET_STREAM:
        raise ProxyError(NOT_OFFSET_STREAM, f"a PATCH must be Content-Type: {OFFSET_STREAM}")
    return upload, tus_protocol.parse_count("Upload-Offset", request.headers.get("Upload-Offset"))


async def _append(
    request: web.Request,
    state: AppState,
    store: TusStore,
    offset: int,
    *,
    made: tus_ending.Made | None = None,
) -> PatchResult:
    """Append the request's body at ``offset``; the committed offset after it.
    ``made``: in the creation's request (its state is new, not one come back), what it
    did, for the creation's undo if it fails."""
    declared = _check_patch(request, store.upload, offset)
    task = asyncio.current_task()
    with state.track(task, request):
        try:
            return await _append_tracked(request, state, store, offset, declared, made)
        except asyncio.CancelledError:
            if task is None or not state.stopped_by_shutdown(task):
                raise
    if made is not None:  # no URL was given: the creation's undo removes all of it
        raise ProxyError(SHUTTING_DOWN, _not_created(state, made))
    raise ProxyError(
        SHUTTING_DOWN, "the proxy is shutting down; resume the upload (HEAD, then PATCH)"
    )


def _check_patch(request: web.Request, upload: TusUpload, offset: int) -> Declared | None:
    """What a PATCH's headers alone refuse: its Upload-Checksum (the digest to check, if
    any), any other digest header, a Content-Length past Upload-Length."""
    tus_protocol.refuse_other_digests(request.headers)
    declared = tus_protocol.parse_checksum(request.headers.get("Upload-Checksum"))
    _refuse_past_length(request, offset, upload.length)
    return declared


def _refuse_past_length(request: web.Request, offset: int, length: int | None) -> None:
    """FILE_TOO_LARGE for a Content-Length that goes past the upload's length. A
    content-coded body's Content-Length counts coded bytes: its decoded bytes are
    counted as they arrive instead."""
    body = request.content_length
    if body is None or length is None or codings.content_coded(request.headers):
        return
    if offset + body > length:
        raise ProxyError(
            FILE_TOO_LARGE, f"{body} bytes at offset {offset} go past Upload-Length {length}"
        )


async def _append_tracked(
    request: web.Request,
    state: AppState,
    store: TusStore,
    offset: int,
    declared: Declared | None,
    made: tus_ending.Made | None = None,
) -> PatchResult:
    upload = store.upload
    created = made is not None
    found = await store.read()
    came_back = None if created or found is None else await tus_ending.resurrected(store, *found)
    if came_back is not None:
        found = None  # a state come back after its upload completed (removed again)
    if found is None:
        done = await tus_ending.finished(store)
        if done is not None and offset == done:
            return PatchResult(done, upload.key)
        if done is not None:  # a PATCH resent after its 204 was lost: HEAD says it is done
            raise ProxyError(
                OFFSET_MISMATCH, f"Upload-Offset is {offset}; the upload is complete at {done}"
            )
        raise ProxyError(NO_SUCH_UPLOAD, "no such upload (terminated, or never created)")
    current, etag = found
    _refuse_ended(current)
    if current.ended() == COMPLETED:  # stored and told; only its state's removal is owed
        done = _at(current)
        if offset == done:
            if current.owed:  # or not yet told: its PATCH was cut by shutdown
                await finish_owed(state, store, current, etag)
            return PatchResult(done, upload.key)
        raise ProxyError(
            OFFSET_MISMATCH, f"Upload-Offset is {offset}; the upload is complete at {done}"
        )
    if current.offset != offset:
        raise ProxyError(
            OFFSET_MISMATCH, f"Upload-Offset is {offset}; the upload is at {current.offset}"
        )
    # The length this PATCH works to; a deferred one it declares is stored only with its
    # commit (the lock and a refused PATCH leave the stored state as it was).
    stored_length = current.length
    current = dataclasses.replace(current, length=_total(request, upload, current))
    settings = state.settings
    lease = Lease(
        store,
        dataclasses.replace(current, length=stored_length),
        settings.tus_lock_lease,
        settings.cleanup_clock_skew,
        state.janitor,
    )
    await lease.take(etag)
    committed = False
    appended = Appended(store, current, stored_length, lease.confirm)
    try:
        try:
            stored = await _stream(request, state, store, current, appended, declared)
        except (NoSuchUpload, NoSuchKey):  # its multipart upload, or its staged bytes
            whole = await tus_ending.stored_object(store, current)
            if whole is None and time.time() > upload.expires:
                # The expiry sweep removed it under this PATCH (begun before the expiry).
                raise ProxyError(UPLOAD_EXPIRED, "this upload expired") from None
            if whole is None:
                raise
            # The object is whole, and the state still here: the PATCH that stored it did
            # not end the upload (its instance gone, or the webhook failed and its rollback
            # could not even mark the state FAILED). End it now, the webhook told as for
            # any completion.
            committed = True
            await _completed(state, store, lease, whole, made)
            return PatchResult(whole.size, whole.key)
        except asyncio.CancelledError:
            if created:
                raise  # no URL was given: the creation's undo removes all of it
            # Shutdown's drain (or the server) stopped it. Cut while its PutObject or
            # CompleteMultipartUpload was on the way, and S3 stored the object: its
            # completion is owed (``tus_ending.owe``), HEAD answers it complete.
            file, length = appended.file, current.length
            if (
                file is not None
                and file.maybe_stored
                and length is not None
                and await tus_ending.owe(
                    state, store, lease.owner, length, check=True, first=lease.stop
                )
            ):
                committed = True
                raise
            # Else keep its acknowledged parts too, so a rolling restart costs a resume at
            # the last part, not at the PATCH's start. To its end even if cancelled again.
            kept = appended.partial_state()
            if kept is not None:

                async def keep(kept: TusState = kept) -> None:
                    nonlocal committed
                    with contextlib.suppress(ProxyError):
                        await lease.commit(kept)
                        committed = True
                        log.info(
                            "tus.kept id=%s offset=%d reason=CANCELLED", upload.id, kept.offset
                        )

                what = f"tus commit id={upload.id} offset={kept.offset}"
                await finish(by_deadline(keep(), what, Kind.TUS_PATCH, state.janitor))
            raise
        except ProxyError as err:
            stored_unseen = await tus_ending.landed(store, appended, err)
            if stored_unseen is not None:
                # The object was stored but the answer lost (a timeout; a retried write
                # refused as KEY_EXISTS): it is this upload's, whole, so it completed.
                committed = True
                log.info("tus.completed_unseen key=%s id=%s error=%s", upload.key, upload.id, err)
                await _completed(state, store, lease, stored_unseen, made)
                return PatchResult(stored_unseen.size, stored_unseen.key)
            if err.kind is KEY_EXISTS or isinstance(err, ChecksumDiffers):
                # Another upload stored the key first (--no-overwrite): this one can never
                # complete there. Or S3 stored this one's object with other bytes (its
                # answer names another CRC): the object goes, and the parts went into it.
                # Either way the upload ends now, as a termination would end it.
                committed = True
                await lease.stop()
                if isinstance(err, ChecksumDiffers):
                    # Its object holds other bytes: rolled back as a webhook failure rolls
                    # back, under this PATCH's lock (FAILED first; the janitor's retries
                    # at the lock's cadence): a PATCH retried once the lock lapsed would
                    # find the object whole and report it stored.
                    await tus_ending.roll_back(
                        state, store, lease.owner, err.kind.code, upload_id=appended.upload_id()
                    )
                else:
                    ended = dataclasses.replace(current, upload_id=appended.upload_id())

                    async def end() -> None:
                        await tus_ending.remove_upload(store.bucket, upload, ended)

                    await tus_ending.end_noted(state, store, end, FAILED, "tus end")
                log.info("tus.ended key=%s id=%s reason=%s", upload.key, upload.id, err.kind.code)
                state.metrics.uploads_aborted.labels(err.kind.code).inc()
                raise tus_ending.Ended(err.kind, f"{err.message}; this upload is ended") from err
            if err.kind.status >= 500 or err.kind is CHECKSUM_MISMATCH:
                raise  # nothing of it is trusted: commit nothing
            # The client went away (or broke a limit) mid-PATCH: keep the parts S3 has
            # acknowledged, so a resume need not send them again (tus: "store as much as
            # possible"); the bytes of its unfinished part are lost.
            kept = appended.partial_state()
            if kept is not None and not lease.lost:  # (lost: the upload is another's now)
                await lease.commit(kept)
                committed = True
                await tus_ending.forget(state, store, appended.dropped())
                log.info(
                    "tus.kept key=%s id=%s offset=%d reason=%s",
                    upload.key,
                    upload.id,
                    kept.offset,
                    err.kind.code,
                )
            raise
        if stored is None:
            new_offset = await lease.commit(appended.next_state())
            committed = True
            await tus_ending.forget(state, store, appended.dropped())
            log.info(
                "tus.patched key=%s id=%s offset=%d bytes=%d",
                upload.key,
                upload.id,
                new_offset,
                new_offset - offset,
            )
            return PatchResult(new_offset)
        committed = True  # the object is stored: the state goes with the prefix
        await _completed(state, store, lease, stored, made)
        return PatchResult(stored.size, stored.key, stored.sha256)
    finally:
        if made is not None and appended.file is not None and appended.file.maybe_stored:
            made.sent = True
        if appended.segment_may_land_late():
            recheck = tus_ending.segment_recheck(store)
            what = f"tus segments id={upload.id}"
            recheck_late(state.janitor, recheck, what, _late_window(state), Kind.TUS_UPLOAD)
        if not committed:
            await lease.release()
            await appended.abort_unnamed(state)


async def _completed(
    state: AppState,
    store: TusStore,
    lease: Lease,
    stored: StoredFile,
    made: tus_ending.Made | None = None,
) -> None:
    """The object is stored: end the upload (``tus_ending.completed``). Cut short (shutdown)
    before the webhook heard of it, the completion is written down as owed and the lock
    dropped (``tus_ending.owe``): HEAD on any instance answers it complete at once. In its
    creation's request (``made``) there is no URL to come back with: the creation's undo
    removes the object instead."""
    if made is not None:
        made.sent = True
    try:
        await lease.stop()
    except asyncio.CancelledError:
        if made is None:
            await tus_ending.owe(state, store, lease.owner, stored.size)
        raise
    await tus_ending.completed(state, store, stored, lease.owner, made)


async def finish_owed(state: AppState, store: TusStore, current: TusState, etag: str) -> None:
    """Finish a completion its PATCH left owed (cut by shutdown before the webhook heard
    of the object): under the lock, as that PATCH would have, the webhook told and the
    state removed, or rolled back (``tus_ending.Ended``). 423 while another request
    finishes it; 404 if the object is no longer this upload's (the upload then ends)."""
    settings = state.settings
    lease = Lease(
        store, current, settings.tus_lock_lease, settings.cleanup_clock_skew, state.janitor
    )
    await lease.take(etag)
    try:
        stored = await tus_ending.stored_object(store, current)
    except BaseException:
        await lease.release()
        raise
    if stored is None:  # deleted, or replaced at a shared key: nothing to tell of
        await lease.stop()
        await tus_ending.end_noted(state, store, tus_ending.remover(store), FAILED, "tus end")
        raise ProxyError(
            NO_SUCH_UPLOAD, "this upload's object is no longer stored; upload it again"
        )
    log.info("tus.completion_owed key=%s id=%s action=finish", store.upload.key, store.upload.id)
    await _completed(state, store, lease, stored)


def _total(request: web.Request, upload: TusUpload, current: TusState) -> int | None:
    """The file's length: the URL's, or a deferred one declared before or by this PATCH
    (``Upload-Length``, once; not below what is stored, not over the upload's limit)."""
    text = request.headers.get("Upload-Length")
    if upload.length is not None:
        if text is not None and tus_protocol.parse_count("Upload-Length", text) != upload.length:
            raise ProxyError(INVALID_REQUEST, f"Upload-Length is {upload.length}, not {text}")
        return upload.length
    if text is None:
        return current.length
    length = tus_protocol.parse_count("Upload-Length", text)
    if current.length is not None and length != current.length:
        raise ProxyError(INVALID_REQUEST, f"Upload-Length was declared as {current.length}")
    if length > upload.limit:
        raise ProxyError(
            FILE_TOO_LARGE, f"Upload-Length {length} is over the limit of {upload.limit}"
        )
    if length < current.offset:
        raise ProxyError(INVALID_REQUEST, f"Upload-Length {length} is below the offset")
    return length


async def _stream(
    request: web.Request,
    state: AppState,
    store: TusStore,
    current: TusState,
    appended: Appended,
    declared: Declared | None,
) -> StoredFile | None:
    """The request's body through the upload pipeline, resumed at the state's offset."""
    upload = store.upload
    settings = state.settings
    cfg: PipelineConfig = state.pipeline
    if upload.types:
        cfg = dataclasses.replace(cfg, grant_types=upload.types)
    total = current.length
    if total is None:
        # Length still deferred: the request cannot end the file (it ends before a total
        # one byte over the limit, and the limit refuses that byte), so it stages its tail.
        cfg = dataclasses.replace(cfg, max_file_size=upload.limit)
        total = upload.limit + 1
    resumed = Resumed(
        point=Resume(current.offset, total, current.staged, created=current.upload_id is not None),
        plan=upload.plan,
        staging=appended,
        content_type=current.content_type,
        upload_id=current.upload_id,
        etags=current.etags(),
        crcs=current.crcs(),
    )
    digests = DigestCheck(declared) if declared else None
    spec = FileSpec(
        field="file",
        filename=upload.filename,
        key=upload.key,
        declared_type=upload.declared_type,
        metadata={**current.metadata, TUS_META: upload.id},
        fields=current.fields,
        digests=digests,
    )
    body = request.content
    left = max(0, min(total, upload.limit) - current.offset)
    watch = ClientWatch(
        lambda: body.total_bytes,
        settings.client_timeout,
        left,
        settings.min_upload_rate,
        settings.min_rate_window,
    )
    source = BodySource(request, watch, left)
    file = FileUpload(spec, store.bucket, state.budget, cfg, state.janitor, resume=resumed)
    appended.file = file
    m = state.metrics
    m.uploads_in_flight.inc()
    try:
        return await file.proceed(digests.wrap(source) if digests else source)
    except ProxyError as err:
        # The PATCH failed, not the upload: it stays resumable (or is found complete).
        if err.kind is DIGEST_MISMATCH:
            m.tus_patches_failed.labels(CHECKSUM_MISMATCH.code).inc()
            raise ProxyError(CHECKSUM_MISMATCH, err.message.replace("file", "PATCH of", 1)) from err
        m.tus_patches_failed.labels(abort_reason(err)).inc()
        raise
    except BaseException as exc:
        m.tus_patches_failed.labels(abort_reason(exc)).inc()
        raise
    finally:
        m.uploads_in_flight.dec()
        m.bytes_received.inc(file.size)
