"""How the store reads S3's answers, on both paths (the lean sender and botocore): an
error body that arrives in pieces, an answer that trickles, a 200 without the fields
the call returns. Real HTTP on loopback: moto behind a FaultyS3 that answers some calls
itself, in several TCP writes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from s3proxy.s3 import ObjectOptions
from s3proxy.s3_aiobotocore import AioObjectStore, ClientOptions, open_store
from tests.faults import FaultyS3, operation
from tests.test_s3_calls_lean import multipart, paths

OPTIONS = ObjectOptions("application/octet-stream")
# S3's transient "your socket was idle" answer: a 400 that botocore retries by its code.
REQUEST_TIMEOUT = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>RequestTimeout</Code>'
    b"<Message>Your socket connection to the server was not read from or written to within "
    b"the timeout period.</Message><RequestId>X</RequestId></Error>"
)
LEAN_OR_NOT = pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])


class SlowAnswers(FaultyS3):
    """Answers the first call of ``op`` itself: ``status`` with ``body`` written in
    pieces ``gap`` seconds apart, then (``forever``) one space every ``gap`` seconds."""

    op: str = ""
    status: int = 400
    pieces: tuple[bytes, ...] = ()
    gap: float = 0.05
    forever: bool = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if operation(request) != self.op or self.op in self.calls:
            return await super().handle(request)
        self.calls.append(self.op)
        await request.read()
        resp = web.StreamResponse(status=self.status, headers={"Content-Type": "application/xml"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for piece in self.pieces:
            await resp.write(piece)
            await asyncio.sleep(self.gap)
        while self.forever:
            await resp.write(b" ")
            await asyncio.sleep(self.gap)
        await resp.write_eof()
        return resp


async def _write(store: AioObjectStore, op: str) -> Any:
    if op == "PutObject":
        return await store.put("k.bin", [b"x" * 1000], OPTIONS)
    return await multipart(store, "k.bin", [b"x" * 1000], checksum=False, options=OPTIONS)


WRITES = pytest.mark.parametrize(
    "op", ["UploadPart", "PutObject", "CreateMultipartUpload", "CompleteMultipartUpload"]
)


@LEAN_OR_NOT
@WRITES
async def test_an_error_body_in_pieces_keeps_its_code(
    moto: Any, bucket: str, op: str, lean: bool
) -> None:
    """S3's error code is read from the whole body, however many reads it takes: a
    RequestTimeout split over two TCP writes is retried as RequestTimeout, not refused as
    a bare 400 (the lean path read only what was buffered)."""
    faulty = SlowAnswers(moto.endpoint_url)
    faulty.op, faulty.pieces = op, (REQUEST_TIMEOUT[:40], REQUEST_TIMEOUT[40:])
    async with faulty:
        options = ClientOptions(
            endpoint_url=faulty.endpoint_url, region="us-east-1", lean_parts=lean
        )
        async with open_store(options, bucket) as store:
            await _write(store, op)
    assert faulty.calls.count(op) == 2
    assert paths(faulty)[op] == {"lean" if lean else "botocore"}
