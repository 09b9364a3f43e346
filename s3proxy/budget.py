"""The process-wide memory budget: an async semaphore counted in bytes, kept fair.

Every part buffer is reserved here before a byte of it is read from the client,
so when the budget is spent the proxy simply stops reading sockets and TCP pushes
back on the clients. Waiters are served in order of priority, then arrival, and
nobody overtakes the head of the line, so a large reservation is not starved by
small ones. Uploads ask with their start time as priority: one already under way
gets its next part before a newer one gets its first, so few uploads are half-read
at once (each holds socket and parser buffers outside the budget) and the oldest
finish first.

No deadlock: a part's reservation is taken whole before its part is filled, so
every part holder either is filling a part from its own client or has a part
uploading to S3; both finish without needing more budget. Side reservations (a
request's form-field bytes, ``side_cap``) may be held by a request that then waits
for a part, so their total is capped below ``limit - largest part``: once the part
holders are done, the head of the line always fits. A side reservation first waits
for room under its cap (apart from the line, so it never blocks a part), then
joins the line holding nothing.

Fairness (issue #11). Whole-part reservations let a slow client pin a part's
worth of memory: three clients sending 6 B/s held 15 of 16 MiB, and everyone else
waited out the idle timeout. Three mechanisms, chosen over the alternatives:

- The pipeline asks for a part's memory only once the part's first bytes have
  arrived (``pipeline.PROBE_BYTES``): a trickling client never queues here at all.
- A minimum data rate for every request (``--min-upload-rate`` over a window of
  client time, s3proxy.limits and form.ClientWatch): no client can hold anything
  forever, and it bounds how long an upload lives (the orphan sweep's figure).
- Eviction under pressure: once the head of the line has waited ``PATIENCE``
  seconds, the budget asks each part holder how fast it is filling its part and
  evicts (408 through the normal error path: the upload aborts and rolls back)
  every one that has held its part for ``MIN_HELD`` seconds and filled it slower
  than the minimum rate over the last ``MIN_HELD`` seconds. A holder whose part is
  uploading to S3 is never evicted: it releases on S3's answer. Without waiters
  nobody is evicted, so a slow client on an idle proxy only meets the rate window.

Slow clients in the line (hostile probe, finding 2). A client may pass the probe at
full speed and trickle after it: it then waits in the line, where waiting is the
proxy's time and nothing judged it, until it got a part and held it ``MIN_HELD``.
With the oldest served first, every budget's worth of such clients queued ahead of a
normal upload delayed it by ``MIN_HELD`` more (6 parts of a 32 MiB budget: 30
tricklers 6.4 s, 120 tricklers 36 s, against 0.25 s). While it waits, the proxy
does not read its socket, so what its client sends piles up in the kernel, where it
can be seen (``WaiterState``): the bytes, and whether the kernel closed the receive
window (the client waits on us). Two rules, both decided by pure functions:

- Ready first (``grant``): a waiter is ready when its client is held back by us (the
  kernel closed its receive window; without TCP_INFO's window, ``READY_BYTES``
  piled up), or has sent all its part needs, or its body's end. A client held back
  by this very backpressure is ready (its kernel buffer fills in a moment), so ready
  waiters keep their order by age, and the oldest ready one is
  the head of the line: nobody overtakes it, so a large part is not starved by
  small ones. Unready waiters are served only when no ready one waits (the memory
  would sit idle), in order too; not one whose body's end is still being looked for
  (``readiness``): that look ends within a few passes (s3proxy.body_end), and then it
  is ready or is judged.
- Slow waiters time out (``choose_expired``): an unready waiter whose client sent
  below its minimum rate over the last ``MIN_HELD`` of its wait gets a 408 without
  ever holding a part. Its kernel buffer had room all along, so the slowness is the
  client's. Silence is judged when the body is known to owe bytes. Whether it does is
  known, not guessed, for every body the proxy's own connection reads
  (s3proxy.body_end): a Content-Length as sent (coded or not) against the bytes that
  came, a chunked body's last chunk looked for in the kernel's unread bytes. Only a
  body whose end cannot be seen (past the look's bound, or another server's
  connection) still counts as ready once silent for a window. Guessing that for every
  chunked or coded body let each budget's worth of silent ones queued ahead of a
  normal upload delay it ``MIN_HELD`` more (12 of them ahead of a 20 MiB upload:
  9.1 s, 24: 20.8 s; now 0.7-1.0 s, within the bound below).

So a normal upload queued behind any number of tricklers waits at most for the
holders in its way to be evicted (``PATIENCE`` + ``MIN_HELD`` + a check, 2.4 s),
once: the tricklers queued ahead of it never get the memory it frees while it waits.
Measured (probe, 30 clients, 1 B/s after a burst of 70 KB to 1 MB): 0.4-0.6 s
instead of 6.1-6.3 s, every trickler's 408 at 2.0-2.1 s. Not covered: a client whose
burst is more than the kernel will hold for it (Linux grows the receive buffer as the
proxy reads: 3 MB on loopback) has its window closed while it waits, like a fast
client held back; it is served in its turn and evicted after holding a part
``MIN_HELD`` (30 such: 6.0 s), at a cost to its sender of most of a part's bytes.

Clients just above the minimum rate (reprobe21b). Eviction judges only holders below
the minimum rate, and each holder keeps its whole part until it has filled it: seven
clients at 40 KiB/s (32 KiB/s allowed) held a 32 MiB budget of 5 MiB parts, and a fast
upload was not read for 120 s (behind nginx's 120 s send timeout: 504); at the defaults
up to part size / minimum rate, 256 s. So slow parts have a share (``SLOW_SHARE`` of the
budget, half): a part is *slow* when its client would take more than ``SLOW_FILL``
seconds to fill it at the rate it filled its last part (or sent the part's first bytes,
for its first), decided when it asks (``is_slow``); a holder that slows down to that
while someone waits counts as slow from then on, and when such parts take slow parts
past their share while an upload that is not slow waits and does not fit, as few of
them as make it fit are evicted, the slowest first (``choose_over_share``; reprobe22a:
clients that burst, then sent 40 KiB/s, were granted as fast and kept a fast upload
waiting 110 s). A slow part is granted only while the
slow parts held leave it room under the share, or none is held (so one always can be:
no deadlock, as every holder still finishes on its own). A slow waiter without room is
passed over, not in the way: the rest of the budget stays for uploads that fill their
parts in time, which then wait for a fast holder at most, ``SLOW_FILL`` and an upload
to S3. Slow uploads wait longer instead, for each other.

Rejected: reservations that grow with the bytes that arrived (filling parts piece
by piece can deadlock once every holder needs more; breaking that needs eviction
anyway), and a cap per connection (does not stop N slow connections). Eviction
judges only holders that are both slow and in the way, and is decided by a pure
function (``choose_victims``) tested with tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from s3proxy.body_end import Looks

# Seconds the head of the line may wait before slow holders are judged: long enough
# that a normal part release (S3 answering) usually comes first, short enough that a
# waiting upload barely notices the tricklers.
PATIENCE = 0.25
# Seconds a holder must have held its part, and the window its fill rate is judged
# over. Not shorter: a client on a lossy link is silent for a retransmission timeout
# (200 ms at least, doubling per loss in a row), and a busy sender for a scheduling
# stall; at 0.5 s, 63 of 64 uploads from one client process on a loaded 2-core CI
# machine were evicted together after one such stall, each losing its whole upload.
# Two seconds outlast three losses in a row and still free a trickler's part soon.
MIN_HELD = 2.0
# Where the kernel cannot say whether a waiting upload's receive window is closed: the
# bytes its client must have sent that the proxy has not read yet (kernel and aiohttp
# buffers) to be ready. Well under what a blocked socket holds (95-130 KB measured on a
# new loopback connection), so a fast client held back by backpressure is ready.
READY_BYTES = 16 * 1024
# A part its client would fill slower than this (seconds, at its last rate) is a slow
# part: 8 MiB in 60 s is 140 KiB/s, 5 MiB 87 KiB/s.
SLOW_FILL = 60.0
# The share of the budget slow parts may hold together (past it, a slow part waits for
# another slow part's memory, unless none is held).
SLOW_SHARE = 0.5


def is_slow(rate: float | None, size: int, fill: float = SLOW_FILL) -> bool:
    """Would a client at ``rate`` bytes/s take longer than ``fill`` seconds to send
    ``size`` bytes? An unknown rate is not slow."""
    return rate is not None and rate * fill < size


def choose_over_share(
    holders: Sequence[tuple[int, float]], need: int, free: int, over: int
) -> list[int]:
    """Indices of the holders to evict, given ``(size, fill rate)`` of the parts granted
    as fast that fill as slow ones now, so that a waiting part of ``need`` bytes fits in
    ``free`` (free and being freed), while slow parts hold ``over`` bytes past their
    share: the slowest first, and no more than make it fit or bring the share back."""
    victims: list[int] = []
    for i in sorted(range(len(holders)), key=lambda i: holders[i][1]):
        if free >= need or over <= 0:
            break
        victims.append(i)
        free += holders[i][0]
        over -= holders[i][0]
    return victims


def slow_fits(size: int, held: int, share: int) -> bool:
    """May a slow part of ``size`` be granted while slow parts hold ``held`` bytes of a
    ``share``? Always when none is held: a slow upload must be able to progress."""
    return held == 0 or held + size <= share


@dataclass(frozen=True)
class HolderState:
    """What the eviction decision sees of one part holder."""

    held_for: float  # seconds since its reservation was granted
    rate: float | None  # bytes/s filling its part over the last MIN_HELD; None: not filling
    min_rate: float  # the slowest it may fill (its request's minimum rate)


def choose_victims(
    holders: Sequence[HolderState],
    waited: float,
    patience: float = PATIENCE,
    min_held: float = MIN_HELD,
) -> list[int]:
    """Indices of the holders to evict, given how long the head of the line ``waited``.

    Nobody is evicted before someone has waited ``patience``; then every holder that
    is filling its part (not uploading it), has held it ``min_held`` and fills it
    below its minimum rate.
    """
    if waited < patience:
        return []
    return [
        i
        for i, h in enumerate(holders)
        if h.rate is not None and h.held_for >= min_held and h.rate < h.min_rate
    ]


@dataclass(frozen=True)
class WaiterState:
    """What the granting and expiry decisions see of one upload waiting for a part."""

    unread: int  # bytes its client sent that nobody has read yet (kernel and aiohttp)
    ended: bool | None  # its body is all here (True), still owes bytes (False), unknown
    rate: float | None  # bytes/s its client sent while it waited, over the last MIN_HELD
    min_rate: float  # the slowest its client may send
    blocked: bool | None = None  # its receive window is closed (True), open, unknown
    # Its end is being looked for among the kernel's bytes and the pass's walk ran out
    # first (s3proxy.body_end ``Looks``): neither ready nor timed out until it is known.
    looking: bool = False


def is_ready(state: WaiterState | None, need: int, ready_bytes: int = READY_BYTES) -> bool:
    """Has the waiter's client sent what it needs to progress once granted ``need``
    bytes? Unknown (no state: a side reservation, a source that cannot tell) is ready.

    So is a client silent for a whole window whose body's end cannot be seen (rare:
    s3proxy.body_end sees it for chunked and coded bodies too): its last bytes may be
    its body's end, in the kernel; kept back, it would wait as long as ready uploads
    keep coming.
    """
    if state is None or state.ended is True or state.blocked is True or state.unread >= need:
        return True
    if state.ended is None and state.rate == 0 and not state.looking:
        return True
    # without the window (an older kernel): bytes piled up stand for it
    return state.blocked is None and state.unread >= min(ready_bytes, need)


def readiness(state: WaiterState | None, need: int) -> bool | None:
    """``is_ready``, or None for an unready waiter whose look for its body's end is
    pending (``WaiterState.looking``): granted neither as ready nor as unready until its
    end is known. Granted as unready, such waiters (a MiB of 1-byte chunks each, silent)
    were read and evicted one by one while normal uploads waited (reprobe10b N3)."""
    if is_ready(state, need):
        return True
    return None if state is not None and state.looking else False


def grant(
    sizes: Sequence[int],
    ready: Callable[[int], bool | None],
    available: int,
    slow: Sequence[bool] = (),
    slow_held: int = 0,
    slow_share: int | None = None,
) -> list[int]:
    """Indices of the waiters to grant now, given their sizes in line order and
    ``ready(i)`` (``readiness``), and which of them are slow parts (``slow``, by index;
    none if empty) while slow parts hold ``slow_held`` of their ``slow_share``.

    The ready ones first, then the unready, each in line order; granting stops at the
    first that does not fit, so nobody overtakes the oldest ready waiter, and an
    unready one gets memory only when no ready one waits. One whose readiness is not
    known yet (None) is not granted now. A slow part with no room in the slow share
    (``slow_fits``) is passed over: it waits for another slow part, not in the way.

    ``ready(i)`` is asked only when its answer can matter, each at most once, in line
    order: once nobody left fits in ``available``, or a ready waiter does not fit,
    nobody more is asked. Asking every waiter (two system calls each) made a part
    released with 56 uploads waiting ask all 56 where one was granted.
    """
    answers: dict[int, bool | None] = {}
    granted: list[int] = []
    left = set(range(len(sizes)))  # not granted
    for wanted in (True, False):
        for i, size in enumerate(sizes):
            if i not in left:
                continue
            if i not in answers:
                answers[i] = ready(i)
            if answers[i] is not wanted:  # (None: its end is being looked for)
                continue
            is_slow_part = bool(slow) and slow[i] and slow_share is not None
            if is_slow_part and not slow_fits(size, slow_held, slow_share or 0):
                continue
            if size > available:
                return granted
            granted.append(i)
            left.discard(i)
            available -= size
            if is_slow_part:
                slow_held += size
            if not left or available < min(sizes[j] for j in left):
                return granted  # nobody left fits: nobody more need be asked
    return granted


def choose_expired(waiters: Sequence[tuple[WaiterState | None, int]]) -> list[int]:
    """Indices of the waiters to time out, given ``(state, need)`` for each.

    Unready, waited one window, and its client sent below its minimum rate over it:
    a trickle (some bytes, too few) always; silence when the body owes bytes (not when
    its end cannot be seen: ``is_ready``).
    """
    return [
        i
        for i, (s, need) in enumerate(waiters)
        if s is not None
        and not is_ready(s, need)
        and s.rate is not None
        and s.rate < s.min_rate
        and (s.rate > 0 or s.ended is False)
        and not s.looking
    ]


class WaitExpired(Exception):
    """A waiter's client sent too slowly while it waited: it gets no memory."""


class Holder(Protocol):
    """The owner of a part reservation, as the budget asks it under pressure."""

    def fill_state(self, now: float) -> HolderState | None:
        """How it is doing now (monotonic clock); None: never evict it now."""
        ...

    def evict(self, message: str) -> None:
        """Stop the upload with a 408 ``message``; the reservation is released as it unwinds."""
        ...

    def wait_state(self, now: float, looks: Looks | None = None) -> WaiterState | None:
        """How its client sends while it waits for a part; None: cannot tell (ready).
        A look at the kernel's bytes walks no more than ``looks`` lets it (one pass's,
        shared by the waiters it judges; None: a fresh one)."""
        ...

    def fill_rate(self) -> float | None:
        """Bytes/s its client filled its last part at (or sent the part's first bytes
        at, for its first); None: not known (``is_slow``)."""
        ...


# (priority, seq, size, future, enqueued at, owner, a slow part)
Waiter = tuple[float, int, int, "asyncio.Future[None]", float, "Holder | None", bool]


class MemoryBudget:
    def __init__(self, limit: int, slow_share: float = SLOW_SHARE) -> None:
        if limit <= 0:
            raise ValueError("memory budget must be positive")
        self.limit = limit
        self.in_use = 0
        self.slow_share = int(limit * slow_share)  # what slow parts may hold together
        self.slow_in_use = 0  # of in_use, held by slow parts
        self.peak = 0
        self.wait_seconds = 0.0
        self.side_in_use = 0  # of in_use, held by side reservations (form fields)
        self.evictions = 0
        self.expired = 0  # waiters timed out for sending too slowly while they waited
        # a heap of (priority, seq, size, future, enqueued at, owner)
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()
        self._side_waiters: list[asyncio.Future[None]] = []
        self._holders: dict[Reservation, Holder] = {}
        self._freeing: set[Reservation] = set()  # evicted over the slow share, not released
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def available(self) -> int:
        return self.limit - self.in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def can_take(self, n: int) -> bool:
        """Would ``acquire(n)`` return without waiting?"""
        return not self._waiters and n <= self.available

    async def acquire(
        self, n: int, priority: float = 0.0, holder: Holder | None = None
    ) -> Reservation:
        """Wait until ``n`` bytes are free and take them; lower ``priority`` goes first.

        A ``holder`` may be evicted under pressure while it holds the reservation.
        """
        if n > self.limit:
            raise ValueError(f"reservation of {n} bytes exceeds the budget of {self.limit}")
        slow = holder is not None and is_slow(holder.fill_rate(), n)
        if (
            not self._waiters
            and n <= self.available
            and (not slow or slow_fits(n, self.slow_in_use, self.slow_share))
        ):
            self._take(n, slow)
            return self._granted(n, holder, slow)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        started = time.monotonic()
        entry: Waiter = (priority, next(self._seq), n, fut, started, holder, slow)
        heapq.heappush(self._waiters, entry)
        self._arm_watchdog(loop)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted just as we were cancelled: give it back.
                self._give(n, slow)
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
        return self._granted(n, holder, slow)

    async def acquire_side(self, n: int, side_cap: int, priority: float = 0.0) -> Reservation:
        """Take ``n`` bytes that a request holds while it may wait for a part (form
        fields): first wait for room under ``side_cap`` (apart from the line), then
        wait in line like a part. ``side_cap`` must leave the largest part room."""
        if n > side_cap:
            raise ValueError(f"side reservation of {n} bytes exceeds its cap of {side_cap}")
        while self.side_in_use + n > side_cap:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._side_waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._side_waiters.remove(fut)
        self.side_in_use += n  # holds room under the cap while it waits in line
        try:
            reservation = await self.acquire(n, priority)
        except BaseException:
            self._give_side(n)
            raise
        reservation.side = True
        return reservation

    def _granted(self, n: int, holder: Holder | None, slow: bool = False) -> Reservation:
        reservation = Reservation(self, n)
        reservation.slow = slow
        if holder is not None:
            self._holders[reservation] = holder
        return reservation

    def _take(self, n: int, slow: bool = False) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)
        if slow:
            self.slow_in_use += n

    def _give(self, n: int, slow: bool = False) -> None:
        self.in_use -= n
        assert self.in_use >= 0, "budget released more than was taken"
        if slow:
            self.slow_in_use -= n
            assert self.slow_in_use >= 0, "slow parts released more than was taken"
        self._wake()

    def _give_side(self, n: int) -> None:
        self.side_in_use -= n
        assert self.side_in_use >= 0, "side reservations released more than was taken"
        for fut in self._side_waiters:  # each re-checks its own fit
            if not fut.done():
                fut.set_result(None)

    def _wake(self) -> None:
        """Grant what fits, ready waiters first (``grant``)."""
        live = sorted(w for w in self._waiters if not w[3].done())
        if len(live) != len(self._waiters):
            self._waiters = live  # sorted is a heap
        if not live or min(w[2] for w in live) > self.available:
            return  # nobody fits: no need to ask who is ready
        now = time.monotonic()
        looks = Looks(ways=len(live))  # one pass: its waiters share one bound (body_end)
        slow = [w[6] for w in live]
        granted = grant(
            [w[2] for w in live],
            lambda i: self._ready(live[i], now, looks),
            self.available,
            slow,
            self.slow_in_use,
            self.slow_share,
        )
        if not granted:
            return
        for i in granted:
            n, fut = live[i][2], live[i][3]
            self._take(n, live[i][6])
            fut.set_result(None)
        self._waiters = [w for w in live if not w[3].done()]

    @staticmethod
    def _ready(w: Waiter, now: float, looks: Looks) -> bool | None:
        owner = w[5]
        return True if owner is None else readiness(owner.wait_state(now, looks), w[2])

    def _forget(self, reservation: Reservation) -> None:
        self._holders.pop(reservation, None)
        self._freeing.discard(reservation)

    # --- eviction under pressure ---------------------------------------------------

    def _expire_slow_waiters(self, now: float) -> None:
        """Time out the waiters whose clients send too slowly (``choose_expired``)."""
        live = [w for w in self._waiters if not w[3].done() and w[5] is not None]
        looks = Looks(ways=len(live))  # one pass: its waiters share one bound (body_end)
        states = [(w[5].wait_state(now, looks) if w[5] is not None else None, w[2]) for w in live]
        expired = choose_expired(states)
        for i in expired:
            state = states[i][0]
            assert state is not None and state.rate is not None
            self.expired += 1
            live[i][3].set_exception(
                WaitExpired(
                    f"the client sent {state.rate:.0f} bytes/s, under the minimum of "
                    f"{state.min_rate:.0f} bytes/s, while it waited for memory"
                )
            )
        if expired:
            self._waiters = sorted(w for w in self._waiters if not w[3].done())

    def _arm_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watchdog is None:
            # In no request's context: it acts (and logs) for every holder and waiter, and
            # call_later would run it in the context of the request that armed it.
            self._watchdog = loop.call_later(PATIENCE, self._check, context=contextvars.Context())

    def _check(self) -> None:
        """While someone waits: evict the part holders that are slow and in the way."""
        self._watchdog = None
        now = time.monotonic()
        self._expire_slow_waiters(now)
        self._wake()  # a waiter that became ready may be the head now
        live = [w for w in self._waiters if not w[3].done()]
        if not live:
            return
        waited = now - min(w[4] for w in live)
        owners: list[Holder] = []
        states: list[HolderState] = []
        turned: list[tuple[Reservation, Holder, float]] = []  # granted fast, filling slow
        for reservation, owner in list(self._holders.items()):
            state = owner.fill_state(now)
            if state is not None:
                owners.append(owner)
                states.append(state)
                if (
                    not reservation.slow
                    and state.held_for >= MIN_HELD
                    and is_slow(state.rate, reservation.size)
                ):
                    # slowed down while others wait: its part counts as slow from now
                    reservation.slow = reservation.turned = True
                    self.slow_in_use += reservation.size
                if reservation.turned and state.rate is not None:
                    turned.append((reservation, owner, state.rate))
        victims = choose_victims(states, waited)
        for i in victims:
            self.evictions += 1
            s = states[i]
            owners[i].evict(
                f"the client sent {s.rate:.0f} bytes/s, under the minimum of "
                f"{s.min_rate:.0f} bytes/s, while other uploads waited for memory"
            )
        self._evict_over_share(live, waited, turned, {id(owners[i]) for i in victims})
        self._watchdog = asyncio.get_running_loop().call_later(PATIENCE / 2, self._check)

    def _evict_over_share(
        self,
        live: list[Waiter],
        waited: float,
        turned: list[tuple[Reservation, Holder, float]],
        evicted: set[int],
    ) -> None:
        """Parts granted as fast that fill as slow ones took slow parts past their share
        (reprobe22a: clients that burst, then sent 40 KiB/s, held the budget and a fast
        upload waited 110 s): while the oldest upload that is not slow waits and does not
        fit, evict as few of them as make it fit (``choose_over_share``)."""
        fast = [w for w in live if not w[6]]
        over = self.slow_in_use - self.slow_share
        if not fast or waited < PATIENCE or over <= 0:
            return
        need = min(fast)[2]
        free = self.available + sum(r.size for r in self._freeing)
        candidates = [t for t in turned if t[0] not in self._freeing and id(t[1]) not in evicted]
        holders = [(r.size, rate) for r, _, rate in candidates]
        for i in choose_over_share(holders, need, free, over):
            reservation, owner, rate = candidates[i]
            self.evictions += 1
            self._freeing.add(reservation)
            owner.evict(
                f"the client filled its part at {rate:.0f} bytes/s, slower than "
                f"{reservation.size / SLOW_FILL:.0f} bytes/s, after it got the memory as a "
                "fast upload, while other uploads waited and slow ones held their share"
            )


class Reservation:
    """Bytes held from the budget; shrink to what a short part needs, release once.

    The budget must count a buffer until its bytes are really gone, not only until
    its holder is done with it: a failed upload's frames live on in its exception's
    traceback, often in a reference cycle that only the cyclic GC frees (the client
    error that keeps the frame it was raised from, asyncio's cancelled tasks, aiohttp's
    request writer), and everything they reach with it. So the lists of chunks a
    reservation pays for are ``cover``-ed, and ``release`` empties them before it gives
    the bytes back: whoever still holds a list then holds nothing. (Measured: 300 cut
    uploads against a 32 MiB budget left 74 MiB of part chunks in cyclic garbage the
    budget had given back, and RSS grew from 88 to 340 MB.)
    """

    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self._budget = budget
        self.size = size
        self.side = False  # held under a side cap (form fields)
        self.slow = False  # a slow part (``is_slow``): counted in the slow share
        self.turned = False  # ... since it filled slowly, granted as a fast one
        self._covered: list[list[Any]] = []

    def cover(self, *buffers: list[Any]) -> None:
        """These lists hold bytes this reservation pays for: ``release`` empties them."""
        for buffer in buffers:
            if not any(buffer is held for held in self._covered):
                self._covered.append(buffer)

    def shrink(self, size: int) -> None:
        if size < self.size:
            freed = self.size - size
            self.size = size
            if self.side:
                self._budget._give_side(freed)
            self._budget._give(freed, self.slow)

    def release(self) -> None:
        covered, self._covered = self._covered, []
        for buffer in covered:
            buffer.clear()
        self._budget._forget(self)
        if self.size:
            size, self.size = self.size, 0
            if self.side:
                self._budget._give_side(size)
            self._budget._give(size, self.slow)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
