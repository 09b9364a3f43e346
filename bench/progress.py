"""What the run says while it goes: log lines and a one-line progress bar, on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bar:
    """A one-line progress bar on stderr (a plain line per cell when stderr is no TTY)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.label = ""
        self.cell_bytes: Callable[[], int] = lambda: 0
        self.cell_t0 = time.perf_counter()
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.tty:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.render()
            await asyncio.sleep(0.25)

    def render(self) -> None:
        cur = self.cell_bytes()
        done = self.done + cur
        frac = min(1.0, done / self.total) if self.total else 1.0
        rate = cur / max(1e-6, time.perf_counter() - self.cell_t0) / 1e6
        el = int(time.perf_counter() - self.t0)
        bar = "#" * int(frac * 24)
        sys.stderr.write(
            f"\r[{bar:<24}] {frac:4.0%} {done / 2**30:6.2f}/{self.total / 2**30:.2f}"
            f" GiB {rate:6.1f} MB/s {el // 60}:{el % 60:02d}  {self.label:<44}"
        )
        sys.stderr.flush()

    def cell(self, label: str, current: Callable[[], int]) -> None:
        self.label = label
        self.cell_bytes = current
        self.cell_t0 = time.perf_counter()

    def finish_cell(self, nbytes: int, line: str) -> None:
        self.done += nbytes
        self.cell_bytes = lambda: 0
        if self.tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
        log(line)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            sys.stderr.write("\r" + " " * 110 + "\r")
