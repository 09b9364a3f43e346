"""The ObjectStore contract (``s3proxy.s3``), the SAME tests run against the aiobotocore
store on moto and against ``tests/memory_s3.MemoryS3``, so the fake cannot drift."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from s3proxy.checksums import Algorithm, Crc, CrcValue
from s3proxy.s3 import (
    BadDigest,
    ChecksumUnsupported,
    Conditions,
    InvalidParts,
    InvalidRange,
    NoSuchKey,
    NoSuchUpload,
    NotModified,
    ObjectInfo,
    ObjectOptions,
    ObjectStore,
    PreconditionFailed,
    S3Error,
    checksum_refusal,
    whole_object,
)
from s3proxy.s3 import refusal as refusal_of
from s3proxy.s3_aiobotocore import ClientOptions, open_store
from tests.memory_s3 import MemoryS3

MiB = 1024**2
OPTS = ObjectOptions("text/plain", 'attachment; filename="a.txt"', {"who": "me"})


@pytest.fixture(params=["aiobotocore", "memory"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ObjectStore]:
    if request.param == "memory":
        yield MemoryS3()
        return
    moto = request.getfixturevalue("moto")
    bucket = request.getfixturevalue("bucket")  # checks no upload is left open
    opts = ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1", max_attempts=1)
    async with open_store(opts, bucket) as real:
        yield real


async def read_all(store: ObjectStore, key: str, **kw: Any) -> bytes:
    async with await store.get(key, **kw) as body:
        out = b""
        while chunk := await body.read(1000):
            out += chunk
        return out


async def test_put_then_head_and_get(store: ObjectStore) -> None:
    etag = (await store.put("a/x.txt", [b"hello ", memoryview(b"world")], OPTS)).etag
    head = await store.head("a/x.txt")
    assert (head.length, head.size, head.etag) == (11, 11, etag)
    assert head.content_type == "text/plain"
    assert head.content_disposition == 'attachment; filename="a.txt"'
    assert head.metadata == {"who": "me"}
    assert head.last_modified is not None and head.last_modified.tzinfo is not None
    assert not head.partial
    assert await read_all(store, "a/x.txt") == b"hello world"


async def test_list_objects_by_prefix_and_limit(store: ObjectStore) -> None:
    for key, data in (("l/a", b"1"), ("l/b", b"22"), ("l/c", b""), ("m/d", b"4444")):
        await store.put(key, [data], OPTS)
    assert await store.list_objects("l/") == [
        ObjectInfo("l/a", 1),
        ObjectInfo("l/b", 2),
        ObjectInfo("l/c", 0),
    ]
    assert await store.list_objects("l/", limit=2) == [ObjectInfo("l/a", 1), ObjectInfo("l/b", 2)]
    assert await store.list_objects("zz/") == []


async def test_multipart_round_trip(store: ObjectStore) -> None:
    first, last = os.urandom(5 * MiB), b"tail"
    upload_id = await store.create("a/big.bin", OPTS)
    assert [u.upload_id async for u in store.list_uploads("a/")] == [upload_id]
    e1 = await store.upload_part("a/big.bin", upload_id, 1, [first])
    e2 = await store.upload_part("a/big.bin", upload_id, 2, [last])
    parts = await store.list_parts("a/big.bin", upload_id)
    assert [(p.number, p.etag, p.size) for p in parts] == [(1, e1, 5 * MiB), (2, e2, 4)]
    assert len(await store.list_parts("a/big.bin", upload_id, max_parts=1)) == 1
    etag = (await store.complete("a/big.bin", upload_id, [(1, e1), (2, e2)])).etag
    assert etag.endswith('-2"')
    assert [u async for u in store.list_uploads("a/")] == []
    assert await read_all(store, "a/big.bin") == first + last


async def test_small_parts_are_refused_at_complete(store: ObjectStore) -> None:
    upload_id = await store.create("a/small.bin", OPTS)
    try:
        e1 = await store.upload_part("a/small.bin", upload_id, 1, [b"x"])
        e2 = await store.upload_part("a/small.bin", upload_id, 2, [b"y"])
        with pytest.raises(InvalidParts) as err:
            await store.complete("a/small.bin", upload_id, [(1, e1), (2, e2)])
        assert err.value.reason == "EntityTooSmall" and err.value.kind.status == 502
    finally:
        await store.abort("a/small.bin", upload_id)


async def test_unknown_upload(store: ObjectStore) -> None:
    upload_id = await store.create("a/gone.bin", OPTS)
    await store.abort("a/gone.bin", upload_id)
    await store.abort("a/gone.bin", upload_id)  # already gone: still fine
    with pytest.raises(NoSuchUpload):
        await store.list_parts("a/gone.bin", upload_id)
    # S3 answers these NoSuchUpload too; moto 5 answers 500, so only S3Error here.
    with pytest.raises(S3Error):
        await store.upload_part("a/gone.bin", upload_id, 1, [b"x"])
    with pytest.raises(S3Error):
        await store.complete("a/gone.bin", upload_id, [(1, '"x"')])


async def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(NoSuchKey):
        await store.head("a/none")
    with pytest.raises(NoSuchKey):
        await store.get("a/none")
    await store.delete("a/none")  # deleting nothing is fine


async def test_conditional_and_ranged_reads(store: ObjectStore) -> None:
    etag = (await store.put("a/c.txt", [b"0123456789"], OPTS)).etag
    with pytest.raises(NotModified) as nm:
        await store.get("a/c.txt", conditions=Conditions(if_none_match=etag))
    assert nm.value.etag == etag
    with pytest.raises(NotModified):
        await store.head("a/c.txt", conditions=Conditions(if_none_match=etag))
    with pytest.raises(PreconditionFailed):
        await store.get("a/c.txt", conditions=Conditions(if_match='"other"'))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    with pytest.raises(NotModified):
        await store.get("a/c.txt", conditions=Conditions(if_modified_since=later))
    assert await read_all(store, "a/c.txt", conditions=Conditions(if_match=etag)) == b"0123456789"

    body = await store.get("a/c.txt", byte_range="bytes=2-4")
    async with body:
        assert body.head.partial and body.head.content_range == "bytes 2-4/10"
        assert (body.head.length, body.head.size) == (3, 10)
        assert await body.read(100) == b"234"
    assert await read_all(store, "a/c.txt", byte_range="bytes=-3") == b"789"
    with pytest.raises(InvalidRange) as bad:
        await store.get("a/c.txt", byte_range="bytes=50-")
    assert bad.value.size == 10


async def test_abort_uploads_and_listing_by_prefix(store: ObjectStore) -> None:
    ids = [await store.create(k, OPTS) for k in ("p/a", "p/a", "p/ab", "q/a")]
    assert sorted([u.upload_id async for u in store.list_uploads("p/")]) == sorted(ids[:3])
    aborted = await store.abort_uploads("p/a")
    assert sorted(u.upload_id for u in aborted) == sorted(ids[:2])
    assert [u.key async for u in store.list_uploads("")] == ["p/ab", "q/a"]
    await store.abort_uploads("p/ab")
    await store.abort_uploads("q/a")


async def test_tag_and_delete(store: ObjectStore) -> None:
    await store.put("a/t.txt", [b"x"], OPTS)
    await store.tag("a/t.txt", {"sha256": "abc"})
    await store.delete("a/t.txt")
    with pytest.raises(NoSuchKey):
        await store.head("a/t.txt")
    with pytest.raises(S3Error):
        await store.tag("a/t.txt", {"sha256": "abc"})


async def test_presigned_urls_name_the_key(store: ObjectStore) -> None:
    url = await store.presign_part("a/k.bin", "some-id", 3, 60)
    assert "a/k.bin" in url and "partNumber=3" in url
    put = await store.presign_put("a/k.bin", 10, OPTS, 60)
    assert put.headers["Content-Type"] == "text/plain"
    post = await store.presign_post("a/k.bin", 10, OPTS, 60)
    assert post.fields["key"] == "a/k.bin"
    assert (await store.object_url("a/k.bin")).endswith("/a/k.bin")


# --- additional checksums (issue #12) ----------------------------------------------------
# moto verifies none (docs/integrity-notes.md), so a wrong value's refusal is the fake's and
# SeaweedFS's business (tests/test_integrity.py); what both keep is what is sent and reported.


def crc64(data: bytes) -> CrcValue:
    running = Crc(Algorithm.CRC64NVME)
    running.update(data)
    return running.result()


async def test_put_with_checksum_reports_it(store: ObjectStore) -> None:
    data = b"checked bytes"
    written = await store.put(
        "a/sum.txt", [data[:4], memoryview(data)[4:]], OPTS, checksum=crc64(data)
    )
    assert written.checksum is not None
    assert written.checksum.to_json() == {
        "algorithm": "crc64nvme",
        "type": "FULL_OBJECT",
        "value": crc64(data).b64(),
    }
    assert (await store.put("a/plain.txt", [data], OPTS)).checksum is None
    assert await read_all(store, "a/sum.txt") == data


async def test_full_object_checksum_round_trip(store: ObjectStore) -> None:
    first, last = os.urandom(5 * MiB), b"tail"
    upload_id = await store.create("a/sum.bin", OPTS, checksum=Algorithm.CRC64NVME)
    try:
        sums = [crc64(first), crc64(last)]
        e1 = await store.upload_part("a/sum.bin", upload_id, 1, [first], checksum=sums[0])
        e2 = await store.upload_part("a/sum.bin", upload_id, 2, [last], checksum=sums[1])
        written = await store.complete("a/sum.bin", upload_id, [(1, e1), (2, e2)], checksums=sums)
    except BaseException:
        await store.abort("a/sum.bin", upload_id)
        raise
    assert written.checksum is not None
    assert written.checksum.value == crc64(first + last).b64() == whole_object(sums).b64()  # type: ignore[union-attr]
    assert written.checksum.type == "FULL_OBJECT"
    assert await read_all(store, "a/sum.bin") == first + last


async def test_memory_verifies_checksums_like_s3() -> None:
    fake = MemoryS3()
    with pytest.raises(BadDigest) as bad:
        await fake.put("k", [b"abc"], OPTS, checksum=crc64(b"abd"))
    assert (bad.value.kind.code, bad.value.kind.status, bad.value.reason) == (
        "UPSTREAM_CORRUPTION",
        502,
        "BadDigest",
    )
    assert fake.objects == {}
    fake = MemoryS3()
    fake.corrupt("PutObject", at=2)
    await fake.put("k", [b"abc"], OPTS, checksum=crc64(b"abc"))
    with pytest.raises(BadDigest):
        await fake.put("k2", [b"abc"], OPTS, checksum=crc64(b"abc"))
    fake.refuse_checksums = True
    with pytest.raises(ChecksumUnsupported):
        await fake.create("k3", OPTS, checksum=Algorithm.CRC64NVME)
    assert fake.uploads == {}


def test_checksum_refusal_types() -> None:
    """Codes that mean "this store takes no checksum" become ChecksumUnsupported only for a
    call that carried one (the implementations ask only then); BadDigest is always typed."""
    for code, status, kind in [
        ("InvalidArgument", 400, ChecksumUnsupported),
        ("InvalidRequest", 400, ChecksumUnsupported),
        ("NotImplemented", 501, ChecksumUnsupported),
        ("AccessDenied", 403, S3Error),
        ("NoSuchUpload", 404, NoSuchUpload),
        ("BadDigest", 400, BadDigest),
        ("XAmzContentSHA256Mismatch", 400, BadDigest),
    ]:
        err = checksum_refusal(refusal_of("PutObject", code, status))
        assert type(err) is kind, code
    assert type(refusal_of("PutObject", "InvalidArgument", 400)) is S3Error


# --- the fake's own controls -------------------------------------------------------------


async def test_memory_failure_injection_and_lost_create() -> None:
    fake = MemoryS3()
    fake.fail("UploadPart", at=2)
    upload_id = await fake.create("k", OPTS)
    await fake.upload_part("k", upload_id, 1, [b"x"])
    with pytest.raises(S3Error) as err:
        await fake.upload_part("k", upload_id, 2, [b"x"])
    assert err.value.kind.status == 502
    await fake.abort("k", upload_id)

    fake.fail("CreateMultipartUpload", at=2, lost=True)
    with pytest.raises(S3Error) as lost:
        await fake.create("k2", OPTS)
    assert lost.value.kind.status == 504
    assert fake.uploads == {}  # made, answer lost, aborted by key
    assert fake.ops()[-3:] == [
        "CreateMultipartUpload",
        "ListMultipartUploads",
        "AbortMultipartUpload",
    ]


async def test_put_if_match_swaps_only_the_version_read(store: ObjectStore) -> None:
    """A compare-and-swap: the tus state object is updated only over what was read."""
    first = (await store.put("cas/state", [b"1"], OPTS)).etag
    second = (await store.put("cas/state", [b"2"], OPTS, if_match=first)).etag
    with pytest.raises(PreconditionFailed):
        await store.put("cas/state", [b"3"], OPTS, if_match=first)  # stale
    assert await read_all(store, "cas/state") == b"2"
    with pytest.raises((NoSuchKey, PreconditionFailed)):
        await store.put("cas/missing", [b"x"], OPTS, if_match=second)
    with pytest.raises(NoSuchKey):
        await store.head("cas/missing")


async def test_list_objects_pages_with_start_after(store: ObjectStore) -> None:
    for key in ("p/a", "p/b", "p/c"):
        await store.put(key, [b"."], OPTS)
    assert [o.key for o in await store.list_objects("p/", limit=2)] == ["p/a", "p/b"]
    assert [o.key for o in await store.list_objects("p/", start_after="p/b")] == ["p/c"]


async def test_credential_secret_is_the_signing_secret(store: ObjectStore) -> None:
    secret = await store.credential_secret()
    assert secret  # moto's fake AWS_SECRET_ACCESS_KEY, the memory store's own
