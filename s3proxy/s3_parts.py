"""S3's write calls without botocore's per-call machinery: UploadPart (the call made for
every 8 MiB), PutObject (the one call of every small file), and the three calls of every
multipart upload (CreateMultipartUpload, CompleteMultipartUpload, PutObjectTagging).

A botocore call costs about 4.5 ms of CPU on the event loop whatever its size
(parameter validation, serialization, endpoint rules, a dozen events, the user-agent
string, response parsing): 128 UploadParts per GiB are ~0.4 CPU s/GiB, a tenth of
the proxy's whole cost per GiB. This sender makes the same request for ~1.5 ms:
its signature is ``S3SigV4Auth``'s byte for byte (``s3proxy.sigv4``, with the client's
credentials, config and ``UNSIGNED-PAYLOAD`` rule); botocore decides its retries
(``StandardRetryConditions`` and ``ExponentialBackoff``, the policy
``retries={"mode": "standard"}`` gives the client) and shapes its failures
(``ClientError`` for S3's error answers, botocore's connection and timeout exceptions
for the network), so ``s3_aiobotocore.translate`` and everything
above it see exactly what a botocore call raises. Only the request building and the
HTTP exchange are ours, on a pool of their own.

PutObject's (and CreateMultipartUpload's) headers are named by botocore's model
(``header_names``); a parameter this path does not know, or a non-ASCII header value, is
left to botocore (``object_headers`` returns None). The XML bodies are botocore's
serialisation (``complete_body``, ``tagging_body``), answers are read as botocore reads
them (``answer_status``: S3's 200 with an ``<Error>`` body is a 500; ``xml_fields``).
The object's URL is botocore's too: the bucket's (host, addressing) cut once from a
presigned URL, and the key encoded as botocore encodes a ``{Key+}`` label. Used only
where it is simple to be right: no HTTP proxy applies, credentials present; otherwise
``lean_sender`` returns None and botocore sends the call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import ssl
import urllib.request
import zlib
from base64 import b64encode
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import aiohttp
import yarl
from aiohttp.abc import AbstractStreamWriter
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
)
from botocore.httpsession import get_cert_path
from botocore.retries.standard import (
    ExponentialBackoff,
    RetryContext,
    StandardRetryConditions,
    ThrottledRetryableChecker,
)

from s3proxy import sigv4
from s3proxy.body import ChunkedBody, ChunkedBodyPayload
from s3proxy.s3 import Body

log = logging.getLogger("s3proxy.s3")

# Bytes of an answer read: S3's error code, or a 200's few fields (CompleteMultipart's
# result with the whitespace S3 sends while it works is well under 1 KiB).
ANSWER_BODY_LIMIT = 64 * 1024


S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"  # botocore's model: the payloads' xmlNamespace
# No Content-Type of aiohttp's own: botocore sends one only where a parameter names it.
NO_AUTO_HEADERS = ("Content-Type",)


@dataclass(frozen=True)
class Answer:
    """What botocore's retry checks read of an HTTP answer, and what the caller reads."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes = b""
    attempts: int = 1  # botocore's ResponseMetadata.RetryAttempts is this minus one
    # of those attempts, how many got no answer once their request may have reached S3
    # (``unanswered``): S3 may still carry them out later (``s3.Written.unanswered``)
    unanswered: int = 0

    def __getitem__(self, name: str) -> str:
        return self.headers[name]


# PutObject parameters sent as headers, by botocore's name (their header names are
# read from botocore's model, see ``header_names``).
PUT_HEADERS = (
    "ContentType",
    "ContentDisposition",
    "ACL",
    "StorageClass",
    "ServerSideEncryption",
    "SSEKMSKeyId",
    "IfNoneMatch",
    "IfMatch",
)
BUCKET_PROBE = "k"  # the key of the one presigned PutObject URL the bucket's URL is cut from


def header_names(operation: Any) -> dict[str, str]:
    """PutObject's parameter -> header name, from botocore's model (``Metadata``: prefix)."""
    members = operation.input_shape.members
    return {name: str(members[name].serialization["name"]) for name in (*PUT_HEADERS, "Metadata")}


def _plain(text: str) -> bool:
    return text.isascii() and text.isprintable()


def object_headers(
    names: Mapping[str, str], params: Mapping[str, Any], metadata: Mapping[str, str]
) -> dict[str, str] | None:
    """PutObject's headers as botocore would send them; None where botocore must send them.

    Pure. ``params`` are botocore parameters (None/"" values left out), ``metadata``
    the user metadata. A non-ASCII value is left to botocore, whose answer to it (a
    validation error) is the contract's."""
    headers = {names[k]: str(v) for k, v in params.items() if k in names and v}
    if len(headers) != sum(1 for v in params.values() if v):
        return None  # a parameter this path does not know
    prefix = names["Metadata"]
    for key, value in metadata.items():
        headers[prefix + key] = value
    if not all(_plain(k) and _plain(v) for k, v in headers.items()):
        return None
    return headers


def error_response(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """S3's error answer as botocore's parsed response (what ClientError carries).

    Pure. A body that is not S3's XML error (a load balancer's HTML page) gets the
    status as its code, as botocore's parser does."""
    code, message = str(status), ""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        root = None
    if root is not None:
        code = root.findtext("Code") or code
        message = root.findtext("Message") or ""
    return {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {
            "HTTPStatusCode": status,
            "HTTPHeaders": {k.lower(): v for k, v in headers.items()},
        },
    }


def part_url(base: str, upload_id: str, number: int) -> str:
    """The part's URL, its query encoded as SigV4's canonical query string wants it."""
    return f"{base}?partNumber={number}&{upload_query(upload_id)}"


def upload_query(upload_id: str) -> str:
    """``uploadId=...`` encoded as SigV4's canonical query string wants it."""
    return f"uploadId={quote(upload_id, safe='-_.~')}"


def _element(name: str, children: Sequence[str]) -> str:
    """One element as ElementTree (botocore's serializer) writes it, empty ones closed."""
    if not children:
        return f"<{name} />"
    return f"<{name}>{''.join(children)}</{name.split(' ', 1)[0]}>"


def complete_body(parts: Sequence[Mapping[str, object]]) -> bytes:
    """CompleteMultipartUpload's XML as botocore serialises ``MultipartUpload={"Parts":
    parts}``: each part's fields in the order given (PartNumber, ETag, ChecksumCRC64NVME).

    Pure. Text escaped as ElementTree escapes it (``&``, ``<``, ``>``), UTF-8."""
    listed = [
        _element("Part", [f"<{k}>{escape(str(v))}</{k}>" for k, v in part.items()])
        for part in parts
    ]
    return _element(f'CompleteMultipartUpload xmlns="{S3_XMLNS}"', listed).encode()


def tagging_body(tags: Mapping[str, str]) -> bytes:
    """PutObjectTagging's XML as botocore serialises ``Tagging={"TagSet": [...]}``. Pure."""
    listed = [
        f"<Tag><Key>{escape(k)}</Key><Value>{escape(v)}</Value></Tag>" for k, v in tags.items()
    ]
    return _element(f'Tagging xmlns="{S3_XMLNS}"', [_element("TagSet", listed)]).encode()


def tagging_headers(body: bytes) -> dict[str, str]:
    """The integrity headers botocore adds to PutObjectTagging (``requestChecksumRequired``):
    with ``request_checksum_calculation`` either way, a CRC32 of the body, not Content-MD5.

    Pure."""
    crc = zlib.crc32(body).to_bytes(4, "big")
    return {
        "x-amz-checksum-crc32": b64encode(crc).decode(),
        "x-amz-sdk-checksum-algorithm": "CRC32",
    }


def answer_status(status: int, content: bytes) -> int:
    """The status botocore gives an S3 answer: a 200 whose body is an ``<Error>``, or is
    not XML at all (cut off), is a 500 (``handlers._handle_200_error``: S3 may answer
    CompleteMultipartUpload 200 and fail later), so it is retried and raised as one.

    Pure."""
    if status != 200 or not content:
        return status
    try:
        root = ElementTree.fromstring(content)
    except ElementTree.ParseError:
        return 500
    return 500 if root.tag == "Error" else 200


def xml_fields(content: bytes) -> dict[str, str]:
    """The top-level elements of an S3 XML answer by their names without namespace (as
    botocore's parser names them): ``UploadId``, ``ETag``, ``ChecksumCRC64NVME``...

    Pure. An empty or non-XML body has none."""
    try:
        root = ElementTree.fromstring(content)
    except ElementTree.ParseError:
        return {}
    return {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in root}


async def read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to ``limit`` bytes or its end. One ``read(limit)`` returns only what is
    buffered: an error body in two TCP segments would lose S3's code (and its retry)."""
    data = bytearray()
    while len(data) < limit:
        chunk = await stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def malformed(name: str, answer: Answer) -> ClientError:
    """A 200 answer without what the call returns (an ETag, an UploadId): an error named
    by its status, not retried (botocore would not retry it either)."""
    return ClientError(error_response(answer.status_code, answer.headers, answer.content), name)


def _unsigned_payload(config: Any) -> bool:
    """Whether botocore signs this client's S3 calls with UNSIGNED-PAYLOAD (an explicit
    ``s3={"payload_signing_enabled": False}``, which rules over everything else)."""
    return (getattr(config, "s3", None) or {}).get("payload_signing_enabled") is False


class _Throttling:
    """botocore's throttling codes, for ExponentialBackoff's larger throttling scale."""

    _checker = ThrottledRetryableChecker()

    def is_throttling_error_from_context(self, context: RetryContext) -> bool:
        return bool(self._checker.is_retryable(context))


def unanswered(failure: BaseException) -> bool:
    """Did an attempt that failed so go unanswered after its request may have reached S3?
    A read timeout or a dropped connection: yes, S3 may have it (or get it later, held on
    the way). No connection made (a connect timeout, a refusal): no request left us.

    Pure."""
    return not isinstance(failure, ConnectTimeoutError | EndpointConnectionError)


def network_error(exc: BaseException, url: str) -> Exception:
    """An aiohttp/asyncio failure as the botocore exception botocore would raise."""
    kind: type[HTTPClientError] = ConnectionClosedError
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = ConnectTimeoutError
    elif isinstance(exc, TimeoutError):  # aiohttp's sock_read timeout included
        kind = ReadTimeoutError
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = EndpointConnectionError
    error: Exception = kind(endpoint_url=url, error=exc)
    return error


class PartSender:
    """Sends S3's write calls (see the module) for one aiobotocore S3 client."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
        max_connections: int,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._keys = sigv4.SigningKeys()
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._conditions = StandardRetryConditions(max_attempts=max_attempts)
        self._backoff = ExponentialBackoff(throttling_detector=_Throttling())
        model = client.meta.service_model
        self._operation = model.operation_model("UploadPart")
        self._put_operation = model.operation_model("PutObject")
        self._create_operation = model.operation_model("CreateMultipartUpload")
        self._complete_operation = model.operation_model("CompleteMultipartUpload")
        self._tag_operation = model.operation_model("PutObjectTagging")
        self._bucket_base: str | None = None
        self.put_names = header_names(self._put_operation)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # botocore's CA bundle for https (loading it costs ~10 ms: only when needed)
            https = self._client.meta.endpoint_url.startswith("https:")
            tls = ssl.create_default_context(cafile=get_cert_path(True)) if https else True
            connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=tls)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False
            )
        return self._session

    async def _signed(
        self, method: str, url: str, size: int, headers: Mapping[str, str]
    ) -> dict[str, str]:
        """The request's headers with its SigV4 signature (fresh credentials): signed by
        ``s3proxy.sigv4`` (botocore's bytes, a tenth of its CPU), or by botocore's
        ``S3SigV4Auth`` where that does not apply."""
        credentials = self._client._request_signer._credentials
        frozen = credentials.get_frozen_credentials()
        if inspect.isawaitable(frozen):
            frozen = await frozen
        headers = {**headers, "Content-Length": str(size)}
        meta = self._client.meta
        region = meta.region_name
        if isinstance(region, str) and _unsigned_payload(meta.config):
            signed = sigv4.sign(
                method,
                url,
                headers,
                access_key=frozen.access_key,
                secret_key=frozen.secret_key,
                token=frozen.token,
                region=region,
                now=datetime.now(UTC),
                keys=self._keys,
            )
            if signed is not None:
                return signed
        request = AWSRequest(method, url, headers=headers)
        request.context["client_config"] = meta.config  # payload signing rule
        S3SigV4Auth(frozen, "s3", region).add_auth(request)
        return dict(request.headers.items())

    async def send(
        self, key: str, upload_id: str, number: int, data: Body, headers: Mapping[str, str]
    ) -> str:
        """UploadPart: the part's ETag. Raises what a botocore call would raise."""
        url = part_url(await self._object_url(key), upload_id, number)
        answer = await self._exchange("UploadPart", self._operation, "PUT", url, data, headers)
        if "ETag" not in answer.headers:
            raise malformed("UploadPart", answer)
        return answer["ETag"]

    async def put_object(self, key: str, data: Body, headers: Mapping[str, str]) -> Answer:
        """PutObject with ``headers`` (see ``object_headers``): the answer's headers."""
        url = await self._object_url(key)
        answer = await self._exchange("PutObject", self._put_operation, "PUT", url, data, headers)
        if "ETag" not in answer.headers:
            raise malformed("PutObject", answer)
        return answer

    async def create(self, key: str, headers: Mapping[str, str]) -> tuple[str, int]:
        """CreateMultipartUpload with ``headers`` (``object_headers`` and the declared
        checksum's): (the upload id, how many times it was retried: an earlier attempt may
        have made an upload whose answer was lost, as botocore's RetryAttempts tells)."""
        name = "CreateMultipartUpload"
        url = await self._object_url(key) + "?uploads"
        answer = await self._exchange(name, self._create_operation, "POST", url, (), headers)
        upload_id = xml_fields(answer.content).get("UploadId")
        if not upload_id:
            raise malformed(name, answer)
        return upload_id, answer.attempts - 1

    async def complete(
        self, key: str, upload_id: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[dict[str, str], int]:
        """CompleteMultipartUpload with ``body`` (``complete_body``): the answer's fields
        (ETag, and the stored checksum where S3 reports it), and its ``Answer.unanswered``."""
        name = "CompleteMultipartUpload"
        url = f"{await self._object_url(key)}?{upload_query(upload_id)}"
        answer = await self._exchange(name, self._complete_operation, "POST", url, (body,), headers)
        fields = xml_fields(answer.content)
        if "ETag" not in fields:
            raise malformed(name, answer)
        return fields, answer.unanswered

    async def tag(self, key: str, body: bytes) -> int:
        """PutObjectTagging with ``body`` (``tagging_body``) and botocore's CRC32 of it; its
        attempts that went unanswered (``Answer.unanswered``)."""
        url = await self._object_url(key) + "?tagging"
        headers = tagging_headers(body)
        answer = await self._exchange(
            "PutObjectTagging", self._tag_operation, "PUT", url, (body,), headers
        )
        return answer.unanswered

    async def _object_url(self, key: str) -> str:
        """The key's URL without query: the bucket's (botocore's, found once) and the key
        encoded as botocore encodes a ``{Key+}`` label (a presigned URL per key would
        cost what this path saves)."""
        if self._bucket_base is None:
            params = {"Bucket": self._bucket, "Key": BUCKET_PROBE}
            url = await self._client.generate_presigned_url("put_object", Params=params)
            base = str(url).split("?", 1)[0]
            if not base.endswith("/" + BUCKET_PROBE):
                raise ValueError(f"unexpected PutObject URL shape: {base}")
            self._bucket_base = base[: -len(BUCKET_PROBE)]
        return self._bucket_base + quote(key, safe="/~")

    async def _exchange(
        self,
        name: str,
        operation: Any,
        method: str,
        url: str,
        data: Body,
        headers: Mapping[str, str],
    ) -> Answer:
        """One signed request with botocore's retries: the 200 answer (its small body read)."""
        body = ChunkedBody(data)  # its payload writes the chunks afresh on every attempt
        attempt = 0
        lost = 0  # attempts unanswered once sent: they may land later
        while True:
            attempt += 1
            signed = await self._signed(method, url, len(body), headers)
            answer: Answer | None = None
            parsed: dict[str, Any] | None = None
            failure: Exception
            try:
                async with asyncio.timeout(None) as deadline:
                    answer = await self._attempt(method, url, body, signed, deadline, attempt)
                if answer.status_code == 200:
                    return dataclasses.replace(answer, unanswered=lost)
                parsed = error_response(answer.status_code, answer.headers, answer.content)
                failure = ClientError(parsed, name)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failure = network_error(exc, url)
                lost += unanswered(failure)
            context = RetryContext(
                attempt,
                operation_model=operation,
                parsed_response=parsed,
                http_response=answer,
                caught_exception=None if parsed is not None else failure,
            )
            if not self._conditions.is_retryable(context):
                raise failure
            delay = self._backoff.delay_amount(context)
            log.debug("s3.retry operation=%s attempt=%d delay=%.2f", name, attempt, delay)
            await asyncio.sleep(delay)

    async def _attempt(
        self,
        method: str,
        url: str,
        body: ChunkedBody,
        headers: Mapping[str, str],
        deadline: asyncio.Timeout,
        attempt: int,
    ) -> Answer:
        """One request and its whole answer, the answer within ``read_timeout`` of the
        request's last byte (or of the answer's head, if S3 answers before): sending a big
        part is not cut, a trickling answer is (each read alone is within sock_read)."""
        loop = asyncio.get_running_loop()
        answering = True

        def arm() -> None:
            if answering and deadline.when() is None:
                deadline.reschedule(loop.time() + self._read_timeout)

        payload = _SentPayload(body, arm)
        try:
            async with self._http().request(
                method,
                yarl.URL(url, encoded=True),
                data=payload,
                headers=headers,
                skip_auto_headers=NO_AUTO_HEADERS,
            ) as resp:
                arm()
                # S3's answers to these calls are small, errors too: a longer one (a
                # gateway's page) is cut, a cut 200 is a 500 (answer_status), and its
                # connection is dropped rather than read on.
                content = await read_capped(resp.content, ANSWER_BODY_LIMIT)
                if not resp.content.at_eof():
                    resp.close()
                return Answer(answer_status(resp.status, content), resp.headers, content, attempt)
        finally:
            answering = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _SentPayload(ChunkedBodyPayload):
    """A part's payload that calls ``sent`` once its last byte is written (once per
    request: no work per chunk)."""

    def __init__(self, value: ChunkedBody, sent: Callable[[], None]) -> None:
        super().__init__(value)
        self._sent = sent

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        await super().write_with_length(writer, content_length)
        self._sent()


def lean_sender(
    client: Any,
    bucket: str,
    *,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
    max_connections: int,
) -> PartSender | None:
    """A sender for ``client``, or None where botocore must do it (see the module)."""
    endpoint = urlsplit(client.meta.endpoint_url or "")
    if not endpoint.scheme:
        return None
    if getattr(client.meta.config, "proxies", None):
        return None
    # botocore sends through HTTP(S)_PROXY unless NO_PROXY names the host: so must we not
    if urllib.request.getproxies().get(endpoint.scheme) and not urllib.request.proxy_bypass(
        endpoint.hostname or ""
    ):
        return None
    signer = getattr(client, "_request_signer", None)
    if getattr(signer, "_credentials", None) is None:
        return None
    return PartSender(
        client,
        bucket,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_attempts=max_attempts,
        max_connections=max_connections,
    )
