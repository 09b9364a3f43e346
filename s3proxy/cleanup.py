"""Sweep orphaned multipart uploads: the ones a crash (or a kill -9) left open.

Every upload the proxy starts ends in complete or abort, except when the process
dies in between. S3 bills the stored parts of an incomplete multipart upload
until it is aborted, so this finds uploads under a prefix initiated more than
``older_than`` ago and aborts them. ``older_than`` must be longer than any
upload can take (and than the shutdown grace period), or a live upload is cut
off. A bucket lifecycle rule ``AbortIncompleteMultipartUpload`` is the second
line of defence; this is for stores without lifecycle rules and for audits
(``dry_run``, the default, only reports).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from s3proxy.errors import ProxyError
from s3proxy.s3 import PAGE_SIZE, ObjectStore

log = logging.getLogger("s3proxy.cleanup")


@dataclass(frozen=True)
class Orphan:
    """An incomplete multipart upload old enough to be considered abandoned."""

    key: str
    upload_id: str
    initiated: datetime


@dataclass
class SweepResult:
    """What a sweep saw and did; ``errors`` holds aborts S3 refused, with the reason."""

    found: list[Orphan] = field(default_factory=list)
    aborted: list[Orphan] = field(default_factory=list)
    errors: list[tuple[Orphan, str]] = field(default_factory=list)


async def sweep(
    bucket: ObjectStore,
    prefix: str,
    older_than: timedelta,
    *,
    dry_run: bool = True,
    now: datetime | None = None,
    page_size: int = PAGE_SIZE,
) -> SweepResult:
    """Find (and unless ``dry_run``, abort) uploads under ``prefix`` older than ``older_than``.

    Listing failures raise ProxyError; an abort that fails is recorded in
    ``errors`` and the sweep goes on. An upload that is already gone when we
    abort it (NoSuchUpload) counts as aborted.
    """
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    if not 1 <= page_size <= PAGE_SIZE:
        raise ValueError(f"page_size must be 1-{PAGE_SIZE}")
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (S3 reports times in UTC)")
    cutoff = now - older_than

    result = SweepResult()
    async for up in bucket.list_uploads(prefix, page_size=page_size):
        if up.initiated < cutoff:
            result.found.append(Orphan(up.key, up.upload_id, up.initiated))

    for orphan in result.found:
        age = (now - orphan.initiated).total_seconds()
        if dry_run:
            action = "would-abort"
        else:
            try:
                await bucket.abort(orphan.key, orphan.upload_id)
            except ProxyError as err:
                result.errors.append((orphan, err.message))
                log.warning(
                    "cleanup.orphan key=%s upload_id=%s age=%.0fs action=failed error=%s",
                    orphan.key,
                    orphan.upload_id,
                    age,
                    err.message,
                )
                continue
            result.aborted.append(orphan)
            action = "aborted"
        log.info(
            "cleanup.orphan key=%s upload_id=%s age=%.0fs action=%s",
            orphan.key,
            orphan.upload_id,
            age,
            action,
        )
    return result
