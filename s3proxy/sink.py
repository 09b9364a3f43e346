"""The S3-writer interface the pipeline talks to, and its aiobotocore implementation.

The pipeline never imports botocore: it sees ``ObjectSink`` and ``ProxyError``.
``S3Sink`` is the only place where S3 errors are translated: client-visible
upstream faults are 502 (S3 said no), 503 (S3 unreachable or throttling) and
504 (S3 too slow). Transient failures are retried inside botocore (standard retry
mode: 5xx, throttling, connection errors, with backoff); the part's bytes stay in
our buffer until S3 acknowledges them, so every retry can resend them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiobotocore.config import AioConfig
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

from s3proxy.body import Chunk, ChunkedBody
from s3proxy.errors import (
    UPSTREAM_ERROR,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    ProxyError,
)
from s3proxy.metrics import Metrics
from s3proxy.settings import Settings

log = logging.getLogger("s3proxy.sink")

Body = Sequence[Chunk]  # a part as the chunks it arrived in

_THROTTLING = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
}


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

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"ContentType": self.content_type, "Metadata": dict(self.metadata)}
        optional = {
            "ContentDisposition": self.content_disposition,
            "ACL": self.acl,
            "StorageClass": self.storage_class,
            "ServerSideEncryption": self.sse,
            "SSEKMSKeyId": self.sse_kms_key_id,
        }
        params.update({k: v for k, v in optional.items() if v})
        return params


class ObjectSink(Protocol):
    """The S3 calls the upload pipeline needs, and nothing else."""

    async def put(self, key: str, data: Body, options: ObjectOptions) -> str: ...
    async def create(self, key: str, options: ObjectOptions) -> str: ...
    async def upload_part(self, key: str, upload_id: str, number: int, data: Body) -> str: ...
    async def complete(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> str: ...
    async def abort(self, key: str, upload_id: str) -> None: ...
    async def tag(self, key: str, tags: Mapping[str, str]) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def check(self) -> None: ...


@contextlib.contextmanager
def translate(operation: str) -> Any:
    """Turn whatever botocore or the network raised into a ProxyError for the client."""
    try:
        yield
    except ProxyError:
        raise
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _THROTTLING or status == 503:
            raise ProxyError(
                UPSTREAM_UNAVAILABLE, f"S3 {operation} throttled or unavailable: {code}"
            ) from exc
        raise ProxyError(UPSTREAM_ERROR, f"S3 {operation} failed: {code}") from exc
    except (TimeoutError, ReadTimeoutError, ConnectTimeoutError) as exc:
        raise ProxyError(UPSTREAM_TIMEOUT, f"S3 {operation} timed out") from exc
    except (
        BotoConnectionError,
        ConnectionClosedError,
        aiohttp.ClientError,
        ConnectionError,
    ) as exc:
        raise ProxyError(
            UPSTREAM_UNAVAILABLE, f"S3 {operation}: cannot reach S3 ({type(exc).__name__})"
        ) from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise ProxyError(UPSTREAM_ERROR, "no usable S3 credentials are configured") from exc
    except BotoCoreError as exc:
        raise ProxyError(UPSTREAM_ERROR, f"S3 {operation} failed: {type(exc).__name__}") from exc


class S3Sink:
    """ObjectSink over one shared aiobotocore S3 client."""

    def __init__(self, client: Any, bucket: str, metrics: Metrics | None = None) -> None:
        self.client = client  # also used directly by cleanup, presign and downloads
        self.bucket = bucket
        self._metrics = metrics or Metrics()

    @contextlib.asynccontextmanager
    async def call(self, operation: str) -> AsyncIterator[None]:
        """Wrap every S3 call: time it, count its S3 error code, translate what it raised."""
        with translate(operation):
            async with self._metrics.s3_call(operation):
                yield

    async def put(self, key: str, data: Body, options: ObjectOptions) -> str:
        async with self.call("PutObject"):
            resp = await self.client.put_object(
                Bucket=self.bucket, Key=key, Body=ChunkedBody(data), **options.to_params()
            )
        return str(resp["ETag"])

    async def create(self, key: str, options: ObjectOptions) -> str:
        async with self.call("CreateMultipartUpload"):
            resp = await self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, **options.to_params()
            )
        return str(resp["UploadId"])

    async def upload_part(self, key: str, upload_id: str, number: int, data: Body) -> str:
        async with self.call("UploadPart"):
            resp = await self.client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=ChunkedBody(data),
            )
        return str(resp["ETag"])

    async def complete(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> str:
        async with self.call("CompleteMultipartUpload"):
            resp = await self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]},
            )
        return str(resp["ETag"])

    async def abort(self, key: str, upload_id: str) -> None:
        async with self.call("AbortMultipartUpload"):
            try:
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise

    async def tag(self, key: str, tags: Mapping[str, str]) -> None:
        async with self.call("PutObjectTagging"):
            await self.client.put_object_tagging(
                Bucket=self.bucket,
                Key=key,
                Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]},
            )

    async def delete(self, key: str) -> None:
        async with self.call("DeleteObject"):
            await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def check(self) -> None:
        async with self.call("HeadBucket"):
            await self.client.head_bucket(Bucket=self.bucket)


@dataclass(frozen=True)
class ClientOptions:
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
        retries={"mode": "standard", "max_attempts": opts.max_attempts},
        max_pool_connections=opts.max_connections,
        s3={"payload_signing_enabled": opts.sign_payload, "addressing_style": _addressing(opts)},
        request_checksum_calculation=opts.request_checksum,
        response_checksum_validation="when_required",
    )


def _addressing(opts: ClientOptions) -> str:
    """Path-style for S3-compatible stores (no bucket DNS names); AWS decides for itself."""
    if opts.endpoint_url is None or "amazonaws.com" in opts.endpoint_url:
        return "auto"
    return "path"


@contextlib.asynccontextmanager
async def open_client(opts: ClientOptions) -> AsyncIterator[Any]:
    """One aiobotocore S3 client for the whole process (it pools connections)."""
    session = get_session()
    kwargs: dict[str, Any] = {}
    if opts.access_key and opts.secret_key:
        kwargs = {"aws_access_key_id": opts.access_key, "aws_secret_access_key": opts.secret_key}
    async with session.create_client(
        "s3",
        endpoint_url=opts.endpoint_url,
        region_name=opts.region,
        config=client_config(opts),
        **kwargs,
    ) as client:
        yield client


def client_options(settings: Settings) -> ClientOptions:
    """The S3 client settings; with the embedded store, its endpoint and saved keys."""
    opts = ClientOptions(
        endpoint_url=settings.endpoint_url,
        region=settings.region,
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
        max_attempts=settings.s3_max_attempts,
        max_connections=settings.s3_max_connections,
        sign_payload=settings.sign_payload,
        request_checksum=settings.request_checksum,
    )
    if settings.embedded:  # for `cleanup` beside a running embedded store
        creds = settings.data_dir / "credentials.json"
        if creds.is_file():
            keys = json.loads(creds.read_text())
            opts = dataclasses.replace(
                opts,
                endpoint_url=f"http://127.0.0.1:{settings.embedded_s3_port}",
                access_key=keys["access_key"],
                secret_key=keys["secret_key"],
            )
    return opts


class Presigner:
    """An S3 client used only to sign, pointed where browsers reach S3.

    Separate from the proxy's client for two reasons: SigV4 signs the Host
    header, so a URL for ``--presign-endpoint-url`` must be signed for that host
    (rewriting it afterwards breaks the signature); and botocore presigns with
    SigV2 for custom endpoints unless told ``s3v4``, which would sign neither
    Content-Length nor Content-Disposition. It is opened on first use because the
    embedded store's endpoint and keys are only known once the backend is up.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def client(self, sink: S3Sink) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await self._open(sink)
        return self._client

    async def _open(self, sink: S3Sink) -> Any:
        endpoint = self._settings.presign_endpoint_url or sink.client.meta.endpoint_url
        # Keys as the proxy's client has them; addressing style for the signing endpoint.
        opts = dataclasses.replace(client_options(self._settings), endpoint_url=endpoint)
        kwargs: dict[str, Any] = {}
        if opts.access_key and opts.secret_key:
            kwargs = {
                "aws_access_key_id": opts.access_key,
                "aws_secret_access_key": opts.secret_key,
            }
        config = client_config(opts).merge(AioConfig(signature_version="s3v4"))
        return await self._stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=endpoint,
                region_name=self._settings.region,
                config=config,
                **kwargs,
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
