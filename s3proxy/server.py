"""Run the app: listen, wait for SIGTERM/SIGINT, drain, clean up; or supervise workers.

A rolling restart by plain SIGTERM needs no help from the load balancer (issue #14):

1. for ``--drain-delay`` (the "preStop sleep"), ``/readyz`` answers 503 while every
   request is still served, each response with ``Connection: close``, so load
   balancers that check readiness stop routing here and drop their kept-alive
   connections; a second signal ends the delay;
2. the listening socket closes: a new connection is refused, which every load
   balancer retries on another server (nginx's passive checks included), where a
   503 to a POST whose body it began to send is never retried;
3. drain (``app.drain``): idle connections are closed, uploads in flight get
   ``--shutdown-timeout`` to finish, then are cancelled, which aborts them;
4. only then aiohttp closes what is left. Not ``web.run_app``: on shutdown it marks
   every connection closing and then discards the bytes that arrive on it, so an
   upload in flight could never finish in its grace period.

Before listening it raises its soft ``RLIMIT_NOFILE`` to the hard limit (often 1,024
soft against far more hard) and fits ``--max-connections`` under it
(``connection_cap``), so running out of descriptors stays something that does not
happen; if accept() fails for want of them anyway, that is one log line a second.

With ``--workers N`` the first process starts N copies of itself that share the
port (SO_REUSEPORT; the kernel spreads connections), forwards signals to them and
restarts one that dies. With the embedded store, the store runs once, here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from s3proxy.app import create_app, create_operator_app, drain, embedded_store, log_ready
from s3proxy.log import loop_exception_handler
from s3proxy.protocol import HEALTH_RESERVE
from s3proxy.settings import (
    Settings,
    SettingsError,
    parse_listen,
    unknown_variables,
    url_host,
    worker_listen,
)
from s3proxy.state import AUTO_DRAIN_DELAY, STATE

log = logging.getLogger("s3proxy.server")
# Loop turns spent taking the connections waiting in the backlog before the listener
# closes (asyncio accepts up to 100 a turn; more keep coming only under a flood).
ACCEPT_TURNS = 10
SETTLE_TURNS = 4
T = TypeVar("T")

# Seconds aiohttp gives connections after drain: drain has already waited for requests
# (--shutdown-timeout); what is left is a client not reading the answer it was sent, or
# one still sending a body nobody reads (aiohttp lingers 10 s for it). Not 5 s more.
EXIT_GRACE = 1.0
# Descriptors besides client connections and the S3 pool: stdio, the event loop, the
# listeners, the embedded store's pipes, the presigner's and the webhook's few sockets.
OTHER_FDS = 32
S3_POOLS = 3  # connection pools of --s3-max-connections each (see connection_cap)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop ``--event-loop`` asks for: ``uvloop`` (libuv; less CPU per byte
    relayed), ``asyncio`` (the standard library's), ``auto`` (uvloop when installed).

    Raises SettingsError when uvloop is asked for and cannot be imported."""
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise SettingsError(f"--event-loop uvloop: uvloop cannot be imported ({exc})") from None
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def settle_heap() -> None:
    """Move what start-up made (modules, botocore's S3 model: ~10^6 objects) out of the
    collector's sight: a full collection then walks only what requests made.

    Measured: the first full collection after start, during the first 1 GiB upload,
    took 0.15 CPU s; with the start-up heap frozen it takes ~nothing (README Benchmarks)."""
    gc.collect()
    gc.freeze()


def run_in_loop(settings: Settings, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` to its end in a new event loop of the kind the settings choose."""
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        return runner.run(main())


def raise_nofile() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target, hard
        except (ValueError, OSError):
            pass
    return soft, soft, hard


def connection_cap(max_connections: int, nofile: int, s3_pool: int) -> int:
    """The most client connections that fit in ``nofile`` descriptors, at most the one
    asked for: each takes one, and the health reserve, the S3 pools (botocore's, the
    presigner's and the lean sender's, ``s3proxy.s3_parts``) and the rest
    (``OTHER_FDS``) must still fit. At least 1."""
    room = nofile - HEALTH_RESERVE - S3_POOLS * s3_pool - OTHER_FDS
    return max(1, min(max_connections, room))


@dataclass(frozen=True)
class FdLimit:
    before: int  # the soft limit the process started with
    soft: int
    hard: int
    asked: int  # --max-connections
    cap: int  # what fits


def fit_to_fd_limit(settings: Settings) -> tuple[Settings, FdLimit]:
    """Raise the fd limit and lower ``max_connections`` to what fits."""
    before, soft, hard = raise_nofile()
    cap = connection_cap(settings.max_connections, soft, settings.s3_max_connections)
    fds = FdLimit(before, soft, hard, settings.max_connections, cap)
    return dataclasses.replace(settings, max_connections=cap), fds


def log_fds(fds: FdLimit) -> None:
    """Say what the fd limit is (once listening: a failed start stays one line)."""
    log.info(
        "proxy.fds nofile_soft=%d->%d nofile_hard=%d max_connections=%d",
        fds.before,
        fds.soft,
        fds.hard,
        fds.cap,
    )
    if fds.cap < fds.asked:
        log.warning(
            "proxy.max_connections_lowered asked=%d fits=%d nofile=%d: raise the hard "
            "limit (ulimit -Hn, LimitNOFILE=) for more",
            fds.asked,
            fds.cap,
            fds.soft,
        )


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _forget_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)


class ListenError(Exception):
    """The proxy's own port cannot be listened on (taken, not permitted, no such host)."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        # aiohttp rewraps bind errors with the address in strerror; the errno says it
        # shorter. getaddrinfo errors (unknown host) have negative codes of their own.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
        reason = reason or str(exc)
        super().__init__(f"cannot listen on {host}:{port}: {reason}")


async def serve(settings: Settings) -> None:
    asyncio.get_running_loop().set_exception_handler(loop_exception_handler())
    settings, fds = fit_to_fd_limit(settings)
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=EXIT_GRACE,
    )
    operator: web.AppRunner | None = None
    stop = _stop_event()
    state = app[STATE]
    store_stopping: asyncio.Task[None] | None = None
    try:
        await runner.setup()  # opens the S3 client; starts the embedded store if any
        site = await _listen(runner, settings.host, settings.port, settings.reuse_port)
        state.store_check.start(state.check_s3)  # what /readyz answers from
        settle_heap()
        if settings.metrics_listen is not None:
            host, port = parse_listen(settings.metrics_listen)
            operator = web.AppRunner(
                create_operator_app(app), handle_signals=False, shutdown_timeout=EXIT_GRACE
            )
            await operator.setup()
            await _listen(operator, host, port, reuse_port=False)  # each worker its own
            log.info("proxy.operator_listen url=http://%s:%d/metrics", url_host(host), port)
        log_fds(fds)
        settings.log_warnings()
        loop = asyncio.get_running_loop()
        log.info("proxy.event_loop loop=%s.%s", type(loop).__module__, type(loop).__name__)
        log_ready(app)
        await stop.wait()
        delay = state.drain_delay
        state.begin_stopping()
        log.info(
            "proxy.stopping signal received drain_delay=%gs uploads=%d: /readyz answers 503, "
            "requests are still served",
            delay,
            len(state.uploads),
        )
        if delay > 0:
            stop.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)  # a second signal: no more delay
        await close_listener(site)  # new connections are refused; the operator listener stays
        log.info("proxy.listener_closed new connections are refused")
        await drain(state)
        if state.store is not None:
            # Nothing calls S3 once drain is over: the store's own stop (about 1.1 s:
            # weed's filer waits 1 s for its streams) overlaps aiohttp's EXIT_GRACE for
            # the connections still open, rather than following it.
            store_stopping = asyncio.create_task(state.store.stop(), name="store-stop")
    finally:
        await runner.cleanup()  # stops the store (again: stop() is idempotent)
        if store_stopping is not None:
            await store_stopping
        if operator is not None:
            await operator.cleanup()
        _forget_signals()
    log.info("proxy.stopped")


async def close_listener(site: web.BaseSite) -> None:
    """Close the listening socket, once the loop has taken the connections the kernel
    already completed for it.

    Closing a listener resets the connections waiting in its backlog, and their clients
    have sent their requests (a load balancer sends at once): they got a reset instead of
    an answer (nginx: 502 "Connection reset by peer while reading response header", once
    in a rolling restart). Taken first, they are served, or told 503 SHUTTING_DOWN, as
    the drain decides. asyncio accepts what is waiting each time the loop turns.
    """
    server = getattr(site, "_server", None)  # aiohttp's asyncio.Server, once started
    sockets = list(getattr(server, "sockets", None) or ())
    for sock in sockets:
        refuse_handshakes(sock)
    for _ in range(ACCEPT_TURNS):
        if not any(_readable(sock) for sock in sockets):
            break  # nothing waits, and nothing can come before the close: no await between
        await asyncio.sleep(0)  # asyncio accepts what waits
        # asyncio makes an accepted socket's transport in a task of its own, attached to
        # the listener: closed first, it drops the socket. A few turns see it made and
        # connection_made run (the connection joins the drain's count). Where the filter
        # is not available (refuse_handshakes False), a connection that came meanwhile is
        # in the backlog: the next look takes it (e40d0a9).
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)
    await site.stop()  # closes the listener before its first await


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# A classic BPF program of one instruction, "return 0": drop every packet (linux/filter.h:
# BPF_RET | BPF_K). Module-level: the kernel copies it at setsockopt, from this address.
_DROP_ALL = (_SockFilter * 1)(_SockFilter(0x06, 0, 0, 0))
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # Linux's value


def refuse_handshakes(sock: Any) -> bool:
    """Make the listening socket drop every packet of a handshake not yet complete
    (SO_ATTACH_FILTER; Linux runs a listener's filter on SYNs and handshake ACKs), so no
    connection joins its backlog from now on; True if it does. Without it a connection
    the kernel completed between ``close_listener``'s last look and the close was reset,
    its request sent (CI: nginx's 502 "Connection reset by peer", a rolling restart with
    nginx's least_conn sending every new request to the instance with no connections,
    the one stopping). A client dropped so sends its SYN again (after 1 s on Linux) and
    then finds the listener closed: refused, which a load balancer retries elsewhere.
    Elsewhere than Linux it does nothing, and the close keeps that narrow race."""
    prog = _SockFprog(1, _DROP_ALL)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(prog))
    except (OSError, AttributeError):
        return False
    return True


def _readable(sock: Any) -> bool:
    """A listening socket is readable while connections wait in its backlog."""
    try:
        return bool(select.select([sock.fileno()], [], [], 0)[0])
    except (OSError, ValueError):
        return False


async def _listen(runner: web.AppRunner, host: str, port: int, reuse_port: bool) -> web.TCPSite:
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(host, port, exc) from exc
    return site


@dataclass
class Worker:
    proc: asyncio.subprocess.Process
    started: float


async def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.workers`` serve processes on one port; return the exit status."""
    unknown = set(unknown_variables(os.environ))  # warned of once, here, not per worker
    env = {k: v for k, v in os.environ.items() if k not in unknown}
    store = None
    if settings.embedded:
        store = embedded_store(settings)
        # Restarted here when weed dies (the workers find it on the same port again);
        # each worker's /readyz sees the outage through its own S3 check.
        await store.start()
        env.update(
            S3PROXY_ENDPOINT_URL=store.endpoint_url,
            S3PROXY_BUCKET=settings.bucket_name,
            AWS_ACCESS_KEY_ID=store.access_key,
            AWS_SECRET_ACCESS_KEY=store.secret_key,
        )
    stop = _stop_event()
    delay = AUTO_DRAIN_DELAY if settings.drain_delay is None else settings.drain_delay
    workers: list[Worker] = []
    status = 0
    try:
        workers = [
            await _spawn(_worker_argv(argv, settings, i), env) for i in range(settings.workers)
        ]
        log.info("workers.started count=%d port=%d", settings.workers, settings.port)
        while not stop.is_set():
            exits = {asyncio.ensure_future(w.proc.wait()): i for i, w in enumerate(workers)}
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([stopper, *exits], return_when=asyncio.FIRST_COMPLETED)
            for fut in [stopper, *exits]:
                fut.cancel()
            for fut in done:
                if fut is stopper or stop.is_set():
                    continue
                i = exits[fut]
                dead = workers[i]
                log.error("worker.exited index=%d code=%s", i, dead.proc.returncode)
                early = time.monotonic() - dead.started < START_GRACE
                if early and dead.proc.returncode in (1, 2):
                    status = 1  # it could not start (port taken, bad setting): give up
                    stop.set()
                else:
                    workers[i] = await _spawn(_worker_argv(argv, settings, i), env)
    finally:
        for w in workers:
            if w.proc.returncode is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.proc.wait(), delay + settings.shutdown_timeout + 15)
        if store is not None:
            await store.stop()
        _forget_signals()
    return status


START_GRACE = 5.0  # a worker failing at start (exit 1/2) within this is not restarted


def _worker_argv(argv: Sequence[str], settings: Settings, index: int) -> list[str]:
    """Worker ``index``'s command line: the supervisor's, and its own metrics port."""
    if settings.metrics_listen is None:
        return list(argv)
    return [*argv, "--metrics-listen", worker_listen(settings.metrics_listen, index)]


async def _spawn(argv: Sequence[str], env: dict[str, str]) -> Worker:
    from s3proxy.embedded import parent_death_signal

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "s3proxy",
        *argv,
        "--workers",
        "1",
        "--reuse-port",
        "true",
        env=env,
        preexec_fn=parent_death_signal(),
    )
    return Worker(proc, time.monotonic())
