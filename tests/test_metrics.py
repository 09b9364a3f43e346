"""Metrics: a small real app with the middleware, scraped over HTTP and parsed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from s3proxy.budget import MemoryBudget
from s3proxy.errors import FILE_TOO_LARGE, ProxyError, error_middleware
from s3proxy.metrics import METRICS, Metrics, metrics_handler, metrics_middleware
from s3proxy.s3 import S3Error, refusal

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample as {(name, labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(client: TestClient[Any, Any]) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    return parse(await resp.text())


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def item(request: web.Request) -> web.Response:
    return web.json_response({"id": request.match_info["id"]})


async def too_large(request: web.Request) -> web.Response:
    raise ProxyError(FILE_TOO_LARGE, "too big")


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("bug")


async def teapot(request: web.Request) -> web.Response:
    raise web.HTTPConflict()


def make_app(metrics: Metrics, *, with_errors: bool = True) -> web.Application:
    middlewares = [metrics_middleware(metrics)]
    if with_errors:
        middlewares.append(error_middleware)
    app = web.Application(middlewares=middlewares)
    app[METRICS] = metrics
    app.router.add_get("/ok", ok)
    app.router.add_get("/items/{id}", item)
    app.router.add_post("/upload", too_large)
    app.router.add_get("/boom", boom)
    app.router.add_get("/conflict", teapot)
    app.router.add_get("/metrics", metrics_handler)
    return app


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


async def test_requests_are_counted_by_route_method_and_status(
    aiohttp_client: Any, metrics: Metrics
) -> None:
    client = await aiohttp_client(make_app(metrics))
    for _ in range(3):
        assert (await client.get("/ok")).status == 200
    for n in range(4):
        assert (await client.get(f"/items/{n}")).status == 200
    assert (await client.post("/upload", data=b"x")).status == 413
    assert (await client.get("/boom")).status == 500

    samples = await scrape(client)
    count = "s3proxy_http_request_seconds_count"
    assert value(samples, count, route="/ok", method="GET", status="200") == 3
    # The canonical path, not one series per URL.
    assert value(samples, count, route="/items/{id}", method="GET", status="200") == 4
    assert not any("/items/1" in dict(labels).get("route", "") for _, labels in samples)
    assert value(samples, count, route="/upload", method="POST", status="413") == 1
    assert value(samples, count, route="/boom", method="GET", status="500") == 1
    bucket = "s3proxy_http_request_seconds_bucket"
    assert value(samples, bucket, route="/ok", method="GET", status="200", le="600.0") == 3
    assert value(samples, bucket, route="/ok", method="GET", status="200", le="+Inf") == 3


async def test_unmatched_paths_share_one_label(aiohttp_client: Any, metrics: Metrics) -> None:
    client = await aiohttp_client(make_app(metrics))
    for path in ("/nope", "/other/thing", "/nope?x=1"):
        assert (await client.get(path)).status == 404
    assert (await client.post("/ok")).status == 405
    assert (await client.request("PROPFIND", "/ok")).status == 405

    samples = await scrape(client)
    count = "s3proxy_http_request_seconds_count"
    assert value(samples, count, route="unmatched", method="GET", status="404") == 3
    assert value(samples, count, route="unmatched", method="POST", status="405") == 1
    # A method outside the common ones does not become a label value of its own.
    assert value(samples, count, route="unmatched", method="OTHER", status="405") == 1
    routes = {dict(labels).get("route") for name, labels in samples if name == count}
    assert routes == {"unmatched"}  # this scrape is timed after its own exposition


async def test_exceptions_without_error_middleware(aiohttp_client: Any, metrics: Metrics) -> None:
    """Outside error_middleware, raised errors still count with the status aiohttp sends."""
    client = await aiohttp_client(make_app(metrics, with_errors=False))
    assert (await client.get("/conflict")).status == 409
    assert (await client.get("/nope")).status == 404
    assert (await client.get("/boom")).status == 500

    samples = await scrape(client)
    count = "s3proxy_http_request_seconds_count"
    assert value(samples, count, route="/conflict", method="GET", status="409") == 1
    assert value(samples, count, route="unmatched", method="GET", status="404") == 1
    assert value(samples, count, route="/boom", method="GET", status="500") == 1


async def test_s3_call_times_successes_and_counts_errors(metrics: Metrics) -> None:
    async with metrics.s3_call("UploadPart"):
        await asyncio.sleep(0)
    with pytest.raises(ProxyError):
        async with metrics.s3_call("UploadPart"):
            raise ProxyError(FILE_TOO_LARGE, "x")
    with pytest.raises(S3Error):
        async with metrics.s3_call("CompleteMultipartUpload"):
            raise refusal("CompleteMultipartUpload", "SlowDown", 503)
    with pytest.raises(ConnectionResetError):
        async with metrics.s3_call("PutObject"):
            raise ConnectionResetError
    with pytest.raises(asyncio.CancelledError):
        async with metrics.s3_call("PutObject"):
            raise asyncio.CancelledError

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = parse(body.decode())
    errors = "s3proxy_s3_errors_total"
    assert value(samples, errors, operation="UploadPart", code="FILE_TOO_LARGE") == 1
    assert value(samples, errors, operation="CompleteMultipartUpload", code="SlowDown") == 1
    assert value(samples, errors, operation="PutObject", code="ConnectionResetError") == 1
    count = "s3proxy_s3_request_seconds_count"
    assert value(samples, count, operation="UploadPart") == 2
    assert value(samples, count, operation="CompleteMultipartUpload") == 1
    # Cancellation is neither an S3 error nor an S3 latency.
    assert value(samples, count, operation="PutObject") == 1


async def test_budget_is_read_at_scrape_time(aiohttp_client: Any, metrics: Metrics) -> None:
    budget = MemoryBudget(1000)
    metrics.bind_budget(budget)
    client = await aiohttp_client(make_app(metrics))

    samples = await scrape(client)
    assert value(samples, "s3proxy_memory_budget_bytes_in_use") == 0
    assert value(samples, "s3proxy_memory_budget_bytes_limit") == 1000
    assert value(samples, "s3proxy_memory_budget_wait_seconds_total") == 0
    assert value(samples, "s3proxy_memory_budget_waiting") == 0
    assert value(samples, "s3proxy_memory_budget_evictions_total") == 0
    assert value(samples, "s3proxy_memory_budget_waiters_expired_total") == 0

    held = await budget.acquire(700)
    waiter = asyncio.create_task(budget.acquire(600))
    await asyncio.sleep(0.05)
    samples = await scrape(client)
    assert value(samples, "s3proxy_memory_budget_waiting") == 1
    # The counters budget.py keeps (tested there) are what a scrape shows.
    budget.evictions, budget.expired = 2, 3
    samples = await scrape(client)
    assert value(samples, "s3proxy_memory_budget_evictions_total") == 2
    assert value(samples, "s3proxy_memory_budget_waiters_expired_total") == 3
    held.release()
    second = await waiter
    samples = await scrape(client)
    assert value(samples, "s3proxy_memory_budget_bytes_in_use") == 600
    wait = value(samples, "s3proxy_memory_budget_wait_seconds_total")
    assert wait is not None and wait >= 0.04
    second.release()

    # Binding again replaces the collector rather than clashing with it.
    metrics.bind_budget(MemoryBudget(2))
    samples = parse(metrics.render()[0].decode())
    assert value(samples, "s3proxy_memory_budget_bytes_in_use") == 0
    assert value(samples, "s3proxy_memory_budget_bytes_limit") == 2


def test_upload_counters_and_separate_registries() -> None:
    first, second = Metrics(), Metrics()  # no clash: each has its own registry
    first.uploads_started.inc()
    first.uploads_in_flight.inc()
    first.bytes_received.inc(100)
    first.bytes_stored.inc(100)
    first.uploads_completed.inc()
    first.uploads_aborted.labels("CLIENT_DISCONNECTED").inc()
    first.uploads_in_flight.dec()

    samples = parse(first.render()[0].decode())
    assert value(samples, "s3proxy_uploads_started_total") == 1
    assert value(samples, "s3proxy_uploads_completed_total") == 1
    assert value(samples, "s3proxy_uploads_aborted_total", reason="CLIENT_DISCONNECTED") == 1
    assert value(samples, "s3proxy_bytes_received_total") == 100
    assert value(samples, "s3proxy_bytes_stored_total") == 100
    assert value(samples, "s3proxy_uploads_in_flight") == 0
    assert value(parse(second.render()[0].decode()), "s3proxy_uploads_started_total") == 0
