"""Waiting for something that happens elsewhere: another process, a thread, the proxy.

One helper, so every test polls the same way: ``eventually`` (async, for tests on an
event loop; it sleeps with ``asyncio.sleep`` so the loop keeps serving the proxy under
test) and ``eventually_sync`` (for sync tests and fixtures). Both call ``probe`` until it
returns a truthy value (or one ``until`` accepts: ``until=not_`` waits for an empty list
and shows what is left), return that value, and after ``within`` seconds fail with an
AssertionError that says what was awaited and the last value seen, so a timeout reads
like a failed assert rather than a bare "condition not met".

The probe runs at least once, and once more after the deadline, so a slow machine that
oversleeps still gets a last look. An exception the probe raises ends the wait at once
(a process that died will not come up), unless its type is listed in ``ignoring``
(a port that refuses connections until the server listens): then it counts as the
last value seen and polling goes on.

An async probe may return an awaitable (``lambda: open_uploads_async(s3, bucket)``),
which is awaited: blocking calls belong in a worker thread, not on the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

EVERY = 0.05  # seconds between looks: short next to every wait here (1 s and up)
SHOWN = 2000  # characters of the last value kept in the failure message


def _failure(what: str, within: float, last: object, looks: int) -> AssertionError:
    seen = repr(last)
    if len(seen) > SHOWN:
        seen = seen[:SHOWN] + f"... ({len(seen)} characters)"
    return AssertionError(f"not within {within}s ({looks} looks): {what}; last seen: {seen}")


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    within: float,
    what: str,
    until: Callable[[T], object] = ...,
    every: float = ...,
    ignoring: tuple[type[Exception], ...] = ...,
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T],
    *,
    within: float,
    what: str,
    until: Callable[[T], object] = ...,
    every: float = ...,
    ignoring: tuple[type[Exception], ...] = ...,
) -> T: ...


async def eventually(
    probe: Callable[[], Any],
    *,
    within: float,
    what: str,
    until: Callable[[Any], object] = bool,
    every: float = EVERY,
    ignoring: tuple[type[Exception], ...] = (),
) -> Any:
    """Await ``probe()`` until ``until`` accepts it, return it; fail after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    looks = 0
    last: object = None
    while True:
        late = loop.time() > deadline
        looks += 1
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except ignoring as exc:
            last = exc
        else:
            if until(value):
                return value
            last = value
        if late:
            raise _failure(what, within, last, looks)
        await asyncio.sleep(every)


def eventually_sync(
    probe: Callable[[], T],
    *,
    within: float,
    what: str,
    until: Callable[[T], object] = bool,
    every: float = EVERY,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """Call ``probe()`` until ``until`` accepts it, return it; fail after ``within`` s.

    For sync code only: it sleeps with ``time.sleep``, which would stall an event loop.
    """
    deadline = time.monotonic() + within
    looks = 0
    last: object = None
    while True:
        late = time.monotonic() > deadline
        looks += 1
        try:
            value = probe()
        except ignoring as exc:
            last = exc
        else:
            if until(value):
                return value
            last = value
        if late:
            raise _failure(what, within, last, looks)
        time.sleep(every)
