"""What follows a presigned multipart Complete: the object held to its size, and answered for.

S3 stores what the browser sent; the proxy sees the object only after the Complete. So a
completed object is held to the size signed at create (``x-amz-meta-s3proxy-size``) and
deleted if it differs (``held_to_size``); a right-sized one is told to the webhook, and
rolled back if that fails under ``--webhook-failure rollback`` (``answer``). A complete
retried after a lost answer finds the object an earlier one made and answers for it as
that one would (``done_meanwhile``). A Complete that went unanswered may land after the
answer: its object is checked again later, under the upload's claim, as a retried complete
would (``check_later``, ``hold_later``), and a delete made again (``again_later``). Every
delete is ``presign_identity.OwnDelete``: only this upload's object goes.

``presign`` (the routes) calls into this; it imports ``presign_identity``, never
``presign``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from s3proxy.disposition import parse_form_disposition
from s3proxy.errors import COMPLETE_IN_PROGRESS, INVALID_REQUEST, WEBHOOK_FAILED, ProxyError
from s3proxy.handlers import notify, notify_rolled_back, rollback_reason, webhook_failed
from s3proxy.janitor import Cleanup, Kind, late_delays, recheck_late, run_cleanup
from s3proxy.log import REQUEST_ID
from s3proxy.presign_claim import Claim, new_claim
from s3proxy.presign_identity import (
    SIZE_META,
    Context,
    OwnDelete,
    completed_object,
    delete_outcome,
    left_by,
    parts_make_etag,
    read_upload_name,
    upload_name,
)
from s3proxy.s3 import NoSuchKey, ObjectHead, Written
from s3proxy.state import AppState

log = logging.getLogger("s3proxy.presign")

PARTS_DIFFER = "'parts' does not match the parts S3 holds for this upload"


async def done_meanwhile(
    ctx: Context,
    claim: Claim,
    claimed: Mapping[int, str] | None,
    key: str,
    upload_id: str,
    *,
    listed: Mapping[int, str] | None = None,
    late: bool = False,
) -> web.Response | None:
    """The answer to a complete whose upload an earlier complete may have completed (a
    client's retry, through another instance or after a lost answer; under the claim,
    that one has decided, or died): S3 then refuses the upload, lists no parts
    (SeaweedFS, for a moment), refuses the parts or the precondition. The object found is
    checked against the client's ``parts`` (400 if they cannot have made it) and held to
    its size as a retried complete would; None if there is none, and the refusal stands.
    Only this upload's object is found (``completed_object``: on a shared key the one
    carrying its record's nonce, so the client's ``parts`` are only checked against it;
    for an upload made before records, by the parts S3 ``listed`` before the Complete,
    else the client's, and, where S3 listed them and so may not have completed this
    upload, only once it no longer lists the upload). It is not rolled back if the
    webhook fails: the complete that made it may have answered 200 for it. ``claimed``:
    the client's ``parts`` as ``presign`` reads them (None: it sent none)."""
    parts = claimed if listed is None else listed
    # no listing: S3 said the upload is gone
    head = await completed_object(ctx, key, upload_id, parts, maybe_open=listed is not None)
    if head is None:
        return None
    if claimed is not None and parts_make_etag(claimed, head.etag) is False:
        raise ProxyError(INVALID_REQUEST, PARTS_DIFFER)
    out = await held_to_size(ctx, key, upload_id, head, late=late)
    return await answer(ctx, claim, out, head, upload_id, late=late, ours=False)


async def held_to_size(
    ctx: Context,
    key: str,
    upload_id: str,
    head: ObjectHead,
    parts_count: int | None = None,
    *,
    late: bool = False,
) -> dict[str, Any]:
    """Delete the object if its size is not the one signed at create (400); else its JSON.
    ``late``: the Complete that made it may still land, so a delete is made again later.
    No complete of this upload answers 200 for a wrong size, so this delete needs no
    claim; on a shared key another upload's complete may answer 200 for an object of the
    same bytes meanwhile, which the delete leaves (``OwnDelete``: by the nonce). For the
    same reason a delete that fails goes to the janitor as it is (``hold_later`` would
    need the parts to tell an upload's made before records): awaited bare, a DeleteObject
    refused (or the record's GET, or the HeadObject before it) answered 502 and left the
    wrong-sized object for good (reprobe12b F1). The 400 says what became of it."""
    signed = head.metadata.get(SIZE_META)
    stored = head.length
    if signed is None or not (signed.isascii() and signed.isdigit() and len(signed) <= 20):
        # The proxy wrote it at create; anything else is not a size to hold the object to.
        log.warning("presign.size_unchecked key=%s reason=metadata_missing", key)
    elif int(signed) != stored:
        # Only this upload's object: on a shared key another upload's may be there now.
        delete = OwnDelete(ctx, key, upload_id, head.etag, "size_mismatch")
        whose = await read_upload_name(ctx, key, upload_id)
        done = await run_cleanup(
            delete,
            f"delete {whose} reason=size_mismatch",
            ctx.state.janitor,
            kind=Kind.OBJECT,
        )
        if late:
            again_later(ctx, delete, key, hold=None, whose=whose)
        action, outcome = delete_outcome(done, delete)
        log.info(
            "presign.size_mismatch key=%s upload_id=%s signed=%s stored=%d action=%s",
            key,
            upload_id,
            signed,
            stored,
            action,
        )
        raise ProxyError(
            INVALID_REQUEST, f"the parts hold {stored} bytes but {signed} were signed; {outcome}"
        )
    if parts_count is None:  # a complete retried after a lost answer: S3 knows
        parts_count = _parts_in(head.etag)
    log.info(
        "presign.multipart_completed key=%s upload_id=%s size=%d parts=%d by=%s",
        key,
        upload_id,
        stored,
        parts_count,
        ctx.principal.subject,
    )
    return {
        "key": key,
        "bucket": ctx.bucket,
        "size": stored,
        "parts": parts_count,
        "etag": (head.etag or "").strip('"'),
        "content_type": head.content_type,
        "object_url": await ctx.sink.object_url(key),
    }


async def delete_unchecked(
    ctx: Context,
    claim: Claim,
    key: str,
    upload_id: str,
    listed: Mapping[int, str],
    written: Written,
) -> None:
    """Delete the object a complete could not hold to its size (its HeadObject failed;
    the caller answers that failure). Not held to its size, and the client is told it
    failed: it must not stay. Unless the delete fails too: a retried complete may then
    find it, check it and answer 200, so the janitor checks it too rather than delete
    what the client was told is stored."""
    skipped = LeftStanding(ctx, claim, key, upload_id, listed)
    whose = await read_upload_name(ctx, key, upload_id)
    delete = claim.guarded(
        OwnDelete(ctx, key, upload_id, written.etag, "size_unchecked"),
        f"key={key} delete=size_unchecked",
        skipped,
    )
    if written.may_land_late:
        again_later(ctx, delete, key, hold=claim, whose=whose)
    await run_cleanup(
        delete,
        f"delete {whose} reason=size_unchecked",
        ctx.state.janitor,
        kind=Kind.OBJECT_SIZE_UNCHECKED,
        retry=as_request(lambda: hold_later(ctx, key, upload_id, listed)),
    )
    action = "kept" if skipped.ran else "delete"
    log.info("presign.size_unchecked key=%s upload_id=%s action=%s", key, upload_id, action)


def _parts_in(etag: str | None) -> int:
    """A multipart object's part count from its ETag (``"<md5>-N"``); 1 if it has none."""
    count = (etag or "").strip('"').rpartition("-")[2]
    return int(count) if count.isdigit() else 1


def completed_file(out: Mapping[str, Any], head: ObjectHead) -> dict[str, Any]:
    """The completed object as ``POST /upload`` describes a stored file. Pure. What the
    proxy never saw is null: no form field, no sha256 (it never read the bytes), no
    checksum it verified; the filename is the one signed at create, read back from the
    object's Content-Disposition."""
    disposition = head.content_disposition or ""
    filename = parse_form_disposition(disposition.encode("latin-1", "replace")).filename
    return {
        "field": None,
        "filename": filename,
        "key": out["key"],
        "size": out["size"],
        "content_type": out["content_type"],
        "etag": out["etag"],
        "sha256": None,
        "checksum": None,
        "metadata": {},
    }


async def answer(
    ctx: Context,
    claim: Claim,
    out: dict[str, Any],
    head: ObjectHead,
    upload_id: str,
    *,
    late: bool = False,
    ours: bool,
    parts: Mapping[int, str] | None = None,
) -> web.Response:
    """The complete's 200, once the webhook (if any) has heard of the object, as for
    ``POST /upload``: if it cannot be told, ``--webhook-failure rollback`` deletes the
    object and answers 502 WEBHOOK_FAILED, ``keep`` answers 200 with ``"webhook":
    {"delivered": false, ...}``. Anything else that stops the request once delivery has
    begun deletes the object too; the receiver then gets ``upload.rolled_back``.

    Not so for an object this request did not complete (``ours`` false: an earlier
    complete may have answered 200 for it), kept as ``keep`` would; nor for one cut by
    shutdown: the client is told to retry, and the retry answers for the object and tells
    the webhook. The rollback's delete is made only while the claim stands; if it fails,
    the janitor holds the object to its size instead of deleting it blindly, as for
    ``size_unchecked`` (a retried complete may have answered for it meanwhile; on a shared
    key only this upload's object, told by its nonce), and the 502 and the log say the
    rollback did not finish rather than that it was done (reprobe9a F6)."""
    state = ctx.state
    if state.webhook is None:
        return web.json_response(out)
    key = out["key"]
    try:
        files = {"files": [completed_file(out, head)], "fields": {}}
        out["webhook"] = await notify(state, files, keep=not ours)
    except BaseException as exc:
        if not ours or _cut_by_shutdown(state):
            raise
        reason = rollback_reason(state, exc)
        deleted: list[bool] = []
        version = OwnDelete(ctx, key, upload_id, head.etag, "rollback")

        async def delete_version() -> None:
            await version()
            if version.sent:  # and landed; not when it found no object of ours to delete
                deleted.append(True)

        skipped = LeftStanding(ctx, claim, key, upload_id, parts)
        delete = claim.guarded(delete_version, f"key={key} delete=rollback", skipped)
        whose = upload_name(ctx, key, upload_id)
        done = False
        try:
            done = await run_cleanup(
                delete,
                f"rollback {whose}",
                state.janitor,
                kind=Kind.OBJECT,
                retry=as_request(lambda: hold_later(ctx, key, upload_id, parts)),
            )
            if late:
                again_later(ctx, delete, key, hold=claim, whose=whose)
        finally:
            # Told once a delete was sent, even if it failed: the receiver may have the
            # event, and the object may be gone; one kept after all is told again
            # (``hold_later``). Not if none was: the claim skipped it, the object stands;
            # or another upload's object had replaced ours (same key and ETag: it stands).
            if version.sent:
                await notify_rolled_back(state, [key], reason)
        if deleted:
            log.info("presign.rolled_back key=%s reason=%s", key, reason)
            raise
        if done and not skipped.ran:
            # It ran and found no object of this upload's to delete: nothing was rolled
            # back (it logged presign.rolled_back and answered "rolled back": reprobe12b).
            left = left_by(version.found)
            log.warning("presign.rollback_none key=%s reason=%s; %s", key, reason, left)
            if isinstance(exc, ProxyError) and exc.kind is WEBHOOK_FAILED:
                raise nothing_rolled_back(exc, left) from exc
            raise
        advice = unfinished_advice(skipped.ran, claim.lost)
        log.warning("presign.rollback_unfinished key=%s reason=%s; %s", key, reason, advice)
        if isinstance(exc, ProxyError) and exc.kind is WEBHOOK_FAILED:
            raise webhook_failed(exc, False, UNFINISHED_ROLLBACK) from exc
        raise
    return web.json_response(out)


def _cut_by_shutdown(state: AppState) -> bool:
    """Is this request being cut by shutdown's drain (its cancellation not taken back yet)?"""
    task = asyncio.current_task()
    return task is not None and task in state.stopped


def nothing_rolled_back(err: ProxyError, left: str) -> ProxyError:
    """The 502 WEBHOOK_FAILED of a rollback that found nothing of this upload's to delete
    (``left``: what stands), as ``handlers.webhook_failed`` words one that did not
    finish. Pure."""
    why = getattr(err.__cause__, "reason", None)
    failed = "the webhook failed" + (f" ({why})" if why else "")
    return ProxyError(WEBHOOK_FAILED, f"{failed}; nothing was rolled back: {left}")


def unfinished_advice(skipped: bool, lost: bool) -> str:
    """What becomes of the object of a rollback whose delete did not land, for its log
    line: it failed (reprobe9a F6), or the claim skipped it, lapsed or taken over by
    another complete (reprobe10a N2). Pure."""
    if skipped and lost:
        return "the object stands: the complete that took the claim over answers for it"
    held = "a right-sized one is kept and told to the webhook, a wrong-sized one deleted"
    if skipped:
        return f"the object stands: it is checked later under the claim ({held})"
    return f"the janitor holds the object to its size ({held})"


# What a presigned complete's 502 says of an object its rollback did not delete.
UNFINISHED_ROLLBACK = (
    "the object may be kept; retry the complete to learn (200 with the object if it is "
    "kept, 404 NO_SUCH_UPLOAD if it is gone)"
)


def again_later(
    ctx: Context,
    delete: Callable[[], Awaitable[None]],
    key: str,
    hold: Claim | None,
    whose: str,
) -> None:
    """Make a delete of the completed object again later (``janitor.recheck_late``): an
    attempt of its Complete went unanswered and S3 may carry it out after the delete.
    ``hold``: the object may be the right size, so the claim is held until the last
    recheck has landed (a complete that took it over sooner could answer 200 for the
    object the recheck then deletes); a wrong-sized one nobody answers 200 for. ``whose``
    names the object in the janitor's lines (``presign_identity.upload_name``)."""
    log.info("presign.late_write_possible key=%s action=recheck", key)
    window = 2 * ctx.settings.s3_read_timeout
    recheck_late(ctx.state.janitor, as_request(delete), f"delete {whose}", window)
    if hold is not None:
        hold.hold_for = max((*late_delays(window), 0.0)) + hold.bound


async def hold_later(
    ctx: Context,
    key: str,
    upload_id: str,
    parts: Mapping[int, str] | None = None,
    *,
    completed: bool = True,
) -> None:
    """The janitor's retry of a failed complete's delete, or its check of a Complete that
    may have landed after the complete answered: hold the object to its size as a retried
    complete would (delete it if wrong, keep it if right: that complete may have answered
    200 for it). A kept object is told to the webhook, so the application hears of it even
    if no complete is retried (at least once: a retried one told it too); its failure then
    only logs, as ``--webhook-failure keep`` would: a retried complete may have reported
    the object stored. On a shared key only this upload's object (its nonce; before
    records its ``parts``, and unless its Complete is known ``completed``, only once S3 no
    longer lists the upload: ``completed_object``) is touched."""
    if ctx.writes.unique_keys:
        try:
            head = await ctx.sink.head(key)
        except NoSuchKey:
            return
    elif found := await completed_object(ctx, key, upload_id, parts, maybe_open=not completed):
        head = found
    else:
        return
    signed = head.metadata.get(SIZE_META, "")
    readable = signed.isascii() and signed.isdigit() and len(signed) <= 20
    if not readable or int(signed) == head.length:  # as held_to_size judges it
        log.info(
            "presign.checked_later key=%s upload_id=%s size=%d action=kept",
            key,
            upload_id,
            head.length,
        )
        if ctx.state.webhook is not None:
            out = await held_to_size(ctx, key, upload_id, head)
            body = {"files": [completed_file(out, head)], "fields": {}}
            await notify(ctx.state, body, keep=True)
        return
    # Through the janitor: a check made last (8 x --s3-read-timeout on) whose delete
    # failed was only logged, and the wrong-sized object stayed.
    delete = OwnDelete(ctx, key, upload_id, head.etag, "checked_later")
    done = await run_cleanup(
        delete,
        f"delete {await read_upload_name(ctx, key, upload_id)} reason=checked_later",
        ctx.state.janitor,
        kind=Kind.OBJECT,
    )
    log.info(
        "presign.checked_later key=%s upload_id=%s signed=%s action=%s",
        key,
        upload_id,
        signed,
        delete_outcome(done, delete)[0],
    )


def check_later(
    ctx: Context, key: str, upload_id: str, listed: Mapping[int, str], why: str = "late_write"
) -> None:
    """Check the object again 2 x and 8 x --s3-read-timeout on (``janitor.recheck_late``):
    the Complete went unanswered and S3 may carry it out after the complete answered, which
    found nothing (reprobe9a F1: the object stayed, the webhook never heard of it). Each
    check does what a retried complete would (``_check_claimed``), so a retry in between
    and the checks agree. A check holds the claim while it decides (its HeadObject, and a
    kept object's webhook delivery): a retry then is answered 409 COMPLETE_IN_PROGRESS,
    Retry-After 2 (reprobe10a N4; releasing it before the delivery would need
    ``hold_later`` split in two, for a retryable 409)."""
    if why == "late_write":
        log.info("presign.late_write_possible key=%s upload_id=%s action=check", key, upload_id)
    else:
        log.info(
            "presign.check_owed key=%s upload_id=%s reason=%s action=check", key, upload_id, why
        )

    @as_request
    async def check() -> None:
        await _check_claimed(ctx, key, upload_id, listed)

    window = 2 * ctx.settings.s3_read_timeout
    recheck_late(ctx.state.janitor, check, f"check key={key}", window, Kind.COMPLETE_UNANSWERED)


async def _check_claimed(ctx: Context, key: str, upload_id: str, listed: Mapping[int, str]) -> None:
    """``hold_later`` under the upload's claim, as a complete: never while a complete of
    the upload is deciding (it answers for the object, and could roll it back after this
    check told the webhook it is kept); that one is left to decide, and a later check
    looks again."""
    janitor = ctx.state.janitor
    claim = new_claim(ctx.sink, ctx.settings, key, upload_id)
    try:
        await claim.take(key, upload_id, ctx.settings.cleanup_clock_skew, janitor)
    except ProxyError as exc:
        if exc.kind is not COMPLETE_IN_PROGRESS:
            raise
        log.info(
            "presign.checked_later key=%s upload_id=%s action=none reason=complete_in_progress",
            key,
            upload_id,
        )
        return
    try:
        await hold_later(ctx, key, upload_id, listed, completed=False)
    finally:
        await claim.release(janitor)


@dataclass
class LeftStanding:
    """What follows a delete the claim skipped (``Claim.guarded``): the object stands.
    Another complete that took the claim over answers for it; if none did (the renewals
    failed, and the claim lapsed on its own), it is checked later under the claim, as after
    a Complete unanswered (``check_later``), so it is not kept unannounced (reprobe10a
    N2). ``ran``: a delete was skipped; the checks are scheduled once."""

    ctx: Context
    claim: Claim
    key: str
    upload_id: str
    parts: Mapping[int, str] | None
    ran: bool = False

    def __call__(self) -> None:
        first, self.ran = not self.ran, True
        if first and not self.claim.lost:
            check_later(self.ctx, self.key, self.upload_id, self.parts or {}, "claim_lapsed")


def as_request(fn: Cleanup) -> Cleanup:
    """``fn``, run under this request's id whenever the janitor runs it: at shutdown it
    runs in the janitor's own task, whose log lines and webhook events said
    ``"request_id": "-"`` (reprobe10a N5)."""
    rid = REQUEST_ID.get()

    async def run() -> None:
        REQUEST_ID.set(rid)
        await fn()

    return run
