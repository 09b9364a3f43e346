"""A tus upload's progress, kept in S3 only: one small state object, swapped atomically.

Layout, under the reserved prefix (``tus_url.RESERVED_PREFIX``)::

    .s3proxy/tus/<id>/state          JSON led by a sha256 of itself: offset, upload id,
                                     content type, committed parts (number, ETag, size,
                                     CRC), staged segments (and their CRCs), the lock,
                                     the object's metadata (from Upload-Metadata)
    .s3proxy/tus/<id>/seg/<start>-<n> bytes of the unfinished part, one object per PATCH

**The commit point is the state object.** A PATCH writes its bytes first (UploadPart for
each part it fills, one segment object for the tail it leaves), and only then swaps the
state with ``If-Match`` on the ETag it read (a compare-and-swap). The offset HEAD reports
is the state's ``offset``, so:

- it never counts a byte not durably stored: the parts and segments it names were
  acknowledged by S3 before the swap was sent;
- it never double-counts: a part made from staged segments replaces them in the same
  swap (the segment objects are deleted afterwards; an orphaned one is not named, so not
  counted, and goes with the upload's prefix at completion, termination or expiry);
- a crash between any two S3 calls leaves the last swapped state: parts uploaded by the
  dead PATCH but not committed are overwritten by the next PATCH (the same part numbers),
  its segment objects are unnamed garbage; its multipart upload, if it made one, is
  unnamed too and the orphan sweep aborts it;
- a PATCH that fails (checksum mismatch, disconnect, S3 error) commits nothing, so the
  upload stays resumable at the last committed offset and its bytes are discarded;
- after a 204 the state is in S3: a ``kill -9`` of that instance loses nothing.

**The lock is in the state too.** A PATCH first swaps in ``lock = {owner, until}``; a
second PATCH that reads a live lock gets 423, and one that loses the swap race gets 423
as well (S3 answers 412 to the stale ``If-Match``). The holder renews ``until`` every
third of the lease while it streams (again by swap); a killed instance stops renewing, so
its lock is stale ``lease + clock skew`` after its last renewal and any instance may take
it over. What is guaranteed: no two PATCHes commit from the same state (the swap); an
instance frozen past the lease loses its commit (its swap fails) and its segment writes
are never named. What is not: such a frozen instance may still overwrite a part number the
new holder also uploaded; the committed ETag then no longer matches and
CompleteMultipartUpload refuses the upload (InvalidPart) rather than store mixed bytes.
The compare-and-swap needs ``If-Match`` on PutObject: S3 (since 2024-11), moto 5.x and
SeaweedFS 4.48 have it (tests/test_s3_contract.py, tests/test_tus_e2e.py).

**An ending whose removal failed is written down.** An upload ends by removing its
prefix (completed: the object stored and the webhook told; rolled back; ended by another
upload's object at its key; terminated). When S3 refuses that removal (the state's
DeleteObject fails while PutObject still works), the state is swapped to say how it
ended (``ending``; a rollback writes FAILED before it deletes anything) and the janitor
retries the removal; a termination's ending is its lock, owned by ``TERMINATING`` for
good, carried on by a retried DELETE. Until the removal is done HEAD, PATCH and DELETE
answer that ending at once: complete (``Upload-Offset = Upload-Length``, no second
webhook), or gone (404); never the offset before the last PATCH, nor 423 for the lock that
PATCH left. The mark costs one GetObject and one PutObject, only when the removal failed
(a rollback's rides on the lock swap it always made): HEAD and PATCH read the state as
before, with no call added. The expiry sweep deletes a FAILED upload's object too.

**A completion cut short is written down too.** A PATCH that stored the object and was
then cut by shutdown before the webhook heard of it swaps the state to COMPLETED with
``owed`` set and its lock dropped (within the shutdown's deadline): HEAD and PATCH, on
any instance, answer complete at once and first finish that completion under the lock
(the webhook told, the state removed; or rolled back), never the offset before that
PATCH nor 423 for its lock. Older instances read such a state as COMPLETED.

**What is read back is checked.** The state and the segments are the only bytes the proxy
reads back from S3 and builds on, so a bit changed on the way (either way) must not be
believed:

- a segment goes to S3 with the CRC of its bytes, computed as they arrived (S3 refuses
  other bytes: BadDigest, resent once), and the state records that CRC; read back, the
  bytes are checked against it (read once more on a mismatch, then 502
  UPSTREAM_CORRUPTION: the PATCH commits nothing and the upload stays where it was);
- the state record starts with a sha256 of the rest of its bytes (still JSON, so an
  instance running older code reads it), carries the upload's CRC to S3 when it has one,
  and must hold together (offset = parts + segments, parts 1..n, segments contiguous);
  one that does not is read once more, then 502 UPSTREAM_CORRUPTION. A state without the
  check was written by older code: it is read, invariants checked, and checked from its
  next swap on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from s3proxy.body import Chunk
from s3proxy.checksums import Algorithm, Crc, CrcValue, decode_b64
from s3proxy.errors import INTERNAL, UPSTREAM_CORRUPTION, ProxyError
from s3proxy.parts import TIER_PARTS, PartPlan
from s3proxy.s3 import (
    NoSuchKey,
    ObjectOptions,
    ObjectStore,
    PreconditionFailed,
    Written,
    object_pages,
    read_small,
    resend_if_corrupted,
)
from s3proxy.tus_url import TusUpload

log = logging.getLogger("s3proxy.tus")

STATE_OPTIONS = ObjectOptions("application/json")
SEGMENT_OPTIONS = ObjectOptions("application/octet-stream")

# A state record begins with the sha256 (hex) of the bytes after ``",``: a byte changed
# anywhere in the record, the check included, fails it; the record stays one JSON object.
CHECK_PREFIX = b'{"check":"'
CHECK_WIDTH = 64
# The fields of a state written before the check: exactly these (a subset: ``length`` and
# ``checksum`` came later). Any other key in an unchecked record is a changed byte (in
# ``check`` itself, say), not an old state.
UNCHECKED_FIELDS = frozenset(
    (
        "offset",
        "key",
        "length",
        "upload_id",
        "content_type",
        "checksum",
        "parts",
        "segments",
        "lock",
    )
)


class CorruptState(ProxyError):
    """The state read back is not a whole state this proxy wrote: the bytes changed on the
    way or at rest. UPSTREAM_CORRUPTION (502), never believed."""

    def __init__(self, why: str) -> None:
        super().__init__(
            UPSTREAM_CORRUPTION,
            f"this upload's state read back from S3 is corrupted ({why}); nothing was changed",
        )
        self.why = why


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    size: int
    crc: str | None = None  # base64, as S3 takes it; None without --checksum


def part_start(plan: PartPlan, number: int) -> int:
    """The file offset where part ``number`` (1-based) begins (a loop per tier, not part)."""
    if not plan.growing:
        return (number - 1) * plan.base
    start, n = 0, 1
    while n < number:
        step = min(TIER_PARTS - (n - 1) % TIER_PARTS, number - n)
        start += plan.size(n) * step
        n += step
    return start


def part_length(plan: PartPlan, number: int, length: int | None) -> int:
    """The bytes part ``number`` holds: the plan's size, but the file's last part only
    what is left of ``length`` (the state must count what S3 holds, not what was planned)."""
    full = plan.size(number)
    if length is None:
        return full
    return max(0, min(full, length - part_start(plan, number)))


@dataclass(frozen=True)
class Segment:
    key: str
    start: int
    size: int
    crc: str | None = None  # base64, of its bytes as they arrived; None: --checksum off or older


@dataclass(frozen=True)
class Lock:
    owner: str
    until: float  # unix seconds


TUS_META = "s3proxy-tus"  # the object's metadata: which tus upload made it
TERMINATING = "terminating"  # the lock owner of a DELETE: it never gives the lock back
# How an upload whose state is still there ended (``TusState.ending``):
COMPLETED = "completed"  # its object is stored and the webhook heard of it: it is kept
FAILED = "failed"  # rolled back or ended: its object, if it made one, is deleted
TERMINATED = "terminated"  # not stored: a DELETE's lock (``TusState.ended``)
ENDINGS = (COMPLETED, FAILED)


@dataclass
class TusState:
    """The committed progress of one upload (see the module docstring)."""

    offset: int = 0
    key: str = ""  # the object's (the sweep aborts an expired upload's multipart upload)
    length: int | None = None  # a deferred length, once a PATCH declared it
    upload_id: str | None = None
    content_type: str = ""
    checksum: str | None = None  # the algorithm the multipart upload declared
    parts: list[Part] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    lock: Lock | None = None
    # Upload-Metadata for the object, fixed at creation (S3 takes it with the multipart
    # upload or the PutObject, at a later PATCH): as S3 metadata (encoded), and as sent
    # (the webhook's). A record without them (older code) reads as none.
    metadata: dict[str, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    # How the upload ended, written only when removing its state failed (see the module
    # docstring): COMPLETED (``length`` then the object's size) or FAILED; None while it goes on.
    ending: str | None = None
    # COMPLETED, the webhook not yet told: the PATCH that stored the object was cut short
    # (shutdown) first. The next HEAD or PATCH finishes the completion (``tus.finish_owed``).
    owed: bool = False

    @property
    def pristine(self) -> bool:
        """As its creation wrote it: nothing stored, nothing held, no ending. Such a state
        beside an object this upload made is a creation's write that landed late, after
        the upload completed and its state went (``tus_ending.resurrected``)."""
        return (
            self.offset == 0
            and not self.parts
            and not self.segments
            and self.upload_id is None
            and self.lock is None
            and self.ending is None
        )

    def ended(self) -> str | None:
        """How the upload ended though its state is still here (COMPLETED, FAILED,
        TERMINATED), None while it goes on. Pure: what HEAD, PATCH and DELETE decide on."""
        if self.ending is not None:
            return self.ending
        if self.lock is not None and self.lock.owner == TERMINATING:
            return TERMINATED
        return None

    @property
    def staged(self) -> int:
        return sum(s.size for s in self.segments)

    def locked(self, now: float, skew: float) -> bool:
        """Held by a PATCH that may still be running."""
        return self.lock is not None and now <= self.lock.until + skew

    def etags(self) -> dict[int, str]:
        return {p.number: p.etag for p in self.parts}

    def crcs(self) -> dict[int, CrcValue]:
        if self.checksum is None:
            return {}
        algorithm = Algorithm(self.checksum)
        return {
            p.number: CrcValue(algorithm, decode_b64(algorithm, p.crc), p.size)
            for p in self.parts
            if p.crc is not None
        }

    def to_bytes(self) -> bytes:
        """The record: the fields as JSON, led by the sha256 of the bytes after it (see
        ``CHECK_PREFIX``). INTERNAL for a state that breaks an invariant: it would be
        refused when read, so it is never written."""
        why = self.inconsistency()
        if why is not None:
            raise ProxyError(INTERNAL, f"refusing to write an inconsistent tus state: {why}")
        rest = json.dumps(self._fields(), separators=(",", ":")).encode()[1:]
        return CHECK_PREFIX + _check(rest) + b'",' + rest

    def _fields(self) -> dict[str, Any]:
        # ``ending`` only when set: a going upload's record stays what it was before.
        ending: dict[str, Any] = {} if self.ending is None else {"ending": self.ending}
        if self.owed:
            ending["owed"] = True
        return {
            "offset": self.offset,
            "key": self.key,
            "length": self.length,
            "upload_id": self.upload_id,
            "content_type": self.content_type,
            "checksum": self.checksum,
            "parts": [asdict(p) for p in self.parts],
            # Each segment with the fields it always had, its CRC beside it: older code
            # (a rolling upgrade) makes a Segment of every field it finds in one.
            "segments": [{"key": s.key, "start": s.start, "size": s.size} for s in self.segments],
            "segment_crcs": {s.key: s.crc for s in self.segments if s.crc is not None},
            "lock": None if self.lock is None else asdict(self.lock),
            "metadata": self.metadata,
            "fields": self.fields,
            **ending,
        }

    @classmethod
    def from_bytes(cls, raw: bytes) -> TusState:
        """The state a record holds; CorruptState if its check fails, it is no state, or
        it breaks an invariant."""
        data = _record(raw)
        try:
            crcs: dict[str, str] = data.get("segment_crcs") or {}
            state = cls(
                offset=int(data["offset"]),
                key=str(data["key"]),
                length=data.get("length"),
                upload_id=data["upload_id"],
                content_type=str(data["content_type"]),
                checksum=data.get("checksum"),
                parts=[Part(**p) for p in data["parts"]],
                segments=[
                    Segment(str(s["key"]), int(s["start"]), int(s["size"]), crcs.get(s["key"]))
                    for s in data["segments"]
                ],
                lock=None if data["lock"] is None else Lock(**data["lock"]),
                metadata=_texts(data.get("metadata") or {}),
                fields=_texts(data.get("fields") or {}),
                ending=data.get("ending"),
                owed=data.get("owed") is True,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptState(f"not a tus state: {exc!r}") from exc
        why = state.inconsistency()
        if why is not None:
            raise CorruptState(why)
        return state

    def inconsistency(self) -> str | None:
        """Why no PATCH could have committed this state; None if one could: the offset
        counts exactly the bytes of the parts and segments, parts are 1..n, segments follow
        the parts without a gap, CRCs are ones of the upload's algorithm."""
        numbers = [p.number for p in self.parts]
        if numbers != list(range(1, len(numbers) + 1)):
            return f"parts numbered {numbers}, not 1..{len(numbers)}"
        if any(p.size < 0 for p in self.parts) or any(s.size <= 0 for s in self.segments):
            return "a part of a negative size, or an empty segment"
        end = sum(p.size for p in self.parts)
        for seg in self.segments:
            if seg.start != end:
                return f"a segment starts at {seg.start}, not at {end}"
            end += seg.size
        if self.offset != end:
            return f"offset {self.offset} is not the {end} bytes of its parts and segments"
        if self.length is not None and not 0 <= self.offset <= self.length:
            return f"offset {self.offset} is past the length {self.length}"
        if self.parts and self.upload_id is None:
            return "parts without a multipart upload"
        if self.ending is not None and self.ending not in ENDINGS:
            return f"an ending {self.ending!r} no proxy writes"
        if self.ending == COMPLETED and self.length is None:
            return "completed without the object's size"
        if self.owed and self.ending != COMPLETED:
            return "a webhook owed for an upload not completed"
        return self._crc_inconsistency()

    def _crc_inconsistency(self) -> str | None:
        crcs = [p.crc for p in self.parts] + [s.crc for s in self.segments]
        if self.checksum is None:
            return None if crcs == [None] * len(crcs) else "CRCs without an algorithm"
        try:
            algorithm = Algorithm(self.checksum)
            for crc in crcs:
                if crc is not None:
                    decode_b64(algorithm, crc)
        except ValueError as exc:
            return f"checksum: {exc}"
        return None


def _texts(value: dict[str, Any]) -> dict[str, str]:
    """A record's text map; TypeError if it is none (the record is then refused)."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError("a map of texts holds something else")
    return dict(value)


def _check(rest: bytes) -> bytes:
    return hashlib.sha256(rest).hexdigest().encode()


def _record(raw: bytes) -> dict[str, Any]:
    """The JSON object of a state record whose check holds, or of an older record without
    one (the old fields only); CorruptState otherwise."""
    checked = raw.startswith(CHECK_PREFIX)
    if checked:
        end = len(CHECK_PREFIX) + CHECK_WIDTH
        rest = raw[end + 2 :]
        if raw[end : end + 2] != b'",' or raw[len(CHECK_PREFIX) : end] != _check(rest):
            raise CorruptState("its sha256 does not match its bytes")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CorruptState(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptState("not a JSON object")
    if not checked and not data.keys() <= UNCHECKED_FIELDS:
        unknown = sorted(data.keys() - UNCHECKED_FIELDS)
        raise CorruptState(f"no check, and fields no state without one has: {unknown}")
    return data


class TusStore:
    """The S3 calls of one upload's state: read, create, swap, segments, removal."""

    def __init__(self, bucket: ObjectStore, upload: TusUpload) -> None:
        self.bucket = bucket
        self.upload = upload
        self.state_key = upload.prefix + "state"

    async def read(self) -> tuple[TusState, str] | None:
        """The committed state and its ETag; None if there is none (never made, finished,
        terminated). A corrupted state is read once more (the bytes may have changed on the
        way), then CorruptState."""
        try:
            return await self._read_once()
        except CorruptState as err:
            log.warning("tus.state_corrupted id=%s why=%r action=reread", self.upload.id, err.why)
        try:
            return await self._read_once()
        except CorruptState as err:
            log.error("tus.state_corrupted id=%s why=%r action=refused", self.upload.id, err.why)
            raise CorruptState(f"{err.why}; read twice") from err

    async def _read_once(self) -> tuple[TusState, str] | None:
        try:
            raw, etag = await read_small(self.bucket, self.state_key)
        except NoSuchKey:
            return None
        if etag is None:
            raise ProxyError(INTERNAL, "the store returned the tus state without an ETag")
        return TusState.from_bytes(raw), etag

    async def create(self, state: TusState) -> Written:
        """Write a new upload's state (``If-None-Match: *``). Refused (412), the state there
        can only be this creation's own: the id is new and no one has its URL yet, so an
        earlier attempt landed and its answer was lost. Read back as the state sent, it is
        this write's, with that attempt unanswered (``Written.may_land_late``)."""
        try:
            return await self._write_state(state, if_none_match=True)
        except PreconditionFailed:
            found = await self.read()
            if found is None or found[0] != state:
                raise
            log.info("tus.creation_recovered id=%s", self.upload.id)
            return Written(found[1], unanswered=1)

    async def swap(self, state: TusState, etag: str) -> str:
        """Replace the state read as ``etag`` (PreconditionFailed/NoSuchKey if it changed)."""
        return await self._put_state(state, if_match=etag)

    async def _put_state(
        self, state: TusState, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        written = await self._write_state(state, if_none_match=if_none_match, if_match=if_match)
        return written.etag

    async def _write_state(
        self, state: TusState, *, if_none_match: bool = False, if_match: str | None = None
    ) -> Written:
        """The state with the CRC of its record when the upload has an algorithm (S3
        refuses it changed on the way in; its own check covers the way back)."""
        raw = state.to_bytes()
        crc = None if state.checksum is None else crc_of([raw], Algorithm(state.checksum))
        return await self._put_verified(
            self.state_key,
            [raw],
            STATE_OPTIONS,
            crc,
            "the tus state",
            if_none_match=if_none_match,
            if_match=if_match,
        )

    async def put_segment(
        self, start: int, chunks: Sequence[Chunk], size: int, crc: CrcValue | None
    ) -> tuple[Segment, Written]:
        """Store a PATCH's tail with ``crc``, the CRC of its bytes as they arrived (None
        without a checksum): S3 verifies it, and ``load`` checks the bytes read back. With
        the write (``Written.may_land_late``: an attempt may land after the upload ended)."""
        key = f"{self.upload.prefix}seg/{start:016d}-{uuid.uuid4().hex[:12]}"
        what = f"the staged bytes at {start}"
        written = await self._put_verified(key, chunks, SEGMENT_OPTIONS, crc, what)
        return Segment(key, start, size, None if crc is None else crc.b64()), written

    async def _put_verified(
        self,
        key: str,
        data: Sequence[Chunk],
        options: ObjectOptions,
        crc: CrcValue | None,
        what: str,
        **conditions: Any,
    ) -> Written:
        """PutObject carrying ``crc``, sent once more on BadDigest as a part is
        (``s3.resend_if_corrupted``; no ``If-*`` condition has changed meanwhile)."""
        put = functools.partial(self.bucket.put, key, data, options, checksum=crc, **conditions)
        return await resend_if_corrupted(
            put,
            what,
            context=f"tus_id={self.upload.id}",
            outcome="nothing of this request was kept",
        )

    async def load(
        self, segments: Sequence[Segment], algorithm: Algorithm | None
    ) -> tuple[list[bytes], CrcValue | None]:
        """The segments' bytes in order, each checked against the CRC it was stored with,
        and their CRC (computed here, so nobody reads them again for it; None without an
        algorithm). A segment that does not match is read once more, then 502
        UPSTREAM_CORRUPTION."""
        out: list[bytes] = []
        total = None if algorithm is None else CrcValue(algorithm, 0, 0)
        for seg in segments:
            chunks, crc = await self._load_segment(seg, algorithm)
            out += chunks
            if total is not None and crc is not None:
                total = total.then(crc)
        return out, total

    async def _load_segment(
        self, seg: Segment, algorithm: Algorithm | None
    ) -> tuple[list[bytes], CrcValue | None]:
        chunks, crc = await self._read_segment(seg, algorithm)
        if _intact(seg, crc):
            return chunks, crc
        log.warning("tus.segment_corrupted id=%s key=%s action=reread", self.upload.id, seg.key)
        chunks, crc = await self._read_segment(seg, algorithm)
        if _intact(seg, crc):
            return chunks, crc
        log.error("tus.segment_corrupted id=%s key=%s action=refused", self.upload.id, seg.key)
        raise ProxyError(
            UPSTREAM_CORRUPTION,
            f"the staged bytes at offset {seg.start} of this upload, read back from S3 twice, "
            "are not the bytes stored; nothing of this PATCH was kept (resume it later)",
        )

    async def _read_segment(
        self, seg: Segment, algorithm: Algorithm | None
    ) -> tuple[list[bytes], CrcValue | None]:
        running = None if algorithm is None else Crc(algorithm)
        out: list[bytes] = []
        async with await self.bucket.get(seg.key) as body:
            while chunk := await body.read(256 * 1024):
                out.append(chunk)
                if running is not None:
                    running.update(chunk)
        return out, None if running is None else running.result()

    async def delete_segments(self, segments: Sequence[Segment]) -> None:
        for seg in segments:
            await self.bucket.delete(seg.key)

    async def remove_all(self) -> int:
        """Delete every object under the upload's prefix, the state last (so a removal cut
        short leaves a state the sweep still finds); how many were deleted."""
        return await remove_prefix(self.bucket, self.upload.prefix, last=self.state_key)


def crc_of(chunks: Sequence[Chunk], algorithm: Algorithm) -> CrcValue:
    running = Crc(algorithm)
    for chunk in chunks:
        running.update(chunk)
    return running.result()


def _intact(seg: Segment, crc: CrcValue | None) -> bool:
    """The bytes read back are the segment's: their CRC (and length) is the one recorded.
    True when there is nothing to compare (--checksum off, or stored by older code)."""
    if seg.crc is None or crc is None:
        return True
    return crc == CrcValue(crc.algorithm, decode_b64(crc.algorithm, seg.crc), seg.size)


async def remove_prefix(bucket: ObjectStore, prefix: str, last: str | None = None) -> int:
    deleted = 0
    async for page in object_pages(bucket, prefix):
        for obj in page:
            if obj.key != last:
                await bucket.delete(obj.key)
                deleted += 1
    if last is not None:
        await bucket.delete(last)
        deleted += 1
    return deleted
