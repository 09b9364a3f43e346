"""Child processes and what /proc says about them.

Every design runs as its own process so that its memory, CPU and disk writes can be read from
/proc without the harness's own work mixed in. CPU and write_bytes are read as deltas around a
cell (startup is not charged); RSS and open temp files are sampled, since only the peak matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the child binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (via /proc/PID/task/TID/children)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 10_000:
        p = todo.pop()
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            text = _read(f"/proc/{p}/task/{tid}/children")
            if text:
                todo.extend(int(c) for c in text.split())
    return out


def process_cpu_clock(pid: int) -> int:
    """The clock id of another process's CPU time (Linux's MAKE_PROCESS_CPUCLOCK(pid, SCHED)),
    which Python's ``time`` has no call for: ``clock_getcpuclockid`` made by hand."""
    return (~pid << 3) | 2


def cpu_seconds(pid: int) -> float:
    """CPU time of the process tree (all threads, live and ended), plus what reaped children
    of the root already used.

    Each process's own time is read from its CPU clock, to the nanosecond: /proc's utime and
    stime count 10 ms ticks, which a cell of a few MiB can spend entirely between two ticks
    (a floor of 0 s made its ratio unknowable). Ticks are the fallback where the clock is
    refused; reaped children exist only as ticks.
    """
    total = 0.0
    for i, p in enumerate(tree(pid)):
        text = _read(f"/proc/{p}/stat")
        if text is None:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        # fields[11..14] are utime, stime, cutime, cstime (proc(5) fields 14-17)
        try:
            total += time.clock_gettime(process_cpu_clock(p))
        except OSError:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        if i == 0:
            total += (int(fields[13]) + int(fields[14])) / CLK_TCK
    return total


def write_bytes(pid: int) -> int:
    """Bytes the tree caused to be sent to storage (/proc/PID/io write_bytes)."""
    total = 0
    for p in tree(pid):
        text = _read(f"/proc/{p}/io")
        for line in (text or "").splitlines():
            if line.startswith("write_bytes:"):
                total += int(line.split()[1])
    return total


def io_chars(pid: int) -> tuple[int, int]:
    """(rchar, wchar) of one process: bytes through read/write calls, sockets included."""
    text = _read(f"/proc/{pid}/io") or ""
    values = dict(line.split(": ") for line in text.splitlines() if ": " in line)
    return int(values.get("rchar", 0)), int(values.get("wchar", 0))


def machine_busy_seconds() -> float:
    """CPU-seconds all CPUs spent not idle since boot (/proc/stat; iowait counts as idle)."""
    text = _read("/proc/stat") or ""
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            # user nice system idle iowait irq softirq steal (guest is inside user)
            return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK
    return 0.0


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for p in pids:
        text = _read(f"/proc/{p}/statm")
        if text:
            total += int(text.split()[1]) * PAGE
    return total


def hwm_bytes(pid: int) -> int:
    """The kernel's own peak RSS of one process (VmHWM), exact where sampling may miss."""
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def temp_files(pids: Sequence[int], tmpdir: str) -> tuple[int, int]:
    """(count, bytes) of regular files held open that are deleted or under the temp dir.

    fds 0, 1 and 2 are left out: they are the process's standard streams, which the harness
    gives it (pipes and /dev/null), not files it opened.
    """
    count = size = 0
    for p in pids:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for fd in fds:
            if fd in ("0", "1", "2"):
                continue
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
                if not target.startswith("/"):
                    continue
                if not (target.endswith(" (deleted)") or target.startswith(tmpdir)):
                    continue
                st = os.stat(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                count += 1
                size += st.st_size
    return count, size


@dataclass
class Usage:
    """What one process tree used during a measured window."""

    cpu_s: float = 0.0
    write_bytes: int = 0
    peak_rss: int = 0
    peak_tmp_bytes: int = 0
    peak_tmp_files: int = 0


@dataclass
class Sampler:
    """Samples a process tree's RSS and open temp files while a cell runs."""

    pid: int
    interval: float = 0.05
    # The store is one process that opens no temp files of interest: sampling just its RSS
    # spares the harness a walk over its ~100 threads and fds 20 times a second.
    whole_tree: bool = True
    tmpdir: str = field(default_factory=lambda: os.path.realpath(tempfile.gettempdir()))
    usage: Usage = field(default_factory=Usage)
    _cpu0: float = 0.0
    _wb0: int = 0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._cpu0 = cpu_seconds(self.pid)
        self._wb0 = write_bytes(self.pid)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def sample(self) -> None:
        u = self.usage
        if not self.whole_tree:
            u.peak_rss = max(u.peak_rss, rss_bytes([self.pid]))
            return
        pids = tree(self.pid)
        u.peak_rss = max(u.peak_rss, rss_bytes(pids))
        n, b = temp_files(pids, self.tmpdir)
        u.peak_tmp_files = max(u.peak_tmp_files, n)
        u.peak_tmp_bytes = max(u.peak_tmp_bytes, b)

    async def stop(self) -> Usage:
        """Take the last sample and the deltas; call before the process exits."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()
        u = self.usage
        u.peak_rss = max(u.peak_rss, hwm_bytes(self.pid))
        u.cpu_s = cpu_seconds(self.pid) - self._cpu0
        u.write_bytes = write_bytes(self.pid) - self._wb0
        return u


PIPE_LINE_LIMIT = 16 << 20  # longest line read from a child's stdout


class Child:
    """A supervised child process whose output the harness relays into a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        log_dir: Path,
        cwd: Path | None = None,
        pipes: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.log_path = log_dir / f"{name}.log"
        self.cwd = cwd
        self.pipes = pipes
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._relays: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        """Start the child; its stdout (unless piped to us) and stderr are relayed to the log.

        The child writes its output into pipes, and the harness copies it into the log file,
        so the child's /proc/PID/io ``write_bytes`` and its open files show only what the
        design itself writes (its logging would otherwise count as disk writes, and a log
        under the temp dir as a temp file).
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=asyncio.subprocess.PIPE if self.pipes else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            # the direct design answers a job in one JSON line: 1,000 uploads are ~150 kB
            limit=PIPE_LINE_LIMIT,
        )
        streams = [self.proc.stderr] if self.pipes else [self.proc.stdout, self.proc.stderr]
        self._relays = [asyncio.create_task(self._relay(s)) for s in streams if s is not None]

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        """Copy one of the child's output pipes into the log file until EOF."""
        while chunk := await stream.read(1 << 16):
            if self._log is not None:
                self._log.write(chunk)
                self._log.flush()

    async def wait_http(self, url: str, limit_s: float = 60.0) -> None:
        """Poll ``url`` until it answers 200; fail early if the process dies."""
        deadline = time.monotonic() + limit_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}; see {self.log_path}"
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise TimeoutError(
            f"{self.name} not ready at {url} after {limit_s:.0f}s; see {self.log_path}"
        )

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; the whole process group."""
        proc = self.proc
        try:
            if proc is None or proc.returncode is not None:
                return None if proc is None else proc.returncode
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                return await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return await proc.wait()
        finally:
            # The pipes reach EOF once the whole process group has exited; a grandchild
            # that outlived it must not hold us up.
            if self._relays:
                _, pending = await asyncio.wait(self._relays, timeout=5)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*self._relays, return_exceptions=True)
                self._relays = []
            if self._log is not None:
                self._log.close()
                self._log = None
