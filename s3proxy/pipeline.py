"""One file's journey: sniff -> parts -> parts uploading in flight -> complete | abort.

The decisions (how much to reserve and read, PutObject or multipart, part sizes and
numbers, limits) are s3proxy.machine's; this module does the I/O they ask for: the
budget, the client's bytes, the S3 calls with parts in flight, and the cleanup.

Invariants:
- A part's buffer is reserved from the memory budget before a byte of it is read,
  and released when S3 has acknowledged the part (or the upload failed).
- Every CreateMultipartUpload ends in Complete or Abort; the abort waits for
  in-flight part calls to be cancelled first, is shielded from cancellation and
  has a timeout.
- Once a PutObject or CompleteMultipartUpload has been sent, S3 may have stored the
  object even if its answer never arrives (a timeout, a lost connection, a
  cancellation): any failure from then on deletes the key, if it is the upload's own
  (``keys.WritePolicy``): a ``{uuid}`` key is; a shared key is only if the object
  there carries this upload's nonce (deleted with If-Match on the ETag HeadObject
  gave), also with overwrites allowed (``--no-overwrite false``), where a later
  upload of the same bytes has the same ETag.
- Under ``--no-overwrite`` PutObject and Complete carry ``If-None-Match: *``; S3's
  412 is 409 KEY_EXISTS (and the upload is aborted), unless the object at the key
  carries our nonce: then an earlier attempt stored it and its answer was lost.
- The cleanup runs to its end whatever stops the upload (``janitor.finish``), and
  a cancellation arriving meanwhile is re-raised afterwards, never swallowed.
- Complete is called only after the part's closing boundary was seen and the
  bytes sent to S3 add up to the bytes received.
- A file that ends within its first part is stored with one PutObject.
- With ``checksum`` set, every UploadPart and PutObject carries the CRC of its bytes,
  computed as they stream past (``PartCrcs``, next to the sha256), and Complete the
  part CRCs with the full-object value combined from them: S3 verifies every byte, and
  no byte is read twice. A part S3 refuses as corrupted (BadDigest) is still in memory
  and is sent once more; refused again, the upload fails (502 UPSTREAM_CORRUPTION).
- Resumed (``Resumed``, for tus): the machine starts where the stored bytes end; the
  staged bytes of the unfinished part are loaded (``Staging.load``) into the part's
  reservation only when the part is sent, their CRC (the loader's, who checked them
  against the CRCs they were staged with) combined with the new bytes'; a request that
  ends inside the file hands its tail to ``Staging.stage`` with its CRC (``PartCrcs``'
  running value: no second pass) and returns None. A failed resumed request aborts
  nothing: the parts S3 acknowledged (``acknowledged``) and a multipart upload it made
  (``created_here``) are the caller's to keep or abort, and what earlier requests stored
  stays.
- While it fills a reserved part, the upload is a budget ``Holder``: under memory
  pressure the budget may evict it for filling below ``min_rate``; eviction only
  expires its pending client read, so the 408 takes the normal error path (abort,
  rollback). Once the part is full (S3's turn) it is never evicted.
- While it waits for a part's memory, the upload is a budget waiter: the socket is not
  read, and ``wait_state`` counts what piles up in the kernel. Ready uploads are served
  first, and one whose client sends below ``min_rate`` meanwhile gets a 408 (``WaitExpired``)
  without ever holding the part.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import logging
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Protocol, TypeVar

from s3proxy import keys, sniff
from s3proxy.body import Chunk
from s3proxy.body_end import PENDING, Looks
from s3proxy.budget import (
    MIN_HELD,
    HolderState,
    MemoryBudget,
    Reservation,
    WaiterState,
    WaitExpired,
)
from s3proxy.checksums import Algorithm, Crc, CrcValue
from s3proxy.digests import DigestCheck, verify_declared
from s3proxy.errors import (
    CLIENT_TIMEOUT,
    FILE_TOO_LARGE,
    INTERNAL,
    KEY_EXISTS,
    TOKEN_SCOPE,
    TYPE_NOT_ALLOWED,
    UPSTREAM_ERROR,
    ProxyError,
)
from s3proxy.form import DEFAULT_MAX_FIELDS_SIZE, DEFAULT_MIN_RATE, ChunkSource
from s3proxy.janitor import (
    CLEANUP_TIMEOUT,
    Janitor,
    Kind,
    finish,
    late_delays,
    recheck_late,
    run_cleanup,
)
from s3proxy.limits import RateMeter
from s3proxy.machine import (
    CreateUpload,
    FileTooLarge,
    PutObject,
    Read,
    Reserve,
    Resume,
    SendPart,
    Stage,
    TooManyParts,
    UploadMachine,
)
from s3proxy.parts import MAX_PARTS, PartPlan, plan_parts
from s3proxy.s3 import (
    ChecksumUnsupported,
    NoCredentials,
    NoSuchKey,
    ObjectDefaults,
    ObjectOptions,
    ObjectSink,
    PreconditionFailed,
    StoredChecksum,
    Written,
    resend_if_corrupted,
    whole_object,
)
from s3proxy.tag_check import SHA256_TAG, check_tag

log = logging.getLogger("s3proxy.pipeline")

# Bytes of a part a client must have sent before the part's memory is asked for (at most
# this much, rounded up to the chunk that passes it, per upload is held outside the budget
# while it arrives): see FileUpload._probe.
PROBE_BYTES = 64 * 1024
# Seconds a first part's probe must take for its rate to say the client is slow
# (``fill_rate``): a shorter one may be an event loop's stall on a loaded machine as
# well as the client (64 KiB in 1 s is 64 KiB/s, a slow client for any part size over
# 3.75 MiB). A client judged fast here is judged again by how it fills its part.
PROBE_JUDGED = 1.0

T = TypeVar("T")


NO_DEFAULTS = ObjectDefaults()  # no ACL, storage class or SSE: the bucket's own


@dataclass(frozen=True)
class PipelineConfig:
    part_size: int
    parts_in_flight: int
    max_file_size: int
    chunk_size: int = 256 * 1024  # most bytes asked of the client at once
    allow_types: tuple[str, ...] = ()
    grant_types: tuple[str, ...] = ()  # an upload token's narrower allowlist (403 outside it)
    token_limit: int | None = None  # an upload token's bytes of file data per request (413 over)
    token_used: int = 0  # of those, bytes already stored by the request's earlier files
    min_rate: float = DEFAULT_MIN_RATE  # --min-upload-rate: slower part fillers may be evicted
    max_fields_size: int = DEFAULT_MAX_FIELDS_SIZE  # a request's field bytes, held in the budget
    writes: keys.WritePolicy = keys.UNIQUE_KEYS  # --no-overwrite with the key template
    checksum: Algorithm | None = None  # --checksum (auto: CRC64NVME); None sends no checksum
    objects: ObjectDefaults = NO_DEFAULTS  # --acl, --storage-class, SSE
    # seconds after a rollback its delete is made again (and 4x that), for writes S3
    # carries out late; 0: not again (2 x --s3-read-timeout in serve)
    late_write_window: float = 0.0


@dataclass(frozen=True)
class FileSpec:
    """What is known about a file before its bytes arrive."""

    field: str
    filename: str
    key: str
    declared_type: str | None = None
    metadata: Mapping[str, str] = dc_field(default_factory=dict)  # as S3 metadata (encoded)
    fields: Mapping[str, str] = dc_field(default_factory=dict)  # the same, as the client sent it
    size_hint: int | None = None  # the file cannot be larger than this (from Content-Length)
    digests: DigestCheck | None = None  # what the client declared (s3proxy.digests)


@dataclass(frozen=True)
class StoredFile:
    field: str
    filename: str
    key: str
    size: int
    content_type: str
    etag: str
    sha256: str
    parts: int
    metadata: Mapping[str, str] = dc_field(default_factory=dict)  # form fields stored with it
    checksum: StoredChecksum | None = None  # what S3 stored and verified; None: --checksum off
    nonce: str | None = None  # what marks it ours on a shared key (--no-overwrite); None: unique
    # an attempt of its PutObject/Complete went unanswered: S3 may store it again later,
    # so whatever removes it removes it again later (``janitor.recheck_late``)
    may_land_late: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "filename": self.filename,
            "key": self.key,
            "size": self.size,
            "content_type": self.content_type,
            "etag": self.etag,
            "sha256": self.sha256,
            "checksum": None if self.checksum is None else self.checksum.to_json(),
            "metadata": dict(self.metadata),
        }


async def own_etag(sink: ObjectSink, key: str, nonce: str) -> str | None:
    """The ETag of the object at ``key`` if the upload with ``nonce`` wrote it, else None."""
    try:
        head = await sink.head(key)
    except NoSuchKey:
        return None
    return head.etag if keys.owned_by(head.metadata, nonce) else None


async def delete_own(sink: ObjectSink, key: str, nonce: str, reason: str) -> bool:
    """Delete the object at a shared ``key`` only if it carries ``nonce``, and only that
    version (If-Match on the ETag HeadObject gave): never another upload's object, even
    one of the same bytes (same ETag) written since. Safe to repeat. False if the key
    holds another upload's object, which stays (a rollback's ``upload.rolled_back`` must
    not name it: its receiver would forget a file another client was told is stored)."""
    try:
        head = await sink.head(key)
    except NoSuchKey:
        log.info("upload.not_deleted key=%s reason=%s owner=none", key, reason)
        return True
    if not keys.owned_by(head.metadata, nonce):
        log.info("upload.not_deleted key=%s reason=%s owner=other", key, reason)
        return False
    try:
        await sink.delete(key, if_match=head.etag)
    except PreconditionFailed:  # replaced since the HeadObject: by someone else
        log.info("upload.not_deleted key=%s reason=%s owner=changed", key, reason)
        return False
    log.info("upload.deleted key=%s reason=%s", key, reason)
    return True


@dataclass(frozen=True)
class Staged:
    """The staged bytes of a part, as loaded, and their CRC if the loader computed it
    (checking them against the CRCs they were staged with): then no second pass here."""

    chunks: list[bytes]
    crc: CrcValue | None = None


class Staging(Protocol):
    """Where a resumed file keeps the bytes of its unfinished part between requests. What
    is staged comes back checked: ``stage`` gets the CRC of the bytes as they arrived,
    ``load`` must not return other bytes (it fails instead)."""

    async def load(self) -> Staged:
        """The staged bytes of the part this request continues, in order."""
        ...

    async def stage(
        self, number: int, start: int, chunks: list[Chunk], size: int, crc: CrcValue | None
    ) -> None:
        """Keep this request's ``size`` bytes of part ``number`` (from file offset ``start``);
        ``crc`` is theirs (None with the checksum off)."""
        ...

    async def before_store(self) -> None:
        """The file is whole and its object about to be written (PutObject or Complete):
        raise to write nothing (tus: this request no longer holds the upload)."""
        ...


@dataclass(frozen=True)
class Resumed:
    """A file continued from what earlier requests stored (tus): the machine's resume
    point, the part plan the file was begun with (parts must not change size between
    requests), where the staged bytes live, and the parts and upload already made."""

    point: Resume
    plan: PartPlan
    staging: Staging
    content_type: str = ""  # fixed when the multipart upload was created ("" if not yet)
    upload_id: str | None = None
    etags: Mapping[int, str] = dc_field(default_factory=dict)
    crcs: Mapping[int, CrcValue] = dc_field(default_factory=dict)


class PartCrcs:
    """Pure: each part's CRC, fed the file's bytes chunk by chunk as they arrive.

    Part ``n`` is the ``plan.size(n)`` bytes after part ``n - 1``, exactly as
    ``parts.PartSlicer`` cuts them; a chunk across a boundary is split (a memoryview, no
    copy). Each byte is checksummed once, right after the sha256, while still in cache.
    """

    def __init__(
        self, algorithm: Algorithm, plan: PartPlan, number: int = 1, staged: int = 0
    ) -> None:
        self.algorithm = algorithm
        self._plan = plan
        self._number = number  # resumed: the first part fed, ``staged`` bytes of it not
        self._room = plan.size(number) - staged  # bytes part ``_number`` still takes
        self._running = Crc(algorithm)
        self._done: dict[int, CrcValue] = {}

    def update(self, chunk: bytes | memoryview) -> None:
        while len(chunk) > self._room:
            view = memoryview(chunk)
            head, chunk = view[: self._room], view[self._room :]
            self._running.update(head)
            self._next()
        self._running.update(chunk)
        self._room -= len(chunk)

    def _next(self) -> None:
        self._done[self._number] = self._running.result()
        self._number += 1
        self._running = Crc(self.algorithm)
        # Past S3's last part the machine refuses the file; count on without a boundary.
        self._room = self._plan.size(self._number) if self._number <= MAX_PARTS else sys.maxsize

    def take(self, number: int) -> CrcValue:
        """Part ``number``'s CRC, once all of its bytes have been fed (it may be the last,
        shorter part: what was fed of it so far is all of it)."""
        if number == self._number:
            self._next()
        return self._done.pop(number)


def _crc_of_staged(loaded: Staged, algorithm: Algorithm) -> CrcValue:
    """The staged bytes' CRC: the loader's when it has one (it read them for it), else
    one pass here."""
    if loaded.crc is not None and loaded.crc.algorithm is algorithm:
        return loaded.crc
    running = Crc(algorithm)
    for chunk in loaded.chunks:
        running.update(chunk)
    return running.result()


def _filled_at(meter: RateMeter, total: int) -> float:
    """Bytes/s a part was filled at: from its meter's start (its memory granted) to now,
    when ``total`` bytes of the file have come."""
    return (total - meter.first) / max(time.monotonic() - meter.start, 1e-3)


def chunk_lists(action: object) -> list[list[Chunk]]:
    """The lists of a part's chunks an action of the machine hands over (pure)."""
    if isinstance(action, CreateUpload):
        return [action.first]
    if isinstance(action, SendPart | PutObject | Stage):
        return [action.chunks]
    return []


def abort_reason(exc: BaseException) -> str:
    """A stable word for why an upload ended early: the error code, or how it was stopped."""
    if isinstance(exc, ProxyError):
        return exc.kind.code
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return type(exc).__name__


class FileUpload:
    """Streams one file into S3; ``run`` returns the stored file or raises ProxyError."""

    def __init__(
        self,
        spec: FileSpec,
        sink: ObjectSink,
        budget: MemoryBudget,
        cfg: PipelineConfig,
        janitor: Janitor | None = None,
        resume: Resumed | None = None,
    ) -> None:
        self.janitor = janitor
        self.resume = resume
        self.started = time.monotonic()  # older uploads get the budget first
        self.spec = spec
        self.sink = sink
        self.budget = budget
        self.cfg = cfg
        self._machine: UploadMachine | None = None
        self._probed: deque[bytes] = deque()  # a part's first bytes, read before its memory
        self._probed_size = 0  # their bytes (size is asked per chunk: no sum over the deque)
        self.upload_id: str | None = None
        self.maybe_stored = False  # a PutObject or Complete was sent: the key may exist
        # (set by _only_new, the one place they are sent)
        self.nonce = uuid.uuid4().hex  # marks our object when keys may be shared
        # rolled back with a write that may still land (its answer never came): a
        # failure answer must not say nothing was stored
        self.may_land_late = False
        self.token_left = (
            None if cfg.token_limit is None else max(0, cfg.token_limit - cfg.token_used)
        )
        self._hash = hashlib.sha256()
        self._inflight: set[asyncio.Task[None]] = set()
        self._etags: dict[int, str] = {} if resume is None else dict(resume.etags)
        self._crcs: PartCrcs | None = None  # each part's CRC, when --checksum is on
        # of parts S3 acknowledged
        self._part_crcs: dict[int, CrcValue] = {} if resume is None else dict(resume.crcs)
        self._sent = 0
        self._staged: list[bytes] | None = None  # a resumed part's stored bytes, once loaded
        self._staged_crc: CrcValue | None = None
        self._staged_sent = 0  # of the bytes sent in parts, those loaded from staging
        self.created_here = False  # this request made the multipart upload (resumed files)
        self.content_type = "" if resume is None else resume.content_type
        if resume is not None:
            self.upload_id = resume.upload_id
        self._source: ChunkSource | None = None
        self._filling: RateMeter | None = None  # set while a reserved part is being filled
        # bytes/s its client filled its last part at, or sent the part's probe at, for
        # the first (``fill_rate``: slow parts have a share of the budget)
        self._rate: float | None = None
        self._arriving: RateMeter | None = None  # set while it waits for a part's memory
        self._has_part = False  # the part it waits for is all in hand (the file ended)
        self._held_back = False  # its receive window was seen closed during this wait
        self._evicted = False
        # Its request's context: evict() is run by the budget's watchdog, outside it.
        self._context = contextvars.copy_context()

    # --- s3proxy.budget.Holder: asked under memory pressure --------------------------

    def fill_state(self, now: float) -> HolderState | None:
        """How fast this upload fills its reserved part; None unless it is filling one."""
        meter = self._filling
        if meter is None or self._evicted:
            return None
        meter.add(max(now, meter.last), self.size)
        held = now - meter.start
        rate = meter.rate(now)
        if rate is None:  # held for less than a window: the average so far
            rate = (self.size - meter.first) / held if held > 0 else float("inf")
        return HolderState(held_for=held, rate=rate, min_rate=self.cfg.min_rate)

    def fill_rate(self) -> float | None:
        return self._rate

    def wait_state(self, now: float, looks: Looks | None = None) -> WaiterState | None:
        """How its client sends while it waits for a part: the socket is not read then,
        so the bytes pile up in the kernel, where they are counted. A client about to be
        judged (a whole window waited, below its minimum rate: silent, or its last bytes
        came early in the window) whose body's end is not known yet (chunked) has the
        kernel's bytes looked at (``Arrival.look``): its end is there, or bytes are owed;
        as far as ``looks`` (the budget pass's, shared) lets it walk them."""
        source, meter = self._source, self._arriving
        arrival = None if source is None or meter is None else source.arrival()
        if meter is None or arrival is None:
            return None
        meter.add(max(now, meter.last), max(arrival.received, meter.first))
        ended = True if self._has_part else arrival.ended
        rate = meter.rate(now)
        looking = False
        if ended is None and rate is not None and rate < self.cfg.min_rate and arrival.look:
            looked = arrival.look(Looks() if looks is None else looks)
            looking = looked is PENDING
            ended = None if looked is PENDING else looked
        # Once seen closed, the window counts as closed for the rest of this wait: a
        # kernel that compacts a full buffer may let a few more bytes in, a tiny rate
        # that is not the client's doing.
        self._held_back = self._held_back or arrival.blocked is True
        blocked = True if self._held_back else arrival.blocked
        return WaiterState(arrival.unread, ended, rate, self.cfg.min_rate, blocked, looking=looking)

    def evict(self, message: str) -> None:
        """Stop reading the client: its pending read fails with 408 ``message``."""
        if self._evicted or self._source is None:
            return
        self._evicted = True
        self._context.run(log.info, "upload.evicted key=%s received=%d", self.spec.key, self.size)
        self._source.expire(message)

    async def run(self, source: ChunkSource) -> StoredFile:
        stored = await self.proceed(source)
        if stored is None:
            raise ProxyError(INTERNAL, "a whole file's upload ended before the file")
        return stored

    async def proceed(self, source: ChunkSource) -> StoredFile | None:
        """The stored file; None when a resumed file's request ended before the file."""
        self._source = source
        try:
            return await self._stream(source)
        except BaseException as exc:
            self._drop_unsent()
            # To the end even if cancelled meanwhile; that cancellation is re-raised after.
            await finish(self._clean_up(abort_reason(exc)))
            raise

    def _drop_unsent(self) -> None:
        """Let go of the bytes read but not sent (the probe's, a part's staged bytes) now:
        the failure's traceback keeps this upload reachable, maybe until the cyclic GC."""
        self._probed.clear()  # (``size`` still counts them: they were received)
        self._staged = None

    async def _clean_up(self, reason: str) -> None:
        """Stop the part calls in flight, then abort the multipart upload and delete
        what a write may have stored. Never raises: what fails goes to the janitor."""
        await self._cancel_inflight()
        key = self.spec.key
        if self.upload_id is not None and self.resume is None:
            upload_id = self.upload_id
            log.info("upload.aborted key=%s upload_id=%s reason=%s", key, upload_id, reason)
            await run_cleanup(
                lambda: self.sink.abort(key, upload_id),
                f"abort key={key} upload_id={upload_id}",
                self.janitor,
                kind=Kind.UPLOAD,
            )
        if self.maybe_stored and self.resume is not None:
            # A resumed file (tus) is its caller's to judge: the object at the key, if
            # any, is that upload's completed file, and a retried request answers it.
            log.info("upload.maybe_stored key=%s reason=%s", key, reason)
        elif self.maybe_stored and self.cfg.writes.cleanup == "delete":

            async def delete() -> None:  # "deleted" once it is: a failure is logged instead
                await self.sink.delete(key)
                log.info("upload.deleted key=%s reason=%s", key, reason)

            await run_cleanup(delete, f"delete key={key}", self.janitor, kind=Kind.OBJECT)
            self._delete_late_writes(lambda: self.sink.delete(key))
        elif self.maybe_stored and self.cfg.writes.cleanup == "nonce":
            await run_cleanup(
                lambda: self._delete_own(reason),
                f"delete key={key} nonce={self.nonce}",
                self.janitor,
                kind=Kind.OBJECT,
            )
            self._delete_late_writes(lambda: self._delete_own(reason))

    def _delete_late_writes(self, delete: Callable[[], Awaitable[None]]) -> None:
        """Delete again later: a PutObject or Complete whose answer never came may still be
        carried out by S3 (held on the way, it lands after the delete above). Our own key
        (or only our own nonce's object), so repeating it never touches another upload."""
        self.may_land_late = True
        what = f"delete key={self.spec.key}"
        if self.cfg.writes.cleanup == "nonce":  # a shared key: only the object of our nonce
            what += f" nonce={self.nonce}"
        recheck_late(self.janitor, delete, what, self.cfg.late_write_window)

    async def _delete_own(self, reason: str) -> None:
        """Delete the object at our shared key only if it carries our nonce (``delete_own``)."""
        await delete_own(self.sink, self.spec.key, self.nonce, reason)

    async def _own_etag(self) -> str | None:
        """The ETag of the object at our key if it is the one this upload wrote, else None."""
        return await own_etag(self.sink, self.spec.key, self.nonce)

    async def _only_new(
        self, write: Callable[..., Awaitable[Written]], sent: CrcValue | None = None
    ) -> Written:
        """A PutObject or Complete, with If-None-Match: * under --no-overwrite.

        From here the key may hold what the write stored (``maybe_stored``), unless it
        failed before a request was sent: then a failed upload owes no delete (with no
        credentials, "delete it by hand" pointed the operator at objects never made).
        """
        if self.resume is not None:
            await self.resume.staging.before_store()
        self.maybe_stored = True
        try:
            if not self.cfg.writes.if_none_match:
                return await write()
            return await self._write_only_new(write, sent)
        except NoCredentials:  # signing failed, before any request (s3.NoCredentials)
            self.maybe_stored = False
            raise

    async def _write_only_new(
        self, write: Callable[..., Awaitable[Written]], sent: CrcValue | None
    ) -> Written:
        try:
            return await write(if_none_match=True)
        except PreconditionFailed:
            # Ours if an earlier attempt stored it and botocore's retry was refused.
            etag = await self._own_etag()
            if etag is None:
                self.maybe_stored = False  # refused: nothing of ours is at the key
                raise ProxyError(
                    KEY_EXISTS,
                    f"an object is already stored at {self.spec.key!r}; uploads do not "
                    "replace objects (--no-overwrite)",
                ) from None
            # S3's answer, with its checksum, was the lost one: that attempt went
            # unanswered, and another may still land. The checksum is the one sent, which
            # S3 verified to store it (a 201 said null: reprobe20a).
            stored = None if sent is None else StoredChecksum.sent(sent)
            return Written(etag, stored, unanswered=1)

    @property
    def size(self) -> int:
        """Bytes of the file received so far (the probe's included)."""
        fed = 0 if self._machine is None else self._machine.size
        return fed + self._probed_size

    def _limit(self) -> int:
        """The most bytes this file may have: the proxy's limit or what the token has left."""
        if self.token_left is None:
            return self.cfg.max_file_size
        return min(self.cfg.max_file_size, self.token_left)

    async def _stream(self, source: ChunkSource) -> StoredFile | None:
        """Drive the upload's state machine: it decides, this loop does the I/O."""
        limit = self._limit()
        resume = self.resume
        if resume is None:
            plan = plan_parts(self.cfg.part_size, self.spec.size_hint, limit)
            machine = UploadMachine(plan, limit, self.spec.size_hint, self.cfg.chunk_size)
            crcs = None if self.cfg.checksum is None else PartCrcs(self.cfg.checksum, plan)
        else:
            plan, point = resume.plan, resume.point
            machine = UploadMachine(plan, limit, None, self.cfg.chunk_size, resume=point)
            crcs = None
            if self.cfg.checksum is not None:
                crcs = PartCrcs(self.cfg.checksum, plan, point.part(plan), point.staged)
        self._machine = machine
        self._crcs = crcs
        reservation: Reservation | None = None
        content_type = "" if resume is None else resume.content_type
        probed = self._probed  # read before the part's memory was asked for
        probe_ended = False  # the file ended within the probe
        try:
            while True:
                action = machine.next_action()
                if isinstance(action, Read):
                    await self._read(source, action.size, probe_ended)
                    continue
                if self._filling is not None:
                    self._rate = _filled_at(self._filling, self.size)
                self._filling = None  # the part is full (or not begun): never evicted now
                if reservation is not None:
                    reservation.cover(*chunk_lists(action))
                if isinstance(action, Reserve):
                    await self._wait_for_slot()
                    if not probed and not probe_ended:
                        probe_ended = await self._probe(source, probed, action.size)
                    reservation = await self._reserve(action.size, source, probe_ended)
                    self._filling = RateMeter(MIN_HELD, time.monotonic(), self.size)
                elif isinstance(action, SendPart):
                    assert reservation is not None
                    reservation.shrink(action.size)
                    chunks = await self._with_staged(action.staged, action.chunks, reservation)
                    crc = None if crcs is None else self._crc_with_staged(crcs.take(action.number))
                    self._staged = None
                    self._launch(action.number, chunks, action.size, reservation, crc)
                    reservation = None
                elif isinstance(action, CreateUpload):
                    first = await self._with_staged(action.staged, action.first, reservation)
                    content_type = self.content_type = await self._content_type(first)
                    self.upload_id = await self._create(self._options(content_type))
                    self.created_here = True
                    log.debug("upload.created key=%s upload_id=%s", self.spec.key, self.upload_id)
                elif isinstance(action, PutObject):
                    chunks = await self._with_staged(action.staged, action.chunks, reservation)
                    content_type = await self._content_type(chunks)
                    crc = None if crcs is None else self._crc_with_staged(crcs.take(1))
                    return await self._put(chunks, content_type, crc)
                elif isinstance(action, Stage):
                    assert resume is not None
                    head = min(sniff.SNIFF_BYTES, resume.point.total)
                    if resume.point.offset < head <= action.start + action.size:
                        # The file's first bytes are complete with this request's: the
                        # type and --allow-type (and the token's types) are checked before
                        # any of these is kept; the type itself is fixed later, at
                        # CreateMultipartUpload or PutObject, from these same bytes. Fewer
                        # than SNIFF_BYTES staged before (a tiny first PATCH) are read back.
                        first = await self._with_staged(
                            resume.point.staged, action.chunks, reservation
                        )
                        await self._content_type(first)
                    verify_declared(self.spec.digests, self._hash.digest(), self.spec.filename)
                    await self._drain()  # the parts this request sent are acknowledged
                    crc = None
                    if crcs is not None and action.size:
                        crc = self._tail_crc(crcs, action)
                    await resume.staging.stage(
                        action.number, action.start, action.chunks, action.size, crc
                    )
                    return None
                else:
                    await self._drain()
                    return await self._complete(content_type)
        except TooManyParts as exc:
            raise ProxyError(FILE_TOO_LARGE, f"file {self.spec.filename!r}: {exc}") from None
        finally:
            machine.close()  # a failed upload's partial part goes now, not at the next GC
            if reservation is not None:
                reservation.release()

    async def _read(self, source: ChunkSource, size: int, probe_ended: bool) -> None:
        """Feed the machine one chunk: the probe's first, then the client's.

        No more than the part can hold. The source may still hand over up to one chunk
        more (a file part's reads are whole chunks as the socket brought them, never cut
        to size: a cut copies; the machine keeps the overflow for the next part); that
        overflow, a peek and the probe are the only data outside the budget. A frame of
        its own: the chunk in hand is never a local of ``_stream``, whose frame a
        failure's traceback keeps (``budget.Reservation``)."""
        machine = self._machine
        assert machine is not None
        if self._probed:
            chunk = self._probed.popleft()
            self._probed_size -= len(chunk)
        elif probe_ended:
            chunk = b""
        else:
            chunk = await source.read(size)
        try:
            machine.feed(chunk)
        except FileTooLarge:
            chunk = b""  # not kept by this frame in the error's traceback
            raise self._too_large() from None
        self._hash.update(chunk)
        if self._crcs is not None:
            self._crcs.update(chunk)
        if self._filling is not None:
            self._filling.add(max(time.monotonic(), self._filling.last), self.size)

    async def _with_staged(
        self, staged: int, chunks: list[Chunk], reservation: Reservation | None
    ) -> list[Chunk]:
        """``chunks`` after the part's staged bytes (loaded from where they are kept, once,
        into the part's reservation, which counts them and covers every list of them);
        ``chunks`` when none are."""
        if not staged:
            return chunks
        if self._staged is None:
            assert self.resume is not None
            loaded = await self.resume.staging.load()
            if sum(len(c) for c in loaded.chunks) != staged:
                raise ProxyError(INTERNAL, "the staged bytes are not the size recorded")
            self._staged = loaded.chunks
            if self.cfg.checksum is not None:
                self._staged_crc = _crc_of_staged(loaded, self.cfg.checksum)
            self._staged_sent += staged
        joined = [*self._staged, *chunks]
        if reservation is not None:
            reservation.cover(self._staged, joined)
        return joined

    @staticmethod
    def _tail_crc(crcs: PartCrcs, action: Stage) -> CrcValue:
        """The CRC of this request's bytes of the part it stages: ``PartCrcs`` began this
        request at its first byte (a part's staged bytes are not fed again), so it is the
        running CRC of that part, whether the request began inside it or not."""
        crc = crcs.take(action.number)
        if crc.length != action.size:
            raise ProxyError(INTERNAL, f"staged {action.size} bytes with a CRC of {crc.length}")
        return crc

    def _crc_with_staged(self, crc: CrcValue) -> CrcValue:
        """A part's CRC: its staged bytes' (if any) followed by the new bytes'."""
        staged, self._staged_crc = self._staged_crc, None
        return crc if staged is None else staged.then(crc)

    async def _probe(self, source: ChunkSource, into: deque[bytes], size: int) -> bool:
        """Read the first ``PROBE_BYTES`` of a part (less for a smaller one) before asking
        for its memory; True if the file ended first.

        A client must show it sends before it may hold or even queue for a part's worth of
        the budget: one that trickles stays here (its reads under the idle timeout and the
        minimum rate) and never stands in line ahead of uploads that do send.
        """
        want = min(PROBE_BYTES, size)
        got = 0
        began = time.monotonic()
        while got < want:
            chunk = await source.read(min(want - got, self.cfg.chunk_size))
            if not chunk:
                return True
            into.append(chunk)
            got += len(chunk)
            self._probed_size += len(chunk)
        took = time.monotonic() - began
        if self._rate is None and want == PROBE_BYTES and took >= PROBE_JUDGED:
            self._rate = got / took  # a first part's: its probe's rate, if it took a while
        return False

    async def _reserve(self, size: int, source: ChunkSource, in_hand: bool) -> Reservation:
        """Take a part's bytes from the budget; while waiting, stop reading the socket
        (nothing to read into: let TCP hold the client's bytes). Meanwhile the budget
        watches what the client sends (``wait_state``): one that sends too slowly gets
        a 408 without ever holding the part. ``in_hand``: the part's bytes are all read."""
        waiting = not self.budget.can_take(size)
        if waiting:
            source.pause()
            arrival = source.arrival()
            received = 0 if arrival is None else arrival.received
            self._arriving = RateMeter(MIN_HELD, time.monotonic(), received)
            self._has_part = in_hand
            self._held_back = False
        try:
            return await self.budget.acquire(size, priority=self.started, holder=self)
        except WaitExpired as exc:
            log.info("upload.wait_expired key=%s received=%d", self.spec.key, self.size)
            raise ProxyError(CLIENT_TIMEOUT, str(exc)) from None
        finally:
            self._arriving = None
            if waiting:
                source.resume()

    def _too_large(self) -> ProxyError:
        """FILE_TOO_LARGE naming whichever limit was crossed (the lower one)."""
        if self.token_left is not None and self.token_left < self.cfg.max_file_size:
            used = self.cfg.token_used
            return ProxyError(
                FILE_TOO_LARGE,
                f"the upload token allows {self.cfg.token_limit} bytes of file data per "
                f"request; file {self.spec.filename!r} goes over it"
                + (f" after {used} bytes in earlier files" if used else ""),
            )
        return ProxyError(
            FILE_TOO_LARGE,
            f"file {self.spec.filename!r} is over the limit of {self.cfg.max_file_size} bytes",
        )

    async def _content_type(self, data: list[Chunk]) -> str:
        found = await sniff.sniff_upload(data, self.spec.filename, self.spec.declared_type)
        if not found.allowed_by(self.cfg.allow_types):
            raise ProxyError(
                TYPE_NOT_ALLOWED,
                f"file {self.spec.filename!r} is {found.described}; "
                f"allowed: {', '.join(self.cfg.allow_types)}",
            )
        if self.cfg.grant_types and not found.allowed_by(self.cfg.grant_types):
            raise ProxyError(
                TOKEN_SCOPE,
                f"file {self.spec.filename!r} is {found.described}; "
                f"the upload token allows {', '.join(self.cfg.grant_types)}",
            )
        return found.content_type

    def _options(self, content_type: str, extra: Mapping[str, str] | None = None) -> ObjectOptions:
        metadata = {**self.spec.metadata, **self._nonce(), **(extra or {})}
        return self.cfg.objects.options(content_type, self.spec.filename, metadata)

    def _nonce(self) -> dict[str, str]:
        return {keys.NONCE_META: self.nonce} if self.cfg.writes.cleanup == "nonce" else {}

    async def _checked(self, call: Callable[[], Awaitable[T]], what: str = "") -> T:
        """One S3 write that carries a checksum.

        BadDigest (the bytes changed on the way; S3 stored nothing): sent once more
        (``s3.resend_if_corrupted``; ``what`` names the bytes; no name, no resend).
        ChecksumUnsupported: the store takes no additional checksums; say how to turn
        them off rather than leave a bare 502.
        """
        try:
            if not what:
                return await call()
            return await resend_if_corrupted(
                call,
                what,
                context=f"key={self.spec.key}",
                outcome=f"file {self.spec.filename!r}: nothing was stored",
            )
        except ChecksumUnsupported as exc:
            name = self.cfg.checksum.value if self.cfg.checksum else "additional"
            raise ProxyError(
                UPSTREAM_ERROR,
                f"S3 refused the {name} checksum on {exc.operation} ({exc.reason}): the store "
                "may not support additional checksums; run the proxy with --checksum off "
                "(S3PROXY_CHECKSUM=off)",
            ) from exc

    async def _create(self, options: ObjectOptions) -> str:
        return await self._checked(
            lambda: self.sink.create(
                self.spec.key,
                options,
                checksum=self.cfg.checksum,
                shared=not self.cfg.writes.unique_keys,
            )
        )

    async def _put(self, data: list[Chunk], content_type: str, crc: CrcValue | None) -> StoredFile:
        verify_declared(self.spec.digests, self._hash.digest(), self.spec.filename)
        digest = self._digest()
        options = self._options(content_type, {"sha256": digest} if digest else None)
        put = functools.partial(self.sink.put, self.spec.key, data, options, checksum=crc)
        written = await self._checked(lambda: self._only_new(put, crc), "the file")
        return self._stored(content_type, written, digest, parts=0)

    def _launch(
        self,
        number: int,
        data: list[Chunk],
        size: int,
        reservation: Reservation,
        crc: CrcValue | None = None,
    ) -> None:
        assert self.upload_id is not None
        upload_id = self.upload_id

        reservation.cover(data)

        async def send() -> None:
            try:
                etag = await self._checked(
                    lambda: self.sink.upload_part(
                        self.spec.key, upload_id, number, data, checksum=crc
                    ),
                    f"part {number}",
                )
                self._etags[number] = etag
                if crc is not None:
                    self._part_crcs[number] = crc
                self._sent += size
            finally:
                # Free the bytes now, not when this task is reaped: the budget is
                # released here, and the release empties ``data`` (covered), which the
                # request's body shares, so the memory goes too (a cancelled request's
                # frames may live on in a reference cycle until the cyclic GC runs).
                reservation.release()

        task = asyncio.create_task(send(), name=f"part-{number}")

        # A task cancelled before its first step never runs send()'s finally: free the
        # part here too (release is idempotent), or the budget would keep it for good.
        def free(_: asyncio.Task[None]) -> None:
            reservation.release()

        task.add_done_callback(free)
        self._inflight.add(task)

    async def _wait_for_slot(self) -> None:
        """Stop reading from the client while too many of this file's parts are uploading."""
        while len(self._inflight) >= self.cfg.parts_in_flight:
            done, _ = await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            self._reap(done)

    def _reap(self, done: set[asyncio.Task[None]]) -> None:
        for task in done:
            self._inflight.discard(task)
            task.result()  # re-raise the part's failure

    async def _drain(self) -> None:
        while self._inflight:
            done, _ = await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            self._reap(done)

    async def _cancel_inflight(self) -> None:
        """Cancel the part calls in flight and wait until they have ended, so that the
        abort comes after them (a part landing after an abort stays billed). Runs
        inside ``finish``: no cancellation of the caller reaches these waits."""
        tasks, self._inflight = self._inflight, set()
        for task in tasks:
            task.cancel()
        if tasks:
            limit = CLEANUP_TIMEOUT
            if self.janitor is not None:  # and not past the shutdown's deadline
                limit = self.janitor.time_for(limit)
            await asyncio.wait(tasks, timeout=limit)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the upload failed for its own reason

    async def _complete(self, content_type: str) -> StoredFile:
        assert self.upload_id is not None
        if self._sent != self.size + self._staged_sent:
            raise ProxyError(INTERNAL, f"sent {self._sent} bytes to S3 but received {self.size}")
        parts = sorted(self._etags.items())
        if [n for n, _ in parts] != list(range(1, len(parts) + 1)):
            raise ProxyError(INTERNAL, "part numbers are not contiguous")
        upload_id = self.upload_id
        verify_declared(self.spec.digests, self._hash.digest(), self.spec.filename)
        checksums = [self._part_crcs[n] for n, _ in parts] if self.cfg.checksum else []
        complete = functools.partial(
            self.sink.complete, self.spec.key, upload_id, parts, checksums=checksums
        )
        whole = whole_object(checksums)
        written = await self._checked(lambda: self._only_new(complete, whole))
        self.upload_id = None  # completed: nothing left to abort
        digest = self._digest()
        if digest:
            # S3 metadata is fixed at CreateMultipartUpload, before the hash is known; a
            # tag can be added afterwards without copying the object. Failing, the object
            # goes.
            await self._tag(written.etag, digest)
            log.debug("upload.tagged key=%s upload_id=%s", self.spec.key, upload_id)
        return self._stored(content_type, written, digest, parts=len(parts))

    async def _tag(self, etag: str, digest: str) -> None:
        """Tag our object with its hash; on a shared key, then look whether the tag is on
        ours and on no other upload's object (``tag_check``): at once, and again when an
        attempt of it went unanswered (it failed, or was retried) and may still land."""
        late = True  # unless an answer says every attempt was answered
        try:
            late = await self.sink.tag(self.spec.key, {SHA256_TAG: digest}) > 0
        finally:
            if self.cfg.writes.cleanup == "nonce" and self.janitor is not None:
                sink, key, nonce = self.sink, self.spec.key, self.nonce

                janitor, window = self.janitor, self.cfg.late_write_window
                what = f"tag key={key} nonce={nonce}"

                async def look() -> None:
                    if await check_tag(sink, key, nonce, etag, digest):
                        janitor.again_after(look, what, late_delays(window), Kind.TAG)

                later = late_delays(window) if late else ()
                janitor.again_after(look, what, (0.0, *later), Kind.TAG)

    def acknowledged(self) -> dict[int, tuple[str, CrcValue | None]]:
        """The parts S3 holds for this file: (ETag, CRC) by number, earlier requests' too."""
        return {n: (e, self._part_crcs.get(n)) for n, e in sorted(self._etags.items())}

    def _digest(self) -> str:
        """The file's sha256, hex; "" for a resumed file that did not arrive in this one
        request (a hash's state cannot be stored between requests)."""
        if self.resume is not None and self.resume.point.offset:
            return ""
        return self._hash.hexdigest()

    def _stored(self, content_type: str, written: Written, digest: str, parts: int) -> StoredFile:
        size = self.size if self.resume is None else self.resume.point.total
        return StoredFile(
            field=self.spec.field,
            filename=self.spec.filename,
            key=self.spec.key,
            size=size,
            content_type=content_type,
            etag=written.etag.strip('"'),
            sha256=digest,
            parts=parts,
            metadata=self.spec.fields,
            checksum=written.checksum,
            nonce=self.nonce if self.cfg.writes.cleanup == "nonce" else None,
            may_land_late=written.may_land_late,
        )
