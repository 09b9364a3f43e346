"""An in-memory ``ObjectStore`` for unit tests: dicts for objects and uploads, every call
recorded, failures injected per operation and call number.

It keeps the contract in ``s3proxy.s3`` (and ``tests/test_s3_contract.py`` runs the same
tests against it and against the aiobotocore store on moto, so it cannot drift):
S3's 5 MiB minimum part size at Complete, NoSuchUpload, conditional and ranged reads, and
additional checksums as S3 (and SeaweedFS) verify them: a wrong one is BadDigest.

    store = MemoryS3()
    store.fail("UploadPart", at=2)                     # the 2nd UploadPart raises 502
    store.fail("CreateMultipartUpload", lost=True)     # made, but the answer is lost (504)
    store.corrupt("UploadPart", at=1)                  # the 1st part's bytes arrive changed
    store.refuse_checksums = True                      # a store that takes no x-amz-checksum-*
    ... run the code under test ...
    assert store.ops() == ["CreateMultipartUpload", "UploadPart", ...]
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from s3proxy.checksums import Algorithm, Crc, CrcValue
from s3proxy.errors import UPSTREAM_TIMEOUT, ProxyError
from s3proxy.s3 import (
    PAGE_SIZE,
    Body,
    Conditions,
    ObjectBody,
    ObjectHead,
    ObjectInfo,
    ObjectOptions,
    PartInfo,
    S3Error,
    SignedPost,
    SignedRequest,
    StoredChecksum,
    UploadInfo,
    Written,
    checksum_refusal,
    refusal,
    whole_object,
)

MIN_PART = 5 * 1024**2  # S3's minimum size of every part but the last (EntityTooSmall)


@dataclass
class Stored:
    data: bytes
    etag: str
    options: ObjectOptions
    last_modified: datetime
    tags: dict[str, str] = field(default_factory=dict)
    checksum: StoredChecksum | None = None


class Parts(dict[int, tuple[bytes, str]]):
    """An upload's parts by number; ``modified[n]`` is when part ``n`` was last stored
    (ListParts ``LastModified``), stamped on every store. Tests may set it."""

    def __init__(self) -> None:
        super().__init__()
        self.modified: dict[int, datetime] = {}

    def __setitem__(self, number: int, part: tuple[bytes, str]) -> None:
        super().__setitem__(number, part)
        self.modified[number] = _now()


@dataclass
class Upload:
    key: str
    options: ObjectOptions
    initiated: datetime
    parts: Parts = field(default_factory=Parts)
    checksum: Algorithm | None = None


@dataclass
class Failure:
    operation: str
    at: int | None  # the n-th call of the operation (1-based); None: every call
    error: Callable[[], ProxyError]
    lost: bool  # carry the call out, then raise: S3 did it, the answer never came


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)  # HTTP dates have whole seconds


def _join(data: Body) -> bytes:
    return b"".join(bytes(c) for c in data)


def _crc(algorithm: Algorithm, data: bytes) -> CrcValue:
    running = Crc(algorithm)
    running.update(data)
    return running.result()


class MemoryS3:
    """``ObjectStore`` over dicts; see the module docstring."""

    def __init__(self, bucket: str = "memory") -> None:
        self.bucket = bucket
        self.secret: str | None = "memory-secret"  # what credential_secret() answers
        self.objects: dict[str, Stored] = {}
        self.uploads: dict[str, Upload] = {}
        self.calls: list[tuple[str, str]] = []  # (operation, key)
        self._failures: list[Failure] = []
        self._corrupt: list[tuple[str, int | None]] = []
        self._ids = itertools.count(1)
        self.refuse_checksums = False  # answer a checksum as stores without them do

    @property
    def endpoint_url(self) -> str | None:
        return "memory://"

    # -- test controls --------------------------------------------------------------

    def fail(
        self,
        operation: str,
        *,
        at: int | None = None,
        error: ProxyError | None = None,
        lost: bool = False,
    ) -> None:
        """Make ``operation`` fail (its ``at``-th call, or every call) with ``error``
        (default: S3's 500 InternalError; with ``lost``, a timeout after doing it)."""

        def make() -> ProxyError:
            if error is not None:
                return error
            if lost:
                return S3Error(
                    UPSTREAM_TIMEOUT,
                    f"S3 {operation} timed out",
                    operation=operation,
                    reason="ReadTimeoutError",
                )
            return refusal(operation, "InternalError", 500)

        self._failures.append(Failure(operation, at, make, lost))

    def corrupt(self, operation: str, *, at: int | None = None) -> None:
        """Flip a byte of ``operation``'s body (its ``at``-th call, or every call) on the way in."""
        self._corrupt.append((operation, at))

    def _received(self, operation: str, data: Body) -> bytes:
        """The bytes as they arrive: changed if a ``corrupt`` matches this call."""
        raw = _join(data)
        n = self.ops().count(operation)
        if raw and any(op == operation and at in (None, n) for op, at in self._corrupt):
            flipped = bytearray(raw)
            flipped[len(flipped) // 2] ^= 0x01
            return bytes(flipped)
        return raw

    def _verify(self, operation: str, value: CrcValue | Algorithm | None, raw: bytes) -> None:
        """What S3 does with a checksum header: refuse it (a store without them) or check it."""
        if value is None:
            return
        if self.refuse_checksums:
            raise checksum_refusal(refusal(operation, "InvalidArgument", 400))
        if isinstance(value, CrcValue) and _crc(value.algorithm, raw) != value:
            raise refusal(operation, "BadDigest", 400)

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]

    def _call(self, operation: str, key: str = "") -> Failure | None:
        """Record the call; raise an injected failure now, or return a lost one for later."""
        self.calls.append((operation, key))
        n = self.ops().count(operation)
        for failure in self._failures:
            if failure.operation == operation and failure.at in (None, n):
                if failure.lost:
                    return failure
                raise failure.error()
        return None

    @staticmethod
    def _after(failure: Failure | None) -> None:
        if failure is not None:
            raise failure.error()

    # -- writes ---------------------------------------------------------------------

    def _only_new(self, operation: str, key: str, if_none_match: bool) -> None:
        if if_none_match and key in self.objects:
            raise refusal(operation, "PreconditionFailed", 412)

    async def put(
        self,
        key: str,
        data: Body,
        options: ObjectOptions,
        *,
        checksum: CrcValue | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> Written:
        lost = self._call("PutObject", key)
        self._only_new("PutObject", key, if_none_match)
        if if_match is not None:
            current = self.objects.get(key)
            if current is None:
                raise refusal("PutObject", "NoSuchKey", 404)
            if not _matches(if_match, current.etag):
                raise refusal("PutObject", "PreconditionFailed", 412)
        raw = self._received("PutObject", data)
        self._verify("PutObject", checksum, raw)
        stored = None if checksum is None else StoredChecksum(checksum.algorithm, checksum.b64())
        self.objects[key] = Stored(raw, _etag(raw), options, _now(), checksum=stored)
        self._after(lost)
        return Written(self.objects[key].etag, stored)

    async def create(
        self,
        key: str,
        options: ObjectOptions,
        *,
        checksum: Algorithm | None = None,
        shared: bool = False,
    ) -> str:
        try:
            lost = self._call("CreateMultipartUpload", key)
            self._verify("CreateMultipartUpload", checksum, b"")
            upload_id = f"upload-{next(self._ids)}"
            self.uploads[upload_id] = Upload(key, options, _now(), checksum=checksum)
            self._after(lost)
        except BaseException:
            if not shared:  # the contract: no upload left behind, but others' on a shared key
                await self.abort_uploads(key)
            raise
        return upload_id

    def _upload(self, operation: str, key: str, upload_id: str) -> Upload:
        upload = self.uploads.get(upload_id)
        if upload is None or upload.key != key:
            raise refusal(operation, "NoSuchUpload", 404)
        return upload

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: Body, *, checksum: CrcValue | None = None
    ) -> str:
        lost = self._call("UploadPart", key)
        upload = self._upload("UploadPart", key, upload_id)
        raw = self._received("UploadPart", data)
        self._verify("UploadPart", checksum, raw)
        if checksum is not None and checksum.algorithm is not upload.checksum:
            raise refusal("UploadPart", "InvalidRequest", 400)  # not the declared algorithm
        upload.parts[number] = (raw, _etag(raw))
        self._after(lost)
        return upload.parts[number][1]

    async def complete(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        *,
        checksums: Sequence[CrcValue] = (),
        if_none_match: bool = False,
    ) -> Written:
        op = "CompleteMultipartUpload"
        lost = self._call(op, key)
        upload = self._upload(op, key, upload_id)
        self._only_new(op, key, if_none_match)  # refused: the upload stays open, as in S3
        numbers = [n for n, _ in parts]
        if not parts or numbers != sorted(set(numbers)):
            raise refusal(op, "InvalidPartOrder", 400)
        if any(n not in upload.parts or upload.parts[n][1] != e for n, e in parts):
            raise refusal(op, "InvalidPart", 400)
        chunks = [upload.parts[n][0] for n in numbers]
        if any(len(c) < MIN_PART for c in chunks[:-1]):
            raise refusal(op, "EntityTooSmall", 400)
        digest = hashlib.md5(
            b"".join(bytes.fromhex(upload.parts[n][1].strip('"')) for n in numbers)
        )
        etag = f'"{digest.hexdigest()}-{len(parts)}"'
        whole = whole_object(checksums)
        raw = b"".join(chunks)
        stored = None
        if whole is not None:
            # S3 checks each listed part's value and the object's (a refusal leaves the
            # upload open, as S3's does).
            if any(_crc(c.algorithm, d) != c for c, d in zip(checksums, chunks, strict=True)):
                raise refusal(op, "BadDigest", 400)
            self._verify(op, whole, raw)
            stored = StoredChecksum(whole.algorithm, whole.b64())
        elif upload.checksum is not None:  # FULL_OBJECT declared, no value: S3 computes it
            stored = StoredChecksum(upload.checksum, _crc(upload.checksum, raw).b64())
        self.objects[key] = Stored(raw, etag, upload.options, _now(), checksum=stored)
        del self.uploads[upload_id]
        self._after(lost)
        return Written(etag, stored)

    async def abort(self, key: str, upload_id: str) -> None:
        lost = self._call("AbortMultipartUpload", key)
        upload = self.uploads.get(upload_id)
        if upload is not None and upload.key == key:
            del self.uploads[upload_id]
        self._after(lost)

    async def abort_uploads(self, key: str) -> list[UploadInfo]:
        found = [u async for u in self.list_uploads(key) if u.key == key]
        for upload in found:
            await self.abort(key, upload.upload_id)
        return found

    async def tag(self, key: str, tags: Mapping[str, str]) -> int:
        lost = self._call("PutObjectTagging", key)
        if key not in self.objects:
            raise refusal("PutObjectTagging", "NoSuchKey", 404)
        self.objects[key].tags = dict(tags)
        self._after(lost)
        return 0

    async def tags(self, key: str) -> dict[str, str]:
        lost = self._call("GetObjectTagging", key)
        if key not in self.objects:
            raise refusal("GetObjectTagging", "NoSuchKey", 404)
        found = dict(self.objects[key].tags)
        self._after(lost)
        return found

    async def untag(self, key: str) -> int:
        lost = self._call("DeleteObjectTagging", key)
        if key not in self.objects:
            raise refusal("DeleteObjectTagging", "NoSuchKey", 404)
        self.objects[key].tags = {}
        self._after(lost)
        return 0

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        lost = self._call("DeleteObject", key)
        obj = self.objects.get(key)
        if obj is not None and if_match is not None and not _matches(if_match, obj.etag):
            raise refusal("DeleteObject", "PreconditionFailed", 412)
        self.objects.pop(key, None)
        self._after(lost)

    # -- reads ----------------------------------------------------------------------

    async def credential_secret(self) -> str | None:
        return self.secret

    async def check(self, within: float | None = None) -> None:
        self._call("HeadBucket")

    async def list_parts(
        self, key: str, upload_id: str, *, max_parts: int | None = None
    ) -> list[PartInfo]:
        self._call("ListParts", key)
        upload = self._upload("ListParts", key, upload_id)
        found = [
            PartInfo(n, e, len(d), upload.parts.modified[n])
            for n, (d, e) in sorted(upload.parts.items())
        ]
        return found[:max_parts]

    async def list_objects(
        self, prefix: str = "", *, limit: int = 1000, start_after: str = ""
    ) -> list[ObjectInfo]:
        self._call("ListObjectsV2", prefix)
        keys = sorted(k for k in self.objects if k.startswith(prefix) and k > start_after)[:limit]
        return [ObjectInfo(k, len(self.objects[k].data)) for k in keys]

    async def list_uploads(
        self, prefix: str, *, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[UploadInfo]:
        self._call("ListMultipartUploads", prefix)
        listed = sorted(
            (UploadInfo(u.key, upload_id, u.initiated) for upload_id, u in self.uploads.items()),
            key=lambda u: (u.key, u.upload_id),
        )
        for upload in listed:
            if upload.key.startswith(prefix):
                yield upload

    def _read(
        self, operation: str, key: str, byte_range: str | None, cond: Conditions | None
    ) -> tuple[ObjectHead, bytes]:
        self._call(operation, key)
        obj = self.objects.get(key)
        if obj is None:
            raise refusal(operation, "NoSuchKey", 404)
        cond = cond or Conditions()
        if (cond.if_match is not None and not _matches(cond.if_match, obj.etag)) or (
            cond.if_match is None
            and cond.if_unmodified_since is not None
            and obj.last_modified > cond.if_unmodified_since
        ):
            raise refusal(operation, "PreconditionFailed", 412)
        if (cond.if_none_match is not None and _matches(cond.if_none_match, obj.etag)) or (
            cond.if_none_match is None
            and cond.if_modified_since is not None
            and obj.last_modified <= cond.if_modified_since
        ):
            raise refusal(operation, "304", 304, etag=obj.etag, last_modified=obj.last_modified)
        data, content_range = obj.data, None
        if byte_range is not None:
            span = _span(byte_range, len(obj.data))
            if span is None:
                raise refusal(operation, "InvalidRange", 416, size=len(obj.data))
            first, last = span
            data, content_range = data[first : last + 1], f"bytes {first}-{last}/{len(obj.data)}"
        opts = obj.options
        head = ObjectHead(
            length=len(data),
            etag=obj.etag,
            last_modified=obj.last_modified,
            content_type=opts.content_type,
            content_disposition=opts.content_disposition,
            content_range=content_range,
            metadata=dict(opts.metadata),
        )
        return head, data

    async def head(
        self, key: str, *, byte_range: str | None = None, conditions: Conditions | None = None
    ) -> ObjectHead:
        return self._read("HeadObject", key, byte_range, conditions)[0]

    async def get(
        self, key: str, *, byte_range: str | None = None, conditions: Conditions | None = None
    ) -> ObjectBody:
        head, data = self._read("GetObject", key, byte_range, conditions)
        offset = 0

        async def read(n: int) -> bytes:
            nonlocal offset
            chunk = data[offset : offset + n]
            offset += len(chunk)
            return chunk

        return ObjectBody(head, read, lambda: None)

    # -- signing (URLs that only say what was signed) -------------------------------

    def _url(self, key: str, **query: object) -> str:
        self._call("presign", key)
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"memory://{self.bucket}/{key}" + (f"?{q}" if q else "")

    async def presign_get(
        self, key: str, expires_in: int, *, head: bool = False, disposition: str | None = None
    ) -> str:
        return self._url(key, method="HEAD" if head else "GET", expires=expires_in)

    async def presign_put(
        self,
        key: str,
        size: int,
        options: ObjectOptions,
        expires_in: int,
        *,
        if_none_match: bool = False,
        sha256: bytes | None = None,
    ) -> SignedRequest:
        url = self._url(key, method="PUT", size=size, expires=expires_in)
        only_new = {"If-None-Match": "*"} if if_none_match else {}
        if sha256 is not None:
            only_new["x-amz-checksum-sha256"] = base64.b64encode(sha256).decode()
        return SignedRequest(url, {"Content-Type": options.content_type, **only_new})

    async def presign_post(
        self, key: str, size: int, options: ObjectOptions, expires_in: int
    ) -> SignedPost:
        url = self._url("", method="POST", expires=expires_in)
        return SignedPost(url, {"key": key, "Content-Type": options.content_type})

    async def presign_part(self, key: str, upload_id: str, number: int, expires_in: int) -> str:
        return self._url(key, uploadId=upload_id, partNumber=number, expires=expires_in)

    async def object_url(self, key: str) -> str:
        return (await self.presign_get(key, 1)).split("?", 1)[0]


def _matches(tags: str, etag: str) -> bool:
    return tags.strip() == "*" or etag in [t.strip() for t in tags.split(",")]


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _span(byte_range: str, size: int) -> tuple[int, int] | None:
    """RFC 9110 14.1.2: the first and last byte of a range, or None if unsatisfiable."""
    m = _RANGE.fullmatch(byte_range)
    if m is None or not (m[1] or m[2]):
        return (0, size - 1) if size else None
    if not m[1]:  # a suffix
        length = int(m[2])
        return (max(0, size - length), size - 1) if length and size else None
    first = int(m[1])
    if first >= size:
        return None
    return first, min(size - 1, int(m[2])) if m[2] else size - 1
