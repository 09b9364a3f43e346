"""A multipart object's sha256 tag on a shared key names its own bytes (``tag_check``).

S3 takes no condition on PutObjectTagging, so the tag an upload writes after its Complete
lands on whatever object the key holds then. The re-probe (reprobe19c): upload A's tag
held on the way while B stored the same key; B's bytes ended tagged with A's hash, 4 of
4 with --no-overwrite false (0.5 s enough), 2 of 2 with --no-overwrite (A's tag timed
out, A deleted its object, B stored, A's tag landed). Pure decisions; the check on moto
and SeaweedFS; then the two races through the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from s3proxy.keys import NONCE_META
from s3proxy.s3 import ObjectOptions, ObjectStore
from s3proxy.s3_aiobotocore import ClientOptions, open_store
from s3proxy.state import STATE
from s3proxy.tag_check import SHA256_TAG, TagFix, check_tag, tag_fix
from tests import bodies
from tests.faults import Fault, FaultyS3
from tests.polling import eventually
from tests.s3util import all_keys, open_uploads

pytest_plugins = ["tests.seaweed_fixture"]

MiB = 1024**2
OURS, THEIRS = "a" * 64, "b" * 64  # two sha256 hex digests


# --- the decision: pure ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owned", "same_bytes", "found", "fix"),
    [
        (True, True, OURS, TagFix.KEEP),  # ours, tagged with our hash
        (True, True, THEIRS, TagFix.RETAG),  # ours, another's late tag on it
        (True, True, None, TagFix.RETAG),  # ours, its tag removed by the other's check
        (False, False, OURS, TagFix.UNTAG),  # another's object, our hash on it
        (False, False, THEIRS, TagFix.KEEP),  # another's, with its own (or any other) tag
        (False, False, None, TagFix.KEEP),
        (False, True, OURS, TagFix.KEEP),  # another upload of our very bytes: right
    ],
)
def test_tag_fix(owned: bool, same_bytes: bool, found: str | None, fix: TagFix) -> None:
    assert tag_fix(owned, same_bytes, found, OURS) is fix


# --- the check, on a real store -----------------------------------------------------------


def _options(nonce: str) -> ObjectOptions:
    return ObjectOptions("application/octet-stream", metadata={NONCE_META: nonce})


async def _check_on(store: ObjectStore) -> None:
    key = "k/tagged.bin"
    assert await check_tag(store, key, "ours", '"nope"', OURS) is False  # no object
    ours = (await store.put(key, [b"ours"], _options("ours"))).etag
    await store.tag(key, {SHA256_TAG: THEIRS})  # another's late tag, on our object
    assert await check_tag(store, key, "ours", ours, OURS) is False
    assert await store.tags(key) == {SHA256_TAG: OURS}  # restored
    await store.put(key, [b"theirs"], _options("theirs"))  # a new object: no tags
    assert await check_tag(store, key, "ours", ours, OURS) is False
    assert await store.tags(key) == {}
    await store.tag(key, {SHA256_TAG: OURS})  # our tag, landed late on theirs
    assert await check_tag(store, key, "ours", ours, OURS) is False
    assert await store.tags(key) == {}  # removed
    await store.tag(key, {SHA256_TAG: THEIRS})
    assert await check_tag(store, key, "ours", ours, OURS) is False
    assert await store.tags(key) == {SHA256_TAG: THEIRS}  # theirs, left alone
    # Another upload of the very bytes: the same ETag, and our hash is its hash.
    same = (await store.put(key, [b"ours"], _options("same"))).etag
    assert same == ours
    await store.tag(key, {SHA256_TAG: OURS})
    assert await check_tag(store, key, "ours", ours, OURS) is False
    assert await store.tags(key) == {SHA256_TAG: OURS}
    await store.delete(key)


async def test_check_tag_on_moto(moto: Any, bucket: str) -> None:
    opts = ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1", max_attempts=1)
    async with open_store(opts, bucket) as store:
        await _check_on(store)


@pytest.mark.e2e
async def test_check_tag_on_seaweedfs(weed_store: ObjectStore) -> None:
    await _check_on(weed_store)


# --- through the proxy --------------------------------------------------------------------

SIZE = 6 * MiB  # two parts of 5 MiB and 1 MiB: a multipart object, tagged


async def _upload(proxy: TestClient[Any, Any], data: bytes) -> tuple[int, dict[str, Any]]:
    raw = io.BytesIO(bodies.body([bodies.file("file", "a.bin", data)]))
    resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
    return resp.status, await resp.json()


async def _sha256_tag(s3: Any, bucket: str, key: str) -> str | None:
    tagging = await asyncio.to_thread(s3.get_object_tagging, Bucket=bucket, Key=key)
    return {t["Key"]: t["Value"] for t in tagging["TagSet"]}.get(SHA256_TAG)


@pytest.fixture
async def held_tag(moto: Any) -> AsyncIterator[tuple[FaultyS3, asyncio.Event]]:
    """moto behind a FaultyS3 that holds the first PutObjectTagging until told."""
    release = asyncio.Event()

    def rule(op: str, n: int) -> Fault | None:
        return Fault(until=release) if (op, n) == ("PutObjectTagging", 1) else None

    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        yield faulty, release


@pytest.mark.parametrize("no_overwrite", [False, True], ids=["overwrite", "no-overwrite"])
async def test_a_late_tag_never_names_another_uploads_bytes(
    proxy_factory: Any,
    held_tag: tuple[FaultyS3, asyncio.Event],
    s3: Any,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
    no_overwrite: bool,
) -> None:
    """Upload A's tag is held on the way; B stores the same key (201: A's object replaced,
    or, with --no-overwrite, A's tag timed out and A deleted its own); then A's tag lands
    on B's object. Before: B's bytes tagged with A's hash for good. Now A's look at the
    key (at once after an answered tag, 2x --s3-read-timeout after a lost one) removes
    its hash from B's object: B's object has no sha256 tag (or B's), never A's."""
    caplog.set_level(logging.INFO, "s3proxy.upload")
    faulty, release = held_tag
    proxy = await proxy_factory(
        faulty.endpoint_url,
        key_template="in/{filename}",
        no_overwrite=no_overwrite,
        s3_read_timeout=1.0 if no_overwrite else 3.0,  # with it A's tag times out first
        s3_max_attempts=1,
    )
    a, b = os.urandom(SIZE), os.urandom(SIZE)
    first = asyncio.ensure_future(_upload(proxy, a))
    # A's Complete is done, its tag held:
    await eventually(lambda: "PutObjectTagging" in faulty.calls, within=20, what="A's tag")
    if no_overwrite:
        status, out = await first
        assert (status, out["error"]["code"]) == (504, "UPSTREAM_TIMEOUT"), out
        assert all_keys(s3, bucket) == []  # A deleted its object
    status, out = await _upload(proxy, b)
    assert status == 201, out
    assert await _sha256_tag(s3, bucket, "in/a.bin") == hashlib.sha256(b).hexdigest()
    release.set()  # A's tag lands on B's object now
    if not no_overwrite:
        assert (await first)[0] == 201
    # A's look removes its hash, or B's look, if it is still reading, puts B's back.
    fixes = ("upload.tag_removed", "upload.tag_restored")
    fixed = lambda: [r for r in caplog.records if r.getMessage().startswith(fixes)]  # noqa: E731
    await eventually(fixed, within=20, what="a look removing A's hash from B's object")
    await asyncio.sleep(0.5)  # any look under way ends
    assert await _sha256_tag(s3, bucket, "in/a.bin") in (None, hashlib.sha256(b).hexdigest())
    body = s3.get_object(Bucket=bucket, Key="in/a.bin")["Body"].read()
    assert body == b and open_uploads(s3, bucket) == []


async def test_an_answered_tag_is_looked_at_once_and_left(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """A shared key's multipart upload whose tag was answered: one look (three reads), and
    nothing left scheduled. The late looks (2x and 8x --s3-read-timeout, minutes by
    default) are only for a tag that may still land: one per upload would pile up."""
    async with FaultyS3(moto.endpoint_url, lambda op, n: None) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, key_template="in/{filename}")
        data = os.urandom(SIZE)
        status, out = await _upload(proxy, data)
        assert status == 201, out
        janitor = proxy.server.app[STATE].janitor
        await eventually(lambda: not janitor._rechecks, within=5, what="the look done")
        after = faulty.calls[faulty.calls.index("PutObjectTagging") + 1 :]
        assert after == ["HeadObject", "GetObjectTagging", "HeadObject"], after
    assert await _sha256_tag(s3, bucket, "in/a.bin") == hashlib.sha256(data).hexdigest()


async def test_a_restored_tag_that_lands_on_an_object_stored_meanwhile_is_removed(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """reprobe20a: A's look found another's hash on A's object and restored A's; that
    write, held on the way, landed on V's object, stored meanwhile with one PutObject
    (which never looks): V's bytes kept A's hash for good (2 of 2). A look that wrote
    looks again: V's object loses A's hash, and keeps the sha256 of its metadata."""
    caplog.set_level(logging.INFO, "s3proxy.upload")
    read, write = asyncio.Event(), asyncio.Event()

    def rule(op: str, n: int) -> Fault | None:
        if (op, n) == ("GetObjectTagging", 1):
            return Fault(until=read)  # A's look reads the tags once told
        if (op, n) == ("PutObjectTagging", 2):
            return Fault(until=write)  # A's repair lands once told
        return None

    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url, key_template="in/{filename}", no_overwrite=False,
            s3_read_timeout=5.0,
        )  # fmt: skip
        a, v = os.urandom(SIZE), os.urandom(1000)
        status, out = await _upload(proxy, a)
        assert status == 201, out
        await eventually(lambda: "GetObjectTagging" in faulty.calls, within=10, what="A's look")
        await asyncio.to_thread(  # another upload's late tag, on A's object
            s3.put_object_tagging, Bucket=bucket, Key="in/a.bin",
            Tagging={"TagSet": [{"Key": SHA256_TAG, "Value": THEIRS}]},
        )  # fmt: skip
        read.set()
        await eventually(
            lambda: faulty.calls.count("PutObjectTagging") == 2, within=10, what="A's repair"
        )
        status, out = await _upload(proxy, v)  # V: one PutObject, while the repair is held
        assert status == 201, out
        write.set()
        removed = lambda: "upload.tag_removed" in caplog.text  # noqa: E731
        await eventually(removed, within=10, what="A's next look removing its hash from V's")
        await asyncio.sleep(0.3)
        assert await _sha256_tag(s3, bucket, "in/a.bin") is None
    head = s3.head_object(Bucket=bucket, Key="in/a.bin")
    assert head["Metadata"]["sha256"] == hashlib.sha256(v).hexdigest()
    assert s3.get_object(Bucket=bucket, Key="in/a.bin")["Body"].read() == v
