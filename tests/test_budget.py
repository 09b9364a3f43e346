"""The byte-counting memory budget: waits, fairness, cancellation, no leaks."""

from __future__ import annotations

import asyncio

import pytest

from s3proxy.budget import MemoryBudget


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
