"""Prometheus metrics, kept in a per-app registry.

Each app gets its own ``CollectorRegistry`` rather than the process-global one, so
several apps in one process (tests, benchmarks) never clash over metric names.

Labels are kept to bounded sets, because every distinct label value is a new time
series held forever: routes are the router's canonical paths (``unmatched`` when
no route matched), methods outside the standard ones count as ``OTHER``, and
error reasons are stable codes (``FILE_TOO_LARGE``, an S3 error code, or an
exception type name), never messages or URLs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from s3proxy.errors import ProxyError
from s3proxy.log import CLIENT_GONE, CLIENT_GONE_STATUS, client_gone, cut_short_response
from s3proxy.s3 import S3Error

# Whole requests: an upload of several GiB at a modest rate takes minutes, so the
# buckets reach 10 minutes; health checks and rejections land in the low ones.
REQUEST_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# One S3 call: a small PutObject is milliseconds; a large UploadPart on a slow link,
# with botocore's retries inside it, can take up to the read timeout or beyond.
S3_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip

UNMATCHED = "unmatched"  # route label for requests no route matched (404, 405)
# A client can send any token as a method; only these get their own label value.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
# Status label for a handler cancelled mid-request (the client went away), after
# nginx's "499 client closed request"; no response was sent.
CANCELLED_STATUS = str(CLIENT_GONE_STATUS)


class BudgetView(Protocol):
    """What the metrics read from the memory budget (``budget.MemoryBudget``) at a scrape."""

    @property
    def in_use(self) -> int: ...
    @property
    def limit(self) -> int: ...
    @property
    def wait_seconds(self) -> float: ...
    @property
    def waiting(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def expired(self) -> int: ...


class _BudgetCollector:
    """Reads the memory budget at scrape time, so no code path has to keep gauges in step."""

    def __init__(self, budget: BudgetView) -> None:
        self._budget = budget

    def collect(self) -> Iterable[Metric]:
        b = self._budget
        yield GaugeMetricFamily(
            "s3proxy_memory_budget_bytes_in_use",
            "Bytes of the memory budget reserved for part buffers.",
            value=b.in_use,
        )
        yield GaugeMetricFamily(
            "s3proxy_memory_budget_bytes_limit",
            "Size of the memory budget in bytes.",
            value=b.limit,
        )
        yield GaugeMetricFamily(
            "s3proxy_memory_budget_waiting",
            "Uploads waiting for the memory budget now (their sockets are not read).",
            value=b.waiting,
        )
        yield CounterMetricFamily(
            "s3proxy_memory_budget_wait_seconds",
            "Seconds uploads spent waiting for the memory budget (backpressure), summed.",
            value=b.wait_seconds,
        )
        yield CounterMetricFamily(
            "s3proxy_memory_budget_evictions",
            "Uploads evicted (408) for filling a held part below the minimum rate while "
            "others waited.",
            value=b.evictions,
        )
        yield CounterMetricFamily(
            "s3proxy_memory_budget_waiters_expired",
            "Uploads timed out (408) for sending below the minimum rate while they waited "
            "for the budget.",
            value=b.expired,
        )


class Metrics:
    """The proxy's metrics; one instance per app, each with its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.uploads_started = Counter(
            "s3proxy_uploads_started", "Files whose upload began.", registry=r
        )
        self.uploads_completed = Counter(
            "s3proxy_uploads_completed",
            "Files stored in S3 and kept (counted once the request's outcome is final).",
            registry=r,
        )
        self.uploads_aborted = Counter(
            "s3proxy_uploads_aborted",
            "Files not kept: abandoned, or rolled back with their request, by the error "
            "code that ended it.",
            ["reason"],
            registry=r,
        )
        self.tus_patches_failed = Counter(
            "s3proxy_tus_patches_failed",
            "Resumable-upload PATCHes that ended early, by error code; the upload stays "
            "resumable (it counts as aborted only when it ends: terminated, expired, refused).",
            ["reason"],
            registry=r,
        )
        self.bytes_received = Counter(
            "s3proxy_bytes_received", "File bytes read from clients.", registry=r
        )
        self.bytes_stored = Counter(
            "s3proxy_bytes_stored", "File bytes of the uploads counted completed.", registry=r
        )
        self.uploads_in_flight = Gauge(
            "s3proxy_uploads_in_flight", "Files being uploaded right now.", registry=r
        )
        self.s3_latency = Histogram(
            "s3proxy_s3_request_seconds",
            "Duration of S3 calls, by operation (botocore's retries included).",
            ["operation"],
            buckets=S3_BUCKETS,
            registry=r,
        )
        self.s3_errors = Counter(
            "s3proxy_s3_errors",
            "S3 calls that failed, by operation and error code.",
            ["operation", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "s3proxy_http_request_seconds",
            "Duration of HTTP requests to the proxy, by route, method and status.",
            ["route", "method", "status"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.orphans_aborted = Counter(
            "s3proxy_orphans_aborted",
            "Multipart uploads with no sign of life that the orphan sweep aborted.",
            registry=r,
        )
        self.sweeps = Counter(
            "s3proxy_cleanup_sweeps",
            "Orphan sweeps run, by outcome (ok, failed).",
            ["outcome"],
            registry=r,
        )
        self._budget: _BudgetCollector | None = None

    def bind_budget(self, budget: BudgetView) -> None:
        """Export the memory budget, read at each scrape. Rebinding replaces."""
        if self._budget is not None:
            self.registry.unregister(self._budget)
        self._budget = _BudgetCollector(budget)
        self.registry.register(self._budget)

    @contextlib.asynccontextmanager
    async def s3_call(self, operation: str) -> AsyncIterator[None]:
        """Time one S3 call; count it as an error if it raises, and re-raise.

        A cancelled call is neither timed nor counted: it says nothing about S3.
        """
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.s3_errors.labels(operation, error_code(exc)).inc()
            self.s3_latency.labels(operation).observe(time.perf_counter() - started)
            raise
        self.s3_latency.labels(operation).observe(time.perf_counter() - started)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for a /metrics response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def error_code(exc: BaseException) -> str:
    """A stable, low-cardinality code for an exception: S3's, then ours, then its type.

    An ``S3Error`` carries S3's error code (``SlowDown``) or, when S3 never answered,
    the exception's type name (``ReadTimeoutError``), as its ``reason``.
    """
    if isinstance(exc, S3Error):
        return exc.reason
    if isinstance(exc, ProxyError):
        return exc.kind.code
    return type(exc).__name__


def route_label(request: web.Request) -> str:
    """The matched route's canonical path (``/files/{key}``), never the raw URL."""
    resource = request.match_info.route.resource
    if resource is None:
        return UNMATCHED
    return resource.canonical


def method_label(method: str) -> str:
    return method if method in _METHODS else "OTHER"


def metrics_middleware(metrics: Metrics) -> Middleware:
    """Time every request by route, method and status.

    Put it first (outermost) so it sees the status the client sees. It also copes
    with errors that reach it: an ``HTTPException`` counts with its status, any
    other exception as 500, and cancellation as 499 (or the status of the response
    it cut short, a download's 200); all are re-raised. An answer
    whose client left before it began (a body cut mid-upload) is 499 too, not the
    400 nobody read, here and in the access log.
    """

    @web.middleware  # without it aiohttp 3 treats it as old-style and warns
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = "500"
        try:
            response = await handler(request)
            status = str(response.status)
            if client_gone(request, response):
                request[CLIENT_GONE] = True  # the access log says 499 too
                status = CANCELLED_STATUS
            return response
        except web.HTTPException as exc:
            status = str(exc.status)
            raise
        except BaseException as exc:
            if not isinstance(exc, Exception):
                status = str(cut_short_response(request).status)
            raise
        finally:
            metrics.request_duration.labels(
                route_label(request), method_label(request.method), status
            ).observe(time.perf_counter() - started)

    return middleware


METRICS = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus exposition of this app's registry."""
    body, content_type = request.app[METRICS].render()
    # Set the header directly: ``content_type=`` rejects a value with parameters.
    return web.Response(body=body, headers={"Content-Type": content_type})
