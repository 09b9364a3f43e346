"""The S3 interface: every call the product makes to its bucket, typed, and nothing else.

Like tusd's ``S3API`` beside its handler and httpx's ``AsyncBaseTransport``, the
storage side is one small contract with one real implementation
(``s3proxy.s3_aiobotocore``, over aiobotocore) and one in-memory one for tests
(``tests/memory_s3.py``); the same contract tests run against both. Nothing here
imports botocore: callers see the dataclasses below and ``S3Error``.

Errors: every call raises only ``S3Error`` (a ``ProxyError``, so an unhandled one
still reaches the client as JSON 502/503/504, as before) or cancellation::

    ProxyError
      S3Error               kind UPSTREAM_ERROR (S3 refused), _UNAVAILABLE (unreachable,
        |                   throttling), _TIMEOUT; ``reason`` is S3's error code (or, with
        |                   no answer, the exception's type name): stable, for metrics
        NoSuchUpload        the multipart upload id is unknown (completed, aborted, never made)
        NoSuchKey           no such object (GetObject/HeadObject)
        InvalidParts        Complete refused the part list (InvalidPart, InvalidPartOrder,
                            EntityTooSmall)
        PreconditionFailed  412 to If-Match / If-Unmodified-Since, and to a write's
                            If-None-Match: * on an existing key (409 ConditionalRequestConflict,
                            S3's answer to a write racing another on the key, too)
        NotModified         304 to If-None-Match / If-Modified-Since (carries the validators)
        InvalidRange        416; ``size`` is the object's, if S3 said
        NoCredentials       no usable credentials are configured; raised while signing,
                            before any request is sent (so nothing was stored)
        BadDigest           kind UPSTREAM_CORRUPTION: S3 computed another checksum than the
                            one sent (the bytes changed on the way); nothing was stored
        ChecksumDiffers     kind UPSTREAM_CORRUPTION: a write was carried out but S3 answered
                            with another FULL_OBJECT checksum than the one sent
        ChecksumUnsupported a call carrying an additional checksum was refused in a way that
                            says the store does not take them (``checksum_refusal``)

Checksums: ``put``/``upload_part`` take the CRC of their bytes (``s3proxy.checksums``) and
send it as ``x-amz-checksum-<algorithm>``, so S3 refuses bytes changed in transit;
``create`` declares the algorithm (``ChecksumType=FULL_OBJECT``); ``complete`` takes each
part's CRC and sends them with the full-object value combined from them. ``put`` and
``complete`` return ``Written``: the ETag and the checksum S3 stored, as S3 reported it or,
if it reported none, the value sent (which S3 accepted); never a FULL_OBJECT value other
than the one sent (``stored_checksum``).

A caller branches on the type; none parses an S3 error code. The kinds stay the
upstream ones, so a caller that does not branch (the upload pipeline) answers 502
as it always did; one that does (presign: 404 NO_SUCH_UPLOAD) re-raises its own.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, TypeVar

from s3proxy.body import Chunk
from s3proxy.checksums import Algorithm, CrcValue, DigestError, decode_b64, full_object
from s3proxy.errors import (
    KEY_EXISTS,
    UPSTREAM_CORRUPTION,
    UPSTREAM_ERROR,
    UPSTREAM_UNAVAILABLE,
    ErrorKind,
    ProxyError,
)
from s3proxy.keys import content_disposition

log = logging.getLogger("s3proxy.s3")
T = TypeVar("T")

Body = Sequence[Chunk]  # a part as the chunks it arrived in

#: S3 error codes that mean "slow down" (and so 503, not 502).
THROTTLING = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable"}
)
#: S3's answers to a bad part list at CompleteMultipartUpload.
BAD_PARTS = frozenset({"InvalidPart", "InvalidPartOrder", "EntityTooSmall"})
PAGE_SIZE = 1000  # ListParts and ListMultipartUploads page at 1,000 (S3 API reference)
#: S3's answers when the bytes it received are not the bytes described: BadDigest for a
#: Content-MD5 or x-amz-checksum-* mismatch, XAmzContentSHA256Mismatch for a signed
#: payload's sha256 (S3 API reference, "Error responses").
CORRUPTED = frozenset({"BadDigest", "XAmzContentSHA256Mismatch"})
#: What a store answers to a checksum header or ChecksumAlgorithm it does not take: S3 says
#: InvalidRequest to an algorithm the upload did not declare, stores without additional
#: checksums InvalidArgument or NotImplemented (501).
CHECKSUM_REFUSALS = frozenset({"InvalidArgument", "InvalidRequest", "NotImplemented"})


# --- errors -----------------------------------------------------------------------


class S3Error(ProxyError):
    """An S3 call failed; see the module docstring for the tree."""

    def __init__(self, kind: ErrorKind, message: str, *, operation: str, reason: str) -> None:
        super().__init__(kind, message)
        self.operation = operation
        self.reason = reason


class NoSuchUpload(S3Error):
    pass


class NoSuchKey(S3Error):
    pass


class InvalidParts(S3Error):
    pass


class PreconditionFailed(S3Error):
    pass


class NotModified(S3Error):
    """A 304: the client's copy is current. The validators go into the 304 answer."""

    etag: str | None = None
    last_modified: dt.datetime | None = None


class InvalidRange(S3Error):
    size: int | None = None  # the object's size, for ``Content-Range: bytes */size``


class NoCredentials(S3Error):
    pass


class BadDigest(S3Error):
    """S3 refused the bytes: they do not match the checksum sent with them."""


class ChecksumDiffers(S3Error):
    """S3 carried out a write but answered with another FULL_OBJECT checksum than the one
    sent with it: it holds (or says it holds) other bytes. The write took place, so it is
    not resent; the caller deletes what it stored."""


class ChecksumUnsupported(S3Error):
    """The store refused a call because of its additional checksum (see ``checksum_refusal``)."""


async def resend_if_corrupted(
    call: Callable[[], Awaitable[T]], what: str, *, context: str, outcome: str
) -> T:
    """A write that carries a checksum, sent once more if S3 refuses its bytes as changed
    on the way (BadDigest: nothing was stored; botocore's standard retry mode does not
    retry a 400, and the bytes are still in memory). Refused again, the link corrupts
    data: UPSTREAM_CORRUPTION naming ``what``, then ``outcome``. ``context`` goes in the
    log line (``key=...``)."""
    try:
        return await call()
    except BadDigest as exc:
        log.warning("s3.bad_digest %s what=%r reason=%s action=resend", context, what, exc.reason)
    try:
        return await call()
    except BadDigest as exc:
        raise ProxyError(
            UPSTREAM_CORRUPTION,
            f"S3 refused {what} twice as corrupted on the way to it ({exc.reason}); {outcome}",
        ) from exc


async def refuse_stored(bucket: ObjectStore, key: str) -> None:
    """409 KEY_EXISTS for a key already stored where uploads do not replace objects
    (--no-overwrite on a template that shares keys): said before the client sends the
    file, not after. The write itself still refuses one stored meanwhile (If-None-Match)."""
    try:
        await bucket.head(key)
    except NoSuchKey:
        return
    raise ProxyError(
        KEY_EXISTS, f"an object is already stored at {key!r}; uploads do not replace objects"
    )


def checksum_refusal(err: S3Error) -> S3Error:
    """``err`` as ChecksumUnsupported when the refused call carried a checksum and S3's code
    says the store does not take one; else ``err`` unchanged. Implementations call it only
    for calls that carried a checksum, so the same code on a plain call stays what it was."""
    if type(err) is S3Error and err.reason in CHECKSUM_REFUSALS:
        return ChecksumUnsupported(
            err.kind, err.message, operation=err.operation, reason=err.reason
        )
    return err


def refusal(
    operation: str,
    code: str,
    status: int,
    *,
    etag: str | None = None,
    last_modified: dt.datetime | None = None,
    size: int | None = None,
) -> S3Error:
    """The typed error for S3's answer ``status``/``code`` to ``operation``.

    Both implementations build their errors here, so they cannot disagree on which
    answer is which type. HeadObject errors have no body (the code is the status),
    so a 404 to a read is NoSuchKey by status.
    """
    if code in THROTTLING or status == 503:
        return S3Error(
            UPSTREAM_UNAVAILABLE,
            f"S3 {operation} throttled or unavailable: {code}",
            operation=operation,
            reason=code,
        )
    message = f"S3 {operation} failed: {code}"
    kwargs = {"operation": operation, "reason": code}
    if code in CORRUPTED:
        return BadDigest(
            UPSTREAM_CORRUPTION,
            f"S3 {operation} refused the bytes as corrupted in transit: {code}",
            **kwargs,
        )
    if code == "NoSuchUpload":
        return NoSuchUpload(UPSTREAM_ERROR, message, **kwargs)
    if code in BAD_PARTS:
        return InvalidParts(UPSTREAM_ERROR, message, **kwargs)
    if code == "NoSuchKey" or (status == 404 and operation in ("HeadObject", "GetObject")):
        return NoSuchKey(UPSTREAM_ERROR, message, **kwargs)
    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
        return PreconditionFailed(UPSTREAM_ERROR, message, **kwargs)
    if status == 304:
        err = NotModified(UPSTREAM_ERROR, message, **kwargs)
        err.etag, err.last_modified = etag, last_modified
        return err
    if code == "InvalidRange" or status == 416:
        bad = InvalidRange(UPSTREAM_ERROR, message, **kwargs)
        bad.size = size
        return bad
    return S3Error(UPSTREAM_ERROR, message, **kwargs)


# --- what goes in -----------------------------------------------------------------


@dataclass(frozen=True)
class ObjectOptions:
    """What is set on an object when it is created."""

    content_type: str
    content_disposition: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    acl: str | None = None
    storage_class: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None


@dataclass(frozen=True)
class ObjectDefaults:
    """The settings every created object gets (``--acl``, ``--storage-class``, SSE): the one
    place ``ObjectOptions`` are made, for ``POST /upload`` and for presigned uploads alike."""

    acl: str | None = None
    storage_class: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None

    def options(
        self, content_type: str, filename: str, metadata: Mapping[str, str] | None = None
    ) -> ObjectOptions:
        return ObjectOptions(
            content_type=content_type,
            content_disposition=content_disposition(filename),
            metadata=dict(metadata or {}),
            acl=self.acl,
            storage_class=self.storage_class,
            sse=self.sse,
            sse_kms_key_id=self.sse_kms_key_id,
        )


@dataclass(frozen=True)
class Conditions:
    """A read's validators (RFC 9110 13.1), passed to S3 as they are."""

    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: dt.datetime | None = None
    if_unmodified_since: dt.datetime | None = None


# --- what comes out ---------------------------------------------------------------


@dataclass(frozen=True)
class StoredChecksum:
    """The additional checksum an object was stored with (a CRC of the whole object)."""

    algorithm: Algorithm
    value: str  # base64, as S3 writes it in x-amz-checksum-<algorithm>
    type: str = "FULL_OBJECT"  # ChecksumType: CRCs of whole objects are FULL_OBJECT
    reported: bool = True  # S3 returned it; False: the value sent, which S3 accepted

    @classmethod
    def sent(cls, value: CrcValue) -> StoredChecksum:
        return cls(value.algorithm, value.b64(), reported=False)

    def to_json(self) -> dict[str, str]:
        return {"algorithm": self.algorithm.value.lower(), "type": self.type, "value": self.value}


def stored_checksum(
    operation: str, sent: CrcValue | None, reported: str | None, kind: str | None
) -> StoredChecksum | None:
    """The checksum S3 stored an object with, from its answer to PutObject or Complete.

    None reported: the value sent, which S3 accepted. A FULL_OBJECT value must be the CRC
    sent; any other is ChecksumDiffers. A COMPOSITE one (a checksum of the parts'
    checksums, from a store that did not take the FULL_OBJECT type declared) is not a CRC
    of the object and cannot be compared: it is reported as S3 gave it, its type saying so.
    Pure."""
    if sent is None:
        return None
    if not reported:
        return StoredChecksum.sent(sent)
    kind = kind or "FULL_OBJECT"
    if kind == "FULL_OBJECT":
        try:
            same = decode_b64(sent.algorithm, reported) == sent.value
        except DigestError:
            same = False
        if not same:
            raise ChecksumDiffers(
                UPSTREAM_CORRUPTION,
                f"S3 {operation} answered that it stored {sent.algorithm.value} {reported!r}, "
                f"not {sent.b64()!r}, the CRC of the bytes sent: the store holds other bytes",
                operation=operation,
                reason="ChecksumDiffers",
            )
    return StoredChecksum(sent.algorithm, reported, kind)


@dataclass(frozen=True)
class Written:
    """What ``put`` and ``complete`` stored: the ETag, and the checksum if one was sent.

    ``unanswered``: attempts of the call that got no answer after their request may have
    reached S3 (a read timeout, a connection dropped once sent), before another attempt's
    answer. S3 may still carry such an attempt out later: a request held on the way lands
    after whatever removed this object meanwhile (a rollback), and stores it again. So
    whatever removes it makes the removal again later (``janitor.late_delays``)."""

    etag: str
    checksum: StoredChecksum | None = None
    unanswered: int = 0

    @property
    def may_land_late(self) -> bool:
        """An attempt of this write may still be carried out by S3 (see the class)."""
        return self.unanswered > 0


def whole_object(parts: Sequence[CrcValue]) -> CrcValue | None:
    """The FULL_OBJECT value ``complete`` sends for these part CRCs; None for none."""
    return full_object(parts, parts[0].algorithm) if parts else None


@dataclass(frozen=True)
class PartInfo:
    number: int
    etag: str
    size: int
    last_modified: dt.datetime | None = None  # when the store took it: the sweep's sign of life


@dataclass(frozen=True)
class ObjectInfo:
    """An object as a listing names it."""

    key: str
    size: int


@dataclass(frozen=True)
class UploadInfo:
    """An open multipart upload."""

    key: str
    upload_id: str
    initiated: dt.datetime


@dataclass(frozen=True)
class ObjectHead:
    """An object's answer to HeadObject/GetObject; with a range, ``length`` is the range's."""

    length: int  # bytes in this answer (Content-Length)
    etag: str | None = None
    last_modified: dt.datetime | None = None
    content_type: str | None = None
    content_disposition: str | None = None
    content_encoding: str | None = None
    content_language: str | None = None
    content_range: str | None = None  # "bytes 0-9/100" when a range was served (206)
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return self.content_range is not None

    @property
    def size(self) -> int:
        """The whole object's size (from Content-Range's total when a range was served)."""
        if self.content_range is not None:
            total = self.content_range.rpartition("/")[2]
            if total.isdigit():
                return int(total)
        return self.length


class ObjectBody:
    """A GetObject answer: its head, and its bytes read on demand. Close it on every path."""

    def __init__(
        self, head: ObjectHead, read: Callable[[int], Awaitable[bytes]], close: Callable[[], None]
    ) -> None:
        self.head = head
        self._read = read
        self._close = close

    async def read(self, n: int) -> bytes:
        """At most ``n`` bytes; b"" at the end."""
        return await self._read(n)

    def close(self) -> None:
        self._close()

    async def __aenter__(self) -> ObjectBody:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class SignedRequest:
    """A presigned PUT: the URL, and the headers the client must send exactly."""

    url: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class SignedPost:
    """A presigned POST: the form's action URL and the fields to send before the file."""

    url: str
    fields: Mapping[str, str]


# --- the contract -----------------------------------------------------------------


class ObjectSink(Protocol):
    """The S3 calls the upload pipeline needs (a subset of ``ObjectStore``)."""

    async def put(
        self,
        key: str,
        data: Body,
        options: ObjectOptions,
        *,
        checksum: CrcValue | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> Written: ...
    async def create(
        self,
        key: str,
        options: ObjectOptions,
        *,
        checksum: Algorithm | None = None,
        shared: bool = False,
    ) -> str: ...
    async def upload_part(
        self, key: str, upload_id: str, number: int, data: Body, *, checksum: CrcValue | None = None
    ) -> str: ...
    async def complete(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        *,
        checksums: Sequence[CrcValue] = (),
        if_none_match: bool = False,
    ) -> Written: ...
    async def abort(self, key: str, upload_id: str) -> None: ...
    async def tag(self, key: str, tags: Mapping[str, str]) -> int: ...
    async def tags(self, key: str) -> dict[str, str]: ...
    async def untag(self, key: str) -> int: ...
    async def delete(self, key: str, *, if_match: str | None = None) -> None: ...
    async def check(self, within: float | None = None) -> None: ...
    async def head(
        self, key: str, *, byte_range: str | None = None, conditions: Conditions | None = None
    ) -> ObjectHead: ...


class ObjectStore(ObjectSink, Protocol):
    """One bucket, as the product uses it. The contract every implementation keeps:

    * Every call raises ``S3Error`` (or a subclass) for any failure, never a library's
      own exception; cancellation passes through untouched.
    * ``put``/``complete`` return the object's ETag (in ``Written``); ``create`` the
      upload id; ``upload_part`` the part's ETag.
    * A ``checksum`` given to ``put``/``upload_part`` is sent with the bytes; ``create``
      with one declares it FULL_OBJECT; ``complete``'s ``checksums`` (one per part, in
      order) are sent with their parts and combined into the full-object value.
      ``Written.checksum`` is what S3 reported, else the value sent; None if none was.
      A mismatch S3 detects raises BadDigest; a call with a checksum the store does not
      take raises ChecksumUnsupported.
    * ``create`` leaves no upload open when it fails, even when S3 made one and only
      the answer was lost (a timeout, a dropped connection, a cancellation): it aborts
      the key's uploads (``abort_uploads``) before raising, and the others of its key
      when it was retried. Not with ``shared``: the key may be other requests' too, and
      their uploads of it cannot be told from a lost one, so that is left to the orphan
      sweep (which aborts an upload once idle).
    * ``put``/``complete`` count in ``Written.unanswered`` the attempts that got no
      answer once their request may have reached S3 (read timeouts, dropped
      connections; botocore's own path, which does not say why, counts every retry).
    * ``abort`` of an upload already gone (NoSuchUpload) succeeds: aborts are retried.
    * ``complete`` raises NoSuchUpload or InvalidParts for those answers.
    * ``put``/``complete`` with ``if_none_match`` send ``If-None-Match: *`` and raise
      PreconditionFailed if the key exists (nothing written; a refused Complete leaves
      the upload open). ``put`` with ``if_match`` (an ETag) writes only over that exact
      object (a compare-and-swap: PreconditionFailed if it changed, NoSuchKey if it is
      gone; S3 since 2024-11, moto and SeaweedFS: tests/test_s3_contract.py).
      ``delete`` with ``if_match`` (an ETag) sends ``If-Match`` and raises
      PreconditionFailed if the object is another (S3 since 2025-09, SeaweedFS
      and moto: probed in tests/test_no_overwrite.py); deleting a missing key succeeds.
    * ``list_parts`` returns parts by number, all of them (S3 pages at 1,000) unless
      ``max_parts`` caps it; NoSuchUpload if the upload is unknown.
    * ``list_objects`` returns one page, in key order, of keys after ``start_after``.
    * ``credential_secret`` is the secret key the store signs with, if one is known
      (tus URLs signed with it before the bucket held a URL key still verify:
      ``tus_keys``; instances with their own credentials do not share it).
    * ``list_uploads`` yields each open upload whose key starts with ``prefix`` once,
      following the store's page markers; a store that ignores ``Prefix`` cannot make
      it yield others.
    * ``head``/``get`` raise NoSuchKey, PreconditionFailed, NotModified, InvalidRange
      for those answers; ``get``'s body must be closed.
    * ``presign_*`` sign for the endpoint browsers reach and make no S3 call;
      ``presign_put`` with ``if_none_match`` signs ``If-None-Match: *`` as a header
      the client must send (S3 then refuses a key that exists, 412);
      ``object_url`` is where the object lives there (no query).
    """

    bucket: str

    @property
    def endpoint_url(self) -> str | None: ...

    async def abort_uploads(self, key: str) -> list[UploadInfo]: ...
    async def list_objects(
        self, prefix: str = "", *, limit: int = 1000, start_after: str = ""
    ) -> list[ObjectInfo]: ...
    async def credential_secret(self) -> str | None: ...
    async def list_parts(
        self, key: str, upload_id: str, *, max_parts: int | None = None
    ) -> list[PartInfo]: ...
    def list_uploads(
        self, prefix: str, *, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[UploadInfo]: ...
    async def get(
        self, key: str, *, byte_range: str | None = None, conditions: Conditions | None = None
    ) -> ObjectBody: ...
    async def presign_get(
        self, key: str, expires_in: int, *, head: bool = False, disposition: str | None = None
    ) -> str: ...
    async def presign_put(
        self,
        key: str,
        size: int,
        options: ObjectOptions,
        expires_in: int,
        *,
        if_none_match: bool = False,
        sha256: bytes | None = None,
    ) -> SignedRequest: ...
    async def presign_post(
        self, key: str, size: int, options: ObjectOptions, expires_in: int
    ) -> SignedPost: ...
    async def presign_part(self, key: str, upload_id: str, number: int, expires_in: int) -> str: ...
    async def object_url(self, key: str) -> str: ...


def not_advancing(operation: str, detail: str) -> S3Error:
    """A listing answered truncated whose next page would not start after this one:
    following it would call S3 for ever (a broken store or gateway), so it is an error."""
    return S3Error(
        UPSTREAM_ERROR,
        f"{operation} is truncated but does not advance ({detail})",
        operation=operation,
        reason="NotAdvancing",
    )


async def object_pages(
    bucket: ObjectStore, prefix: str, *, page_size: int = 1000
) -> AsyncIterator[list[ObjectInfo]]:
    """Every page of the objects under ``prefix``, in key order (the last one short).
    A full page with a key not after the last page's (a store that ignores StartAfter)
    raises NotAdvancing instead of being listed again and again."""
    after = ""
    while True:
        page = await bucket.list_objects(prefix, limit=page_size, start_after=after)
        if after and any(o.key <= after for o in page):
            raise not_advancing("ListObjectsV2", f"a page starts at or before {after!r}")
        yield page
        if len(page) < page_size:
            return
        after = page[-1].key


async def read_small(bucket: ObjectStore, key: str) -> tuple[bytes, str | None]:
    """A small object of the proxy's own (a tus state, its URL key) whole, and its ETag;
    NoSuchKey if there is none. Never an upload's bytes: those are streamed."""
    async with await bucket.get(key) as body:
        raw = bytearray()
        while chunk := await body.read(64 * 1024):
            raw += chunk
        return bytes(raw), body.head.etag
