"""The completion webhook through the HTTP API: signed delivery, and what a receiver
that keeps failing does to the upload (rollback, or keep)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from s3proxy.app import drain
from s3proxy.janitor import SHUTDOWN_CLEANUP
from s3proxy.state import STATE
from s3proxy.webhook import Webhook, verify
from tests import bodies
from tests.bodies import MiB
from tests.faults import Fault, FaultyS3
from tests.polling import eventually
from tests.s3util import all_keys_async, open_uploads_async
from tests.test_metrics import scrape, value

SECRET = "hook-secret"


async def receiver(
    aiohttp_server: Any,
    status: int,
    slow_completed: float = 0.0,
    *,
    answer: Callable[[dict[str, Any]], Awaitable[int]] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """A receiver answering ``status``; it takes ``slow_completed`` seconds over an
    upload.completed event (it gets the event, the proxy does not get the answer).
    ``answer``, if given, decides each event's status instead."""
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        raw = await request.read()
        raw.decode("utf-8")  # strict: the body must be UTF-8
        ok = verify(
            SECRET.encode(),
            request.headers["X-S3Proxy-Timestamp"],
            request.headers["X-S3Proxy-Signature"],
            raw,
        )
        body = json.loads(raw)
        got.append({"body": body, "signed": ok, "rid": request.headers["X-Request-ID"]})
        if answer is not None:
            return web.Response(status=await answer(body))
        if body["event"] == "upload.completed":
            await asyncio.sleep(slow_completed)
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    return await aiohttp_server(app), got


async def shared_key_proxy(proxy_factory: Any, server: Any) -> Any:
    """A proxy whose keys are shared (no ``{uuid}``) and may be overwritten, with one
    webhook attempt."""
    return await proxy_factory(
        key_template="in/{filename}",
        no_overwrite=False,
        webhook_url=str(server.make_url("/hook")),
        webhook_secret=SECRET,
        webhook_attempts=1,
    )


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
    assert len(events(got, "upload.completed")) == 2  # retried once
    # then one best-effort notice that the files it may have seen are gone
    [rolled] = events(got, "upload.rolled_back")
    assert rolled["body"]["reason"] == "WEBHOOK_FAILED" and len(rolled["body"]["keys"]) == 2
    assert await all_keys_async(s3, bucket) == [] and await open_uploads_async(s3, bucket) == []
    # the two files count as aborted for the webhook, not as completed or stored
    samples = await scrape(proxy)
    assert value(samples, "s3proxy_uploads_started_total") == 2
    assert value(samples, "s3proxy_uploads_completed_total") == 0
    assert value(samples, "s3proxy_bytes_stored_total") == 0
    assert value(samples, "s3proxy_uploads_aborted_total", reason="WEBHOOK_FAILED") == 2


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
    assert sorted(await all_keys_async(s3, bucket)) == sorted(f["key"] for f in out["files"])
    samples = await scrape(proxy)  # kept: completed
    assert value(samples, "s3proxy_uploads_completed_total") == 2
    assert value(samples, "s3proxy_bytes_stored_total") == sum(f["size"] for f in out["files"])
    assert value(samples, "s3proxy_uploads_aborted_total", reason="WEBHOOK_FAILED") is None


def events(got: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in got if e["body"]["event"] == name]


async def test_non_utf8_filename_is_delivered(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """A filename with a raw Latin-1 byte (not UTF-8): the webhook still goes out."""
    server, got = await receiver(aiohttp_server, 204)
    proxy = await proxy_factory(webhook_url=str(server.make_url("/hook")), webhook_secret=SECRET)
    raw = bodies.body([bodies.file("f", "cafXX.txt", b"hello", "text/plain")])
    raw = raw.replace(b"cafXX.txt", b"caf\xe9.txt")
    resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
    out = await resp.json()
    assert resp.status == 201, out
    assert out["webhook"] == {"delivered": True}
    [event] = got
    assert event["signed"]
    assert [f["key"] for f in event["body"]["files"]] == [f["key"] for f in out["files"]]
    assert await all_keys_async(s3, bucket) == [out["files"][0]["key"]]


@pytest.mark.parametrize("policy", ["rollback", "keep"])
async def test_any_failure_while_notifying_rolls_back(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str, monkeypatch: Any, policy: str
) -> None:
    """Not a WebhookError (a bug, anything): the client is told it failed, so nothing stays,
    whatever --webhook-failure says."""

    async def broken(self: Webhook, event: Any, request_id: str, **kw: Any) -> None:
        raise RuntimeError("bug in delivery")

    monkeypatch.setattr(Webhook, "deliver", broken)
    proxy = await proxy_factory(webhook_url="http://127.0.0.1:9/hook", webhook_failure=policy)
    resp = await proxy.post("/upload", data=bodies.chunked(upload_body()), headers=bodies.headers())
    out = await resp.json()
    assert resp.status == 500 and out["error"]["code"] == "INTERNAL"
    assert await all_keys_async(s3, bucket) == [] and await open_uploads_async(s3, bucket) == []


async def test_shutdown_while_webhook_is_retried(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """SIGTERM's drain cancels a request whose webhook is being retried: the files are
    rolled back, the receiver is told, and the client gets a JSON 503, not a dropped line."""
    server, got = await receiver(aiohttp_server, 500)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")),
        webhook_secret=SECRET,
        webhook_attempts=5,
        shutdown_timeout=0.1,
    )
    posting = asyncio.ensure_future(
        proxy.post(
            "/upload",
            data=bodies.chunked(upload_body()),
            headers={**bodies.headers(), "X-Request-ID": "req-drain"},
        )
    )
    await eventually(lambda: got, within=10, what="the receiver to get an event")
    assert await all_keys_async(s3, bucket), "stored, and waiting on the webhook"
    await drain(proxy.server.app[STATE])
    resp = await asyncio.wait_for(posting, 10)
    out = await resp.json()
    assert resp.status == 503 and out["error"]["code"] == "SHUTTING_DOWN", out
    assert await all_keys_async(s3, bucket) == [] and await open_uploads_async(s3, bucket) == []
    [completed] = events(got, "upload.completed")[:1]
    [rolled] = events(got, "upload.rolled_back")
    assert rolled["signed"] and rolled["body"]["request_id"] == "req-drain"
    assert rolled["body"]["keys"] == [f["key"] for f in completed["body"]["files"]]


async def test_late_webhook_answer_is_followed_by_rolled_back(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """The receiver got upload.completed but answered after the timeout: the files are
    deleted, so it is sent upload.rolled_back with the same request id and the keys."""
    server, got = await receiver(aiohttp_server, 204, slow_completed=1.0)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")),
        webhook_secret=SECRET,
        webhook_attempts=1,
        webhook_timeout=0.3,
    )
    resp = await proxy.post(
        "/upload",
        data=bodies.chunked(upload_body()),
        headers={**bodies.headers(), "X-Request-ID": "req-late"},
    )
    out = await resp.json()
    assert resp.status == 502 and out["error"]["code"] == "WEBHOOK_FAILED"
    assert await all_keys_async(s3, bucket) == [] and await open_uploads_async(s3, bucket) == []
    [completed] = events(got, "upload.completed")
    [rolled] = events(got, "upload.rolled_back")
    assert rolled["signed"] and rolled["rid"] == "req-late"
    assert rolled["body"]["request_id"] == completed["body"]["request_id"] == "req-late"
    assert rolled["body"]["keys"] == [f["key"] for f in completed["body"]["files"]]
    assert rolled["body"]["reason"] == "WEBHOOK_FAILED"


async def test_webhook_failure_without_delivery_attempt_sends_no_rolled_back(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """A failed upload that never reached the webhook stage sends nothing at all."""
    server, got = await receiver(aiohttp_server, 204)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")), webhook_secret=SECRET, max_file_size=1000
    )
    resp = await proxy.post("/upload", data=bodies.chunked(upload_body()), headers=bodies.headers())
    assert resp.status == 413
    assert got == []


async def test_a_rolled_back_notice_to_a_hanging_receiver_keeps_to_the_shutdown_deadline(
    proxy_factory: Any,
    aiohttp_server: Any,
    s3: Any,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The receiver holds every answer: the request cut by the drain rolls its files back,
    and its upload.rolled_back notice (its own --webhook-timeout, 30 s here) ends at the
    shutdown's cleanup deadline, logged, rather than holding the exit."""
    release = asyncio.Event()
    got: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(json.loads(await request.read())["event"])
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")),
        webhook_attempts=1,
        webhook_timeout=30,
        shutdown_timeout=0.5,
    )
    try:
        posting = asyncio.ensure_future(
            proxy.post("/upload", data=bodies.chunked(upload_body()), headers=bodies.headers())
        )
        await eventually(lambda: got, within=10, what="the receiver to get upload.completed")
        loop = asyncio.get_running_loop()
        began = loop.time()
        with caplog.at_level(logging.INFO):
            await asyncio.wait_for(drain(proxy.server.app[STATE]), 20)
        took = loop.time() - began
        assert took < 0.5 + SHUTDOWN_CLEANUP + 1.5, took
        resp = await asyncio.wait_for(posting, 10)
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "SHUTTING_DOWN"
        assert got == ["upload.completed", "upload.rolled_back"]
        assert "webhook.rolled_back_not_delivered reason=the shutdown deadline passed" in (
            caplog.text
        )
        assert await all_keys_async(s3, bucket) == []
    finally:
        release.set()


async def test_a_rollback_with_overwrites_allowed_deletes_its_own_files(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """Keys shared and overwrites allowed (``--no-overwrite false``): a failed upload
    deleted nothing, since the key may hold another's object by then, yet its 502 said "the
    upload was rolled back" and the receiver was sent ``upload.rolled_back`` for files that
    stayed. It now deletes its own (told by its nonce), as the 502 says."""
    server, got = await receiver(aiohttp_server, 500)
    proxy = await shared_key_proxy(proxy_factory, server)
    data = os.urandom(1000)
    raw = bodies.body([bodies.file("f", "a.bin", data)])
    resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
    out = await resp.json()
    assert (resp.status, out["error"]["code"]) == (502, "WEBHOOK_FAILED"), out
    message = out["error"]["message"]
    assert message.startswith("the upload was rolled back"), message
    [rolled] = events(got, "upload.rolled_back")
    assert rolled["body"]["keys"] == ["in/a.bin"]
    assert await all_keys_async(s3, bucket) == []


async def test_a_rollback_whose_delete_failed_says_it_did_not_finish(
    proxy_factory: Any, aiohttp_server: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """The rollback's DeleteObject failed and went to the janitor: the 502 said "the upload
    was rolled back" while the file still stood. It says the rollback did not finish and
    that the proxy goes on deleting; the file is gone once S3 takes the delete."""
    server, got = await receiver(aiohttp_server, 500)
    refuse = {"on": True}
    rule = lambda o, n: Fault(status=500) if refuse["on"] and o == "DeleteObject" else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url,
            s3_max_attempts=1,
            webhook_url=str(server.make_url("/hook")),
            webhook_secret=SECRET,
            webhook_attempts=1,
        )
        raw = bodies.body([bodies.file("f", "a.bin", os.urandom(1000))])
        resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
        out = await resp.json()
        assert (resp.status, out["error"]["code"]) == (502, "WEBHOOK_FAILED"), out
        message = out["error"]["message"]
        assert "did not finish" in message and "rolled back:" not in message, message
        [completed] = events(got, "upload.completed")
        [rolled] = events(got, "upload.rolled_back")  # a delete was sent: it may land
        assert rolled["body"]["keys"] == [f["key"] for f in completed["body"]["files"]]
        assert len(await all_keys_async(s3, bucket)) == 1
        refuse["on"] = False
        await eventually(
            lambda: all_keys_async(s3, bucket),
            until=lambda k: k == [],
            within=15.0,
            what="the janitor's delete",
        )


async def test_a_rollback_names_no_key_that_holds_another_uploads_object(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """Shared keys, overwrites allowed: while A's webhook was failing, B stored the same
    key and got 201. A's rollback left B's object (told by the nonce), but its
    ``upload.rolled_back`` still named the key, and a receiver that forgets those keys
    forgot B's file (reprobe12a F1)."""
    heard = asyncio.Event()

    async def answer(body: dict[str, Any]) -> int:
        if body["event"] == "upload.completed" and body["request_id"] == "req-a":
            heard.set()
            await asyncio.sleep(1.0)
            return 500
        return 204

    server, got = await receiver(aiohttp_server, 204, answer=answer)
    proxy = await shared_key_proxy(proxy_factory, server)

    async def post(data: bytes, rid: str) -> tuple[int, Any]:
        raw = bodies.body([bodies.file("f", "a.bin", data)])
        resp = await proxy.post(
            "/upload", data=raw, headers={**bodies.headers(), "X-Request-ID": rid}
        )
        return resp.status, await resp.json()

    first = asyncio.ensure_future(post(b"A" * 1000, "req-a"))
    await asyncio.wait_for(heard.wait(), 10)
    status, out = await post(b"B" * 1000, "req-b")
    assert status == 201, out
    status, out = await first
    assert (status, out["error"]["code"]) == (502, "WEBHOOK_FAILED"), out
    assert events(got, "upload.rolled_back") == []
    assert await all_keys_async(s3, bucket) == ["in/a.bin"]
    obj = await asyncio.to_thread(s3.get_object, Bucket=bucket, Key="in/a.bin")
    assert obj["Body"].read() == b"B" * 1000
