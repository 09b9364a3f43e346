"""Cleanup calls that must happen: aborts of failed multipart uploads, rollback deletes.

``run_cleanup`` runs one to the end even while its caller is being cancelled (the
abort is shielded and has a timeout). If S3 is unreachable at that moment, the
``Janitor`` keeps retrying in the background, so an upload that failed because S3
went away is still aborted once S3 is back. What a stopped process could not
clean is left to ``s3proxy cleanup`` and the bucket's lifecycle rule.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("s3proxy.janitor")

CLEANUP_TIMEOUT = 30.0  # seconds one abort or delete may take
Cleanup = Callable[[], Awaitable[None]]


class Janitor:
    """Retries failed cleanup calls until they succeed or ``give_up_after`` passes."""

    def __init__(self, interval: float = 5.0, give_up_after: float = 3600.0) -> None:
        self.interval = interval
        self.give_up_after = give_up_after
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def retry(self, fn: Cleanup, what: str) -> None:
        task = asyncio.create_task(self._retry(fn, what), name=f"cleanup-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        log.error("cleanup.gave_up what=%s; run `s3proxy cleanup`", what)

    async def close(self) -> None:
        if self._tasks:
            log.warning("cleanup.abandoned count=%d; run `s3proxy cleanup`", len(self._tasks))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def run_cleanup(fn: Cleanup, what: str, janitor: Janitor | None = None) -> None:
    """Run a cleanup call to the end even if we are being cancelled; never raise for it.

    If it fails, hand it to the janitor to retry (or log, without one).
    """
    task = asyncio.ensure_future(asyncio.wait_for(fn(), CLEANUP_TIMEOUT))
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break
    if not task.cancelled() and task.exception() is not None:
        log.error("cleanup.failed what=%s error=%r", what, task.exception())
        if janitor is not None:
            janitor.retry(fn, what)
    if cancelled:
        raise asyncio.CancelledError
