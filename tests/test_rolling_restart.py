"""A rolling restart by plain SIGTERM (issue #14): /readyz says 503 for --drain-delay while
new requests are still served, then the listener closes (a refused connection, which load
balancers retry), uploads in flight finish; and /readyz answers at once from a background
store check, whatever the store does."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from s3proxy.errors import SHUTTING_DOWN, UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE, ProxyError
from s3proxy.log import REQUEST_ID
from s3proxy.state import (
    AUTO_DRAIN_DELAY,
    StoreCheck,
    check_paused,
    drain_delay,
    store_verdict,
)
from tests import bodies
from tests.bodies import MiB
from tests.faults import Fault, FaultyS3
from tests.polling import eventually
from tests.s3util import (
    MotoServer,
    all_keys,
    exit_code,
    open_uploads_async,
    start_proxy,
)
from tests.test_lifecycle import open_upload

# --- decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "asked", "delay"),
    [
        (None, True, AUTO_DRAIN_DELAY),  # auto, something routes by /readyz: let it see 503
        (None, False, 0.0),  # auto, nobody checks: waiting tells no one
        (2.0, False, 2.0),  # explicit: always (a Kubernetes endpoint removal, no probe)
        (2.0, True, 2.0),
        (0.0, True, 0.0),  # explicit 0: today's behaviour, listener closed at once
    ],
)
def test_drain_delay(setting: float | None, asked: bool, delay: float) -> None:
    assert drain_delay(setting, asked) == delay


DOWN = ProxyError(UPSTREAM_UNAVAILABLE, "refused")


@pytest.mark.parametrize(
    ("last", "checked_at", "now", "code"),
    [
        (None, None, 10.0, "UPSTREAM_UNAVAILABLE"),  # never checked: not ready
        (None, 9.0, 10.0, None),  # fresh and fine
        (DOWN, 9.0, 10.0, "UPSTREAM_UNAVAILABLE"),  # fresh and down
        (None, 6.0, 10.0, None),  # at the limit (4 s: 3 intervals of 1 s + 1 s timeout)
        (None, 5.9, 10.0, "UPSTREAM_UNAVAILABLE"),  # stale: the checker is stuck
    ],
)
def test_store_verdict(
    last: ProxyError | None, checked_at: float | None, now: float, code: str | None
) -> None:
    got = store_verdict(last, checked_at, now, StoreCheck(1.0, 1.0).stale_after)
    assert (got.kind.code if got is not None else None) == code


async def test_a_hanging_or_failing_check_is_an_answer_not_an_exception() -> None:
    check = StoreCheck(interval=1.0, timeout=0.1)

    async def hangs() -> None:
        await asyncio.sleep(10)

    async def refuses() -> None:
        raise ProxyError(UPSTREAM_UNAVAILABLE, "refused")

    async def not_open() -> None:
        raise RuntimeError("the S3 client is not open yet")

    async def fine() -> None:
        return None

    began = time.monotonic()
    hung = await check.once(hangs)
    assert hung is not None and hung.kind is UPSTREAM_TIMEOUT
    assert time.monotonic() - began < 0.5
    refused = await check.once(refuses)
    assert refused is not None and refused.kind is UPSTREAM_UNAVAILABLE
    closed = await check.once(not_open)
    assert closed is not None and closed.kind is UPSTREAM_UNAVAILABLE
    assert await check.once(fine) is None


async def test_the_checks_log_as_no_request() -> None:
    """Started by a /readyz, the background task ran in that request's context, so every
    readiness line it logged for as long as it ran carried that request's id."""
    check = StoreCheck(interval=0.05, timeout=0.2)
    seen: list[str] = []

    async def fails() -> None:
        seen.append(REQUEST_ID.get())

    token = REQUEST_ID.set("a-readyz")
    try:
        check.start(fails)
    finally:
        REQUEST_ID.reset(token)
    await eventually(lambda: len(seen) >= 2, within=5, what="two checks")
    await check.stop()
    assert set(seen) == {"-"}


async def test_stop_ends_when_the_check_finishes_as_it_is_cancelled() -> None:
    """Before: the check ran under Python 3.11's wait_for, which returns the result of a
    check that finished just as it was cancelled, so the cancellation was lost, the loop
    went on and stop() waited for ever: a SIGTERMed instance stayed up with its listener
    closed, past --shutdown-timeout (seen in tests/test_scale_out)."""
    check = StoreCheck(interval=0.05, timeout=1.0)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def answers_when_released() -> None:
        entered.set()
        await release.wait()

    check.start(answers_when_released)
    await entered.wait()
    release.set()  # the check finishes on the loop's next turn...
    began = time.monotonic()
    async with asyncio.timeout(5):
        await check.stop()  # ...and is cancelled before it (stop cancels before it yields)
    assert time.monotonic() - began < 1.5


async def test_stop_ends_even_when_the_check_loses_its_cancellation() -> None:
    """Before: stop() cancelled the check loop and waited for it, so a cancellation lost
    in the check (a library that returns instead of raising it) kept the loop going and
    a SIGTERMed instance up forever, its listener closed (seen in tests/test_scale_out)."""
    check = StoreCheck(interval=0.05, timeout=0.2)
    entered = asyncio.Event()

    async def loses_it() -> None:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return  # what a lost cancellation looks like from outside

    check.start(loses_it)
    await entered.wait()
    began = time.monotonic()
    await asyncio.wait_for(check.stop(), 5)
    assert time.monotonic() - began < 1.5


@pytest.mark.parametrize(
    ("now", "last_asked", "paused"),
    [(10.0, 0.0, False), (30.0, 0.0, False), (30.1, 0.0, True), (100.0, 75.0, False)],
)
def test_checks_pause_when_nobody_asks(now: float, last_asked: float, paused: bool) -> None:
    assert check_paused(now, last_asked, 30.0) is paused


async def test_store_checks_pause_without_readyz_and_a_readyz_gets_a_fresh_check() -> None:
    """Nobody asking: the HeadBuckets stop (they cost CPU on every idle instance); the
    next verdict after the pause starts them again and answers from a new check."""
    check = StoreCheck(interval=0.02, timeout=0.1, idle_after=0.2)
    calls: list[float] = []
    healthy = True

    async def counted() -> None:
        calls.append(time.monotonic())
        if not healthy:
            raise ProxyError(UPSTREAM_UNAVAILABLE, "refused")

    check.start(counted)
    assert await check.verdict() is None
    await eventually(lambda: not check.running, within=5, what="the checks pause")
    stopped_at = len(calls)
    await asyncio.sleep(0.3)
    assert len(calls) == stopped_at, "checks went on with nobody asking"
    assert stopped_at < 40  # about idle_after / interval, not unbounded
    healthy = False  # the store went away during the pause: the cached "ready" is stale
    check.start(counted)
    err = await check.verdict()
    assert err is not None and err.kind is UPSTREAM_UNAVAILABLE
    assert len(calls) == stopped_at + 1
    # Asked again and again (a load balancer): the checks keep running.
    for _ in range(20):
        await asyncio.sleep(0.03)
        await check.verdict()
    assert check.running
    await check.stop()


# --- /readyz answers at once -------------------------------------------------------------


async def timed_readyz(proxy: Any) -> tuple[float, float, int, dict[str, Any]]:
    """(when asked, seconds it took, status, body)."""
    began = time.monotonic()
    resp = await proxy.get("/readyz")
    body = await resp.json()
    return began, time.monotonic() - began, resp.status, body


@pytest.mark.parametrize("outage", ["hangs", "stopped"])
async def test_readyz_answers_at_once_while_the_store_is_away(
    proxy_factory: Any, moto: MotoServer, outage: str
) -> None:
    """Before: each /readyz made its own HeadBucket, so a hanging store made it wait out
    the S3 timeouts and a load balancer marked the instance down by its own timeout."""
    faults: dict[str, Fault] = {}
    interval = 0.3
    async with FaultyS3(moto.endpoint_url, lambda op, n: faults.get(op)) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            readiness_interval=interval,
            readiness_timeout=interval,
        )
        # Ready first. The first /readyz waits for a check, at most the 0.3 s timeout: a cold
        # first HeadBucket on a busy CI machine took longer once (503), so poll for it.
        await eventually(
            lambda: timed_readyz(proxy),
            within=10,
            what="the proxy to be ready",
            until=lambda answer: answer[2] == 200,
        )
        if outage == "hangs":
            faults["HeadBucket"] = Fault(delay=1.0)  # accepts, answers only after 1 s
        else:
            for site in list(faulty._runner.sites):
                await site.stop()  # the store is gone: connections refused
        went = time.monotonic()
        answers = []
        while time.monotonic() - went < 4 * interval + 0.5:
            answers.append(await timed_readyz(proxy))
            await asyncio.sleep(0.02)
        # At once, every one but what a stall of this process itself holds (CI, 3 workers
        # on 2 cores: one answer of the run took 0.89 s): a /readyz that waits for S3
        # makes them all slow (0.3 s at least, the check's timeout, or the hang's 1 s).
        took = sorted(took for _, took, _, _ in answers)
        assert len([t for t in took if t < 0.1]) >= 0.9 * len(took), took
        down = [(at, status, body) for at, _, status, body in answers if status == 503]
        assert down, answers
        to_503 = down[0][0] - went
        # 503 within a few intervals of the outage (the next check, plus its own timeout:
        # 0.6 s; 1.19 s once on a busy CI machine, 3 test workers on 2 cores), and from
        # then on (no flapping), naming no S3 detail
        assert to_503 < 5 * interval + 0.5, to_503
        assert all(status == 503 for at, _, status, _ in answers if at >= down[0][0])
        code = down[-1][2]["error"]["code"]
        # refused connections are retried with backoff (--s3-max-attempts), so the check
        # may be cut by its timeout before it fails on its own
        assert code == "UPSTREAM_TIMEOUT" if outage == "hangs" else code.startswith("UPSTREAM_")
        print(
            f"store {outage}: /readyz median and slowest of {len(answers)} answers "
            f"{took[len(took) // 2] * 1000:.1f} and {took[-1] * 1000:.1f} ms; "
            f"503 {to_503:.2f} s after (interval {interval} s)"
        )
        faults.clear()


# --- SIGTERM to a real process --------------------------------------------------------------


async def test_sigterm_serves_through_the_drain_delay_then_refuses_connections(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """Before: new uploads got 503 SHUTTING_DOWN at once, which no load balancer replays
    once it began to send the body."""
    delay = 2.0
    proxy = start_proxy(moto, bucket, tmp_path, "--drain-delay", "2", "--shutdown-timeout", "20")
    in_flight = os.urandom(12 * MiB)
    raw = bodies.body([bodies.file("f", "a.bin", in_flight)])
    reader, writer = await open_upload(proxy.port, raw, 6 * MiB)
    await eventually(
        lambda: open_uploads_async(s3, bucket), within=20, what="the upload in flight at S3"
    )
    proxy.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    await asyncio.sleep(0.2)
    new = os.urandom(MiB)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == SHUTTING_DOWN.code
        form = aiohttp.FormData()
        form.add_field("file", new, filename="new.bin", content_type="application/octet-stream")
        async with session.post(proxy.url + "/upload", data=form) as resp:
            assert resp.status == 201, await resp.text()
            assert resp.headers["Connection"] == "close"  # do not reuse this connection
            [stored] = (await resp.json())["files"]
        served_until = time.monotonic() - signalled
    assert served_until < delay
    # after the delay: nothing listens, a new connection is refused (a safe retry)
    await asyncio.sleep(max(0.0, signalled + delay + 0.3 - time.monotonic()))
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", proxy.port)
    refused_at = time.monotonic() - signalled
    writer.write(raw[6 * MiB :])  # the upload in flight at SIGTERM finishes
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    assert head.startswith(b"HTTP/1.1 201"), head
    finished = time.monotonic() - signalled
    assert await exit_code(proxy) == 0
    took = time.monotonic() - signalled
    writer.close()
    assert took < delay + 3, took
    keys = all_keys(s3, bucket)
    assert len(keys) == 2 and stored["key"] in keys
    assert s3.get_object(Bucket=bucket, Key=stored["key"])["Body"].read() == new
    [old] = [k for k in keys if k != stored["key"]]
    assert s3.get_object(Bucket=bucket, Key=old)["Body"].read() == in_flight
    log = proxy.log_path.read_text()
    assert "proxy.stopping signal received drain_delay=2s" in log
    assert "proxy.listener_closed" in log and "Traceback" not in log
    print(
        f"--drain-delay 2: new upload 201 at {served_until:.2f} s, refused at "
        f"{refused_at:.2f} s, in-flight 201 at {finished:.2f} s, exit 0 at {took:.2f} s"
    )


async def test_auto_delay_once_readyz_was_asked_and_a_second_signal_ends_it(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    proxy = start_proxy(moto, bucket, tmp_path)  # --drain-delay auto
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/readyz") as resp:
            assert resp.status == 200  # a load balancer checks this instance
        proxy.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.3)
        async with session.get(proxy.url + "/readyz") as resp:  # still listening
            assert resp.status == 503
    proxy.proc.send_signal(signal.SIGTERM)  # the operator will not wait
    assert await exit_code(proxy) == 0
    took = time.monotonic() - signalled
    assert took < AUTO_DRAIN_DELAY - 2, took
    assert f"drain_delay={AUTO_DRAIN_DELAY:g}s" in proxy.log_path.read_text()
    print(f"auto delay {AUTO_DRAIN_DELAY:g} s cut by a second SIGTERM: exit at {took:.2f} s")
