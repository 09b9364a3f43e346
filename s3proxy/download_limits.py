"""What bounds a streamed download: its writes to the client, and how many run at once.

Why: a download holds one connection of the S3 pool until its last byte is written,
and a write waits for as long as the client does not read. Without a deadline a client
that sends its GET and never reads holds that connection for ever; 64 of them took the
whole pool, and /readyz, tus and every other download with it. This is the download's
side of ``form.ClientWatch`` (which bounds how slowly a client may *send*):

* **idle**: once ``idle_timeout`` seconds of client time pass without the client
  accepting a byte, the download is cut off;
* **rate**: once a full ``rate_window`` of client time has carried less than ``min_rate``
  bytes per second (``limits.RateMeter``; the first window is grace), likewise;
* **slots**: at most ``download_slots(pool)`` GetObject streams at once, so that slow but
  valid readers (phones on big files) never take the connections /readyz's HeadBucket,
  tus state reads and HEAD /files need. A download over the cap waits ``SLOT_WAIT``
  seconds for a slot, then is answered 503 OVERLOADED with Retry-After.

*Client time* is time spent inside a write, waiting for the client to take bytes (a
write returns at once while the socket's buffers have room). Time spent reading from S3
is the proxy's, never held against the client. *Accepted* bytes are those handed to the
socket minus what still waits in asyncio's buffer: the kernel's buffers count as taken,
which is bounded and what the client's TCP window allowed.

Cost per chunk: two clock reads. One timer chain per download (not one per write) ticks
at most once a second to judge; a verdict expires an ``asyncio.timeout`` around the
whole write loop, so the cancellation lands and is told apart from others the way
asyncio's own timeouts are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from s3proxy.errors import OVERLOADED, ProxyError
from s3proxy.limits import RateMeter

# Seconds a download waits for a slot before its 503: long enough to ride out a burst
# (a slot frees as soon as any download ends or is cut off), short next to a client's
# own timeout. Retry-After says when to ask again.
SLOT_WAIT = 5.0
RETRY_AFTER = 5


def download_slots(pool: int) -> int:
    """How many downloads may stream at once from a pool of ``pool`` S3 connections: a
    quarter (at least one) is kept back for the short calls (HeadBucket, HeadObject, tus
    state, an upload's Create/Complete). Settings refuse a pool of one, which would
    keep nothing back."""
    return max(1, pool - max(1, pool // 4))


@dataclass(frozen=True)
class DownloadLimits:
    """--client-timeout, --min-download-rate, --min-rate-window; the slots from
    --s3-max-connections. The defaults are the settings' defaults."""

    idle_timeout: float = 60.0  # seconds of client time without accepting a byte
    min_rate: float = 32 * 1024  # bytes/s over rate_window of client time
    rate_window: float = 30.0
    slots: int = download_slots(64)  # GetObject streams at once
    slot_wait: float = SLOT_WAIT


class SlotsFull(ProxyError):
    """No download slot came free within the wait: 503 OVERLOADED, with Retry-After."""


class DownloadSlots:
    """At most ``size`` downloads stream at once (see the module); FIFO, as asyncio's
    Semaphore wakes its waiters in order."""

    def __init__(self, size: int, wait: float = SLOT_WAIT) -> None:
        self.size = size
        self.wait = wait
        self.in_use = 0
        self._free = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot inside; SlotsFull after ``wait`` seconds without one."""
        try:
            async with asyncio.timeout(self.wait):
                await self._free.acquire()
        except TimeoutError:
            raise SlotsFull(
                OVERLOADED,
                f"{self.size} {'download is' if self.size == 1 else 'downloads are'} "
                "streaming, the most this instance serves at "
                "once; try again shortly",
            ) from None
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self._free.release()


class ClientStalled(Exception):
    """The client took too long to accept a download's bytes; ``reason`` is ``idle`` or
    ``slow``. Not a ProxyError: the status line is out, so there is nothing to answer."""

    def __init__(self, reason: str, accepted: int) -> None:
        super().__init__(f"client {reason} after accepting {accepted} bytes")
        self.reason = reason
        self.accepted = accepted


class WriteWatch:
    """The idle timeout and minimum rate of one download's writes (see the module).

    ``buffered`` says how many bytes still wait in the transport's buffer (asyncio's
    ``get_write_buffer_size``). Use::

        async with watch.watching():
            await watch.write(response.write(chunk), len(chunk))

    ``watching`` raises ClientStalled when the client was cut off.
    """

    MIN_TICK = 0.05
    MAX_TICK = 1.0

    def __init__(
        self,
        buffered: Callable[[], int],
        idle_timeout: float,
        min_rate: float,
        rate_window: float,
    ) -> None:
        self._buffered = buffered
        self._idle = idle_timeout
        self._min_rate = min_rate
        self._tick_every = max(self.MIN_TICK, min(self.MAX_TICK, idle_timeout / 8, rate_window / 8))
        self.given = 0  # bytes handed to the socket
        self._accepted = 0  # the most the client has been seen to take
        self._client_time = 0.0  # seconds inside finished writes
        self._writing_since: float | None = None  # loop time the pending write began
        self._progress_at = 0.0  # client time when the client last took a byte
        self._meter = RateMeter(rate_window)
        self._verdict: ClientStalled | None = None
        self._deadline: asyncio.Timeout | None = None
        self._ticker: asyncio.TimerHandle | None = None

    @property
    def accepted(self) -> int:
        return self._accepted

    async def write(self, sending: Awaitable[None], size: int) -> None:
        """Await one write of ``size`` bytes (already handed over when ``sending`` is
        awaited: aiohttp writes to the transport, then waits for it to drain)."""
        loop = asyncio.get_running_loop()
        self.given += size
        began = self._writing_since = loop.time()
        try:
            await sending
        finally:
            self._writing_since = None
            self._client_time += loop.time() - began

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Judge the writes inside; ClientStalled once the client is cut off."""
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_at(loop.time() + self._tick_every, self._tick)
        try:
            async with asyncio.timeout(None) as deadline:
                self._deadline = deadline
                yield
        except TimeoutError:
            if self._verdict is None:
                raise  # not ours
            raise self._verdict from None
        finally:
            self._deadline = None
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._ticker = None
        now = loop.time()
        since = self._writing_since
        clock = self._client_time + (now - since if since is not None else 0.0)
        # Header bytes go out with the first chunk, so this can dip by a few hundred
        # bytes at the start: the most seen is what counts.
        accepted = self.given - self._buffered()
        if accepted > self._accepted:
            self._accepted, self._progress_at = accepted, clock
        elif clock - self._progress_at >= self._idle - 0.001:  # a timer may run a hair early
            return self._cut("idle")
        if clock > self._meter.last:
            self._meter.add(clock, self._accepted)
            if self._meter.too_slow(clock, self._min_rate):
                return self._cut("slow")
        self._ticker = loop.call_at(now + self._tick_every, self._tick)

    def _cut(self, reason: str) -> None:
        """Expire the deadline now: the task is cancelled wherever it waits, and
        ``watching`` turns that into ClientStalled."""
        self._verdict = ClientStalled(reason, self._accepted)
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time())
