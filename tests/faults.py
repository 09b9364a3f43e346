"""A fault-injecting HTTP proxy in front of moto: real HTTP on loopback, with chosen
S3 calls answered by errors, delays or dropped connections, or carried out by S3 with
the answer arriving too late (``Fault.late``: S3 did the write, the proxy cannot know),
or forwarded with one byte of the body flipped (``Fault.flip``: corruption in transit), or
forwarded with S3's answer changed (``Fault.answer``) or one byte of it flipped
(``Fault.flip_answer``) on the way back.
Calls are named by ``operation`` unless ``name`` says otherwise (to tell a tus state from
a segment, say: ``tus_operation``).

In front of a store that checks signatures (SeaweedFS), pass ``keep_host=True``: SigV4
signs the Host header, so it must reach the store as the client sent it."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>injected by the test</Message></Error>"
)


@dataclass
class Fault:
    status: int = 0  # answer with this status and an S3 error body
    code: str = "InternalError"
    delay: float = 0.0  # sleep before answering (or before forwarding)
    drop: bool = False  # close the connection without an answer
    late: float = 0.0  # forward to S3 first, then sleep before answering: the answer is lost
    flip: bool = False  # forward with one bit of the body's middle byte flipped
    flip_answer: bool = False  # answer with one bit of the answer body's middle byte flipped
    body: bytes | None = None  # with ``status``: answer this body instead of S3's error
    # forward, then change S3's answer (its headers, or its body: web.Response.body)
    answer: Callable[[web.Response], None] | None = None
    # hold the call until this is set (S3 hanging), then go on as the other fields say
    until: asyncio.Event | None = None


# The two calls that store an object, each with a file size that makes the proxy use it:
# (op, size) for tests of a write whose answer is lost or late.
OBJECT_WRITES = pytest.mark.parametrize(
    ("op", "size"),
    [("PutObject", 1000), ("CompleteMultipartUpload", 7 * 1024 * 1024)],
    ids=["put", "complete"],
)


def operation(request: web.Request) -> str:
    """Name the S3 call from the request's shape (enough for the calls the proxy makes)."""
    q = request.query
    if request.method == "PUT" and "partNumber" in q:
        return "UploadPart"
    if request.method == "POST" and "uploads" in q:
        return "CreateMultipartUpload"
    if request.method == "POST" and "uploadId" in q:
        return "CompleteMultipartUpload"
    if request.method == "DELETE" and "uploadId" in q:
        return "AbortMultipartUpload"
    if "tagging" in q:
        return {"PUT": "PutObjectTagging", "GET": "GetObjectTagging"}.get(
            request.method, "DeleteObjectTagging"
        )
    if request.method == "PUT":
        return "PutObject"
    if request.method == "DELETE":
        return "DeleteObject"
    has_key = request.path.strip("/").count("/") >= 1  # path style: /bucket/key
    if request.method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    if request.method == "GET" and "uploads" in q:
        return "ListMultipartUploads"
    if request.method == "GET" and "uploadId" in q:
        return "ListParts"
    if request.method == "GET":
        return "GetObject" if has_key else "ListObjects"
    return request.method


def tus_operation(request: web.Request) -> str:
    """``operation``, with ``:state`` or ``:segment`` for a tus upload's own objects."""
    op = operation(request)
    if "/.s3proxy/tus/" in request.path:
        return op + (":segment" if "/seg/" in request.path else ":state")
    return op


def claim_operation(request: web.Request) -> str:
    """``operation``, with ``:claim`` for a presigned complete's claim (``presign_claim``)
    and ``:record`` for a presigned upload's record (``presign_record``)."""
    op = operation(request)
    if "/.s3proxy/presign-upload/" in request.path:
        return op + ":record"
    return op + ":claim" if "/.s3proxy/presign/" in request.path else op


def flipped(body: bytes) -> bytes:
    out = bytearray(body)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


@dataclass
class FaultyS3:
    upstream: str
    rule: Callable[[str, int], Fault | None] = lambda op, n: None
    calls: list[str] = field(default_factory=list)
    port: int = 0
    keep_host: bool = False  # forward the Host header as sent (for stores that verify SigV4)
    headers: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (op, lower-cased)
    bodies: list[tuple[str, bytes]] = field(default_factory=list)  # (op, the body as sent)
    name: Callable[[web.Request], str] = operation  # what ``rule`` and ``calls`` see
    paths: list[tuple[str, str]] = field(default_factory=list)  # (op, /bucket/key)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        op = self.name(request)
        self.calls.append(op)
        self.paths.append((op, request.path))
        fault = self.rule(op, self.calls.count(op))
        body = await request.read()
        self.headers.append((op, {k.lower(): v for k, v in request.headers.items()}))
        self.bodies.append((op, body))
        if fault is not None and fault.flip and body:
            body = flipped(body)
        if fault is not None:
            if fault.until is not None:
                await fault.until.wait()
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.drop:
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError("dropped by the test")
            if fault.status:
                answer = fault.body
                if answer is None:
                    answer = S3_ERROR.format(code=fault.code).encode()
                return web.Response(
                    status=fault.status, body=answer, content_type="application/xml"
                )
        dropped = ("content-length",) if self.keep_host else ("host", "content-length")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in dropped}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=io.BytesIO(body)
        ) as resp:
            payload = await resp.read()
            if fault is not None and fault.flip_answer and payload:
                payload = flipped(payload)
            out: web.StreamResponse = web.Response(status=resp.status, body=payload)
            if request.method == "HEAD":  # the object's length, not the empty body's
                out = web.StreamResponse(status=resp.status)
                out.content_length = int(resp.headers.get("Content-Length", "0"))
            for k, v in resp.headers.items():
                if k.lower() not in (
                    "content-length",
                    "transfer-encoding",
                    "content-encoding",
                    "date",
                    "server",
                ):
                    out.headers[k] = v
        if fault is not None and fault.answer is not None and isinstance(out, web.Response):
            fault.answer(out)
        if fault is not None and fault.late:
            await asyncio.sleep(fault.late)
        return out

    async def __aenter__(self) -> FaultyS3:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()
