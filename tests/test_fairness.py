"""Issue #11: slow clients cannot hold memory others need; every client byte is bounded.

Against moto through the real app: tricklers are evicted (JSON 408, nothing stored)
while a normal upload goes through; stalled form fields hold only their allowance
from the budget; /sign bodies are read with the idle timeout and a size limit. And
the pure bounds the orphan sweep uses, as tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import FormData

from s3proxy import limits
from s3proxy.budget import MIN_HELD, PATIENCE
from s3proxy.limits import RateMeter
from s3proxy.log import RequestIdFilter
from s3proxy.pipeline import PROBE_BYTES
from s3proxy.settings import Settings, SettingsError
from s3proxy.state import STATE
from tests import bodies
from tests.polling import eventually
from tests.s3util import read_object_async

MiB = 1024**2
KiB = 1024


# --- the pure bounds ----------------------------------------------------------------


@dataclass(frozen=True)
class S:
    part_size: int = 8 * MiB
    max_file_size: int = 5 * 1024**3
    max_request_size: int = 10 * 1024**3
    min_upload_rate: int = 32 * KiB
    min_rate_window: float = 30.0
    client_timeout: float = 60.0
    s3_read_timeout: float = 120.0
    s3_connect_timeout: float = 10.0
    s3_max_attempts: int = 5


S3_CALL = 5 * (10 + 120)  # 650 s: every attempt connects and waits its full timeout


@pytest.mark.parametrize(
    ("s", "part_interval", "upload"),
    [
        # defaults: 8 MiB parts at 32 KiB/s = 256 s + 30 s grace + 60 s idle + one S3 call
        (S(), 256 + 30 + 60 + S3_CALL, 10 * 1024**3 / (32 * KiB) + 30 + 60 + 2 * S3_CALL),
        # a faster floor shortens both
        (
            S(min_upload_rate=1 * MiB),
            8 + 30 + 60 + S3_CALL,
            10 * 1024 + 30 + 60 + 2 * S3_CALL,
        ),
        # unknown-length files up to 5 GiB keep 8 MiB parts (5 GiB / 1,000 parts < 8 MiB)...
        (S(part_size=5 * MiB), 160 + 30 + 60 + S3_CALL, 327680 + 30 + 60 + 2 * S3_CALL),
        # ...but unknown lengths up to 100 GiB double parts up to 64 MiB: the largest counts
        (
            S(max_file_size=100 * 1024**3, max_request_size=100 * 1024**3),
            2048 + 30 + 60 + S3_CALL,
            100 * 1024**3 / (32 * KiB) + 30 + 60 + 2 * S3_CALL,
        ),
    ],
)
def test_longest_intervals(s: S, part_interval: float, upload: float) -> None:
    assert limits.longest_part_interval(s) == pytest.approx(part_interval)
    assert limits.longest_upload(s) == pytest.approx(upload)


def test_settings_satisfy_the_bounds_protocol() -> None:
    s = Settings(endpoint_url="http://127.0.0.1:1", bucket="b")
    assert limits.longest_part_interval(s) == limits.longest_part_interval(S())


@pytest.mark.parametrize(
    ("samples", "now", "rate"),
    [
        ([], 0.5, None),  # under one window since the start: too early to judge
        ([(1.0, 100)], 1.0, 100.0),  # exactly one window
        ([(0.5, 50), (1.0, 100), (1.5, 100), (2.0, 100)], 2.0, 0.0),  # stalled for a window
        ([(0.5, 0), (1.0, 0), (1.5, 0), (2.0, 300)], 2.0, 300.0),  # a burst at the end counts
        ([(0.2, 10), (3.0, 40)], 3.0, pytest.approx(30 / 2.8)),  # a long gap: over the gap
    ],
)
def test_rate_meter(samples: list[tuple[float, int]], now: float, rate: float | None) -> None:
    meter = RateMeter(window=1.0)
    for t, total in samples:
        meter.add(t, total)
    assert meter.rate(now) == rate


def test_rate_meter_keeps_a_few_samples_and_refuses_a_backward_clock() -> None:
    meter = RateMeter(window=1.0)
    for i in range(1, 1001):
        meter.add(i * 0.05, i)
    assert len(meter._samples) <= 22
    assert meter.too_slow(50.0, 21.0) and not meter.too_slow(50.0, 19.0)
    with pytest.raises(ValueError):
        meter.add(1.0, 2000)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_upload_rate": 0}, "--min-upload-rate"),
        ({"min_download_rate": 0}, "--min-download-rate"),
        ({"min_rate_window": 0.0}, "--min-rate-window"),
        ({"max_fields_size": 0}, "--max-fields-size"),
        ({"max_sign_body": 100}, "--max-sign-body"),
        # a request's fields plus the largest part must fit, or the two could deadlock
        ({"memory_budget": 8 * MiB}, "no room for form fields"),
    ],
)
def test_settings_refuse(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(endpoint_url="http://127.0.0.1:1", bucket="b", **overrides)


# --- through the proxy ----------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader, within: float) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, await asyncio.wait_for(reader.readexactly(length), within)


async def trickler(port: int, name: str, every: float = 0.1, burst: int = 0) -> tuple[int, bytes]:
    """A client declaring a 100 MiB file and sending it at 10 bytes a second (after a
    ``burst`` of file bytes at full speed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    part = bodies.part_head(bodies.file("file", f"{name}.bin", b""))
    rid = f"X-Request-ID: rid-{name}".encode()  # its log lines carry its name
    writer.write(bodies.request_head(100 * MiB, rid) + part + b"x" * burst)
    await writer.drain()

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(every)
                writer.write(b"x")
                await writer.drain()

    dripping = asyncio.create_task(drip())
    try:
        return await read_response(reader, 60)
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def timed_upload(proxy: Any, data: bytes, name: str) -> float:
    form = FormData()
    form.add_field("file", io.BytesIO(data), filename=name, content_type="application/octet-stream")
    start = time.monotonic()
    resp = await proxy.post("/upload", data=form)
    assert resp.status == 201, await resp.text()
    await resp.read()
    return time.monotonic() - start


async def test_tricklers_never_reach_the_budget_and_a_normal_upload_goes_through(
    proxy_factory: Any, s3: Any, bucket: str, keys_in: Any
) -> None:
    """The acceptance scenario: 16 MiB budget, 8 clients at 10 B/s, one 20 MiB upload.

    A part's memory is asked for only once its first PROBE_BYTES have arrived: the
    tricklers never hold nor queue for the budget, so the upload runs as on an idle
    proxy (the issue's bound: within 2x), and the tricklers meet the minimum rate (a
    3 s window here, to keep the test short) with a JSON 408 and nothing stored.
    """
    proxy = await proxy_factory(memory_budget=16 * MiB, part_size=8 * MiB, min_rate_window=3)
    budget = proxy.server.app[STATE].budget
    data = os.urandom(20 * MiB)
    idle = await timed_upload(proxy, data, "idle.bin")

    tricklers = [asyncio.create_task(trickler(proxy.port, f"slow{i}")) for i in range(8)]
    await asyncio.sleep(0.3)  # every trickler is sending its file, byte by byte
    assert budget.in_use == 0 and budget.waiting == 0
    # Two uploads while the tricklers send (well inside their 3 s window), the faster
    # judged: one CPU stall of a shared CI machine is not the proxy queueing an upload
    # behind tricklers, which would slow both (a fresh-clone run under load: 0.88 s
    # against a bound of 0.876).
    loaded = min([await timed_upload(proxy, data, f"loaded{i}.bin") for i in range(2)])
    answers = await asyncio.wait_for(asyncio.gather(*tricklers), 30)

    print(f"20 MiB upload: idle {idle:.2f} s, with 8 tricklers {loaded:.2f} s")
    assert loaded <= 2 * idle + 0.25  # the bound, with room for timer jitter
    for status, payload in answers:
        error = json.loads(payload)["error"]
        assert status == 408 and error["code"] == "CLIENT_TIMEOUT", payload
    stored = keys_in(bucket)
    assert len(stored) == 3 and not any("slow" in k for k in stored)
    assert budget.in_use == 0


async def test_clients_that_slow_down_mid_part_are_evicted(
    proxy_factory: Any, s3: Any, bucket: str, keys_in: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that passed the probe at full speed and then trickle hold both parts of
    a 16 MiB budget; a normal upload waiting behind them gets them evicted (408) after
    PATIENCE + MIN_HELD, and nothing of theirs is stored. Each eviction is logged as
    the evicted request (they were all logged as the first waiter's, probe reprobe8 F5)."""
    caplog.set_level(logging.INFO, logger="s3proxy")
    caplog.handler.addFilter(RequestIdFilter())
    proxy = await proxy_factory(memory_budget=16 * MiB, part_size=8 * MiB)
    budget = proxy.server.app[STATE].budget
    data = os.urandom(20 * MiB)
    idle = await timed_upload(proxy, data, "idle.bin")
    burst = 2 * PROBE_BYTES
    slow = [asyncio.create_task(trickler(proxy.port, f"slow{i}", burst=burst)) for i in range(2)]
    await eventually(lambda: budget.in_use == 16 * MiB, within=5, what="both parts held")
    loaded = await timed_upload(proxy, data, "loaded.bin")
    answers = await asyncio.wait_for(asyncio.gather(*slow), 30)
    print(f"20 MiB upload: idle {idle:.2f} s, behind 2 slowed holders {loaded:.2f} s")
    assert loaded <= 2 * idle + PATIENCE + MIN_HELD + 1.0
    for status, payload in answers:
        error = json.loads(payload)["error"]
        assert status == 408 and "while other uploads waited for memory" in error["message"]
    assert budget.evictions == 2
    evicted = [r for r in caplog.records if r.getMessage().startswith("upload.evicted ")]
    owners = [
        (re.findall(r"slow\d", r.getMessage())[0], getattr(r, "request_id", "")) for r in evicted
    ]
    assert sorted(owners) == [("slow0", "rid-slow0"), ("slow1", "rid-slow1")], owners
    stored = keys_in(bucket)
    assert len(stored) == 2 and not any("slow" in k for k in stored)
    assert budget.in_use == 0


@pytest.mark.parametrize(
    ("every", "burst"),
    [(0.1, PROBE_BYTES + 8 * KiB), (None, PROBE_BYTES + 8 * KiB), (0.1, 300 * KiB)],
    ids=["trickle", "silent", "trickle-after-300KiB"],
)
async def test_tricklers_queued_ahead_do_not_delay_a_later_upload(
    proxy_factory: Any, s3: Any, bucket: str, keys_in: Any, every: float | None, burst: int
) -> None:
    """The hostile probe's finding 2 at test scale: 20 clients pass the probe, then send
    10 B/s (or nothing); 16 MiB budget, 5 MiB parts, so 3 parts fit. Their burst is
    PROBE_BYTES + 8 KiB, or 300 KiB (a socket read takes 256 KiB, the kernel holds the
    rest with its receive window still open). A 12 MiB upload started behind them used
    to wait for them all, 3 at a time, each holding a part for MIN_HELD (9.7 s). Now it
    passes the waiting tricklers (its client is held back: window closed, ready), they
    time out without holding a part, and it waits only for the 3 holders' eviction
    (PATIENCE). Two rounds of fresh tricklers, the faster judged (a loaded CI machine).
    """
    proxy = await proxy_factory(memory_budget=16 * MiB, part_size=5 * MiB)
    budget = proxy.server.app[STATE].budget
    data = os.urandom(12 * MiB)
    idle = await timed_upload(proxy, data, "idle.bin")
    drip = 1000.0 if every is None else every  # silent: no byte within the test
    loaded: list[float] = []
    answers: list[tuple[int, bytes]] = []
    for round_ in range(2):
        slow = [
            asyncio.create_task(trickler(proxy.port, f"slow{round_}-{i}", drip, burst))
            for i in range(20)
        ]
        await eventually(lambda: budget.waiting >= 17, within=5, what="tricklers queued")
        await asyncio.sleep(MIN_HELD + 0.5)  # the holders may be judged (held MIN_HELD)
        loaded.append(await timed_upload(proxy, data, f"loaded{round_}.bin"))
        answers += await asyncio.wait_for(asyncio.gather(*slow), 30)
    print(f"12 MiB upload: idle {idle:.2f} s, behind 20 tricklers {loaded}")
    assert min(loaded) <= 2 * idle + PATIENCE + 1.0
    for status, payload in answers:
        error = json.loads(payload)["error"]
        assert status == 408 and error["code"] == "CLIENT_TIMEOUT", payload
    assert budget.expired >= 2 * 17 - 6  # most timed out waiting, never holding a part
    stored = keys_in(bucket)
    assert len(stored) == 3 and not any("slow" in k for k in stored)
    assert budget.in_use == 0 and budget.waiting == 0


def coded(mode: str, sent: bytes, more: bytes = b"") -> tuple[bytes, bytes]:
    """``sent`` then ``more`` as a client in ``mode`` sends them: the request's head with
    ``sent`` coded and framed, and the rest (``more``; the body's end when ``more`` is
    given: gzip's trailer, the last chunk). Without ``more`` the body still owes bytes:
    a Content-Length 1 MiB over, or a chunk's size 1 MiB over (``mid``), or the next
    chunk's size line."""
    extra = (b"Content-Encoding: gzip",) if "gzip" in mode else ()
    if "gzip" in mode:
        coder = zlib.compressobj(wbits=31)
        sent = coder.compress(sent) + coder.flush(zlib.Z_SYNC_FLUSH)  # all decodable
        more = coder.compress(more) + coder.flush() if more else b""
    if "chunked" not in mode:
        length = len(sent) + (len(more) if more else MiB)
        return bodies.request_head(length, *extra) + sent, more
    head = bodies.chunked_request_head(*extra)
    if "mid" in mode:
        return head + b"%x\r\n" % (len(sent) + MiB) + sent, b""
    last = bodies.chunk_frame(more) + b"0\r\n\r\n" if more else b""
    return head + bodies.chunk_frame(sent), last


async def silent(port: int, name: str, mode: str, burst: int) -> tuple[int, bytes]:
    """A client that sends ``burst`` bytes of a file (past the probe) and then nothing,
    its body still owing bytes, in ``mode`` (``coded``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    part = bodies.part_head(bodies.file("file", f"{name}.bin", b""))
    writer.write(coded(mode, part + os.urandom(burst))[0])
    await writer.drain()
    try:
        return await read_response(reader, 60)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("mode", ["chunked", "chunked-gzip-mid", "gzip"])
async def test_silent_chunked_or_coded_clients_queued_ahead_time_out(
    proxy_factory: Any, s3: Any, bucket: str, keys_in: Any, mode: str
) -> None:
    """Probe reprobe8 F1: clients that pass the probe and go silent, their body chunked
    or gzip-coded (its end not in a plain Content-Length), were taken for bodies that
    may have ended ("maybe done": ready), got the memory oldest first and were evicted
    three at a time every MIN_HELD, so the upload behind 20 of them waited 6 such rounds
    (~13 s against 0.3 s idle; 12 of them ahead of a 20 MiB upload: 9.1 s). Now their
    end is known, not guessed: bytes are owed, so they time out while they wait (408,
    nothing stored), exactly as Content-Length ones, and the upload waits only for the
    three holders' eviction. As the Content-Length case (two rounds, the faster judged).
    """
    proxy = await proxy_factory(memory_budget=16 * MiB, part_size=5 * MiB)
    budget = proxy.server.app[STATE].budget
    data = os.urandom(12 * MiB)
    idle = await timed_upload(proxy, data, "idle.bin")
    loaded: list[float] = []
    answers: list[tuple[int, bytes]] = []
    for round_ in range(2):
        burst = PROBE_BYTES + 8 * KiB
        slow = [
            asyncio.create_task(silent(proxy.port, f"slow{round_}-{i}", mode, burst))
            for i in range(20)
        ]
        await eventually(lambda: budget.waiting >= 17, within=5, what="silent clients queued")
        await asyncio.sleep(MIN_HELD + 0.5)  # the holders may be judged (held MIN_HELD)
        loaded.append(await timed_upload(proxy, data, f"loaded{round_}.bin"))
        answers += await asyncio.wait_for(asyncio.gather(*slow), 30)
    print(f"12 MiB upload: idle {idle:.2f} s, behind 20 silent {mode} clients {loaded}")
    assert min(loaded) <= 2 * idle + PATIENCE + 1.0
    for status, payload in answers:
        error = json.loads(payload)["error"]
        assert status == 408 and error["code"] == "CLIENT_TIMEOUT", payload
    assert budget.expired >= 2 * 17 - 6  # most timed out waiting, never holding a part
    stored = keys_in(bucket)
    assert len(stored) == 3 and not any("slow" in k for k in stored)
    assert budget.in_use == 0 and budget.waiting == 0


@pytest.mark.parametrize("mode", ["chunked", "chunked-gzip", "gzip"])
async def test_a_whole_chunked_or_coded_body_waits_as_ready(
    proxy_factory: Any, s3: Any, bucket: str, keys_in: Any, mode: str
) -> None:
    """The other side of F1: a client that sent its whole body (chunked or coded) and
    waits for memory is silent too, and its body's end is in the kernel, unread (it
    came after the upload began to wait). It is seen there: ready, not timed out, and
    stored whole once memory frees."""
    proxy = await proxy_factory(memory_budget=16 * MiB, part_size=5 * MiB)
    budget = proxy.server.app[STATE].budget
    held = await budget.acquire(budget.limit)  # all of it, by no upload: never evicted
    # the rest after the probe's bytes is what a new connection's kernel holds with its
    # receive window open (not held back, which would make it ready anyway)
    files = [os.urandom(PROBE_BYTES + 40 * KiB) for _ in range(3)]
    close = f"\r\n--{bodies.BOUNDARY}--\r\n".encode()
    conns = []
    for i, data in enumerate(files):
        part = bodies.part_head(bodies.file("file", f"whole{i}.bin", b""))
        cut = PROBE_BYTES + KiB
        first, rest = coded(mode, part + data[:cut], data[cut:] + close)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(first)
        await writer.drain()
        conns.append((reader, writer, rest))
    await eventually(lambda: budget.waiting == 3, within=5, what="uploads waiting")
    for _, writer, rest in conns:
        writer.write(rest)  # the body's end, left in the kernel by an upload that waits
        await writer.drain()
    await asyncio.sleep(MIN_HELD + 0.5)  # silent for a window: judged
    # what the budget judges them by (each waiter's owner is its upload)
    states = [w[5].wait_state(time.monotonic()) for w in budget._waiters if w[5] is not None]
    assert [s is not None and s.ended for s in states] == [True] * 3
    assert budget.expired == 0 and budget.waiting == 3
    held.release()
    for reader, writer, _ in conns:
        status, payload = await read_response(reader, 30)
        writer.close()
        assert status == 201, payload
    stored = keys_in(bucket)
    assert len(stored) == 3
    for key in stored:
        assert await read_object_async(s3, bucket, key) in files
    assert budget.in_use == 0


async def test_a_fast_holder_is_never_evicted(
    proxy_factory: Any, s3: Any, bucket: str, keys_in: Any
) -> None:
    """Three uploads at loopback speed share a budget of one part: all are stored."""
    proxy = await proxy_factory(memory_budget=6 * MiB, part_size=5 * MiB, max_fields_size=KiB)
    data = os.urandom(12 * MiB)
    await asyncio.gather(*(timed_upload(proxy, data, f"f{i}.bin") for i in range(3)))
    assert proxy.server.app[STATE].budget.evictions == 0
    assert len(keys_in(bucket)) == 3


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS")


async def test_stalled_form_fields_hold_only_their_allowance(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """30 requests send 64 KiB fields and stall: the field bytes are in the budget (a
    256 KiB allowance each), the rest of what they hold is per-connection buffers."""
    proxy = await proxy_factory(memory_budget=16 * MiB, part_size=5 * MiB, client_timeout=30)
    budget = proxy.server.app[STATE].budget
    value = b"v" * (64 * KiB)
    fields = b"".join(
        bodies.part_head(bodies.field(f"f{i}", "")) + value + b"\r\n" for i in range(3)
    )
    # a fourth field begins: the three before it are complete (aiohttp sees a part's
    # end only with the next boundary), then the client stalls
    fields += bodies.part_head(bodies.field("f3", "")) + b"v" * 100
    before = vm_rss()
    conns = []
    for _ in range(30):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(bodies.request_head(100 * MiB) + fields)
        await writer.drain()
        conns.append((reader, writer))
    await asyncio.sleep(1.0)
    grown = vm_rss() - before
    in_use = budget.in_use
    print(f"30 stalled requests: budget in use {in_use / MiB:.1f} MiB, RSS +{grown / MiB:.1f} MiB")
    assert in_use == 30 * 256 * KiB == budget.side_in_use
    # budget + per connection: the read buffer and the field in hand (README, Memory)
    assert grown <= in_use + 30 * 2 * 256 * KiB + 8 * MiB

    # 100 x 64 KiB fields: cut off at the per-request total, nothing left held
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    many = b"".join(
        bodies.part_head(bodies.field(f"g{i}", "")) + value + b"\r\n" for i in range(100)
    )
    writer.write(bodies.request_head(len(many)) + many)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    status, payload = await read_response(reader, 10)
    writer.close()
    assert status == 413 and json.loads(payload)["error"]["code"] == "FIELD_TOO_LARGE"
    assert "per request" in json.loads(payload)["error"]["message"]
    for _, w in conns:
        w.close()
        with contextlib.suppress(ConnectionError):
            await w.wait_closed()
    for _ in range(50):
        if budget.in_use == 0:
            break
        await asyncio.sleep(0.1)
    assert budget.in_use == 0 and budget.side_in_use == 0


async def test_field_bytes_wait_for_room_under_the_side_cap(
    proxy_factory: Any, s3: Any, bucket: str, keys_in: Any
) -> None:
    """With room for one request's fields next to the largest part, a second request
    with fields waits for the first to end, then is stored."""
    proxy = await proxy_factory(
        memory_budget=5 * MiB + 64 * KiB, part_size=5 * MiB, max_fields_size=64 * KiB
    )
    budget = proxy.server.app[STATE].budget
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    first = bodies.part_head(bodies.field("a", "")) + b"1\r\n"
    first += bodies.part_head(bodies.field("b", "")) + b"x" * (40 * KiB)  # past the read window
    writer.write(bodies.request_head(100 * MiB) + first)  # holds its allowance, then stalls
    await writer.drain()
    await asyncio.sleep(0.3)
    assert budget.side_in_use == 64 * KiB  # the whole side cap
    form = FormData()
    form.add_field("note", "hi")
    form.add_field("file", b"data", filename="a.txt")
    second = asyncio.create_task(proxy.post("/upload", data=form))
    await asyncio.sleep(0.3)
    assert not second.done()
    writer.close()  # the first request ends: its allowance goes back
    resp = await asyncio.wait_for(second, 10)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["fields"] == {"note": "hi"}
    assert len(keys_in(bucket)) == 1


async def test_sign_bodies_are_bounded(proxy_factory: Any, s3: Any, bucket: str) -> None:
    proxy = await proxy_factory(client_timeout=0.5, max_sign_body=4 * KiB)
    head = b"POST /sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    # stalled one byte short: 408 within the idle timeout
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    start = time.monotonic()
    writer.write(head + b"Content-Length: 100\r\n\r\n" + b"{" * 99)
    await writer.drain()
    status, payload = await read_response(reader, 5)
    writer.close()
    took = time.monotonic() - start
    assert status == 408 and json.loads(payload)["error"]["code"] == "CLIENT_TIMEOUT"
    assert took < 0.5 + 1.0

    # declared too large: 413 before the body is read
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head + b"Content-Length: 5000\r\n\r\n")
    await writer.drain()
    status, payload = await read_response(reader, 5)
    writer.close()
    assert status == 413 and json.loads(payload)["error"]["code"] == "REQUEST_TOO_LARGE"

    # chunked, no length: 413 as soon as it passes the limit
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
    writer.write(bodies.chunk_frame(b" " * 3000) + bodies.chunk_frame(b" " * 3000))
    await writer.drain()
    status, payload = await read_response(reader, 5)
    writer.close()
    assert status == 413 and json.loads(payload)["error"]["code"] == "REQUEST_TOO_LARGE"

    # and a small one is still served
    resp = await proxy.post("/sign", json={"filename": "a.txt", "size": 3})
    assert resp.status == 200, await resp.text()


async def paced(
    port: int, name: str, rate: int, stop: asyncio.Event, burst: int = 0
) -> tuple[int, bytes] | None:
    """A client declaring a 20 MiB file and sending it at ``rate`` bytes/s (above the
    minimum rate), after a ``burst`` at full speed, until ``stop`` or an answer (which it
    returns); it then hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    part = bodies.part_head(bodies.file("file", f"{name}.bin", b""))
    writer.write(bodies.request_head(20 * MiB) + part + b"x" * burst)
    answer = asyncio.create_task(read_response(reader, 60))
    step = rate // 10
    with contextlib.suppress(ConnectionError):
        while not stop.is_set() and not answer.done():
            writer.write(b"x" * step)
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
    writer.close()
    if answer.done() and answer.exception() is None:
        return answer.result()
    answer.cancel()
    return None


async def test_clients_just_above_the_minimum_rate_hold_no_more_than_the_slow_share(
    proxy_factory: Any, s3: Any, bucket: str, keys_in: Any
) -> None:
    """reprobe21b: clients sending 40 KiB/s (over the 32 KiB/s minimum, never evicted)
    held every part of the budget, and a fast upload was not read until one of their
    parts was full (5 MiB at 40 KiB/s: 128 s; 120 s measured). Now their parts are slow
    (SLOW_FILL) and hold at most the slow share (half: one 5 MiB part of 16 MiB, as one
    is always allowed); the fast upload goes through as on an idle proxy."""
    proxy = await proxy_factory(memory_budget=16 * MiB, part_size=5 * MiB)
    budget = proxy.server.app[STATE].budget
    data = os.urandom(12 * MiB)
    idle = await timed_upload(proxy, data, "idle.bin")
    stop = asyncio.Event()
    slow = [asyncio.create_task(paced(proxy.port, f"slow{i}", 40 * KiB, stop)) for i in range(3)]
    try:
        # their probes (64 KiB at 40 KiB/s) done: one holds a slow part, two wait for room
        await eventually(lambda: budget.waiting == 2, within=10, what="two slow waiters")
        assert budget.slow_in_use == 5 * MiB and budget.in_use == 5 * MiB
        loaded = await asyncio.wait_for(timed_upload(proxy, data, "loaded.bin"), 15)
        print(f"12 MiB upload: idle {idle:.2f} s, beside 3 clients at 40 KiB/s {loaded:.2f} s")
        assert loaded <= 2 * idle + 1.0
        assert budget.slow_in_use == 5 * MiB  # the fast upload's parts were not slow ones
    finally:
        stop.set()
        await asyncio.gather(*slow)
    await eventually(lambda: budget.in_use == 0, within=10, what="the slow uploads gone")
    stored = keys_in(bucket)
    assert len(stored) == 2 and not any("slow" in k for k in stored)


async def test_parts_got_fast_and_filled_slowly_past_the_slow_share_are_evicted(
    proxy_factory: Any, s3: Any, bucket: str, keys_in: Any
) -> None:
    """reprobe22a: clients that burst (their parts granted as fast ones), then sent
    40 KiB/s, held the budget beside the slow share, and a fast upload waited 110 s.
    Here one slow client holds the slow share's part, two burst clients the rest of a
    16 MiB budget; once they fill as slow parts, the slower is evicted (408) to make room,
    and only it: the fast upload goes through in seconds, not 128 s."""
    proxy = await proxy_factory(memory_budget=16 * MiB, part_size=5 * MiB)
    budget = proxy.server.app[STATE].budget
    data = os.urandom(12 * MiB)
    stop = asyncio.Event()
    slow = asyncio.create_task(paced(proxy.port, "slow", 40 * KiB, stop))
    await eventually(lambda: budget.slow_in_use == 5 * MiB, within=10, what="a slow part")
    burst = [
        asyncio.create_task(paced(proxy.port, f"burst{i}", 40 * KiB, stop, burst=100 * KiB))
        for i in range(2)
    ]
    try:
        await eventually(lambda: budget.in_use == 15 * MiB, within=10, what="all parts held")
        took = await asyncio.wait_for(timed_upload(proxy, data, "fast.bin"), 30)
        print(f"12 MiB upload beside 2 burst-then-slow holders: {took:.2f} s")
        assert took <= PATIENCE + MIN_HELD + 5.0
    finally:
        stop.set()
        answers = await asyncio.gather(slow, *burst)
    evicted = [a for a in answers if a is not None]
    assert len(evicted) == 1 and evicted[0][0] == 408, answers
    assert b"as a fast upload" in evicted[0][1]
    assert answers[0] is None  # the slow client from the start kept its part
    await eventually(lambda: budget.in_use == 0, within=10, what="the slow uploads gone")
    assert [k for k in keys_in(bucket) if "fast" in k] and len(keys_in(bucket)) == 1
