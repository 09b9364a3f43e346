"""A tus PATCH's lock on its upload, held in the state object in S3 (swapped with
If-Match), renewed while the PATCH runs: the only mutual exclusion between instances."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

from s3proxy.errors import UPLOAD_LOCKED, ProxyError
from s3proxy.janitor import Deadline, Kind, ShutdownDeadline, abandon, finish
from s3proxy.s3 import NoSuchKey, PreconditionFailed
from s3proxy.tus_state import Lock, TusState, TusStore

log = logging.getLogger("s3proxy.tus")


class Lease:
    """A PATCH's hold on its upload: the lock swapped into the state, renewed every third
    of the lease while the PATCH runs, released (or replaced by the commit) at its end.

    A PATCH must never lose its lock to its own renewal. So the renewal is stopped only
    between swaps (``stop`` takes the mutex, the cancel lands on the sleep), and a swap
    whose answer was lost (a timeout, a cancellation after sending) leaves a stale ETag
    that ``_swap_own`` recovers from: a 412 over a state still carrying this lease's owner
    is our own write, as nobody else writes without replacing the owner."""

    def __init__(
        self,
        store: TusStore,
        current: TusState,
        seconds: float,
        skew: float,
        deadline: Deadline | None = None,  # the shutdown's: a release keeps to it
    ) -> None:
        self.store = store
        self.deadline = deadline or Deadline()
        self.state = dataclasses.replace(current)
        self.seconds = seconds
        self.skew = skew
        self.owner = uuid.uuid4().hex
        self.etag = ""
        self.lost = False
        self._mutex = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def take(self, etag: str) -> None:
        now = time.time()
        if self.state.locked(now, self.skew):
            raise ProxyError(UPLOAD_LOCKED, "another PATCH is in progress on this upload")
        self.state.lock = Lock(self.owner, now + self.seconds)
        try:
            self.etag = await self.store.swap(self.state, etag)
        except (PreconditionFailed, NoSuchKey) as err:
            # Often our own swap: it landed, its answer was lost and the retry was refused.
            if not await self._landed_unseen():
                raise ProxyError(
                    UPLOAD_LOCKED, "another request changed this upload first"
                ) from err
        except ProxyError:
            # It may have landed all the same (answered 500 or late): then the lock is
            # ours, and only this PATCH can give it back before the lease lapses.
            if not await self._landed_unseen():
                raise
        self._task = asyncio.create_task(self._renew(), name="tus-lease")

    async def _landed_unseen(self) -> bool:
        """Whether the state carries this lease's lock though the swap said otherwise (it
        landed, its answer lost): then the lease holds it, at the ETag read."""
        return await self._read_back(
            lambda s: s.lock is not None and s.lock.owner == self.owner, "lock"
        )

    async def _read_back(self, mine: Callable[[TusState], bool], what: str) -> bool:
        """Whether the state read back is this lease's own write (``mine``), one whose
        answer was lost or an error: then the lease holds the state at the ETag read.
        False also when it cannot be read now."""
        with contextlib.suppress(ProxyError):
            found = await self.store.read()
            if found is not None and mine(found[0]):
                log.info("tus.%s_recovered id=%s owner=%s", what, self.store.upload.id, self.owner)
                self.etag = found[1]
                return True
        return False

    async def _swap_own(self, new: TusState) -> None:
        """Swap ``new`` over the state this lease holds; PreconditionFailed or NoSuchKey
        only if another request really changed it (the lock was lost)."""
        try:
            self.etag = await self.store.swap(new, self.etag)
        except PreconditionFailed:
            found = await self.store.read()
            if found is None or found[0].lock is None or found[0].lock.owner != self.owner:
                raise
            # Our own earlier swap landed unseen: the state is still ours, at a newer ETag.
            log.info("tus.lock_recovered id=%s owner=%s", self.store.upload.id, self.owner)
            self.etag = await self.store.swap(new, found[1])

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.seconds / 3)
            async with self._mutex:
                self.state.lock = Lock(self.owner, time.time() + self.seconds)
                try:
                    await self._swap_own(self.state)
                except (PreconditionFailed, NoSuchKey):
                    self.lost = True
                    log.warning("tus.lock_lost id=%s owner=%s", self.store.upload.id, self.owner)
                    return
                except ProxyError as err:  # S3 trouble: the next renewal may make it
                    log.warning("tus.lock_renew_failed id=%s error=%s", self.store.upload.id, err)

    async def stop(self) -> None:
        """Stop renewing, never mid-swap: a swap cut off after sending lands at S3 unseen."""
        task, self._task = self._task, None
        if task is None:
            return
        try:
            async with self._mutex:  # the renewal is sleeping (or waiting for the mutex)
                task.cancel()
        finally:
            task.cancel()  # also if this wait was cancelled
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def commit(self, new: TusState) -> int:
        """Swap in the PATCH's state; 423 if the lock was really lost meanwhile."""
        await self.stop()
        async with self._mutex:
            try:
                await self._swap_own(new)
            except ProxyError as err:
                # The commit may have landed, its answer late or an error (a commit writes
                # no lock, so ``_swap_own`` cannot tell it by the owner): the state read
                # back is exactly the one sent, then it is this PATCH's.
                if not await self._read_back(lambda s: s == new, "commit"):
                    if isinstance(err, PreconditionFailed | NoSuchKey):
                        raise self._lost(new) from None
                    raise
        return new.offset

    def _lost(self, new: TusState) -> ProxyError:
        """A commit refused because another request changed the state: the lock was lost."""
        self.lost = True
        log.warning(
            "tus.commit_lost_lock id=%s owner=%s offset=%d",
            self.store.upload.id,
            self.owner,
            new.offset,
        )
        return ProxyError(UPLOAD_LOCKED, "this PATCH lost its lock (it stalled); HEAD and resume")

    async def release(self) -> None:
        """Give the lock back after a failed PATCH, best effort (else it goes stale); only
        while the state still carries this lease's owner."""
        await self.stop()
        if self.lost or not self.etag:
            return
        self.state.lock = None

        async def give_back() -> None:
            try:
                async with self.deadline.bound(self.seconds):
                    await self._swap_own(self.state)
                log.info("tus.lock_released id=%s owner=%s", self.store.upload.id, self.owner)
            except (PreconditionFailed, NoSuchKey):
                pass  # another request holds the upload now: its lock is not ours to drop
            except ShutdownDeadline as err:
                what = f"tus lock id={self.store.upload.id} owner={self.owner}"
                abandon(what, Kind.TUS_PATCH, err)
            except Exception as err:  # best effort: the lock goes stale after the lease
                log.warning(
                    "tus.lock_release_failed id=%s owner=%s error=%s",
                    self.store.upload.id,
                    self.owner,
                    err,
                )

        await finish(give_back())  # to its end even if the PATCH is being cancelled
