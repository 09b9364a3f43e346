"""The key tus upload URLs are signed with is the bucket's, not an instance's (moto).

Instances on one bucket need not share S3 credentials: with an instance role every host
has its own temporary key pair, and it rotates. moto accepts any key pair, so each proxy
here gets its own (``AWS_*`` in the environment when its S3 client is opened), and a URL
made on one must work on the others, including one started after the first two stopped.
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from s3proxy import tus_keys, tus_url
from s3proxy.cleanup import sweep_tus
from s3proxy.errors import ProxyError
from s3proxy.log import REQUEST_ID
from s3proxy.state import STATE
from s3proxy.tus import TUS
from s3proxy.tus_keys import UrlKeys
from tests.conftest import ProxyFactory
from tests.faults import Fault, FaultyS3
from tests.memory_s3 import MemoryS3
from tests.s3util import MotoServer, all_keys_async, read_object_async
from tests.test_tus import TUS as TUS_HEADERS
from tests.test_tus import KiB, body, stored_key

KEY_OBJECT = ".s3proxy/tus/url-key"  # spelled out: the name is what deployments hold


def patch_headers(offset: int) -> dict[str, str]:
    return {
        **TUS_HEADERS,
        "Upload-Offset": str(offset),
        "Content-Type": "application/offset+octet-stream",
    }


async def instance(
    proxy_factory: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    endpoint_url: str | None = None,
    **overrides: Any,
) -> TestClient[Any, Any]:
    """A proxy with credentials of its own, as a host with an instance role has."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", f"ASIA{name.upper()}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"secret-of-{name}")
    monkeypatch.setenv("AWS_SESSION_TOKEN", f"session-of-{name}")
    proxy = await proxy_factory(endpoint_url, **overrides)
    assert await proxy.app[STATE].require_sink().credential_secret() == f"secret-of-{name}"
    return proxy


async def create(proxy: TestClient[Any, Any], length: int, **headers: str) -> str:
    resp = await proxy.post(
        "/tus/", headers={**TUS_HEADERS, "Upload-Length": str(length), **headers}
    )
    assert resp.status == 201, await resp.text()
    return resp.headers["Location"]


async def offset_on(proxy: TestClient[Any, Any], url: str) -> int:
    resp = await proxy.head(url, headers=TUS_HEADERS)
    assert resp.status == 200, await resp.text()
    return int(resp.headers["Upload-Offset"])


async def test_a_url_works_on_instances_with_other_credentials_and_after_both_stopped(
    proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch, s3: Any, bucket: str
) -> None:
    a = await instance(proxy_factory, monkeypatch, "a")
    b = await instance(proxy_factory, monkeypatch, "b")
    data = body(300 * KiB + 7)
    url = await create(a, len(data))
    assert await offset_on(b, url) == 0
    resp = await b.patch(url, data=io.BytesIO(data[: 100 * KiB]), headers=patch_headers(0))
    assert resp.status == 204, await resp.text()
    assert await offset_on(a, url) == 100 * KiB
    # a URL made on b works on a as well
    other = await create(b, 10)
    assert await offset_on(a, other) == 0
    await a.close()
    await b.close()
    # the next instance (a restart with rotated credentials, a new host) takes it up
    c = await instance(proxy_factory, monkeypatch, "c")
    assert await offset_on(c, url) == 100 * KiB
    resp = await c.patch(url, data=io.BytesIO(data[100 * KiB :]), headers=patch_headers(100 * KiB))
    assert resp.status == 204, await resp.text()
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data
    resp = await c.delete(other, headers=TUS_HEADERS)
    assert resp.status == 204
    assert await all_keys_async(s3, bucket) == sorted([KEY_OBJECT, await stored_key(s3, bucket)])


async def test_two_first_instances_racing_to_create_the_key_end_with_the_same_key(
    proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch, moto: MotoServer
) -> None:
    # Both read "no key" before either writes one (their reads are answered late).
    def rule(op: str, n: int) -> Fault | None:
        return Fault(late=0.5) if op == "GetObject" and n <= 2 else None

    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        a = await instance(proxy_factory, monkeypatch, "a", faulty.endpoint_url)
        b = await instance(proxy_factory, monkeypatch, "b", faulty.endpoint_url)
        url_a, url_b = await asyncio.gather(create(a, 10), create(b, 10))
        key_puts = [p for op, p in faulty.paths if op == "PutObject" and p.endswith(KEY_OBJECT)]
        assert len(key_puts) == 2  # both tried to create it; one was refused
        assert a.app[TUS].keys[0] == b.app[TUS].keys[0]  # the signing key (then each S3 secret)
        assert await offset_on(b, url_a) == 0
        assert await offset_on(a, url_b) == 0
        for proxy, url in ((a, url_a), (b, url_b)):
            assert (await proxy.delete(url, headers=TUS_HEADERS)).status == 204


async def test_the_store_down_at_start_gives_503_until_it_is_back(
    proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch, moto: MotoServer
) -> None:
    a = await instance(proxy_factory, monkeypatch, "a")
    url = await create(a, 10)
    down = True

    def rule(op: str, n: int) -> Fault | None:
        return Fault(status=503, code="ServiceUnavailable", delay=0.3) if down else None

    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        # b starts while the store is down: it starts, and asks the store nothing yet
        b = await instance(proxy_factory, monkeypatch, "b", faulty.endpoint_url, s3_max_attempts=1)
        assert faulty.calls == []
        # (DELETE: a HEAD's answer has no body to read the error from)
        answers = await asyncio.gather(*(b.delete(url, headers=TUS_HEADERS) for _ in range(3)))
        for resp in answers:
            assert resp.status == 503
            assert resp.headers["Tus-Resumable"] == "1.0.0"
            error = (await resp.json())["error"]
            assert error["code"] == "UPSTREAM_UNAVAILABLE"
            assert "UPSTREAM_UNAVAILABLE" in error["message"]  # the store's answer, named
            assert "ServiceUnavailable" in error["message"]
        # one load in flight at a time: the three requests waited for the same one
        assert faulty.calls == ["GetObject"]
        down = False
        assert await offset_on(b, url) == 0
        resp = await b.patch(url, data=b"0123456789", headers=patch_headers(0))
        assert resp.status == 204, await resp.text()
        assert resp.headers["S3Proxy-Key"]


async def test_the_sweeps_leave_the_key_object(
    proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch, s3: Any, bucket: str
) -> None:
    a = await instance(proxy_factory, monkeypatch, "a")
    await create(a, 10)
    assert KEY_OBJECT in await all_keys_async(s3, bucket)
    signing = a.app[TUS].keys[0]
    # every upload expired: the sweep removes them, and only them
    gone = await sweep_tus(a.app[STATE].require_sink(), dry_run=False, now=time.time() + 7 * 86400)
    assert len(gone.removed) == 1
    assert await all_keys_async(s3, bucket) == [KEY_OBJECT]
    await a.close()
    b = await instance(proxy_factory, monkeypatch, "b")
    await create(b, 10)
    assert b.app[TUS].keys[0] == signing
    assert tus_url.RESERVED_PREFIX + "url-key" == KEY_OBJECT


async def test_the_key_object_is_never_served(
    proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await instance(proxy_factory, monkeypatch, "a")
    await create(a, 10)
    resp = await a.get("/files/" + KEY_OBJECT)
    assert resp.status in (403, 404)


async def test_with_token_secrets_the_bucket_holds_no_key(
    proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch, s3: Any, bucket: str
) -> None:
    settings: dict[str, Any] = {"token_secret": ("t" * 32,), "api_key": ("k" * 32,)}
    a = await instance(proxy_factory, monkeypatch, "a", **settings)
    b = await instance(proxy_factory, monkeypatch, "b", **settings)
    url = await create(a, 10, Authorization="Bearer " + "k" * 32)
    assert await offset_on(b, url) == 0
    assert KEY_OBJECT not in await all_keys_async(s3, bucket)
    assert (await a.delete(url, headers=TUS_HEADERS)).status == 204


# --- the loader over the in-memory store ---------------------------------------------------


async def test_a_failed_load_is_retried_by_the_next_request() -> None:
    """A create whose answer was lost (a timeout): 503, and the next request reads the
    key that did land, rather than making another."""
    store = MemoryS3()
    store.fail("PutObject", at=1, lost=True)
    keys = UrlKeys((), lambda: store)
    with pytest.raises(ProxyError) as failed:
        await keys.get()
    assert failed.value.kind.status == 503
    assert "UPSTREAM_TIMEOUT" in failed.value.message
    stored = tus_keys.decode(store.objects[KEY_OBJECT].data)
    signing = (await keys.get())[0]
    assert signing == tus_url.url_keys(stored)[0]
    assert [op for op, key in store.calls if key == KEY_OBJECT].count("PutObject") == 1
    await keys.close()


async def test_an_unreadable_key_object_is_503_and_left_as_it_is() -> None:
    store = MemoryS3()
    await store.put(KEY_OBJECT, [b"garbage"], tus_keys.KEY_OPTIONS)
    keys = UrlKeys((), lambda: store)
    for _ in range(2):
        with pytest.raises(ProxyError) as failed:
            await keys.get()
        assert failed.value.kind.status == 503 and KEY_OBJECT in failed.value.message
    assert store.objects[KEY_OBJECT].data == b"garbage"
    await keys.close()


async def test_the_shared_loader_logs_as_no_request() -> None:
    """The loader is shared by every request waiting for the key, but it was started in
    the first one's task, so its lines (a failed create's warning) carried that id."""
    store = MemoryS3()
    seen: list[str] = []

    def bucket() -> MemoryS3:
        seen.append(REQUEST_ID.get())
        return store

    keys = UrlKeys((), bucket)
    token = REQUEST_ID.set("first-request")
    try:
        await keys.get()
    finally:
        REQUEST_ID.reset(token)
    assert seen == ["-"]
    await keys.close()
