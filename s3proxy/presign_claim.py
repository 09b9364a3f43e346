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

A claim whose instance died lapses: ``until`` (the writer's wall clock, plus
``--cleanup-clock-skew`` when another instance judges it) is ``lease`` seconds on, the
longest a complete can take to decide by the settings (``lease``). The next complete then
takes it over (``If-Match`` on the lapsed one, so only one does). A complete that is
still alive past its lease (the bound broken: a stalled process) must not delete any
more: ``Claim.may_delete`` counts the lease on this process's monotonic clock from
before the claim was written, and keeps a margin for the delete itself to land. So
whatever the timing, no complete answers 200 for an object another may still delete.

Why not the object's age instead (HeadObject's Date minus its Last-Modified, all on S3's
clock)? On AWS a multipart object's Last-Modified is when its upload was *created*, not
completed (lakeFS #8303): an upload made an hour ago and completed just now looks an hour
old. Completes are rare (one per large file), so the two small calls of a claim cost
nothing that shows.
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
from s3proxy.janitor import CLEANUP_TIMEOUT, Janitor, Kind, run_cleanup
from s3proxy.keys import RESERVED_NAMESPACE
from s3proxy.s3 import (
    NoSuchKey,
    ObjectOptions,
    ObjectStore,
    PreconditionFailed,
    object_pages,
    read_small,
)
from s3proxy.settings import Settings
from s3proxy.webhook import MAX_DELAY

log = logging.getLogger("s3proxy.presign")

PREFIX = RESERVED_NAMESPACE + "presign/"
RETRY_AFTER = 2  # seconds: a complete decides in well under that while S3 answers
MARGIN = 5.0  # seconds: whole-second clocks, scheduling
_OPTIONS = ObjectOptions(content_type="application/json")


def claim_key(key: str, upload_id: str) -> str:
    """Where the claim on this upload lives. Pure."""
    name = f"{key}\n{upload_id}".encode("utf-8", "surrogateescape")
    return PREFIX + hashlib.sha256(name).hexdigest()


def delete_bound(s: Settings) -> float:
    """Seconds from sending a delete until it has certainly landed or never will: one
    cleanup call (``CLEANUP_TIMEOUT``, at most the S3 call's own bound) and the window a
    request held on the way may still land in (2 x --s3-read-timeout, as for late writes)."""
    return min(CLEANUP_TIMEOUT, limits.s3_call_time(s)) + 2 * s.s3_read_timeout


def webhook_time(s: Settings) -> float:
    """The longest a completion webhook delivery takes: every attempt its full timeout, and
    the longest wait between attempts (``webhook.MAX_DELAY``, Retry-After included)."""
    if s.webhook_url is None:
        return 0.0
    return s.webhook_attempts * s.webhook_timeout + (s.webhook_attempts - 1) * MAX_DELAY


def lease(s: Settings) -> float:
    """Seconds a complete may hold its claim: its S3 calls before the last delete it may
    make (ListParts, Complete, HeadObject; each every attempt's full timeouts), the webhook
    delivery, that delete landing, and a margin. With the defaults about 40 minutes: that
    is how long a retry waits (409) after an instance died mid-complete. Pure."""
    return 3 * limits.s3_call_time(s) + webhook_time(s) + delete_bound(s) + MARGIN


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
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    etag: str | None = None
    ends: float = 0.0  # loop time the lease ends, counted from before the claim was sent
    released: bool = False
    hold_for: float = 0.0  # seconds to hold it after the request ends (rechecks owed)

    def may_delete(self) -> bool:
        """May the holder delete the object now? Only while no other complete can take the
        claim over before the delete has landed."""
        if self.released:
            return False
        return asyncio.get_running_loop().time() + self.bound < self.ends

    def _body(self, until: float, key: str, upload_id: str) -> bytes:
        doc = {"owner": self.owner, "until": until, "key": key, "upload_id": upload_id}
        return json.dumps(doc).encode("utf-8", "surrogateescape")

    async def _read(self) -> Found | None:
        try:
            raw, etag = await read_small(self.sink, self.key)
        except NoSuchKey:
            return None
        return parse(raw, etag)

    async def take(self, key: str, upload_id: str, skew: float, janitor: Janitor | None) -> None:
        """Write the claim, or take over a lapsed one; 409 COMPLETE_IN_PROGRESS if another
        complete holds it. An attempt whose answer was lost is recognised by its owner."""
        for _ in range(2):  # once more if the other's claim went away as we looked
            started = asyncio.get_running_loop().time()
            body = self._body(time.time() + self.lease, key, upload_id)
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
                    log.info("presign.claim_taken_over key=%s upload_id=%s", key, upload_id)
                else:
                    self.etag = found.etag  # our own, its answer lost
            except BaseException:
                await self.release(janitor)  # it may have landed (an error, a cancellation)
                raise
            else:
                self.etag = written.etag
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

    def guarded(
        self, delete: Callable[[], Awaitable[None]], what: str
    ) -> Callable[[], Awaitable[None]]:
        """``delete``, made only while ``may_delete`` (each time it is tried, by the request
        or by the janitor); past that it is skipped and logged: another complete may have
        answered for the object by the time it lands."""

        async def run() -> None:
            if not self.may_delete():
                log.warning(
                    "presign.kept %s reason=claim_lapsed; a retried complete answers for it",
                    what,
                )
                return
            await delete()

        return run

    async def release(self, janitor: Janitor | None) -> None:
        """Delete the claim if it is still ours (If-Match), to its end even if the caller
        is cancelled, within the shutdown's deadline; a failure goes to the janitor (the
        claim lapses anyway). From here on, the holder deletes nothing."""
        self.released = True

        async def drop() -> None:
            etag = self.etag
            if etag is None:
                found = await self._read()
                if found is None or found.owner != self.owner:
                    return
                etag = found.etag
            with contextlib.suppress(PreconditionFailed):
                await self.sink.delete(self.key, if_match=etag)

        await run_cleanup(drop, f"claim key={self.key}", janitor, kind=Kind.CLAIM)

    def release_after(self, janitor: Janitor | None, delay: float) -> None:
        """Release ``delay`` seconds on (after the rechecks of a write that may land late),
        holding the claim till then. Dropped at shutdown: the claim then lapses."""
        if janitor is None:
            return
        janitor.again_after(lambda: self.release(janitor), f"claim key={self.key}", (delay,))


def new_claim(sink: ObjectStore, settings: Settings, key: str, upload_id: str) -> Claim:
    return Claim(sink, claim_key(key, upload_id), lease(settings), delete_bound(settings))


async def sweep(sink: ObjectStore, now: float, skew: float, *, dry_run: bool = False) -> int:
    """Delete lapsed claims (their holder died and no retry took them over), unless
    ``dry_run``; how many (found, in a dry run). Only the version read (If-Match): one
    taken over or renewed meanwhile stays. Serve's periodic sweep and ``s3proxy cleanup``."""
    removed = 0
    async for page in object_pages(sink, PREFIX):
        for info in page:
            with contextlib.suppress(NoSuchKey, PreconditionFailed):
                raw, etag = await read_small(sink, info.key)
                found = parse(raw, etag)
                if not lapsed(found.until, now, skew):
                    continue
                if not dry_run:
                    await sink.delete(info.key, if_match=etag)
                removed += 1
                log.info(
                    "cleanup.claim key=%s until=%.0f action=%s",
                    info.key,
                    found.until,
                    "would-remove" if dry_run else "removed",
                )
    return removed
