"""Sweep orphaned multipart uploads: the ones a crash (or a kill -9) left open.

Every upload the proxy starts ends in complete or abort, except when the process
dies in between. S3 bills the stored parts of an incomplete multipart upload
until it is aborted, so this finds uploads under some prefixes that show no sign
of life and aborts them (``dry_run`` only reports).

Any instance may sweep, and it sees every instance's uploads, including ones
another instance is still streaming. So by default (``Rule.idle``) an upload is
judged by its newest sign of life, the later of its initiation and its newest
part's ``LastModified``: a live upload sends a part at least every so often
(s3proxy.limits.orphan_after), however long the whole upload takes, so it is
never cut off, and a dead one goes soon after its last part. ``Rule.age`` judges
by initiation alone (``--cleanup-older-than``): the threshold must then exceed
the longest upload (s3proxy.limits.longest_upload, days with the defaults).

Resumable (tus) uploads sit idle between PATCHes for as long as their client is away
(hours), far longer than a live ``/upload`` leaves between parts, so the idle rule must
not judge them: ``sweep_tus`` lists the reserved prefix (``.s3proxy/tus/<expiry>-<key
hash>-<random>/``), removes uploads past their expiry (abort the multipart upload named in
their state, delete every object under their prefix) and returns the key hashes of the
live ones, which ``sweep`` then keeps whatever their age. A multipart upload a crashed
PATCH made but never committed is kept while its tus upload lives, and swept like any
orphan once it is finished, terminated or expired.

The decision is pure (``is_orphan``, tested with tables); ``sweep`` is the I/O:
list uploads, list the parts of those old enough to need it, abort. In doubt
(ListParts fails, a part without a date) an upload is kept. A bucket lifecycle
rule ``AbortIncompleteMultipartUpload`` is the second line of defence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from s3proxy.errors import ProxyError
from s3proxy.s3 import (
    PAGE_SIZE,
    NoSuchKey,
    NoSuchUpload,
    ObjectStore,
    PartInfo,
    PreconditionFailed,
    object_pages,
    read_small,
)
from s3proxy.tus_url import RESERVED_PREFIX, key_hash, parse_id

if TYPE_CHECKING:
    from s3proxy.tus_state import TusState

log = logging.getLogger("s3proxy.cleanup")


@dataclass(frozen=True)
class Rule:
    """When an open upload counts as orphaned: no sign of life for longer than
    ``threshold``; signs of life are its initiation and, ``by_activity``, its parts."""

    threshold: timedelta
    by_activity: bool = True

    def __post_init__(self) -> None:
        if self.threshold < timedelta(0):
            raise ValueError("the threshold must not be negative")

    @classmethod
    def idle(cls, threshold: timedelta) -> Rule:
        """Orphaned once neither initiation nor any part is newer than ``threshold``."""
        return cls(threshold, by_activity=True)

    @classmethod
    def age(cls, threshold: timedelta) -> Rule:
        """Orphaned once initiated more than ``threshold`` ago, whatever its parts."""
        return cls(threshold, by_activity=False)


def newest_part(parts: Sequence[PartInfo]) -> datetime | None:
    """The newest part's LastModified; None with no parts. ValueError if a part has no
    date: its activity cannot be judged."""
    if any(p.last_modified is None for p in parts):
        raise ValueError("a part without LastModified")
    return max((p.last_modified for p in parts if p.last_modified is not None), default=None)


def is_orphan(rule: Rule, now: datetime, initiated: datetime, newest: datetime | None) -> bool:
    """Pure: has the upload shown no sign of life for longer than the threshold?

    Exactly at the threshold it is kept (only older counts). With ``by_activity``,
    ``newest`` (its newest part, None if it has none) counts as a sign of life too;
    without, it is ignored.
    """
    last = initiated
    if rule.by_activity and newest is not None:
        last = max(last, newest)
    return now - last > rule.threshold


@dataclass(frozen=True)
class Orphan:
    """An incomplete multipart upload that showed no sign of life for too long."""

    key: str
    upload_id: str
    initiated: datetime
    last_active: datetime | None = None  # its newest part, if it had one (and was asked)

    @property
    def idle_since(self) -> datetime:
        return self.initiated if self.last_active is None else max(self.initiated, self.last_active)


@dataclass
class SweepResult:
    """What a sweep saw and did. ``live`` counts the uploads it kept (young, active, or
    not judged: see the log); ``errors`` holds aborts S3 refused, with the reason."""

    found: list[Orphan] = field(default_factory=list)
    aborted: list[Orphan] = field(default_factory=list)
    errors: list[tuple[Orphan, str]] = field(default_factory=list)
    live: int = 0


async def sweep(
    bucket: ObjectStore,
    prefixes: str | Sequence[str],
    rule: Rule,
    *,
    dry_run: bool = True,
    now: datetime | None = None,
    page_size: int = PAGE_SIZE,
    keep: frozenset[str] = frozenset(),
) -> SweepResult:
    """Find (and unless ``dry_run``, abort) uploads under ``prefixes`` orphaned by ``rule``.

    Listing uploads raises ProxyError. Per upload, failures are contained: a ListParts
    that fails keeps the upload (logged), one that says NoSuchUpload means it ended
    meanwhile (skipped); an abort that fails is recorded in ``errors`` and the sweep
    goes on; one that finds the upload already gone counts as aborted. ``now`` is taken
    once, at the start: a long sweep only judges uploads younger than they are.
    """
    if not 1 <= page_size <= PAGE_SIZE:
        raise ValueError(f"page_size must be 1-{PAGE_SIZE}")
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (S3 reports times in UTC)")
    prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)

    result = SweepResult()
    seen: set[tuple[str, str]] = set()  # prefixes may overlap ("" and "uploads/")
    for prefix in prefixes:
        async for up in bucket.list_uploads(prefix, page_size=page_size):
            if (up.key, up.upload_id) in seen:
                continue
            seen.add((up.key, up.upload_id))
            if keep and key_hash(up.key) in keep:
                result.live += 1  # a live tus upload's: idle between PATCHes, not dead
                continue
            if not is_orphan(rule, now, up.initiated, None):
                result.live += 1  # initiated recently: no part can make it older
                continue
            newest = None
            if rule.by_activity:
                try:
                    newest = newest_part(await bucket.list_parts(up.key, up.upload_id))
                except NoSuchUpload:
                    continue  # completed or aborted since it was listed
                except (ProxyError, ValueError) as exc:
                    result.live += 1
                    log.warning(
                        "cleanup.unjudged key=%s upload_id=%s error=%s",
                        up.key,
                        up.upload_id,
                        getattr(exc, "message", exc),
                    )
                    continue
                if not is_orphan(rule, now, up.initiated, newest):
                    result.live += 1
                    continue
            result.found.append(Orphan(up.key, up.upload_id, up.initiated, newest))

    for orphan in result.found:
        age = (now - orphan.initiated).total_seconds()
        idle = (now - orphan.idle_since).total_seconds()
        if dry_run:
            action = "would-abort"
        else:
            try:
                await bucket.abort(orphan.key, orphan.upload_id)
            except ProxyError as err:
                result.errors.append((orphan, err.message))
                log.warning(
                    "cleanup.orphan key=%s upload_id=%s age=%.0fs idle=%.0fs action=failed "
                    "error=%s",
                    orphan.key,
                    orphan.upload_id,
                    age,
                    idle,
                    err.message,
                )
                continue
            result.aborted.append(orphan)
            action = "aborted"
        log.info(
            "cleanup.orphan key=%s upload_id=%s age=%.0fs idle=%.0fs action=%s",
            orphan.key,
            orphan.upload_id,
            age,
            idle,
            action,
        )
    return result


@dataclass
class TusSweep:
    """What ``sweep_tus`` saw: the key hashes of live tus uploads (for ``sweep``'s
    ``keep``), the ids of expired ones, those it removed, and of those the ones the
    removal ended (``ends_by_expiry``: counted aborted UPLOAD_EXPIRED, once)."""

    live: frozenset[str] = frozenset()
    expired: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)


def ends_by_expiry(state: TusState | None, came_back: bool) -> bool:
    """Does removing an expired tus upload end it (for the metrics), or had it ended, and
    been counted, before? Ended before: no state (a removal deleted it, the state last:
    what is left was written late, a segment), an ending written down (COMPLETED, FAILED:
    counted when it ended), a state come back after its upload completed (``came_back``:
    a creation's write that landed late). A termination whose removal failed was not
    counted yet (DELETE counts once its removal is done), nor an unreadable state. Pure."""
    if state is None:
        return False
    return state.ending is None and not came_back


async def sweep_tus(
    bucket: ObjectStore, *, dry_run: bool = True, now: float, skew: float = 0.0
) -> TusSweep:
    """Remove expired tus uploads (unless ``dry_run``); return the live ones' key hashes.

    An expired upload's state names its key and multipart upload: that is aborted, then
    every object under its prefix deleted (the state last, so a removal cut short is
    found again next time). One whose state holds a live lock (a PATCH begun before the
    expiry still runs) is left to a later sweep: no new PATCH can start on an expired
    URL, so the lock is released or lapses (``skew`` after its lease). An unreadable
    state holds nothing: that upload goes too. One whose state says FAILED (rolled back,
    its delete owed when its instance gave up or died) loses its object first: nothing
    of a failed upload is kept. Failures are logged and left for the next sweep.
    """
    from s3proxy.tus_state import FAILED, CorruptState, TusState, remove_prefix

    live: set[str] = set()
    expired: dict[str, bool] = {}
    async for page in object_pages(bucket, RESERVED_PREFIX, page_size=PAGE_SIZE):
        for obj in page:
            upload_id = obj.key[len(RESERVED_PREFIX) :].split("/", 1)[0]
            parsed = parse_id(upload_id)
            if parsed is None:
                continue
            expires, hashed = parsed
            if expires >= now:
                live.add(hashed)
            else:
                expired.setdefault(upload_id, obj.key.endswith("/state"))
    result = TusSweep(frozenset(live), sorted(expired))
    for upload_id in result.expired:
        prefix = f"{RESERVED_PREFIX}{upload_id}/"
        if dry_run:
            log.info("cleanup.tus id=%s action=would-remove", upload_id)
            continue
        ends = True  # unless the state says it ended before
        try:
            try:
                raw, _ = await read_small(bucket, prefix + "state")
                state = TusState.from_bytes(raw)
                came_back = state.pristine and await _made_by(bucket, state.key, upload_id)
                ends = ends_by_expiry(state, came_back)
                if state.locked(now, skew):
                    log.info("cleanup.tus id=%s action=skipped reason=locked", upload_id)
                    # its multipart upload is live too: the orphan sweep keeps it
                    result.live = result.live | {upload_id.split("-")[1]}
                    continue
                if state.upload_id is not None and state.key:
                    await bucket.abort(state.key, state.upload_id)
                if state.ending == FAILED and state.key:
                    await _drop_failed(bucket, state.key, upload_id)
                if state.owed:  # no HEAD nor PATCH came to tell the webhook: it stays
                    log.warning(
                        "cleanup.tus id=%s key=%s webhook=owed action=kept; the application "
                        "may not have heard of this object",
                        upload_id,
                        state.key,
                    )
            except NoSuchKey:
                ends = ends_by_expiry(None, False)  # only what landed after its removal
            except CorruptState as err:
                # Unreadable (changed at rest, or on the way here): no PATCH can use it
                # either, and the upload has expired. Its multipart upload, unnamed now,
                # is the orphan sweep's (an expired upload's is not kept as live).
                log.warning("cleanup.tus id=%s state=unreadable error=%s", upload_id, err.message)
            await remove_prefix(bucket, prefix, last=prefix + "state")
        except ProxyError as err:
            log.warning("cleanup.tus id=%s action=failed error=%s", upload_id, err.message)
            continue
        result.removed.append(upload_id)
        if ends:
            result.ended.append(upload_id)
        log.info("cleanup.tus id=%s action=removed reason=expired ended=%s", upload_id, ends)
    return result


async def _made_by(bucket: ObjectStore, key: str, upload_id: str) -> bool:
    """Whether the object at ``key`` was stored by the tus upload ``upload_id``."""
    from s3proxy.tus_state import TUS_META

    if not key:
        return False
    try:
        found = await bucket.head(key)
    except NoSuchKey:
        return False
    return found.metadata.get(TUS_META) == upload_id


async def _drop_failed(bucket: ObjectStore, key: str, upload_id: str) -> None:
    """Delete the object at ``key`` if the failed tus upload ``upload_id`` made it (its
    id in the metadata; If-Match, so never one another upload stored there since)."""
    from s3proxy.tus_state import TUS_META

    try:
        found = await bucket.head(key)
    except NoSuchKey:
        return
    if found.metadata.get(TUS_META) != upload_id:
        return
    try:
        await bucket.delete(key, if_match=found.etag)
    except PreconditionFailed:
        return  # replaced meanwhile: not this upload's any more
    log.info("upload.deleted key=%s reason=tus_failed tus_id=%s", key, upload_id)
