"""Cleanup calls that must happen: aborts of failed multipart uploads, rollback deletes.

``finish`` awaits something to its end even while the caller is being cancelled,
and then re-raises that cancellation: a cleanup is never cut short, and a
cancellation meant for the caller is never swallowed (however many arrive).
``run_cleanups`` runs cleanup calls that way, all at once, each with a timeout. If
S3 is unreachable at that moment, the ``Janitor`` keeps retrying in the
background, so an upload that failed because S3 went away is still aborted once S3
is back. At shutdown each cleanup still owed gets one last try; what still fails is
logged one line each (``cleanup.abandoned``) with what undoes it (``advice``): aborts
and tus uploads are ``s3proxy cleanup``'s and the lifecycle rule's, but the object of a
failed request is no orphan anything finds later, so its line names it for deletion by
hand (README, "Operating it").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

log = logging.getLogger("s3proxy.janitor")

CLEANUP_TIMEOUT = 30.0  # seconds one abort or delete may take
LAST_TRY_TIMEOUT = 5.0  # seconds the last try at close may take (all at once): exit stays prompt
Cleanup = Callable[[], Awaitable[None]]
T = TypeVar("T")


class Janitor:
    """Retries failed cleanup calls until they succeed or ``give_up_after`` passes."""

    def __init__(self, interval: float = 5.0, give_up_after: float = 3600.0) -> None:
        self.interval = interval
        self.give_up_after = give_up_after
        self._tasks: dict[asyncio.Task[None], tuple[Cleanup, str]] = {}  # owed: tried at close
        self._rechecks: set[asyncio.Task[None]] = set()  # a precaution each: dropped at close

    def retry(self, fn: Cleanup, what: str) -> None:
        task = asyncio.create_task(self._retry(fn, what), name=f"cleanup-{what}")
        self._tasks[task] = (fn, what)
        task.add_done_callback(lambda t: self._tasks.pop(t, None))

    def again_after(self, fn: Cleanup, what: str, delays: Sequence[float]) -> None:
        """Run ``fn`` once more after each delay: for a write whose answer never came,
        which S3 may still carry out after the rollback deleted its key (a request held
        on the way lands late). ``fn`` must be safe to repeat."""
        task = asyncio.create_task(self._again(fn, what, delays), name=f"recheck-{what}")
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    async def _again(self, fn: Cleanup, what: str, delays: Sequence[float]) -> None:
        waited = 0.0
        for delay in sorted(delays):
            await asyncio.sleep(delay - waited)
            waited = delay
            try:
                await asyncio.wait_for(fn(), CLEANUP_TIMEOUT)
            except Exception as exc:
                log.warning("cleanup.recheck_failed what=%s error=%r", what, exc)

    async def _retry(self, fn: Cleanup, what: str) -> None:
        deadline = time.monotonic() + self.give_up_after
        attempt = 1
        while time.monotonic() < deadline:
            await asyncio.sleep(min(self.interval * attempt, 60.0))
            attempt += 1
            try:
                await asyncio.wait_for(fn(), CLEANUP_TIMEOUT)
            except Exception as exc:
                log.debug("cleanup.retry_failed what=%s attempt=%d error=%r", what, attempt, exc)
                continue
            log.info("cleanup.retried what=%s attempts=%d", what, attempt)
            return
        log.error("cleanup.gave_up what=%s; %s", what, advice(what))

    async def close(self, last_try: float = LAST_TRY_TIMEOUT) -> None:
        """Stop retrying; give every cleanup still owed one last try (all at once, within
        ``last_try`` seconds), and log each that still fails with what undoes it."""
        owed = list(self._tasks.values())
        if self._rechecks:
            log.info("cleanup.rechecks_dropped count=%d", len(self._rechecks))
        tasks = [*self._tasks, *self._rechecks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if owed:
            log.info("cleanup.last_try count=%d", len(owed))
            await asyncio.gather(*(_last_try(fn, what, last_try) for fn, what in owed))


async def _last_try(fn: Cleanup, what: str, seconds: float) -> None:
    try:
        await asyncio.wait_for(fn(), seconds)
    except Exception as exc:
        log.error("cleanup.abandoned what=%s error=%r; %s", what, exc, advice(what))
        return
    log.info("cleanup.retried what=%s attempts=last", what)


def advice(what: str) -> str:
    """What undoes a cleanup the process could not do, for its log line (``what`` starts
    with the call: ``abort``, ``tus ...``, ``delete``, ``rollback``)."""
    if what.startswith(("abort ", "tus ")):
        return "`s3proxy cleanup --execute` removes it (once idle or expired)"
    if "reason=size_unchecked" in what:  # a presigned upload's: a retry may have kept it
        return (
            "nothing removes it later: delete it by hand if its size is not its "
            'x-amz-meta-s3proxy-size (README "Operating it")'
        )
    if what.startswith(("delete ", "rollback ")):
        return (
            "the object of a failed request stays, nothing removes it later: delete it "
            'by hand (README "Operating it")'
        )
    return 'see README "Operating it"'


async def finish(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the caller is cancelled meanwhile (once or more);
    then raise CancelledError for the caller, or return ``aw``'s result."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException:
            break  # task is done: its error is raised below
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the caller's cancellation wins
        raise asyncio.CancelledError
    return task.result()


async def run_cleanup(
    fn: Cleanup, what: str, janitor: Janitor | None = None, *, retry: Cleanup | None = None
) -> None:
    """Run one cleanup call to the end even if we are being cancelled; never raise for it
    (but re-raise the caller's cancellation once it is done).

    If it fails, hand it to the janitor to retry (or log, without one): ``fn`` again, or
    ``retry`` when what ``fn`` undoes may have become right meanwhile (a later request
    may report as stored the object ``fn`` deletes: ``retry`` checks before it deletes).
    """
    await finish(_attempt(fn, what, janitor, retry))


async def run_cleanups(calls: Sequence[tuple[Cleanup, str]], janitor: Janitor | None) -> None:
    """``run_cleanup`` for several calls at once: each one runs (and, failing, goes to the
    janitor) whatever happens to the others or to the caller."""
    if calls:
        await finish(asyncio.gather(*(_attempt(fn, what, janitor) for fn, what in calls)))


async def _attempt(
    fn: Cleanup, what: str, janitor: Janitor | None, retry: Cleanup | None = None
) -> None:
    try:
        await asyncio.wait_for(fn(), CLEANUP_TIMEOUT)
    except Exception as exc:
        log.error("cleanup.failed what=%s error=%r", what, exc)
        if janitor is not None:
            janitor.retry(fn if retry is None else retry, what)
