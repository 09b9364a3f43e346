"""``ObjectStore`` over aiobotocore: with ``s3_parts`` (the lean path of the write calls:
PutObject, UploadPart, CreateMultipartUpload, CompleteMultipartUpload and PutObjectTagging,
signed, retried and shaped by botocore), the only modules importing botocore.

Everything botocore raises is translated here (``translate``) into ``S3Error`` and
its subclasses (``s3proxy.s3``): client-visible upstream faults are 502 (S3 said
no), 503 (S3 unreachable or throttling) and 504 (S3 too slow). Transient failures
are retried inside botocore (standard retry mode: 5xx, throttling, connection
errors, with backoff); a part's bytes stay in our buffer until S3 acknowledges
them, so every retry can resend them. Every call goes through ``AioObjectStore.call``,
which times it, counts its error and translates what it raised.

Also here: the client factory (``open_client``: one pooled client per process) and
the presigning client, which is separate because SigV4 signs the Host header (a URL
for ``--presign-endpoint-url`` must be signed for that host) and botocore presigns
with SigV2 for custom endpoints unless told ``s3v4``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import email.utils
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from s3proxy.body import ChunkedBody
from s3proxy.checksums import Algorithm, CrcValue
from s3proxy.errors import UPSTREAM_ERROR, UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE, ProxyError
from s3proxy.janitor import CLEANUP_TIMEOUT, Deadline, Kind, ShutdownDeadline, abandon, finish
from s3proxy.metrics import Metrics
from s3proxy.s3 import (
    PAGE_SIZE,
    Body,
    Conditions,
    NoCredentials,
    NoSuchKey,
    NoSuchUpload,
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
    not_advancing,
    refusal,
    stored_checksum,
    whole_object,
)
from s3proxy.s3_parts import (
    PartSender,
    complete_body,
    lean_sender,
    object_headers,
    tagging_body,
)

log = logging.getLogger("s3proxy.s3")

# ObjectOptions' PutObject parameters as the HTTP headers a presigned PUT signs.
_HEADERS = {
    "ContentType": "Content-Type",
    "ContentDisposition": "Content-Disposition",
    "ACL": "x-amz-acl",
    "StorageClass": "x-amz-storage-class",
    "ServerSideEncryption": "x-amz-server-side-encryption",
    "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id",
    "IfNoneMatch": "If-None-Match",
    "ChecksumSHA256": "x-amz-checksum-sha256",
}
# The checksum parameters of CreateMultipartUpload and CompleteMultipartUpload as the
# headers botocore's model sends them as (the lean path's; the part's value is its own).
_DECLARED = {
    "ChecksumAlgorithm": "x-amz-checksum-algorithm",
    "ChecksumType": "x-amz-checksum-type",
    **{a.param: a.header for a in Algorithm},
}
# A POST form names the ACL "acl"; the other fields are named like the headers.
# (no IfNoneMatch or checksum: a POST policy holds neither)
_POST_FIELDS = {**_HEADERS, "ACL": "acl"}
# S3's answers to a conditional or ranged read: outcomes for the client, not S3 faults,
# so they are not counted as S3 errors.
_READ_OUTCOMES = frozenset({304, 404, 412, 416})
# What the attempts of the running store check met (``check``), as botocore's retry
# handler saw them (``_note_check_retry``): None outside a check.
_CHECK_MET: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar(
    "check_met", default=None
)


def _note_check_retry(caught_exception: BaseException | None = None, **_: Any) -> None:
    """botocore's ``needs-retry`` event for HeadBucket: keep what the attempt met."""
    met = _CHECK_MET.get()
    if met is not None and caught_exception is not None:
        met.append(caught_exception)


# --- translation ------------------------------------------------------------------


def _refusal(operation: str, exc: ClientError) -> S3Error:
    """S3's error answer as its typed error."""
    response: Any = exc.response
    err = response.get("Error", {})
    meta = response.get("ResponseMetadata", {})
    headers = meta.get("HTTPHeaders", {})
    size = err.get("ActualObjectSize")
    return refusal(
        operation,
        str(err.get("Code", "Unknown")),
        int(meta.get("HTTPStatusCode") or 0),
        etag=headers.get("etag"),
        last_modified=_http_date(headers.get("last-modified")),
        size=int(size) if str(size).isdigit() else None,
    )


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@contextlib.contextmanager
def translate(operation: str) -> Iterator[None]:
    """Turn whatever botocore or the network raised into an S3Error.

    The block is the call and the reading of its answer: a field the answer lacks or
    holds garbled (KeyError, ValueError, TypeError from botocore's parsed dict) is S3's
    fault, a 502 ``MalformedAnswer``, never a 500 of ours."""
    try:
        yield
    except ProxyError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("s3.malformed_answer operation=%s error=%r", operation, exc)
        raise S3Error(
            UPSTREAM_ERROR,
            f"S3 {operation} answered without a usable {exc}",
            operation=operation,
            reason="MalformedAnswer",
        ) from exc
    except ClientError as exc:
        raise _refusal(operation, exc) from exc
    except ConnectTimeoutError as exc:
        # No connection within --s3-connect-timeout: S3 is unreachable (503), as when it
        # refuses connections; 504 is for an S3 that took the call and did not answer.
        raise S3Error(
            UPSTREAM_UNAVAILABLE,
            f"S3 {operation}: cannot reach S3 (no connection within the connect timeout)",
            operation=operation,
            reason=type(exc).__name__,
        ) from exc
    except (TimeoutError, ReadTimeoutError) as exc:
        raise S3Error(
            UPSTREAM_TIMEOUT,
            f"S3 {operation} timed out",
            operation=operation,
            reason=type(exc).__name__,
        ) from exc
    except (
        BotoConnectionError,
        ConnectionClosedError,
        aiohttp.ClientError,
        ConnectionError,
    ) as exc:
        raise S3Error(
            UPSTREAM_UNAVAILABLE,
            f"S3 {operation}: cannot reach S3 ({type(exc).__name__})",
            operation=operation,
            reason=type(exc).__name__,
        ) from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise NoCredentials(
            UPSTREAM_ERROR,
            "no usable S3 credentials are configured",
            operation=operation,
            reason=type(exc).__name__,
        ) from exc
    except BotoCoreError as exc:
        raise S3Error(
            UPSTREAM_ERROR,
            f"S3 {operation} failed: {type(exc).__name__}",
            operation=operation,
            reason=type(exc).__name__,
        ) from exc


def _params(options: ObjectOptions, *, metadata: bool = True) -> dict[str, Any]:
    """ObjectOptions as PutObject/CreateMultipartUpload parameters."""
    params: dict[str, Any] = {"ContentType": options.content_type}
    if metadata:
        params["Metadata"] = dict(options.metadata)
    optional = {
        "ContentDisposition": options.content_disposition,
        "ACL": options.acl,
        "StorageClass": options.storage_class,
        "ServerSideEncryption": options.sse,
        "SSEKMSKeyId": options.sse_kms_key_id,
    }
    params.update({k: v for k, v in optional.items() if v})
    return params


def _only_new(if_none_match: bool) -> dict[str, str]:
    """``If-None-Match: *``: write only if the key is free (the one value S3 accepts)."""
    return {"IfNoneMatch": "*"} if if_none_match else {}


def _checksum_params(value: CrcValue | None) -> dict[str, str]:
    """``ChecksumCRC64NVME=<b64>``: botocore sends it as x-amz-checksum-crc64nvme and, a
    value being given, computes none of its own (no second pass over the bytes)."""
    return {} if value is None else {value.algorithm.param: value.b64()}


def _stored_checksum(
    operation: str, resp: Mapping[str, Any], sent: CrcValue | None
) -> StoredChecksum | None:
    """``s3.stored_checksum`` of a PutObject/Complete answer's fields."""
    reported = None if sent is None else resp.get(sent.algorithm.param)
    kind = resp.get("ChecksumType")
    return stored_checksum(operation, sent, None if reported is None else str(reported), kind)


def _retried(resp: Mapping[str, Any]) -> int:
    """Attempts botocore retried before its answer (``RetryAttempts``). It does not say
    why, so each counts as unanswered (``Written.unanswered``): at worst a removal is made
    again for nothing (the lean path, which sends these calls unless it cannot, knows)."""
    return int(resp.get("ResponseMetadata", {}).get("RetryAttempts", 0))


def _put_answer(headers: Mapping[str, str], sent: CrcValue | None) -> dict[str, Any]:
    """A lean PutObject's answer headers as the fields botocore's parsed answer has."""
    resp: dict[str, Any] = {"ETag": headers["ETag"]}
    if sent is not None:
        resp[sent.algorithm.param] = headers.get(sent.algorithm.header)
        resp["ChecksumType"] = headers.get("x-amz-checksum-type")
    return resp


@contextlib.contextmanager
def _carrying(checksum: object) -> Iterator[None]:
    """A refusal of a call that carried a checksum may be the store refusing checksums."""
    try:
        yield
    except S3Error as exc:
        if checksum is None:
            raise
        refused = checksum_refusal(exc)
        if refused is exc:
            raise
        raise refused from exc


def _read_params(key: str, byte_range: str | None, cond: Conditions | None) -> dict[str, Any]:
    params: dict[str, Any] = {"Key": key}
    if byte_range is not None:
        params["Range"] = byte_range
    if cond is not None:
        given = {
            "IfMatch": cond.if_match,
            "IfNoneMatch": cond.if_none_match,
            "IfModifiedSince": cond.if_modified_since,
            "IfUnmodifiedSince": cond.if_unmodified_since,
        }
        params.update({k: v for k, v in given.items() if v is not None})
    return params


def _head(resp: Mapping[str, Any]) -> ObjectHead:
    return ObjectHead(
        length=int(resp.get("ContentLength", 0)),
        etag=resp.get("ETag"),
        last_modified=resp.get("LastModified"),
        content_type=resp.get("ContentType"),
        content_disposition=resp.get("ContentDisposition"),
        content_encoding=resp.get("ContentEncoding"),
        content_language=resp.get("ContentLanguage"),
        content_range=resp.get("ContentRange"),
        metadata=dict(resp.get("Metadata", {})),
    )


def _next_markers(page: Mapping[str, Any], uploads: list[dict[str, Any]]) -> dict[str, str]:
    """Where the next ListMultipartUploads page starts: exactly the Next* markers sent.

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


# --- the store --------------------------------------------------------------------


@dataclass(frozen=True)
class ClientOptions:
    """How to reach S3 (built from Settings by ``s3proxy.config``)."""

    endpoint_url: str | None
    region: str
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    max_attempts: int = 5
    max_connections: int = 64
    sign_payload: bool = False
    request_checksum: str = "when_required"
    access_key: str | None = None
    secret_key: str | None = None
    lean_parts: bool = True  # UploadPart through s3_parts.PartSender where it can
    lean_put: bool = True  # PutObject too (where the parts are lean)

    @property
    def parts_can_be_lean(self) -> bool:
        """A lean UploadPart sends no payload hash and no checksum botocore would add."""
        return (
            self.lean_parts and not self.sign_payload and self.request_checksum == "when_required"
        )


class AioObjectStore:
    """``ObjectStore`` over one shared aiobotocore S3 client (see ``s3proxy.s3``)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        metrics: Metrics | None = None,
        *,
        options: ClientOptions | None = None,
        presign_endpoint: str | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self._client = client
        client.meta.events.register("needs-retry.s3.HeadBucket", _note_check_retry)
        self._deadline = deadline or Deadline()  # the shutdown's, for the cleanup done here
        self.bucket = bucket
        self._metrics = metrics or Metrics()
        self._options = options
        self._presign_endpoint = presign_endpoint
        self._signer: Any = None
        self._parts: PartSender | None = None  # UploadPart's lean path, made on first use
        self._parts_decided = False
        self._signer_lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

    @property
    def endpoint_url(self) -> str | None:
        url: str | None = self._client.meta.endpoint_url
        return url

    @contextlib.asynccontextmanager
    async def call(self, operation: str) -> AsyncIterator[None]:
        """Wrap every S3 call: time it, count its error by S3's code, translate what it raised."""
        async with self._metrics.s3_call(operation):
            with translate(operation):
                yield

    # -- writes ---------------------------------------------------------------------

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
        swap = {} if if_match is None else {"IfMatch": if_match}
        params = {**_params(options, metadata=False), **_only_new(if_none_match), **swap}
        sender, headers = self._lean_headers(params, options)
        with _carrying(checksum):
            async with self.call("PutObject"):
                if sender is not None and headers is not None:
                    if checksum is not None:
                        headers[checksum.algorithm.header] = checksum.b64()
                    answer = await sender.put_object(key, data, headers)
                    resp = _put_answer(answer.headers, checksum)
                    stored = _stored_checksum("PutObject", resp, checksum)
                    return Written(str(resp["ETag"]), stored, answer.unanswered)
                resp = await self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=ChunkedBody(data),
                    **_params(options),
                    **_checksum_params(checksum),
                    **_only_new(if_none_match),
                    **swap,
                )
                stored = _stored_checksum("PutObject", resp, checksum)
                return Written(str(resp["ETag"]), stored, _retried(resp))

    async def create(
        self,
        key: str,
        options: ObjectOptions,
        *,
        checksum: Algorithm | None = None,
        shared: bool = False,
    ) -> str:
        """CreateMultipartUpload; an upload an unanswered attempt may have made is aborted
        (``_abort_lost``), unless the key is ``shared``: other requests' uploads of it,
        under way, cannot be told from such a one (ListMultipartUploads shows no owner of
        ours), so it is left to the orphan sweep, which aborts an upload once idle."""
        declared = {}
        if checksum is not None:
            # FULL_OBJECT: a CRC of the whole object, checked at Complete (S3 user guide,
            # "Checking object integrity"); only CRCs have it, and need no second pass.
            declared = {"ChecksumAlgorithm": checksum.value, "ChecksumType": "FULL_OBJECT"}
        sender, headers = self._lean_headers(_params(options, metadata=False), options)
        try:
            with _carrying(checksum):
                async with self.call("CreateMultipartUpload"):
                    if sender is not None and headers is not None:
                        headers.update({_DECLARED[k]: v for k, v in declared.items()})
                        upload_id, retried = await sender.create(key, headers)
                    else:
                        resp = await self._client.create_multipart_upload(
                            Bucket=self.bucket, Key=key, **_params(options), **declared
                        )
                        upload_id = str(resp["UploadId"])
                        retried = _retried(resp)
        except BaseException:
            # S3 may have made the upload and only its answer was lost: abort it, since
            # no one else will ever learn its id. To the end even if we are cancelled.
            await finish(self._abort_lost(key, keep=None, shared=shared))
            raise
        if retried:
            # the call was retried: an earlier attempt may have made an upload whose answer
            # was lost (a read timeout), which would stay open unseen.
            await finish(self._abort_lost(key, keep=upload_id, shared=shared))
        return upload_id

    async def _abort_lost(self, key: str, keep: str | None, shared: bool) -> None:
        """Best effort: abort the key's uploads but ``keep``; a failure is logged, not raised.
        On a shared key, none: they may be other requests' (``create``)."""
        if shared:
            log.info("upload.lost_create_left key=%s reason=shared_key action=orphan_sweep", key)
            return
        try:
            async with self._deadline.bound(CLEANUP_TIMEOUT):
                aborted = await self.abort_uploads(key, keep=keep)
        except ShutdownDeadline as exc:
            abandon(f"abort key={key} upload_id=unknown", Kind.UPLOAD, exc)
            return
        except Exception as exc:
            log.warning("upload.lost_create_unchecked key=%s error=%r", key, exc)
            return
        for upload in aborted:
            log.info("upload.aborted key=%s upload_id=%s reason=lost_create", key, upload.upload_id)

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: Body, *, checksum: CrcValue | None = None
    ) -> str:
        sender = self._part_sender()
        with _carrying(checksum):
            async with self.call("UploadPart"):
                if sender is not None:
                    headers = (
                        {} if checksum is None else {checksum.algorithm.header: checksum.b64()}
                    )
                    return await sender.send(key, upload_id, number, data, headers)
                resp = await self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=ChunkedBody(data),
                    **_checksum_params(checksum),
                )
                return str(resp["ETag"])

    def _lean_writer(self) -> PartSender | None:
        """The lean sender for the object-level calls (PutObject, Create, Complete,
        PutObjectTagging), where ``lean_put`` allows it; None: botocore sends them."""
        if self._options is None or not self._options.lean_put:
            return None
        return self._part_sender()

    def _lean_headers(
        self, params: Mapping[str, Any], options: ObjectOptions
    ) -> tuple[PartSender | None, dict[str, str] | None]:
        """The lean sender and an object's headers for it (PutObject, CreateMultipartUpload);
        no headers where botocore must send the call (``object_headers``)."""
        sender = self._lean_writer()
        if sender is None:
            return None, None
        return sender, object_headers(sender.put_names, params, options.metadata)

    def _part_sender(self) -> PartSender | None:
        if not self._parts_decided:
            self._parts_decided = True
            opts = self._options or ClientOptions(endpoint_url=None, region="")
            if opts.parts_can_be_lean:
                self._parts = lean_sender(
                    self._client,
                    self.bucket,
                    connect_timeout=opts.connect_timeout,
                    read_timeout=opts.read_timeout,
                    max_attempts=opts.max_attempts,
                    max_connections=opts.max_connections,
                )
        return self._parts

    async def complete(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        *,
        checksums: Sequence[CrcValue] = (),
        if_none_match: bool = False,
    ) -> Written:
        listed: list[dict[str, Any]] = [{"PartNumber": n, "ETag": e} for n, e in parts]
        whole = whole_object(checksums)
        declared: dict[str, Any] = {}
        if whole is not None:
            if len(checksums) != len(parts):
                raise ValueError("complete() needs one checksum per part")
            for entry, value in zip(listed, checksums, strict=True):
                entry.update(_checksum_params(value))
            declared = {"ChecksumType": "FULL_OBJECT", **_checksum_params(whole)}
        sender = self._lean_writer()
        with _carrying(whole):
            async with self.call("CompleteMultipartUpload"):
                if sender is not None:
                    headers = {_DECLARED[k]: v for k, v in declared.items()}
                    headers.update({_HEADERS[k]: v for k, v in _only_new(if_none_match).items()})
                    body = complete_body(listed)
                    fields, lost = await sender.complete(key, upload_id, body, headers)
                    return Written(
                        fields["ETag"],
                        _stored_checksum("CompleteMultipartUpload", fields, whole),
                        lost,
                    )
                resp = await self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": listed},
                    **declared,
                    **_only_new(if_none_match),
                )
                return Written(
                    str(resp["ETag"]),
                    _stored_checksum("CompleteMultipartUpload", resp, whole),
                    _retried(resp),
                )

    async def abort(self, key: str, upload_id: str) -> None:
        try:
            async with self.call("AbortMultipartUpload"):
                await self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
        except NoSuchUpload:
            pass  # already gone: what an abort wants

    async def abort_uploads(self, key: str, *, keep: str | None = None) -> list[UploadInfo]:
        """Abort every open upload of exactly ``key`` (but ``keep``); return those aborted."""
        found = [u async for u in self.list_uploads(key) if u.key == key and u.upload_id != keep]
        for upload in found:
            await self.abort(key, upload.upload_id)
        return found

    async def tag(self, key: str, tags: Mapping[str, str]) -> int:
        """PutObjectTagging; the attempts that went unanswered (they may land later)."""
        sender = self._lean_writer()
        async with self.call("PutObjectTagging"):
            if sender is not None:
                return await sender.tag(key, tagging_body(tags))
            resp = await self._client.put_object_tagging(
                Bucket=self.bucket,
                Key=key,
                Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]},
            )
            return _retried(resp)

    async def tags(self, key: str) -> dict[str, str]:
        """The object's tags (GetObjectTagging): rare (``tag_check``), so botocore's path."""
        async with self.call("GetObjectTagging"):
            resp = await self._client.get_object_tagging(Bucket=self.bucket, Key=key)
        return {str(t["Key"]): str(t["Value"]) for t in resp.get("TagSet", [])}

    async def untag(self, key: str) -> int:
        """Remove the object's tags (DeleteObjectTagging); its retried attempts, as ``tag``."""
        async with self.call("DeleteObjectTagging"):
            resp = await self._client.delete_object_tagging(Bucket=self.bucket, Key=key)
        return _retried(resp)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        condition = {} if if_match is None else {"IfMatch": if_match}
        try:
            async with self.call("DeleteObject"):
                await self._client.delete_object(Bucket=self.bucket, Key=key, **condition)
        except NoSuchKey:
            pass  # a conditional delete of a missing key: gone, what a delete wants

    # -- reads ----------------------------------------------------------------------

    async def credential_secret(self) -> str | None:
        """The secret key requests are signed with (botocore's resolved credentials)."""
        # aiobotocore keeps them on the signer; resolved lazily (env, profile, role).
        creds = self._client._request_signer._credentials
        if creds is None:
            return None
        frozen = await creds.get_frozen_credentials()
        secret: str | None = frozen.secret_key
        return secret

    async def check(self, within: float | None = None) -> None:
        """HeadBucket, answered within ``within`` seconds (TimeoutError past it). Cut
        there while botocore was retrying it, the check fails with what its attempts
        met, not as a slow store: a store that refused every connection was told
        UPSTREAM_TIMEOUT "did not answer its check within 1s", the retries' backoff
        having outlasted the readiness timeout (reprobe21c)."""
        met: list[BaseException] = []
        token = _CHECK_MET.set(met)
        try:
            async with asyncio.timeout(within), self.call("HeadBucket"):
                await self._client.head_bucket(Bucket=self.bucket)
        except TimeoutError:
            if not met:
                raise
            async with self.call("HeadBucket"):  # told as the attempt's own failure
                raise met[-1] from None
        finally:
            _CHECK_MET.reset(token)

    async def list_parts(
        self, key: str, upload_id: str, *, max_parts: int | None = None
    ) -> list[PartInfo]:
        found: list[PartInfo] = []
        params: dict[str, Any] = {}
        while True:
            if max_parts is not None:
                params["MaxParts"] = min(max_parts - len(found), PAGE_SIZE)
            async with self.call("ListParts"):
                page = await self._client.list_parts(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, **params
                )
                found += [
                    PartInfo(
                        int(p["PartNumber"]), str(p["ETag"]), int(p["Size"]), p.get("LastModified")
                    )
                    for p in page.get("Parts", [])
                ]
                if not page.get("IsTruncated") or (
                    max_parts is not None and len(found) >= max_parts
                ):
                    return found[:max_parts]
                marker = int(page["NextPartNumberMarker"])
                if marker <= params.get("PartNumberMarker", 0):
                    raise not_advancing("ListParts", f"NextPartNumberMarker {marker}")
                params["PartNumberMarker"] = marker

    async def list_objects(
        self, prefix: str = "", *, limit: int = 1000, start_after: str = ""
    ) -> list[ObjectInfo]:
        """The first ``limit`` objects under ``prefix`` after ``start_after`` (one page)."""
        after = {"StartAfter": start_after} if start_after else {}
        async with self.call("ListObjectsV2"):
            page = await self._client.list_objects_v2(
                Bucket=self.bucket, Prefix=prefix, MaxKeys=limit, **after
            )
            return [ObjectInfo(o["Key"], int(o.get("Size", 0))) for o in page.get("Contents", [])]

    async def list_uploads(
        self, prefix: str, *, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[UploadInfo]:
        markers: dict[str, str] = {}
        seen: set[tuple[str, str]] = set()
        while True:
            async with self.call("ListMultipartUploads"):
                page = await self._client.list_multipart_uploads(
                    Bucket=self.bucket, Prefix=prefix, MaxUploads=page_size, **markers
                )
                uploads = page.get("Uploads", [])
                listed = [UploadInfo(u["Key"], u["UploadId"], u["Initiated"]) for u in uploads]
                following = _next_markers(page, uploads) if page.get("IsTruncated") else None
            for up in listed:
                # Filter again: a store that ignores Prefix must not get us to
                # touch uploads that belong to someone else.
                if up.key.startswith(prefix) and (up.key, up.upload_id) not in seen:
                    seen.add((up.key, up.upload_id))
                    yield up
            if following is None:
                return
            if not following or following == markers:
                raise not_advancing("ListMultipartUploads", f"markers {following}")
            markers = following

    async def _read(
        self, operation: str, method: Any, params: dict[str, Any]
    ) -> tuple[Any, ObjectHead]:
        """GetObject/HeadObject: the answer and its head; 304, 404, 412 and 416 raise their
        types uncounted."""
        outcome: ClientError | None = None
        async with self.call(operation):
            try:
                resp = await method(Bucket=self.bucket, **params)
                return resp, _head(resp)
            except ClientError as exc:
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                if status not in _READ_OUTCOMES:
                    raise
                outcome = exc
        assert outcome is not None
        raise _refusal(operation, outcome) from outcome

    async def head(
        self, key: str, *, byte_range: str | None = None, conditions: Conditions | None = None
    ) -> ObjectHead:
        params = _read_params(key, byte_range, conditions)
        return (await self._read("HeadObject", self._client.head_object, params))[1]

    async def get(
        self, key: str, *, byte_range: str | None = None, conditions: Conditions | None = None
    ) -> ObjectBody:
        params = _read_params(key, byte_range, conditions)
        resp, head = await self._read("GetObject", self._client.get_object, params)
        body = resp["Body"]

        async def read(n: int) -> bytes:
            with translate("GetObject"):
                data: bytes = await body.read(n)
            return data

        return ObjectBody(head, read, body.close)

    # -- signing --------------------------------------------------------------------

    async def _sign(self, method: str, params: dict[str, Any], expires_in: int) -> str:
        signer = await self._signing_client()
        with translate("presign"):
            url: str = await signer.generate_presigned_url(
                method, Params={"Bucket": self.bucket, **params}, ExpiresIn=expires_in
            )
        return url

    async def presign_get(
        self, key: str, expires_in: int, *, head: bool = False, disposition: str | None = None
    ) -> str:
        # identity: a stored Content-Encoding (which a presigned PUT cannot bind) is not
        # passed on, so no browser inflates a few KB of gzip into gigabytes.
        params: dict[str, Any] = {"Key": key, "ResponseContentEncoding": "identity"}
        if disposition is not None:
            params["ResponseContentDisposition"] = disposition
        return await self._sign("head_object" if head else "get_object", params, expires_in)

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
        # Metadata is not signed; If-None-Match and the checksum are (X-Amz-SignedHeaders),
        # so the client must send them, and S3 refuses other bytes (400 BadDigest).
        params = {**_params(options, metadata=False), **_only_new(if_none_match)}
        if sha256 is not None:
            params["ChecksumSHA256"] = base64.b64encode(sha256).decode()
        url = await self._sign(
            "put_object", {"Key": key, "ContentLength": size, **params}, expires_in
        )
        return SignedRequest(url, {_HEADERS[k]: v for k, v in params.items()})

    async def presign_post(
        self, key: str, size: int, options: ObjectOptions, expires_in: int
    ) -> SignedPost:
        fields = {_POST_FIELDS[k]: v for k, v in _params(options, metadata=False).items()}
        conditions: list[Any] = [{name: value} for name, value in fields.items()]
        # Exactly the declared size, as a PUT signs Content-Length.
        conditions.append(["content-length-range", size, size])
        signer = await self._signing_client()
        with translate("presign"):
            post = await signer.generate_presigned_post(
                self.bucket, key, Fields=fields, Conditions=conditions, ExpiresIn=expires_in
            )
        return SignedPost(str(post["url"]), dict(post["fields"]))

    async def presign_part(self, key: str, upload_id: str, number: int, expires_in: int) -> str:
        params = {"Key": key, "UploadId": upload_id, "PartNumber": number}
        return await self._sign("upload_part", params, expires_in)

    async def object_url(self, key: str) -> str:
        return (await self.presign_get(key, 1)).split("?", 1)[0]

    async def _signing_client(self) -> Any:
        """Opened on first use, for the endpoint browsers reach, with the proxy's keys."""
        if self._signer is None:
            async with self._signer_lock:
                if self._signer is None:
                    endpoint = self._presign_endpoint or self.endpoint_url
                    opts = self._options or ClientOptions(
                        endpoint_url=endpoint, region=self._client.meta.region_name
                    )
                    opts = dataclasses.replace(opts, endpoint_url=endpoint)
                    config = client_config(opts).merge(AioConfig(signature_version="s3v4"))
                    with translate("presign"):
                        self._signer = await self._stack.enter_async_context(
                            _create_client(opts, config)
                        )
        return self._signer

    async def close(self) -> None:
        """Close the signing client, if one was opened (the main client is the caller's)."""
        await self._stack.aclose()
        self._signer = None
        if self._parts is not None:
            await self._parts.close()
            self._parts, self._parts_decided = None, False


# --- the client factory -----------------------------------------------------------


class AnswerDeadlineSession(AIOHTTPSession):  # type: ignore[misc]  # untyped base
    """aiobotocore's HTTP session, with the whole of an answer botocore reads at once (all
    but GetObject's body) read within the read timeout of its head. The socket read
    timeout alone never ends an answer that trickles (a byte per read, every read in
    time); the request's body is sent before the deadline starts, so a big part is not cut."""

    async def send(self, request: Any) -> Any:
        if request.stream_output:
            return await super().send(request)
        request.stream_output = True  # super() returns at the answer's head
        try:
            response = await super().send(request)
        finally:
            request.stream_output = False
        try:
            async with asyncio.timeout(self._timeout.sock_read):
                await response.content
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            response.raw.close()
            raise ReadTimeoutError(endpoint_url=request.url, error=exc) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            response.raw.close()
            raise ConnectionClosedError(endpoint_url=request.url, error=exc) from exc
        return response


def client_config(opts: ClientOptions) -> AioConfig:
    """botocore config: our timeouts and retries, and no byte passes we do not need.

    ``payload_signing_enabled=False`` sends UNSIGNED-PAYLOAD instead of a sha256
    of every part (botocore honours it over plain HTTP too), and
    ``when_required`` checksums skip the CRC32 botocore >= 1.36 adds by default,
    which some S3-compatible stores also reject.
    """
    return AioConfig(
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        # total_max_attempts counts the first try; botocore's max_attempts counts only
        # retries (max_attempts=1 is two attempts), which is not what --s3-max-attempts says.
        retries={"mode": "standard", "total_max_attempts": opts.max_attempts},
        max_pool_connections=opts.max_connections,
        s3={"payload_signing_enabled": opts.sign_payload, "addressing_style": _addressing(opts)},
        request_checksum_calculation=opts.request_checksum,
        response_checksum_validation="when_required",
        http_session_cls=AnswerDeadlineSession,
    )


def _addressing(opts: ClientOptions) -> str:
    """Path-style for S3-compatible stores (no bucket DNS names); AWS decides for itself."""
    if opts.endpoint_url is None or "amazonaws.com" in opts.endpoint_url:
        return "auto"
    return "path"


def _create_client(opts: ClientOptions, config: AioConfig) -> Any:
    kwargs: dict[str, Any] = {}
    if opts.access_key and opts.secret_key:
        kwargs = {"aws_access_key_id": opts.access_key, "aws_secret_access_key": opts.secret_key}
    return get_session().create_client(
        "s3", endpoint_url=opts.endpoint_url, region_name=opts.region, config=config, **kwargs
    )


@contextlib.asynccontextmanager
async def open_client(opts: ClientOptions) -> AsyncIterator[Any]:
    """One aiobotocore S3 client for the whole process (it pools connections)."""
    async with _create_client(opts, client_config(opts)) as client:
        yield client


@contextlib.asynccontextmanager
async def open_store(
    opts: ClientOptions,
    bucket: str,
    metrics: Metrics | None = None,
    *,
    presign_endpoint: str | None = None,
    deadline: Deadline | None = None,
) -> AsyncIterator[AioObjectStore]:
    """The store for ``bucket`` over a client of its own, closed (signer too) at exit;
    ``deadline``: the shutdown's, which the cleanup it does itself keeps to."""
    async with open_client(opts) as client:
        store = AioObjectStore(
            client,
            bucket,
            metrics,
            options=opts,
            presign_endpoint=presign_endpoint,
            deadline=deadline,
        )
        try:
            yield store
        finally:
            await store.close()
