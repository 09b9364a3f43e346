"""The byte-counting memory budget: waits, fairness, cancellation, no leaks."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence

import pytest

from s3proxy.body_end import LOOK_LINES, Looks
from s3proxy.budget import (
    READY_BYTES,
    HolderState,
    MemoryBudget,
    Reservation,
    WaiterState,
    WaitExpired,
    choose_expired,
    choose_over_share,
    choose_victims,
    grant,
    is_ready,
    is_slow,
    readiness,
    slow_fits,
)
from s3proxy.log import REQUEST_ID


def grant_table(
    line: Sequence[tuple[int, bool | None]],
    available: int,
    slow: Sequence[bool] = (),
    slow_held: int = 0,
    slow_share: int | None = None,
) -> list[int]:
    """``grant`` of a table: ``(size, ready)`` in line order, every readiness known."""
    sizes = [size for size, _ in line]
    return grant(sizes, lambda i: line[i][1], available, slow, slow_held, slow_share)


async def test_acquire_and_release() -> None:
    b = MemoryBudget(100)
    r = await b.acquire(60)
    assert (b.in_use, b.available) == (60, 40)
    r.shrink(10)
    assert b.in_use == 10
    r.release()
    r.release()  # idempotent
    assert b.in_use == 0
    assert b.peak == 60


async def test_release_empties_the_buffers_it_covers() -> None:
    """The bytes go back to the budget only with the lists that hold them emptied:
    whoever still holds such a list (a failed request's frame) holds nothing."""
    b = MemoryBudget(100)
    r = await b.acquire(60)
    part: list[bytes] = [b"a" * 30, b"b" * 30]
    joined = [b"s", *part]
    r.cover(part)
    r.cover(part, joined)  # covered once
    r.shrink(50)
    assert part and joined, "shrinking frees no buffer"
    r.release()
    assert (part, joined, b.in_use) == ([], [], 0)


async def test_waits_until_released_fifo() -> None:
    b = MemoryBudget(100)
    first = await b.acquire(80)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        r = await b.acquire(n)
        order.append(name)
        await asyncio.sleep(0)
        r.release()

    big = asyncio.create_task(take("big", 90))
    await asyncio.sleep(0)
    small = asyncio.create_task(take("small", 10))  # fits now, but must not overtake "big"
    await asyncio.sleep(0.01)
    assert order == [] and b.waiting == 2
    first.release()
    await asyncio.gather(big, small)
    assert order == ["big", "small"]
    assert b.in_use == 0


async def test_cancelled_waiter_leaves_no_trace() -> None:
    b = MemoryBudget(100)
    held = await b.acquire(100)
    waiter = asyncio.create_task(b.acquire(50))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert b.waiting == 0
    held.release()
    assert b.in_use == 0


async def test_cancelled_after_grant_gives_back() -> None:
    b = MemoryBudget(100)
    held = await b.acquire(100)
    waiter = asyncio.create_task(b.acquire(50))
    await asyncio.sleep(0)
    held.release()  # grants the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert b.in_use == 0


async def test_oversized_request_is_refused() -> None:
    with pytest.raises(ValueError):
        await MemoryBudget(10).acquire(11)


async def test_context_manager_releases_on_error() -> None:
    b = MemoryBudget(10)
    with pytest.raises(RuntimeError):
        async with await b.acquire(10):
            raise RuntimeError
    assert b.in_use == 0


async def test_older_uploads_are_served_first() -> None:
    """An upload under way (older priority) gets its next part before a newer one starts."""
    b = MemoryBudget(100)
    held = await b.acquire(100)
    order: list[str] = []

    async def take(name: str, priority: float) -> None:
        r = await b.acquire(60, priority=priority)
        order.append(name)
        r.release()

    newer = asyncio.create_task(take("newer", priority=2.0))
    await asyncio.sleep(0)
    older = asyncio.create_task(take("older", priority=1.0))
    await asyncio.sleep(0)
    held.release()
    await asyncio.gather(newer, older)
    assert order == ["older", "newer"]


async def test_waiter_cancelled_just_before_memory_is_released() -> None:
    """The waiter is cancelled, then memory is released before it runs again: the wake-up
    drops its (cancelled) entry, and the waiter must still end with CancelledError."""
    b = MemoryBudget(100)
    held = await b.acquire(100)
    waiter = asyncio.create_task(b.acquire(50))
    behind = asyncio.create_task(b.acquire(30))
    await asyncio.sleep(0)
    assert b.waiting == 2
    waiter.cancel()  # cancels its future at once...
    held.release()  # ...and _wake pops that entry before the waiter task runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    r = await behind  # the next in line is served
    assert b.waiting == 0 and b.in_use == 30
    r.release()
    assert b.in_use == 0


# --- fairness: who is evicted (pure), and the budget asking its holders ---------------

SLOW = 10.0  # bytes/s
MIN = 32 * 1024.0


@pytest.mark.parametrize(
    ("holders", "waited", "victims"),
    [
        ([], 5.0, []),
        # nobody has waited long enough: nobody is judged
        ([HolderState(10.0, SLOW, MIN)], 0.1, []),
        # a slow holder that has held its part long enough, while someone waits
        ([HolderState(2.5, SLOW, MIN)], 0.3, [0]),
        # too new to judge (its client may still be waking from backpressure)
        ([HolderState(1.0, SLOW, MIN)], 5.0, []),
        # uploading to S3 (rate None): never evicted, it releases on S3's answer
        ([HolderState(30.0, None, MIN)], 5.0, []),
        # fast enough, and exactly at the rate: kept
        ([HolderState(3.0, 1e6, MIN), HolderState(3.0, MIN, MIN)], 5.0, []),
        # a mix: only the slow, old, filling ones
        (
            [
                HolderState(3.0, SLOW, MIN),
                HolderState(3.0, 1e6, MIN),
                HolderState(0.1, SLOW, MIN),
                HolderState(3.0, None, MIN),
                HolderState(2.0, 0.0, MIN),  # held exactly MIN_HELD
            ],
            0.25,
            [0, 4],
        ),
        # each holder is judged by its own request's minimum rate
        ([HolderState(3.0, 500.0, 1000.0), HolderState(3.0, 500.0, 100.0)], 1.0, [0]),
    ],
)
def test_choose_victims(holders: list[HolderState], waited: float, victims: list[int]) -> None:
    assert choose_victims(holders, waited) == victims


class FakeHolder:
    def __init__(self, state: HolderState | None) -> None:
        self.state = state
        self.evicted: list[str] = []
        self.reservation: Reservation | None = None

    def fill_state(self, now: float) -> HolderState | None:
        return None if self.evicted else self.state

    def wait_state(self, now: float, looks: Looks | None = None) -> WaiterState | None:
        return None

    def fill_rate(self) -> float | None:
        return None

    def evict(self, message: str) -> None:
        self.evicted.append(message)
        assert self.reservation is not None
        self.reservation.release()  # as an upload does once its read fails


async def test_slow_holders_are_evicted_only_when_someone_waits() -> None:
    b = MemoryBudget(100)
    slow, fast, sending = (
        FakeHolder(HolderState(5.0, SLOW, MIN)),
        FakeHolder(HolderState(5.0, 1e6, MIN)),
        FakeHolder(HolderState(5.0, None, MIN)),
    )
    for h in (slow, fast, sending):
        h.reservation = await b.acquire(30, holder=h)
    await asyncio.sleep(0.5)
    assert not slow.evicted  # nobody waits: nobody is evicted
    loop = asyncio.get_running_loop()
    start = loop.time()
    r = await asyncio.wait_for(b.acquire(40), 2)
    assert 0.2 <= loop.time() - start < 1.0
    assert len(slow.evicted) == 1 and "bytes/s" in slow.evicted[0]
    assert not fast.evicted and not sending.evicted
    assert b.evictions == 1
    r.release()
    for h in (fast, sending):
        assert h.reservation is not None
        h.reservation.release()
    assert b.in_use == 0


async def test_the_watchdog_runs_in_no_requests_context() -> None:
    """The watchdog was armed with call_later from the first waiter's task, so it ran,
    and every eviction it made logged, as that request (probe reprobe8 F5: 24 evictions
    of 24 requests, all under the first waiter's request id)."""
    b = MemoryBudget(100)
    seen: list[str] = []

    class Holder(FakeHolder):
        def evict(self, message: str) -> None:
            seen.append(REQUEST_ID.get())
            super().evict(message)

    slow = Holder(HolderState(5.0, SLOW, MIN))
    slow.reservation = await b.acquire(80, holder=slow)

    async def waiter() -> Reservation:
        REQUEST_ID.set("the-waiter")
        return await b.acquire(40)

    r = await asyncio.wait_for(asyncio.create_task(waiter()), 2)
    assert seen == ["-"]
    r.release()


async def test_side_reservations_wait_apart_and_never_block_parts() -> None:
    b = MemoryBudget(100)
    first = await b.acquire_side(20, side_cap=30)
    assert (b.in_use, b.side_in_use) == (20, 20)
    second = asyncio.create_task(b.acquire_side(20, side_cap=30))  # over the cap: waits
    await asyncio.sleep(0.01)
    assert not second.done() and b.waiting == 0
    part = await asyncio.wait_for(b.acquire(80), 1)  # a part is not held up by it
    part.release()
    first.release()
    r = await asyncio.wait_for(second, 1)
    assert (b.in_use, b.side_in_use) == (20, 20)
    r.shrink(5)
    assert (b.in_use, b.side_in_use) == (5, 5)
    r.release()
    assert (b.in_use, b.side_in_use) == (0, 0)


async def test_cancelled_side_waiter_leaves_no_trace() -> None:
    b = MemoryBudget(100)
    held = await b.acquire(100)
    waiter = asyncio.create_task(b.acquire_side(10, side_cap=50))  # room, but no memory
    await asyncio.sleep(0.01)
    assert b.side_in_use == 10 and b.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (b.side_in_use, b.waiting) == (0, 0)
    held.release()
    assert b.in_use == 0
    with pytest.raises(ValueError):
        await b.acquire_side(60, side_cap=50)


# --- waiters: ready first, slow ones time out (hostile probe, finding 2) ----------------

PART = 5 * 1024 * 1024


def waiter(
    unread: int = 0,
    ended: bool | None = None,
    rate: float | None = None,
    min_rate: float = MIN,
    blocked: bool | None = None,
    looking: bool = False,
) -> WaiterState:
    return WaiterState(unread, ended, rate, min_rate, blocked, looking)


@pytest.mark.parametrize(
    ("state", "need", "ready"),
    [
        (None, PART, True),  # cannot tell (a side reservation): as before, in line
        (waiter(blocked=True), PART, True),  # window closed: a client held back by us
        (waiter(unread=200_000, blocked=False), PART, False),  # a burst, window still open
        (waiter(unread=100, blocked=False), 100, True),  # all its part needs is here
        # no window known (an older kernel): bytes piled up stand for it
        (waiter(unread=READY_BYTES), PART, True),
        (waiter(unread=READY_BYTES - 1), PART, False),  # a trickler past the probe
        (waiter(unread=0, ended=True), PART, True),  # its body is all here
        (waiter(unread=100, ended=False), PART, False),
        (waiter(unread=100), 100, True),  # a small reservation needs less
        # silent for a window, its end unseen (chunked): maybe all here, so not kept back
        (waiter(unread=100, rate=0.0), PART, True),
        (waiter(unread=100, rate=None), PART, False),  # not a window yet
        (waiter(unread=100, rate=1.0), PART, False),  # a trickle: more is due
        (waiter(unread=100, ended=False, rate=0.0), PART, False),  # Content-Length: due
        # silent, its end still being looked for (the pass's walk ran out): not yet
        (waiter(unread=100, rate=0.0, looking=True), PART, False),
        (waiter(unread=100, rate=0.0, looking=True, blocked=True), PART, True),
    ],
)
def test_is_ready(state: WaiterState | None, need: int, ready: bool) -> None:
    assert is_ready(state, need) is ready


@pytest.mark.parametrize(
    ("line", "available", "granted"),
    [
        ([], 100, []),
        # in line order while each fits; the first that does not fit stops the rest
        ([(30, True), (30, True), (30, True)], 70, [0, 1]),
        ([(80, True), (10, True)], 50, []),  # a big head is not overtaken by small ones
        # ready waiters pass unready ones, and keep their order among themselves
        ([(30, False), (30, True), (30, False), (30, True)], 60, [1, 3]),
        # an unready waiter gets memory only once no ready one waits...
        ([(30, False), (30, True)], 100, [1, 0]),
        ([(30, False), (30, False)], 40, [0]),
        # ...not when the oldest ready one does not fit (it would be overtaken)
        ([(10, False), (80, True)], 50, []),
    ],
)
def test_grant(line: list[tuple[int, bool]], available: int, granted: list[int]) -> None:
    assert grant_table(line, available) == granted


@pytest.mark.parametrize(
    ("state", "need", "ready"),
    [
        (None, PART, True),
        (waiter(unread=100, rate=0.0), PART, True),  # silent, its end unseen: as is_ready
        (waiter(unread=100, rate=1.0), PART, False),
        # its end still looked for: not known yet, neither ready nor unready
        (waiter(unread=100, rate=0.0, looking=True), PART, None),
        (waiter(unread=100, rate=1.0, looking=True), PART, None),
        (waiter(unread=100, rate=0.0, looking=True, blocked=True), PART, True),  # held back
        (waiter(unread=100, rate=0.0, looking=True), 100, True),  # all its part needs
    ],
)
def test_readiness(state: WaiterState | None, need: int, ready: bool | None) -> None:
    assert readiness(state, need) is ready


@pytest.mark.parametrize(
    ("line", "available", "granted"),
    [
        # a waiter whose end is being looked for gets no memory, not even left over
        ([(30, None)], 100, []),
        ([(30, None), (30, False)], 100, [1]),
        ([(30, None), (30, True), (30, False)], 100, [1, 2]),
        # and stops nobody: the ready ones keep their order behind it
        ([(80, None), (30, True)], 50, [1]),
    ],
)
def test_grant_skips_waiters_not_judged_yet(
    line: list[tuple[int, bool | None]], available: int, granted: list[int]
) -> None:
    """reprobe10b N3: 40 silent waiters, each with a MiB of 1-byte chunks in its kernel,
    were granted memory as "unready" while their looks were pending, read (at ~20 us a
    chunk) and evicted one by one: a normal 20 MiB upload took 15 s, 68 s of CPU."""
    assert grant_table(line, available) == granted


async def test_a_waiter_whose_look_is_pending_is_not_granted_left_over_memory() -> None:
    b = MemoryBudget(100)
    held = await b.acquire(100)
    pending = FakeWaiter(waiter(unread=10, rate=0.0, looking=True))
    task = asyncio.create_task(b.acquire(60, holder=pending))
    await asyncio.sleep(0.01)
    held.release()  # the memory is free, and nobody else waits
    await asyncio.sleep(0.01)
    assert not task.done()
    pending.waiting = waiter(unread=10, ended=True, rate=0.0)  # its end was found
    b._wake()
    r = await asyncio.wait_for(task, 1)
    r.release()
    assert b.in_use == 0


@pytest.mark.parametrize(
    ("waiters", "expired"),
    [
        ([(None, PART)], []),  # cannot tell: never timed out
        ([(waiter(rate=None), PART)], []),  # waited less than a window
        ([(waiter(rate=1.0), PART)], [0]),  # a trickle
        ([(waiter(rate=MIN), PART)], []),  # exactly at the rate
        ([(waiter(rate=1.0, blocked=True), PART)], []),  # ready: held back by us
        ([(waiter(rate=1.0, unread=READY_BYTES, blocked=False), PART)], [0]),  # a burst, then 1 B/s
        ([(waiter(rate=1.0, ended=True), PART)], []),  # its body is all here
        # silence: judged only when the body owes bytes (a chunked end may be unseen)
        ([(waiter(rate=0.0, ended=False), PART)], [0]),
        ([(waiter(rate=0.0), PART)], []),
        # its end still being looked for: judged once it is known
        ([(waiter(rate=0.0, looking=True), PART)], []),
        ([(waiter(rate=1.0, looking=True), PART)], []),
        # each by its own minimum rate
        (
            [
                (waiter(rate=500.0, min_rate=1000.0), PART),
                (waiter(rate=500.0, min_rate=100.0), PART),
            ],
            [0],
        ),
    ],
)
def test_choose_expired(waiters: list[tuple[WaiterState | None, int]], expired: list[int]) -> None:
    assert choose_expired(waiters) == expired


class FakeWaiter(FakeHolder):
    """A part waiter whose client's sending the test sets."""

    def __init__(self, state: WaiterState | None) -> None:
        super().__init__(None)
        self.waiting = state

    def wait_state(self, now: float, looks: Looks | None = None) -> WaiterState | None:
        return self.waiting


async def test_ready_waiters_pass_unready_ones_and_slow_ones_time_out() -> None:
    b = MemoryBudget(100)
    held = await b.acquire(100)
    slow = FakeWaiter(waiter(unread=10, ended=False, rate=None))
    ready = FakeWaiter(waiter(unread=READY_BYTES, rate=None))
    slow_task = asyncio.create_task(b.acquire(60, holder=slow))
    await asyncio.sleep(0.01)
    ready_task = asyncio.create_task(b.acquire(60, holder=ready))
    await asyncio.sleep(0.01)
    held.release()  # room for one: the ready one, though the other came first
    r = await asyncio.wait_for(ready_task, 1)
    assert not slow_task.done()
    slow.waiting = waiter(unread=10, ended=False, rate=1.0)  # one window of a trickle
    with pytest.raises(WaitExpired, match="while it waited for memory"):
        await asyncio.wait_for(slow_task, 1)
    assert (b.expired, b.waiting, b.in_use) == (1, 0, 60)
    r.release()
    assert b.in_use == 0


class LookingWaiter(FakeHolder):
    """A silent chunked waiter whose end is looked for: each look walks what its pass
    allows it, of ``lines`` in all; at the end, bytes are owed."""

    def __init__(self, lines: int) -> None:
        super().__init__(None)
        self.lines = lines
        self.passes: list[Looks] = []

    def wait_state(self, now: float, looks: Looks | None = None) -> WaiterState | None:
        assert looks is not None
        self.passes.append(looks)
        step = min(self.lines, looks.allow())
        looks.take(step)
        self.lines -= step
        return waiter(
            unread=10, ended=False if self.lines == 0 else None, rate=0.0, looking=self.lines > 0
        )


async def test_the_waiters_judged_in_one_pass_share_its_walk() -> None:
    """reprobe9b F2: 40 silent waiters, each a MiB of 1-byte chunks in its kernel,
    judged in one check: 40 walks of 0.4 s each stalled the event loop 2.3 s. One pass
    (a check, a wake-up) now walks ``LOOK_LINES`` lines in all, each waiter its share;
    the waiters it could not finish are neither granted nor timed out, and the next
    passes go on with them. A short walk is finished in the first pass, last in line."""
    b = MemoryBudget(100)
    held = await b.acquire(100)
    long = [LookingWaiter(LOOK_LINES) for _ in range(4)]
    short = LookingWaiter(10)
    tasks = [asyncio.create_task(b.acquire(60, holder=w)) for w in [*long, short]]
    await asyncio.sleep(0.01)
    b._expire_slow_waiters(0.0)
    await asyncio.sleep(0.01)
    looks = {id(p) for w in [*long, short] for p in w.passes}
    assert len(looks) == 1  # one pass, one walk bound for all its waiters
    assert short.passes[0].walked <= LOOK_LINES
    assert [w.lines for w in long] == [LOOK_LINES - LOOK_LINES // 5] * 4  # a share each
    assert b.expired == 1 and tasks[-1].done()  # the short walk: finished, bytes owed
    assert not any(t.done() for t in tasks[:-1])  # the others: neither ready nor expired
    for _ in range(5):
        b._expire_slow_waiters(0.0)
    assert b.expired == 5
    for task in tasks:
        with pytest.raises(WaitExpired):
            await task
    held.release()
    assert b.in_use == 0


async def test_a_waiter_that_becomes_ready_is_granted_without_a_release() -> None:
    b = MemoryBudget(100)
    held = await b.acquire(50)
    big = FakeWaiter(waiter(unread=0, rate=None))  # unready and cannot fit
    small = FakeWaiter(waiter(unread=0, rate=None))
    big_task = asyncio.create_task(b.acquire(60, holder=big))
    await asyncio.sleep(0.01)
    small_task = asyncio.create_task(b.acquire(40, holder=small))
    await asyncio.sleep(0.01)
    assert not small_task.done()  # in line behind the unready head that does not fit
    small.waiting = waiter(unread=READY_BYTES, rate=None)  # its client's bytes arrive
    r = await asyncio.wait_for(small_task, 1)  # the next check grants it
    held.release()
    r.release()
    (await asyncio.wait_for(big_task, 1)).release()
    assert b.in_use == 0


async def test_a_big_ready_part_is_not_starved_by_small_ready_ones() -> None:
    """A stream of small ready requests behind a big ready head waits for it."""
    b = MemoryBudget(100)
    held = [await b.acquire(30) for _ in range(3)]
    big = asyncio.create_task(b.acquire(90, holder=FakeWaiter(waiter(unread=READY_BYTES))))
    await asyncio.sleep(0.01)
    smalls = [
        asyncio.create_task(b.acquire(10, holder=FakeWaiter(waiter(unread=READY_BYTES))))
        for _ in range(5)
    ]
    for r in held:  # each release leaves room for small ones, never for the big one
        await asyncio.sleep(0.01)
        r.release()
        assert not any(t.done() for t in smalls) or big.done()
    got = await asyncio.wait_for(big, 1)
    await asyncio.sleep(0)
    assert [t.done() for t in smalls] == [True, False, False, False, False]  # the room left
    got.release()
    for t in smalls:
        (await asyncio.wait_for(t, 1)).release()
    assert b.in_use == 0


@pytest.mark.parametrize(
    ("rate", "size", "slow"),
    [
        (None, 8 << 20, False),  # not known: not slow
        (40 * 1024, 5 << 20, True),  # reprobe21b: 128 s to fill
        (140 * 1024, 8 << 20, False),  # 58.5 s: within SLOW_FILL
        (136 * 1024, 8 << 20, True),
        (1.0, 50, False),  # a small part is never slow at 1 B/s for 60 s
    ],
)
def test_is_slow(rate: float | None, size: int, slow: bool) -> None:
    assert is_slow(rate, size) is slow


@pytest.mark.parametrize(
    ("size", "held", "share", "fits"),
    [(60, 0, 50, True), (30, 20, 50, True), (30, 30, 50, False), (10, 40, 50, True)],
)
def test_slow_fits(size: int, held: int, share: int, fits: bool) -> None:
    """One slow part always fits (none held): a slow upload can always progress."""
    assert slow_fits(size, held, share) is fits


@pytest.mark.parametrize(
    ("line", "slow", "held", "granted"),
    [
        # a slow head without room is passed over; the fast one behind it is granted
        ([(30, True), (30, True)], [True, False], 30, [1]),
        # with room it goes first, as anyone would, and may take the room only once
        ([(20, True), (20, True), (20, True)], [True, True, False], 20, [0, 2]),
        # none held: one slow part fits whatever its size
        ([(60, True), (30, True)], [True, True], 0, [0]),
        # a fast head that does not fit still stops the line
        ([(90, True), (10, True)], [False, False], 0, []),
    ],
)
def test_grant_keeps_slow_parts_to_their_share(
    line: list[tuple[int, bool]], slow: list[bool], held: int, granted: list[int]
) -> None:
    assert grant_table(line, 80, slow, held, 50) == granted


class RatedHolder(FakeHolder):
    def __init__(self, rate: float | None, state: HolderState | None = None) -> None:
        super().__init__(state)
        self.rate = rate

    def fill_rate(self) -> float | None:
        return self.rate


async def test_slow_parts_wait_for_each_other_not_for_the_budget() -> None:
    """Budget 100, slow share 50: a second slow part of 40 waits although 60 are free;
    a fast one is granted; the slow one gets memory when the first slow part goes."""
    b = MemoryBudget(100)
    first = await b.acquire(40, holder=RatedHolder(0.1))  # 400 s to fill: slow
    assert (b.slow_in_use, first.slow) == (40, True)
    second = asyncio.create_task(b.acquire(40, holder=RatedHolder(0.1)))
    await asyncio.sleep(0.01)
    assert not second.done() and b.waiting == 1
    fast = await asyncio.wait_for(b.acquire(40, holder=RatedHolder(1e9)), 1)
    assert not fast.slow and b.slow_in_use == 40
    first.release()
    got = await asyncio.wait_for(second, 1)
    assert got.slow and b.slow_in_use == 40 and b.in_use == 80
    got.shrink(10)
    assert b.slow_in_use == 10
    for r in (got, fast):
        r.release()
    assert (b.in_use, b.slow_in_use) == (0, 0)


async def test_a_holder_that_slows_down_while_others_wait_counts_as_slow() -> None:
    """Granted as fast, filling at 0.6 B/s (above its minimum of 0.5) for MIN_HELD: once
    someone waits, its part counts in the slow share; within the share it keeps it."""
    b = MemoryBudget(100)
    holder = RatedHolder(None, HolderState(5.0, 0.6, 0.5))  # 67 s for its 40 bytes
    held = await b.acquire(40, holder=holder)
    assert not held.slow
    waiter = asyncio.create_task(b.acquire(70))
    await eventually_true(lambda: held.slow, 2)
    await asyncio.sleep(0.3)  # watchdog passes: 40 is within the share of 50
    assert b.slow_in_use == 40 and not holder.evicted and not waiter.done()
    held.release()
    (await asyncio.wait_for(waiter, 1)).release()
    assert (b.in_use, b.slow_in_use) == (0, 0)


async def test_parts_granted_fast_that_fill_slowly_past_the_share_make_room() -> None:
    """reprobe22a: clients that burst, then sent 40 KiB/s, got their parts as fast ones
    and held the budget beside the slow share; a fast upload waited 110 s. Two such
    holders (30 each, past the share of 50 with a slow 30): the slower one is evicted,
    only it, and the fast waiter gets its memory."""
    b = MemoryBudget(100)
    slow = await b.acquire(30, holder=RatedHolder(0.1))  # a slow part from the start
    first = RatedHolder(None, HolderState(5.0, 0.4, 0.1))
    second = RatedHolder(None, HolderState(5.0, 0.3, 0.1))
    first.reservation = await b.acquire(30, holder=first)
    second.reservation = await b.acquire(30, holder=second)
    got = await asyncio.wait_for(b.acquire(20), 2)
    assert second.evicted and "as a fast upload" in second.evicted[0]
    assert not first.evicted and b.evictions == 1
    assert b.slow_in_use == 60  # the slow part and the first, now counted slow
    for r in (got, slow, first.reservation):
        r.release()
    assert (b.in_use, b.slow_in_use) == (0, 0)


@pytest.mark.parametrize(
    ("holders", "need", "free", "over", "victims"),
    [
        ([(30, 2.0), (30, 1.0)], 20, 10, 10, [1]),  # the slower, one is enough
        ([(30, 2.0), (30, 1.0)], 70, 10, 60, [1, 0]),  # both needed
        ([(30, 2.0), (30, 1.0)], 70, 10, 20, [1]),  # the share is back after one
        ([(30, 1.0)], 20, 20, 10, []),  # it fits already
        ([(30, 1.0)], 20, 0, 0, []),  # slow parts within their share: none
    ],
)
def test_choose_over_share(
    holders: list[tuple[int, float]], need: int, free: int, over: int, victims: list[int]
) -> None:
    assert choose_over_share(holders, need, free, over) == victims


async def eventually_true(check: Callable[[], bool], within: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not check():
        assert loop.time() < end, "not within time"
        await asyncio.sleep(0.02)


def eager_grant(
    line: Sequence[tuple[int, bool | None]],
    available: int,
    slow: Sequence[bool],
    slow_held: int,
    slow_share: int | None,
) -> list[int]:
    """``grant`` as it was before it asked lazily: every readiness known up front."""
    order = [i for i, (_, ready) in enumerate(line) if ready]
    order += [i for i, (_, ready) in enumerate(line) if ready is False]
    granted: list[int] = []
    for i in order:
        size = line[i][0]
        is_slow_part = bool(slow) and slow[i] and slow_share is not None
        if is_slow_part and not slow_fits(size, slow_held, slow_share or 0):
            continue
        if size > available:
            break
        granted.append(i)
        available -= size
        if is_slow_part:
            slow_held += size
    return granted


def test_grant_grants_what_the_eager_grant_did() -> None:
    """20,000 random lines (sizes, readiness with None, slow parts, shares): the lazy
    grant answers the same, and asks no waiter twice."""
    rng = random.Random(1015)
    for _ in range(20_000):
        n = rng.randrange(0, 9)
        sizes = [rng.choice((10, 20, 30, 50)) for _ in range(n)]
        readies = [rng.choice((True, False, None)) for _ in range(n)]
        slow = [rng.random() < 0.3 for _ in range(n)] if rng.random() < 0.5 else []
        share = rng.choice((None, 40, 60))
        held = rng.choice((0, 10, 30))
        available = rng.randrange(0, 120)
        asked: list[int] = []

        def ready(
            i: int, asked: list[int] = asked, readies: list[bool | None] = readies
        ) -> bool | None:
            asked.append(i)
            return readies[i]

        got = grant(sizes, ready, available, slow, held, share)
        line = list(zip(sizes, readies, strict=True))
        assert got == eager_grant(line, available, slow, held, share)
        assert len(asked) == len(set(asked))


def test_grant_stops_asking_once_nobody_left_fits() -> None:
    asked: list[int] = []

    def ready(i: int) -> bool:
        asked.append(i)
        return i != 0

    assert grant([8] * 56, ready, 8) == [1]
    assert asked == [0, 1]  # not the 54 behind them: none of them could fit


async def test_a_released_part_asks_only_the_waiters_it_can_grant() -> None:
    """A part released while 40 uploads wait for one asked all 40 how their clients
    send (FIONREAD and TCP_INFO on each socket: in the 64 x 64 MiB bench cell, 2.6% of
    the proxy's samples) to grant one. It asks the head of the line."""
    counts = [0] * 40

    class Counted(FakeWaiter):
        def __init__(self, i: int) -> None:
            super().__init__(waiter(unread=READY_BYTES, rate=None))
            self.i = i

        def wait_state(self, now: float, looks: Looks | None = None) -> WaiterState | None:
            counts[self.i] += 1
            return self.waiting

    b = MemoryBudget(100)
    held = await b.acquire(100)
    tasks = []
    for i in range(40):
        tasks.append(asyncio.create_task(b.acquire(100, holder=Counted(i))))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    if b._watchdog is not None:  # its tick asks every waiter: not what is counted here
        b._watchdog.cancel()
        b._watchdog = None
    counts[:] = [0] * 40
    held.release()
    first = await asyncio.wait_for(tasks[0], 1)
    assert sum(counts) == 1, counts
    first.release()
    second = await asyncio.wait_for(tasks[1], 1)
    assert sum(counts) == 2, counts
    second.release()
    for t in tasks[2:]:
        t.cancel()
    await asyncio.gather(*tasks[2:], return_exceptions=True)
