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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from s3proxy.errors import UPSTREAM_ERROR, ProxyError
from s3proxy.sink import S3Sink, translate

log = logging.getLogger("s3proxy.cleanup")

PAGE_SIZE = 1000  # ListMultipartUploads returns at most 1,000 uploads per page


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
    client: Any,
    bucket: str,
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
    async for orphan in _list_uploads(client, bucket, prefix, page_size):
        if orphan.initiated < cutoff:
            result.found.append(orphan)

    sink = S3Sink(client, bucket)
    for orphan in result.found:
        age = (now - orphan.initiated).total_seconds()
        if dry_run:
            action = "would-abort"
        else:
            try:
                await sink.abort(orphan.key, orphan.upload_id)
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


async def _list_uploads(
    client: Any, bucket: str, prefix: str, page_size: int
) -> AsyncIterator[Orphan]:
    """Every open upload under ``prefix``, once each, following the store's page markers."""
    markers: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    while True:
        with translate("ListMultipartUploads"):
            page = await client.list_multipart_uploads(
                Bucket=bucket, Prefix=prefix, MaxUploads=page_size, **markers
            )
        uploads = page.get("Uploads", [])
        for up in uploads:
            # Filter again: a store that ignores Prefix must not get us to
            # abort uploads that belong to someone else.
            if up["Key"].startswith(prefix) and (up["Key"], up["UploadId"]) not in seen:
                seen.add((up["Key"], up["UploadId"]))
                yield Orphan(up["Key"], up["UploadId"], up["Initiated"])
        if not page.get("IsTruncated"):
            return
        following = _next_markers(page, uploads)
        if not following or following == markers:
            raise ProxyError(
                UPSTREAM_ERROR, "ListMultipartUploads is truncated but does not advance"
            )
        markers = following


def _next_markers(page: dict[str, Any], uploads: list[dict[str, Any]]) -> dict[str, str]:
    """Where the next page starts: exactly the Next* markers the store sent.

    S3 sends NextKeyMarker and NextUploadIdMarker. SeaweedFS orders by upload id
    and sends only NextUploadIdMarker; given a KeyMarker as well it returns an
    empty page, so markers the store did not send are not made up. Only a store
    that sends neither is continued after the last upload listed.
    """
    following = {
        name: str(page[f"Next{name}"])
        for name in ("KeyMarker", "UploadIdMarker")
        if page.get(f"Next{name}")
    }
    if not following and uploads:
        following = {"KeyMarker": uploads[-1]["Key"], "UploadIdMarker": uploads[-1]["UploadId"]}
    return following
