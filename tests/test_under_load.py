"""Proven under load and faults: the S3 server killed mid-upload, many clients of which
half stall, a flood of tiny requests. Each ends with nothing orphaned and the proxy
still serving."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest

from s3proxy.embedded import EmbeddedConfig, EmbeddedStore
from tests import bodies
from tests.bodies import MiB
from tests.polling import eventually
from tests.s3util import (
    BOTO_CONFIG,
    MotoServer,
    ProxyProcess,
    fake_aws_env,
    free_port,
    open_uploads_async,
)
from tests.seaweed_fixture import s3_client_kwargs
from tests.test_resources import proc_status

pytestmark = pytest.mark.e2e


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def read_status(reader: asyncio.StreamReader, within: float = 30.0) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return int(head.split(b" ")[1]), await asyncio.wait_for(reader.readexactly(length), within)


async def test_s3_killed_mid_upload_then_recovers(tmp_path: Path) -> None:
    cfg = EmbeddedConfig(data_dir=tmp_path / "sw", s3_port=free_port())
    store = EmbeddedStore(cfg)
    await store.start()
    env = fake_aws_env()
    env.update(AWS_ACCESS_KEY_ID=store.access_key, AWS_SECRET_ACCESS_KEY=store.secret_key)
    sw = boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(store))
    proxy = ProxyProcess.start(
        [
            "--endpoint-url",
            store.endpoint_url,
            "--bucket",
            store.bucket,
            "--part-size",
            "5MiB",
            "--s3-max-attempts",
            "2",
            "--s3-connect-timeout",
            "1",
            "--s3-read-timeout",
            "5",
        ],
        env,
        tmp_path / "proxy.log",
    )
    try:
        raw = bodies.body([bodies.file("f", "big.bin", os.urandom(20 * MiB))])
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(bodies.request_head(len(raw)) + raw[: 7 * MiB])
        await writer.drain()
        await eventually(
            lambda: open_uploads_async(sw, store.bucket),
            within=20,
            what="the multipart upload open",
        )

        assert store.pid is not None
        os.kill(store.pid, signal.SIGKILL)  # the S3 server dies mid-upload
        await store.stop()
        writer.write(raw[7 * MiB :])
        await writer.drain()
        status, payload = await read_status(reader)
        writer.close()
        assert status in (502, 503, 504), payload
        assert json.loads(payload)["error"]["code"].startswith("UPSTREAM_")
        # /readyz answers from a background check (--readiness-interval, 1 s): 503 once it
        # has looked, within an interval and a check timeout of the store's death.
        await eventually(
            lambda: asyncio.to_thread(get, proxy.url + "/readyz"),
            until=lambda got: got[0] == 503,
            within=5,
            what="/readyz 503 while S3 is down",
        )
        assert get(proxy.url + "/healthz")[0] == 200

        store = EmbeddedStore(cfg)  # S3 comes back, same data and port
        await store.start()

        async def readyz_and_open_uploads() -> tuple[int, list[dict[str, Any]] | None]:
            ready = (await asyncio.to_thread(get, proxy.url + "/readyz"))[0]
            return ready, (await open_uploads_async(sw, store.bucket) if ready == 200 else None)

        await eventually(
            readyz_and_open_uploads,
            until=lambda seen: seen == (200, []),
            within=60,
            every=0.5,
            what="recovery, and the orphan aborted (/readyz status, open uploads)",
        )
        assert "cleanup.retried" in proxy.log_path.read_text()

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                proxy.url + "/upload",
                data=io.BytesIO(bodies.body([bodies.file("f", "after.bin", os.urandom(6 * MiB))])),
                headers=bodies.headers(),
            ) as resp,
        ):
            assert resp.status == 201
    finally:
        proxy.stop()
        await store.stop()


def start_loaded(moto: MotoServer, bucket: str, log: Path, client_timeout: str) -> ProxyProcess:
    """A proxy for many clients at once: 5 MiB parts, a 64 MiB budget, and a minimum rate
    of 1 byte/s: every client here comes from the test's one process, and on a busy
    2-core machine one can fall below the default 32 KiB/s while others wait for memory
    and be evicted (by design: tests/test_fairness.py)."""
    return ProxyProcess.start(
        [
            "--endpoint-url",
            moto.endpoint_url,
            "--bucket",
            bucket,
            "--part-size",
            "5MiB",
            "--memory-budget",
            "64MiB",
            "--client-timeout",
            client_timeout,
            "--min-upload-rate",
            "1",
        ],
        fake_aws_env(),
        log,
    )


@pytest.fixture
def load_proxy(moto: MotoServer, bucket: str, tmp_path: Path) -> Any:
    # the stalled half must end by --client-timeout, and every good one must be stored
    proxy = start_loaded(moto, bucket, tmp_path / "proxy.log", "2")
    yield proxy
    assert proxy.stop() == 0


async def test_hundred_clients_half_stall(load_proxy: ProxyProcess, s3: Any, bucket: str) -> None:
    proxy = load_proxy
    idle = proc_status(proxy.proc.pid, "VmRSS")

    # The bodies are made before any client connects: made inside the clients, 600 MiB of
    # os.urandom ran on the test's event loop while earlier clients were mid-body, and on a
    # busy machine those sat silent past --client-timeout (a 408 the proxy was right to give).
    good_bodies = [
        bodies.body([bodies.file("f", f"{i}.bin", os.urandom((3 if i % 2 else 7) * MiB))])
        for i in range(50)
    ]
    stall_bodies = [
        bodies.body([bodies.file("f", f"s{i}.bin", os.urandom(6 * MiB))]) for i in range(50)
    ]

    async def good(i: int) -> int:
        raw = good_bodies[i]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                proxy.url + "/upload", data=io.BytesIO(raw), headers=bodies.headers()
            ) as resp,
        ):
            return resp.status

    async def stall(i: int) -> int:
        raw = stall_bodies[i]
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(bodies.request_head(len(raw)) + raw[: (i % 3 + 1) * MiB])  # then nothing
        await writer.drain()
        try:
            status, payload = await read_status(reader, within=60)
            assert b"CLIENT_TIMEOUT" in payload
            return status
        finally:
            writer.close()

    t0 = time.monotonic()
    results = await asyncio.gather(*(good(i) for i in range(50)), *(stall(i) for i in range(50)))
    elapsed = time.monotonic() - t0
    assert results[:50] == [201] * 50
    assert results[50:] == [408] * 50
    peak = proc_status(proxy.proc.pid, "VmHWM")
    print(
        f"100 clients (50 stalled): {elapsed:.1f} s, RSS {idle / MiB:.0f} -> {peak / MiB:.0f} MiB"
    )
    assert peak - idle < 64 * MiB + 64 * MiB
    assert await open_uploads_async(s3, bucket) == []
    assert get(proxy.url + "/healthz")[0] == 200
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/metrics") as resp:
        metrics = await resp.text()
    assert "s3proxy_memory_budget_bytes_in_use 0.0" in metrics
    assert 's3proxy_uploads_aborted_total{reason="CLIENT_TIMEOUT"} 50.0' in metrics


async def test_flood_of_tiny_requests(load_proxy: ProxyProcess, s3: Any, bucket: str) -> None:
    proxy = load_proxy
    tiny = bodies.body(
        [bodies.field("n", "1"), bodies.file("f", "t.txt", b"hello\n", "text/plain")]
    )
    sem = asyncio.Semaphore(50)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as session:

        async def one(i: int) -> int:
            async with sem:
                if i % 2:
                    data, headers = b"{}", {"Content-Type": "application/json"}
                else:
                    data, headers = tiny, bodies.headers()
                async with session.post(proxy.url + "/upload", data=data, headers=headers) as resp:
                    await resp.read()
                    return resp.status

        idle = proc_status(proxy.proc.pid, "VmRSS")
        t0 = time.monotonic()
        statuses = await asyncio.gather(*(one(i) for i in range(1000)))
        elapsed = time.monotonic() - t0
    assert statuses.count(201) == 500 and statuses.count(415) == 500
    grown = proc_status(proxy.proc.pid, "VmRSS") - idle
    print(f"1000 tiny requests: {1000 / elapsed:.0f} req/s, RSS grew {grown / MiB:.1f} MiB")
    assert grown < 32 * MiB
    assert get(proxy.url + "/healthz")[0] == 200
    assert await open_uploads_async(s3, bucket) == []


async def test_clients_sending_small_writes_stay_within_the_budget(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """24 clients each sending 6 MiB in writes of 4-10 KiB (a slow link, a client
    that writes as it reads a file): every socket read a few KiB. Each read was a
    block of 256 KiB (asyncio's recv size), or 1 MiB widened, shrunk to what came and
    held as it was until its part was sent: the heap between them was left in pieces,
    and a 64 MiB budget grew the process by 103 MiB over its warm idle, past
    ``idle + budget + 32``. Small reads are now gathered (parts.GATHER_BELOW) and a
    read is widened only as far as the kernel holds bytes: 72-80 MiB."""
    proxy = start_loaded(moto, bucket, tmp_path / "proxy.log", "30")
    try:

        async def send(raw: bytes, step: int, pause: float) -> tuple[int, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(bodies.request_head(len(raw)))
                for at in range(0, len(raw), step):
                    writer.write(raw[at : at + step])
                    await writer.drain()
                    await asyncio.sleep(pause)
                return await read_status(reader, within=120)
            finally:
                writer.close()

        warm = bodies.body([bodies.file("f", "warm.bin", os.urandom(6 * MiB))])
        assert (await send(warm, len(warm), 0))[0] == 201  # clients, buffers: warm
        idle = proc_status(proxy.proc.pid, "VmRSS")
        raws = [bodies.body([bodies.file("f", f"{i}.bin", os.urandom(6 * MiB))]) for i in range(24)]
        results = await asyncio.gather(
            *(send(raw, 4096 + 997 * (i % 7), 0.006) for i, raw in enumerate(raws))
        )
        peak = proc_status(proxy.proc.pid, "VmHWM")
        print(f"24 clients, 4-10 KiB writes: RSS {idle / MiB:.0f} -> {peak / MiB:.0f} MiB")
        assert [status for status, _ in results] == [201] * 24
        assert peak - idle < 64 * MiB + 28 * MiB
        assert await open_uploads_async(s3, bucket) == []
    finally:
        assert proxy.stop() == 0
