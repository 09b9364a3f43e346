"""A presigned multipart complete's claim on its upload: one complete at a time, on any instance.

Two completes of one upload (a client's retry through another instance, or after a
lost answer) used to run at once, and the one that found the object the other stored
answered 200 for it while the other could still delete it on its own failure paths (a
webhook rollback, a size check that could not run): the object gone after a 200
(reprobe7 F2, 2 of 2 times for each). Instances share nothing but S3, so the claim is
an object there::

    .s3proxy/presign/<sha256 of key and upload id>   {"owner", "until", "key", "upload_id"}

written with ``If-None-Match: *`` before the complete's first S3 call and deleted (with
``If-Match``, only our own) once it has decided: answered, and every delete it owes
done. Another complete of the upload meanwhile is refused 409 COMPLETE_IN_PROGRESS.

A claim is held on a short lease, renewed while the complete runs, as a tus PATCH holds
its lock: every third of ``lease`` the holder rewrites it (``If-Match`` its ETag) with
``until`` (its wall clock, plus ``--cleanup-clock-skew`` when another instance judges it)
``lease`` seconds on. A claim whose instance died so lapses ``lease`` after its last
renewal, whatever the complete was doing (its S3 calls, its webhook), and the next
complete takes it over (``If-Match`` on the lapsed one, so only one does). A holder must
not delete anything another complete may answer 200 for: ``Claim.may_delete`` counts the
lease on this process's monotonic clock from before the last renewal S3 acknowledged, and
keeps a margin (``delete_bound``) for the delete itself to land; a renewal refused (the
claim lapsed and was taken over: lost) or failing for long stops its deletes. So whatever
the timing, no complete answers 200 for an object another may still delete. The lease is
only long enough that a renewal with one attempt timed out still keeps the holder
deleting (``lease``): about 10 minutes with the defaults.

A claim write whose answer was lost may be carried out by S3 after the release deleted
the claim (a request held on the way): the claim would stand with nobody to release it,
and every retry of the complete be refused till it lapsed (reprobe9a F5). So a release
after such a write is made again later (``janitor.recheck_late``), by owner: only a claim
carrying this complete's owner goes. Renewals and take-overs write with ``If-Match``: they
never bring a deleted claim back.

Why not the object's age instead (HeadObject's Date minus its Last-Modified, all on S3's
clock)? On AWS a multipart object's Last-Modified is when its upload was *created*, not
completed (lakeFS #8303): an upload made an hour ago and completed just now looks an hour
old. Completes are rare (one per large file), so the two small calls of a claim (and a
renewal every few minutes of a long one) cost nothing that shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from s3proxy import limits
from s3proxy.errors import COMPLETE_IN_PROGRESS, ProxyError
from s3proxy.janitor import CLEANUP_TIMEOUT, Janitor, Kind, recheck_late, run_cleanup
from s3proxy.keys import RESERVED_NAMESPACE
from s3proxy.s3 import (
    NoSuchKey,
    ObjectOptions,
    ObjectStore,
    PreconditionFailed,
    Written,
    object_pages,
    read_small,
)
from s3proxy.settings import Settings

log = logging.getLogger("s3proxy.presign")

PREFIX = RESERVED_NAMESPACE + "presign/"
RETRY_AFTER = 2  # seconds: a complete decides in well under that while S3 answers
MARGIN = 5.0  # seconds: whole-second clocks, scheduling
_OPTIONS = ObjectOptions(content_type="application/json")


def upload_digest(key: str, upload_id: str) -> str:
    """The name of an upload's own objects (its claim, its record): the SHA-256 of its
    key and upload id, so any key fits in one flat name. Pure."""
    name = f"{key}\n{upload_id}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(name).hexdigest()


def claim_key(key: str, upload_id: str) -> str:
    """Where the claim on this upload lives. Pure."""
    return PREFIX + upload_digest(key, upload_id)


def delete_bound(s: Settings) -> float:
    """Seconds from sending a delete until it has certainly landed or never will: one
    cleanup call (``CLEANUP_TIMEOUT``, at most the S3 call's own bound) and the window a
    request held on the way may still land in (2 x --s3-read-timeout, as for late writes)."""
    return min(CLEANUP_TIMEOUT, limits.s3_call_time(s)) + 2 * s.s3_read_timeout


def renew_time(s: Settings) -> float:
    """Seconds a renewal takes while S3 is slow but there: one attempt that waits out its
    connect and read timeouts, and the retry that gets through (the margin's)."""
    return s.s3_connect_timeout + s.s3_read_timeout


def lease(s: Settings) -> float:
    """Seconds a claim stands after its last renewal: how long a retry waits (409) after an
    instance died mid-complete, about 10 minutes with the defaults. Renewed every third of
    it (``renew_every``), the last acknowledged renewal began at most a third plus
    ``renew_time`` ago, and the holder may delete while ``delete_bound`` of it is left:
    ``lease - lease / 3 - renew_time >= delete_bound``. Not how long a complete takes (its
    S3 calls, its webhook): the renewals cover that, however many calls it makes. Pure."""
    return 1.5 * (delete_bound(s) + renew_time(s)) + MARGIN


def renew_every(seconds: float) -> float:
    """Seconds between renewals of a claim on a lease of ``seconds``: a third, as tus's
    lock is renewed. Pure."""
    return seconds / 3


def stands(now: float, ends: float, bound: float) -> bool:
    """Does a claim whose lease ends at ``ends`` (the holder's clock) stand until a delete
    sent at ``now`` has landed (``bound``: ``delete_bound``)? Pure."""
    return now + bound < ends


def hold_steps(hold: float, every: float) -> tuple[float, ...]:
    """When the janitor renews a claim held after its request ended (``every`` seconds),
    and, at the last, releases it (``hold`` seconds on). Pure."""
    steps = [every * n for n in range(1, math.ceil(hold / every))] if every > 0 else []
    return (*steps, max(hold, 0.0))


def lapsed(until: float, now: float, skew: float) -> bool:
    """Has a claim written to last until ``until`` (its writer's clock) lapsed at ``now``
    (ours), clocks apart by up to ``skew``? Pure."""
    return now > until + skew


def in_progress(lapses_in: float | None = None) -> ProxyError:
    """409 COMPLETE_IN_PROGRESS; ``lapses_in``: seconds until the other's claim lapses."""
    dead = "" if lapses_in is None else f" (if its instance died: in {math.ceil(lapses_in)} s)"
    return ProxyError(
        COMPLETE_IN_PROGRESS,
        "another complete of this upload is in progress; retry in a few seconds: the retry "
        f"answers for what that one decided, once it has{dead}",
    )


@dataclass(frozen=True)
class Found:
    """A claim as read back."""

    owner: str
    until: float
    etag: str | None


def parse(raw: bytes, etag: str | None) -> Found:
    """A claim object's body; one that cannot be read counts as lapsed. Pure."""
    try:
        doc = json.loads(raw)
        return Found(str(doc["owner"]), float(doc["until"]), etag)
    except (ValueError, TypeError, KeyError):
        return Found("", 0.0, etag)


@dataclass
class Claim:
    """One complete's hold on its upload (see the module)."""

    sink: ObjectStore
    key: str
    lease: float
    bound: float  # ``delete_bound``: how long before its end a holder stops deleting
    window: float = 0.0  # 2 x --s3-read-timeout: rechecks of a write of ours that may land late
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    etag: str | None = None
    ends: float = 0.0  # loop time the lease ends, from before its last acknowledged write
    released: bool = False
    lost: bool = False  # a renewal found it taken over: it lapsed (this process stalled)
    late: bool = False  # a write of ours went unanswered: it may land after the release
    hold_for: float = 0.0  # seconds to hold it after the request ends (rechecks owed)
    upload: tuple[str, str] = ("", "")  # the key and upload id it claims
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _renewing: bool = False

    def may_delete(self) -> bool:
        """May the holder delete the object now? Only while no other complete can take the
        claim over before the delete has landed."""
        if self.released or self.lost:
            return False
        return stands(asyncio.get_running_loop().time(), self.ends, self.bound)

    def _body(self, until: float) -> bytes:
        key, upload_id = self.upload
        doc = {"owner": self.owner, "until": until, "key": key, "upload_id": upload_id}
        return json.dumps(doc).encode("utf-8", "surrogateescape")

    async def _read(self) -> Found | None:
        try:
            raw, etag = await read_small(self.sink, self.key)
        except NoSuchKey:
            return None
        return parse(raw, etag)

    async def take(self, key: str, upload_id: str, skew: float, janitor: Janitor | None) -> None:
        """Write the claim, or take over a lapsed one, and renew it from then on; 409
        COMPLETE_IN_PROGRESS if another complete holds it. An attempt whose answer was lost
        is recognised by its owner. Any other failure releases what may have landed, and
        again later: a write of ours may still land."""
        self.upload = (key, upload_id)
        try:
            await self._write(skew)
        except BaseException as exc:
            if not (isinstance(exc, ProxyError) and exc.kind is COMPLETE_IN_PROGRESS):
                self.late = True  # it may have landed, or land yet (an error, a cancellation)
                await self.release(janitor)
            raise
        self._task = asyncio.create_task(self._renew(), name=f"claim-{self.key}")

    async def _write(self, skew: float) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(2):  # once more if the other's claim went away as we looked
            started = loop.time()
            body = self._body(time.time() + self.lease)
            try:
                written = await self.sink.put(self.key, [body], _OPTIONS, if_none_match=True)
            except PreconditionFailed:
                found = await self._read()
                if found is None:
                    continue
                if found.owner != self.owner:
                    if not lapsed(found.until, time.time(), skew):
                        raise in_progress(found.until + skew - time.time()) from None
                    await self._take_over(found, body)
                    log.info("presign.claim_taken_over key=%s upload_id=%s", *self.upload)
                else:
                    self.etag = found.etag  # our own, its answer lost: another may land yet
                    self.late = True
            else:
                self.etag = written.etag
                self.late = written.may_land_late
            self.ends = started + self.lease
            return
        raise in_progress()

    async def _take_over(self, found: Found, body: bytes) -> None:
        try:
            written = await self.sink.put(self.key, [body], _OPTIONS, if_match=found.etag)
        except (PreconditionFailed, NoSuchKey):
            mine = await self._read()
            if mine is None or mine.owner != self.owner:  # another complete took it first
                raise in_progress() from None
            self.etag = mine.etag
            return
        self.etag = written.etag

    async def _renew(self) -> None:
        """Renew every third of the lease, from the start of one renewal to the next."""
        loop = asyncio.get_running_loop()
        every = renew_every(self.lease)
        last = self.ends - self.lease  # the take began then
        while not self.lost:
            await asyncio.sleep(max(0.0, last + every - loop.time()))
            last = loop.time()
            await self.renew()

    async def renew(self) -> None:
        """Rewrite the claim ``lease`` seconds on (If-Match its ETag). ``ends`` moves only
        when S3 acknowledged it. Refused, the claim was taken over (it lapsed: this process
        stalled) and is lost: the holder deletes nothing more. A failure only logs: the
        next renewal may get through, and meanwhile the lease runs out on its own."""
        started = asyncio.get_running_loop().time()
        body = self._body(time.time() + self.lease)
        self._renewing = True
        try:
            written = await self._put_own(body)
        except (PreconditionFailed, NoSuchKey):
            self.lost = True
            log.warning(
                "presign.claim_lost key=%s upload_id=%s; this complete deletes nothing more",
                *self.upload,
            )
            return
        except ProxyError as err:
            self.late = True  # it may land yet
            log.warning("presign.claim_renew_failed key=%s error=%s", self.upload[0], err)
            return
        finally:
            self._renewing = False
        self.late = self.late or written.may_land_late
        self.ends = max(self.ends, started + self.lease)

    async def _put_own(self, body: bytes) -> Written:
        """Write ``body`` over the claim we hold; PreconditionFailed or NoSuchKey only if
        it is not ours any more. A renewal of ours that landed unseen (its answer lost, or
        cut by a release) left a newer ETag: still ours, by its owner."""
        try:
            return await self.sink.put(self.key, [body], _OPTIONS, if_match=self.etag)
        except (PreconditionFailed, NoSuchKey):
            found = await self._read()
            if found is None or found.owner != self.owner:
                raise
            self.etag = found.etag
            return await self.sink.put(self.key, [body], _OPTIONS, if_match=found.etag)

    def _stop(self) -> None:
        """Stop renewing. A renewal cut on its way may still land: only over our own claim
        (If-Match), which the release then finds by its owner, and again later."""
        task, self._task = self._task, None
        if task is None:
            return
        if self._renewing:
            self.late = True
        task.cancel()

    def guarded(
        self,
        delete: Callable[[], Awaitable[None]],
        what: str,
        skipped: Callable[[], None] | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """``delete``, made only while ``may_delete`` (each time it is tried, by the request
        or by the janitor); past that it is skipped, logged and ``skipped`` called: another
        complete may have answered for the object by the time it lands. The object then
        stands, and the caller must not say it was deleted (reprobe10a N2: a skipped
        rollback was announced ``upload.rolled_back``, and nothing checked the object)."""

        async def run() -> None:
            if not self.may_delete():
                reason = "claim_lost" if self.lost else "claim_lapsed"
                log.warning(
                    "presign.kept %s reason=%s; the object stands: the complete holding the "
                    "claim, or a later check, answers for it",
                    what,
                    reason,
                )
                if skipped is not None:
                    skipped()
                return
            await delete()

        return run

    async def release(self, janitor: Janitor | None) -> None:
        """Delete the claim if it is still ours (If-Match), to its end even if the caller
        is cancelled, within the shutdown's deadline; a failure goes to the janitor (the
        claim lapses anyway). From here on, the holder deletes nothing. After a write of
        ours that may land late, made again later (``recheck_late``), by owner; at shutdown
        those again-runs are made before the exit too (a claim landing after the release
        would refuse retries of a decided complete for its lease: reprobe10a N3), and one
        that may land later still is logged with the claim's advice. Safe then: a release
        never comes before a delete this process still owes for the object a retry could
        answer 200 for, since a complete holding such deletes
        (``presign_completed.again_later``) releases by ``release_after``, which shutdown
        drops (the claim lapses), and the janitor's retries of its failed deletes hold the
        object to its size (they never delete a right-sized one)."""
        self.released = True
        self._stop()
        what = f"claim key={self.key}"
        await run_cleanup(lambda: self._drop(self.etag), what, janitor, kind=Kind.CLAIM)
        if self.late:
            recheck_late(janitor, lambda: self._drop(None), what, self.window, Kind.CLAIM)

    async def _drop(self, etag: str | None) -> None:
        """Delete the claim at ``etag``; if that is stale or unknown (None), at the ETag
        read back while the claim carries our owner. Safe to repeat: another's stays."""
        if etag is not None:
            try:
                await self.sink.delete(self.key, if_match=etag)
                return
            except PreconditionFailed:
                pass  # a write of ours landed unseen, or another took it over
        found = await self._read()
        if found is None or found.owner != self.owner:
            return
        with contextlib.suppress(PreconditionFailed):
            await self.sink.delete(self.key, if_match=found.etag)

    def release_after(self, janitor: Janitor | None, delay: float) -> None:
        """Release ``delay`` seconds on (after the rechecks of a write that may land late),
        holding the claim till then: the janitor renews it meanwhile. Dropped at shutdown:
        the claim then lapses within its lease."""
        self._stop()
        if janitor is None:
            return
        steps = hold_steps(delay, renew_every(self.lease))
        left = len(steps)

        async def step() -> None:
            nonlocal left
            left -= 1
            if left == 0:
                await self.release(janitor)
            elif not self.lost:
                await self.renew()

        janitor.again_after(step, f"claim key={self.key}", steps)


def new_claim(sink: ObjectStore, settings: Settings, key: str, upload_id: str) -> Claim:
    return Claim(
        sink,
        claim_key(key, upload_id),
        lease(settings),
        delete_bound(settings),
        window=2 * settings.s3_read_timeout,
    )


async def sweep(sink: ObjectStore, now: float, skew: float, *, dry_run: bool = False) -> int:
    """Delete lapsed claims (their holder died and no retry took them over), unless
    ``dry_run``; how many (found, in a dry run). Only the version read (If-Match): one
    taken over or renewed meanwhile stays. Serve's periodic sweep and ``s3proxy cleanup``.
    S3 failing on one claim is logged and the pass goes on (the next sweep looks again):
    it ended the pass, and the record sweep after it (reprobe12b F5)."""
    removed = 0
    async for page in object_pages(sink, PREFIX):
        for info in page:
            try:
                raw, etag = await read_small(sink, info.key)
                found = parse(raw, etag)
                if not lapsed(found.until, now, skew):
                    continue
                if not dry_run:
                    await sink.delete(info.key, if_match=etag)
            except (NoSuchKey, PreconditionFailed):
                continue  # released, renewed or taken over meanwhile
            except ProxyError as exc:
                log.warning("cleanup.claim key=%s action=failed error=%s", info.key, exc.message)
                continue
            removed += 1
            log.info(
                "cleanup.claim key=%s until=%.0f action=%s",
                info.key,
                found.until,
                "would-remove" if dry_run else "removed",
            )
    return removed
