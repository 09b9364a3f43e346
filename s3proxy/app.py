"""create_app(settings): the one way the CLI and the tests build the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

if TYPE_CHECKING:
    from s3proxy.embedded import EmbeddedStore

from s3proxy import (
    codings,
    downloads,
    handlers,
    page,
    presign,
    presign_claim,
    presign_record,
    protocol,
    tus,
)
from s3proxy.cleanup import Rule, sweep, sweep_tus
from s3proxy.config import embedded_config
from s3proxy.cors import Cors
from s3proxy.errors import UPLOAD_EXPIRED, error_middleware
from s3proxy.janitor import SHUTDOWN_CLEANUP
from s3proxy.log import (
    ACCESS_LOG_FORMAT,
    PREPARED,
    REQUEST_ID,
    AccessLogger,
    cut_short_response,
    given_request_id,
    task_site,
)
from s3proxy.metrics import METRICS, Metrics, metrics_handler, metrics_middleware
from s3proxy.s3 import ObjectStore
from s3proxy.s3_aiobotocore import open_store
from s3proxy.settings import Settings, url_host
from s3proxy.state import STATE, AppState
from s3proxy.webhook import Webhook

log = logging.getLogger("s3proxy.app")


# Seconds a request cut short at the drain's deadline may take to end (closing its S3
# body): nothing to wait for but its own finally blocks.
STOP_WAIT = 1.0
RID = web.RequestKey("request_id", str)


def request_id(request: web.Request) -> str:
    """The client's X-Request-ID if it is sane, else a new one; the same all request long."""
    rid = request.get(RID)
    if rid is None:
        rid = given_request_id(request.headers.get("X-Request-ID")) or uuid.uuid4().hex
        request[RID] = rid
    return rid


@web.middleware
async def request_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Log everything the request does with its id (the response gets it in _mark_response),
    and keep its task where drain can stop it.

    A handler cancelled mid-request (by drain at its deadline, a download still
    streaming; or by aiohttp) never reaches aiohttp's access log: it is logged here,
    with the status and bytes of the response it cut short, so every request has its
    line (before: a download cut at shutdown left none).
    """
    REQUEST_ID.set(request_id(request))
    state = request.app[STATE]
    task = asyncio.current_task()
    started = asyncio.get_running_loop().time()
    if task is not None:
        state.requests.add(task)
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except asyncio.CancelledError:
        if task is not None and task in state.stopped:
            log.warning(
                "request.stopped reason=SHUTTING_DOWN method=%s path=%s",
                request.method,
                request.path,
            )
        request.protocol.log_access(request, cut_short_response(request), started)
        raise
    finally:
        if task is not None:
            state.requests.discard(task)
            state.stopped.discard(task)


async def _mark_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response carries its request id.

    Set here, just before the headers go out, not after the handler returns: a
    streamed download is prepared (its headers sent) inside the handler.
    """
    response.headers["X-Request-ID"] = request_id(request)
    request[PREPARED] = response


def create_app(settings: Settings) -> web.Application:
    state = AppState.from_settings(settings)
    middlewares: list[Middleware] = [request_middleware]
    cors = Cors(settings.cors_origin) if settings.cors_origin else None
    if cors is not None:
        middlewares.append(cors.preflight)
    middlewares += [
        metrics_middleware(state.metrics),
        error_middleware,
        protocol.capacity_middleware,
        codings.refuse_unsupported,
    ]
    app = web.Application(
        middlewares=middlewares,
        handler_args={
            # Per connection and outside the memory budget: aiohttp stops reading the
            # socket past twice this (256 KiB), whatever size one read takes.
            "read_bufsize": protocol.RECV_SIZE // 2,
            "keepalive_timeout": settings.keepalive_timeout,
            "access_log_class": AccessLogger,
            "access_log_format": ACCESS_LOG_FORMAT,
            **protocol.HANDLER_ARGS,
        },
    )
    # Malformed HTTP is answered as JSON too, however the server is built; and the
    # connection policy (head timeout, cap) holds for every server too.
    protocol.install(app, state.connections, cors)
    app[STATE] = state
    app[METRICS] = state.metrics
    app.on_response_prepare.append(_mark_response)
    app.on_response_prepare.append(protocol.mark_closing)
    if cors is not None:
        app.on_response_prepare.append(cors.mark)
    state.metrics.bind_budget(state.budget)
    app.router.add_post("/upload", handlers.upload, expect_handler=handlers.expect_upload)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    presign.add_routes(app)
    downloads.add_routes(app)
    if settings.page:
        page.add_routes(app)
    app.cleanup_ctx.append(_s3_backend)
    app.cleanup_ctx.append(_webhook)
    if settings.tus:
        tus.add_routes(app)  # after _s3_backend: its URL keys may come from the store
    app.on_shutdown.append(lambda app: drain(app[STATE]))
    return app


def create_operator_app(main: web.Application) -> web.Application:
    """The ``--metrics-listen`` app: ``/metrics``, ``/healthz`` and a detailed ``/readyz``
    of ``main``, without auth (bind it where only operators reach)."""
    state = main[STATE]
    app = web.Application(
        middlewares=[error_middleware],
        handler_args={
            "keepalive_timeout": state.settings.keepalive_timeout,
            "access_log_class": AccessLogger,
            "access_log_format": ACCESS_LOG_FORMAT,
        },
    )
    protocol.install(app, protocol.Connections(64, state.settings.header_timeout))
    app[STATE] = state
    app[METRICS] = main[METRICS]
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz_detail)
    return app


def embedded_store(settings: Settings) -> EmbeddedStore:
    """The embedded SeaweedFS store as the settings describe it (not started)."""
    from s3proxy.embedded import EmbeddedStore

    return EmbeddedStore(embedded_config(settings))


async def _s3_backend(app: web.Application) -> AsyncIterator[None]:
    """Open (and, with no endpoint configured, first start) the S3 store the proxy writes to."""
    state = app[STATE]
    settings = state.settings
    opts = state.config.client
    store = None
    if settings.embedded:
        store = embedded_store(settings)
        await store.start()  # and restarts weed whenever it exits, until stop()
        state.store = store
        opts = dataclasses.replace(
            opts,
            endpoint_url=store.endpoint_url,
            access_key=store.access_key,
            secret_key=store.secret_key,
        )
    try:
        async with open_store(
            opts,
            settings.bucket_name,
            state.metrics,
            presign_endpoint=settings.presign_endpoint_url,
            deadline=state.janitor.deadline,
        ) as bucket:
            state.sink = bucket
            sweeper = None
            if settings.sweep_every > 0:
                sweeper = asyncio.create_task(
                    _sweep_forever(bucket, settings, state.metrics), name="cleanup"
                )
            try:
                yield
            finally:
                if sweeper is not None:
                    sweeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sweeper
                await state.janitor.close()
                state.sink = None
    finally:
        if store is not None:
            state.store = None
            await store.stop()


async def _sweep_forever(bucket: ObjectStore, settings: Settings, metrics: Metrics) -> None:
    """Abort multipart uploads a crash left behind, now and then (any instance may do it).

    One loop, so at most one sweep at a time per process. Each wait is a random
    fraction (1/2 to 1) of the interval, so instances started together drift apart
    instead of sweeping in lockstep, and an orphan goes within threshold + interval of
    its last sign of life. By activity (the default) the first sweep waits too: what
    a crash just left is younger than the threshold anyway. By age
    (``--cleanup-older-than``) it sweeps at once, as it always did.
    """
    threshold, by_activity = settings.orphan_rule
    rule = Rule(timedelta(seconds=threshold), by_activity=by_activity)
    every = settings.sweep_every
    log.info(
        "cleanup.scheduled by=%s threshold=%.0fs interval=%.0fs prefixes=%s",
        "activity" if by_activity else "age",
        threshold,
        every,
        ",".join(repr(p) for p in settings.cleanup_prefixes),
    )
    if by_activity:
        await asyncio.sleep(every * random.uniform(0.5, 1.0))
    while True:
        await sweep_once(bucket, settings, metrics, rule, time.time())
        await asyncio.sleep(every * random.uniform(0.5, 1.0))


async def sweep_once(
    bucket: ObjectStore, settings: Settings, metrics: Metrics, rule: Rule, now: float
) -> None:
    """One pass: expired tus uploads, then orphaned multipart uploads; a failure is
    logged and counted, and the next pass tries again."""
    try:
        tus_uploads = await sweep_tus(
            bucket, dry_run=False, now=now, skew=settings.cleanup_clock_skew
        )
        # Counted now: those removals are done whatever the orphan sweep does next (a
        # ListMultipartUploads refused lost 2 of them in the soak probe's metrics).
        metrics.uploads_aborted.labels(UPLOAD_EXPIRED.code).inc(len(tus_uploads.ended))
        if tus_uploads.live or tus_uploads.expired:
            log.info(
                "cleanup.tus_swept live=%d expired=%d removed=%d",
                len(tus_uploads.live),
                len(tus_uploads.expired),
                len(tus_uploads.removed),
            )
        result = await sweep(
            bucket, settings.cleanup_prefixes, rule, dry_run=False, keep=tus_uploads.live
        )
        claims = await presign_claim.sweep(bucket, now, settings.cleanup_clock_skew)
        if claims:
            log.info("cleanup.claims_swept removed=%d", claims)
        records = await presign_record.sweep(bucket, now, presign_record.retention(settings))
        if records.marked or records.removed:
            log.info(
                "cleanup.presign_records_swept kept=%d marked=%d removed=%d",
                records.kept,
                records.marked,
                records.removed,
            )
    except Exception as exc:
        metrics.sweeps.labels("failed").inc()
        log.warning("cleanup.failed error=%s", exc)
        return
    metrics.sweeps.labels("ok").inc()
    metrics.orphans_aborted.inc(len(result.aborted))
    log.info(
        "cleanup.swept found=%d aborted=%d failed=%d live=%d",
        len(result.found),
        len(result.aborted),
        len(result.errors),
        result.live,
    )


async def _webhook(app: web.Application) -> AsyncIterator[None]:
    """One HTTP client session for webhook deliveries, if a webhook is configured."""
    state = app[STATE]
    config = state.config.webhook
    if config is None:
        yield
        return
    async with aiohttp.ClientSession() as session:
        state.webhook = Webhook(config, session)
        yield
        state.webhook = None


def log_ready(app: web.Application) -> None:
    """Say the proxy serves, where, and how to try it; call once it is listening."""
    state = app[STATE]
    settings = state.settings
    endpoint = state.sink.endpoint_url if state.sink is not None else None
    where = f" data_dir={settings.data_dir.expanduser().resolve()}" if settings.embedded else ""
    log.info(
        "proxy.ready listen=http://%s:%d s3=%s bucket=%s%s",
        url_host(settings.host),
        settings.port,
        endpoint or "aws",
        settings.bucket_name,
        where,
    )
    if settings.embedded:
        from s3proxy.embedded import credentials_path

        creds = credentials_path(settings.data_dir.expanduser().resolve())
        log.info(
            "embedded store: keys in %s; list with: "
            "AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... "
            "aws --endpoint-url %s s3 ls s3://%s/ --recursive",
            creds,
            endpoint,
            settings.bucket_name,
        )
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{url_host(host)}:{settings.port}/upload"
    if settings.api_keys():
        log.info('try: curl -H "Authorization: Bearer $KEY" -F file=@report.pdf %s', url)
    elif settings.auth_configured:  # tokens only
        log.info(
            'try: curl -H "Authorization: Bearer $(s3proxy token --prefix try/)" '
            "-F file=@report.pdf %s",
            url,
        )
    else:
        log.info("try: curl -F file=@report.pdf %s", url)


async def drain(state: AppState) -> None:
    """Once the listener is closed (``server.serve``, after ``--drain-delay``): refuse new
    uploads, give running ones a grace period, then cancel them.

    A cancelled upload aborts its multipart upload, deletes what its request stored
    (telling the webhook receiver if it was notified) and answers 503
    SHUTTING_DOWN with ``Connection: close``. Only handlers still storing files are
    cancelled: one that is writing its answer is left to finish. Their cleanup, the
    janitor's last try, the rechecks of writes that may land late (the last run just
    before it, what may land after the exit logged) and every other cleanup share one
    deadline, ``SHUTDOWN_CLEANUP``
    seconds after the grace period, whatever S3 does (``janitor.Deadline``). Idle
    keep-alive connections are closed at once and every response from now on says
    ``Connection: close``, so no client holds the process once its request is answered.
    Presigned completes count as uploads, those begun during the grace period too: cut,
    they answer 503 SHUTTING_DOWN telling the client to retry the complete.
    Other requests in progress (a download) get what is left of the grace period. The
    background store check stops: /readyz says 503 from here on. Running it again does
    nothing.
    """
    state.begin_stopping()
    await state.store_check.stop()
    if state.draining:
        return
    state.draining = True
    conns = state.connections
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.shutdown_timeout
    # The one deadline of every cleanup from now on (in requests, the janitor's last try).
    cleanup_deadline = deadline + SHUTDOWN_CLEANUP
    state.janitor.deadline.set(cleanup_deadline)
    closed = conns.close_idle()
    running = set(state.uploads)
    log.info(
        "proxy.draining uploads=%d connections=%d idle_closed=%d grace=%.0fs",
        len(running),
        len(conns),
        closed,
        state.settings.shutdown_timeout,
    )
    pending: set[asyncio.Task[Any]] = set()
    if running:
        pending = await wait_reporting(
            running, deadline, lambda task: protocol.read_state(state.uploads.get(task))
        )
        stopping = [task for task in pending if task in state.uploads]
        for task in stopping:
            state.stop(task)
    # The last try at what the janitor owes runs alongside the cut uploads' cleanup, and
    # what fails from here on is logged abandoned: all of it ends by the deadline.
    last_try = asyncio.create_task(state.janitor.close(), name="cleanup-last-try")
    await conns.wait_quiet(deadline)
    # Uploads begun during the grace period (a presigned complete is accepted while
    # draining: it ends an upload whose parts went straight to S3) are cut alike.
    later = [task for task in state.uploads if not task.done() and task not in pending]
    for task in later:
        state.stop(task)
    pending.update(later)
    await stop_requests(state)
    await asyncio.wait(
        [last_try, *pending], timeout=max(0.0, cleanup_deadline - loop.time()) + STOP_WAIT
    )
    # The rechecks the cut uploads' rollbacks scheduled (after the janitor closed) run
    # what is due before the deadline, then log what may still land (``Janitor.close``).
    rechecked = asyncio.create_task(state.janitor.rechecked(), name="cleanup-rechecks")
    await asyncio.wait([rechecked], timeout=max(0.0, cleanup_deadline - loop.time()) + STOP_WAIT)
    late = [task for task in (last_try, rechecked, *pending) if not task.done()]
    if late:  # every cleanup is bounded by the deadline: this is a bug, but exit anyway
        log.error("proxy.cleanup_overran tasks=%d", len(late))


DRAIN_REPORT = 5.0  # seconds between the drain's lines on the uploads it still waits for


async def wait_reporting(
    tasks: set[asyncio.Task[Any]],
    deadline: float,
    reads: Callable[[asyncio.Task[Any]], str],
) -> set[asyncio.Task[Any]]:
    """Wait for ``tasks`` until ``deadline`` (the loop's clock); the ones not done. Every
    DRAIN_REPORT seconds, log each one still running, where it waits and how its
    connection reads (``reads``): a drain that takes its whole grace says on what (one
    under heavy load took all 30 s, killed at its end with a multipart upload open, and
    its log said nothing past ``draining``)."""
    loop = asyncio.get_running_loop()
    pending = tasks
    while pending and (left := deadline - loop.time()) > 0:
        _, pending = await asyncio.wait(pending, timeout=min(DRAIN_REPORT, left))
        for task in sorted(pending, key=lambda t: t.get_name()):
            log.info(
                "proxy.drain_waiting %s at=%s %s", task.get_name(), task_site(task), reads(task)
            )
    return pending


async def stop_requests(state: AppState) -> None:
    """At the drain's deadline, cut short the requests still in progress (a download to
    a slow client), uploads aside (they were stopped above and clean up).

    Each is cancelled here and logged as it ends (``request_middleware``), where
    aiohttp's own stop would give it one EXIT_GRACE to finish and one more once
    cancelled, and log nothing: the outside test's slow download ended 2 s after
    --shutdown-timeout, with no line in the log.
    """
    late = [task for task in state.requests if not task.done() and task not in state.uploads]
    for task in late:
        state.stop(task)
    if late:
        await asyncio.wait(late, timeout=STOP_WAIT)
