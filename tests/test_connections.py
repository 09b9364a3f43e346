"""Connections: the head timeout (slowloris), the keep-alive timeout, the cap with its
health reserve, the fd limit, and EMFILE logged once a second. Dozens of sockets, not
thousands (the thousand-socket variant is marked slow)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import resource
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from s3proxy.log import RateLimit, RequestIdFilter, loop_exception_handler
from s3proxy.protocol import (
    HEALTH_RESERVE,
    MIN_RECV,
    RECV_SIZE,
    Admission,
    ProxyRequestHandler,
    admission,
    unread_bytes,
)
from s3proxy.server import OTHER_FDS, connection_cap
from s3proxy.state import STATE
from tests import bodies
from tests.bodies import MiB
from tests.polling import eventually
from tests.rawhttp import exchange
from tests.s3util import MotoServer, ProxyProcess, fake_aws_env


@pytest.mark.parametrize(
    ("served", "reserve", "limit", "idle", "expected"),
    [
        (0, 0, 10, False, Admission.SERVE),
        (9, 0, 10, True, Admission.SERVE),
        (10, 0, 10, True, Admission.EVICT_AND_SERVE),
        (10, 0, 10, False, Admission.HEALTH_ONLY),
        (10, HEALTH_RESERVE - 1, 10, False, Admission.HEALTH_ONLY),
        (10, HEALTH_RESERVE, 10, False, Admission.REFUSE),
        (10, HEALTH_RESERVE, 10, True, Admission.EVICT_AND_SERVE),
    ],
)
def test_admission(served: int, reserve: int, limit: int, idle: bool, expected: Admission) -> None:
    assert admission(served, reserve, limit, idle=idle) is expected


@pytest.mark.parametrize(
    ("reserve", "headless", "expected"),
    [
        (HEALTH_RESERVE - 1, True, Admission.HEALTH_ONLY),
        (HEALTH_RESERVE, True, Admission.EVICT_AND_HEALTH_ONLY),
        (HEALTH_RESERVE, False, Admission.REFUSE),  # all answering health checks
    ],
)
def test_admission_reserve(reserve: int, headless: bool, expected: Admission) -> None:
    assert admission(10, reserve, 10, idle=False, reserve_headless=headless) is expected


@pytest.mark.parametrize(
    ("asked", "nofile", "s3_pool", "expected"),
    [
        (1024, 1 << 20, 64, 1024),  # plenty
        (1024, 1024, 64, 1024 - HEALTH_RESERVE - 3 * 64 - OTHER_FDS),  # the common soft limit
        (1024, 128, 8, 128 - HEALTH_RESERVE - 3 * 8 - OTHER_FDS),
        (1024, 64, 64, 1),  # nothing fits: still serve one
    ],
)
def test_connection_cap(asked: int, nofile: int, s3_pool: int, expected: int) -> None:
    assert connection_cap(asked, nofile, s3_pool) == expected


def test_rate_limit_counts_what_it_suppresses() -> None:
    now = [0.0]
    limit = RateLimit(1.0, clock=lambda: now[0])
    got = []
    for t in (0.0, 0.1, 0.5, 0.99, 1.0, 1.2, 5.0):
        now[0] = t
        got.append(limit.hit())
    assert got == [1, None, None, None, 4, None, 2]


def test_emfile_on_accept_is_one_line_a_second(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    handler = loop_exception_handler(RateLimit(1.0, clock=lambda: now[0]))
    loop = asyncio.new_event_loop()
    try:
        exc = OSError(errno.EMFILE, "Too many open files")
        context = {"message": "socket.accept() out of system resource", "exception": exc}
        for i in range(300):  # what asyncio reports for a full backlog, over 3 s
            now[0] = i / 100
            handler(loop, context)
    finally:
        loop.close()
    lines = [r for r in caplog.records if "accept.failed" in r.getMessage()]
    assert len(lines) == 3
    assert "EMFILE" in lines[0].getMessage() and not any(r.exc_info for r in lines)
    counts = [int(r.getMessage().split("times=")[1].split(":")[0]) for r in lines]
    assert counts == [1, 100, 100]  # the last 99 are told with the next line


async def test_aiohttps_orphaned_body_write_is_one_line_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp writes a request body in a task of its own; when S3 closes the connection
    first, the task's error is never retrieved and asyncio logged it with a traceback
    (CI: a SeaweedFS gateway stopped mid-upload). The real aiohttp coroutine, failing as
    it did there: the transport closing at write_eof."""
    from aiohttp import ClientRequest
    from aiohttp.client_exceptions import ClientConnectionResetError

    class Writer:
        async def write_eof(self) -> None:
            raise ClientConnectionResetError("Cannot write to closing transport")

    request = SimpleNamespace(_upload_tracker=None, _upload_gen=0, _continue=None, _body=None)
    conn = SimpleNamespace(protocol=object(), close=lambda: None)
    task = asyncio.ensure_future(ClientRequest.write_bytes(request, Writer(), conn))  # type: ignore[arg-type]
    with contextlib.suppress(ClientConnectionResetError):
        await task
    handler = loop_exception_handler()
    context = {"message": "Task exception was never retrieved", "exception": task.exception()}
    handler(asyncio.get_running_loop(), {**context, "future": task})
    [line] = [r for r in caplog.records if "s3.body_write_orphaned" in r.getMessage()]
    assert "Cannot write to closing transport" in line.getMessage() and not line.exc_info
    assert line.levelname == "WARNING"

    # any other task's unretrieved error still goes to asyncio's own report
    async def other() -> None:
        raise ClientConnectionResetError("ours")

    mine = asyncio.ensure_future(other())
    with contextlib.suppress(ClientConnectionResetError):
        await mine
    caplog.clear()
    handler(asyncio.get_running_loop(), {**context, "exception": mine.exception(), "future": mine})
    [report] = caplog.records
    assert report.getMessage().startswith("Task exception was never retrieved")
    assert report.exc_info


# --- against a served app -------------------------------------------------------------


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the server closes the connection (EOF or reset)."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), within):
            pass
    return time.monotonic() - started


async def slowloris(host: str, port: int, stop: asyncio.Event) -> float:
    """Send a request head a byte at a time; return when the server closed it, counted
    from before the connect: the server's head timer starts at its accept, which comes
    before this task resumes from the connect (a fresh-clone CI run, its loop held about
    0.2 s there with 30 of them: all 30 timed 0.80 s against the 1 s timeout)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000
    try:
        for byte in head:
            if stop.is_set():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)
            if reader.at_eof():
                break
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(1), 10)
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


async def test_slowloris_closed_after_header_timeout_while_upload_and_healthz_work(
    proxy_factory: Any,
) -> None:
    proxy = await proxy_factory(header_timeout=1.0, keepalive_timeout=5.0)
    host, port = proxy.server.host, proxy.server.port
    stop = asyncio.Event()
    attackers = [asyncio.create_task(slowloris(host, port, stop)) for _ in range(30)]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(6 * MiB))])
    resp = await proxy.post("/upload", data=bodies.chunked(raw), headers=bodies.headers())
    assert resp.status == 201, await resp.text()
    upload_s = time.monotonic() - started
    assert (await proxy.get("/healthz")).status == 200
    lived = await asyncio.wait_for(asyncio.gather(*attackers), 10)
    stop.set()
    # closed at the head timeout, not after the 4 KiB they would take 13 minutes to send
    assert all(0.9 < t < 2.5 for t in lived), lived
    print(f"upload of 6 MiB next to 30 slowloris: {upload_s:.2f}s")


async def test_silent_new_connection_closed_after_header_timeout(proxy_factory: Any) -> None:
    proxy = await proxy_factory(header_timeout=1.0, keepalive_timeout=5.0)
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        assert 0.9 < await read_until_closed(reader, 5) < 2.0
    finally:
        writer.close()


async def test_idle_keepalive_closed_after_keepalive_timeout(proxy_factory: Any) -> None:
    proxy = await proxy_factory(header_timeout=5.0, keepalive_timeout=1.0)
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
        # kept alive: a second request on it is answered
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        # then idle: closed about a keep-alive timeout later (aiohttp's timer ceils to 1 s)
        assert 0.9 < await read_until_closed(reader, 5) < 2.5
    finally:
        writer.close()


async def open_partial(host: str, port: int) -> tuple[asyncio.StreamReader, Any]:
    """A connection with part of a head sent: busy, so never evicted."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    await writer.drain()
    return reader, writer


async def test_past_the_cap_only_health_checks_are_served(proxy_factory: Any) -> None:
    proxy = await proxy_factory(max_connections=4, header_timeout=30.0)
    host, port = proxy.server.host, proxy.server.port
    held = [await open_partial(host, port) for _ in range(4)]
    try:
        await asyncio.sleep(0.1)
        health = await exchange(host, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", quiet=2)
        assert health.status == 200 and health.headers["Connection"] == "close"
        raw = bodies.body([bodies.file("f", "a.txt", b"hello")])
        up = await exchange(host, port, bodies.request_head(len(raw)) + raw, quiet=2)
        assert up.status == 503 and up.code == "OVERLOADED", up.raw
        assert up.headers["Connection"] == "close"
        # a reserve full of slow heads gives way to a health check, oldest first
        reserve = [await open_partial(host, port) for _ in range(HEALTH_RESERVE)]
        try:
            await asyncio.sleep(0.1)
            health = await exchange(host, port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert health.status == 200, health.raw
            assert await read_until_closed(reserve[0][0], 1) < 0.5
        finally:
            for _, w in reserve:
                w.close()
    finally:
        for _, w in held:
            w.close()


async def test_at_the_cap_the_oldest_idle_connection_makes_room(proxy_factory: Any) -> None:
    proxy = await proxy_factory(max_connections=3, header_timeout=30.0)
    host, port = proxy.server.host, proxy.server.port
    idle = []
    for _ in range(3):
        idle.append(await asyncio.open_connection(host, port))
        await asyncio.sleep(0.05)
    try:
        raw = bodies.body([bodies.file("f", "a.txt", b"hello")])
        up = await exchange(host, port, bodies.request_head(len(raw)) + raw, quiet=5)
        assert up.status == 201, up.raw
        assert await read_until_closed(idle[0][0], 2) < 1.0  # the oldest was closed
        with pytest.raises(TimeoutError):  # the others were not
            await read_until_closed(idle[2][0], 0.3)
    finally:
        for _, w in idle:
            w.close()


def test_unread_bytes_counts_what_the_kernel_holds() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert unread_bytes(a) == 0
        line = b"POST /upload HTTP/1.1\r\n"
        b.sendall(line)
        assert unread_bytes(a) == len(line)
        a.recv(100)
        assert unread_bytes(a) == 0
    assert unread_bytes(a) == 0  # closed: cannot tell, so nothing


async def test_a_kept_alive_connection_whose_next_request_is_unread_is_not_evicted(
    proxy_factory: Any,
) -> None:
    """Before: at the cap, a new connection evicted a kept-alive one that looked idle
    while its next request already sat unread in the kernel (the client reuses it the
    moment it has its answer): that request, sent whole, got a reset. Here the proxy's
    read of it is paused, which holds the race open."""
    proxy = await proxy_factory(max_connections=1, header_timeout=30.0)
    host, port = proxy.server.host, proxy.server.port
    reader, writer = await asyncio.open_connection(host, port)
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(health)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await asyncio.wait_for(reader.readexactly(length), 5)
    conns = proxy.server.app[STATE].connections
    [served] = conns.served
    assert isinstance(served, ProxyRequestHandler) and served.idle
    assert served.transport is not None
    served.transport.pause_reading()
    raw = bodies.body([bodies.file("f", "a.txt", b"hello")])
    writer.write(bodies.request_head(len(raw)) + raw)  # the next request, sent whole
    await writer.drain()
    await eventually(lambda: not served.idle, within=2, what="the request seen in the kernel")
    newcomer = await asyncio.open_connection(host, port)
    await asyncio.sleep(0.2)  # the newcomer is admitted (to the reserve, not by eviction)
    served.transport.resume_reading()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 201"), head
    assert conns.evicted == 0
    writer.close()
    newcomer[1].close()


async def test_a_socket_read_is_widened_only_for_an_upload_waiting_for_bytes(
    proxy_factory: Any,
) -> None:
    """asyncio reads 256 KiB per recv; an upload waiting to fill a part widens the next
    read up to --read-buffer (fewer chunks through the parser, scan and pipeline), past
    256 KiB only as far as the kernel holds bytes (recv allocates all it may take: a slow
    client's few KiB cut from 1 MiB blocks fragmented the heap), and only that read:
    bytes nobody waits for come in the usual sizes."""
    proxy = await proxy_factory(read_buffer=4 * MiB)
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    [served] = proxy.server.app[STATE].connections.served
    transport = served.transport
    assert transport is not None
    assert transport.max_size == RECV_SIZE  # asyncio's own
    served.expect(8 * MiB)
    assert transport.max_size == RECV_SIZE  # nothing in the kernel: not past asyncio's
    served.expect(100)
    assert transport.max_size == MIN_RECV
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    transport.pause_reading()  # the kernel holds what comes
    writer.write(b"x" * (1536 * 1024))
    await eventually(lambda: unread_bytes(sock) >= 1100 * 1024, within=5, what="in the kernel")
    served.expect(8 * MiB)
    assert 1100 * 1024 <= transport.max_size <= 1536 * 1024  # what the kernel holds
    served.expect(700 * 1024)
    assert transport.max_size == 700 * 1024  # what the part still needs
    transport.resume_reading()  # that one read comes (and is refused: not HTTP)
    await eventually(lambda: transport.max_size == RECV_SIZE, within=5, what="narrowed")
    writer.close()


# --- a real process under a low fd limit ---------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_limited(
    moto: MotoServer, bucket: str, log: Path, nofile: int, *extra: str
) -> ProxyProcess:
    def limit() -> None:  # the HARD limit: the proxy raises its soft limit to it
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return ProxyProcess.start(
        [
            *("--endpoint-url", moto.endpoint_url, "--bucket", bucket),
            *("--part-size", "5MiB", "--s3-max-connections", "8", *extra),
        ],
        fake_aws_env(),
        log,
        timeout=60,
        preexec_fn=limit,
    )


async def flood_and_upload(
    moto: MotoServer, bucket: str, tmp_path: Path, nofile: int, sockets: int
) -> dict[str, float]:
    log = tmp_path / "proxy.log"
    proxy = start_limited(moto, bucket, log, nofile, "--header-timeout", "2")
    proc, port = proxy.proc, proxy.port
    url = f"http://127.0.0.1:{port}"
    flood: list[asyncio.StreamWriter] = []
    try:
        data = os.urandom(12 * MiB)
        raw = bodies.body([bodies.file("f", "big.bin", data)])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(bodies.request_head(len(raw)) + raw[: 6 * MiB])  # an upload in flight
        await writer.drain()
        size_before = log.stat().st_size
        for _ in range(sockets):  # idle sockets and slow heads, half and half
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                if len(flood) % 2:
                    w.write(b"GET /healthz HTTP/1.1\r\n")
                flood.append(w)
        flooded = time.monotonic()
        # asyncio accepts a burst of connections at once and closes the refused ones on a
        # later pass, so the count can touch the limit for a moment (an accept then fails
        # and is retried a second later: README "File descriptors"); what must hold is that
        # the proxy settles below it while the flood's sockets stay open.
        fds = await eventually(
            lambda: fd_count(proc.pid),
            within=3,
            what="fds below the limit",
            until=lambda n: n < nofile,
        )
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/healthz", timeout=aiohttp.ClientTimeout(5)) as resp:
                assert resp.status == 200
            healthz_s = time.monotonic() - started
            writer.write(raw[6 * MiB :])  # the upload in flight completes
            await writer.drain()
            resp_raw = await asyncio.wait_for(reader.read(65536), 30)
            assert resp_raw.startswith(b"HTTP/1.1 201"), resp_raw
        # Until the slow heads time out they may hold every served slot (none of them is
        # idle), and the /healthz above may have been answered from the reserve, whose
        # kept-alive connection answers nothing else (503 OVERLOADED, by design): a new
        # upload is served on a new connection once the heads' --header-timeout is past.
        await asyncio.sleep(max(0.0, flooded + 2.5 - time.monotonic()))
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(
                url + "/upload", data=io.BytesIO(raw), headers=bodies.headers()
            ) as resp:
                assert resp.status == 201, await resp.text()
            upload_s = time.monotonic() - started
        await asyncio.sleep(3)  # the flood sits out the head timeout
        logged = log.stat().st_size - size_before
        figures = {
            "fds": fds,
            "rss_mib": rss_mib(proc.pid),
            "healthz_s": healthz_s,
            "upload_12mib_s": upload_s,
            "log_bytes": logged,
        }
        writer.close()
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert "nofile_soft" in text
        return figures
    finally:
        for w in flood:  # also when it failed: unclosed, they fail the next test
            w.close()
        proc.terminate()
        proc.wait(30)


async def test_low_fd_limit_and_a_flood(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    figures = await flood_and_upload(moto, bucket, tmp_path, nofile=128, sockets=200)
    print("128 fds, 200 flood sockets:", figures)
    assert figures["fds"] < 128
    assert figures["log_bytes"] < 20_000


@pytest.mark.slow
async def test_thousand_sockets_at_1024_fds(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    figures = await flood_and_upload(moto, bucket, tmp_path, nofile=1024, sockets=2000)
    print("1024 fds, 2000 flood sockets:", figures)
    assert figures["fds"] < 1024
    assert figures["log_bytes"] < 50_000


async def send_slowly(writer: asyncio.StreamWriter, data: bytes, over: float) -> None:
    step = max(1, len(data) // 10)
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
        await writer.drain()
        await asyncio.sleep(over / 10)


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One response with a Content-Length, from a raw connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


@pytest.mark.parametrize("chunked", [False, True])
async def test_after_a_body_an_idle_connection_is_kept_alive_not_head_timed(
    proxy_factory: Any, chunked: bool
) -> None:
    """reprobe10b N1: after any request with a body, the socket's reading resumed with no
    bytes (aiohttp's resume_reading calls data_received(b"")), which counted as a head
    begun: the idle kept-alive connection was closed at --header-timeout, not
    --keepalive-timeout, and logged as a head timeout (behind a load balancer, the 502
    race the keep-alive advice exists to avoid)."""
    proxy = await proxy_factory(header_timeout=1.0, keepalive_timeout=4.0)
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(300_000))])
    if chunked:
        head = bodies.request_head(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        steps = range(0, len(raw), 65536)
        body = b"".join(
            b"%x\r\n%s\r\n" % (len(raw[i : i + 65536]), raw[i : i + 65536]) for i in steps
        )
        request = head + body + b"0\r\n\r\n"
    else:
        request = bodies.request_head(len(raw)) + raw
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        writer.write(request)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 201")
        await asyncio.sleep(2.0)  # idle past --header-timeout, within --keepalive-timeout
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert proxy.app[STATE].connections.head_timeouts == 0


@pytest.mark.parametrize("kept_alive", [True, False])
async def test_a_head_begun_is_not_cut_by_the_keepalive_timer(
    proxy_factory: Any, kept_alive: bool
) -> None:
    """README: the head must be complete --header-timeout after its first byte. aiohttp's
    keep-alive timer (from the last answer, or from the connection's start) closed the
    connection under a head that had begun, whatever the header timeout."""
    proxy = await proxy_factory(header_timeout=4.0, keepalive_timeout=1.0)
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: 0123456789abcdef\r\n\r\n"
    try:
        if kept_alive:
            writer.write(health)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            await asyncio.sleep(0.6)  # idle, then a head begins before the timer's 1 s
        await send_slowly(writer, health, over=2.0)  # ends well past the keep-alive timer
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        writer.close()


async def test_a_head_timeout_is_logged_as_no_request(
    proxy_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that reads its body resumes the socket's reading from its own task, so
    asyncio runs every later read of the connection in a copy of that request's
    context: the head timer of the next head, armed there, logged its timeout as the
    request before (probe reprobe8 F5's class). Timers are armed in no request's context."""
    caplog.set_level(logging.INFO, logger="s3proxy")
    caplog.handler.addFilter(RequestIdFilter())
    proxy = await proxy_factory(header_timeout=1.0, keepalive_timeout=5.0)
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(12 * MiB))])
    writer.write(bodies.request_head(len(raw), b"X-Request-ID: first-request") + raw)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 201 "), head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # and no more: the head times out
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at the head timeout
    writer.close()
    timeouts = [r for r in caplog.records if r.getMessage().startswith("connections.head_timeout")]
    assert [getattr(r, "request_id", None) for r in timeouts] == ["-"]


SIGN_BODY = b'{"filename": "a.txt", "size": 3}'
SIGN = (
    b"POST /sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(SIGN_BODY) + SIGN_BODY
)
SIGN_CHUNKED = (
    b"POST /sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(SIGN_BODY) + SIGN_BODY + b"\r\n0\r\n\r\n"
)
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "sent",
    [
        HEALTH + b"GET /healthz HTTP/1.1\r\n",
        SIGN + b"GET /healthz HTTP/1.1\r\n",  # after a body
        SIGN_CHUNKED + b"GET /healthz HTTP/1.1\r\n",
        SIGN + b"GET /healthz\r\n",  # a 0.9 line after a body: not judged early, timed
        HEALTH + b"\r\n",
    ],
    ids=["after-get", "after-body", "after-chunked-body", "0.9-after-body", "crlf"],
)
async def test_a_head_begun_in_the_read_of_a_request_is_due_at_the_header_timeout(
    proxy_factory: Any, sent: bytes
) -> None:
    """Probe reprobe9b F5: a partial head in the same read as a whole request was held
    for --keepalive-timeout (15 s), not --header-timeout (3 s): the head timer was
    cancelled by the request's head and not armed again for the next one."""
    proxy = await proxy_factory(header_timeout=1.0, keepalive_timeout=30.0)
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        writer.write(sent)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 201 ")), head
        # then closed at the head timeout (1 s), long before the keep-alive's 30 s
        rest = await asyncio.wait_for(reader.read(), 10)
        assert b"HTTP/1.1" not in rest, rest  # no answer to the head that never ended
    finally:
        writer.close()


@pytest.mark.parametrize(
    "first",
    [HEALTH, SIGN, SIGN_CHUNKED],
    ids=["after-get", "after-body", "after-chunked-body"],
)
async def test_a_head_begun_in_the_read_of_a_request_outlives_a_shorter_keepalive(
    proxy_factory: Any, first: bytes
) -> None:
    """Probe reprobe10b N4: with --keepalive-timeout below --header-timeout, a head begun
    in the same read as a request was cut at the keep-alive timeout (aiohttp's timer,
    armed after the answer): README gives it --header-timeout from its first byte."""
    proxy = await proxy_factory(header_timeout=4.0, keepalive_timeout=1.0)
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        writer.write(first + b"GET /healthz HTTP/1.1\r\n")
        await writer.drain()
        for _ in range(2):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 201 ")), head
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            if first:
                first = b""
                await asyncio.sleep(2.0)  # past the keep-alive timeout, within the head's
                writer.write(b"Host: x\r\n\r\n")
                await writer.drain()
    finally:
        writer.close()
