"""Thin HTTP handlers: check headers, hand the body to the streaming core, render JSON."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from aiohttp import MultipartReader, hdrs, web
from aiohttp.web_urldispatcher import _default_expect_handler

from s3proxy.auth import Principal
from s3proxy.errors import (
    EXPECTATION_FAILED,
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
from s3proxy.form import TransportFlow, iter_form
from s3proxy.log import REQUEST_ID
from s3proxy.state import STATE, AppState
from s3proxy.uploads import RequestUpload
from s3proxy.webhook import WebhookError

log = logging.getLogger("s3proxy.handlers")

# Boundaries and part headers around the file data an upload token counts.
MULTIPART_OVERHEAD = 64 * 1024


def check_upload(request: web.Request, state: AppState) -> tuple[Principal, int | None]:
    """Refuse what can be refused from the headers alone, before a body byte is read:
    shutdown, credentials, the content type and a Content-Length over a limit."""
    if state.draining:
        raise ProxyError(SHUTTING_DOWN, "the proxy is shutting down; retry on another instance")
    principal = state.auth.authenticate(request)
    ctype = request.headers.get(hdrs.CONTENT_TYPE, "")
    if request.content_type != "multipart/form-data":
        raise ProxyError(
            NOT_MULTIPART, f"expected Content-Type multipart/form-data, got {ctype or 'none'!r}"
        )
    length = request.content_length
    limit = state.settings.max_request_size
    if length is not None and length > limit:
        raise ProxyError(
            REQUEST_TOO_LARGE, f"request body of {length} bytes is over the limit of {limit} bytes"
        )
    grant = principal.grant
    max_size = grant.max_size if grant is not None else None
    if max_size is not None and length is not None and length > max_size + MULTIPART_OVERHEAD:
        raise ProxyError(
            TOKEN_SCOPE,
            f"the upload token allows {max_size} bytes; the body has {length}",
        )
    return principal, length


async def expect_upload(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue``: refuse before the client sends a byte of body."""
    # Runs before the middlewares: the request id is not set yet.
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        return error_response(
            ProxyError(EXPECTATION_FAILED, "only Expect: 100-continue is supported")
        )
    try:
        check_upload(request, request.app[STATE])
    except ProxyError as err:
        return error_response(err)
    await _default_expect_handler(request)
    return None


async def upload(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal, length = check_upload(request, state)
    try:
        reader = MultipartReader(request.headers, request.content)
    except (ValueError, AssertionError) as exc:
        raise ProxyError(MALFORMED_MULTIPART, f"bad multipart Content-Type: {exc}") from None
    body = request.content
    limits = state.form_limits
    grant = principal.grant
    if grant is not None and grant.max_files is not None:
        limits = dataclasses.replace(limits, max_files=min(limits.max_files, grant.max_files))
    parts = iter_form(reader, limits, lambda: body.total_bytes, TransportFlow(request))
    # No file can be longer than the whole body: that bounds part sizes and buffers.
    job = RequestUpload(
        state.require_sink(),
        state.budget,
        state.pipeline,
        state.settings.key_template,
        length,
        state.metrics,
        grant,
        state.janitor,
    )
    with state.track(request.task):
        result = await job.run(parts)
        out = result.to_json()
        if state.webhook is not None:
            out["webhook"] = await notify(state, job, out)
    log.info("request.stored files=%d by=%s", len(result.files), principal.subject)
    return web.json_response(out, status=201)


async def notify(state: AppState, job: RequestUpload, body: dict[str, Any]) -> dict[str, Any]:
    """Tell the application; if it cannot be told, roll back or keep as configured."""
    assert state.webhook is not None
    rid = REQUEST_ID.get()
    event = {"event": "upload.completed", "request_id": rid, "time": int(time.time()), **body}
    try:
        await state.webhook.deliver(event, rid)
    except WebhookError as exc:
        if state.settings.webhook_failure == "rollback":
            log.error("webhook.failed action=rollback reason=%s", exc.reason)
            await job.rollback()
            raise ProxyError(
                WEBHOOK_FAILED, f"the upload was rolled back: the webhook failed ({exc.reason})"
            ) from exc
        log.error("webhook.failed action=keep reason=%s", exc.reason)
        return {"delivered": False, "error": exc.reason}
    return {"delivered": True}


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process is up and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the bucket answers with our credentials, and we are not draining."""
    state = request.app[STATE]
    if state.draining:
        return web.json_response(error_body(SHUTTING_DOWN, "shutting down"), status=503)
    try:
        await state.require_sink().check()
    except ProxyError as err:
        return web.json_response(error_body(err.kind, err.message), status=503)
    return web.json_response({"status": "ready", "bucket": state.settings.bucket_name})
