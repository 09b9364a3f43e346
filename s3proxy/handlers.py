"""Thin HTTP handlers: check headers, hand the body to the streaming core, render JSON.

The upload's promise: a client told "failed" finds nothing stored; a client told
201 finds exactly its bytes. So once files are stored, anything that stops the
request before its 201 is built (the webhook failing, any exception, a
cancellation) deletes them; if the webhook receiver was being told, it then gets
``upload.rolled_back``. A cancellation by shutdown's drain is answered 503
``SHUTTING_DOWN`` once the cleanup is done (drain marks the task, the handler takes
that one cancellation back with ``Task.uncancel``); any other cancellation is
re-raised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from aiohttp import hdrs, web

from s3proxy import codings
from s3proxy.auth import Principal
from s3proxy.digests import refuse_body_digests
from s3proxy.errors import (
    FILE_TOO_LARGE,
    MALFORMED_MULTIPART,
    NOT_MULTIPART,
    REQUEST_TOO_LARGE,
    SHUTTING_DOWN,
    TOKEN_SCOPE,
    WEBHOOK_FAILED,
    ProxyError,
    error_body,
    error_response,
)
from s3proxy.expect import answer as expect_answer
from s3proxy.form import MAX_PART_HEADERS, FormReader, TransportFlow, iter_form, request_boundary
from s3proxy.janitor import late_delays
from s3proxy.log import REQUEST_ID
from s3proxy.metrics import metrics_handler
from s3proxy.pipeline import abort_reason
from s3proxy.protocol import refuse_over_capacity
from s3proxy.state import STATE, AppState
from s3proxy.uploads import RequestUpload
from s3proxy.webhook import WebhookError

log = logging.getLogger("s3proxy.handlers")

# Boundaries and part headers around the file data an upload token counts.
MULTIPART_OVERHEAD = 64 * 1024


def media_type(header: str) -> str:
    """A Content-Type header's ``type/subtype``, lowercased. Pure.

    What aiohttp's ``request.content_type`` compares, without its pass through the
    ``email`` package's header parser: ~1.7 ms of CPU per upload, since every form's
    boundary makes its header new to that parser's cache."""
    return header.partition(";")[0].strip().lower()


def check_upload(request: web.Request, state: AppState) -> Principal:
    """Refuse what can be refused from the headers alone, before a body byte is read:
    shutdown, credentials, the content type, a digest of the whole body and a
    Content-Length over a limit."""
    if state.draining:
        raise ProxyError(SHUTTING_DOWN, "the proxy is shutting down; retry on another instance")
    refuse_over_capacity(request)  # the expect handler runs before the middlewares
    principal = state.auth.authenticate(request)
    ctype = request.headers.get(hdrs.CONTENT_TYPE, "")
    if media_type(ctype) != "multipart/form-data":
        raise ProxyError(
            NOT_MULTIPART, f"expected Content-Type multipart/form-data, got {ctype or 'none'!r}"
        )
    request_boundary(ctype)  # one, allowed by RFC 2046, read alike by aiohttp
    refuse_body_digests(request.headers, _REQUEST_DIGEST_HINT)
    length = request.content_length
    limit = state.settings.max_request_size
    if length is not None and length > limit:
        raise ProxyError(
            REQUEST_TOO_LARGE, f"request body of {length} bytes is over the limit of {limit} bytes"
        )
    grant = principal.grant
    max_size = grant.max_size if grant is not None else None
    # A token bounds the file's decoded bytes: a coded body's Content-Length counts its
    # coding's framing too (a file of exactly the token's size in small gzip members was
    # refused), so only a plain one is judged here; a coded one as its bytes decode.
    length = codings.read_length(request)
    if max_size is not None and length is not None and length > max_size + MULTIPART_OVERHEAD:
        raise ProxyError(
            FILE_TOO_LARGE,
            f"the upload token allows {max_size} bytes of file data per request; "
            f"the request body has {length} bytes",
        )
    return principal


#: What a digest of a whole ``/upload`` body is told: it covers the multipart framing too,
#: so it could be checked only after the last file was committed, and with one more hash
#: pass. Each file part declares its own.
_REQUEST_DIGEST_HINT = (
    "a digest of the whole multipart body is not checked; declare each file's in its "
    "part's headers (curl: -F 'file=@f;headers=\"Content-Digest: sha-256=:<b64>:\"')"
)


async def expect_upload(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue``: refuse before the client sends a byte of body."""

    async def check() -> None:
        check_upload(request, request.app[STATE])
        codings.check_request(request)

    return await expect_answer(request, check)


async def upload(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = check_upload(request, state)
    # The handler's own task: aiohttp runs each request in one, apart from the
    # connection's task (``request.task``), so cancelling it stops this request only.
    task = asyncio.current_task()
    # No file can be longer than the whole body as read: that bounds part sizes and
    # buffers (not a coded body's Content-Length: codings.read_length).
    job = RequestUpload(
        state.require_sink(),
        state.budget,
        state.pipeline,
        state.settings.key_template,
        codings.read_length(request),
        state.metrics,
        principal.grant,
        state.janitor,
    )
    with state.track(task, request):
        try:
            return await _store(request, state, principal, job)
        except asyncio.CancelledError:
            if task is None or not state.stopped_by_shutdown(task):
                raise
            log.warning("request.stopped reason=SHUTTING_DOWN")
    late = late_delays(state.pipeline.late_write_window) if job.may_land_late else ()
    resp = error_response(ProxyError(SHUTTING_DOWN, cut_message(late)))
    resp.force_close()  # the rest of the body may still be on its way: do not wait for it
    return resp


def cut_message(late: tuple[float, ...]) -> str:
    """The 503 of an upload cut by shutdown. ``late``: when its rollback's rechecks were
    due (``janitor.late_delays``), for a write S3 had not answered, which may still store
    a file after the rollback (and after this process exits): then it must not say that
    nothing was stored. Pure."""
    if not late:
        return "the proxy is shutting down; nothing was stored: retry on another instance"
    return (
        "the proxy is shutting down; what was stored is removed, but a write S3 had not "
        f"answered may still land within {max(late):g}s: retry on another instance"
    )


async def _store(
    request: web.Request, state: AppState, principal: Principal, job: RequestUpload
) -> web.Response:
    try:
        reader = FormReader(request.headers, request.content, max_headers=MAX_PART_HEADERS)
    except (ValueError, AssertionError) as exc:
        raise ProxyError(MALFORMED_MULTIPART, f"bad multipart Content-Type: {exc}") from None
    body = request.content
    limits = state.form_limits
    grant = principal.grant
    if grant is not None and grant.max_files is not None:
        limits = dataclasses.replace(limits, max_files=min(limits.max_files, grant.max_files))
    parts = iter_form(reader, limits, lambda: body.total_bytes, TransportFlow(request))
    result = await job.run(parts)  # all or nothing: on any failure it deleted its files
    notifying = False
    try:
        out = result.to_json()
        if state.webhook is not None:
            notifying = True
            out["webhook"] = await notify(state, out)
        response = web.json_response(out, status=201)
    except BaseException as exc:
        keys = [f.key for f in result.files]
        reason = rollback_reason(state, exc)
        try:
            await job.rollback(reason)  # to its end, even if cancelled meanwhile
        finally:
            if notifying:
                await notify_rolled_back(state, job.rolled_back_keys(keys), reason)
        if isinstance(exc, ProxyError) and exc.kind is WEBHOOK_FAILED:
            raise webhook_failed(exc, job.rollback_done, RETRIED_DELETE) from exc.__cause__
        raise
    job.settle()  # the outcome is final: the files are kept
    log.info("request.stored files=%d by=%s", len(result.files), principal.subject)
    return response


async def notify(state: AppState, body: dict[str, Any], *, keep: bool = False) -> dict[str, Any]:
    """Tell the application; if it cannot be told, fail (the caller rolls back) or keep,
    as configured (``keep`` forces keeping: for an object some request may already have
    reported stored). Any other exception fails the request whatever the policy."""
    assert state.webhook is not None
    rid = REQUEST_ID.get()
    event = {"event": "upload.completed", "request_id": rid, "time": int(time.time()), **body}
    try:
        await state.webhook.deliver(event, rid)
    except WebhookError as exc:
        if state.settings.webhook_failure == "rollback" and not keep:
            log.error("webhook.failed action=rollback reason=%s", exc.reason)
            raise ProxyError(
                WEBHOOK_FAILED, f"the upload was rolled back: the webhook failed ({exc.reason})"
            ) from exc
        log.error("webhook.failed action=keep reason=%s", exc.reason)
        return {"delivered": False, "error": exc.reason}
    return {"delivered": True}


# What becomes of a file whose rollback delete failed, for the 502 (``webhook_failed``).
RETRIED_DELETE = "a stored file's delete failed, and the proxy retries it until S3 takes it"


def webhook_failed(err: ProxyError, done: bool, unfinished: str) -> ProxyError:
    """The 502 WEBHOOK_FAILED of a request whose rollback has run: ``notify``'s "the upload
    was rolled back" if every delete landed (``done``), else that the rollback did not
    finish and what becomes of the object (``unfinished``). The message used to be made
    before the rollback ran, and said "rolled back" while the object stood (reprobe12a
    F2). Pure."""
    if done:
        return err
    why = getattr(err.__cause__, "reason", None)
    failed = "the webhook failed" + (f" ({why})" if why else "")
    return ProxyError(WEBHOOK_FAILED, f"{failed}; the rollback did not finish: {unfinished}")


async def notify_rolled_back(state: AppState, keys: list[str], reason: str) -> None:
    """Best effort, one attempt: the receiver may have got upload.completed for files
    that are now deleted. Failing is logged, not raised (a cancellation is raised)."""
    if state.webhook is None or not keys:
        return
    rid = REQUEST_ID.get()
    event = {
        "event": "upload.rolled_back",
        "request_id": rid,
        "time": int(time.time()),
        "keys": keys,
        "reason": reason,
    }
    try:
        async with state.janitor.deadline.bound(None):  # a cleanup: the shutdown's deadline
            await state.webhook.deliver(event, rid, max_attempts=1)
    except Exception as exc:
        log.warning("webhook.rolled_back_not_delivered reason=%s", getattr(exc, "reason", exc))


def rollback_reason(state: AppState, exc: BaseException) -> str:
    """Why stored files were rolled back, for ``upload.rolled_back`` and the metrics."""
    if isinstance(exc, asyncio.CancelledError) and state.draining:
        return SHUTTING_DOWN.code
    return abort_reason(exc)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process is up and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readiness(state: AppState) -> ProxyError | None:
    """Why this instance should get no traffic now, or None: the one place readiness is
    decided. Never waits on S3: the store's state is the background check's last result
    (``StoreCheck``; started here for an app not run by ``server.serve``), the embedded
    store's is known in process."""
    state.readyz_asked = True
    if state.stopping or state.draining:
        return ProxyError(SHUTTING_DOWN, "shutting down")
    try:
        state.check_store()
    except ProxyError as err:
        return err
    state.store_check.start(state.check_s3)
    return await state.store_check.verdict()


async def readyz(request: web.Request) -> web.Response:
    """Readiness for load balancers, unauthenticated: ready or a 503 with an error code,
    naming no bucket, endpoint or S3 detail (the log and ``--metrics-listen`` have them;
    the log says when readiness changes, not at every check)."""
    err = await readiness(request.app[STATE])
    if err is None:
        return web.json_response({"status": "ready"})
    return web.json_response(error_body(err.kind, "not ready"), status=503)


async def readyz_detail(request: web.Request) -> web.Response:
    """Readiness with its reason and what it checked, for operators (``--metrics-listen``)."""
    state = request.app[STATE]
    err = await readiness(state)
    sink = state.sink
    detail = {
        "bucket": state.settings.bucket_name,
        "endpoint": sink.endpoint_url if sink is not None else None,
        "connections": len(state.connections),
        "uploads": len(state.uploads),
    }
    if err is None:
        return web.json_response({"status": "ready", **detail})
    return web.json_response({**error_body(err.kind, err.message), **detail}, status=503)


async def metrics(request: web.Request) -> web.StreamResponse:
    """``/metrics`` on the public port: with auth configured, for API keys only (upload
    tokens are handed to browsers); ``--metrics-listen`` serves it without auth."""
    state = request.app[STATE]
    if state.auth.enabled:
        principal = state.auth.authenticate(request)  # 401 without a valid credential
        if principal.kind != "api_key":
            raise ProxyError(TOKEN_SCOPE, "an upload token does not grant /metrics; use an API key")
    return await metrics_handler(request)
