"""Whose object stands at a presigned upload's key, and deletes that remove only our own.

A presigned multipart upload's object is the one its complete made: on a ``{uuid}`` key any
object of a presigned upload (only that upload writes the key); on a shared key only the
one carrying the nonce of the upload's record (``presign_record``), as S3 copied it from
the upload's metadata (``x-amz-meta-s3proxy-upload``). Another upload's object there, even
of the same bytes (the same multipart ETag), is never answered for, announced or deleted;
one carrying a nonce while the upload has no record cannot be told, and stays.

Here: the request's ``Context`` (with its reads of the records), telling the object at a
key (``completed_object``, ``completed_upload``), the one delete every path makes
(``OwnDelete``) and the words for what it left (``left_by``, ``delete_outcome``,
``gone_hint``), and the names of an upload's object in cleanup lines (``whose``,
``named``). ``presign`` (the routes) and ``presign_completed`` (what follows a Complete)
build on it; it imports neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from s3proxy import keys, presign_record
from s3proxy.auth import Principal
from s3proxy.errors import ProxyError
from s3proxy.presign_record import Record, Verdict
from s3proxy.s3 import NoSuchKey, NoSuchUpload, ObjectHead, ObjectStore, PreconditionFailed, S3Error
from s3proxy.settings import Settings
from s3proxy.state import AppState

log = logging.getLogger("s3proxy.presign")

SIZE_META = "s3proxy-size"  # x-amz-meta-s3proxy-size: the size a multipart upload was signed for


@dataclass(frozen=True)
class Context:
    """What every signing request needs: who asks, and the bucket to ask and sign for."""

    state: AppState
    principal: Principal
    sink: ObjectStore
    # Each upload's record (``presign_record``) as this request read it: once per request,
    # whichever of its paths asks first (a missing one is None).
    records: dict[tuple[str, str], Record | None] = field(
        default_factory=dict, compare=False, repr=False
    )
    # Whose the object at each upload's shared key was, as ``completed_object`` last
    # judged it (``presign_record.judge``); "none": no object of a presigned upload there.
    # For the 404's hint (``gone_hint``).
    seen: dict[tuple[str, str], Verdict | Literal["none"]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def bucket(self) -> str:
        return self.sink.bucket

    @property
    def expires_in(self) -> int:
        return max(1, math.ceil(self.settings.presign_expiry))

    @property
    def writes(self) -> keys.WritePolicy:
        """--no-overwrite with the key template, as for ``POST /upload``."""
        return keys.write_policy(self.settings.key_template, self.settings.no_overwrite)

    @property
    def key_policy(self) -> keys.KeyPolicy:
        """The keys this principal gets and may touch: the same rule as every route."""
        return keys.KeyPolicy.for_grant(self.settings.key_template, self.principal.grant)


async def _record(ctx: Context, key: str, upload_id: str) -> Record | None:
    """The upload's record, read once per request (``Context.records``); None on a
    ``{uuid}`` key (none is written) or if it has none."""
    if ctx.writes.unique_keys:
        return None
    ref = (key, upload_id)
    if ref not in ctx.records:
        ctx.records[ref] = await presign_record.read(ctx.sink, key, upload_id)
    return ctx.records[ref]


_HEX_ETAG = re.compile(r"[0-9a-fA-F]+(-[0-9]+)?")


def etag_value(etag: str) -> str:
    """An ETag as parts lists are compared: unquoted, and a hex one (an MD5, S3's part
    ETags) in lower case, as S3 writes it: ``ABC...`` names the same part as ``abc...``,
    on a first complete as on a retry (``parts_make_etag`` reads the hex either way).
    Pure."""
    bare = etag.strip('"')
    return bare.lower() if _HEX_ETAG.fullmatch(bare) else bare


_MD5_HEX = re.compile(r"[0-9a-fA-F]{32}")


def parts_make_etag(claimed: Mapping[int, str], etag: str | None) -> bool | None:
    """Do these part ETags make a multipart object's ETag? None: it cannot be told. Pure.

    S3 (and moto, and SeaweedFS: tests/test_presign.py checks both stores) gives a
    completed multipart object the ETag ``md5(etag 1 + ... + etag N)-N``, the parts'
    ETags (32 hex digits: their MD5s, or with SSE-KMS another digest) taken as bytes. A
    store whose object ETags are made so gives its parts such ETags: any other cannot be
    one of its parts. Objects with another kind of ETag cannot be told."""
    digest, dash, count = (etag or "").strip('"').partition("-")
    if not dash or not count.isdigit() or not _MD5_HEX.fullmatch(digest):
        return None  # not a multipart ETag this rule makes
    if sorted(claimed) != list(range(1, int(count) + 1)):
        return False
    if not all(_MD5_HEX.fullmatch(claimed[n]) for n in claimed):
        return False
    joined = b"".join(bytes.fromhex(claimed[n]) for n in sorted(claimed))
    return hashlib.md5(joined, usedforsecurity=False).hexdigest() == digest.lower()


# What stands at a shared key whose object carries a nonce while the upload has no record.
UNTOLD = (
    "the object at the key carries an upload's nonce but this upload's record is gone, so "
    "the proxy cannot tell whether it is this upload's"
)
SHARED_KEY_HINT = (  # to an upload with no record: made before records (a rolling upgrade)
    "keys are shared here (no {uuid}): list the upload's 'parts' to have its completed "
    "object recognised"
)


def gone_hint(seen: Verdict | Literal["none"] | None, parts_given: bool, retention: float) -> str:
    """What a shared-key complete's 404 adds, by the object it found (``Context.seen``): an
    object with no nonce and no record is an upload's made before records (a rolling
    upgrade), recognised by its ``parts``; one with a nonce and no record cannot be told:
    listing the parts told nothing (the record was swept or forgotten), and the log blamed
    "another upload" for the upload's own object (reprobe12b F4). "" for none. Pure."""
    if seen == "untold":
        return (
            f"{UNTOLD} (its record goes {retention / 60:.0f} minutes after the upload was "
            "completed, or with its abort): it is not answered for"
        )
    if seen == "legacy" and not parts_given:
        return SHARED_KEY_HINT
    return ""


async def read_upload_name(ctx: Context, key: str, upload_id: str) -> str:
    """What names this upload's object in a cleanup's log line (``cleanup.abandoned`` at
    shutdown tells an operator what to delete by hand): its upload id and, on a shared
    key, the nonce its object carries, as ``POST /upload``'s lines do; without it the
    failed upload's object and one that replaced it could not be told (reprobe13a N2).
    The record is read once per request; unread (S3 failing), the line goes without."""
    with contextlib.suppress(S3Error, ProxyError):
        await _record(ctx, key, upload_id)
    return upload_name(ctx, key, upload_id)


def upload_name(ctx: Context, key: str, upload_id: str) -> str:
    """``read_upload_name`` from the record as this request read it, if it did (no S3
    call: for a rollback, which nothing may hold up)."""
    record = ctx.records.get((key, upload_id))
    nonce = "" if record is None else f" nonce={record.nonce}"
    return f"key={key} upload_id={upload_id}{nonce}"


async def completed_object(
    ctx: Context,
    key: str,
    upload_id: str,
    parts: Mapping[int, str] | None,
    *,
    maybe_open: bool,
) -> ObjectHead | None:
    """The object this presigned upload's complete made at ``key``, if it stands: one with
    the signed size in its metadata (one of ours), and where keys are shared (no
    ``{uuid}``) only one carrying the nonce of the upload's record (``presign_record``),
    which also proves S3 carried this upload's Complete out. Another upload's object there
    is not ours, even of the same bytes: the same multipart ETag made the ETag alone
    answer 200 for it, announce it and delete it (reprobe11a R1-R4). With no record, an
    object with a nonce cannot be told (it may be this upload's, its record swept or
    forgotten: ``presign.untold``) and is not taken; one with none (an upload made before
    records, in a rolling upgrade) is told as it was: by the multipart ETag these
    ``parts`` make (``parts_make_etag``; with no parts to tell it, none is), and,
    ``maybe_open`` (S3 may not have completed this upload), only once S3 no longer lists
    the upload (``_upload_open``: while it does, its Complete was refused or never carried
    out). What it found is noted in ``Context.seen`` (for the 404's hint). S3's failures
    propagate, and a record that cannot be read (``presign_record.CorruptRecord``)."""
    ref = (key, upload_id)
    try:
        head = await ctx.sink.head(key)
    except NoSuchKey:
        ctx.seen[ref] = "none"
        return None
    if SIZE_META not in head.metadata:
        ctx.seen[ref] = "none"
        return None
    if ctx.writes.unique_keys:
        return head
    verdict = ctx.seen[ref] = await _own_object(ctx, key, upload_id, head)
    if verdict != "legacy":
        if verdict != "ours":
            _left(key, upload_id, verdict)
        return head if verdict == "ours" else None
    if not parts or parts_make_etag(parts, head.etag) is not True:
        return None
    if maybe_open and await _upload_open(ctx, key, upload_id):
        log.info(
            "presign.not_ours key=%s upload_id=%s reason=upload_open; the object there is "
            "another upload's of the same bytes",
            key,
            upload_id,
        )
        return None
    return head


async def replaced(ctx: Context, key: str, upload_id: str, head: ObjectHead) -> bool:
    """Is the object ``head`` saw, right after this upload's Complete was answered, another
    upload's (by its nonce and the record's)? Only on a shared key. Then S3 carried out two
    Completes of the key at once (moto checks If-None-Match apart from storing: both
    answered 200) or the other's replaced ours at once (--no-overwrite false): answered
    from that HeadObject, this upload was told the other's object, ETag and size, and the
    webhook heard of it twice (reprobe20b, 5 of 5 racing completes on moto)."""
    if ctx.writes.unique_keys:
        return False
    try:
        return await _own_object(ctx, key, upload_id, head) == "another"
    except (S3Error, presign_record.CorruptRecord):
        return False  # cannot tell here: the size check and the answer read it again


async def _own_object(ctx: Context, key: str, upload_id: str, head: ObjectHead) -> Verdict:
    """Whose the object ``head`` saw at a shared key is, by its nonce and the upload's
    record (``presign_record.judge``). A record that cannot be read raises."""
    record = await _record(ctx, key, upload_id)
    return presign_record.judge(
        head.metadata.get(keys.NONCE_META), None if record is None else record.nonce
    )


def _left(key: str, upload_id: str, verdict: Verdict, delete: str | None = None) -> None:
    """The log line of an object left standing at a shared key: another upload's, or one
    that cannot be told (a nonce, and no record: it may be this upload's own)."""
    purpose = "" if delete is None else f" delete={delete}"
    if verdict == "untold":
        log.warning(
            "presign.untold key=%s upload_id=%s reason=no_record%s; the object there carries "
            "a nonce and this upload has no record (swept after the retention, or forgotten "
            "with an abort): it may be this upload's or another's, and stays",
            key,
            upload_id,
            purpose,
        )
        return
    log.info(
        "presign.not_ours key=%s upload_id=%s reason=nonce%s; the object there is another "
        "upload's and stays",
        key,
        upload_id,
        purpose,
    )


async def _upload_open(ctx: Context, key: str, upload_id: str) -> bool:
    """Does S3 still list this upload with its parts? Then no Complete of it has been
    carried out (SeaweedFS lists no parts for a moment after one: that counts as done)."""
    try:
        return bool(await ctx.sink.list_parts(key, upload_id, max_parts=1))
    except NoSuchUpload:
        return False


async def completed_upload(ctx: Context, key: str, upload_id: str) -> bool:
    """Had S3 completed the upload whose abort has just returned? Its object stands: on a
    ``{uuid}`` key any object of a presigned upload (only this upload writes the key), on
    a shared one the object carrying its record's nonce. Then its record stays, for its
    rollback, size delete, later checks and retries: forgotten, that object was another's
    to them, and stayed wrong-sized or unannounced (reprobe12b F2). Once the abort has
    returned no Complete of the upload can be carried out any more. S3's failures
    propagate (the abort is answered 5xx, and a retry asks again)."""
    try:
        head = await ctx.sink.head(key)
    except NoSuchKey:
        return False
    if SIZE_META not in head.metadata:
        return False
    if ctx.writes.unique_keys:
        return True
    record = await _record(ctx, key, upload_id)
    if record is None or head.metadata.get(keys.NONCE_META) != record.nonce:
        return False
    log.info(
        "presign.record_kept key=%s upload_id=%s reason=completed; S3 had completed the "
        "upload: its record stays for its completes (the sweep removes it)",
        key,
        upload_id,
    )
    return True


@dataclass
class OwnDelete:
    """Delete this upload's completed object at ``key``; safe to repeat. The one delete
    of every path (rollback, size mismatch, size_unchecked, their repeats after a Complete
    that may land late, the janitor's), so none can forget what follows.

    On a ``{uuid}`` key the key is the upload's own. On a shared key HeadObject first: only
    an object carrying this upload's nonce (its record's; with no record, an upload made
    before records, one with no nonce and this ``etag``) is deleted, with If-Match on the
    ETag read; another upload's stays (``presign.not_ours ... reason=nonce``), even of
    the same bytes (the same ETag: reprobe11a R1, R2, where A's deletes made again later,
    or A's rollback, deleted B's object after B's 200). A HeadObject that fails fails the
    delete (the janitor retries). What remains: with --no-overwrite false another upload
    may replace the object between the HeadObject and the DELETE; if its bytes are the
    same (the same ETag), If-Match lets the DELETE through: S3 has no condition on
    metadata. An object carrying a nonce while the upload has no record cannot be told
    (``presign_record.judge``): it stays (``presign.untold``), as does one whose record
    cannot be read (that fails the delete). ``sent``: a DELETE was sent (it may have
    landed); ``found``: whose object the last run found (``left_by`` words it)."""

    ctx: Context
    key: str
    upload_id: str
    etag: str | None  # the object's as this upload's complete saw it
    purpose: str  # for the log: rollback, size_mismatch, size_unchecked, checked_later
    sent: bool = False
    found: Verdict | Literal["none"] | None = None

    async def __call__(self) -> None:
        ctx, key = self.ctx, self.key
        if ctx.writes.unique_keys:
            self.sent, self.found = True, "ours"
            await ctx.sink.delete(key)
            return
        try:
            now = await ctx.sink.head(key)
        except NoSuchKey:
            self.found = "none"
            return
        verdict = await _own_object(ctx, key, self.upload_id, now)
        if verdict == "legacy":  # an upload made before records: told by its ETag, as it was
            same = self.etag is not None and etag_value(now.etag or "") == etag_value(self.etag)
            verdict = "ours" if same else "another"
        self.found = verdict
        if verdict != "ours":
            _left(key, self.upload_id, verdict, self.purpose)
            return
        self.sent = True
        with contextlib.suppress(PreconditionFailed):
            await ctx.sink.delete(key, if_match=now.etag)


def left_by(found: Verdict | Literal["none"] | None) -> str:
    """What stands at the key after an ``OwnDelete`` that sent no DELETE, for an answer's
    message. Pure."""
    if found == "untold":
        return f"{UNTOLD}: it was not deleted"
    if found == "another":
        return "the object now at the key is another upload's and stays"
    return "no object of this upload is at the key"


def delete_outcome(done: bool, delete: OwnDelete) -> tuple[str, str]:
    """(log action, what the answer says) of a wrong-sized object's delete: ``done``, it
    ran to its end (False: it failed and the janitor retries it). Pure."""
    if not done:
        return "delete_owed", "its delete did not finish: the proxy retries it"
    if delete.sent:
        return "deleted", "the object was deleted"
    return "none", left_by(delete.found)
