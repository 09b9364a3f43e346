"""UploadPart and PutObject without botocore's per-call machinery: the call made for
every 8 MiB, and the one call of every small file.

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

PutObject's headers are named by botocore's model (``header_names``); a parameter
this path does not know, or a non-ASCII header value, is left to botocore
(``object_headers`` returns None). The object's URL is botocore's too: the bucket's
(host, addressing) cut once from a presigned URL, and the key encoded as botocore
encodes a ``{Key+}`` label. Used only where it is simple to be right: no HTTP proxy
applies, credentials present; otherwise ``lean_sender`` returns None and botocore
sends the call.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

import aiohttp
import yarl
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
from s3proxy.body import ChunkedBody
from s3proxy.s3 import Body

log = logging.getLogger("s3proxy.s3")

ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error answer read to find S3's error code


@dataclass(frozen=True)
class Answer:
    """What botocore's retry checks read of an HTTP answer (and PutObject's caller)."""

    status_code: int
    headers: Mapping[str, str]

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
    return f"{base}?partNumber={number}&uploadId={quote(upload_id, safe='-_.~')}"


def _unsigned_payload(config: Any) -> bool:
    """Whether botocore signs this client's S3 calls with UNSIGNED-PAYLOAD (an explicit
    ``s3={"payload_signing_enabled": False}``, which rules over everything else)."""
    return (getattr(config, "s3", None) or {}).get("payload_signing_enabled") is False


class _Throttling:
    """botocore's throttling codes, for ExponentialBackoff's larger throttling scale."""

    _checker = ThrottledRetryableChecker()

    def is_throttling_error_from_context(self, context: RetryContext) -> bool:
        return bool(self._checker.is_retryable(context))


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
    """Sends UploadPart requests for one aiobotocore S3 client."""

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
        self._conditions = StandardRetryConditions(max_attempts=max_attempts)
        self._backoff = ExponentialBackoff(throttling_detector=_Throttling())
        self._operation = client.meta.service_model.operation_model("UploadPart")
        self._put_operation = client.meta.service_model.operation_model("PutObject")
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
        answer = await self._exchange("UploadPart", self._operation, url, data, headers)
        return answer["ETag"]

    async def put_object(self, key: str, data: Body, headers: Mapping[str, str]) -> Answer:
        """PutObject with ``headers`` (see ``object_headers``): the answer's headers."""
        url = await self._object_url(key)
        return await self._exchange("PutObject", self._put_operation, url, data, headers)

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
        self, name: str, operation: Any, url: str, data: Body, headers: Mapping[str, str]
    ) -> Answer:
        """One signed PUT with botocore's retries: the 200 answer (with an ETag)."""
        body = ChunkedBody(data)  # its payload writes the chunks afresh on every attempt
        attempt = 0
        while True:
            attempt += 1
            signed = await self._signed("PUT", url, len(body), headers)
            answer: Answer | None = None
            parsed: dict[str, Any] | None = None
            failure: Exception
            try:
                async with self._http().put(
                    yarl.URL(url, encoded=True), data=body, headers=signed
                ) as resp:
                    if resp.status == 200 and "ETag" in resp.headers:
                        await resp.read()
                        return Answer(resp.status, resp.headers)
                    said = await resp.content.read(ERROR_BODY_LIMIT)
                    answer = Answer(resp.status, resp.headers)
                    parsed = error_response(resp.status, resp.headers, said)
                    failure = ClientError(parsed, name)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failure = network_error(exc, url)
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

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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
