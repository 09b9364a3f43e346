"""The process-wide memory budget: an async semaphore counted in bytes.

Every part buffer is reserved here before a byte of it is read from the client,
so when the budget is spent the proxy simply stops reading sockets and TCP pushes
back on the clients. Waiters are served in order of priority, then arrival, and
nobody overtakes the head of the line, so a large reservation is not starved by
small ones. Uploads ask with their start time as priority: one already under way
gets its next part before a newer one gets its first, so few uploads are half-read
at once (each holds socket and parser buffers outside the budget) and the oldest
finish first.

No deadlock: a reservation is taken whole before its part is filled, so every
holder either is filling a part from its own client or has a part uploading to
S3; both finish without needing more budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from types import TracebackType


class MemoryBudget:
    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("memory budget must be positive")
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self.wait_seconds = 0.0
        self._waiters: list[tuple[float, int, int, asyncio.Future[None]]] = []  # a heap
        self._seq = itertools.count()

    @property
    def available(self) -> int:
        return self.limit - self.in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def can_take(self, n: int) -> bool:
        """Would ``acquire(n)`` return without waiting?"""
        return not self._waiters and n <= self.available

    async def acquire(self, n: int, priority: float = 0.0) -> Reservation:
        """Wait until ``n`` bytes are free and take them; lower ``priority`` goes first."""
        if n > self.limit:
            raise ValueError(f"reservation of {n} bytes exceeds the budget of {self.limit}")
        if not self._waiters and n <= self.available:
            self._take(n)
            return Reservation(self, n)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (priority, next(self._seq), n, fut)
        heapq.heappush(self._waiters, entry)
        started = time.monotonic()
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                # Granted just as we were cancelled: give it back.
                self._give(n)
            else:
                # Cancelled before being granted. A wake-up between the cancellation and
                # this line may already have dropped the entry (its future was done).
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                    heapq.heapify(self._waiters)
                self._wake()  # whoever waited behind this entry may fit now
            raise
        finally:
            self.wait_seconds += time.monotonic() - started
        return Reservation(self, n)

    def _take(self, n: int) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)

    def _give(self, n: int) -> None:
        self.in_use -= n
        assert self.in_use >= 0, "budget released more than was taken"
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][2] <= self.available:
            _, _, n, fut = heapq.heappop(self._waiters)
            if not fut.done():
                self._take(n)
                fut.set_result(None)


class Reservation:
    """Bytes held from the budget; shrink to what a short part needs, release once."""

    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self._budget = budget
        self.size = size

    def shrink(self, size: int) -> None:
        if size < self.size:
            freed = self.size - size
            self.size = size
            self._budget._give(freed)

    def release(self) -> None:
        if self.size:
            size, self.size = self.size, 0
            self._budget._give(size)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
