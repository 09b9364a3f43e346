"""SIGTERM on a real process: uploads cut at the deadline are told 503 SHUTTING_DOWN
with ``Connection: close`` on the wire, and keep-alive clients do not hold the process."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from s3proxy import app as app_module
from s3proxy import server as server_module
from s3proxy.app import create_app, drain
from s3proxy.protocol import FRESH_GRACE
from s3proxy.server import close_listener
from s3proxy.state import STATE
from tests import bodies
from tests.bodies import MiB
from tests.conftest import make_settings
from tests.faults import Fault, FaultyS3
from tests.polling import eventually
from tests.s3util import (
    MotoServer,
    ProxyProcess,
    all_keys_async,
    exit_code,
    fake_aws_env,
    open_uploads_async,
    read_object_async,
    start_proxy,
)
from tests.test_lifecycle import open_upload
from tests.test_presign import _multipart_done, complete_until_decided
from tests.test_webhook_flow import SECRET as HOOK_SECRET


async def test_uploads_cut_at_the_deadline_get_503_connection_close(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    proxy = start_proxy(moto, bucket, tmp_path, "--shutdown-timeout", "1")
    stalled = []
    for _ in range(3):  # several stalled uploads, each at a different point
        raw = bodies.body([bodies.file("f", "big.bin", os.urandom(12 * MiB))])
        stalled.append(await open_upload(proxy.port, raw, 7 * MiB))
    await eventually(
        lambda: open_uploads_async(s3, bucket),
        until=lambda ups: len(ups) == 3,
        within=20,
        what="3 multipart uploads open",
    )
    signalled = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    for reader, _ in stalled:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"\r\nConnection: close\r\n" in head, head
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        assert b'"SHUTTING_DOWN"' in await asyncio.wait_for(reader.readexactly(length), 5)
    # The clients still hold their sockets, not reading, with body bytes unsent: the
    # process does not wait aiohttp's 5 s more for them.
    assert await exit_code(proxy) == 0
    took = time.monotonic() - signalled
    for _, writer in stalled:
        writer.close()
    assert took < 1 + 3.5, took  # grace + cleanup + EXIT_GRACE, with room for moto
    assert await open_uploads_async(s3, bucket) == []
    assert await all_keys_async(s3, bucket) == []
    print(f"exit {took:.2f}s after SIGTERM with 3 stalled uploads, --shutdown-timeout 1")


async def test_keepalive_client_does_not_hold_the_process(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    proxy = start_proxy(
        moto, bucket, tmp_path, "--shutdown-timeout", "20", "--keepalive-timeout", "60"
    )
    data = os.urandom(12 * MiB)
    raw = bodies.body([bodies.file("f", "a.bin", data)])
    reader, writer = await open_upload(proxy.port, raw, 6 * MiB)
    await eventually(
        lambda: open_uploads_async(s3, bucket), within=20, what="the multipart upload open"
    )
    proxy.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    await asyncio.sleep(0.3)
    writer.write(raw[6 * MiB :])  # the upload finishes during the grace period
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    assert head.startswith(b"HTTP/1.1 201"), head
    assert b"\r\nConnection: close\r\n" in head, head  # draining: do not come back
    # the client keeps its keep-alive connection open; the process exits anyway
    assert await exit_code(proxy) == 0
    took = time.monotonic() - signalled
    writer.close()
    assert took < 5, took  # far below --shutdown-timeout 20
    [key] = await all_keys_async(s3, bucket)
    assert await read_object_async(s3, bucket, key) == data
    print(f"exit {took:.2f}s after SIGTERM with a keep-alive client, --shutdown-timeout 20")


async def test_idle_keepalive_closed_at_drain_and_requests_told_to_close(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    proxy = start_proxy(
        moto, bucket, tmp_path, "--shutdown-timeout", "20", "--keepalive-timeout", "60"
    )
    # an idle kept-alive connection, and one busy with an upload that keeps drain waiting
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", proxy.port)
    idle_w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(idle_r.readuntil(b"\r\n\r\n"), 5)
    await idle_r.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(12 * MiB))])
    up_r, up_w = await open_upload(proxy.port, raw, 6 * MiB)
    await eventually(
        lambda: open_uploads_async(s3, bucket), within=20, what="the multipart upload open"
    )
    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(idle_r.read(), 5) == b""  # closed at once
    # a new connection during drain is refused (no --drain-delay, nothing asked /readyz:
    # the listener closes at once), which a load balancer retries elsewhere
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", proxy.port)
    up_w.write(raw[6 * MiB :])
    await up_w.drain()
    head = await asyncio.wait_for(up_r.readuntil(b"\r\n\r\n"), 20)
    assert head.startswith(b"HTTP/1.1 201"), head
    assert await exit_code(proxy) == 0
    for w in (idle_w, up_w):
        w.close()
    assert len(await all_keys_async(s3, bucket)) == 1


async def test_a_connection_waiting_in_the_backlog_is_answered_not_reset(
    moto: MotoServer, s3: Any, bucket: str
) -> None:
    """Before: closing the listener reset a connection the kernel had completed and the
    proxy had not accepted yet, its request already sent (nginx: 502 "Connection reset
    by peer while reading response header", once in a rolling restart), and the drain
    did not wait for a connection whose request was still unread. Here the client
    connects and sends with the loop held, so its connection waits in the backlog when
    the listener closes, as the proxy's stop sequence closes it; then the drain runs."""
    data = os.urandom(100 * 1024)
    raw = bodies.body([bodies.file("f", "late.bin", data)])
    async with served_app(moto, bucket) as (app, runner, site, port):
        with socket.create_connection(("127.0.0.1", port)) as client:  # the kernel completes it
            client.sendall(bodies.request_head(len(raw)) + raw)
            await close_listener(site)
            await drain(app[STATE])
            await runner.cleanup()  # as the server's stop sequence does after the drain
            received = await asyncio.to_thread(read_until_closed, client)
    await assert_stored_or_refused([received], [data], s3, bucket)


async def test_a_connection_that_comes_while_the_accepted_settle_is_answered_not_reset(
    moto: MotoServer, s3: Any, bucket: str
) -> None:
    """The listener closed a few loop turns after it last looked at its backlog (the turns
    that let an accepted connection settle), and a connection the kernel completed in
    those turns was reset: nginx's 502 "Connection reset by peer while reading response
    header" again in a rolling restart (1 upload of 228 in CI). Here B connects, its
    request sent, in those turns: once A, taken from the backlog, is counted."""
    datas = [os.urandom(100 * 1024), os.urandom(100 * 1024)]
    raws = [
        bodies.body([bodies.file("f", f"{n}.bin", d)]) for n, d in zip("ab", datas, strict=True)
    ]
    late: list[tuple[socket.socket, bool]] = []
    async with served_app(moto, bucket) as (app, runner, site, port):
        conns = app[STATE].connections

        async def connect_b_once_a_is_counted() -> None:
            # a turn at a time, as the listener's close counts them (no event says it)
            while len(conns) == 0:  # noqa: ASYNC110
                await asyncio.sleep(0)
            b = connect_late(port)
            late.append((b, send_if_connected(b, bodies.request_head(len(raws[1])) + raws[1])))

        a = socket.create_connection(("127.0.0.1", port))  # waits in the backlog
        a.sendall(bodies.request_head(len(raws[0])) + raws[0])
        connecting = asyncio.create_task(connect_b_once_a_is_counted())
        await close_listener(site)
        assert connecting.done() and len(late) == 1, "B did not come before the close"
        await answered_or_refused(app, runner, a, late[0], datas, s3, bucket)


def connect_late(port: int) -> socket.socket:
    """A client connecting now without holding the loop: completed within 0.3 s if the
    kernel completes it (on loopback, at once)."""
    c = socket.socket()
    c.setblocking(False)
    c.connect_ex(("127.0.0.1", port))
    select.select([], [c], [], 0.3)
    return c


def send_if_connected(c: socket.socket, data: bytes) -> bool:
    """Send ``data`` if the connection completed; whether it did."""
    connected = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and bool(
        select.select([], [c], [], 0)[1]
    )
    if connected:
        c.setblocking(True)
        with contextlib.suppress(OSError):
            c.sendall(data)
    return connected


async def answered_or_refused(
    app: web.Application,
    runner: web.AppRunner,
    a: socket.socket,
    late: tuple[socket.socket, bool],
    datas: list[bytes],
    s3: Any,
    bucket: str,
) -> None:
    """The stop sequence's drain after ``close_listener``; then A (taken from the backlog)
    has its answer, and the late client its answer if it got connected (never a reset) or
    a refusal once the listener is closed (its SYN, sent again after 1 s, answered RST),
    which a load balancer retries on the next server."""
    c, connected = late
    await drain(app[STATE])
    await runner.cleanup()
    received = [await asyncio.to_thread(read_until_closed, a)]
    a.close()
    if connected:
        received.append(await asyncio.to_thread(read_until_closed, c))
        assert received[-1], "connected, then reset by the listener's close"
    else:
        await asyncio.to_thread(select.select, [], [c], [], 5)
        err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert err == errno.ECONNREFUSED, errno.errorcode.get(err, err)
    c.close()
    await assert_stored_or_refused(received, datas[: len(received)], s3, bucket)


async def test_a_connection_that_comes_after_the_last_look_is_refused_not_reset(
    moto: MotoServer, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close_listener`` closes right after a look finds the backlog empty, but a
    connection the kernel completed between that look and the close, its request sent, was
    reset: nginx's 502 "Connection reset by peer while reading response header" in a CI
    rolling restart again (nginx's least_conn sends each new request to the instance with
    no connections: the one stopping). Here C connects right after the last look, as the
    kernel would with the proxy preempted there; A already waits in the backlog. Before,
    C's connection completed and was reset (3 of 3 runs, in a worktree). Now C's handshake
    is dropped from the start of the close, and C is refused once the listener is closed
    (a load balancer tries the next server), while A is answered."""
    datas = [os.urandom(100 * 1024), os.urandom(100 * 1024)]
    raws = [
        bodies.body([bodies.file("f", f"{n}.bin", d)]) for n, d in zip("ac", datas, strict=True)
    ]
    late: list[tuple[socket.socket, bool]] = []
    looked = server_module._readable

    def look_then_connect(sock: Any) -> bool:
        waiting = looked(sock)
        if not waiting and not late:  # the last look: C comes now
            c = connect_late(sock.getsockname()[1])
            late.append((c, send_if_connected(c, bodies.request_head(len(raws[1])) + raws[1])))
        return waiting

    monkeypatch.setattr(server_module, "_readable", look_then_connect)
    async with served_app(moto, bucket) as (app, runner, site, port):
        a = socket.create_connection(("127.0.0.1", port))  # waits in the backlog
        a.sendall(bodies.request_head(len(raws[0])) + raws[0])
        await close_listener(site)
        await answered_or_refused(app, runner, a, late[0], datas, s3, bucket)


async def test_a_drain_says_which_uploads_it_waits_for_and_where(
    moto: MotoServer,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the drain waits for uploads, it logs each one's request id and where it
    waits (the innermost s3proxy function, then the innermost of all) and how its
    connection reads, every DRAIN_REPORT seconds. Under heavy load a proxy took its whole
    30 s grace, was killed at its end with a multipart upload open, and its log said
    nothing past ``proxy.draining``."""
    monkeypatch.setattr(app_module, "DRAIN_REPORT", 0.3)
    raw = bodies.body([bodies.file("f", "big.bin", os.urandom(12 * MiB))])
    caplog.set_level("INFO", logger="s3proxy.app")
    async with served_app(moto, bucket, shutdown_timeout=1.5) as (app, _, site, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(bodies.request_head(len(raw), b"X-Request-ID: stalled-1") + raw[: 7 * MiB])
        await writer.drain()  # then the client stalls
        await eventually(
            lambda: open_uploads_async(s3, bucket), within=20, what="the multipart upload open"
        )
        await close_listener(site)
        await drain(app[STATE])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
    assert head.startswith(b"HTTP/1.1 503"), head
    lines = [m for r in caplog.records if (m := r.getMessage()).startswith("proxy.drain_waiting")]
    assert 3 <= len(lines) <= 6, lines  # 1.5 s of grace, a line every 0.3 s
    for line in lines:
        assert line.startswith("proxy.drain_waiting upload rid=stalled-1 at="), line
        where, reads = line.split(" at=")[1].split(" ", 1)
        ours, inner = where.split(">")  # waiting for the client's bytes
        assert ours.startswith("next_chunk:") and inner.startswith("StreamReader._wait:"), line
        # ... reading its socket (not paused), which holds nothing: the client is silent
        assert reads == (
            "reading=True closing=False aiohttp_paused=False buffer_paused=False"
            " kernel=0 buffered=0 eof=False"
        ), line
    assert await open_uploads_async(s3, bucket) == []


@contextlib.asynccontextmanager
async def served_app(
    moto: MotoServer, bucket: str, **overrides: Any
) -> AsyncIterator[tuple[web.Application, web.AppRunner, web.TCPSite, int]]:
    """The app served in this process on a free port, to drive its stop sequence by hand."""
    app = create_app(make_settings(moto.endpoint_url, bucket=bucket, **overrides))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield app, runner, site, runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def assert_stored_or_refused(
    received: list[bytes], datas: list[bytes], s3: Any, bucket: str
) -> None:
    """Each client an answer, not a reset: 201 with its data stored, or 503 SHUTTING_DOWN
    with nothing stored; the bucket holds exactly what was answered 201."""
    stored = []
    for answer, data in zip(received, datas, strict=True):
        assert answer.startswith((b"HTTP/1.1 201", b"HTTP/1.1 503")), answer[:200]
        if answer.startswith(b"HTTP/1.1 201"):
            stored.append(data)
        else:
            assert b'"SHUTTING_DOWN"' in answer, answer
    keys = await all_keys_async(s3, bucket)
    assert sorted([await read_object_async(s3, bucket, k) for k in keys]) == sorted(stored)
    assert await open_uploads_async(s3, bucket) == []


def read_until_closed(sock: socket.socket, within: float = 20.0) -> bytes:
    """Everything the server sends until it closes the connection (b"" if it resets it)."""
    sock.settimeout(within)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


async def test_a_request_sent_on_a_kept_alive_connection_just_before_drain_is_answered(
    moto: MotoServer, s3: Any, bucket: str
) -> None:
    """A kept-alive connection's next request, sent but not yet read by the loop when
    the drain begins: the connection is not idle (its bytes are in the kernel), and the
    drain waits for its request instead of closing it under the client."""
    data = os.urandom(100 * 1024)
    raw = bodies.body([bodies.file("f", "late.bin", data)])
    async with served_app(moto, bucket) as (app, runner, _, port):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await asyncio.to_thread(client.recv, 65536)
            assert first.startswith(b"HTTP/1.1 200"), first
            await asyncio.sleep(0.1)  # the first request is over: the connection waits
            client.sendall(bodies.request_head(len(raw)) + raw)  # the loop has not read it
            await drain(app[STATE])
            await runner.cleanup()  # as the server's stop sequence does after the drain
            received = await asyncio.to_thread(read_until_closed, client)
    await assert_stored_or_refused([received], [data], s3, bucket)


async def test_a_request_on_a_connection_made_just_before_drain_is_answered(
    moto: MotoServer, s3: Any, bucket: str
) -> None:
    """A load balancer connects, and the drain begins before its request's first byte
    came: the connection was idle and closed at once, and the POST it then sent got no
    answer (nginx: a 502 it may not retry; a loaded rolling restart, 1 of 373). A
    connection not a second old that has sent nothing yet is waited for: its request is
    answered, as a new upload is while draining."""
    data = os.urandom(100 * 1024)
    raw = bodies.body([bodies.file("f", "late.bin", data)])
    async with served_app(moto, bucket) as (app, runner, _, port):
        conns = app[STATE].connections
        with socket.create_connection(("127.0.0.1", port)) as client:
            await eventually(lambda: len(conns), within=5, what="the connection made")
            draining = asyncio.create_task(drain(app[STATE]))
            await asyncio.sleep(0.2)  # the drain began: the connection silent so far
            client.sendall(bodies.request_head(len(raw)) + raw)
            await asyncio.wait_for(draining, 10)
            await runner.cleanup()  # as the server's stop sequence does after the drain
            received = await asyncio.to_thread(read_until_closed, client)
    await assert_stored_or_refused([received], [data], s3, bucket)


def send_slowly_then_read(
    client: socket.socket, head: bytes, body: bytes, pause: float
) -> tuple[OSError | None, bytes]:
    """Send ``head``, then ``body`` 64 KiB at a time with ``pause`` between; what the
    sending raised (None if all went), and then all the server sent until it closed."""
    failed = None
    try:
        client.sendall(head)
        for at in range(0, len(body), 64 * 1024):
            client.sendall(body[at : at + 64 * 1024])
            time.sleep(pause)
    except OSError as exc:
        failed = exc
    return failed, read_until_closed(client)


async def test_a_body_still_coming_after_its_answer_is_read_to_its_end_before_the_exit(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """A request answered before its body came (A: 413 by its Content-Length before the
    SIGTERM; B: 503 SHUTTING_DOWN, its connection made before it) is read on to its
    body's end (aiohttp's lingering read, up to 10 s), and only then closed. The drain did
    not wait for those reads: the stop closed both connections 1 s after it (EXIT_GRACE),
    their clients still sending (BrokenPipe at 1.03 s). Behind nginx such a cut makes
    nginx close its own connection to the client after passing the answer on, though it
    said keep-alive: the client's next request there failed (docs/deploy.md, What to
    retry)."""
    body = bodies.body([bodies.file("f", "late.bin", os.urandom(6 * MiB))])
    proxy = start_proxy(moto, bucket, tmp_path, "--max-request-size", "4MiB")
    try:
        a = socket.create_connection(("127.0.0.1", proxy.port))
        b = socket.create_connection(("127.0.0.1", proxy.port))
        head = bodies.request_head(len(body))
        first = asyncio.create_task(asyncio.to_thread(send_slowly_then_read, a, head, body, 0.04))
        await asyncio.sleep(0.5)  # A is answered 413 and read on
        proxy.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # the drain has begun; B was made before it
        second = await asyncio.to_thread(send_slowly_then_read, b, head, body, 0.04)
        results = [await first, second]
        assert await exit_code(proxy) == 0
    finally:
        for sock in (a, b):
            sock.close()
        if proxy.proc.poll() is None:
            proxy.stop()
    for (failed, answer), (status, code) in zip(
        results, [(413, "REQUEST_TOO_LARGE"), (503, "SHUTTING_DOWN")], strict=True
    ):
        assert failed is None, failed  # the whole body went: read on, not cut
        assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:200]
        assert f'"{code}"'.encode() in answer, answer
    assert await all_keys_async(s3, bucket) == []
    assert await open_uploads_async(s3, bucket) == []


@pytest.mark.parametrize("refused", [True, False], ids=["upload-413-close", "healthz-200-kept"])
async def test_the_drain_ends_when_an_answered_body_has_come(
    refused: bool, moto: MotoServer, tmp_path: Path
) -> None:
    """The drain waits for a body still coming after its answer, and no longer: once it
    has come, the process exits, not at the end of --shutdown-timeout. Whether the answer
    closes the connection (a refusal) or keeps it (a health check sent with a body)."""
    body = bodies.body([bodies.file("f", "late.bin", os.urandom(6 * MiB))])
    proxy = start_proxy(moto, "unused", tmp_path, "--max-request-size", "4MiB")
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            head = bodies.request_head(len(body))
            if not refused:
                head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            sending = asyncio.create_task(
                asyncio.to_thread(send_slowly_then_read, client, head, body, 0.02)
            )
            await asyncio.sleep(0.5)  # answered (413 or 200), and read on
            proxy.proc.send_signal(signal.SIGTERM)
            began = time.monotonic()
            failed, answer = await sending
            assert await exit_code(proxy) == 0
            took = time.monotonic() - began
    finally:
        if proxy.proc.poll() is None:
            proxy.stop()
    assert failed is None, failed
    assert answer.startswith(b"HTTP/1.1 413" if refused else b"HTTP/1.1 200"), answer[:200]
    assert took < 10, took  # the body takes about 2 s; --shutdown-timeout is 30 s


async def test_a_silent_new_connection_holds_the_drain_one_second_at_most(
    moto: MotoServer, bucket: str
) -> None:
    async with served_app(moto, bucket) as (app, _, _, port):
        conns = app[STATE].connections
        with socket.create_connection(("127.0.0.1", port)):
            await eventually(lambda: len(conns), within=5, what="the connection made")
            began = time.monotonic()
            await asyncio.wait_for(drain(app[STATE]), 5)
            assert time.monotonic() - began < FRESH_GRACE + 3  # not --shutdown-timeout (30 s)


async def test_partly_sent_heads_do_not_hold_the_drain(moto: MotoServer, bucket: str) -> None:
    """Slowloris connections (a head begun, never finished) are not requests the drain
    waits for: with them it waited for --header-timeout (10.8 s to exit with 20)."""
    async with served_app(moto, bucket) as (app, _, _, port):
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        try:
            for sock in socks:
                sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\n")
            conns = app[STATE].connections
            await eventually(
                lambda: len(conns), until=lambda n: n == 5, within=5, what="5 connections"
            )
            await asyncio.sleep(0.2)  # their bytes read: heads begun
            began = time.monotonic()
            await asyncio.wait_for(drain(app[STATE]), 5)
            assert time.monotonic() - began < 1.0
        finally:
            for sock in socks:
                sock.close()


async def test_a_download_cut_at_the_deadline_is_logged_and_ends_the_wait(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """The outside test's slow 30 MiB download at SIGTERM: it was cut 2 s after
    --shutdown-timeout (aiohttp's own stop: one EXIT_GRACE to finish, one more once
    cancelled) and left no line in the log, neither access nor event."""
    proxy = start_proxy(moto, bucket, tmp_path, "--shutdown-timeout", "2", "--drain-delay", "0")
    data = os.urandom(30 * MiB)
    raw = bodies.body([bodies.file("f", "big.bin", data)])
    reader, writer = await open_upload(proxy.port, raw, len(raw))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    key = json.loads(await reader.readexactly(length))["files"][0]["key"]
    writer.close()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /files/{key} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = len(await reader.read(64 * 1024))  # the download has begun; then it reads slowly
    took = 0.0
    proxy.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    while chunk := await asyncio.wait_for(reader.read(64 * 1024), 20):
        got += len(chunk)  # what the kernels buffered still comes after the cut
        await asyncio.sleep(0.05)
        if proxy.proc.poll() is not None and not took:
            took = time.monotonic() - signalled
    writer.close()
    assert await exit_code(proxy) == 0
    took = took or time.monotonic() - signalled
    assert got < len(data)
    assert took < 2 + 1.5, took  # cut at --shutdown-timeout, not 2 s after it
    log = proxy.log_path.read_text()
    [access] = [line for line in log.splitlines() if f"GET /files/{key}" in line]
    assert '" 200 ' in access, access  # the status it began with, and the bytes sent
    assert "request.stopped reason=SHUTTING_DOWN method=GET" in log, log
    assert f"download.stopped key={key} sent=" in log, log
    print(f"exit {took:.2f}s after SIGTERM with a slow download, --shutdown-timeout 2")


@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_exit_is_bounded_while_s3_hangs(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """The outside re-probe: S3 holding every answer at SIGTERM, with an upload and a tus
    PATCH cut by the drain and a cleanup the janitor owes. Each cleanup had 30 s of its
    own, one after the other, and the last try came after them: 128.6 s to exit, a tus
    commit still running after ``proxy.stopped``. Now they share one deadline: the exit
    comes within the README's --drain-delay + --shutdown-timeout + 5 s, and every cleanup
    not done is logged abandoned once, with what removes it."""
    release = asyncio.Event()
    hanging = False

    def rule(op: str, n: int) -> Fault | None:
        if hanging:
            return Fault(until=release, status=503, code="SlowDown")
        if op == "AbortMultipartUpload" and n == 1:  # the janitor's, then
            return Fault(status=403, code="AccessDenied")
        return None

    delay, grace = 1, 2
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = ProxyProcess.start(
            [
                "--endpoint-url",
                faulty.endpoint_url,
                "--bucket",
                bucket,
                "--part-size",
                "5MiB",
                "--drain-delay",
                str(delay),
                "--shutdown-timeout",
                str(grace),
            ],
            fake_aws_env(),
            tmp_path / "proxy.log",
        )
        writers = []
        try:
            # 1. An upload whose client went away, its abort refused: the janitor owes it.
            raw = bodies.body([bodies.file("f", "a.bin", os.urandom(12 * MiB))])
            _, gone = await open_upload(proxy.port, raw, 7 * MiB)
            await eventually(
                lambda: open_uploads_async(s3, bucket),
                until=lambda u: len(u) == 1,
                within=20,
                what="the first upload open",
            )
            gone.transport.abort()
            failed = await eventually(
                lambda: _lines(proxy.log_path, "cleanup.failed what=abort "),
                until=lambda lines: len(lines) == 1,
                within=20,
                what="the first upload's abort refused",
            )
            owed = failed[0].split("what=", 1)[1].split(" error=", 1)[0]
            # 2. An upload stalled mid-file, and 3. a tus PATCH stalled after its first part.
            raw = bodies.body([bodies.file("f", "b.bin", os.urandom(12 * MiB))])
            writers.append((await open_upload(proxy.port, raw, 7 * MiB))[1])
            data = os.urandom(12 * MiB)
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    proxy.url + "/tus/",
                    headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(len(data))},
                ) as resp,
            ):
                assert resp.status == 201, await resp.text()
                url = resp.headers["Location"]
            _, patch = await asyncio.open_connection("127.0.0.1", proxy.port)
            patch.write(
                (
                    f"PATCH {url} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                    f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n"
                ).encode()
                + data[: 7 * MiB]
            )
            await patch.drain()
            writers.append(patch)
            await eventually(
                lambda: open_uploads_async(s3, bucket),
                until=lambda u: len(u) == 3,
                within=20,
                what="the stalled upload's and the PATCH's open",
            )
            await asyncio.sleep(1.5)  # the first parts reach S3
            hanging = True  # from now on S3 answers nothing
            signalled = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            bound = delay + grace + 5  # README "Shutdown and rolling restarts"
            try:
                assert await exit_code(proxy, bound + 2) == 0
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {bound + 2}s after SIGTERM (bound {bound}s)")
            took = time.monotonic() - signalled
            print(f"exit {took:.2f}s after SIGTERM with S3 hanging (bound {bound}s)")
            assert took <= bound, took
        finally:
            release.set()
            proxy.stop()
            for writer in writers:
                writer.close()
        log = proxy.log_path.read_text()
        assert "proxy.stopped" in log.rstrip().splitlines()[-1], log[-3000:]
        whats = [
            line.split("what=", 1)[1].split(" error=", 1)[0]
            for line in _lines(proxy.log_path, "cleanup.abandoned ")
        ]
        assert len(whats) == len(set(whats)), whats  # once each
        assert owed in whats, (owed, whats)
        assert any(w.startswith("tus commit id=") for w in whats), whats
        # Nothing dropped unseen: every multipart upload left open is named in a line.
        left = await open_uploads_async(s3, bucket)
        assert len(left) == 3, left
        for upload in left:
            assert any(f"upload_id={upload['UploadId']}" in w for w in whats), (upload, whats)
        for upload in left:
            await asyncio.to_thread(
                s3.abort_multipart_upload,
                Bucket=bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )


def _lines(path: Path, marker: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if marker in line]


@pytest.mark.parametrize("stage", ["completing", "notifying"])
async def test_a_presigned_complete_cut_by_shutdown_is_answered_and_owed_to_its_retry(
    proxy_factory: Any,
    aiohttp_server: Any,
    moto: MotoServer,
    s3: Any,
    bucket: str,
    stage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reprobe's F3: a presigned complete in flight at the drain's deadline was cut
    like a download: no HTTP answer at all (499 in the log). With a slow S3 its Complete
    landed anyway, with no webhook and no log line; with a slow webhook its rollback
    deleted the object, and the client's retry got 404 and had to upload again. Now it
    counts as an upload: answered 503 SHUTTING_DOWN telling the client to retry the
    complete, the object (if any) kept and logged, and the retry (on another instance)
    answers 200 for it and tells the webhook."""
    events: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        events.append((await request.json())["event"])
        if stage == "notifying" and len(events) == 1:
            await asyncio.sleep(5)  # the webhook slow at the first delivery
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)

    def rule(op: str, n: int) -> Fault | None:
        if stage == "completing" and (op, n) == ("CompleteMultipartUpload", 1):
            return Fault(delay=2.0)  # S3 slow: the Complete lands after the cut
        return None

    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        settings: dict[str, Any] = {
            "endpoint_url": faulty.endpoint_url,
            "key_template": "uploads/{uuid}/{filename}",
            "webhook_url": str(server.make_url("/hook")),
            "webhook_secret": HOOK_SECRET,
            "shutdown_timeout": 0.5,
        }
        proxy = await proxy_factory(**settings)
        ref = await _multipart_done(proxy, s3, bucket)
        sent = asyncio.create_task(
            proxy.post("/sign/multipart/complete", data=json.dumps(ref).encode())
        )
        await eventually(
            lambda: faulty.calls.count("CompleteMultipartUpload") + len(events),
            until=lambda n: n >= 1,
            within=10,
            what="the complete in flight",
        )
        await drain(proxy.app[STATE])
        resp = await asyncio.wait_for(sent, 10)
        out = await resp.json()
        assert (resp.status, out["error"]["code"]) == (503, "SHUTTING_DOWN"), out
        assert "retry the complete" in out["error"]["message"], out
        assert f"presign.complete_cut key={ref['key']}" in caplog.text
        assert f"stage={stage}" in caplog.text
        other = await proxy_factory(**settings)
        status, done = await complete_until_decided(other, ref)
    assert status == 200, done
    assert done["key"] == ref["key"] and done["size"] == 6 * MiB
    assert "upload.rolled_back" not in events and events[-1] == "upload.completed", events
    assert await all_keys_async(s3, bucket) == [ref["key"]]


@pytest.mark.parametrize("template", ["plain/{filename}", "up/{uuid}/{filename}"])
async def test_a_write_held_by_s3_past_the_cut_is_removed_before_the_exit_or_logged(
    proxy_factory: Any,
    moto: MotoServer,
    s3: Any,
    bucket: str,
    template: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """reprobe9a F3: an upload cut at shutdown while S3 held its PutObject was answered
    503 "nothing was stored", and S3 stored the file 2 s after the exit: the rollback's
    rechecks were scheduled after the janitor closed and lost, with no line in the log
    (with a shared key, the retry on another instance got 409 KEY_EXISTS). Now the 503
    says a write may still land, a recheck runs just before the shutdown's deadline (the
    write landed by then is deleted), and the one that could land later is logged
    abandoned with its key, its nonce where keys are shared, and until when."""
    armed = {"on": False}

    def rule(op: str, n: int) -> Fault | None:
        return Fault(delay=1.5) if armed["on"] and op == "PutObject" else None

    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url,
            key_template=template,
            s3_max_attempts=1,
            s3_read_timeout=10.0,
            shutdown_timeout=0.2,
        )
        armed["on"] = True
        raw = bodies.body([bodies.file("f", "held.bin", b"U" * 3000)])
        sending = asyncio.ensure_future(
            proxy.post(
                "/upload",
                data=raw,
                headers=bodies.headers(),
            )
        )
        await eventually(
            lambda: faulty.calls, until=lambda c: "PutObject" in c, within=10, what="the write"
        )
        with caplog.at_level(logging.INFO):
            await asyncio.wait_for(drain(proxy.app[STATE]), 10)
            resp = await asyncio.wait_for(sending, 10)
        out = await resp.json()
        assert (resp.status, out["error"]["code"]) == (503, "SHUTTING_DOWN"), out
        message = out["error"]["message"]
        assert "nothing was stored" not in message and "may still land" in message, message
        assert faulty.calls.count("PutObject") == 1
        assert await all_keys_async(s3, bucket) == []  # landed at 1.5 s, deleted before exit
    abandoned = [r.getMessage() for r in caplog.records if "cleanup.abandoned" in r.getMessage()]
    [line] = [a for a in abandoned if "reason=late_write" in a]
    assert "what=delete key=" in line and "held.bin" in line, line
    assert ("nonce=" in line) is template.startswith("plain/"), line
    assert "until=" in line and "delete it by hand" in line, line
