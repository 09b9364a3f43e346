"""Issue #12, nothing overwritten: key templates without ``{uuid}`` and ``--no-overwrite``.

Pure tables for the policy and the settings; the store calls with their conditions on
the in-memory store and on moto; then real HTTP uploads through the proxy on moto
(and, ``e2e``, on the embedded SeaweedFS): two uploads racing to one key, an upload
to a key that is taken, and lost answers, where a failed upload must never delete an
object that is not its own.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp.test_utils import TestClient

from s3proxy.app import create_app
from s3proxy.config import Config
from s3proxy.keys import NONCE_META, UNIQUE_KEYS, WritePolicy, write_policy
from s3proxy.pipeline import delete_own
from s3proxy.s3 import ObjectOptions, ObjectStore, PreconditionFailed
from s3proxy.s3_aiobotocore import ClientOptions, open_store
from s3proxy.settings import Settings, SettingsError
from tests import bodies
from tests.conftest import make_settings
from tests.faults import OBJECT_WRITES, Fault, FaultyS3
from tests.memory_s3 import MemoryS3
from tests.s3util import BOTO_CONFIG, all_keys, open_uploads
from tests.seaweed_fixture import s3_client_kwargs

MiB = 1024**2
OPTS = ObjectOptions("application/octet-stream")
SHARED = "in/{filename}"  # every upload of a.bin gets the key in/a.bin


# --- the policy: pure ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "no_overwrite", "if_none_match", "cleanup"),
    [
        # {uuid}: unique keys; the condition only when asked for, deletes always ours
        ("uploads/{yyyy}/{uuid}/{filename}", None, False, "delete"),
        ("uploads/{yyyy}/{uuid}/{filename}", True, True, "delete"),
        ("uploads/{yyyy}/{uuid}/{filename}", False, False, "delete"),
        # no {uuid}: shared keys; no-overwrite by default, deletes only our own object
        ("in/{filename}", None, True, "nonce"),
        ("in/{filename}", True, True, "nonce"),
        ("in/{yyyy}-{mm}-{dd}.bin", None, True, "nonce"),
        # overwrites allowed: the last upload wins, a failed one deletes only its own
        ("in/{filename}", False, False, "nonce"),
    ],
)
def test_write_policy(
    template: str, no_overwrite: bool | None, if_none_match: bool, cleanup: str
) -> None:
    policy = write_policy(template, no_overwrite)
    assert (policy.if_none_match, policy.cleanup) == (if_none_match, cleanup)


def test_the_pipeline_default_is_the_uuid_templates() -> None:
    assert UNIQUE_KEYS == write_policy(Settings().key_template, None) == WritePolicy()


@pytest.mark.parametrize(
    ("args", "env", "outcome"),
    [
        ({"key_template": "in/{filename}"}, {}, "ok"),
        ({"key_template": "{filename}"}, {}, "ok"),
        ({"key_template": "in/{filename}", "no_overwrite": "true"}, {}, "ok"),
        ({"key_template": "in/{filename}", "no_overwrite": "false"}, {}, "warning"),
        ({"key_template": "in/{filename}"}, {"S3PROXY_NO_OVERWRITE": "false"}, "warning"),
        ({"key_template": "in/{uuid}/{filename}", "no_overwrite": "false"}, {}, "ok"),
        ({"key_template": "in/fixed.bin"}, {}, "no field"),
        ({"key_template": "in/{filename}", "no_overwrite": "maybe"}, {}, "not a boolean"),
    ],
)
def test_settings(
    args: dict[str, str], env: dict[str, str], outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="s3proxy.settings"):
        if outcome not in ("ok", "warning"):
            with pytest.raises(SettingsError, match=outcome):
                Settings.load(args, env)
            return
        Settings.load(args, env).log_warnings()
    warned = [r.getMessage() for r in caplog.records if r.name == "s3proxy.settings"]
    if outcome == "ok":
        assert not warned
    else:
        assert len(warned) == 1 and "replace each other" in warned[0], warned


def test_config_maps_no_overwrite() -> None:
    settings = Settings(key_template=SHARED)
    assert Config.from_settings(settings).pipeline.writes == write_policy(SHARED, None)


# --- the store's conditional calls (both implementations) ------------------------------


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


async def test_conditional_put_and_complete(store: ObjectStore) -> None:
    first = (await store.put("k/a", [b"first"], OPTS, if_none_match=True)).etag
    with pytest.raises(PreconditionFailed):
        await store.put("k/a", [b"second"], OPTS, if_none_match=True)
    upload_id = await store.create("k/a", OPTS)
    etag = await store.upload_part("k/a", upload_id, 1, [b"third"])
    with pytest.raises(PreconditionFailed):
        await store.complete("k/a", upload_id, [(1, etag)], if_none_match=True)
    # A refused Complete leaves the upload open: it must be aborted.
    assert [u.upload_id async for u in store.list_uploads("k/")] == [upload_id]
    await store.abort("k/a", upload_id)
    assert (await store.head("k/a")).etag == first


async def test_delete_if_match(store: ObjectStore) -> None:
    etag = (await store.put("k/d", [b"x"], OPTS)).etag
    with pytest.raises(PreconditionFailed):
        await store.delete("k/d", if_match='"0123456789abcdef0123456789abcdef"')
    assert (await store.head("k/d")).etag == etag
    await store.delete("k/d", if_match=etag)
    assert await store.list_objects("k/") == []
    await store.delete("k/d", if_match=etag)  # deleting nothing is fine


async def test_delete_own_tells_whose_object_the_key_holds(
    store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    """``delete_own``: True when the key held ours (deleted) or nothing (reprobe12a F6: an
    empty key was logged owner=other); False for another upload's object, which stays."""
    caplog.set_level(logging.INFO, "s3proxy.pipeline")
    ours = ObjectOptions("application/octet-stream", metadata={NONCE_META: "ours"})
    theirs = ObjectOptions("application/octet-stream", metadata={NONCE_META: "theirs"})
    assert await delete_own(store, "k/e", "ours", "test") is True
    await store.put("k/e", [b"x"], theirs)
    assert await delete_own(store, "k/e", "ours", "test") is False
    await store.put("k/e", [b"x"], ours)
    assert await delete_own(store, "k/e", "ours", "test") is True
    assert await store.list_objects("k/") == []
    owners = [
        r.getMessage().rpartition(" ")[2] for r in caplog.records if "not_deleted" in r.getMessage()
    ]
    assert owners == ["owner=none", "owner=other"]


# --- through the proxy, on moto ---------------------------------------------------------


async def shared_proxy(proxy_factory: Any, **settings: Any) -> TestClient[Any, Any]:
    settings.setdefault("key_template", SHARED)
    client: TestClient[Any, Any] = await proxy_factory(**settings)
    return client


async def upload(proxy: TestClient[Any, Any], data: bytes) -> tuple[int, dict[str, Any]]:
    raw = io.BytesIO(bodies.body([bodies.file("file", "a.bin", data)]))
    resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
    return resp.status, await resp.json()


def stored(s3: Any, bucket: str, key: str = "in/a.bin") -> bytes:
    body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def outcomes(results: list[tuple[int, dict[str, Any]]]) -> list[int | str]:
    return sorted(
        (s if s == 201 else out["error"]["code"] for s, out in results), key=lambda x: str(x)
    )


@pytest.mark.parametrize("size", [1000, 7 * MiB], ids=["put", "multipart"])
async def test_two_uploads_race_to_one_key(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, size: int
) -> None:
    """One wins (201), the other gets 409 KEY_EXISTS; the key holds the winner's bytes.

    moto checks If-None-Match before assembling the parts, not atomically with storing
    them (``moto/s3/responses.py``), so two Completes that overlap there both succeed;
    the second Complete is held back until the first is done, as S3 orders them itself
    (the e2e test races them for real on SeaweedFS, which does not always: see there)."""
    hold = lambda o, n: Fault(delay=0.5) if (o, n) == ("CompleteMultipartUpload", 2) else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, hold) as f:
        proxy = await shared_proxy(proxy_factory, endpoint_url=f.endpoint_url)
        await race(proxy, s3, bucket, size)


async def race(proxy: TestClient[Any, Any], s3: Any, bucket: str, size: int) -> None:
    datas = [os.urandom(size), os.urandom(size)]
    results = await asyncio.gather(*(upload(proxy, d) for d in datas))
    assert outcomes(list(results)) == [201, "KEY_EXISTS"], results
    winner = next(i for i, (status, _) in enumerate(results) if status == 201)
    assert results[winner][1]["files"][0]["key"] == "in/a.bin"
    assert stored(s3, bucket) == datas[winner]
    assert all_keys(s3, bucket) == ["in/a.bin"] and open_uploads(s3, bucket) == []


@pytest.mark.parametrize("size", [1000, 7 * MiB], ids=["put", "multipart"])
async def test_an_upload_to_a_taken_key_is_409(
    proxy_factory: Any, s3: Any, bucket: str, size: int
) -> None:
    proxy = await shared_proxy(proxy_factory)
    first, second = os.urandom(size), os.urandom(size)
    assert (await upload(proxy, first))[0] == 201
    status, out = await upload(proxy, second)
    assert (status, out["error"]["code"]) == (409, "KEY_EXISTS"), out
    assert "in/a.bin" in out["error"]["message"]
    assert stored(s3, bucket) == first and open_uploads(s3, bucket) == []


async def test_overwrites_allowed_when_asked(proxy_factory: Any, s3: Any, bucket: str) -> None:
    proxy = await shared_proxy(proxy_factory, no_overwrite=False)
    assert (await upload(proxy, b"first"))[0] == 201
    assert (await upload(proxy, b"second"))[0] == 201
    assert stored(s3, bucket) == b"second"
    assert NONCE_META in s3.head_object(Bucket=bucket, Key="in/a.bin")["Metadata"]


@OBJECT_WRITES
async def test_lost_answer_never_deletes_another_uploads_object(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, op: str, size: int
) -> None:
    """Someone else's object is at the key; our write's answers all come too late (504).
    Before issue #12 the cleanup deleted the key: here it must stay, byte for byte."""
    s3.put_object(Bucket=bucket, Key="in/a.bin", Body=b"someone else's")
    async with FaultyS3(moto.endpoint_url, lambda o, n: Fault(late=1.5) if o == op else None) as f:
        proxy = await shared_proxy(
            proxy_factory, endpoint_url=f.endpoint_url, s3_max_attempts=2, s3_read_timeout=0.5
        )
        status, out = await upload(proxy, os.urandom(size))
    assert (status, out["error"]["code"]) == (504, "UPSTREAM_TIMEOUT"), out
    assert f.calls.count(op) >= 2 and "HeadObject" in f.calls
    assert "DeleteObject" not in f.calls
    assert stored(s3, bucket) == b"someone else's"
    await wait_no_uploads(s3, bucket)


async def test_lost_answer_deletes_our_own_object(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """The key was free and our PutObject landed, but every answer was lost: the client
    is told 504, so our object goes (checked by nonce, deleted with If-Match)."""
    rule = lambda o, n: Fault(late=1.5) if o == "PutObject" else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule) as f:
        proxy = await shared_proxy(
            proxy_factory, endpoint_url=f.endpoint_url, s3_max_attempts=2, s3_read_timeout=0.5
        )
        status, out = await upload(proxy, b"ours")
    assert (status, out["error"]["code"]) == (504, "UPSTREAM_TIMEOUT"), out
    assert "DeleteObject" in f.calls
    assert all_keys(s3, bucket) == []


async def test_a_retry_refused_by_our_own_write_is_success(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """The first PutObject lands but its answer is lost; botocore retries and S3 answers
    412, the key now holding our own object: that is a 201, not a 409."""
    rule = lambda o, n: Fault(late=1.5) if (o, n) == ("PutObject", 1) else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule) as f:
        proxy = await shared_proxy(
            proxy_factory, endpoint_url=f.endpoint_url, s3_max_attempts=2, s3_read_timeout=0.5
        )
        status, out = await upload(proxy, b"ours")
    assert status == 201, out
    assert f.calls.count("PutObject") == 2
    assert stored(s3, bucket) == b"ours"


@OBJECT_WRITES
async def test_a_write_recognised_by_its_nonce_reports_the_checksum_it_sent(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, op: str, size: int
) -> None:
    """reprobe20a: the 201 of a write whose answer was lost, recognised by its nonce after
    the retry's 412, said "checksum": null though the proxy sent one and S3 checked it
    (5 of 5). It is the value sent, the same a plain upload of the bytes reports."""
    data = os.urandom(size)
    rule = lambda o, n: Fault(late=1.5) if (o, n) == (op, 1) else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule) as f:
        proxy = await shared_proxy(
            proxy_factory, endpoint_url=f.endpoint_url, s3_max_attempts=2, s3_read_timeout=0.5
        )
        status, out = await upload(proxy, data)
        assert status == 201, out
        assert f.calls.count(op) == 2
    plain = await shared_proxy(proxy_factory, key_template="plain/{filename}")
    status, direct = await upload(plain, data)
    assert status == 201, direct
    checksum = out["files"][0]["checksum"]
    assert checksum is not None and checksum == direct["files"][0]["checksum"], out
    assert stored(s3, bucket) == data


async def test_overwrites_allowed_a_failed_upload_deletes_its_own_object(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """--no-overwrite false: the object at the key may be someone else's (they may have
    overwritten ours meanwhile), so a failed upload used to leave it: a client told 504
    found its bytes stored. Each object at a shared key now carries its upload's nonce,
    so a failed upload deletes its own (HeadObject, then If-Match), never another's."""
    rule = lambda o, n: Fault(late=1.5) if o == "PutObject" else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule) as f:
        proxy = await shared_proxy(
            proxy_factory,
            endpoint_url=f.endpoint_url,
            no_overwrite=False,
            s3_max_attempts=2,
            s3_read_timeout=0.5,
        )
        status, out = await upload(proxy, b"ours")
    assert status == 504, out
    assert "HeadObject" in f.calls and "DeleteObject" in f.calls
    assert all_keys(s3, bucket) == []


async def test_overwrites_allowed_a_failed_upload_keeps_a_newer_object(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """--no-overwrite false: another upload of the SAME bytes replaced ours before our
    failure's cleanup (same ETag: only the nonce tells them apart); it stays."""
    replaced = {"done": False}

    def rule(op: str, n: int) -> Fault | None:
        if op == "PutObject" and not replaced["done"]:
            return Fault(late=1.5)  # ours: every answer lost, the upload fails (504)
        return None

    async with FaultyS3(moto.endpoint_url, rule) as f:
        proxy = await shared_proxy(
            proxy_factory,
            endpoint_url=f.endpoint_url,
            no_overwrite=False,
            s3_max_attempts=1,
            s3_read_timeout=0.5,
        )
        first = asyncio.ensure_future(upload(proxy, b"same bytes"))
        await asyncio.sleep(1.0)  # ours was sent; its answer is held
        replaced["done"] = True
        assert (await upload(proxy, b"same bytes"))[0] == 201
        status, out = await first
    assert status == 504, out
    assert stored(s3, bucket) == b"same bytes"
    meta = s3.head_object(Bucket=bucket, Key="in/a.bin")["Metadata"]
    assert meta[NONCE_META]


async def wait_no_uploads(s3: Any, bucket: str, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while open_uploads(s3, bucket):
        assert asyncio.get_running_loop().time() < deadline, open_uploads(s3, bucket)
        await asyncio.sleep(0.1)


# --- on the embedded SeaweedFS ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("size", [1000, 7 * MiB], ids=["put", "multipart"])
async def test_race_on_seaweedfs(
    seaweedfs: Any, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    prefix = f"race-{uuid.uuid4().hex[:8]}/"
    settings = make_settings(
        seaweedfs.endpoint_url, bucket=seaweedfs.bucket, key_template=prefix + "{filename}"
    )
    proxy = await aiohttp_client(create_app(settings))
    sw = boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(seaweedfs))
    try:
        datas = [os.urandom(size), os.urandom(size)]
        results = await asyncio.gather(*(upload(proxy, d) for d in datas))
        found = stored(sw, seaweedfs.bucket, prefix + "a.bin")
        if size > 5 * MiB and outcomes(list(results)) == [201, 201]:
            # SeaweedFS (4.48) checks If-None-Match on CompleteMultipartUpload apart from
            # storing: two Completes racing on one key can both succeed, the later one
            # stored (measured: 7 in 200 direct races through botocore, 62 in 200 through
            # the lean sender, whose requests land closer together). S3 orders them. The
            # proxy sent the condition (the late upload below is refused); the store kept
            # one whole file.
            assert found in datas
        else:
            assert outcomes(list(results)) == [201, "KEY_EXISTS"], results
            winner = next(i for i, (status, _) in enumerate(results) if status == 201)
            assert found == datas[winner]
        status, out = await upload(proxy, b"late")
        assert (status, out["error"]["code"]) == (409, "KEY_EXISTS")
        assert [u for u in open_uploads(sw, seaweedfs.bucket) if u["Key"].startswith(prefix)] == []
    finally:
        for key in [k for k in all_keys(sw, seaweedfs.bucket) if k.startswith(prefix)]:
            sw.delete_object(Bucket=seaweedfs.bucket, Key=key)


# --- presigned uploads -------------------------------------------------------------------


async def sign(proxy: TestClient[Any, Any], path: str, body: Any) -> tuple[int, dict[str, Any]]:
    resp = await proxy.post(path, json=body)
    return resp.status, await resp.json()


PDF = {"filename": "a.pdf", "content_type": "application/pdf"}


async def test_presigned_put_signs_if_none_match(proxy_factory: Any, s3: Any, bucket: str) -> None:
    """The client must send If-None-Match: * (it is a signed header); S3 then refuses
    a second PUT to the key. A POST policy cannot carry it: refused for shared keys."""
    proxy = await shared_proxy(proxy_factory)
    signed_twice = [await sign(proxy, "/sign", {**PDF, "size": 5}) for _ in range(2)]
    for status, out in signed_twice:
        assert status == 200 and out["key"] == "in/a.pdf", out
        assert out["headers"]["If-None-Match"] == "*"
        signed = out["url"].split("X-Amz-SignedHeaders=")[1].split("&")[0]
        assert "if-none-match" in signed.split("%3B")
    async with aiohttp.ClientSession() as http:
        for expected, (_, out) in zip((200, 412), signed_twice, strict=True):
            async with http.put(out["url"], data=b"%PDF-", headers=out["headers"]) as resp:
                assert resp.status == expected, await resp.text()
    status, out = await sign(proxy, "/sign", {**PDF, "size": 5, "method": "post"})
    assert (status, out["error"]["code"]) == (400, "INVALID_REQUEST")
    assert '"method": "put"' in out["error"]["message"]


async def test_presigned_multipart_to_a_taken_key_is_409(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """Stored after the upload began: its complete refuses it, and aborts the upload."""
    proxy = await shared_proxy(proxy_factory, presign_multipart_threshold=1024)
    status, up = await sign(proxy, "/sign/multipart", {**PDF, "size": 3})
    assert status == 200, up
    s3.put_object(Bucket=bucket, Key="in/a.pdf", Body=b"someone else's")
    ref = {"key": up["key"], "upload_id": up["upload_id"]}
    _, urls = await sign(proxy, "/sign/multipart/parts", {**ref, "part_numbers": [1]})
    async with (
        aiohttp.ClientSession() as http,
        http.put(urls["parts"][0]["url"], data=b"abc") as resp,
    ):
        assert resp.status == 200
    status, out = await sign(proxy, "/sign/multipart/complete", ref)
    assert (status, out["error"]["code"]) == (409, "KEY_EXISTS"), out
    assert stored(s3, bucket, "in/a.pdf") == b"someone else's"
    assert open_uploads(s3, bucket) == []


@pytest.mark.parametrize("path", ["/sign", "/sign/multipart"])
async def test_signing_for_a_taken_key_is_409_at_once(
    proxy_factory: Any, s3: Any, bucket: str, path: str
) -> None:
    """Said before the client sends a byte (as tus's creation does), not after it sent
    every part: nothing is signed and no multipart upload is opened."""
    proxy = await shared_proxy(proxy_factory, presign_multipart_threshold=1024)
    s3.put_object(Bucket=bucket, Key="in/a.pdf", Body=b"someone else's")
    size = 3 if path == "/sign" else 2048
    status, out = await sign(proxy, path, {**PDF, "size": size})
    assert (status, out["error"]["code"]) == (409, "KEY_EXISTS"), out
    assert open_uploads(s3, bucket) == []
    assert stored(s3, bucket, "in/a.pdf") == b"someone else's"


@pytest.mark.parametrize("no_overwrite", [True, False])
async def test_two_files_of_one_request_at_one_key_are_refused(
    proxy_factory: Any, s3: Any, bucket: str, no_overwrite: bool
) -> None:
    """reprobe12a F4: two files named a.bin in one request get one shared key. With
    --no-overwrite false the 201 listed both while only the second's bytes were stored;
    with it, the 409 said another upload held the key (it was the request's own first
    file). Now: 409 naming both, nothing stored."""
    proxy = await shared_proxy(proxy_factory, no_overwrite=no_overwrite)
    raw = bodies.body([bodies.file("f", "a.bin", b"first"), bodies.file("g", "a.bin", b"second")])
    resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
    out = await resp.json()
    assert (resp.status, out["error"]["code"]) == (409, "KEY_EXISTS"), out
    assert "this request's file 1" in out["error"]["message"], out
    assert all_keys(s3, bucket) == [] and open_uploads(s3, bucket) == []
