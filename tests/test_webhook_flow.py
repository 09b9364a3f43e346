"""The completion webhook through the HTTP API: signed delivery, and what a receiver
that keeps failing does to the upload (rollback, or keep)."""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp import web

from s3proxy.webhook import verify
from tests import bodies
from tests.bodies import MiB
from tests.s3util import all_keys, open_uploads

SECRET = "hook-secret"


async def receiver(aiohttp_server: Any, status: int) -> tuple[Any, list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        raw = await request.read()
        ok = verify(
            SECRET.encode(),
            request.headers["X-S3Proxy-Timestamp"],
            request.headers["X-S3Proxy-Signature"],
            raw,
        )
        got.append({"body": json.loads(raw), "signed": ok, "rid": request.headers["X-Request-ID"]})
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    return await aiohttp_server(app), got


def upload_body() -> bytes:
    return bodies.body(
        [
            bodies.field("title", "deck"),
            bodies.file("a", "a.pdf", bodies.pdf(1000)),
            bodies.file("b", "b.bin", os.urandom(6 * MiB)),
        ]
    )


async def test_webhook_receives_signed_description(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    server, got = await receiver(aiohttp_server, 204)
    proxy = await proxy_factory(webhook_url=str(server.make_url("/hook")), webhook_secret=SECRET)
    resp = await proxy.post(
        "/upload",
        data=bodies.chunked(upload_body()),
        headers={**bodies.headers(), "X-Request-ID": "req-7"},
    )
    out = await resp.json()
    assert resp.status == 201, out
    assert out["webhook"] == {"delivered": True}
    [event] = got
    assert event["signed"] and event["rid"] == "req-7"
    body = event["body"]
    assert body["event"] == "upload.completed" and body["request_id"] == "req-7"
    assert body["fields"] == {"title": "deck"}
    assert [f["key"] for f in body["files"]] == [f["key"] for f in out["files"]]
    assert {f["sha256"] for f in body["files"]} == {f["sha256"] for f in out["files"]}


async def test_failing_webhook_rolls_back(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    server, got = await receiver(aiohttp_server, 500)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")), webhook_secret=SECRET, webhook_attempts=2
    )
    resp = await proxy.post("/upload", data=bodies.chunked(upload_body()), headers=bodies.headers())
    out = await resp.json()
    assert resp.status == 502 and out["error"]["code"] == "WEBHOOK_FAILED"
    assert len(got) == 2  # retried once
    assert all_keys(s3, bucket) == [] and open_uploads(s3, bucket) == []


async def test_failing_webhook_keep_policy(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    server, _ = await receiver(aiohttp_server, 400)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")),
        webhook_secret=SECRET,
        webhook_failure="keep",
    )
    resp = await proxy.post("/upload", data=bodies.chunked(upload_body()), headers=bodies.headers())
    out = await resp.json()
    assert resp.status == 201
    assert out["webhook"]["delivered"] is False and "400" in out["webhook"]["error"]
    assert sorted(all_keys(s3, bucket)) == sorted(f["key"] for f in out["files"])
