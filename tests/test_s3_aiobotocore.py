"""The aiobotocore ObjectStore where only a real endpoint shows it: lost answers, retries.

A CreateMultipartUpload whose answer is lost (S3 made the upload, the proxy timed out)
leaves an upload no one knows the id of; the store must find it by key and abort it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from s3proxy.s3 import ObjectOptions, S3Error
from s3proxy.s3_aiobotocore import ClientOptions, open_store
from tests import bodies
from tests.bodies import MiB
from tests.faults import Fault, FaultyS3
from tests.polling import eventually
from tests.s3util import all_keys_async, open_uploads_async, read_object_async
from tests.test_failures import expect_error, post_raw


def lost_create(times: int) -> Any:
    """The first ``times`` CreateMultipartUpload answers come after the read timeout."""
    return lambda op, n: Fault(late=1.5) if op == "CreateMultipartUpload" and n <= times else None


def second_create_lost(op: str, n: int) -> Fault | None:
    """The second CreateMultipartUpload's answer comes after the read timeout."""
    return Fault(late=1.5) if op == "CreateMultipartUpload" and n == 2 else None


def creates_sent_by(faulty: FaultyS3) -> set[str]:
    """Which path sent the creates: botocore names its requests (amz-sdk-invocation-id)."""
    return {
        "botocore" if "amz-sdk-invocation-id" in headers else "lean"
        for op, headers in faulty.headers
        if op == "CreateMultipartUpload"
    }


LEAN_OR_NOT = pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])


@LEAN_OR_NOT
async def test_lost_create_answer_is_a_504_and_leaves_no_upload(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, lean: bool
) -> None:
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(6 * MiB))])
    async with FaultyS3(moto.endpoint_url, lost_create(1)) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=1,
            s3_read_timeout=0.5,
            lean_upload_part=lean,
        )
        status, out = await post_raw(proxy, raw)
    expect_error(status, out, 504, "UPSTREAM_TIMEOUT")
    assert creates_sent_by(faulty) == {"lean" if lean else "botocore"}
    assert faulty.calls.count("CreateMultipartUpload") == 1
    assert "AbortMultipartUpload" in faulty.calls
    assert await open_uploads_async(s3, bucket) == []  # the fixture checks it too
    assert await all_keys_async(s3, bucket) == []


@LEAN_OR_NOT
async def test_create_retried_after_a_lost_answer_aborts_the_first_upload(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, lean: bool
) -> None:
    """The timed-out create is retried (by botocore or the lean sender, which reports its
    retries as botocore does) and S3 makes a second upload: the first one, whose id
    never arrived, must not stay open behind a 201."""
    data = os.urandom(6 * MiB)
    raw = bodies.body([bodies.file("f", "a.bin", data)])
    async with FaultyS3(moto.endpoint_url, lost_create(1)) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=2,
            s3_read_timeout=0.5,
            lean_upload_part=lean,
        )
        status, out = await post_raw(proxy, raw)
    assert status == 201, out
    assert creates_sent_by(faulty) == {"lean" if lean else "botocore"}
    assert faulty.calls.count("CreateMultipartUpload") == 2
    assert faulty.calls.count("AbortMultipartUpload") == 1
    assert await open_uploads_async(s3, bucket) == []
    [f] = out["files"]
    assert await read_object_async(s3, bucket, f["key"]) == data


@LEAN_OR_NOT
@pytest.mark.parametrize("retried", [True, False], ids=["retried", "failed"])
async def test_a_lost_create_on_a_shared_key_leaves_other_uploads_of_it(
    moto: Any, s3: Any, bucket: str, lean: bool, retried: bool
) -> None:
    """On a shared key, another request's upload of it under way cannot be told from one a
    lost create made: neither is aborted (the orphan sweep takes the lost one once idle).
    Before, a retried or failed create aborted every open upload of the key: a browser's
    presigned multipart upload, or another form upload's, failed for another's timeout."""
    async with FaultyS3(moto.endpoint_url, second_create_lost) as faulty:
        opts = ClientOptions(
            endpoint_url=faulty.endpoint_url,
            region="us-east-1",
            read_timeout=0.5,
            max_attempts=2 if retried else 1,
            lean_parts=lean,
        )
        async with open_store(opts, bucket) as store:
            options = ObjectOptions("application/octet-stream")
            other = await store.create("shared/a.bin", options, shared=True)
            if retried:
                mine = await store.create("shared/a.bin", options, shared=True)
            else:
                with pytest.raises(S3Error):
                    await store.create("shared/a.bin", options, shared=True)
            await asyncio.sleep(1.2)  # the lost attempt's upload is made by now
            assert "AbortMultipartUpload" not in faulty.calls
            left = {u["UploadId"] for u in await open_uploads_async(s3, bucket)}
            assert other in left and len(left) == (3 if retried else 2), left
            if retried:
                assert mine in left
            for upload_id in left:  # what the orphan sweep does once they are idle
                await store.abort("shared/a.bin", upload_id)


async def test_a_form_upload_under_way_survives_a_lost_create_of_its_shared_key(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """Two form uploads of one filename on a shared-key template: B's is under way when
    A's CreateMultipartUpload answer is lost and A's create is retried. Before, A's
    cleanup of its lost upload aborted B's too (every open upload of the key), and B was
    answered 502 UPSTREAM_ERROR for A's timeout (this test before the fix). Now B ends as
    the key's writes say (one 201, the other 409 KEY_EXISTS: no overwrite on a shared
    key)."""
    b_data, a_data = os.urandom(11 * MiB), os.urandom(6 * MiB)
    async with FaultyS3(moto.endpoint_url, second_create_lost) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=2,
            s3_read_timeout=0.5,
            key_template="shared/{filename}",
        )
        b_raw = bodies.body([bodies.file("f", "same.bin", b_data)])

        async def slowly() -> Any:
            for i in range(0, len(b_raw), 512 * 1024):
                yield b_raw[i : i + 512 * 1024]
                await asyncio.sleep(0.1)

        async def b() -> tuple[int, dict[str, Any]]:
            resp = await proxy.post("/upload", data=slowly(), headers=bodies.headers())
            return resp.status, await resp.json()

        async def a() -> tuple[int, dict[str, Any]]:
            await eventually(lambda: "UploadPart" in faulty.calls, within=10, what="B's part")
            return await post_raw(proxy, bodies.body([bodies.file("f", "same.bin", a_data)]))

        (b_status, b_out), (a_status, a_out) = await asyncio.gather(b(), a())
    assert faulty.calls.count("CreateMultipartUpload") == 3
    assert sorted([a_status, b_status]) == [201, 409], (a_out, b_out)
    loser = a_out if a_status == 409 else b_out
    assert loser["error"]["code"] == "KEY_EXISTS", loser
    winner = a_data if a_status == 201 else b_data
    assert await read_object_async(s3, bucket, "shared/same.bin") == winner
    [lost] = await open_uploads_async(s3, bucket)  # A's first: the orphan sweep's
    assert lost["Key"] == "shared/same.bin"
    s3.abort_multipart_upload(Bucket=bucket, Key=lost["Key"], UploadId=lost["UploadId"])


async def test_abort_uploads_touches_exactly_one_key(moto: Any, s3: Any, bucket: str) -> None:
    opts = ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1")
    async with open_store(opts, bucket) as store:
        options = ObjectOptions("application/octet-stream")
        mine = [await store.create("k/a.bin", options) for _ in range(2)]
        other = await store.create("k/a.bin2", options)
        aborted = await store.abort_uploads("k/a.bin")
        assert sorted(u.upload_id for u in aborted) == sorted(mine)
        assert [(u["Key"], u["UploadId"]) for u in await open_uploads_async(s3, bucket)] == [
            ("k/a.bin2", other)
        ]
        await store.abort("k/a.bin2", other)


async def test_unreachable_s3_is_a_typed_503() -> None:
    from tests.s3util import free_port

    opts = ClientOptions(
        endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", max_attempts=1
    )
    async with open_store(opts, "b") as store:
        try:
            await store.check()
        except S3Error as err:
            assert err.kind.status == 503
            assert err.operation == "HeadBucket"
        else:
            raise AssertionError("no error")


async def test_max_attempts_counts_the_first_attempt(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """--s3-max-attempts is attempts per call, not retries after the first."""
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(1000))])
    async with FaultyS3(moto.endpoint_url, lambda op, n: Fault(status=500)) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url, s3_max_attempts=3)
        status, out = await post_raw(proxy, raw)
    expect_error(status, out, 502, "UPSTREAM_ERROR")
    assert faulty.calls.count("PutObject") == 3


@contextlib.contextmanager
def never_accepting() -> Iterator[str]:
    """An endpoint whose listen backlog is full: a connect to it neither succeeds nor is
    refused (the kernel drops the SYN), so only the connect timeout ends it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    try:
        for _ in range(8):  # more than the backlog takes: the rest are left pending
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(address)
            fillers.append(filler)
        yield f"http://{address[0]}:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
async def test_a_store_that_never_accepts_is_unreachable_not_slow(lean: bool) -> None:
    """No connection within --s3-connect-timeout is 503 UPSTREAM_UNAVAILABLE, as README's
    table says of an unreachable S3; 504 is for an S3 that took the call and did not
    answer (the faults probe got 504 "S3 PutObject timed out")."""
    with never_accepting() as url:
        opts = ClientOptions(
            endpoint_url=url,
            region="us-east-1",
            max_attempts=1,
            connect_timeout=0.3,
            lean_parts=lean,
        )
        async with open_store(opts, "b") as store:
            with pytest.raises(S3Error) as err:
                await asyncio.wait_for(store.put("k", [b"x"], ObjectOptions("a/b")), 10)
    assert (err.value.kind.status, err.value.kind.code) == (503, "UPSTREAM_UNAVAILABLE")
    assert err.value.operation == "PutObject"
