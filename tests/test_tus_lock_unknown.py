"""A tus lock swap, commit or release whose outcome S3 trouble hides (the swap's answer
lost, then the state unreadable): answered as the S3 error it is (5xx), never as another
request's win (423), and the lock, which may be in the state, given back in the
background once S3 answers again (reprobe18b), not left to lapse after the lease."""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from s3proxy import tus_url
from s3proxy.errors import UPSTREAM_UNAVAILABLE, ProxyError
from s3proxy.janitor import Janitor
from s3proxy.s3 import NoSuchKey, PreconditionFailed, refusal
from s3proxy.state import STATE
from s3proxy.tus import TUS
from s3proxy.tus_lease import (
    UNREAD,
    Lease,
    Outcome,
    Unread,
    give_back_every,
    holds,
    lapsed,
    s3_error,
    settle,
    watch_times,
)
from s3proxy.tus_state import Lock, TusState, TusStore
from tests.conftest import ProxyFactory
from tests.faults import Fault, FaultyS3, tus_operation
from tests.memory_s3 import MemoryS3
from tests.polling import eventually
from tests.s3util import read_object_async
from tests.test_tus import body, reserved
from tests.test_tus_lifecycle import new_upload, offset_of, patch_headers
from tests.test_tus_units import UPLOAD

LEASE = 30.0  # the default --tus-lock-lease: every wait here must stay far below it
UNAVAILABLE = Fault(status=503, code="SlowDown")  # S3 asking to slow down: 503 at the proxy


def state_store(proxy: TestClient[Any, Any], url: str) -> TusStore:
    upload = tus_url.verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
    return TusStore(proxy.app[STATE].require_sink(), upload)


async def state_of(store: TusStore) -> TusState:
    found = await store.read()
    assert found is not None
    return found[0]


async def faulty_upload(
    proxy_factory: ProxyFactory, faulty: FaultyS3
) -> tuple[TestClient[Any, Any], bytes, str]:
    """A proxy in front of ``faulty`` (short S3 timeouts, 2 attempts) and a new 1,000-byte
    upload on it: (proxy, the upload's bytes, its URL)."""
    proxy = await proxy_factory(faulty.endpoint_url, s3_read_timeout=0.5, s3_max_attempts=2)
    data = body(1000)
    return proxy, data, await new_upload(proxy, len(data))


async def unlocked(store: TusStore) -> TusState | None:
    state = await state_of(store)
    return state if state.lock is None else None


class Schedule:
    """The state calls a test's rule sees once ``armed``, counted per operation."""

    def __init__(self) -> None:
        self.armed = False
        self.seen: dict[str, int] = {}

    def count(self, op: str) -> int:
        self.seen[op] = self.seen.get(op, 0) + 1
        return self.seen[op]


async def test_a_lock_swap_that_landed_unseen_and_cannot_be_read_back_is_a_503(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """The lock swap lands, its answer is lost, the retry is refused 412 by it, and the
    state cannot be read back (503 twice): the PATCH is 503, not 423 "another request
    changed this upload first"; the lock it may have left is given back in the
    background once S3 answers, so the next PATCH is 204 within seconds, not after the
    30 s lease (before: 423 for every PATCH and DELETE for the lease and the skew)."""
    schedule = Schedule()

    def rule(op: str, _: int) -> Fault | None:
        if not schedule.armed or op not in ("PutObject:state", "GetObject:state"):
            return None
        if op == "PutObject:state":  # the lock swap: S3 stores it, the answer is lost
            return Fault(late=1.0) if schedule.count(op) == 1 else None
        if "PutObject:state" not in schedule.seen:
            return None  # the PATCH's own read of the state, before the lock
        return UNAVAILABLE if schedule.count(op) <= 2 else None  # the read-back

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy, data, url = await faulty_upload(proxy_factory, faulty)
        store = state_store(proxy, url)
        before = await state_of(store)
        schedule.armed = True
        resp = await proxy.patch(url, data=data[:400], headers=patch_headers(0))
        answered = time.monotonic()
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["error"]["code"] == "UPSTREAM_UNAVAILABLE"
        assert schedule.seen == {"PutObject:state": 2, "GetObject:state": 2}
        schedule.armed = False
        after = await eventually(
            lambda: unlocked(store), within=5.0, what="the lock given back in the background"
        )
        freed = time.monotonic() - answered
        assert freed < 5.0 < LEASE
        assert after == before  # the lock went, and nothing else changed
        resp = await proxy.patch(url, data=data[:400], headers=patch_headers(0))
        assert resp.status == 204, await resp.text()
        assert resp.headers["Upload-Offset"] == "400"
        resp = await proxy.patch(url, data=data[400:], headers=patch_headers(400))
        assert resp.status == 204, await resp.text()
    assert await read_object_async(s3, bucket, resp.headers["S3Proxy-Key"]) == data
    assert await reserved(s3, bucket) == []


@pytest.mark.parametrize("read_back", ["read", "unreadable"])
async def test_a_lock_swap_held_on_its_way_that_lands_after_the_answer_is_given_back(
    read_back: str,
    proxy_factory: ProxyFactory,
    moto: Any,
    s3: Any,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lock swap's first attempt is held on its way past the S3 timeout, its retry
    fails (500), and the state read back has no lock ("read": the swap failed) or cannot
    be read ("unreadable": unknown): the PATCH is a 5xx. Then the held attempt lands (its
    If-Match still matches): the upload is locked by a PATCH that has ended. The state is
    looked at every give-back period until the lease lapses, not only until a first look
    finds no lock, and the lock given back: the next PATCH is 204 within seconds. Before,
    every PATCH and DELETE was 423 for the 30 s lease and the clock skew (found by an S3
    chaos run: a client gave up on an upload S3 had completed)."""
    caplog.set_level(logging.INFO, logger="s3proxy.tus")
    schedule = Schedule()

    def rule(op: str, _: int) -> Fault | None:
        if not schedule.armed:
            return None
        if op == "GetObject:state":  # the read-back, once the swap failed
            failing = read_back == "unreadable" and schedule.seen.get("PutObject:state") == 2
            return UNAVAILABLE if failing and schedule.count(op) <= 2 else None
        if op != "PutObject:state":
            return None
        n = schedule.count(op)
        if n == 1:
            # Held on its way, forwarded once the proxy gave up, after a first look at the
            # state found no lock (the read-back, or the janitor a second after it).
            return Fault(delay=4.0)
        return Fault(status=500) if n == 2 else None  # the retry fails

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy, data, url = await faulty_upload(proxy_factory, faulty)
        store = state_store(proxy, url)
        before = await state_of(store)
        schedule.armed = True
        resp = await proxy.patch(url, data=data[:400], headers=patch_headers(0))
        answered = time.monotonic()
        assert resp.status in (502, 503), await resp.text()
        assert (await resp.json())["error"]["code"].startswith("UPSTREAM_")
        given_back = await eventually(
            lambda: [r.message for r in caplog.records if "by=janitor" in r.message],
            until=bool,
            within=10.0,
            what="the held swap, landed, given back",
        )
        assert time.monotonic() - answered < 10.0 < LEASE
        assert len(given_back) == 1 and "tus.lock_released" in given_back[0], given_back
        schedule.armed = False
        assert await unlocked(store) == before
        resp = await proxy.patch(url, data=data, headers=patch_headers(0))
        assert resp.status == 204, await resp.text()
    assert await read_object_async(s3, bucket, resp.headers["S3Proxy-Key"]) == data
    assert await reserved(s3, bucket) == []


async def test_a_commit_that_landed_unseen_and_cannot_be_read_back_is_a_503(
    proxy_factory: ProxyFactory, moto: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The commit swap lands, its answer is lost, the retry is refused 412 by it, and the
    read-back fails (503 twice): the outcome is unknown, so the PATCH is 503 (the client
    HEADs and resumes from the real offset), not 423 "this PATCH lost its lock" with a
    ``tus.commit_lost_lock`` line for a commit that landed; the next PATCH goes on at once."""
    schedule = Schedule()

    def rule(op: str, _: int) -> Fault | None:
        if not schedule.armed or op not in ("PutObject:state", "GetObject:state"):
            return None
        if op == "PutObject:state":  # the lock, then the commit
            return Fault(late=1.0) if schedule.count(op) == 2 else None
        if schedule.seen.get("PutObject:state", 0) < 2:
            return None  # not yet the commit's
        # the commit's own check of the 412 reads first (no lock: it is not the lease's
        # lock any more), then the commit's read-back, which fails
        return UNAVAILABLE if schedule.count(op) in (2, 3) else None

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy, data, url = await faulty_upload(proxy_factory, faulty)
        schedule.armed = True
        with caplog.at_level(logging.INFO, "s3proxy.tus"):
            resp = await proxy.patch(url, data=data[:400], headers=patch_headers(0))
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["error"]["code"] == "UPSTREAM_UNAVAILABLE"
        # then the release: its swap refused 412 too, its read shows no lock of its own
        assert schedule.seen == {"PutObject:state": 4, "GetObject:state": 4}
        assert "tus.commit_lost_lock" not in caplog.text
        schedule.armed = False
        assert await offset_of(proxy, url) == 400  # the commit landed
        resp = await proxy.patch(url, data=data[400:], headers=patch_headers(400))
        assert resp.status == 204, await resp.text()
        assert resp.headers["Upload-Offset"] == "1000"


async def test_a_failed_patchs_release_that_s3_refuses_is_given_back_in_the_background(
    proxy_factory: ProxyFactory, moto: Any
) -> None:
    """A PATCH fails (460), and S3 answers its lock release 503 on every attempt: the lock
    is given back once S3 answers again, so the next PATCH is 204 within seconds (before:
    ``tus.lock_release_failed``, then 423 until the lease lapsed)."""
    schedule = Schedule()

    def rule(op: str, _: int) -> Fault | None:
        if not schedule.armed or op != "PutObject:state":
            return None
        return UNAVAILABLE if schedule.count(op) in (2, 3) else None  # the lock goes in

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy, data, url = await faulty_upload(proxy_factory, faulty)
        store = state_store(proxy, url)
        before = await state_of(store)
        wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
        schedule.armed = True
        resp = await proxy.patch(
            url, data=data, headers=patch_headers(0, **{"Upload-Checksum": f"sha1 {wrong}"})
        )
        answered = time.monotonic()
        assert resp.status == 460, await resp.text()
        assert schedule.seen == {"PutObject:state": 3}
        schedule.armed = False
        after = await eventually(
            lambda: unlocked(store), within=5.0, what="the lock given back in the background"
        )
        assert time.monotonic() - answered < 5.0 < LEASE
        assert after == before
        resp = await proxy.patch(url, data=data, headers=patch_headers(0))
        assert resp.status == 204, await resp.text()


# --- the pure decisions ------------------------------------------------------------

OWNER = "this-lease"
MINE = TusState(key="k", lock=Lock(OWNER, 100.0))
OTHERS = TusState(key="k", lock=Lock("another-patch", 100.0))
UNLOCKED = TusState(key="k")


def is_mine(state: TusState) -> bool:
    return holds(state, OWNER)


@pytest.mark.parametrize(
    ("found", "refused", "outcome"),
    [
        (MINE, True, Outcome.HELD),  # landed, its answer lost, the retry refused by it
        (MINE, False, Outcome.HELD),  # landed, answered 500
        (OTHERS, True, Outcome.LOCKED),  # another request changed it first: 423
        (UNLOCKED, True, Outcome.LOCKED),
        (None, True, Outcome.LOCKED),  # the upload ended meanwhile
        (OTHERS, False, Outcome.FAILED),  # S3 failed it, and it did not land: its error
        (None, False, Outcome.FAILED),
        (UNREAD, True, Outcome.UNKNOWN),  # reprobe18b: was 423 "another request ... first"
        (UNREAD, False, Outcome.UNKNOWN),  # was the swap's error, the lock left for the lease
    ],
)
def test_settle(found: TusState | Unread | None, refused: bool, outcome: Outcome) -> None:
    assert settle(found, is_mine, refused) is outcome


def test_an_unknown_outcome_is_answered_with_an_s3_error_never_a_refusal() -> None:
    unavailable = refusal("GetObject", "SlowDown", 503)
    failed = refusal("PutObject", "InternalError", 500)
    assert s3_error(refusal("PutObject", "PreconditionFailed", 412), unavailable) is unavailable
    assert s3_error(refusal("PutObject", "NoSuchKey", 404), unavailable) is unavailable
    assert s3_error(failed, unavailable) is failed  # the swap's own S3 error
    assert isinstance(refusal("PutObject", "PreconditionFailed", 412), PreconditionFailed)
    assert isinstance(refusal("PutObject", "NoSuchKey", 404), NoSuchKey)
    assert unavailable.kind is UPSTREAM_UNAVAILABLE


@pytest.mark.parametrize(
    ("found", "given_back"), [(MINE, True), (OTHERS, False), (UNLOCKED, False), (None, False)]
)
def test_a_give_back_drops_only_this_leases_lock(found: TusState | None, given_back: bool) -> None:
    assert holds(found, OWNER) is given_back


@pytest.mark.parametrize(
    ("now", "skew", "done"),
    [(99.0, 0, False), (100.0, 0, False), (100.5, 0, True), (100.5, 1, False)],
)
def test_a_give_back_ends_once_the_lock_lapsed(now: float, skew: float, done: bool) -> None:
    assert lapsed(100.0, now, skew) is done


@pytest.mark.parametrize(("lease", "every"), [(30.0, 1.0), (3.0, 1.0), (0.6, 0.2)])
def test_a_give_back_is_tried_every_second_or_each_renewal(lease: float, every: float) -> None:
    assert give_back_every(lease) == pytest.approx(every)


# --- the lease over an in-memory S3 -------------------------------------------------


async def leased(memory: MemoryS3, seconds: float, janitor: Janitor | None) -> Lease:
    store = TusStore(memory, UPLOAD)
    created = (await store.create(TusState(key=UPLOAD.key))).etag
    found = await store.read()
    assert found is not None
    lease = Lease(store, found[0], seconds=seconds, skew=0, janitor=janitor)
    await lease.take(created)
    return lease


@pytest.mark.parametrize(
    ("every", "span", "times"),
    [
        (1.0, 35.0, tuple(float(i) for i in range(1, 36))),
        (1.0, 2.5, (1.0, 2.0)),
        (1.0, 0.5, ()),
        (10.0, 35.0, (10.0, 20.0, 30.0)),
        (0.0, 35.0, ()),
    ],
)
def test_a_swap_that_may_land_late_is_looked_for_until_its_lock_lapses(
    every: float, span: float, times: tuple[float, ...]
) -> None:
    assert watch_times(every, span) == times


async def test_without_a_janitor_an_unknown_lock_swap_is_still_an_s3_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lock swap is lost (S3 did it, the answer timed out) and the read-back fails:
    an S3 error, not 423; with no janitor to give the lock back, it is logged as left."""
    memory = MemoryS3()
    store = TusStore(memory, UPLOAD)
    created = (await store.create(TusState(key=UPLOAD.key))).etag
    found = await store.read()
    assert found is not None
    memory.fail("PutObject", at=memory.ops().count("PutObject") + 1, lost=True)
    memory.fail("GetObject", at=memory.ops().count("GetObject") + 1)
    lease = Lease(store, found[0], seconds=60, skew=0)
    with caplog.at_level(logging.INFO, "s3proxy.tus"), pytest.raises(ProxyError) as err:
        await lease.take(created)
    assert err.value.kind.status >= 500
    assert f"tus.lock_left id={UPLOAD.id} owner={lease.owner} reason=unknown" in caplog.text


async def test_a_background_give_back_leaves_a_lock_another_patch_took_since(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed PATCH's release fails (S3 500) and goes to the janitor; meanwhile another
    PATCH takes the upload (the lock read as ours, swapped at its ETag): the give-back
    reads the state, finds another owner's lock and leaves it."""
    memory = MemoryS3()
    janitor = Janitor()
    lease = await leased(memory, seconds=3.0, janitor=janitor)  # tried every second
    store = lease.store
    memory.fail("PutObject", at=memory.ops().count("PutObject") + 1)  # the release
    with caplog.at_level(logging.INFO):
        await lease.release()
        assert "tus.lock_give_back" in caplog.text
        found = await store.read()
        assert found is not None and holds(found[0], lease.owner)
        other = Lock("another-patch", time.time() + 60)
        await store.swap(TusState(key=UPLOAD.key, lock=other), found[1])
        await eventually(
            lambda: "cleanup.retried what=tus lock" in caplog.text,
            within=5.0,
            what="the janitor's give-back done",
        )
    found = await store.read()
    assert found is not None and found[0].lock == other
    await janitor.close()
