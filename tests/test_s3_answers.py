"""How the store reads S3's answers, on both paths (the lean sender and botocore): an
error body that arrives in pieces, an answer that trickles, a 200 without the fields
the call returns. Real HTTP on loopback: moto behind a FaultyS3 that answers some calls
itself, in several TCP writes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from s3proxy.s3 import ObjectInfo, ObjectOptions, S3Error, object_pages
from s3proxy.s3_aiobotocore import AioObjectStore, ClientOptions, open_store
from tests.faults import Fault, FaultyS3, operation
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


NO_ETAG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult '
    b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket>'
    b"</CompleteMultipartUploadResult>"
)
NO_SIZE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<ListPartsResult '
    b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Part><PartNumber>1</PartNumber>'
    b"<ETag>&quot;x&quot;</ETag></Part><IsTruncated>false</IsTruncated></ListPartsResult>"
)
NO_INITIATED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<ListMultipartUploadsResult '
    b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Upload><Key>k.bin</Key>'
    b"<UploadId>u</UploadId></Upload><IsTruncated>false</IsTruncated>"
    b"</ListMultipartUploadsResult>"
)


async def _list_parts(store: AioObjectStore) -> Any:
    upload_id = await store.create("k.bin", OPTIONS)
    try:
        return await store.list_parts("k.bin", upload_id)
    finally:
        await store.abort("k.bin", upload_id)


async def _list_uploads(store: AioObjectStore) -> Any:
    return [u async for u in store.list_uploads("")]


@LEAN_OR_NOT
@pytest.mark.parametrize(
    ("op", "answer", "call"),
    [
        ("PutObject", b"", lambda store: _write(store, "PutObject")),
        ("UploadPart", b"", lambda store: _write(store, "UploadPart")),
        ("CompleteMultipartUpload", NO_ETAG, lambda store: _write(store, "Complete")),
        ("ListParts", NO_SIZE, _list_parts),
        ("ListMultipartUploads", NO_INITIATED, _list_uploads),
    ],
    ids=["put-no-etag", "part-no-etag", "complete-no-etag", "part-no-size", "upload-no-date"],
)
async def test_an_answer_without_its_fields_is_an_upstream_error(
    moto: Any, bucket: str, op: str, answer: bytes, call: Any, lean: bool
) -> None:
    """A 200 that lacks a field the call reads (a broken gateway): a 502 naming the call on
    both paths, not a KeyError (a 500) from reading botocore's parsed answer."""
    rule = lambda o, n: Fault(status=200, body=answer) if o == op else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        options = ClientOptions(
            endpoint_url=faulty.endpoint_url, region="us-east-1", lean_parts=lean
        )
        async with open_store(options, bucket) as store:
            with pytest.raises(S3Error) as err:
                await call(store)
    assert err.value.kind.status == 502, err.value
    assert err.value.operation == op


@LEAN_OR_NOT
@pytest.mark.parametrize("op", ["CompleteMultipartUpload", "PutObject"])
async def test_a_trickling_answer_times_out(moto: Any, bucket: str, op: str, lean: bool) -> None:
    """200 and its head at once, then one byte every 0.2 s, forever: every read is inside
    --s3-read-timeout, so only a deadline on the whole answer ends it (a 504)."""
    faulty = SlowAnswers(moto.endpoint_url)
    faulty.op, faulty.status, faulty.gap, faulty.forever = op, 200, 0.2, True
    faulty.pieces = (b'<?xml version="1.0" encoding="UTF-8"?>\n',)
    async with faulty:
        options = ClientOptions(
            endpoint_url=faulty.endpoint_url,
            region="us-east-1",
            lean_parts=lean,
            read_timeout=1.0,
            max_attempts=1,
        )
        async with open_store(options, bucket) as store:
            with pytest.raises(S3Error) as err:
                # a guard for the test itself, far above the deadline
                await asyncio.wait_for(_write(store, op), 10)
    assert (err.value.kind.status, err.value.operation) == (504, op)


class HugeAnswer(FaultyS3):
    """Answers the first call of ``op`` itself: 200 with ``size`` bytes of whitespace,
    counting what it manages to send before the client hangs up."""

    op: str = ""
    size: int = 0
    sent: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if operation(request) != self.op or self.op in self.calls:
            return await super().handle(request)
        self.calls.append(self.op)
        await request.read()
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/xml"})
        resp.content_length = self.size
        await resp.prepare(request)
        piece = b" " * (64 * 1024)
        try:
            while self.sent < self.size:
                await resp.write(piece)
                self.sent += len(piece)
        except ConnectionError:
            pass
        return resp


@pytest.mark.parametrize("op", ["UploadPart", "PutObject", "CompleteMultipartUpload"])
async def test_a_huge_answer_is_not_read_whole(moto: Any, bucket: str, op: str) -> None:
    """A 200 of 256 MiB (a broken gateway) on the lean path: read up to 64 KiB, taken as
    the cut answer it is (a 500, retried), its connection dropped; the store could send
    only what the socket buffers took (all 256 MiB, into memory, when read whole)."""
    faulty = HugeAnswer(moto.endpoint_url)
    faulty.op, faulty.size = op, 256 * 1024 * 1024
    async with faulty:
        options = ClientOptions(
            endpoint_url=faulty.endpoint_url, region="us-east-1", lean_parts=True
        )
        async with open_store(options, bucket) as store:
            await asyncio.wait_for(_write(store, op), 30)
    assert faulty.calls.count(op) == 2  # retried, then stored
    assert faulty.sent < 32 * 1024 * 1024, faulty.sent


def _parts_page(marker: int) -> bytes:
    """A ListParts page of one part, truncated, whose next page starts at ``marker``."""
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<ListPartsResult '
        b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Part><PartNumber>1</PartNumber>'
        b"<ETag>&quot;x&quot;</ETag><Size>5</Size></Part><IsTruncated>true</IsTruncated>"
        b"<NextPartNumberMarker>%d</NextPartNumberMarker></ListPartsResult>" % marker
    )


@pytest.mark.parametrize("markers", [[0], [1, 1], [2, 1]], ids=["zero", "same", "back"])
async def test_a_parts_listing_that_does_not_advance_is_an_upstream_error(
    moto: Any, bucket: str, markers: list[int]
) -> None:
    """ListParts truncated whose NextPartNumberMarker does not go past the one sent (a
    broken store or gateway): a 502 after those pages, not S3 called for ever (the
    /sign/multipart/parts of the faults probe made 1,399 calls in 20 s and went on after
    the client left; `s3proxy cleanup` too)."""

    def rule(op: str, n: int) -> Fault | None:
        if op != "ListParts":
            return None
        return Fault(status=200, body=_parts_page(markers[min(n, len(markers)) - 1]))

    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        options = ClientOptions(endpoint_url=faulty.endpoint_url, region="us-east-1")
        async with open_store(options, bucket) as store:
            with pytest.raises(S3Error) as err:
                await asyncio.wait_for(_list_parts(store), 10)
    assert (err.value.kind.status, err.value.reason) == (502, "NotAdvancing")
    assert faulty.calls.count("ListParts") == len(markers)


class IgnoresStartAfter:
    """A store whose ListObjectsV2 ignores StartAfter: every page is the first."""

    def __init__(self, store: AioObjectStore) -> None:
        self.store = store

    async def list_objects(
        self, prefix: str = "", *, limit: int = 1000, start_after: str = ""
    ) -> list[ObjectInfo]:
        return await self.store.list_objects(prefix, limit=limit)


async def test_an_object_listing_that_does_not_advance_is_an_upstream_error(
    moto: Any, bucket: str
) -> None:
    """Every loop over object pages goes through ``object_pages``: a store that lists
    the same page again is a 502, not a loop (the tus expiry sweep, a prefix's removal)."""
    options = ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1")
    async with open_store(options, bucket) as store:
        for i in range(3):
            await store.put(f"p/{i}", [b"x"], OPTIONS)
        assert [[o.key for o in page] async for page in object_pages(store, "p/", page_size=2)] == [
            ["p/0", "p/1"],
            ["p/2"],
        ]
        stuck: Any = IgnoresStartAfter(store)
        with pytest.raises(S3Error) as err:
            await asyncio.wait_for(_drain(object_pages(stuck, "p/", page_size=2)), 10)
        assert err.value.reason == "NotAdvancing"
        for i in range(3):
            await store.delete(f"p/{i}")


async def _drain(pages: Any) -> None:
    async for _ in pages:
        pass
