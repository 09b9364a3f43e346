"""Webhook delivery against a real receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from s3proxy.webhook import (
    MAX_DELAY,
    Webhook,
    WebhookConfig,
    WebhookError,
    parse_retry_after,
    retry_delay,
    sign,
    verify,
)

SECRET = b"s3cr3t"
EVENT = {"files": [{"key": "a/b.pdf", "size": 3}], "fields": {"note": "héllo"}}


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver whose answers are scripted, one per attempt."""

    server: TestServer
    answers: list[Callable[[], Awaitable[web.Response]]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hook"))


def status(code: int, **headers: str) -> Callable[[], Awaitable[web.Response]]:
    async def answer() -> web.Response:
        return web.Response(status=code, text=f"answer {code}", headers=headers)

    return answer


def slow(seconds: float) -> Callable[[], Awaitable[web.Response]]:
    async def answer() -> web.Response:
        await asyncio.sleep(seconds)
        return web.Response(status=200)

    return answer


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    rec: Receiver

    async def hook(request: web.Request) -> web.Response:
        rec.seen.append(Seen(dict(request.headers), await request.read()))
        rec.times.append(time.monotonic())
        answer = rec.answers.pop(0) if rec.answers else status(204)
        return await answer()

    app = web.Application()
    app.router.add_post("/hook", hook)
    rec = Receiver(await aiohttp_server(app, host="127.0.0.1"))
    return rec


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def webhook(
    session: aiohttp.ClientSession, url: str, secret: bytes | None = SECRET, **kw: Any
) -> Webhook:
    kw.setdefault("backoff", 0.01)
    return Webhook(WebhookConfig(url=url, secret=secret, **kw), session)


async def test_delivered_first_time_with_signed_json(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    await webhook(session, receiver.url).deliver(EVENT, "req-1")

    [seen] = receiver.seen
    assert json.loads(seen.body) == EVENT
    h = seen.headers
    assert h["Content-Type"] == "application/json"
    assert h["X-Request-ID"] == "req-1"
    assert h["X-S3Proxy-Attempt"] == "1"
    assert len(h["X-S3Proxy-Delivery"]) == 36
    assert h["X-S3Proxy-Signature"].startswith("sha256=")
    assert verify(SECRET, h["X-S3Proxy-Timestamp"], h["X-S3Proxy-Signature"], seen.body)
    assert not verify(b"other", h["X-S3Proxy-Timestamp"], h["X-S3Proxy-Signature"], seen.body)
    assert not verify(SECRET, h["X-S3Proxy-Timestamp"], h["X-S3Proxy-Signature"], seen.body + b" ")


async def test_no_secret_no_signature(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    await webhook(session, receiver.url, secret=None).deliver(EVENT, "req-1")
    [seen] = receiver.seen
    assert "X-S3Proxy-Signature" not in seen.headers
    assert "X-S3Proxy-Timestamp" not in seen.headers


def test_sign_and_verify_scheme() -> None:
    body = b'{"a":1}'
    sig = sign(SECRET, 1_700_000_000, body)
    expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sig == "sha256=" + expected
    assert verify(SECRET, "1700000000", sig, body, now=1_700_000_100)
    # Stale, from the future, malformed, or signed for another timestamp.
    assert not verify(SECRET, "1700000000", sig, body, now=1_700_000_301)
    assert not verify(SECRET, "1700000000", sig, body, now=1_699_999_699)
    assert not verify(SECRET, "17e8", sig, body, now=1_700_000_000)
    assert not verify(SECRET, "\u0661\u0667", sig, body, now=17)  # non-ASCII digits
    assert not verify(SECRET, "1700000001", sig, body, now=1_700_000_000)
    assert not verify(SECRET, "9" * 5000, sig, body)  # past int()'s digit limit: False, no error
    assert not verify(SECRET, "1700000000", "sha256=ü", body, now=1_700_000_000)
    assert verify(SECRET, "1700000000", sig, body, now=1_700_000_500, tolerance=600)


async def test_retries_after_503s_with_the_same_delivery_id(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.answers = [status(503), status(503), status(200)]
    await webhook(session, receiver.url).deliver(EVENT, "req-2")

    assert len(receiver.seen) == 3
    assert len({s.headers["X-S3Proxy-Delivery"] for s in receiver.seen}) == 1
    assert [s.headers["X-S3Proxy-Attempt"] for s in receiver.seen] == ["1", "2", "3"]
    assert {s.body for s in receiver.seen} == {receiver.seen[0].body}
    for s in receiver.seen:
        h = s.headers
        assert verify(SECRET, h["X-S3Proxy-Timestamp"], h["X-S3Proxy-Signature"], s.body)


async def test_gives_up_after_max_attempts(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.answers = [status(500)] * 10
    with pytest.raises(WebhookError) as info:
        await webhook(session, receiver.url, max_attempts=3).deliver(EVENT, "req-3")
    assert len(receiver.seen) == 3
    assert info.value.attempts == 3
    assert info.value.status == 500
    assert info.value.reason == "HTTP 500"


@pytest.mark.parametrize("code", [400, 401, 404, 422, 301])
async def test_no_retry_on_other_answers(
    receiver: Receiver, session: aiohttp.ClientSession, code: int
) -> None:
    receiver.answers = [status(code, Location="/elsewhere")]
    with pytest.raises(WebhookError) as info:
        await webhook(session, receiver.url).deliver(EVENT, "req-4")
    assert len(receiver.seen) == 1
    assert info.value.attempts == 1
    assert info.value.status == code


@pytest.mark.parametrize("code", [408, 429, 502, 504])
async def test_retryable_statuses(
    receiver: Receiver, session: aiohttp.ClientSession, code: int
) -> None:
    receiver.answers = [status(code)]
    await webhook(session, receiver.url).deliver(EVENT, "req-5")
    assert len(receiver.seen) == 2


async def test_retry_after_is_honoured(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.answers = [status(429, **{"Retry-After": "1"}), status(200)]
    await webhook(session, receiver.url, backoff=0.01).deliver(EVENT, "req-6")
    assert len(receiver.seen) == 2
    gap = receiver.times[1] - receiver.times[0]
    assert 0.9 <= gap < 2.0


async def test_timeout_is_retried(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.answers = [slow(1.0), status(200)]
    started = time.monotonic()
    await webhook(session, receiver.url, timeout=0.2).deliver(EVENT, "req-7")
    assert time.monotonic() - started < 0.9
    assert len(receiver.seen) == 2


async def test_timeouts_exhaust_attempts(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.answers = [slow(1.0), slow(1.0)]
    with pytest.raises(WebhookError, match="timed out"):
        await webhook(session, receiver.url, timeout=0.2, max_attempts=2).deliver(EVENT, "r")
    assert len(receiver.seen) == 2


async def test_connection_refused_is_retried_then_reported(
    unused_tcp_port: int, session: aiohttp.ClientSession
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}/hook"
    with pytest.raises(WebhookError, match="cannot reach") as info:
        await webhook(session, url, max_attempts=3).deliver(EVENT, "req-8")
    assert info.value.attempts == 3
    assert info.value.status is None


async def test_a_huge_answer_is_not_read_whole(session: aiohttp.ClientSession) -> None:
    """A receiver answering 200 with 256 MiB: the proxy reads at most 64 KiB of it
    and closes the connection, so the receiver gets to send only what the socket buffers
    hold (it sent all 256 MiB, into the proxy's memory, when the answer was read whole)."""
    total = 256 * 1024 * 1024
    sent = 0
    done = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").lower().split("\r\n")
            length = next(int(h.split(":")[1]) for h in lines if h.startswith("content-length:"))
            await reader.readexactly(length)  # the event
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            piece = bytes(64 * 1024)
            while sent < total:
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await webhook(session, f"http://127.0.0.1:{port}/hook", timeout=10).deliver(EVENT, "r")
        await asyncio.wait_for(done.wait(), 10)
    # what the loopback socket buffers took before the close, not the answer
    assert sent < 32 * 1024 * 1024, sent


def test_retry_delay_doubles_with_jitter_and_a_cap() -> None:
    assert retry_delay(0.5, 1, rand=lambda: 0.0) == 0.25
    assert retry_delay(0.5, 1, rand=lambda: 1.0) == 0.5
    assert retry_delay(0.5, 3, rand=lambda: 1.0) == 2.0
    assert retry_delay(0.5, 20, rand=lambda: 1.0) == MAX_DELAY
    assert MAX_DELAY / 2 <= retry_delay(0.5, 20) <= MAX_DELAY


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-1") is None
    now = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now=now) == 10.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:27 GMT", now=now) == 0.0
    # a receiver's date whose year or offset overflows is no date (was OverflowError)
    assert parse_retry_after("Sun, 06 Nov 99999999999999 08:49:27 GMT", now=now) is None
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 -2359", now=now) is None


@pytest.mark.parametrize(
    "kw",
    [
        {"url": "ftp://x/"},
        {"timeout": 0},
        {"max_attempts": 0},
        {"backoff": -1},
    ],
)
def test_config_is_validated(kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {"url": "http://127.0.0.1/hook", "secret": None, **kw}
    with pytest.raises(ValueError):
        WebhookConfig(**args)


async def test_text_that_is_not_unicode_is_still_sent_as_utf8_json(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A filename decoded with surrogateescape (a raw 0xE9 byte) holds a lone surrogate,
    which UTF-8 cannot encode: it is sent as U+FFFD, and the delivery goes out."""
    event = {"files": [{"filename": "caf\udce9.txt", "size": 1}], "n": 1}
    await webhook(session, receiver.url).deliver(event, "req-9")
    [seen] = receiver.seen
    assert json.loads(seen.body.decode("utf-8")) == {
        "files": [{"filename": "caf\ufffd.txt", "size": 1}],
        "n": 1,
    }


def test_encoding_an_event_cannot_fail() -> None:
    from s3proxy.webhook import encode_event

    odd: dict[str, Any] = {"\udcff": "\ud800x", "when": time, "ok": "é", "pair": "\U0001f600"}
    decoded = json.loads(encode_event(odd).decode("utf-8"))
    assert decoded["\ufffd"] == "\ufffdx"
    assert decoded["ok"] == "é" and decoded["pair"] == "\U0001f600"
    assert isinstance(decoded["when"], str)
