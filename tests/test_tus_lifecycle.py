"""tus uploads over their life: racing PATCHes, locks, expiry and the sweep, upload
tokens across PATCHes, and no file opened for writing (moto)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import itertools
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from s3proxy import tokens, tus_url
from s3proxy.checksums import Algorithm, Crc
from s3proxy.cleanup import Rule, sweep, sweep_tus
from s3proxy.errors import ProxyError
from s3proxy.state import STATE
from s3proxy.tus import TUS
from s3proxy.tus_keys import KEY_OBJECT
from s3proxy.tus_lease import Lease
from s3proxy.tus_state import Lock, Segment, TusState, TusStore
from s3proxy.tus_url import TusUpload
from tests.conftest import ProxyFactory
from tests.faults import Fault, FaultyS3, tus_operation
from tests.memory_s3 import MemoryS3
from tests.polling import eventually
from tests.s3util import all_keys_async, open_uploads_async, read_object_async
from tests.test_resources import WriteAudit
from tests.test_tus import TUS as TUS_HEADERS
from tests.test_tus import KiB, MiB, body, objects, reserved, stored_key
from tests.test_tus_units import UPLOAD
from tests.test_webhook_flow import SECRET as SECRET_HOOK
from tests.test_webhook_flow import receiver

SECRET = b"s" * 32


def patch_headers(offset: int, **extra: str) -> dict[str, str]:
    return {
        **TUS_HEADERS,
        "Upload-Offset": str(offset),
        "Content-Type": "application/offset+octet-stream",
        **extra,
    }


async def new_upload(proxy: TestClient[Any, Any], length: int, **headers: str) -> str:
    resp = await proxy.post(
        "/tus/", headers={**TUS_HEADERS, "Upload-Length": str(length), **headers}
    )
    assert resp.status == 201, await resp.text()
    return resp.headers["Location"]


async def offset_of(proxy: TestClient[Any, Any], url: str) -> int:
    resp = await proxy.head(url, headers=TUS_HEADERS)
    assert resp.status == 200
    return int(resp.headers["Upload-Offset"])


async def test_racing_patches_one_wins_the_other_is_refused(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """Two PATCHes at the same offset on two proxies sharing the bucket: one is stored, the
    other gets 423 (the lock) or 409 (the offset moved); the object is one client's bytes."""
    a = await proxy_factory()
    b = await proxy_factory()
    data = body(300 * KiB)
    url = await new_upload(a, len(data))

    async def slow_body(payload: bytes) -> Any:
        for i in range(0, len(payload), 16 * KiB):
            yield payload[i : i + 16 * KiB]
            await asyncio.sleep(0.01)

    first, second = await asyncio.gather(
        a.patch(url, data=slow_body(data[: 200 * KiB]), headers=patch_headers(0)),
        b.patch(url, data=slow_body(data[: 200 * KiB]), headers=patch_headers(0)),
    )
    statuses = sorted([first.status, second.status])
    assert statuses[0] == 204 and statuses[1] in (409, 423), statuses
    loser = first if first.status != 204 else second
    assert (await loser.json())["error"]["code"] in ("UPLOAD_LOCKED", "OFFSET_MISMATCH")
    assert await offset_of(b, url) == 200 * KiB
    resp = await b.patch(url, data=data[200 * KiB :], headers=patch_headers(200 * KiB))
    assert resp.status == 204
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data


async def test_a_dead_patchs_lock_goes_stale_after_the_lease(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """A lock nobody renews (its instance died) blocks PATCHes with 423 only until the
    lease (plus the clock skew) has passed."""
    proxy = await proxy_factory(tus_lock_lease=1.0, cleanup_clock_skew=0)
    data = body(100 * KiB)
    url = await new_upload(proxy, len(data))
    upload = tus_url.verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
    store = TusStore(proxy.app[STATE].require_sink(), upload)
    found = await store.read()
    assert found is not None
    current, etag = found
    current.lock = Lock("a-killed-instance", time.time() + 1.0)
    await store.swap(current, etag)
    resp = await proxy.patch(url, data=data, headers=patch_headers(0))
    assert resp.status == 423 and (await resp.json())["error"]["code"] == "UPLOAD_LOCKED"
    await asyncio.sleep(1.2)
    resp = await proxy.patch(url, data=data, headers=patch_headers(0))
    assert resp.status == 204
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data


@pytest.mark.parametrize("size", [300 * KiB, 6 * MiB], ids=["put-object", "complete"])
@pytest.mark.parametrize("meanwhile", ["taken-over", "terminated"])
async def test_a_patch_that_lost_its_lock_stores_no_object(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, size: int, meanwhile: str
) -> None:
    """reprobe19b F1: an instance frozen past its lease in the PATCH that completes the
    upload (SIGSTOP) woke, stored its object and answered 204: over the object of the
    PATCH that took the upload over, or bringing a terminated upload back, the webhook
    told twice. The object write has no state swap to fail, so the lock is renewed by one
    just before it: here the takeover (or the termination) is written while the PATCH's
    body is on its way, and the PATCH gets 423 and stores nothing."""
    proxy = await proxy_factory(tus_lock_lease=60.0)
    data = body(size)
    url = await new_upload(proxy, len(data))
    upload = tus_url.verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
    store = TusStore(proxy.app[STATE].require_sink(), upload)
    half = asyncio.Event()
    go_on = asyncio.Event()

    async def paused() -> Any:
        yield data[: size // 2]
        half.set()
        await go_on.wait()
        yield data[size // 2 :]

    patch = asyncio.create_task(proxy.patch(url, data=paused(), headers=patch_headers(0)))
    await half.wait()

    async def locked() -> TusState | None:
        found = await store.read()
        return None if found is None else found[0]

    await eventually(
        locked, until=lambda s: s is not None and s.lock is not None, within=5.0, what="lock"
    )
    found = await store.read()
    assert found is not None
    if meanwhile == "taken-over":  # its lease lapsed while it was frozen: another took it
        current, etag = found
        current.lock = Lock("another-instance", time.time() + 60)
        await store.swap(current, etag)
    else:  # ... and a DELETE removed the upload
        await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=upload.prefix + "state")
    go_on.set()
    resp = await patch
    assert resp.status == 423, await resp.text()
    assert (await resp.json())["error"]["code"] == "UPLOAD_LOCKED"
    assert upload.key not in await all_keys_async(s3, bucket)
    await eventually(
        lambda: open_uploads_async(s3, bucket), until=lambda u: u == [], within=10.0, what="aborted"
    )


async def six_of_seven_mib(proxy: Any) -> tuple[str, bytes]:
    """A 7 MiB upload with its first 6 MiB sent (one part in S3, the rest staged)."""
    data = body(7 * MiB)
    url = await new_upload(proxy, len(data))
    resp = await proxy.patch(url, data=io.BytesIO(data[: 6 * MiB]), headers=patch_headers(0))
    assert resp.status == 204
    return url, data


async def test_expired_upload_url_is_410_and_the_sweep_removes_it(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    url, _ = await six_of_seven_mib(proxy)
    assert len(await open_uploads_async(s3, bucket)) == 1
    bucket_store = proxy.app[STATE].require_sink()
    # The idle rule would abort the multipart upload (moto dates it in 2010): a live tus
    # upload's is kept, whatever its age.
    live = await sweep_tus(bucket_store, dry_run=False, now=time.time())
    assert live.live and not live.expired
    far = datetime.now(UTC) + timedelta(days=30)
    kept = await sweep(
        bucket_store, "", Rule.idle(timedelta(hours=1)), dry_run=False, now=far, keep=live.live
    )
    assert kept.aborted == [] and kept.live == 1
    # Past its expiry: removed, multipart upload aborted, nothing left under the prefix.
    gone = await sweep_tus(bucket_store, dry_run=False, now=time.time() + 2 * 86400)
    assert len(gone.removed) == 1
    assert await open_uploads_async(s3, bucket) == []
    assert await all_keys_async(s3, bucket) == [KEY_OBJECT]  # the URL key stays
    # An expired URL (signed by this proxy) is 410.
    upload = tus_url.verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
    old = TusUpload(**{**upload.__dict__, "expires": int(time.time()) - 1})
    resp = await proxy.patch(
        "/tus/" + tus_url.issue(old, proxy.app[TUS].keys[0]), data=b"x", headers=patch_headers(0)
    )
    assert resp.status == 410 and (await resp.json())["error"]["code"] == "UPLOAD_EXPIRED"


async def test_upload_token_limits_hold_across_patches(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory(token_secret=(SECRET.decode(),))
    token = tokens.issue(
        SECRET, prefix="users/42/", ttl=60, max_size=400 * KiB, types=["application/pdf"]
    )
    auth = {"Authorization": f"Bearer {token}"}
    # no credential: 401 at creation
    resp = await proxy.post("/tus/", headers={**TUS_HEADERS, "Upload-Length": "10"})
    assert resp.status == 401
    # over the token's size: 413 at creation
    resp = await proxy.post(
        "/tus/", headers={**TUS_HEADERS, "Upload-Length": str(401 * KiB), **auth}
    )
    assert resp.status == 413
    # a type outside the grant: refused at the first PATCH, before any byte is kept
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * (100 * KiB)
    url = await new_upload(proxy, len(png) + 10, **auth)
    resp = await proxy.patch(url, data=png, headers=patch_headers(0))
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "TOKEN_SCOPE"
    assert await offset_of(proxy, url) == 0
    assert [k for k in await reserved(s3, bucket) if "/seg/" in k] == []
    # the token's prefix holds, and later PATCHes need only the URL (no credential)
    data = body(300 * KiB)
    url = await new_upload(proxy, len(data), **auth)
    for start in range(0, len(data), 100 * KiB):
        resp = await proxy.patch(
            url, data=data[start : start + 100 * KiB], headers=patch_headers(start)
        )
        assert resp.status == 204
    key = await stored_key(s3, bucket)
    assert key.startswith("users/42/")
    assert await read_object_async(s3, bucket, key) == data


async def test_small_patches_open_no_file_for_writing(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, write_audit: WriteAudit
) -> None:
    """100 KiB PATCHes, as mobile clients send them: a correct object, no file opened for
    writing by the proxy, nothing left under the reserved prefix, the budget back at 0."""
    proxy = await proxy_factory()
    data = body(5 * MiB + 250 * KiB)
    url = await new_upload(proxy, len(data))
    write_audit.active = True
    try:
        for start in range(0, len(data), 100 * KiB):
            resp = await proxy.patch(
                url, data=data[start : start + 100 * KiB], headers=patch_headers(start)
            )
            assert resp.status == 204, await resp.text()
    finally:
        write_audit.active = False
    assert write_audit.writes == [], f"files opened for writing: {write_audit.writes}"
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data
    assert await reserved(s3, bucket) == []
    assert proxy.app[STATE].budget.in_use == 0


@pytest.fixture(scope="session")
def write_audit() -> WriteAudit:
    return WriteAudit()


@pytest.mark.slow
async def test_a_failed_s3_call_anywhere_leaves_the_upload_resumable(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """Every S3 call of a three-PATCH upload, failed in turn: the PATCH fails, HEAD never
    reports a byte that is not stored (the upload resumes from what HEAD says and the
    object is byte-identical), no multipart upload is left open, nothing stays reserved."""
    clean = await proxy_factory()
    data = body(7 * MiB + 3)
    cuts = [0, 3 * MiB, 6 * MiB, len(data)]
    n = 0
    while True:
        n += 1
        url = await new_upload(clean, len(data))
        upload = tus_url.verify(url.removeprefix("/tus/"), clean.app[TUS].keys, time.time())
        calls: list[str] = []

        def fail_nth(op: str, _: int, n: int = n, calls: list[str] = calls) -> Fault | None:
            calls.append(op)
            return Fault(status=403, code="AccessDenied") if len(calls) == n else None

        async with FaultyS3(moto.endpoint_url, fail_nth) as faulty:
            flaky = await proxy_factory(faulty.endpoint_url)
            failed = None
            for start, end in itertools.pairwise(cuts):
                offset = await offset_of(clean, url)
                assert offset <= start, (n, offset, start)  # never more than was sent
                resp = await flaky.patch(
                    url, data=io.BytesIO(data[offset:end]), headers=patch_headers(offset)
                )
                if resp.status != 204:
                    failed = (calls[n - 1], resp.status, (await resp.json())["error"]["code"])
                    break
        if failed is None:
            assert n > 10, "every call of the upload was failed once"
            break
        offset = await offset_of(clean, url)
        resp = await clean.patch(url, data=io.BytesIO(data[offset:]), headers=patch_headers(offset))
        assert resp.status == 204, (n, failed, await resp.text())
        assert await read_object_async(s3, bucket, upload.key) == data, (n, failed)

        async def settled() -> bool:
            return not await reserved(s3, bucket) and not await open_uploads_async(s3, bucket)

        await eventually(settled, within=30, what=f"cleanup after failing call {n} {failed}")


async def test_a_crash_after_completing_before_removing_the_state_is_recovered(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """The instance died between CompleteMultipartUpload and removing the state (put back
    here as it was): the client's retried PATCH finds the object whole and gets 204."""
    proxy = await proxy_factory()
    data = body(6 * MiB)
    url = await new_upload(proxy, len(data))
    resp = await proxy.patch(url, data=io.BytesIO(data[: 5 * MiB + 1]), headers=patch_headers(0))
    assert resp.status == 204
    upload = tus_url.verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
    state_key = upload.prefix + "state"
    before = await asyncio.to_thread(s3.get_object, Bucket=bucket, Key=state_key)
    saved = before["Body"].read()
    offset = 5 * MiB + 1
    resp = await proxy.patch(url, data=io.BytesIO(data[offset:]), headers=patch_headers(offset))
    assert resp.status == 204
    await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=state_key, Body=saved)
    assert await offset_of(proxy, url) == offset
    resp = await proxy.patch(url, data=io.BytesIO(data[offset:]), headers=patch_headers(offset))
    assert resp.status == 204 and resp.headers["Upload-Offset"] == str(len(data))
    assert await read_object_async(s3, bucket, upload.key) == data
    assert await reserved(s3, bucket) == []


async def test_the_webhook_hears_of_the_completed_upload_once(
    proxy_factory: ProxyFactory, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    server, got = await receiver(aiohttp_server, 204)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")), webhook_secret=SECRET_HOOK
    )
    data = body(250 * KiB)
    url = await new_upload(proxy, len(data))
    for start in range(0, len(data), 100 * KiB):
        resp = await proxy.patch(
            url, data=data[start : start + 100 * KiB], headers=patch_headers(start)
        )
        assert resp.status == 204
    [event] = got
    assert event["signed"] and event["body"]["event"] == "upload.completed"
    [stored] = event["body"]["files"]
    assert stored["key"] == await stored_key(s3, bucket)
    assert stored["size"] == len(data) and stored["content_type"] == "application/pdf"
    crc = Crc(Algorithm.CRC64NVME)
    crc.update(data)
    assert stored["checksum"]["value"] == crc.b64()


async def test_a_failing_webhook_rolls_the_upload_back(
    proxy_factory: ProxyFactory, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    server, got = await receiver(aiohttp_server, 500)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")), webhook_secret=SECRET_HOOK, webhook_attempts=1
    )
    url = await new_upload(proxy, 1000)
    resp = await proxy.patch(url, data=body(1000), headers=patch_headers(0))
    assert resp.status == 502 and (await resp.json())["error"]["code"] == "WEBHOOK_FAILED"
    assert await objects(s3, bucket) == []
    # as /upload's rollback: the receiver may have got upload.completed, so it is told
    completed, rolled = (e["body"] for e in got)
    assert (completed["event"], rolled["event"]) == ("upload.completed", "upload.rolled_back")
    assert rolled["keys"] == [completed["files"][0]["key"]]
    assert rolled["reason"] == "WEBHOOK_FAILED"
    from tests.test_metrics import scrape, value

    samples = await scrape(proxy)  # aborted for the webhook, never completed
    assert value(samples, "s3proxy_uploads_completed_total") == 0
    assert value(samples, "s3proxy_bytes_stored_total") == 0
    assert value(samples, "s3proxy_uploads_aborted_total", reason="WEBHOOK_FAILED") == 1


async def test_the_type_is_checked_once_tiny_patches_bring_the_first_bytes(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """--allow-type on the file's first 64 KiB even when they come in 1 KiB PATCHes: the
    PATCH that completes them is refused, and none of its bytes is kept."""
    proxy = await proxy_factory(allow_type=("application/pdf",))
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 400
    url = await new_upload(proxy, len(png))
    for start in range(0, 63 * KiB, 21 * KiB):
        resp = await proxy.patch(
            url, data=png[start : start + 21 * KiB], headers=patch_headers(start)
        )
        assert resp.status == 204
    resp = await proxy.patch(url, data=png[63 * KiB : 65 * KiB], headers=patch_headers(63 * KiB))
    assert resp.status == 415 and (await resp.json())["error"]["code"] == "TYPE_NOT_ALLOWED"
    assert await offset_of(proxy, url) == 63 * KiB
    resp = await proxy.delete(url, headers=TUS_HEADERS)
    assert resp.status == 204


async def test_a_renewal_in_flight_at_the_commit_does_not_lose_the_patchs_lock(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """Regression (the bench's 423s): the body ends while the lock renewal's swap is in
    flight (S3 applied it, its answer is slow); the commit must not cancel it and then
    fail on the stale ETag. The PATCH gets 204 and the next HEAD is not locked."""
    data = body(400 * KiB)
    armed = False
    in_flight = asyncio.Event()

    def slow_renewal(op: str, _: int) -> Fault | None:
        nonlocal armed
        if op == "PutObject" and armed and not in_flight.is_set():
            in_flight.set()  # the first state swap after the renewal period: a renewal
            return Fault(late=0.5)
        return None

    async with FaultyS3(moto.endpoint_url, slow_renewal) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, tus_lock_lease=0.6)
        url = await new_upload(proxy, len(data))

        async def stream() -> Any:
            nonlocal armed
            yield data[: 100 * KiB]
            await asyncio.sleep(0.1)
            armed = True  # the renewal (every 0.2 s) is next to reach S3
            await asyncio.wait_for(in_flight.wait(), 5)
            await asyncio.sleep(0.05)  # its swap is at S3, the answer 0.5 s away
            yield data[100 * KiB : 300 * KiB]

        resp = await proxy.patch(url, data=stream(), headers=patch_headers(0))
        assert resp.status == 204, await resp.text()
        assert resp.headers["Upload-Offset"] == str(300 * KiB)
        assert await offset_of(proxy, url) == 300 * KiB  # not 423: no lock left behind
        resp = await proxy.patch(url, data=data[300 * KiB :], headers=patch_headers(300 * KiB))
        assert resp.status == 204, await resp.text()
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data


async def test_sequential_patches_each_longer_than_the_renewal_period_all_succeed(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """Several PATCHes, each streaming over several renewals whose swaps answer slowly
    (S3 applied them): every one commits, and HEAD between them answers, never 423."""
    data = body(400 * KiB)
    cuts = [0, 100 * KiB, 200 * KiB, 300 * KiB, len(data)]

    def slow_swaps(op: str, _: int) -> Fault | None:
        return Fault(late=0.15) if op == "PutObject" else None

    async with FaultyS3(moto.endpoint_url, slow_swaps) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, tus_lock_lease=0.6)
        url = await new_upload(proxy, len(data))
        for start, end in itertools.pairwise(cuts):

            async def stream(start: int = start, end: int = end) -> Any:
                for i in range(start, end, 10 * KiB):
                    yield data[i : min(i + 10 * KiB, end)]
                    await asyncio.sleep(0.06)  # 0.6 s a PATCH: three renewal periods

            resp = await proxy.patch(url, data=stream(), headers=patch_headers(start))
            assert resp.status == 204, (start, await resp.text())
            assert resp.headers["Upload-Offset"] == str(end)
            if end < len(data):
                assert await offset_of(proxy, url) == end
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data


async def _leased(store: TusStore) -> Lease:
    created = (await store.create(TusState(key=store.upload.key))).etag
    found = await store.read()
    assert found is not None and found[1] == created
    lease = Lease(store, found[0], seconds=60, skew=0)
    await lease.take(created)
    return lease


def seven_staged(store: TusStore) -> TusState:
    """A state after a PATCH of 7 bytes (a state adds up: its offset is its segments')."""
    return TusState(
        key=store.upload.key, offset=7, segments=[Segment(store.upload.prefix + "seg/0", 0, 7)]
    )


async def test_a_commit_recognises_its_own_swap_whose_answer_was_lost() -> None:
    """A swap of the lease landed at S3 but its answer never came (a timeout): the lease's
    ETag is stale, yet the state carries its owner, so the commit goes through."""
    store = TusStore(MemoryS3(), UPLOAD)
    lease = await _leased(store)
    landed = dataclasses.replace(lease.state, lock=Lock(lease.owner, time.time() + 60))
    await store.swap(landed, lease.etag)  # the lease never learns this ETag
    assert await lease.commit(seven_staged(store)) == 7
    found = await store.read()
    assert found is not None and found[0].offset == 7 and found[0].lock is None


async def test_a_commit_that_really_lost_its_lock_is_logged_and_drops_no_other_lock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another PATCH took the lock over: the commit is 423, logged with the upload id, and
    the release leaves the other owner's lock alone."""
    store = TusStore(MemoryS3(), UPLOAD)
    lease = await _leased(store)
    other = dataclasses.replace(lease.state, lock=Lock("another-patch", time.time() + 60))
    await store.swap(other, lease.etag)
    with caplog.at_level(logging.WARNING, "s3proxy.tus"), pytest.raises(ProxyError) as err:
        await lease.commit(seven_staged(store))
    assert err.value.kind.code == "UPLOAD_LOCKED"
    assert f"tus.commit_lost_lock id={store.upload.id}" in caplog.text
    await lease.release()
    found = await store.read()
    assert found is not None and found[0].lock == other.lock and found[0].offset == 0


async def test_a_confirm_renews_the_lock_or_is_423_once_another_holds_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``Lease.confirm``, before a PATCH writes the upload's object: a swap that renews
    the lock while it is the lease's; 423 once another request changed the state (and
    every later confirm too, with no S3 call), leaving the other's lock alone."""
    store = TusStore(MemoryS3(), UPLOAD)
    lease = await _leased(store)
    before = lease.etag
    await lease.confirm()
    found = await store.read()
    assert found is not None and found[1] == lease.etag != before
    assert found[0].lock is not None and found[0].lock.owner == lease.owner
    other = dataclasses.replace(found[0], lock=Lock("another-patch", time.time() + 60))
    await store.swap(other, found[1])
    with caplog.at_level(logging.WARNING, "s3proxy.tus"):
        for _ in range(2):
            with pytest.raises(ProxyError) as err:
                await lease.confirm()
            assert err.value.kind.code == "UPLOAD_LOCKED"
    assert lease.lost
    assert f"tus.store_lost_lock id={store.upload.id}" in caplog.text
    await lease.release()
    found = await store.read()
    assert found is not None and found[0].lock == other.lock


async def test_a_failed_patchs_release_recognises_its_own_lock() -> None:
    """The release after a failed PATCH, over a stale ETag of its own lock: the lock goes,
    so the client's retry is not 423 for the lease."""
    store = TusStore(MemoryS3(), UPLOAD)
    lease = await _leased(store)
    landed = dataclasses.replace(lease.state, lock=Lock(lease.owner, time.time() + 60))
    await store.swap(landed, lease.etag)
    await lease.release()
    found = await store.read()
    assert found is not None and found[0].lock is None


async def test_a_failed_patch_is_not_an_aborted_upload(proxy_factory: ProxyFactory) -> None:
    """A PATCH refused 460 left the upload resumable, yet counted it aborted; completed
    on the next PATCH, it was counted both ways. Aborted now means ended without a file."""
    import base64
    import hashlib

    from tests.test_metrics import scrape, value

    proxy = await proxy_factory()
    data = body(1000)
    url = await new_upload(proxy, len(data))
    wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    resp = await proxy.patch(
        url, data=data, headers=patch_headers(0, **{"Upload-Checksum": f"sha1 {wrong}"})
    )
    assert resp.status == 460
    assert (await proxy.patch(url, data=data, headers=patch_headers(0))).status == 204
    ended = await new_upload(proxy, 10)
    assert (await proxy.delete(ended, headers=TUS_HEADERS)).status == 204
    samples = await scrape(proxy)
    assert value(samples, "s3proxy_uploads_started_total") == 2
    assert value(samples, "s3proxy_uploads_completed_total") == 1
    aborted = {k[1]: v for k, v in samples.items() if k[0] == "s3proxy_uploads_aborted_total"}
    assert aborted == {frozenset({("reason", "TERMINATED")}): 1}
    failed = value(samples, "s3proxy_tus_patches_failed_total", reason="CHECKSUM_MISMATCH")
    assert failed == 1


def landed_but_failed(late: bool) -> Fault:
    """The write lands at S3; its answer comes after the read timeout, or as a 500."""
    if late:
        return Fault(late=1.0)

    def error(resp: Any) -> None:
        resp.set_status(500)
        resp.body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"

    return Fault(answer=error)


@pytest.mark.parametrize("late", [True, False], ids=["late-once", "500-every-attempt"])
async def test_a_patch_whose_lock_swap_landed_unseen_goes_on(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str, late: bool
) -> None:
    """The PATCH's lock swap landed but its answer was lost (late once: the retry is
    refused 412 by the swap itself; or 500 on every attempt): the state carries its owner,
    so the PATCH has the lock and goes on. Before, 423 (or 502) and then 423 for every
    retry during the lease and the clock skew (≈90 s in the faults probe)."""
    swaps: list[str] = []  # the state writes once the upload is made

    def rule(op: str, n: int) -> Fault | None:
        if op != "PutObject:state" or armed is False:
            return None
        swaps.append(op)
        return landed_but_failed(late) if len(swaps) <= (1 if late else 3) else None

    armed = False
    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_read_timeout=0.5, s3_max_attempts=3)
        data = body(1000)
        url = await new_upload(proxy, len(data))
        armed = True
        resp = await proxy.patch(url, data=data[:400], headers=patch_headers(0))
        assert resp.status == 204, await resp.text()
        assert len(swaps) == (3 if late else 4)  # the lock's attempts, then the commit
        resp = await proxy.patch(url, data=data[400:], headers=patch_headers(400))
        assert resp.status == 204, await resp.text()
    assert await read_object_async(s3, bucket, resp.headers["S3Proxy-Key"]) == data
    assert await reserved(s3, bucket) == []


@pytest.mark.parametrize("fault", ["abort", "swap-late"])
async def test_a_retried_delete_carries_on_a_failed_termination(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str, fault: str
) -> None:
    """A DELETE whose abort failed (502), or whose lock swap landed with its answer lost:
    the client's retried DELETE removes the upload at once. Before, every DELETE got 423
    "a PATCH is in progress" for the lease and the clock skew (90 s), though none was.
    Meanwhile the upload is terminated for every request: HEAD and PATCH are 404 (before,
    HEAD answered its offset and a PATCH 423, then took the upload over once the
    termination's lock lapsed)."""
    armed = False

    def rule(op: str, n: int) -> Fault | None:
        if not armed:
            return None
        if fault == "abort" and op == "AbortMultipartUpload":
            return Fault(status=500)
        if fault == "swap-late" and op == "PutObject:state":
            return Fault(late=1.0)
        return None

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_read_timeout=0.5, s3_max_attempts=2)
        url, _ = await six_of_seven_mib(proxy)
        armed = True
        first = await proxy.delete(url, headers=TUS_HEADERS)
        if fault == "abort":
            assert first.status == 502, await first.text()
        armed = False
        head = await proxy.head(url, headers=TUS_HEADERS)
        assert head.status == 404, head.headers
        resp = await proxy.patch(url, data=b"x", headers=patch_headers(6 * MiB))
        assert resp.status == 404, await resp.text()
        if first.status != 204:
            retried = await proxy.delete(url, headers=TUS_HEADERS)
            assert retried.status == 204, await retried.text()
        assert (await proxy.head(url, headers=TUS_HEADERS)).status == 404
    assert await open_uploads_async(s3, bucket) == []
    assert await reserved(s3, bucket) == []


async def _rollback_owed(
    proxy_factory: ProxyFactory,
    aiohttp_server: Any,
    moto: Any,
    lease: float,
    interval: float,
    swap: bool = False,
) -> tuple[Any, TestClient[Any, Any], Any, dict[str, bool], list[dict[str, Any]], str]:
    """An upload whose webhook failed (502) and whose rollback delete failed too (S3
    refuses every DeleteObject until the test lifts it): the rollback is owed to the
    janitor, the object still stored. With ``swap``, the
    rollback's swap of the state (its FAILED mark) failed as well, and its fault stays
    armed until the test lifts it."""
    status = {"hook": 500}
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(json.loads(await request.read()))
        if status["hook"] >= 500:
            faults["swap"] = swap  # from the failed completion on: the rollback's swap fails
        return web.Response(status=status["hook"])

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    faults = {"delete": True, "swap": False}

    def rule(op: str, n: int) -> Fault | None:
        if faults["delete"] and op.startswith("DeleteObject"):  # the object's, the state's
            return Fault(status=500)
        if faults["swap"] and op == "PutObject:state":
            return Fault(status=500)
        return None

    faulty = FaultyS3(moto.endpoint_url, rule, name=tus_operation)
    await faulty.__aenter__()
    proxy = await proxy_factory(
        endpoint_url=faulty.endpoint_url,
        s3_max_attempts=1,
        webhook_url=str(server.make_url("/hook")),
        webhook_secret=SECRET_HOOK,
        webhook_attempts=1,
        tus_lock_lease=lease,
        cleanup_clock_skew=0,
    )
    proxy.app[STATE].janitor.interval = interval
    url = await new_upload(proxy, 1000)
    resp = await proxy.patch(url, data=body(1000), headers=patch_headers(0))
    assert resp.status == 502 and (await resp.json())["error"]["code"] == "WEBHOOK_FAILED"
    status["hook"] = 204
    return faulty, proxy, status, faults, got, url


async def test_an_upload_whose_rollback_is_owed_is_told_at_once_it_failed(
    proxy_factory: ProxyFactory, aiohttp_server: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """The webhook failed (502) and so did the rollback's delete: the object is still
    stored while the janitor owes its delete (retried at 5, 10, 15 ... 60 s). Before, the
    rollback held the upload's lock all that while: HEAD said offset 0 and a retried PATCH
    or DELETE got 423, so tus-js-client (retrying at 0/1/3/5 s) gave up on a "locked"
    upload. Now the state says FAILED from the rollback's first swap: HEAD, PATCH and DELETE
    are 404 at once, as once the rollback is done, and the object goes when S3 deletes
    again; the webhook heard of it once."""
    faulty, proxy, _, faults, got, url = await _rollback_owed(
        proxy_factory, aiohttp_server, moto, lease=30, interval=0.3
    )
    try:
        head = await proxy.head(url, headers=TUS_HEADERS)
        assert head.status == 404, head.headers
        retry = await proxy.patch(url, data=body(1000), headers=patch_headers(0))
        assert retry.status == 404, await retry.text()
        assert "webhook failed" in (await retry.json())["error"]["message"]
        delete = await proxy.delete(url, headers=TUS_HEADERS)
        assert delete.status == 404, await delete.text()
        assert len(await objects(s3, bucket)) == 2  # the object, and its state: still owed
        faults["delete"] = False
        await eventually(
            lambda: not proxy.app[STATE].janitor._tasks, within=10, what="the owed rollback"
        )
        assert await objects(s3, bucket) == [] and await reserved(s3, bucket) == []
        again = await proxy.patch(url, data=body(1000), headers=patch_headers(0))
        assert again.status == 404
        assert [e["event"] for e in got].count("upload.completed") == 1
    finally:
        await faulty.__aexit__(None, None, None)


async def test_an_owed_rollback_deletes_its_object_after_the_lock_expired(
    proxy_factory: ProxyFactory, aiohttp_server: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """The completing PATCH's lock expired while the rollback was owed. Before, a retried
    PATCH then completed the upload again (the webhook told a second time) and the failed
    upload's object was kept. Now the state says FAILED: the retry is 404, and the owed
    rollback deletes the object: nothing of a failed upload is kept."""
    faulty, proxy, _, faults, got, url = await _rollback_owed(
        proxy_factory,
        aiohttp_server,
        moto,
        lease=0.5,
        interval=60,  # the lock expires first
    )
    janitor = proxy.app[STATE].janitor
    try:
        await asyncio.sleep(0.7)
        retry = await proxy.patch(url, data=body(1000), headers=patch_headers(0))
        assert retry.status == 404, await retry.text()
        faults["delete"] = False
        await janitor.close()  # the owed rollback's last try
        assert await objects(s3, bucket) == [] and await reserved(s3, bucket) == []
        assert [e["event"] for e in got].count("upload.completed") == 1
    finally:
        await faulty.__aexit__(None, None, None)


async def test_a_retry_that_completes_before_the_rollback_could_mark_it_keeps_its_object(
    proxy_factory: ProxyFactory, aiohttp_server: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """The rollback could not even swap the state (FAILED) until the completing PATCH's
    lock expired (it retries that mark every third of the lease: only S3 refusing it so
    long lets a retry in), a retried PATCH completes the upload again, the webhook (back
    now) is told, 204. Its state's removal fails too, so the retry notes the state
    COMPLETED (HEAD says complete); the janitor's owed rollback then finds the upload
    completed and keeps the object that PATCH reported."""
    lease = 3.0
    faulty, proxy, _, faults, got, url = await _rollback_owed(
        proxy_factory, aiohttp_server, moto, lease=lease, interval=60, swap=True
    )
    janitor = proxy.app[STATE].janitor
    try:
        await asyncio.sleep(lease + 0.2)  # the lock expires, the mark still refused
        tries = faulty.calls.count("PutObject:state")
        await eventually(  # S3 takes the mark again just after a try: the next is lease/3 on
            lambda: faulty.calls.count("PutObject:state"),
            until=lambda n: n > tries,
            within=lease,
            what="the rollback's next try",
        )
        faults["swap"] = False
        retry = await proxy.patch(url, data=body(1000), headers=patch_headers(0))
        assert retry.status == 204, await retry.text()
        head = await proxy.head(url, headers=TUS_HEADERS)  # its state's removal is owed too
        assert head.headers["Upload-Offset"] == head.headers["Upload-Length"] == "1000"
        faults["delete"] = False
        await janitor.close()  # the owed rollback's last try: it finds the upload completed
        assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == body(1000)
        assert await reserved(s3, bucket) == []
        assert [e["event"] for e in got].count("upload.completed") == 2  # at least once
    finally:
        await faulty.__aexit__(None, None, None)


@pytest.mark.parametrize("refusal", ["checksum", "webhook"])
async def test_a_refused_creation_with_upload_ends_once_in_the_metrics(
    proxy_factory: ProxyFactory, aiohttp_server: Any, s3: Any, bucket: str, refusal: str
) -> None:
    """A creation whose body is refused (460 here) leaves nothing and gives no Location:
    the upload it started ends there, aborted, once (it was counted started and never
    ended); one whose webhook failed is counted aborted by the rollback, not twice."""
    from tests.test_metrics import scrape, value

    server, _ = await receiver(aiohttp_server, 500)
    hook = {"webhook_url": str(server.make_url("/hook")), "webhook_secret": SECRET_HOOK}
    proxy = await proxy_factory(webhook_attempts=1, **(hook if refusal == "webhook" else {}))
    headers = {
        **TUS_HEADERS,
        "Upload-Length": "1000",
        "Content-Type": "application/offset+octet-stream",
    }
    if refusal == "checksum":
        headers["Upload-Checksum"] = "sha1 " + base64.b64encode(b"x" * 20).decode()
    resp = await proxy.post("/tus/", data=body(1000), headers=headers)
    expected = (460, "CHECKSUM_MISMATCH") if refusal == "checksum" else (502, "WEBHOOK_FAILED")
    assert (resp.status, (await resp.json())["error"]["code"]) == expected
    assert "Location" not in resp.headers
    assert await objects(s3, bucket) == []
    samples = await scrape(proxy)
    assert value(samples, "s3proxy_uploads_started_total") == 1
    assert value(samples, "s3proxy_uploads_aborted_total", reason=expected[1]) == 1
    assert value(samples, "s3proxy_uploads_completed_total") == 0
