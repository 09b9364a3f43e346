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

A recheck (``recheck_late``: a removal made again later, for a write S3 may still carry
out) outlives no process: at shutdown those due before the deadline run then, each with
one more run just before the deadline, and each whose write may still land after the
exit is logged abandoned too, with until when and what removes it if it does.

Once shutdown begins, one ``Deadline`` bounds all of it: every cleanup call (in a
request or the janitor's), the last try, a cut tus PATCH's commit and lock release, the
rollback notice. Past it a cleanup is not tried or retried but logged abandoned, so the
process exits within ``--drain-delay`` + ``--shutdown-timeout`` + 5 s whatever S3 does
(an outside probe measured 128.6 s with S3 holding every answer, when each call had
its own 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

log = logging.getLogger("s3proxy.janitor")

CLEANUP_TIMEOUT = 30.0  # seconds one abort or delete may take
LAST_TRY_TIMEOUT = 5.0  # seconds the last try at close may take (all at once): exit stays prompt
# Seconds after --shutdown-timeout that the cleanup of cut uploads and the last try get,
# together: with aiohttp's EXIT_GRACE (1 s) and the exit itself it stays within the 5 s
# the README gives beyond --drain-delay + --shutdown-timeout.
SHUTDOWN_CLEANUP = 3.0
# Seconds before that deadline that a recheck's last run begins: as late as may be, for
# a write held on the way to land first, with time left for its HeadObject and delete.
FINAL_RECHECK_LEAD = 1.0
Cleanup = Callable[[], Awaitable[None]]
# Seconds until a retry while a cleanup must come back sooner than the janitor's own
# cadence (it holds something that lapses: a tus lock), else None.
Pace = Callable[[], float | None]
T = TypeVar("T")


class Kind(enum.Enum):
    """What a cleanup undoes, which alone says what removes it if this process cannot
    (``advice``); passed with every cleanup, beside its label for the log."""

    UPLOAD = "upload"  # an open multipart upload: ``abort key=... upload_id=...``
    TUS_UPLOAD = "tus_upload"  # a tus upload's objects: ``tus creation|end|segments|state``
    OBJECT = "object"  # the object of a request answered failure: ``delete``, ``rollback``
    # a presigned upload's object whose size check could not run: a retried complete
    # may have reported it stored (``delete key=... reason=size_unchecked``)
    OBJECT_SIZE_UNCHECKED = "object_size_unchecked"
    TUS_PATCH = "tus_patch"  # a cut PATCH's commit or lock release: ``tus commit|lock``
    CLAIM = "claim"  # a presigned complete's claim on its upload: ``claim key=...``
    # a presigned complete S3 may carry out after its 504: kept and told by a later check
    # or a retried complete (``check key=...``)
    COMPLETE_UNANSWERED = "complete_unanswered"
    # a shared key's sha256 tag, which may have landed on another upload's object
    # (``tag_check``): ``tag key=... nonce=...``
    TAG = "tag"


def next_try(interval: float, attempt: int, paced: float | None) -> float:
    """Seconds before a failed cleanup's next try: ``paced`` if given, else ``interval``
    times the attempt, at most a minute. Pure."""
    return paced if paced is not None else min(interval * attempt, 60.0)


def late_delays(window: float) -> tuple[float, ...]:
    """When a removal is made again after a write that may land late (``again_after``):
    ``window`` seconds on (2 x --s3-read-timeout: an attempt held that long has landed or
    is lost) and 4x that (8 x); none for no window. Pure."""
    return (window, 4 * window) if window > 0 else ()


def recheck_late(
    janitor: Janitor | None, fn: Cleanup, what: str, window: float, kind: Kind | None = None
) -> None:
    """Make the removal ``fn`` again at ``late_delays(window)``: what it removes was made
    by a write an attempt of which went unanswered (``s3.Written.may_land_late``), or whose
    answer never came, and S3 may carry that attempt out after the removal. ``fn`` must be
    safe to repeat and touch only what this request made (its own key, or If-Match/nonce).
    ``kind`` (an object, unless told): what removes it if it lands after this process
    exits, for the ``cleanup.abandoned`` line shutdown writes then; ``what`` names the
    condition (``nonce=``, ``etag=``, ``tus_id=``)."""
    delays = late_delays(window)
    if janitor is not None and delays:
        janitor.again_after(fn, what, delays, Kind.OBJECT if kind is None else kind)


def shutdown_runs(
    dues: Sequence[float], now: float, deadline: float | None, lead: float
) -> tuple[list[float], bool]:
    """At shutdown, when (loop time) a recheck still due at ``dues`` runs before the exit,
    and whether a write may still land after it (it is logged abandoned). Those due by
    ``lead`` seconds before the deadline run at their time; if any is due later, one more
    runs then (at once if that is past, while the deadline is not), the last look this
    process takes. No deadline (closed without a drain): none runs. Pure."""
    if deadline is None:
        return [], bool(dues)
    last = deadline - lead
    runs = [at for at in dues if at <= last]
    later = len(runs) < len(dues)
    if later and now < deadline:
        runs.append(max(now, last))
    return runs, later


class ShutdownDeadline(TimeoutError):
    """A cleanup cut short because the shutdown's deadline passed."""


def due(now: float, limit: float | None, deadline: float | None) -> float | None:
    """When a cleanup begun at ``now`` must end: ``limit`` seconds on (None: no limit of
    its own), and never after the shutdown's ``deadline`` (None: none yet). None: unbounded."""
    ends = None if limit is None else now + limit
    if deadline is None:
        return ends
    return deadline if ends is None else min(ends, deadline)


def abandoned(now: float, deadline: float | None, closed: bool) -> bool:
    """Is a failed cleanup given up now rather than handed on for a retry? Once the janitor
    closed (no retry will ever run) or the shutdown's deadline passed (none may)."""
    return closed or (deadline is not None and now >= deadline)


class Deadline:
    """The one moment (loop time), once shutdown began, by which every cleanup ends.

    Until ``set`` it bounds nothing. Setting it also cuts the bounds already running
    (``bound``), so a cleanup begun before shutdown with its own 30 s ends by it too."""

    def __init__(self) -> None:
        self.at: float | None = None
        self._scopes: set[asyncio.Timeout] = set()

    def set(self, at: float) -> None:
        self.at = at if self.at is None else min(self.at, at)
        for scope in self._scopes:
            if not scope.expired():
                scope.reschedule(_earlier(scope.when(), self.at))

    def passed(self) -> bool:
        return abandoned(asyncio.get_running_loop().time(), self.at, closed=False)

    @contextlib.asynccontextmanager
    async def bound(self, limit: float | None) -> AsyncIterator[None]:
        """Run the body for at most ``limit`` seconds (None: no limit of its own) and not
        past the deadline: TimeoutError, or ShutdownDeadline when the deadline cut it."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(due(loop.time(), limit, self.at)) as scope:
                self._scopes.add(scope)
                try:
                    yield
                finally:
                    self._scopes.discard(scope)
        except TimeoutError as exc:
            if self.at is not None and loop.time() >= self.at:
                raise ShutdownDeadline("the shutdown deadline passed") from exc
            raise


def _earlier(when: float | None, at: float) -> float:
    return at if when is None else min(when, at)


@dataclass
class Recheck:
    """A removal made again later (``Janitor.again_after``)."""

    fn: Cleanup
    what: str
    # What removes it if its write lands after the exit (``advice``); None: a precaution
    # that shutdown drops quietly (a presigned complete's claim, which lapses by itself).
    kind: Kind | None
    dues: list[float]  # loop times of the runs still to come, earliest first
    until: float  # wall clock time of the last: a late write may land until then


def wall_clock(at: float) -> str:
    """A wall clock time for a log line, UTC to the second. Pure."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Janitor:
    """Retries failed cleanup calls until they succeed or ``give_up_after`` passes; at
    shutdown, ``deadline`` bounds them all."""

    def __init__(self, interval: float = 5.0, give_up_after: float = 3600.0) -> None:
        self.interval = interval
        self.give_up_after = give_up_after
        self.deadline = Deadline()
        self.closed = False  # close() began: what fails from now on is abandoned
        # owed: tried at close
        self._tasks: dict[asyncio.Task[None], tuple[Cleanup, str, Kind]] = {}
        self._rechecks: dict[asyncio.Task[None], Recheck] = {}

    def gone(self) -> bool:
        """No later try will come (``abandoned``)."""
        loop = asyncio.get_running_loop()
        return abandoned(loop.time(), self.deadline.at, self.closed)

    def time_for(self, limit: float) -> float:
        """Seconds a cleanup starting now may take: ``limit``, and not past the deadline."""
        now = asyncio.get_running_loop().time()
        ends = due(now, limit, self.deadline.at)
        return limit if ends is None else max(0.0, ends - now)

    def retry(
        self,
        fn: Cleanup,
        what: str,
        kind: Kind,
        error: BaseException | None = None,
        pace: Pace | None = None,
    ) -> None:
        """Retry ``fn`` in the background: after ``interval`` seconds times the attempt
        (at most 60), or, while ``pace`` names one, after that many seconds."""
        if self.gone():
            abandon(what, kind, error)
            return
        task = asyncio.create_task(self._retry(fn, what, kind, pace), name=f"cleanup-{what}")
        self._tasks[task] = (fn, what, kind)
        task.add_done_callback(lambda t: self._tasks.pop(t, None))

    def again_after(
        self, fn: Cleanup, what: str, delays: Sequence[float], kind: Kind | None = None
    ) -> None:
        """Run ``fn`` once more after each delay: for a write whose answer never came,
        which S3 may still carry out after the rollback deleted its key (a request held
        on the way lands late). ``fn`` must be safe to repeat. Once closed (shutdown),
        the runs due before the deadline are made and the rest logged (``close``)."""
        if not delays:
            return
        now = asyncio.get_running_loop().time()
        ordered = sorted(delays)
        recheck = Recheck(fn, what, kind, [now + d for d in ordered], time.time() + ordered[-1])
        if not self.closed:
            self._start(self._again(recheck), recheck)
        elif kind is not None:  # scheduled by a request cut at shutdown: not lost
            self._start(self._at_shutdown(recheck), recheck)
        else:
            log.debug("cleanup.recheck_dropped what=%s", what)

    def _start(self, run: Awaitable[None], recheck: Recheck) -> None:
        task = asyncio.ensure_future(run)
        task.set_name(f"recheck-{recheck.what}")
        self._rechecks[task] = recheck
        task.add_done_callback(lambda t: self._rechecks.pop(t, None))

    async def _again(self, recheck: Recheck) -> None:
        loop = asyncio.get_running_loop()
        while recheck.dues:
            await asyncio.sleep(max(0.0, recheck.dues[0] - loop.time()))
            recheck.dues.pop(0)
            await self._recheck(recheck)

    async def _at_shutdown(self, recheck: Recheck) -> None:
        """A recheck's runs before the exit (``shutdown_runs``); logged abandoned if its
        write may still land after it."""
        loop = asyncio.get_running_loop()
        runs, later = shutdown_runs(recheck.dues, loop.time(), self.deadline.at, FINAL_RECHECK_LEAD)
        for at in runs:
            await asyncio.sleep(max(0.0, at - loop.time()))
            await self._recheck(recheck)
        if later and recheck.kind is not None:
            abandon_late(recheck.what, recheck.kind, recheck.until)

    async def _recheck(self, recheck: Recheck) -> None:
        try:
            async with self.deadline.bound(CLEANUP_TIMEOUT):
                await recheck.fn()
        except Exception as exc:
            log.warning("cleanup.recheck_failed what=%s error=%r", recheck.what, exc)

    async def rechecked(self) -> None:
        """Once closed: until every recheck has made its runs before the exit (each ends by
        the deadline), those scheduled meanwhile included."""
        while pending := [task for task in self._rechecks if not task.done()]:
            await asyncio.wait(pending)

    async def _retry(self, fn: Cleanup, what: str, kind: Kind, pace: Pace | None) -> None:
        deadline = time.monotonic() + self.give_up_after
        attempt = 1
        while time.monotonic() < deadline:
            await asyncio.sleep(next_try(self.interval, attempt, None if pace is None else pace()))
            attempt += 1
            try:
                async with self.deadline.bound(CLEANUP_TIMEOUT):
                    await fn()
            except Exception as exc:
                log.debug("cleanup.retry_failed what=%s attempt=%d error=%r", what, attempt, exc)
                continue
            log.info("cleanup.retried what=%s attempts=%d", what, attempt)
            return
        log.error("cleanup.gave_up what=%s; %s", what, advice(kind))

    async def close(self, last_try: float = LAST_TRY_TIMEOUT) -> None:
        """Stop retrying; give every cleanup still owed one last try (all at once, within
        ``last_try`` seconds and the deadline), and log each that still fails with what
        undoes it, as every cleanup that fails from now on. The rechecks run before the
        deadline what is due by then, and one more just before it (``shutdown_runs``);
        what may still land after the exit is logged. Once: again, it does nothing."""
        if self.closed:
            return
        self.closed = True
        owed = list(self._tasks.values())
        rechecks = dict(self._rechecks)
        dropped = sum(1 for recheck in rechecks.values() if recheck.kind is None)
        if dropped:
            log.info("cleanup.rechecks_dropped count=%d", dropped)
        tasks = [*self._tasks, *rechecks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for recheck in rechecks.values():
            if recheck.kind is not None:
                self._start(self._at_shutdown(recheck), recheck)
        if owed:
            log.info("cleanup.last_try count=%d", len(owed))
            await asyncio.gather(*(self._last_try(*duty, last_try) for duty in owed))
        await self.rechecked()

    async def _last_try(self, fn: Cleanup, what: str, kind: Kind, seconds: float) -> None:
        try:
            async with self.deadline.bound(seconds):
                await fn()
        except Exception as exc:
            abandon(what, kind, exc)
            return
        log.info("cleanup.retried what=%s attempts=last", what)


def abandon(what: str, kind: Kind, error: BaseException | None) -> None:
    """The one line for a cleanup this process will not do, with what undoes it."""
    log.error("cleanup.abandoned what=%s error=%r; %s", what, error, advice(kind))


def abandon_late(what: str, kind: Kind, until: float) -> None:
    """The one line for a recheck this process will not make: the write it was for, S3
    never having answered it, may still store its object (or state) after the exit."""
    log.error(
        "cleanup.abandoned what=%s reason=late_write until=%s; a write S3 had not answered "
        "may still land until then, after this process exits: if it does, %s",
        what,
        wall_clock(until),
        advice(kind),
    )


async def by_deadline(aw: Awaitable[None], what: str, kind: Kind, janitor: Janitor | None) -> None:
    """Await ``aw`` (a cleanup with no limit of its own: a commit, a notice), but not past
    the shutdown's deadline: cut there, it is logged abandoned, not raised."""
    if janitor is None:
        await aw
        return
    try:
        async with janitor.deadline.bound(None):
            await aw
    except ShutdownDeadline as exc:
        abandon(what, kind, exc)


def advice(kind: Kind) -> str:
    """What undoes a cleanup of this kind that the process could not do, for its log line."""
    match kind:
        case Kind.CLAIM:  # it lapses by itself
            return (
                "nothing to do: a retried complete is answered 409 COMPLETE_IN_PROGRESS until "
                "the claim lapses, and the sweep deletes it"
            )
        case Kind.TUS_PATCH:  # the upload goes on
            return "nothing to do: the upload resumes from its last commit once its lock lapses"
        case Kind.UPLOAD | Kind.TUS_UPLOAD:
            return "`s3proxy cleanup --execute` removes it (once idle or expired)"
        case Kind.OBJECT_SIZE_UNCHECKED:  # a retry may have reported it stored
            return (
                "nothing removes it later: delete it by hand if its size is not its "
                'x-amz-meta-s3proxy-size (README "Operating it")'
            )
        case Kind.COMPLETE_UNANSWERED:  # the client was told to retry the complete
            return (
                "a retried complete answers for it (200 and the webhook told, or deleted if "
                "its size is wrong); if none comes, it stays unannounced: check its size "
                'against its x-amz-meta-s3proxy-size by hand (README "Operating it")'
            )
        case Kind.TAG:
            return (
                "its sha256 tag may be on another upload's object at the key: remove the tag "
                'if it is not the hash of that object\'s bytes (README "Operating it")'
            )
        case Kind.OBJECT:
            return (
                "the object of a failed request stays, nothing removes it later: delete it "
                'by hand (README "Operating it")'
            )


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
    fn: Cleanup,
    what: str,
    janitor: Janitor | None = None,
    *,
    kind: Kind,
    retry: Cleanup | None = None,
    pace: Pace | None = None,
) -> bool:
    """Run one cleanup call to the end even if we are being cancelled; never raise for it
    (but re-raise the caller's cancellation once it is done). True if it succeeded (False:
    it went to the janitor, or was abandoned).

    If it fails, hand it to the janitor to retry (or log, without one): ``fn`` again, or
    ``retry`` when what ``fn`` undoes may have become right meanwhile (a later request
    may report as stored the object ``fn`` deletes: ``retry`` checks before it deletes);
    at ``pace`` while that names a delay (``Janitor.retry``).
    """
    return await finish(_attempt(fn, what, kind, janitor, retry, pace))


async def run_cleanups(calls: Sequence[tuple[Cleanup, str, Kind]], janitor: Janitor | None) -> bool:
    """``run_cleanup`` for several calls at once: each one runs (and, failing, goes to the
    janitor) whatever happens to the others or to the caller. True if all succeeded."""
    if not calls:
        return True
    done = await finish(asyncio.gather(*(_attempt(*call, janitor) for call in calls)))
    return all(done)


async def _attempt(
    fn: Cleanup,
    what: str,
    kind: Kind,
    janitor: Janitor | None,
    retry: Cleanup | None = None,
    pace: Pace | None = None,
) -> bool:
    try:
        async with _bound(janitor, CLEANUP_TIMEOUT):
            await fn()
    except Exception as exc:
        if janitor is not None and janitor.gone():
            abandon(what, kind, exc)  # at the shutdown's deadline: no retry will come
            return False
        if janitor is None:
            log.error("cleanup.failed what=%s error=%r", what, exc)
            return False
        # A WARNING: the janitor retries it, and only what it cannot do at last (gave_up,
        # abandoned) is an ERROR, an operator's to act on. A blip of S3's made ERROR lines
        # for cleanups that were done seconds later.
        log.warning("cleanup.failed what=%s error=%r action=retry", what, exc)
        janitor.retry(fn if retry is None else retry, what, kind, exc, pace)
        return False
    return True


def _bound(janitor: Janitor | None, limit: float) -> contextlib.AbstractAsyncContextManager[None]:
    """``limit`` seconds, and not past the janitor's shutdown deadline."""
    return (Deadline() if janitor is None else janitor.deadline).bound(limit)
