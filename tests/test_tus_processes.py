"""tus across real ``s3proxy serve`` processes that share only the bucket (moto): a PATCH
cut off on one instance, or the instance killed with -9 mid-PATCH, resumes on another and
makes a byte-identical object. Marked slow: each test starts two proxy processes."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from s3proxy.cleanup import Rule, sweep
from s3proxy.s3_aiobotocore import ClientOptions, open_store
from tests.polling import eventually
from tests.s3util import (
    MotoServer,
    ProxyProcess,
    exit_code,
    open_uploads_async,
    read_object_async,
    start_proxy,
)
from tests.test_tus import TUS, MiB, body, objects, reserved, stored_key

pytestmark = pytest.mark.slow


def two_proxies(moto: MotoServer, bucket: str, tmp_path: Path, *extra: str) -> list[ProxyProcess]:
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        procs.append(start_proxy(moto, bucket, tmp_path / name, *extra))
    return procs


async def create(session: aiohttp.ClientSession, proxy: ProxyProcess, length: int) -> str:
    async with session.post(
        proxy.url + "/tus/", headers={**TUS, "Upload-Length": str(length)}
    ) as resp:
        assert resp.status == 201, await resp.text()
        return resp.headers["Location"]


async def offset_on(session: aiohttp.ClientSession, proxy: ProxyProcess, url: str) -> int:
    async with session.head(proxy.url + url, headers=TUS) as resp:
        assert resp.status == 200
        return int(resp.headers["Upload-Offset"])


async def cut_patch(proxy: ProxyProcess, url: str, data: bytes, send: int) -> None:
    """A PATCH that says it brings all of ``data`` and stops after ``send`` bytes: the
    connection is cut (a phone losing its network)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    head = (
        f"PATCH {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
        f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    writer.write(head)
    for i in range(0, send, 256 * 1024):
        writer.write(data[i : min(send, i + 256 * 1024)])
        await writer.drain()
    await asyncio.sleep(1.0)  # let the proxy send what it has of the first part
    writer.transport.abort()
    del reader


async def resume(
    session: aiohttp.ClientSession, proxy: ProxyProcess, url: str, data: bytes, offset: int
) -> aiohttp.ClientResponse:
    async with session.patch(
        proxy.url + url,
        data=data[offset:],
        headers={
            **TUS,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
        },
    ) as resp:
        await resp.read()
        return resp


async def sweep_orphans(moto: MotoServer, bucket: str) -> None:
    """What the orphan sweep does to a multipart upload a killed PATCH left unnamed."""
    opts = ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1", max_attempts=1)
    async with open_store(opts, bucket) as store:
        far = datetime.now(UTC) + timedelta(days=1)
        await sweep(store, "", Rule.idle(timedelta(minutes=1)), dry_run=False, now=far)


@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_a_cut_patch_resumes_on_another_instance(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    a, b = two_proxies(moto, bucket, tmp_path)
    try:
        data = body(12 * MiB + 777)
        async with aiohttp.ClientSession() as session:
            url = await create(session, a, len(data))
            await cut_patch(a, url, data, 7 * MiB)

            async def settled() -> int:
                # the cut PATCH kept the whole part it had sent, and gave the lock back
                offset = await offset_on(session, b, url)
                assert offset == 5 * MiB
                return offset

            offset = await eventually(
                settled, within=20, what="the cut PATCH to settle", ignoring=(AssertionError,)
            )
            resp = await resume(session, b, url, data, offset)
            assert resp.status == 204, resp.status
        key = await stored_key(s3, bucket)
        assert await read_object_async(s3, bucket, key) == data
        assert await reserved(s3, bucket) == []
    finally:
        a.stop()
        b.stop()
    await sweep_orphans(moto, bucket)


@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_kill_9_mid_patch_resumes_on_another_instance(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """The instance dies mid-PATCH (its lock stays in the state): another instance answers
    HEAD with the last committed offset at once, refuses PATCHes 423 until the lease has
    passed, then takes the upload over; the object is byte-identical."""
    a, b = two_proxies(
        moto, bucket, tmp_path, "--tus-lock-lease", "2s", "--cleanup-clock-skew", "0s"
    )
    try:
        data = body(11 * MiB + 5)
        async with aiohttp.ClientSession() as session:
            url = await create(session, a, len(data))
            # A first PATCH commits 1 MiB (staged), so the kill loses later bytes only.
            resp = await resume(session, a, url, data[: 1 * MiB], 0)
            assert resp.status == 204
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            writer.write(
                (
                    f"PATCH {url} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                    f"Upload-Offset: {MiB}\r\nContent-Type: application/offset+octet-stream\r\n"
                    f"Content-Length: {len(data) - MiB}\r\n\r\n"
                ).encode()
                + data[MiB : 7 * MiB]
            )
            await writer.drain()
            await asyncio.sleep(0.5)
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(10)
            writer.transport.abort()
            del reader
            killed_at = time.monotonic()
            assert await offset_on(session, b, url) == MiB  # only committed bytes count
            resp = await resume(session, b, url, data, MiB)
            if time.monotonic() - killed_at < 1.5:
                assert resp.status == 423  # the dead PATCH's lock is still within its lease

            async def taken_over() -> int:
                resp = await resume(session, b, url, data, MiB)
                assert resp.status == 204, resp.status
                return resp.status

            await eventually(
                taken_over,
                within=20,
                what="the stale lock to be taken over",
                ignoring=(AssertionError,),
            )
        key = await stored_key(s3, bucket)
        assert await read_object_async(s3, bucket, key) == data
        assert await reserved(s3, bucket) == []
    finally:
        a.stop()
        b.stop()
    # The killed PATCH's multipart upload was never named in the state: the sweep's.
    await sweep_orphans(moto, bucket)
    assert await open_uploads_async(s3, bucket) == []
    assert await objects(s3, bucket) == [key]


@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_a_patch_stopped_by_shutdown_keeps_its_parts(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """SIGTERM while a PATCH is still streaming: after --shutdown-timeout it is stopped
    (503 SHUTTING_DOWN), keeps the whole parts S3 acknowledged, and the upload goes on
    from there on another instance (a rolling restart costs one part, not the PATCH)."""
    a, b = two_proxies(moto, bucket, tmp_path, "--shutdown-timeout", "1", "--drain-delay", "0")
    try:
        data = body(12 * MiB + 3)
        async with aiohttp.ClientSession() as session:
            url = await create(session, a, len(data))
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            writer.write(
                (
                    f"PATCH {url} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                    f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n"
                ).encode()
                + data[: 7 * MiB]
            )
            await writer.drain()
            await asyncio.sleep(1.5)  # part 1 reaches S3; the client then stalls
            a.proc.send_signal(signal.SIGTERM)
            answer = await asyncio.wait_for(reader.read(4096), 20)
            assert b" 503 " in answer.split(b"\r\n", 1)[0] and b"SHUTTING_DOWN" in answer
            writer.transport.abort()
            assert await exit_code(a, 20) == 0
            offset = await offset_on(session, b, url)
            assert offset == 5 * MiB
            resp = await resume(session, b, url, data, offset)
            assert resp.status == 204
        assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data
        assert await reserved(s3, bucket) == []
    finally:
        a.stop()
        b.stop()
