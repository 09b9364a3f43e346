"""A tus PATCH's lock on its upload, held in the state object in S3 (swapped with
If-Match), renewed while the PATCH runs: the only mutual exclusion between instances.

A swap that raised may have landed all the same (its answer lost, the retry refused 412
by it; or an error after S3 stored it), so the state is read back, and the read has three
outcomes, not two: this lease's write, another state, or no answer (S3 trouble). What
each comes to is one pure function (``settle``). No answer is never taken for "another
request won" (423): the PATCH is answered the S3 error (5xx), and a lock that may be this
lease's in the state is given back in the background (``holds``, ``lapsed``), as is one
whose release S3 refused, once S3 answers again, not left to lapse after the lease."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import time
import uuid
from collections.abc import Callable

from s3proxy.errors import UPLOAD_LOCKED, ProxyError
from s3proxy.janitor import Deadline, Janitor, Kind, ShutdownDeadline, abandon, finish
from s3proxy.s3 import NoSuchKey, PreconditionFailed
from s3proxy.tus_state import Lock, TusState, TusStore

log = logging.getLogger("s3proxy.tus")

# Seconds at most between tries at giving back a lock in the background: the upload frees
# within about this long of S3 answering again (a third of the lease if that is shorter).
GIVE_BACK_EVERY = 1.0
LOST_LOCK = "this PATCH lost its lock (it stalled); HEAD and resume"


class Unread(enum.Enum):
    """The state could not be read back (S3 trouble): nobody can tell whose it is."""

    UNREAD = "unread"


UNREAD = Unread.UNREAD


class Outcome(enum.Enum):
    """What a swap that raised comes to, once its state is read back (``settle``)."""

    HELD = "held"  # it landed: the state is this lease's write, at the ETag read
    LOCKED = "locked"  # refused, and the state is another's: another request changed it
    FAILED = "failed"  # S3 failed it, and the state is not this lease's: its S3 error
    UNKNOWN = "unknown"  # S3 trouble hides whether it landed: an S3 error (5xx), never 423


def settle(
    found: TusState | Unread | None, mine: Callable[[TusState], bool], refused: bool
) -> Outcome:
    """What a swap that raised comes to: ``found`` is the state read back (None: there is
    none; UNREAD: the read failed), ``mine`` tells this lease's own write, ``refused`` says
    the swap was refused (412, NoSuchKey) rather than failed by S3. Pure."""
    if found is UNREAD:
        return Outcome.UNKNOWN
    if found is not None and mine(found):
        return Outcome.HELD
    return Outcome.LOCKED if refused else Outcome.FAILED


def refused(err: ProxyError) -> bool:
    """A swap refused because the state changed (or went), not failed by S3 trouble."""
    return isinstance(err, PreconditionFailed | NoSuchKey)


def s3_error(swap: ProxyError, read: ProxyError) -> ProxyError:
    """The answer when S3 trouble hid a swap's outcome: the swap's own S3 error, or, when
    it was refused (by its own earlier attempt, maybe), the read's. A 5xx either way. Pure."""
    return read if refused(swap) else swap


def holds(found: TusState | None, owner: str) -> bool:
    """Whether the state read carries ``owner``'s lock (a background give-back drops it
    then, and only then: another PATCH's lock is not its to drop). Pure."""
    return found is not None and found.lock is not None and found.lock.owner == owner


def lapsed(until: float, now: float, skew: float) -> bool:
    """Whether a lock held to ``until`` has lapsed for every instance (``TusState.locked``):
    past that, any PATCH takes the upload over and a give-back has nothing left to do. Pure."""
    return now > until + skew


def give_back_every(lease: float) -> float:
    """Seconds between a background give-back's tries: ``GIVE_BACK_EVERY``, or a third of
    the lease (its renewal period) if that is shorter. Pure."""
    return min(GIVE_BACK_EVERY, lease / 3)


def watch_times(every: float, span: float) -> tuple[float, ...]:
    """When (seconds from now) to look for a lock swap that may still land: every
    ``every`` seconds while ``span`` lasts (until the lock lapses for all). Pure."""
    if every <= 0:
        return ()
    return tuple(every * i for i in range(1, int(span // every) + 1))


class Lease:
    """A PATCH's hold on its upload: the lock swapped into the state, renewed every third
    of the lease while the PATCH runs, released (or replaced by the commit) at its end.

    A PATCH must never lose its lock to its own renewal. So the renewal is stopped only
    between swaps (``stop`` takes the mutex, the cancel lands on the sleep), and a swap
    whose answer was lost (a timeout, a cancellation after sending) leaves a stale ETag
    that ``_swap_own`` recovers from: a 412 over a state still carrying this lease's owner
    is our own write, as nobody else writes without replacing the owner.

    A lock that may be left in the state when the PATCH ends (S3 trouble hid its swap, or
    refused its release) is given back by the ``janitor`` in the background; without one
    it lapses after the lease."""

    def __init__(
        self,
        store: TusStore,
        current: TusState,
        seconds: float,
        skew: float,
        janitor: Janitor | None = None,  # the app's: its deadline bounds a release too
    ) -> None:
        self.store = store
        self.janitor = janitor
        self.deadline = Deadline() if janitor is None else janitor.deadline
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
        lock = self.state.lock = Lock(self.owner, now + self.seconds)
        try:
            self.etag = await self.store.swap(self.state, etag)
        except ProxyError as err:
            # Often our own swap: it landed, its answer was lost and the retry was refused
            # (or it was answered 500 after S3 stored it). Then the lock is ours.
            outcome, error = await self._read_back(err, lambda s: holds(s, self.owner), "lock")
            if outcome is Outcome.LOCKED:
                raise ProxyError(
                    UPLOAD_LOCKED, "another request changed this upload first"
                ) from err
            if outcome in (Outcome.UNKNOWN, Outcome.FAILED):
                # The swap may be in the state unseen (UNKNOWN), or still land, an attempt
                # held on its way whose If-Match matches yet (either): a lock of a PATCH that
                # has ended, nobody else drops it.
                self._watch_own_lock(lock.until, now, outcome)
            if outcome is not Outcome.HELD:
                if error is err:
                    raise
                raise error from err
        self._task = asyncio.create_task(self._renew(), name="tus-lease")

    async def _read_back(
        self, err: ProxyError, mine: Callable[[TusState], bool], what: str
    ) -> tuple[Outcome, ProxyError]:
        """What the swap that raised ``err`` comes to (``settle``), by the state read back
        (``mine``: this lease's own write), and the error to answer unless HELD. HELD: the
        lease holds the state, at the ETag read."""
        found: tuple[TusState, str] | Unread | None = UNREAD
        error = err
        try:
            found = await self.store.read()
        except ProxyError as read_err:
            error = s3_error(err, read_err)
            log.warning(
                "tus.%s_unknown id=%s owner=%s error=%s read_error=%s",
                what,
                self.store.upload.id,
                self.owner,
                err,
                read_err,
            )
        state = found[0] if isinstance(found, tuple) else found
        outcome = settle(state, mine, refused(err))
        if outcome is Outcome.HELD and isinstance(found, tuple):
            log.info("tus.%s_recovered id=%s owner=%s", what, self.store.upload.id, self.owner)
            self.etag = found[1]
        return outcome, error

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
                try:
                    held = await self._extend()
                except ProxyError as err:  # S3 trouble: the next renewal may make it
                    log.warning("tus.lock_renew_failed id=%s error=%s", self.store.upload.id, err)
                    continue
                if not held:
                    log.warning("tus.lock_lost id=%s owner=%s", self.store.upload.id, self.owner)
                    return

    async def _extend(self) -> bool:
        """Swap the lock a lease further on (under the mutex); False, and ``lost``, if
        another request changed the state meanwhile. S3 trouble raises."""
        self.state.lock = Lock(self.owner, time.time() + self.seconds)
        try:
            await self._swap_own(self.state)
        except (PreconditionFailed, NoSuchKey):
            self.lost = True
            return False
        return True

    async def confirm(self) -> None:
        """Renew the lock now, by a swap: before the PATCH writes the upload's object, which
        no state swap guards. 423 if another request changed the state meanwhile (the lock
        lapsed while this PATCH stalled: another PATCH or a DELETE took the upload over);
        S3 trouble raises its error (5xx), and nothing is written either way."""
        if self.lost:
            raise self._lost_lock()
        async with self._mutex:
            if not await self._extend():
                raise self._lost_lock()

    def _lost_lock(self) -> ProxyError:
        log.warning("tus.store_lost_lock id=%s owner=%s", self.store.upload.id, self.owner)
        return ProxyError(UPLOAD_LOCKED, LOST_LOCK)

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
        """Swap in the PATCH's state; 423 if the lock was really lost meanwhile, the S3
        error (5xx) if S3 trouble hides whether it landed (the client HEADs and resumes)."""
        await self.stop()
        async with self._mutex:
            try:
                await self._swap_own(new)
            except ProxyError as err:
                # The commit may have landed, its answer late or an error (a commit writes
                # no lock, so ``_swap_own`` cannot tell it by the owner): the state read
                # back is exactly the one sent, then it is this PATCH's. Unread, it may be
                # too: the release that follows finds no lock of ours if so.
                outcome, error = await self._read_back(err, lambda s: s == new, "commit")
                if outcome is Outcome.LOCKED:
                    raise self._lost(new) from None
                if outcome is not Outcome.HELD:
                    if error is err:
                        raise
                    raise error from err
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
        return ProxyError(UPLOAD_LOCKED, LOST_LOCK)

    async def release(self) -> None:
        """Give the lock back after a failed PATCH, only while the state still carries this
        lease's owner; refused by S3 trouble, the janitor gives it back once S3 answers."""
        await self.stop()
        if self.lost or not self.etag:
            return
        until = 0.0 if self.state.lock is None else self.state.lock.until
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
            except Exception as err:  # S3 trouble: given back once S3 answers again
                log.warning(
                    "tus.lock_release_failed id=%s owner=%s error=%s",
                    self.store.upload.id,
                    self.owner,
                    err,
                )
                self._give_back_later(until, err, "release_failed")

        await finish(give_back())  # to its end even if the PATCH is being cancelled

    def _give_back_later(self, until: float, err: BaseException, reason: str) -> None:
        """Have the janitor give back this lease's lock (held to ``until``), which may be
        in the state though the PATCH ends: every ``give_back_every`` seconds, so the
        upload frees soon after S3 answers again. Without a janitor it lapses after the
        lease (and the clock skew)."""
        if self.janitor is None:
            log.warning(
                "tus.lock_left id=%s owner=%s reason=%s; it lapses after the lease",
                self.store.upload.id,
                self.owner,
                reason,
            )
            return
        log.info(
            "tus.lock_give_back id=%s owner=%s reason=%s", self.store.upload.id, self.owner, reason
        )
        every = give_back_every(self.seconds)
        self.janitor.retry(
            functools.partial(self._give_back, until),
            f"tus lock id={self.store.upload.id} owner={self.owner}",
            Kind.TUS_PATCH,
            err,
            pace=lambda: every,
        )

    def _watch_own_lock(self, until: float, now: float, outcome: Outcome) -> None:
        """After a lock swap that S3 failed (``take``): have the janitor look at the state
        every ``give_back_every`` seconds until the lock (held to ``until``) lapses, and give
        it back if it is there, landed unseen or late. Not only until the first look that
        finds none: an attempt held on its way lands after it (an S3 chaos run: every PATCH
        and DELETE 423 for the lease). Dropped quietly at shutdown, as such a lock lapses all
        the same. Without a janitor, a lock that may be there is logged as left."""
        what = f"id={self.store.upload.id} owner={self.owner} reason={outcome.value}"
        if self.janitor is None:
            if outcome is Outcome.UNKNOWN:
                log.warning("tus.lock_left %s; it lapses after the lease", what)
            return
        log.info("tus.lock_give_back %s", what)
        self.janitor.again_after(
            functools.partial(self._look_for_own, until),
            f"tus lock id={self.store.upload.id} owner={self.owner}",
            watch_times(give_back_every(self.seconds), until + self.skew - now),
        )

    async def _look_for_own(self, until: float) -> None:
        """One of ``_watch_own_lock``'s looks. S3 trouble is not logged: the next look
        tries again, and the lock lapses all the same (an S3 outage would make a line a
        second per failed PATCH)."""
        try:
            await self._give_back(until)
        except ProxyError as exc:
            log.debug("tus.lock_look_failed id=%s error=%s", self.store.upload.id, exc)

    async def _give_back(self, until: float) -> None:
        """One try at dropping this lease's lock from the state, the janitor's: done when
        the state carries no lock of this lease's, or once the lock has lapsed for all;
        raises (S3 trouble, or the state changed since the read: 412) to be tried again."""
        if lapsed(until, time.time(), self.skew):
            return  # any PATCH takes the upload over now: nothing left to give back
        found = await self.store.read()
        if found is None or not holds(found[0], self.owner):
            return  # given back, committed, or another PATCH's now: not ours to drop
        with contextlib.suppress(NoSuchKey):  # the upload ended meanwhile
            await self.store.swap(dataclasses.replace(found[0], lock=None), found[1])
            log.info(
                "tus.lock_released id=%s owner=%s by=janitor", self.store.upload.id, self.owner
            )
