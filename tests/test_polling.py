"""The one polling helper, both variants run through the same table of probes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from operator import not_
from typing import Any

import pytest

from tests.polling import eventually, eventually_sync

Waiter = Callable[..., Any]


def run_async(probe: Callable[[], Any], **kw: Any) -> Any:
    return asyncio.run(eventually(probe, **kw))


@pytest.fixture(params=[eventually_sync, run_async], ids=["sync", "async"])
def wait(request: pytest.FixtureRequest) -> Waiter:
    waiter: Waiter = request.param
    return waiter


def answers(*values: Any) -> Callable[[], Any]:
    """A probe answering ``values`` in turn, then the last one forever."""
    it: Iterator[Any] = iter(values)
    last: list[Any] = [None]

    def probe() -> Any:
        last[0] = next(it, last[0])
        if isinstance(last[0], Exception):
            raise last[0]
        return last[0]

    return probe


@pytest.mark.parametrize(
    ("values", "ignoring", "returned"),
    [
        ((1,), (), 1),
        ((None, [], 0, "", ["up"]), (), ["up"]),  # falsy values are "not yet"
        ((ConnectionRefusedError(), ConnectionRefusedError(), 200), (OSError,), 200),
    ],
)
def test_returns_the_first_truthy_value(
    wait: Waiter, values: tuple[Any, ...], ignoring: tuple[type[Exception], ...], returned: Any
) -> None:
    assert wait(answers(*values), within=5, what="x", every=0.001, ignoring=ignoring) == returned


@pytest.mark.parametrize(
    ("values", "ignoring", "last_seen"),
    [
        ((None, []), (), "[]"),
        ((0,), (), "0"),
        ((ConnectionRefusedError(111, "refused"),), (OSError,), "ConnectionRefusedError(111"),
        ((False, ConnectionRefusedError(111, "refused")), (OSError,), "ConnectionRefusedError"),
    ],
)
def test_timeout_says_what_and_the_last_value(
    wait: Waiter, values: tuple[Any, ...], ignoring: tuple[type[Exception], ...], last_seen: str
) -> None:
    probe = answers(*values)
    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        wait(probe, within=0.2, what="moto to list the upload", every=0.01, ignoring=ignoring)
    took = time.monotonic() - started
    message = str(failed.value)
    assert message.startswith("not within 0.2s (")
    assert "moto to list the upload; last seen: " + last_seen in message, message
    assert 0.2 <= took < 2.0, took


def test_until_waits_for_an_empty_list_and_shows_what_is_left(wait: Waiter) -> None:
    assert wait(answers([1, 2], [2], []), until=not_, within=5, what="x", every=0.001) == []
    with pytest.raises(AssertionError, match=r"uploads closed; last seen: \[2\]$"):
        wait(answers([1, 2], [2]), until=not_, within=0.05, what="uploads closed", every=0.001)


def test_a_probe_that_raises_ends_the_wait_at_once(wait: Waiter) -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited"):
        wait(answers(None, RuntimeError("exited")), within=30, what="x", every=0.001)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("within", [0, 0.05])
def test_looks_at_least_once_and_last_after_the_deadline(wait: Waiter, within: float) -> None:
    calls: list[float] = []

    def probe() -> bool:
        calls.append(time.monotonic())
        return False

    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        wait(probe, within=within, what="x", every=0.02)
    assert f"({len(calls)} looks)" in str(failed.value)
    assert calls and calls[-1] > started + within  # an oversleeping machine gets a last look


def test_a_long_last_value_is_cut(wait: Waiter) -> None:
    with pytest.raises(AssertionError) as failed:
        wait(answers(ValueError("x" * 5000)), within=0, what="x", ignoring=(ValueError,))
    message = str(failed.value)
    assert "last seen: ValueError('xxx" in message and message.endswith("(5014 characters)")
    assert len(message) < 2100


async def test_an_awaitable_probe_is_awaited_and_the_loop_keeps_running() -> None:
    ticks: list[int] = []

    async def ticker() -> None:
        while True:
            ticks.append(1)
            await asyncio.sleep(0.01)

    async def enough() -> int:
        await asyncio.sleep(0)
        return len(ticks) if len(ticks) >= 5 else 0

    task = asyncio.create_task(ticker())
    try:
        assert await eventually(enough, within=5, what="five ticks", every=0.01) >= 5
        assert await eventually(lambda: enough(), within=5, what="lambda", every=0.01) >= 5
    finally:
        task.cancel()
