"""How a tus upload ends: completed (its object stored, its state removed, the webhook
told), found completed after a lost answer, or removed whole (terminated, expired, ended
by another upload's object at its key). Driven by ``tus``'s PATCH and DELETE handlers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from s3proxy.errors import KEY_EXISTS, UPLOAD_LOCKED, ProxyError
from s3proxy.handlers import notify, notify_rolled_back, webhook_failed
from s3proxy.janitor import Kind, by_deadline, finish, recheck_late, run_cleanup
from s3proxy.pipeline import StoredFile
from s3proxy.s3 import (
    ChecksumDiffers,
    NoSuchKey,
    ObjectHead,
    ObjectStore,
    PreconditionFailed,
    S3Error,
)
from s3proxy.state import AppState
from s3proxy.tus_append import Appended
from s3proxy.tus_state import COMPLETED, FAILED, TUS_META, Lock, Segment, TusState, TusStore
from s3proxy.tus_url import TusUpload

log = logging.getLogger("s3proxy.tus")


# What becomes of a tus upload whose rollback S3 refused, for the 502.
TUS_RETRIED_DELETE = (
    "S3 refused a delete, and the proxy retries it until S3 takes it (the upload answers "
    "404 meanwhile; its object, if still stored, goes then)"
)


class Ended(ProxyError):
    """The upload ended with this error (removed, or its object rolled back), and was
    counted as aborted: whoever sees it must not count it again."""


async def remove_upload(bucket: ObjectStore, upload: TusUpload, current: TusState | None) -> None:
    """Abort the upload's multipart upload and delete every object under its prefix."""
    if current is not None and current.upload_id is not None:
        await bucket.abort(upload.key, current.upload_id)
    await TusStore(bucket, upload).remove_all()


async def own_object(store: TusStore, length: int | None) -> ObjectHead | None:
    """The object at the upload's key if this upload made it (its id in the metadata)
    and, when ``length`` is given, of that size; else None."""
    try:
        found = await store.bucket.head(store.upload.key)
    except NoSuchKey:
        return None
    if found.metadata.get(TUS_META) != store.upload.id:
        return None
    if length is not None and found.size != length:
        return None
    return found


def _stored_file(
    store: TusStore, found: ObjectHead, content_type: str, parts: int, fields: Mapping[str, str]
) -> StoredFile:
    """The file as a completion describes it, from the object found (no sha256: the bytes
    were not all read by this request)."""
    return StoredFile(
        field="file",
        filename=store.upload.filename,
        key=store.upload.key,
        size=found.size,
        content_type=found.content_type or content_type,
        etag=(found.etag or "").strip('"'),
        sha256="",
        parts=parts,
        metadata=fields,
    )


async def landed(store: TusStore, appended: Appended, err: ProxyError) -> StoredFile | None:
    """The stored file, if a PATCH that failed while storing it (its PutObject or
    CompleteMultipartUpload sent, the answer lost or its retry refused) did store it:
    the object at the key carries this upload's id and its length. None otherwise,
    also when that cannot be told now (a retried PATCH or HEAD tells it later)."""
    file = appended.file
    if isinstance(err, ChecksumDiffers):
        return None  # stored, but not the bytes sent
    if file is None or not (file.maybe_stored or err.kind is KEY_EXISTS):
        return None
    length = appended.current.length
    if length is None:
        return None
    try:
        found = await own_object(store, length)
    except S3Error:
        return None
    if found is None:
        return None
    parts = len(file.acknowledged())
    stored = _stored_file(store, found, file.content_type, parts, appended.current.fields)
    return dataclasses.replace(stored, may_land_late=True)  # its answer was lost


async def drop_object(
    store: TusStore, reason: str = "UPSTREAM_CORRUPTION", ours: asyncio.Event | None = None
) -> bool:
    """Delete the object at the upload's key if this upload stored it (its id in the
    metadata; If-Match, so never an object another upload put there since). Safe to
    repeat: also the recheck of a rollback whose write may land late. False if the key
    holds another upload's object (it stays, and no ``upload.rolled_back`` names it).
    ``ours`` is set once the object is known to be this upload's, before its delete."""
    key = store.upload.key
    try:
        found = await store.bucket.head(key)
    except NoSuchKey:
        return True
    if found.metadata.get(TUS_META) != store.upload.id:
        log.info("upload.not_deleted key=%s reason=%s owner=other", key, reason)
        return False
    if ours is not None:
        ours.set()
    try:
        await store.bucket.delete(key, if_match=found.etag)
    except PreconditionFailed:  # replaced meanwhile: not this upload's, nothing deleted
        log.info("upload.not_deleted key=%s reason=%s owner=changed", key, reason)
        return False
    log.info("upload.deleted key=%s reason=%s", key, reason)
    return True


async def resurrected(store: TusStore, current: TusState, etag: str) -> int | None:
    """The size of this upload's object if ``current`` (read at ``etag``) is a state
    that came back after the upload completed, else None. Its creation's state write,
    an attempt of it held on the way, landed after the completion removed the state
    (``If-None-Match: *`` on a key gone again): pristine, beside the object the upload
    made. Such a state is removed (If-Match: only it) and the upload answered complete:
    never completed (and counted, and told) twice, nor offset 0 for a stored file. One
    HeadObject, for pristine states only."""
    if not current.pristine:
        return None
    found = await own_object(store, None)
    if found is None:
        return None
    with contextlib.suppress(S3Error):  # a later recheck or the sweep removes it then
        await store.bucket.delete(store.state_key, if_match=etag)
    log.info("tus.state_resurrected id=%s action=removed", store.upload.id)
    return found.size


def creation_recheck(
    store: TusStore, sent: TusState, ended: Callable[[], bool]
) -> Callable[[], Awaitable[None]]:
    """The recheck of a creation whose state write had an unanswered attempt (it may
    land after the upload ended and its state went, ``janitor.recheck_late``): a state
    still exactly as sent, of an upload that ended (``ended``: in the creation's own
    request; or completed since, its object there) is that late write, and goes
    (If-Match: only it). A state changed since is a live upload's, and stays."""

    async def recheck() -> None:
        found = await store.read()
        if found is None or found[0] != sent:
            return
        if not ended() and await own_object(store, None) is None:
            return  # live, not yet PATCHed
        with contextlib.suppress(PreconditionFailed):  # changed meanwhile: live
            await store.bucket.delete(store.state_key, if_match=found[1])
        log.info("tus.state_resurrected id=%s action=removed", store.upload.id)

    return recheck


def segment_recheck(store: TusStore) -> Callable[[], Awaitable[None]]:
    """The recheck after a segment write that had an unanswered attempt, or failed: one may
    land after the upload ended and its prefix went, and stay until the expiry sweep
    (reprobe16b: a PATCH's tail dated after the completion). Once the state is gone the
    upload has ended (the state goes last, and no commit can name a segment then: a swap
    needs the state's ETag): what is left under the prefix goes. While the state stands,
    the upload's own end removes the prefix."""

    async def recheck() -> None:
        if await store.read() is not None:
            return
        if removed := await store.remove_all():
            log.info("tus.segment_late id=%s removed=%d", store.upload.id, removed)

    return recheck


async def finished(store: TusStore) -> int | None:
    """The size of the object this upload made at its key, if it completed; else None."""
    found = await own_object(store, store.upload.length)
    return None if found is None else found.size


def remover(store: TusStore) -> Callable[[], Awaitable[None]]:
    async def remove() -> None:
        await store.remove_all()

    return remove


def noting(
    store: TusStore, removal: Callable[[], Awaitable[None]], ending: str, length: int | None = None
) -> Callable[[], Awaitable[None]]:
    """``removal``, and if it fails, the state swapped to say how the upload ended (best
    effort; a PutObject often works while DeleteObject does not), then the failure raised
    for the janitor to retry ``removal``. Meanwhile HEAD and PATCH answer that ending at
    once, not the offset before the last PATCH nor 423 for the lock it left."""

    async def run() -> None:
        try:
            await removal()
        except Exception:
            try:
                await note_ending(store, ending, length)
            except Exception as err:  # the removal's retry is what matters
                log.warning("tus.ending_unnoted id=%s error=%r", store.upload.id, err)
            raise

    return run


async def end_noted(
    state: AppState,
    store: TusStore,
    removal: Callable[[], Awaitable[None]],
    ending: str,
    label: str,
    length: int | None = None,
) -> None:
    """Run ``removal`` of an ended upload now; one S3 refuses is noted in the state
    (``noting``) and left to the janitor to retry."""
    await run_cleanup(
        noting(store, removal, ending, length),
        f"{label} id={store.upload.id}",
        state.janitor,
        kind=Kind.TUS_UPLOAD,
        retry=removal,
    )


async def note_ending(store: TusStore, ending: str, length: int | None = None) -> None:
    """Swap the state to ``ending`` (COMPLETED with the object's size as its length), the
    lock dropped: the upload is over, nobody holds it. Not over another ending."""
    found = await store.read()
    if found is None or (found[0].ending is not None and not found[0].owed):
        return
    current, etag = found
    size = current.length if length is None else length
    noted = dataclasses.replace(current, ending=ending, owed=False, lock=None, length=size)
    await store.swap(noted, etag)
    log.info("tus.ending_noted id=%s ending=%s", store.upload.id, ending)


async def owe(
    state: AppState,
    store: TusStore,
    owner: str,
    length: int,
    *,
    check: bool = False,
    first: Callable[[], Awaitable[None]] | None = None,
) -> bool:
    """Write down a completion cut short (shutdown) after the upload's object was stored
    and before the webhook heard of it: the state COMPLETED with the webhook ``owed``, the
    lock of ``owner`` (that PATCH) dropped. HEAD and PATCH, on any instance, then answer
    complete at once and finish the completion first (``tus.finish_owed``), where they
    answered the offset before that PATCH and 423 for its lock until it lapsed (lease +
    clock skew, about 90 s: the re-probe's F4). ``check``: the object's write was still on
    the way when cut: only if this upload's object of ``length`` bytes is there.
    ``first``: run before (stopping the lock's renewal). Within the shutdown's deadline,
    to its end even if cancelled again; best effort (else the lock lapses). Whether the
    state now says so."""
    written = False

    async def write() -> None:
        nonlocal written
        if first is not None:
            await first()
        if check and await own_object(store, length) is None:
            return
        found = await store.read()
        if found is None:
            return
        current, etag = found
        lock = current.lock
        if current.ending == FAILED or lock is None or lock.owner != owner:
            return  # not this PATCH's to write any more
        owed = dataclasses.replace(current, ending=COMPLETED, owed=True, lock=None, length=length)
        await store.swap(owed, etag)
        written = True
        log.info(
            "tus.lock_released id=%s owner=%s ending=completed webhook=owed",
            store.upload.id,
            owner,
        )

    async def bounded() -> None:
        try:
            await by_deadline(
                write(),
                f"tus lock id={store.upload.id} owner={owner}",
                Kind.TUS_PATCH,
                state.janitor,
            )
        except Exception as err:  # best effort: the lock lapses after the lease
            log.warning(
                "tus.lock_release_failed id=%s owner=%s error=%r", store.upload.id, owner, err
            )

    await finish(bounded())
    return written


class Rollback:
    """Delete a completed upload's object, then its state: ``undo`` (the first attempt,
    then the janitor's retries) and ``recheck`` (a write that may land late).

    First the state says FAILED (under the lock of ``owner``, the PATCH that completed it,
    for instances that predate the mark): from then on HEAD, PATCH and DELETE answer 404
    at once, no retried PATCH completes it again, and the object goes however long S3
    refuses the delete (the janitor's retries, else the expiry sweep). While the state is
    there, no request has reported the object stored. Only if that swap itself failed can
    a retried PATCH complete the upload meanwhile (the webhook back; the state then gone or
    COMPLETED): the rollback then keeps the object that PATCH reported.

    Every attempt deletes only the object this upload stored (``drop_object``: its id in
    the metadata, If-Match): with keys shared (no {uuid}) another client's upload may
    have stored the key since, and been answered 201 (the re-probe's F1: a retry an S3
    outage delayed deleted it)."""

    def __init__(
        self,
        state: AppState,
        store: TusStore,
        owner: str,
        reason: str = "rollback",
        upload_id: str | None = None,
    ) -> None:
        self.settings = state.settings
        self.store = store
        self.owner = owner
        self.reason = reason  # for the log's upload.deleted
        self.upload_id = upload_id  # a multipart upload to abort too (one not yet committed)
        # The FAILED mark is down (written, or found): no PATCH completes the upload since.
        self.marked = False
        # The object at the key stays: reported by a retried PATCH, or another upload's.
        # No ``upload.rolled_back`` names it (reprobe12a F1).
        self.stays = False
        self.done = False  # the first attempt landed (else the janitor retries it)

    def pace(self) -> float | None:
        """Seconds until the janitor's next try while the FAILED mark is not down: a third
        of the lock's lease, as its PATCH renewed the lock. The lock in the state is that
        PATCH's until the mark replaces it; tried at that cadence, the mark lands before
        the lock lapses once S3 takes writes again, so no PATCH retried meanwhile takes
        the upload. Once it is down, None: the janitor's own cadence for the deletes."""
        return None if self.marked else self.settings.tus_lock_lease / 3

    async def undo(self) -> None:
        store, settings = self.store, self.settings
        found = await store.read()
        if found is None or (found[0].ending == COMPLETED and not found[0].owed):
            log.info("upload.kept key=%s reason=completed_by_retry", store.upload.key)
            self.stays = True
            return
        current, etag = found
        if current.ending != FAILED:
            now = time.time()
            lock = current.lock
            if (
                lock is not None
                and lock.owner != self.owner
                and current.locked(now, settings.cleanup_clock_skew)
            ):
                raise ProxyError(UPLOAD_LOCKED, "a PATCH holds the upload; the rollback waits")
            until = now + settings.tus_lock_lease
            lock = Lock(self.owner, until)
            marked = dataclasses.replace(current, ending=FAILED, owed=False, lock=lock)
            await store.swap(marked, etag)
        self.marked = True
        self.stays = not await drop_object(store, self.reason)
        if self.upload_id is not None:
            await store.bucket.abort(store.upload.key, self.upload_id)
        await store.remove_all()

    async def recheck(self) -> None:
        """The rollback's delete made again for a write that may land late: only once the
        FAILED mark is down (before, a retried PATCH may have completed the upload and
        reported its object stored; the owed ``undo`` then keeps it)."""
        if self.marked:
            await drop_object(self.store, "late_write")


async def roll_back(
    state: AppState,
    store: TusStore,
    owner: str,
    reason: str,
    *,
    late: bool = False,
    upload_id: str | None = None,
) -> Rollback:
    """Roll back the object this upload stored (``Rollback``), under the lock of ``owner``
    (the PATCH that stored it): the first attempt now; if S3 refuses it, the janitor's
    retries, at the lock's cadence until the FAILED mark is down (``Rollback.pace``).
    ``late``: its write may still be carried out, so its delete is made again later."""
    what = f"rollback key={store.upload.key} tus_id={store.upload.id}"
    undone = Rollback(state, store, owner, reason, upload_id)
    try:
        undone.done = await run_cleanup(
            undone.undo, what, state.janitor, kind=Kind.OBJECT, pace=undone.pace
        )
    finally:
        if late:  # its PutObject/Complete may still be carried out
            recheck_late(state.janitor, undone.recheck, what, state.pipeline.late_write_window)
    return undone


async def stored_object(store: TusStore, current: TusState) -> StoredFile | None:
    """The file this upload stored at its key (its id in the metadata, its length), found
    after the PATCH that stored it failed to end it (an instance gone between the two)."""
    length = current.length if current.length is not None else store.upload.length
    found = None if length is None else await own_object(store, length)
    if found is None:
        return None
    return _stored_file(
        store, found, "application/octet-stream", len(current.parts), current.fields
    )


async def forget(state: AppState, store: TusStore, segments: list[Segment]) -> None:
    """Delete segments a commit no longer names (their bytes are in a part now)."""
    if segments:
        await run_cleanup(
            lambda: store.delete_segments(segments),
            f"tus segments id={store.upload.id}",
            state.janitor,
            kind=Kind.TUS_UPLOAD,
        )


@dataclasses.dataclass
class Made:
    """What the request of a creation-with-upload did before it failed, for the creation's
    undo: its client got no URL, so it can neither resume nor ask, and nothing of the
    upload may stay (``tus._undo_creation``)."""

    sent: bool = False  # a PutObject/Complete went out: the object may be stored, or land
    told: bool = False  # the webhook may have heard upload.completed, not of a rollback


async def completed(
    state: AppState, store: TusStore, stored: StoredFile, owner: str, made: Made | None = None
) -> None:
    """The upload's object is stored: tell the webhook, then remove the upload's state.
    It counts as completed once that is done, as aborted (WEBHOOK_FAILED) if the webhook's
    failure rolled it back: never both (as ``uploads.RequestUpload.settle``).

    The state goes only after the webhook heard of the object, or with its rollback. A
    PATCH retried before that (its answer lost, or its instance gone in between) still
    finds the state and completes again, telling the webhook again (at least once): never
    a bare 204 for an object the application did not hear of. A rollback first marks the
    state FAILED (a retry is then 404, never 204 for an object it deletes); once the
    webhook heard of the object, a removal that fails marks it COMPLETED (a retry is then
    204 at once, the webhook not told again). Cut (shutdown) while telling the webhook,
    the state says COMPLETED with the telling owed (``owe``), and counts once that is done.
    ``made``: in its creation's request, where a cut ends in the creation's undo instead
    (no URL was given): not counted, what it did noted there."""
    upload = store.upload
    log.info(
        "upload.completed key=%s size=%d parts=%d content_type=%s tus_id=%s",
        stored.key,
        stored.size,
        stored.parts,
        stored.content_type,
        upload.id,
    )

    m = state.metrics
    kept = True
    try:
        if state.webhook is not None:
            out = {"files": [stored.to_json()], "fields": {}}
            if made is not None:
                made.told = True
            try:
                await notify(state, out)
            except asyncio.CancelledError:
                # Cut (shutdown) before the webhook's answer: the object is stored, its
                # completion owed to the next HEAD or PATCH; counted once that is done.
                # In its creation's request, there is no URL to come back with: the
                # creation's undo removes it instead (``tus._undo_creation``).
                kept = False
                if made is None:
                    await owe(state, store, owner, stored.size)
                raise
            except ProxyError as err:
                # --webhook-failure rollback: the application never heard of it, so it goes.
                kept = False
                m.uploads_aborted.labels(err.kind.code).inc()
                log.info("upload.rolled_back key=%s reason=%s", stored.key, err.kind.code)
                undone = await roll_back(state, store, owner, "rollback", late=stored.may_land_late)
                # As /upload's rollback: the receiver may have got upload.completed.
                if not undone.stays:
                    await notify_rolled_back(state, [stored.key], err.kind.code)
                if made is not None:
                    made.told = False  # and has heard of its rollback
                final = webhook_failed(err, undone.done, TUS_RETRIED_DELETE)
                raise Ended(final.kind, final.message) from err
        await end_noted(state, store, remover(store), COMPLETED, "tus state", stored.size)
    except asyncio.CancelledError:
        if made is not None:  # the creation's undo removes the object: not kept
            kept = False
        raise
    finally:
        if kept:  # also when cancelled meanwhile: the object stays
            m.uploads_completed.inc()
            m.bytes_stored.inc(stored.size)
