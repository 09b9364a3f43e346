"""The expiry sweep and a PATCH still running on an expired upload: the sweep leaves an
upload whose lock is live (it goes once the lock is released or lapses); an expired upload
that failed loses its object too."""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from typing import Any

import pytest

from s3proxy import tus_url
from s3proxy.app import sweep_once
from s3proxy.cleanup import Rule, ends_by_expiry, sweep_tus
from s3proxy.state import STATE
from s3proxy.tus import TUS
from s3proxy.tus_keys import KEY_OBJECT
from s3proxy.tus_lease import Lease
from s3proxy.tus_state import COMPLETED, FAILED, TERMINATING, TUS_META, Lock, TusState, TusStore
from tests.conftest import ProxyFactory
from tests.faults import Fault, FaultyS3
from tests.s3util import all_keys_async, open_uploads_async
from tests.test_tus_lifecycle import new_upload, six_of_seven_mib


async def test_the_sweep_skips_an_expired_upload_a_patch_holds(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    url, _ = await six_of_seven_mib(proxy)
    sink = proxy.app[STATE].require_sink()
    upload = tus_url.verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
    store = TusStore(sink, upload)
    found = await store.read()
    assert found is not None
    lease = Lease(store, found[0], 3 * 86400, 0)
    await lease.take(found[1])
    later = upload.expires + 10  # expired, the lock live (a PATCH begun before)
    kept = await sweep_tus(sink, dry_run=False, now=later, skew=0)
    assert kept.removed == []
    assert len(await open_uploads_async(s3, bucket)) == 1
    await lease.release()
    gone = await sweep_tus(sink, dry_run=False, now=later, skew=0)
    assert len(gone.removed) == 1
    assert await open_uploads_async(s3, bucket) == []
    assert await all_keys_async(s3, bucket) == [KEY_OBJECT]  # the URL key stays


async def test_the_sweep_removes_an_expired_upload_whose_state_is_unreadable(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """A state corrupted at rest answered 502 to every request, and the sweep logged
    'action=failed' for it at every pass, for ever: it is removed once expired, and its
    multipart upload (no longer named) is the orphan sweep's."""
    proxy = await proxy_factory()
    url, _ = await six_of_seven_mib(proxy)
    sink = proxy.app[STATE].require_sink()
    upload = tus_url.verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
    state_key = TusStore(sink, upload).state_key
    raw = s3.get_object(Bucket=bucket, Key=state_key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=state_key, Body=raw.replace(b'"offset":', b'"offset":1'))
    assert (await proxy.head(url, headers={"Tus-Resumable": "1.0.0"})).status == 502
    gone = await sweep_tus(sink, dry_run=False, now=upload.expires + 10, skew=0)
    assert gone.removed == [upload.prefix.removeprefix(tus_url.RESERVED_PREFIX).strip("/")]
    assert await all_keys_async(s3, bucket) == [KEY_OBJECT]
    [left] = await open_uploads_async(s3, bucket)  # unnamed now: the orphan sweep's
    s3.abort_multipart_upload(Bucket=bucket, Key=left["Key"], UploadId=left["UploadId"])


@pytest.mark.parametrize("owner", ["this", "another"])
async def test_the_sweep_deletes_the_object_of_an_expired_failed_upload(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, owner: str
) -> None:
    """An upload rolled back (its state says FAILED) whose object's delete never went
    through (its instance gave up or died): before, the sweep removed its state and kept
    the object of a failed upload for ever. Now it deletes the object too, if this upload
    made it (its id in the metadata): never another upload's object at that key."""
    proxy = await proxy_factory()
    sink = proxy.app[STATE].require_sink()
    url = await new_upload(proxy, 1000)
    upload = tus_url.verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
    store = TusStore(sink, upload)
    found = await store.read()
    assert found is not None
    await store.swap(dataclasses.replace(found[0], ending=FAILED), found[1])
    made_by = upload.id if owner == "this" else "another-upload"
    s3.put_object(Bucket=bucket, Key=upload.key, Body=b"x" * 1000, Metadata={TUS_META: made_by})
    gone = await sweep_tus(sink, dry_run=False, now=upload.expires + 10, skew=0)
    assert len(gone.removed) == 1
    left = [KEY_OBJECT] if owner == "this" else sorted([KEY_OBJECT, upload.key])
    assert sorted(await all_keys_async(s3, bucket)) == left


@pytest.mark.parametrize(
    ("state", "came_back", "ends"),
    [
        (TusState(key="k"), False, True),  # never PATCHed: it ends by expiring
        (TusState(key="k", offset=5), False, True),  # resumable: the same
        (TusState(key="k", lock=Lock(TERMINATING, 0.0)), False, True),  # DELETE not done
        (TusState(key="k", ending=COMPLETED), False, False),  # counted completed
        (TusState(key="k", ending=FAILED), False, False),  # counted aborted
        (TusState(key="k"), True, False),  # come back after it completed
        (None, False, False),  # only what landed after its removal
    ],
)
def test_which_expired_removals_end_an_upload(
    state: TusState | None, came_back: bool, ends: bool
) -> None:
    """Each started upload ends once in the metrics: the sweep counts UPLOAD_EXPIRED only
    for an upload that had not ended before."""
    assert ends_by_expiry(state, came_back) is ends


async def _one_pass(proxy: Any, now: float) -> dict[frozenset[tuple[str, str]], float]:
    """One sweep as the scheduled loop makes it; the aborted counts by reason after it."""
    from tests.test_metrics import scrape

    state = proxy.app[STATE]
    rule = Rule(timedelta(seconds=3600), by_activity=True)
    await sweep_once(state.require_sink(), state.settings, state.metrics, rule, now)
    samples = await scrape(proxy)
    return {k[1]: v for k, v in samples.items() if k[0] == "s3proxy_uploads_aborted_total" and v}


async def test_expired_uploads_are_counted_though_the_orphan_sweep_fails(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """The soak probe's 2 started uploads that never ended: the sweep removed them, then
    ListMultipartUploads was refused (500) and the pass's counts were dropped with it.
    The removals are counted once they are done."""
    refused = lambda op, n: Fault(status=500) if op == "ListMultipartUploads" else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, refused) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_max_attempts=1)
        url = await new_upload(proxy, 1000)
        upload = tus_url.verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
        aborted = await _one_pass(proxy, upload.expires + 10)
        assert "ListMultipartUploads" in faulty.calls
    assert aborted == {frozenset({("reason", "UPLOAD_EXPIRED")}): 1}
    assert await all_keys_async(s3, bucket) == [KEY_OBJECT]


async def test_a_state_come_back_after_its_upload_completed_is_not_counted_again(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """A creation's state write that landed after its zero-length upload completed made
    the state again (the soak probe): swept at expiry it was counted aborted
    UPLOAD_EXPIRED too, one upload ending twice. It is removed, not counted."""
    proxy = await proxy_factory()
    resp = await proxy.post("/tus/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "0"})
    assert resp.status == 201, await resp.text()
    upload = tus_url.verify(
        resp.headers["Location"].removeprefix("/tus/"), proxy.app[TUS].keys, time.time()
    )
    store = TusStore(proxy.app[STATE].require_sink(), upload)
    await store.create(TusState(key=upload.key))  # as the late write makes it
    aborted = await _one_pass(proxy, upload.expires + 10)
    assert aborted == {}
    assert sorted(await all_keys_async(s3, bucket)) == sorted([KEY_OBJECT, upload.key])
