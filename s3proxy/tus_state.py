"""A tus upload's progress, kept in S3 only: one small state object, swapped atomically.

Layout, under the reserved prefix (``tus_url.RESERVED_PREFIX``)::

    .s3proxy/tus/<id>/state          JSON: offset, upload id, content type, committed parts
                                     (number, ETag, size, CRC), staged segments, the lock
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
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from s3proxy.body import Chunk
from s3proxy.checksums import Algorithm, CrcValue, decode_b64
from s3proxy.errors import INTERNAL, ProxyError
from s3proxy.parts import TIER_PARTS, PartPlan
from s3proxy.s3 import NoSuchKey, ObjectOptions, ObjectStore
from s3proxy.tus_url import TusUpload

log = logging.getLogger("s3proxy.tus")

STATE_OPTIONS = ObjectOptions("application/json")
SEGMENT_OPTIONS = ObjectOptions("application/octet-stream")


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


@dataclass(frozen=True)
class Lock:
    owner: str
    until: float  # unix seconds


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
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> TusState:
        try:
            data: dict[str, Any] = json.loads(raw)
            return cls(
                offset=int(data["offset"]),
                key=str(data["key"]),
                length=data.get("length"),
                upload_id=data["upload_id"],
                content_type=str(data["content_type"]),
                checksum=data.get("checksum"),
                parts=[Part(**p) for p in data["parts"]],
                segments=[Segment(**s) for s in data["segments"]],
                lock=None if data["lock"] is None else Lock(**data["lock"]),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ProxyError(INTERNAL, f"unreadable tus state: {exc}") from exc


class TusStore:
    """The S3 calls of one upload's state: read, create, swap, segments, removal."""

    def __init__(self, bucket: ObjectStore, upload: TusUpload) -> None:
        self.bucket = bucket
        self.upload = upload
        self.state_key = upload.prefix + "state"

    async def read(self) -> tuple[TusState, str] | None:
        """The committed state and its ETag; None if there is none (never made, finished,
        terminated)."""
        try:
            async with await self.bucket.get(self.state_key) as body:
                raw = bytearray()
                while chunk := await body.read(64 * 1024):
                    raw += chunk
                etag = body.head.etag
        except NoSuchKey:
            return None
        if etag is None:
            raise ProxyError(INTERNAL, "the store returned the tus state without an ETag")
        return TusState.from_bytes(bytes(raw)), etag

    async def create(self, state: TusState) -> str:
        written = await self.bucket.put(
            self.state_key, [state.to_bytes()], STATE_OPTIONS, if_none_match=True
        )
        return written.etag

    async def swap(self, state: TusState, etag: str) -> str:
        """Replace the state read as ``etag`` (PreconditionFailed/NoSuchKey if it changed)."""
        written = await self.bucket.put(
            self.state_key, [state.to_bytes()], STATE_OPTIONS, if_match=etag
        )
        return written.etag

    async def put_segment(self, start: int, chunks: Sequence[Chunk], size: int) -> Segment:
        key = f"{self.upload.prefix}seg/{start:016d}-{uuid.uuid4().hex[:12]}"
        await self.bucket.put(key, chunks, SEGMENT_OPTIONS)
        return Segment(key, start, size)

    async def load(self, segments: Sequence[Segment]) -> list[bytes]:
        out: list[bytes] = []
        for seg in segments:
            async with await self.bucket.get(seg.key) as body:
                while chunk := await body.read(256 * 1024):
                    out.append(chunk)
        return out

    async def delete_segments(self, segments: Sequence[Segment]) -> None:
        for seg in segments:
            await self.bucket.delete(seg.key)

    async def remove_all(self) -> int:
        """Delete every object under the upload's prefix, the state last (so a removal cut
        short leaves a state the sweep still finds); how many were deleted."""
        return await remove_prefix(self.bucket, self.upload.prefix, last=self.state_key)


async def remove_prefix(bucket: ObjectStore, prefix: str, last: str | None = None) -> int:
    deleted = 0
    after = ""
    while True:
        page = await bucket.list_objects(prefix, limit=1000, start_after=after)
        for obj in page:
            if obj.key != last:
                await bucket.delete(obj.key)
                deleted += 1
        if len(page) < 1000:
            break
        after = page[-1].key
    if last is not None:
        await bucket.delete(last)
        deleted += 1
    return deleted
