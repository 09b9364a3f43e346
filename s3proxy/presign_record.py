"""A presigned multipart upload's record on a shared key: which object at the key is its own.

On a shared key (a ``--key-template`` without ``{uuid}``) two uploads get one key, and a
multipart ETag cannot tell them apart: byte-identical parts make the same ETag. A
complete told "this object is this upload's" by the ETag (and S3 no longer listing the
upload) answered 200 for another upload's object, announced it, and deleted it again
later, after that upload's own complete had answered 200 for it (reprobe11a R1-R4). So
``/sign/multipart`` gives each upload on a shared key a nonce, which S3 carries from the
upload's metadata onto the object (``x-amz-meta-s3proxy-upload``, as ``POST /upload``
marks its objects), and writes it down where every complete (on any instance) finds it::

    .s3proxy/presign-upload/<sha256 of key and upload id>
        {"key", "upload_id", "nonce", "created", "gone_since"?}

An object is the upload's own iff it carries the record's nonce (``judge``); one carrying
a nonce when the record is missing cannot be told (it may be the upload's own, its record
swept, or another's), so nothing deletes, announces or answers for it. A record that
cannot be read is an error (``CorruptRecord``), never "no record". Instances
share nothing but S3, and a complete gets only the key and the upload id, so the nonce
cannot ride with the client. On ``{uuid}`` keys the key is the upload's own: no nonce,
no record, no extra call.

A retried complete after a lost 200 needs the record, so it outlives the complete; an
abort forgets it only when it ended the upload open (not one S3 had completed). The
sweep (serve's periodic one and ``s3proxy cleanup``) keeps a record while S3 lists its
upload, marks it ``gone_since`` the first time S3 does not, and deletes it ``retention``
after that mark; every rewrite and delete is ``If-Match`` the ETag read, so two sweeps
never undo each other.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

from s3proxy import presign_claim
from s3proxy.errors import UPSTREAM_CORRUPTION, ProxyError
from s3proxy.keys import RESERVED_NAMESPACE
from s3proxy.s3 import (
    NoSuchKey,
    NoSuchUpload,
    ObjectOptions,
    ObjectStore,
    PreconditionFailed,
    object_pages,
    read_small,
)
from s3proxy.settings import Settings

log = logging.getLogger("s3proxy.presign")

PREFIX = RESERVED_NAMESPACE + "presign-upload/"
_OPTIONS = ObjectOptions(content_type="application/json")

Step = Literal["keep", "mark", "remove"]
# Whose an object at a shared key is (``judge``): this upload's, another's, not to be
# told (a nonce and no record), or an upload's made before records (neither has one).
Verdict = Literal["ours", "another", "untold", "legacy"]


class CorruptRecord(ProxyError):
    """A record read back is not one this proxy wrote for this upload: its bytes changed on
    the way or at rest. UPSTREAM_CORRUPTION (502), as S3's own failures: taken as "no
    record", it made the upload's own object another's, and its rollback and size delete
    left it standing (reprobe12b F2)."""

    def __init__(self, key: str) -> None:
        super().__init__(
            UPSTREAM_CORRUPTION, f"the upload's record {key} read back from S3 cannot be read"
        )


@dataclass(frozen=True)
class Record:
    """One upload's record (see the module)."""

    key: str
    upload_id: str
    nonce: str
    created: float
    gone_since: float | None = None  # first sweep that found the upload no longer listed


def record_key(key: str, upload_id: str) -> str:
    """Where the record of this upload lives (named as its claim is). Pure."""
    return PREFIX + presign_claim.upload_digest(key, upload_id)


def encode(record: Record) -> bytes:
    """The record's body. Pure."""
    return json.dumps(asdict(record)).encode("utf-8", "surrogateescape")


def parse(raw: bytes) -> Record | None:
    """A record's body; None if it cannot be read (it then tells nothing). Pure."""
    try:
        doc = json.loads(raw)
        gone = doc.get("gone_since")
        return Record(
            str(doc["key"]),
            str(doc["upload_id"]),
            str(doc["nonce"]),
            float(doc["created"]),
            None if gone is None else float(gone),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def judge(carried: str | None, nonce: str | None) -> Verdict:
    """Whose is an object carrying the nonce ``carried`` (None: none), for the upload whose
    record says ``nonce`` (None: no record)? "untold": it carries a nonce and the upload
    has no record (swept after the retention, or an abort forgot it): it may be this
    upload's own or another's (it was judged another's, and an upload's own object stayed
    unchecked after its record went: reprobe12b F2). "legacy": neither has one, an upload
    created before records (a rolling upgrade): told by its ETag, as before. Pure."""
    if nonce is not None:
        return "ours" if carried == nonce else "another"
    return "untold" if carried is not None else "legacy"


def retention(s: Settings) -> float:
    """Seconds a record is kept after the sweep first found its upload gone: as long as a
    complete of it may still come and need it. Its client may retry a complete whose 200
    was lost for as long as its presigned URLs live (--presign-expiry); a complete may wait
    out a dead instance's claim (``presign_claim.lease``); the later checks and repeated
    deletes of a Complete that may land late run until 8 x --s3-read-timeout on; and
    another instance's clock may be --cleanup-clock-skew apart. Pure."""
    expires = max(1, math.ceil(s.presign_expiry))
    return expires + presign_claim.lease(s) + 8 * s.s3_read_timeout + s.cleanup_clock_skew


def sweep_step(listed: bool, gone_since: float | None, now: float, keep_for: float) -> Step:
    """What the sweep does with a record: keep it while S3 lists its upload (``listed``)
    and ``keep_for`` seconds after it first found it gone; mark it gone the first time.
    Pure."""
    if gone_since is None:
        return "keep" if listed else "mark"
    return "remove" if now - gone_since > keep_for else "keep"


async def write(sink: ObjectStore, key: str, upload_id: str, nonce: str) -> None:
    """Write the record of a new upload."""
    record = Record(key, upload_id, nonce, time.time())
    await sink.put(record_key(key, upload_id), [encode(record)], _OPTIONS)


async def read(sink: ObjectStore, key: str, upload_id: str) -> Record | None:
    """The upload's record; None if it has none. S3's failures propagate, and a record that
    cannot be read (or names another upload) is ``CorruptRecord``: a record unread is not a
    record missing."""
    name = record_key(key, upload_id)
    try:
        raw, _ = await read_small(sink, name)
    except NoSuchKey:
        return None
    found = parse(raw)
    if found is None or (found.key, found.upload_id) != (key, upload_id):
        raise CorruptRecord(name)
    return found


async def forget(sink: ObjectStore, key: str, upload_id: str) -> None:
    """Delete the upload's record (after an abort). Safe to repeat."""
    await sink.delete(record_key(key, upload_id))


@dataclass
class Swept:
    """What one sweep of the records did (or, in a dry run, would do)."""

    kept: int = 0
    marked: int = 0
    removed: int = 0
    failed: int = 0  # S3 failed on these: left for the next sweep


async def _listed(sink: ObjectStore, record: Record) -> bool:
    """Does S3 still list the record's upload? (SeaweedFS lists no parts for a moment
    after a Complete: that counts as listed, and the next sweep looks again.)"""
    try:
        await sink.list_parts(record.key, record.upload_id, max_parts=1)
    except NoSuchUpload:
        return False
    return True


async def sweep(sink: ObjectStore, now: float, keep_for: float, *, dry_run: bool = False) -> Swept:
    """One pass over the records (``sweep_step``); in a dry run, only counted and logged.
    A record that cannot be read tells nothing and goes. Only the version read is
    rewritten or deleted (If-Match): one another sweep changed meanwhile is left to it.
    S3 failing on one record is logged and counted (``failed``) and the pass goes on, as
    the orphan and tus sweeps do: one ListParts refused ended the pass, and with it
    ``s3proxy cleanup``'s report of the other sweeps (reprobe12b F5). Listing the records
    failing ends it."""
    out = Swept()
    async for page in object_pages(sink, PREFIX):
        for info in page:
            try:
                await _sweep_one(sink, info.key, now, keep_for, dry_run, out)
            except (NoSuchKey, PreconditionFailed):
                pass  # removed or changed by another sweep meanwhile: that sweep finishes it
            except ProxyError as exc:
                out.failed += 1
                log.warning(
                    "cleanup.presign_record key=%s action=failed error=%s", info.key, exc.message
                )
    return out


async def _sweep_one(
    sink: ObjectStore, name: str, now: float, keep_for: float, dry_run: bool, out: Swept
) -> None:
    """One record's step of the sweep, counted in ``out``."""
    raw, etag = await read_small(sink, name)
    record = parse(raw)
    if record is None:
        step: Step = "remove"
    elif record.gone_since is None:
        step = sweep_step(await _listed(sink, record), None, now, keep_for)
    else:
        step = sweep_step(False, record.gone_since, now, keep_for)
    if step == "keep":
        out.kept += 1
        return
    if not dry_run and step == "mark":
        assert record is not None
        body = encode(replace(record, gone_since=now))
        await sink.put(name, [body], _OPTIONS, if_match=etag)
    elif not dry_run:
        await sink.delete(name, if_match=etag)
    if step == "mark":
        out.marked += 1
    else:
        out.removed += 1
    log.info(
        "cleanup.presign_record key=%s action=%s%s",
        name,
        "would-" if dry_run else "",
        "mark-gone" if step == "mark" else "remove",
    )
