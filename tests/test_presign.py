"""Direct-to-S3 uploads: the signing API's contract against moto, and the signatures
themselves against SeaweedFS, which (unlike moto) checks them: a browser-like client
uploads straight to the store, and the store refuses what was not signed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import boto3
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from botocore.config import Config

from s3proxy import presign, presign_claim, presign_identity, presign_record
from s3proxy.app import create_app
from s3proxy.embedded import EmbeddedStore
from s3proxy.errors import COMPLETE_IN_PROGRESS, ProxyError
from s3proxy.janitor import Janitor
from s3proxy.keys import NONCE_META
from s3proxy.settings import Settings
from s3proxy.state import STATE
from s3proxy.tokens import issue
from tests.bodies import MiB
from tests.faults import Fault, FaultyS3, claim_operation
from tests.polling import eventually
from tests.s3util import (
    BOTO_CONFIG,
    get_object_async,
    head_object_async,
    open_uploads,
    open_uploads_async,
    read_object_async,
)
from tests.seaweed_fixture import s3_client_kwargs
from tests.test_s3_aiobotocore import second_create_lost
from tests.test_webhook_flow import SECRET as HOOK_SECRET
from tests.test_webhook_flow import receiver

KEY = "k3y-0123456789abcdef"
SECRET = b"s" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}


def token(**grant: Any) -> dict[str, str]:
    grant.setdefault("prefix", "users/42/")
    return {"Authorization": f"Bearer {issue(SECRET, ttl=60, **grant)}"}


async def call(
    client: TestClient[Any, Any],
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else json.dumps(body).encode()
    resp = await client.post(path, data=data, headers=headers if headers is not None else AUTH)
    return resp.status, await resp.json()


def code(out: dict[str, Any]) -> str:
    return str(out["error"]["code"])


def pdf(size: int = 1000) -> dict[str, Any]:
    return {"filename": "report.pdf", "content_type": "application/pdf", "size": size}


# --- the API contract (moto) ------------------------------------------------------


@pytest.fixture
async def authed(proxy_factory: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await proxy_factory(
        api_key=(KEY,),
        token_secret=(SECRET.decode(),),
        key_template="uploads/{uuid}/{filename}",
        max_file_size=50 * MiB,
        presign_multipart_threshold=20 * MiB,
    )
    return client


async def test_put_is_signed_with_its_headers(authed: Any, s3: Any, bucket: str) -> None:
    before = time.time()
    status, out = await call(authed, "/sign", {**pdf(5), "filename": "Ünïcode report.pdf"})
    assert status == 200, out
    assert out["multipart"] is False and out["method"] == "PUT" and out["bucket"] == bucket
    assert out["key"].startswith("uploads/") and out["key"].endswith("/Ünïcode report.pdf")
    assert out["headers"]["Content-Type"] == "application/pdf"
    assert out["headers"]["Content-Disposition"].startswith('attachment; filename="Unicode')
    query = parse_qs(urlsplit(out["url"]).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    # Every signed header is one the client is told to send, but Content-Length
    # (the body sets it) and Host.
    signed = set(query["X-Amz-SignedHeaders"][0].split(";"))
    assert signed == {h.lower() for h in out["headers"]} | {"content-length", "host"}
    assert query["X-Amz-Expires"] == ["900"]
    assert int(before) + 900 <= out["expires_at"] <= time.time() + 901
    assert out["object_url"] == out["url"].split("?")[0]
    async with (
        aiohttp.ClientSession() as http,
        http.put(out["url"], data=b"%PDF-", headers=out["headers"]) as resp,
    ):
        assert resp.status == 200
    head = await head_object_async(s3, bucket, out["key"])
    assert head["ContentType"] == "application/pdf" and head["ContentLength"] == 5


async def test_post_policy_fixes_key_type_and_size(authed: Any, bucket: str) -> None:
    status, out = await call(authed, "/sign", {**pdf(1234), "method": "post"})
    assert status == 200, out
    assert out["method"] == "POST" and "headers" not in out
    fields = out["fields"]
    assert fields["key"] == out["key"] and fields["Content-Type"] == "application/pdf"
    assert {"policy", "x-amz-signature", "x-amz-credential", "x-amz-date"} <= set(fields)
    policy = json.loads(base64.b64decode(fields["policy"]))
    conditions = policy["conditions"]
    assert ["content-length-range", 1234, 1234] in conditions
    assert {"Content-Type": "application/pdf"} in conditions
    assert {"key": out["key"]} in conditions and {"bucket": bucket} in conditions
    assert out["object_url"].endswith("/" + bucket + "/" + out["key"].replace(" ", "%20"))


async def test_type_is_guessed_when_not_declared(authed: Any) -> None:
    status, out = await call(authed, "/sign", {"filename": "notes.txt", "size": 3})
    assert status == 200 and out["headers"]["Content-Type"] == "text/plain"
    status, out = await call(authed, "/sign", {"filename": "x", "content_type": "", "size": 3})
    assert out["headers"]["Content-Type"] == "application/octet-stream"
    status, out = await call(
        authed, "/sign", {**pdf(), "content_type": "Application/PDF; charset=binary"}
    )
    assert out["headers"]["Content-Type"] == "application/pdf"


async def test_auth_is_required(authed: Any) -> None:
    for path in ("/sign", "/sign/multipart", "/sign/multipart/complete"):
        status, out = await call(authed, path, pdf(), headers={})
        assert (status, code(out)) == (401, "AUTH_REQUIRED")
    resp = await authed.get("/sign/multipart/parts?key=uploads/a&upload_id=x")
    assert resp.status == 401


async def test_token_scope(authed: Any) -> None:
    status, out = await call(authed, "/sign", pdf(), token(types=["application/pdf"]))
    assert status == 200 and out["key"].startswith("users/42/uploads/")
    status, out = await call(authed, "/sign", pdf(), token(types=["image/*"]))
    assert (status, code(out)) == (403, "TOKEN_SCOPE")
    status, out = await call(authed, "/sign", pdf(2000), token(max_size=1000))
    assert (status, code(out)) == (403, "TOKEN_SCOPE")
    status, out = await call(authed, "/sign/multipart", pdf(2000), token(max_size=1000))
    assert (status, code(out)) == (403, "TOKEN_SCOPE")


async def test_limits(proxy_factory: Any) -> None:
    client = await proxy_factory(allow_type=("image/*",), max_file_size=10 * MiB)
    status, out = await call(client, "/sign", pdf(), headers={})
    assert (status, code(out)) == (415, "TYPE_NOT_ALLOWED")
    png = {"filename": "a.png", "content_type": "image/png", "size": 10 * MiB + 1}
    for path in ("/sign", "/sign/multipart"):
        status, out = await call(client, path, png, headers={})
        assert (status, code(out)) == (413, "FILE_TOO_LARGE")
    status, out = await call(client, "/sign", {**png, "size": 10}, headers={})
    assert status == 200


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"content_type": "a/b", "size": 1}).encode(), "'filename'"),
        (json.dumps({"filename": "a", "size": -1}).encode(), "'size'"),
        (json.dumps({"filename": "a", "size": "10"}).encode(), "'size'"),
        (json.dumps({"filename": "a", "size": True}).encode(), "'size'"),
        (json.dumps({"filename": "a"}).encode(), "'size'"),
        (json.dumps({"filename": "a", "size": 1, "method": "get"}).encode(), "'method'"),
        (json.dumps({"filename": "a", "size": 1, "content_type": "pdf"}).encode(), "content"),
        (json.dumps({"filename": "a", "size": 1, "sha256": "abc"}).encode(), "'sha256'"),
        (
            json.dumps({"filename": "a", "size": 1, "sha256": "0" * 64, "method": "post"}).encode(),
            "'sha256'",
        ),
        # Nesting past Python's recursion limit, numbers past its int-string limit.
        (b"[" * 10_000, "JSON object"),  # past the recursion limit, under --max-sign-body
        (b'{"a":' * 10_000, "JSON object"),
        (b'{"filename": "a", "size": ' + b"9" * 5000 + b"}", "JSON object"),
        (b"\xff\xfe{}", "JSON object"),
    ],
)
async def test_bad_requests(authed: Any, raw: bytes, message: str) -> None:
    status, out = await call(authed, "/sign", raw=raw, headers=AUTH)
    assert (status, code(out)) == (400, "INVALID_REQUEST")
    assert message in out["error"]["message"]


async def test_oversized_json_body_is_a_json_413(authed: Any) -> None:
    """/sign reads its (small) JSON body whole: aiohttp's 1 MiB cap answers, as JSON."""
    raw = b'{"filename": "' + b"a" * (2 * 1024 * 1024) + b'", "size": 1}'
    resp = await authed.post(
        "/sign", data=io.BytesIO(raw), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert resp.status == 413 and resp.content_type == "application/json"
    assert code(await resp.json()) == "REQUEST_TOO_LARGE"


async def test_large_files_are_sent_to_multipart(authed: Any, s3: Any, bucket: str) -> None:
    status, out = await call(authed, "/sign", pdf(20 * MiB + 1))
    assert status == 200
    assert out == {"multipart": True, "endpoint": "/sign/multipart", "threshold": 20 * MiB}
    assert await open_uploads_async(s3, bucket) == []


async def test_draining_refuses_new_uploads_only(authed: Any, s3: Any, bucket: str) -> None:
    status, up = await call(authed, "/sign/multipart", pdf(6 * MiB))
    ref = {"key": up["key"], "upload_id": up["upload_id"]}
    authed.server.app[STATE].draining = True
    for path in ("/sign", "/sign/multipart"):
        status, out = await call(authed, path, pdf())
        assert (status, code(out)) == (503, "SHUTTING_DOWN")
    status, out = await call(authed, "/sign/multipart/parts", {**ref, "part_numbers": [1]})
    assert status == 200
    status, out = await call(authed, "/sign/multipart/abort", ref)
    assert status == 200 and await open_uploads_async(s3, bucket) == []


async def test_client_keys_are_checked(authed: Any, s3: Any, bucket: str) -> None:
    status, up = await call(authed, "/sign/multipart", pdf(6 * MiB), token())
    assert status == 200 and up["key"].startswith("users/42/uploads/")
    ref = {"key": up["key"], "upload_id": up["upload_id"], "part_numbers": [1]}
    try:
        other = token(prefix="users/43/")
        for path in ("/sign/multipart/parts", "/sign/multipart/complete", "/sign/multipart/abort"):
            status, out = await call(authed, path, ref, other)
            assert (status, code(out)) == (403, "KEY_FORBIDDEN"), path
        resp = await authed.get(
            "/sign/multipart/parts",
            params={"key": up["key"], "upload_id": up["upload_id"]},
            headers=other,
        )
        assert resp.status == 403
        # An API key may use any key the template makes, but not others.
        status, out = await call(authed, "/sign/multipart/parts", {**ref, "key": "elsewhere/x"})
        assert (status, code(out)) == (403, "KEY_FORBIDDEN")
        for bad in (
            "uploads/../users/43/x",
            "uploads//x",
            "/uploads/x",
            "uploads/\x00",
            "uploads/\ud800",  # a lone surrogate (JSON allows the escape)
        ):
            status, out = await call(authed, "/sign/multipart/parts", {**ref, "key": bad})
            # keys.KeyPolicy: a key the proxy never makes is one nobody may use (was 400).
            assert (status, code(out)) == (403, "KEY_FORBIDDEN"), bad
        for numbers in ([], [0], [10_001], [1, 1], ["1"], list(range(1, 1002))):
            status, out = await call(
                authed, "/sign/multipart/parts", {**ref, "part_numbers": numbers}, token()
            )
            assert (status, code(out)) == (400, "INVALID_REQUEST"), numbers
        status, out = await call(
            authed, "/sign/multipart/parts", {**ref, "upload_id": "nope"}, token()
        )
        assert (status, code(out)) == (404, "NO_SUCH_UPLOAD")
        status, out = await call(authed, "/sign/multipart/parts", ref, token())
        assert status == 200 and [p["part_number"] for p in out["parts"]] == [1]
    finally:
        status, out = await call(authed, "/sign/multipart/abort", ref, token())
        assert status == 200 and out["aborted"] is True
    assert await open_uploads_async(s3, bucket) == []
    status, out = await call(authed, "/sign/multipart/abort", ref, token())  # again: still fine
    assert status == 200


async def put_parts(urls: list[dict[str, Any]], data: list[bytes]) -> list[str]:
    async with aiohttp.ClientSession() as http:

        async def put(url: str, body: bytes) -> str:
            async with http.put(url, data=io.BytesIO(body)) as resp:
                assert resp.status == 200, await resp.text()
                return resp.headers["ETag"]

        return list(
            await asyncio.gather(*(put(u["url"], d) for u, d in zip(urls, data, strict=True)))
        )


async def test_complete_checks_parts_and_size(authed: Any, s3: Any, bucket: str) -> None:
    """moto does not check signatures, so the proxy's own checks are visible here."""
    small, big = token(max_size=7 * MiB), token()
    status, up = await call(authed, "/sign/multipart", pdf(6 * MiB), small)
    assert status == 200 and (up["part_size"], up["part_count"]) == (5 * MiB, 2)
    ref = {"key": up["key"], "upload_id": up["upload_id"]}
    try:
        _, signed = await call(authed, "/sign/multipart/parts", {**ref, "part_numbers": [2]}, small)
        await put_parts(signed["parts"], [b"b" * MiB])
        status, out = await call(authed, "/sign/multipart/complete", ref, small)
        assert (status, out["error"]["message"]) == (400, "part 1 has not been uploaded")
        _, signed = await call(
            authed, "/sign/multipart/parts", {**ref, "part_numbers": [1, 2]}, small
        )
        await put_parts(signed["parts"], [b"a" * 5 * MiB, b"b" * 3 * MiB])  # 8 MiB in all
        status, out = await call(authed, "/sign/multipart/complete", ref, small)
        assert (status, code(out)) == (403, "TOKEN_SCOPE")
        wrong = [{"part_number": 1, "etag": "x"}]
        status, out = await call(authed, "/sign/multipart/complete", {**ref, "parts": wrong}, big)
        assert (status, code(out)) == (400, "INVALID_REQUEST")
        # Within every limit but not the size signed at create: completed, then deleted.
        status, out = await call(authed, "/sign/multipart/complete", ref, big)
        assert (status, code(out)) == (400, "INVALID_REQUEST")
        assert "6291456 were signed" in out["error"]["message"]
    finally:
        await call(authed, "/sign/multipart/abort", ref, big)
    assert (await asyncio.to_thread(s3.list_objects_v2, Bucket=bucket)).get("KeyCount") == 0
    assert await open_uploads_async(s3, bucket) == []


# --- signatures the store checks (SeaweedFS) --------------------------------------

e2e = pytest.mark.e2e


@pytest.fixture
def sw(seaweedfs: EmbeddedStore) -> Iterator[Any]:
    """A client on the shared store; everything under presign/ is removed afterwards."""
    client = boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(seaweedfs))
    yield client
    bucket = seaweedfs.bucket
    left = [u for u in open_uploads(client, bucket) if u["Key"].startswith("presign/")]
    for up in left:
        client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    listing = client.list_objects_v2(Bucket=bucket, Prefix="presign/")
    for obj in listing.get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.close()
    assert not left, f"multipart uploads left open: {left}"


@pytest.fixture
async def store_proxy(
    aiohttp_client: Any, seaweedfs: EmbeddedStore, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    """Build a proxy in front of SeaweedFS with the store's keys: ``await make(**settings)``."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        values: dict[str, Any] = {
            "endpoint_url": seaweedfs.endpoint_url,
            "bucket": seaweedfs.bucket,
            "key_template": "presign/{uuid}/{filename}",
            "part_size": 5 * MiB,
            "memory_budget": 64 * MiB,
            "presign_multipart_threshold": 6 * MiB,
            **overrides,
        }
        client: TestClient[Any, Any] = await aiohttp_client(create_app(Settings(**values)))
        return client

    yield make


def text_file(size: int) -> dict[str, Any]:
    return {"filename": "résumé.txt", "content_type": "text/plain", "size": size}


@e2e
async def test_put_straight_to_the_store(
    store_proxy: Any, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    proxy = await store_proxy()
    data = b"hello, store\n" * 1000
    status, out = await call(proxy, "/sign", text_file(len(data)), headers={})
    assert status == 200, out
    async with aiohttp.ClientSession() as http:
        refusals = [
            (data + b"!", out["headers"]),  # not the size signed
            (data, {**out["headers"], "Content-Type": "text/html"}),  # not the type signed
            (data, {"Content-Type": "text/plain"}),  # without the signed Content-Disposition
        ]
        for body, headers in refusals:
            async with http.put(out["url"], data=body, headers=headers) as resp:
                assert resp.status == 403, await resp.text()
        sig = parse_qs(urlsplit(out["url"]).query)["X-Amz-Signature"][0]
        tampered = out["url"].replace(sig, sig[:-1] + ("0" if sig[-1] != "0" else "1"))
        async with http.put(tampered, data=data, headers=out["headers"]) as resp:
            assert resp.status == 403
        async with http.put(out["url"], data=data, headers=out["headers"]) as resp:
            assert resp.status == 200, await resp.text()
    obj, got = await get_object_async(sw, seaweedfs.bucket, out["key"])
    assert got == data
    assert obj["ContentType"] == "text/plain"
    assert obj["ContentDisposition"] == out["headers"]["Content-Disposition"]


@e2e
async def test_declared_sha256_is_enforced_by_the_store(
    store_proxy: Any, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    """A sha256 declared to /sign is signed into the PUT: the store itself refuses
    other bytes of the right size (SeaweedFS 4.48: 400 BadDigest), and a client that
    leaves the header off (403: it is signed)."""
    proxy = await store_proxy()
    data = b"the declared bytes\n" * 500
    digest = hashlib.sha256(data).hexdigest()
    status, out = await call(proxy, "/sign", {**text_file(len(data)), "sha256": digest}, {})
    assert status == 200, out
    assert "x-amz-checksum-sha256" in parse_qs(urlsplit(out["url"]).query)["X-Amz-SignedHeaders"][0]
    headers = out["headers"]
    assert base64.b64decode(headers["x-amz-checksum-sha256"]).hex() == digest
    other = bytes(reversed(data))  # same size, other bytes
    async with aiohttp.ClientSession() as http:
        async with http.put(out["url"], data=other, headers=headers) as resp:
            assert resp.status == 400 and "BadDigest" in await resp.text()
        without = {k: v for k, v in headers.items() if k != "x-amz-checksum-sha256"}
        async with http.put(out["url"], data=data, headers=without) as resp:
            assert resp.status == 403
        async with http.put(out["url"], data=data, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    assert sw.get_object(Bucket=seaweedfs.bucket, Key=out["key"])["Body"].read() == data


@e2e
async def test_post_form_straight_to_the_store(
    store_proxy: Any, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    proxy = await store_proxy()
    data = b"%PDF-1.4 not really\n" * 50

    async def post(fields: dict[str, str], body: bytes) -> tuple[int, str]:
        form = aiohttp.FormData()
        for name, value in fields.items():
            form.add_field(name, value)
        form.add_field("file", body, filename="a.pdf", content_type=fields["Content-Type"])
        async with aiohttp.ClientSession() as http, http.post(out["url"], data=form) as resp:
            return resp.status, await resp.text()

    status, out = await call(proxy, "/sign", {**pdf(len(data)), "method": "post"}, headers={})
    assert status == 200, out
    assert (await post(out["fields"], data + b"x"))[0] == 400  # EntityTooLarge
    assert (await post(out["fields"], data[:-1]))[0] == 400  # EntityTooSmall
    assert (await post({**out["fields"], "Content-Type": "text/html"}, data))[0] == 403
    assert (await post({**out["fields"], "key": out["key"] + "x"}, data))[0] == 403
    status, text = await post(out["fields"], data)
    assert status in (200, 201, 204), text
    obj, got = await get_object_async(sw, seaweedfs.bucket, out["key"])
    assert got == data and obj["ContentType"] == "application/pdf"


@e2e
async def test_expired_url_is_refused(store_proxy: Any, sw: Any, seaweedfs: EmbeddedStore) -> None:
    proxy = await store_proxy(presign_expiry=1)
    status, out = await call(proxy, "/sign", text_file(5), headers={})
    assert status == 200 and out["expires_at"] <= time.time() + 2
    await asyncio.sleep(2.1)
    async with (
        aiohttp.ClientSession() as http,
        http.put(out["url"], data=b"hello", headers=out["headers"]) as resp,
    ):
        assert resp.status == 403
        assert "expired" in (await resp.text()).lower()
    listed = await asyncio.to_thread(sw.list_objects_v2, Bucket=seaweedfs.bucket, Prefix=out["key"])
    assert listed.get("KeyCount") == 0


@e2e
async def test_presign_endpoint_is_signed_for_its_own_host(
    store_proxy: Any, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    """Browsers may reach the store by another name; the URL must be signed for it."""
    public = seaweedfs.endpoint_url.replace("127.0.0.1", "localhost")
    proxy = await store_proxy(presign_endpoint_url=public)
    _, out = await call(proxy, "/sign", text_file(5), headers={})
    assert out["url"].startswith(public + "/") and out["object_url"].startswith(public + "/")
    async with (
        aiohttp.ClientSession() as http,
        http.put(out["url"], data=b"hello", headers=out["headers"]) as resp,
    ):
        assert resp.status == 200, await resp.text()
    assert await read_object_async(sw, seaweedfs.bucket, out["key"]) == b"hello"


@e2e
async def test_multipart_straight_to_the_store(
    store_proxy: Any, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    proxy = await store_proxy()
    data = uuid.uuid4().bytes * (6 * MiB // 16) + b"tail" * 1000
    status, out = await call(proxy, "/sign", text_file(len(data)), headers={})
    assert out["multipart"] is True
    status, up = await call(proxy, "/sign/multipart", text_file(len(data)), headers={})
    assert status == 200, up
    size, count = up["part_size"], up["part_count"]
    assert (size, count) == (5 * MiB, 2)
    ref = {"key": up["key"], "upload_id": up["upload_id"]}
    status, signed = await call(
        proxy, "/sign/multipart/parts", {**ref, "part_numbers": [1, 2]}, headers={}
    )
    assert status == 200, signed
    chunks = [data[i * size : (i + 1) * size] for i in range(count)]
    etags = await put_parts(signed["parts"], chunks)  # both at once
    resp = await proxy.get("/sign/multipart/parts", params=ref)
    listed = (await resp.json())["parts"]
    assert [(p["part_number"], p["size"]) for p in listed] == [(1, 5 * MiB), (2, len(chunks[1]))]
    # etags in JSON are unquoted everywhere, as /upload reports them
    assert [p["etag"] for p in listed] == [e.strip('"') for e in etags]
    given = [{"part_number": n, "etag": e} for n, e in zip((1, 2), etags, strict=True)]
    status, done = await call(proxy, "/sign/multipart/complete", {**ref, "parts": given}, {})
    assert status == 200, done
    assert (done["size"], done["parts"], done["content_type"]) == (len(data), 2, "text/plain")
    assert not done["etag"].startswith('"') and done["etag"].endswith("-2")
    # SeaweedFS makes the multipart ETag from the parts' as S3 does: a retried complete
    # can check a client's parts against it (and refuses others, 400)
    claimed = {n: e.strip('"') for n, e in zip((1, 2), etags, strict=True)}
    assert presign_identity.parts_make_etag(claimed, done["etag"]) is True
    bogus = [{**given[0], "etag": "0" * 32}, given[1]]
    status, out = await call(proxy, "/sign/multipart/complete", {**ref, "parts": bogus}, {})
    assert (status, code(out)) == (400, "INVALID_REQUEST"), out
    obj, got = await get_object_async(sw, seaweedfs.bucket, up["key"])
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert obj["ContentType"] == "text/plain"


@e2e
async def test_multipart_abort_leaves_nothing(
    store_proxy: Any, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    proxy = await store_proxy()
    status, up = await call(proxy, "/sign/multipart", text_file(7 * MiB), headers={})
    ref = {"key": up["key"], "upload_id": up["upload_id"]}
    _, signed = await call(proxy, "/sign/multipart/parts", {**ref, "part_numbers": [1]}, {})
    await put_parts(signed["parts"], [b"x" * 5 * MiB])
    status, out = await call(proxy, "/sign/multipart/abort", ref, headers={})
    assert status == 200 and out["aborted"] is True
    uploads = await open_uploads_async(sw, seaweedfs.bucket)
    assert up["upload_id"] not in [u["UploadId"] for u in uploads]
    listed = await asyncio.to_thread(sw.list_objects_v2, Bucket=seaweedfs.bucket, Prefix=up["key"])
    assert listed.get("KeyCount") == 0
    status, out = await call(proxy, "/sign/multipart/parts", {**ref, "part_numbers": [2]}, {})
    assert (status, code(out)) == (404, "NO_SUCH_UPLOAD")


async def test_token_reads_what_it_signed_and_cannot_touch_beside(
    authed: Any, s3: Any, bucket: str
) -> None:
    """One rule for /sign and /files: a token holder reads the key it was signed, and may
    neither read nor complete nor abort beside it, even under its own grant prefix."""
    mine = token()
    status, out = await call(authed, "/sign", pdf(5), mine)
    assert status == 200 and out["key"].startswith("users/42/uploads/"), out
    async with (
        aiohttp.ClientSession() as http,
        http.put(out["url"], data=b"%PDF-", headers=out["headers"]) as resp,
    ):
        assert resp.status == 200
    got = await authed.get("/files/" + out["key"], headers=mine)
    assert (got.status, await got.read()) == (200, b"%PDF-")
    got = await authed.get("/files/" + out["key"], headers=token(prefix="users/43/"))
    assert got.status == 403
    # The backend's own multipart upload beside the token's uploads, under its prefix.
    beside = "users/42/avatar.png"
    created = await asyncio.to_thread(s3.create_multipart_upload, Bucket=bucket, Key=beside)
    upload_id = created["UploadId"]
    try:
        ref = {"key": beside, "upload_id": upload_id}
        for route in ("/sign/multipart/complete", "/sign/multipart/abort"):
            status, out = await call(authed, route, ref, mine)
            assert (status, code(out)) == (403, "KEY_FORBIDDEN"), route
        assert [u["UploadId"] for u in await open_uploads_async(s3, bucket)] == [upload_id]
        got = await authed.get("/files/" + beside, headers=mine)
        assert got.status == 403
    finally:
        await asyncio.to_thread(
            s3.abort_multipart_upload, Bucket=bucket, Key=beside, UploadId=upload_id
        )


# --- a declared sha256 fixed in the signature (issue #12; the store's side) ------------


@e2e
async def test_store_refuses_other_bytes_than_a_signed_checksum_sha256(
    sw: Any, seaweedfs: EmbeddedStore
) -> None:
    """What ``/sign`` with a declared sha256 relies on: botocore's presigner signs
    ``x-amz-checksum-sha256`` (ChecksumSHA256) as a header of a PUT and of an UploadPart,
    and SeaweedFS refuses bytes whose sha256 is not that value, or the header left off or
    changed; the right bytes with the signed header are stored."""
    data = b"the declared bytes\n" * 100
    declared = base64.b64encode(hashlib.sha256(data).digest()).decode()
    key = f"presign/{uuid.uuid4().hex}/declared.txt"
    params = {"Bucket": seaweedfs.bucket, "Key": key, "ContentLength": len(data)}
    # SigV4, as the proxy's presigning client (boto3 would presign SigV2 by default).
    signer = boto3.client(
        "s3",
        config=BOTO_CONFIG.merge(Config(signature_version="s3v4")),
        **s3_client_kwargs(seaweedfs),
    )
    url = signer.generate_presigned_url(
        "put_object", Params={**params, "ChecksumSHA256": declared}, ExpiresIn=60
    )
    signer.close()
    assert "x-amz-checksum-sha256" in parse_qs(urlsplit(url).query)["X-Amz-SignedHeaders"][0]
    other = bytes([data[0] ^ 1]) + data[1:]  # same size, one bit off
    other_sha = base64.b64encode(hashlib.sha256(other).digest()).decode()
    async with aiohttp.ClientSession() as http:
        refusals = [
            (400, {"x-amz-checksum-sha256": declared}),  # other bytes: BadDigest
            (403, {"x-amz-checksum-sha256": other_sha}),  # header changed: not signed
            (403, {}),  # header left off: not signed
        ]
        for status, headers in refusals:
            async with http.put(url, data=other, headers=headers) as resp:
                assert resp.status == status, (headers, await resp.text())
        assert sw.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=key).get("KeyCount") == 0
        async with http.put(url, data=data, headers={"x-amz-checksum-sha256": declared}) as resp:
            assert resp.status == 200, await resp.text()
    assert sw.get_object(Bucket=seaweedfs.bucket, Key=key)["Body"].read() == data


BAD_UPLOAD_IDS = pytest.mark.parametrize("upload_id", ["a/b", "..", "../x", "a\\b", "x/../y"])


async def refused_upload_id(proxy: Any, upload_id: str, headers: dict[str, str]) -> None:
    """Every multipart route answers 400 to ``upload_id``, and no S3 error is counted."""
    ref = {"key": "presign/x/y", "upload_id": upload_id, "part_numbers": [1]}
    for path in ("/sign/multipart/parts", "/sign/multipart/complete", "/sign/multipart/abort"):
        status, out = await call(proxy, path, ref, headers)
        assert (status, code(out)) == (400, "INVALID_REQUEST"), (path, out)
    query = {"key": ref["key"], "upload_id": upload_id}
    resp = await proxy.get("/sign/multipart/parts", params=query, headers=headers)
    assert resp.status == 400, await resp.text()
    metrics = await (await proxy.get("/metrics", headers=headers)).text()
    assert "s3proxy_s3_errors_total{" not in metrics


@BAD_UPLOAD_IDS
async def test_an_upload_id_the_proxy_did_not_make_is_refused(
    proxy_factory: Any, upload_id: str
) -> None:
    """An upload id no store makes (a path: ``/``, ``\\``, ``..``) is refused before S3 is
    asked (moto answered NoSuchUpload; abort even said "aborted": true)."""
    proxy = await proxy_factory(key_template="presign/{uuid}/{filename}")
    await refused_upload_id(proxy, upload_id, {})


@e2e
@BAD_UPLOAD_IDS
async def test_an_upload_id_the_store_cannot_route_is_the_clients_fault(
    store_proxy: Any, sw: Any, upload_id: str
) -> None:
    """SeaweedFS refuses such an id as InvalidRequest: that was a 502 UPSTREAM_ERROR
    ("S3 ListParts failed: InvalidRequest") counted against S3; it is the client's 400."""
    await refused_upload_id(await store_proxy(), upload_id, {})


@pytest.mark.parametrize(
    ("upload_id", "plausible"),
    [
        ("VXBsb2FkIElEIGZvciA2aWWpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA", True),  # AWS's docs
        ("xadcOB_7YPBOJuoFiQ9cz4P3Pe6FIZwO4f7wN93uHsNBEw97pl5eNwzExg0LAT2dUN91cOmrEQ--", True),
        ("2~iCw_lDY8VoNgvyZbnjO2pBPXYlXS8ac", True),  # Ceph
        ("f0e1d2c3b4a5968778695a4b3c2d1e0f", True),  # SeaweedFS
        ("a.b", True),
        ("a/b", False),
        ("a\\b", False),
        ("..", False),
        (".", False),
        ("", False),
        ("a\nb", False),
        ("x" * 1025, False),
    ],
)
def test_plausible_upload_ids(upload_id: str, plausible: bool) -> None:
    assert presign.plausible_upload_id(upload_id) is plausible


async def stored_keys(s3: Any, bucket: str) -> list[str]:
    """The bucket's keys but the uploads' records (``presign_record``: see its tests)."""
    listing = await asyncio.to_thread(s3.list_objects_v2, Bucket=bucket)
    keys = [o["Key"] for o in listing.get("Contents", [])]
    return [k for k in keys if not k.startswith(presign_record.PREFIX)]


@pytest.mark.parametrize("stored", [7 * MiB, 6 * MiB], ids=["wrong-size", "right-size"])
@pytest.mark.parametrize(
    ("op", "fault"),
    [
        ("HeadObject", Fault(status=500)),
        ("HeadObject", Fault(delay=30)),
        ("CompleteMultipartUpload", Fault(late=2.0)),
    ],
    ids=["head-500", "head-hangs", "complete-answer-lost"],
)
async def test_a_complete_that_fails_after_s3_completed_keeps_no_unchecked_object(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, op: str, fault: Fault, stored: int
) -> None:
    """Signed for 6 MiB; S3 completes, then the size check cannot run (HeadObject fails or
    hangs; Complete's answer is lost). The client told of a failure must not leave an
    object that was never held to its size (a 7 MiB one stayed), and a retried complete
    finds what S3 made and checks it: gone if wrong, success if right (was 404
    NO_SUCH_UPLOAD, the object kept unchecked)."""
    armed = False
    rule = lambda o, n: fault if armed and o == op else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=2,
            s3_read_timeout=1.0,
            key_template="uploads/{uuid}/{filename}",
        )
        status, up = await call(proxy, "/sign/multipart", pdf(6 * MiB), {})
        assert status == 200, up
        ref = {"key": up["key"], "upload_id": up["upload_id"]}
        await asyncio.to_thread(
            s3.upload_part, Bucket=bucket, PartNumber=1, Body=b"x" * stored,
            Key=ref["key"], UploadId=ref["upload_id"],
        )  # fmt: skip
        armed = True
        first, out = await call(proxy, "/sign/multipart/complete", ref, {})
        armed = False
        keys = await stored_keys(s3, bucket)
        if first != 200:
            # told it failed: nothing unchecked stands
            assert stored == 6 * MiB or keys == [], (first, out, keys)
        again, out2 = await call(proxy, "/sign/multipart/complete", ref, {})
    keys = await stored_keys(s3, bucket)
    if stored == 6 * MiB:
        assert 200 in (first, again) or keys == [], (first, out, again, out2)
        assert first == 200 or again in (200, 404), (first, out, again, out2)
    else:
        assert keys == [], (first, out, again, out2)
        assert (again, code(out2)) in ((400, "INVALID_REQUEST"), (404, "NO_SUCH_UPLOAD"))
    if keys:
        await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=keys[0])


async def test_a_complete_whose_first_attempt_was_held_deletes_a_wrong_size_again_later(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """Complete's first attempt held on the way past --s3-read-timeout, the retry
    completed: the object is the wrong size and is deleted (400), and since the held
    attempt may still be carried out after that delete, the delete is made again later
    (2 x and 8 x --s3-read-timeout), as for /upload's rollback."""
    held = lambda o, n: Fault(delay=1.5) if (o, n) == ("CompleteMultipartUpload", 1) else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, held) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=3,
            s3_read_timeout=0.5,
            key_template="uploads/{uuid}/{filename}",
        )
        status, up = await call(proxy, "/sign/multipart", pdf(6 * MiB), {})
        assert status == 200, up
        ref = {"key": up["key"], "upload_id": up["upload_id"]}
        await asyncio.to_thread(
            s3.upload_part, Bucket=bucket, PartNumber=1, Body=b"x" * 7 * MiB,
            Key=ref["key"], UploadId=ref["upload_id"],
        )  # fmt: skip
        got, out = await call(proxy, "/sign/multipart/complete", ref, {})
        assert (got, code(out)) == (400, "INVALID_REQUEST"), out
        assert faulty.calls.count("CompleteMultipartUpload") == 2
        await eventually(
            lambda: faulty.calls.count("DeleteObject"),
            until=lambda n: n >= 3,
            within=6.0,
            what="the size check's delete and its two rechecks",
        )
    assert await stored_keys(s3, bucket) == []


# --- the completion webhook ---------------------------------------------------------


async def _multipart_done(proxy: Any, s3: Any, bucket: str) -> dict[str, str]:
    """A presigned multipart upload of report.pdf (6 MiB, one part) ready to complete."""
    status, up = await call(proxy, "/sign/multipart", pdf(6 * MiB), {})
    assert status == 200, up
    ref = {"key": up["key"], "upload_id": up["upload_id"]}
    await asyncio.to_thread(
        s3.upload_part, Bucket=bucket, PartNumber=1, Body=b"x" * 6 * MiB,
        Key=ref["key"], UploadId=ref["upload_id"],
    )  # fmt: skip
    return ref


async def test_multipart_complete_tells_the_webhook(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """The proxy completes the object, so the receiver hears of it as of an /upload file
    (what the proxy never saw is null). A retried complete sends it again: at least once."""
    server, got = await receiver(aiohttp_server, 204)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")),
        webhook_secret=HOOK_SECRET,
        key_template="uploads/{uuid}/{filename}",
    )
    ref = await _multipart_done(proxy, s3, bucket)
    status, out = await call(proxy, "/sign/multipart/complete", ref, {})
    assert status == 200, out
    assert out["webhook"] == {"delivered": True}
    [event] = got
    assert event["signed"]
    body = event["body"]
    assert body["event"] == "upload.completed" and body["fields"] == {}
    assert body["files"] == [
        {
            "field": None,
            "filename": "report.pdf",
            "key": ref["key"],
            "size": 6 * MiB,
            "content_type": "application/pdf",
            "etag": out["etag"],
            "sha256": None,
            "checksum": None,
            "metadata": {},
        }
    ]
    status, again = await call(proxy, "/sign/multipart/complete", ref, {})
    assert status == 200 and again["key"] == ref["key"]
    assert [e["body"]["files"][0]["key"] for e in got] == [ref["key"]] * 2
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


async def test_multipart_complete_rolls_back_when_the_webhook_fails(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    server, got = await receiver(aiohttp_server, 500)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")),
        webhook_secret=HOOK_SECRET,
        webhook_attempts=2,
        key_template="uploads/{uuid}/{filename}",
    )
    ref = await _multipart_done(proxy, s3, bucket)
    status, out = await call(proxy, "/sign/multipart/complete", ref, {})
    assert (status, code(out)) == (502, "WEBHOOK_FAILED")
    assert await stored_keys(s3, bucket) == [] and await open_uploads_async(s3, bucket) == []
    assert [e["body"]["event"] for e in got] == ["upload.completed"] * 2 + ["upload.rolled_back"]
    assert got[-1]["body"]["keys"] == [ref["key"]]
    assert got[-1]["body"]["reason"] == "WEBHOOK_FAILED"
    status, out = await call(proxy, "/sign/multipart/complete", ref, {})
    assert (status, code(out)) == (404, "NO_SUCH_UPLOAD")


async def test_multipart_complete_keeps_the_object_if_so_configured(
    proxy_factory: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    server, _ = await receiver(aiohttp_server, 400)
    proxy = await proxy_factory(
        webhook_url=str(server.make_url("/hook")),
        webhook_secret=HOOK_SECRET,
        webhook_failure="keep",
        key_template="uploads/{uuid}/{filename}",
    )
    ref = await _multipart_done(proxy, s3, bucket)
    status, out = await call(proxy, "/sign/multipart/complete", ref, {})
    assert status == 200, out
    assert out["webhook"]["delivered"] is False and "400" in out["webhook"]["error"]
    assert await stored_keys(s3, bucket) == [ref["key"]]
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


@pytest.mark.parametrize("retried", [True, False], ids=["retried", "not-retried"])
@pytest.mark.parametrize("stored", [6 * MiB, 7 * MiB], ids=["right-size", "wrong-size"])
async def test_a_queued_delete_never_removes_what_a_retried_complete_reported(
    proxy_factory: Any,
    aiohttp_server: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    stored: int,
    retried: bool,
) -> None:
    """Signed for 6 MiB; S3 completes, the size check fails (HeadObject 500) and so does
    the delete that follows (DeleteObject 500): the client gets 502 and the delete goes to
    the janitor. The client's retried complete then finds the object, checks it and
    answers 200; the janitor must not delete it afterwards (the faults probe's s15: 200,
    then the object gone 6 s later). The janitor holds it to its size instead: it deletes
    a wrong-sized object, and keeps a right-sized one (a retry may report it stored),
    which the webhook is told of even if no complete is retried (the re-probe: kept after
    the 502, the application never heard of it)."""
    server, got = await receiver(aiohttp_server, 204)
    armed = False
    rule = lambda o, n: (  # noqa: E731
        Fault(status=500) if armed and o in ("HeadObject", "DeleteObject") else None
    )
    async with FaultyS3(moto.endpoint_url, rule, name=claim_operation) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=1,
            key_template="uploads/{uuid}/{filename}",
            webhook_url=str(server.make_url("/hook")),
            webhook_secret=HOOK_SECRET,
        )
        janitor = proxy.app[STATE].janitor
        janitor.interval = 0.3
        status, up = await call(proxy, "/sign/multipart", pdf(6 * MiB), {})
        assert status == 200, up
        ref = {"key": up["key"], "upload_id": up["upload_id"]}
        await asyncio.to_thread(
            s3.upload_part, Bucket=bucket, PartNumber=1, Body=b"x" * stored,
            Key=ref["key"], UploadId=ref["upload_id"],
        )  # fmt: skip
        armed = True
        first, out = await call(proxy, "/sign/multipart/complete", ref, {})
        assert (first, code(out)) == (502, "UPSTREAM_ERROR"), out
        assert await stored_keys(s3, bucket) == [ref["key"]]  # the delete failed
        armed = False
        if retried:
            again, out2 = await call(proxy, "/sign/multipart/complete", ref, {})
            assert again == (200 if stored == 6 * MiB else 400), out2
        await eventually(lambda: not janitor._tasks, within=10, what="the janitor's retry")
        assert "DeleteObject" in faulty.calls
    kept = stored == 6 * MiB
    assert await stored_keys(s3, bucket) == ([ref["key"]] if kept else [])
    told = [e["body"]["files"][0]["key"] for e in got if e["body"]["event"] == "upload.completed"]
    # the retried complete tells it, and the janitor's keep (at least once)
    assert told == [ref["key"]] * ((2 if retried else 1) if kept else 0)
    if kept:
        await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


EMPTY_PARTS = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<ListPartsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<IsTruncated>false</IsTruncated></ListPartsResult>"
)


@pytest.mark.parametrize(
    ("op", "fault", "no_overwrite"),
    [
        ("ListParts", Fault(status=200, body=EMPTY_PARTS), None),
        ("CompleteMultipartUpload", Fault(status=400, code="InvalidPart"), None),
        ("CompleteMultipartUpload", Fault(status=412, code="PreconditionFailed"), True),
    ],
    ids=["no-parts-listed", "parts-refused", "precondition-refused"],
)
async def test_a_complete_racing_another_answers_for_the_object_it_stored(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, op: str, fault: Fault, no_overwrite: Any
) -> None:
    """Two completes of one upload at once (a client's retry through another instance):
    the one that loses sees S3 list no parts (SeaweedFS, for a moment), or list them and
    then refuse the parts or the precondition, while the other has stored the file. It was
    told 400 "no part has been uploaded" (or 409 KEY_EXISTS) for a stored file (the lb
    probe, 2 of 16 races): it must answer 200 for the object, held to its size."""
    ref: dict[str, str] = {}

    def other_completes(_: Any) -> None:
        """The other complete lands between this one's ListParts and its Complete."""
        parts = s3.list_parts(Bucket=bucket, Key=ref["key"], UploadId=ref["upload_id"])["Parts"]
        s3.complete_multipart_upload(
            Bucket=bucket, Key=ref["key"], UploadId=ref["upload_id"],
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": parts[0]["ETag"]}]},
        )  # fmt: skip

    armed = False

    def rule(o: str, n: int) -> Fault | None:
        if not armed:
            return None
        if op == "ListParts":
            return fault if o == op else None
        if o == "ListParts":
            return Fault(answer=other_completes)
        return fault if o == op else None

    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=1,
            key_template="uploads/{uuid}/{filename}",
            no_overwrite=no_overwrite,
        )
        status, up = await call(proxy, "/sign/multipart", pdf(6 * MiB), {})
        assert status == 200, up
        ref.update(key=up["key"], upload_id=up["upload_id"])
        await asyncio.to_thread(
            s3.upload_part, Bucket=bucket, PartNumber=1, Body=b"x" * 6 * MiB,
            Key=ref["key"], UploadId=ref["upload_id"],
        )  # fmt: skip
        if op == "ListParts":  # the other complete is done: S3 lists no part for a moment
            other, out = await call(proxy, "/sign/multipart/complete", ref, {})
            assert other == 200, out
        before = len(faulty.calls)
        armed = True
        status, out = await call(proxy, "/sign/multipart/complete", ref, {})
        armed = False
        assert op in faulty.calls[before:]
    assert status == 200, out
    assert out["key"] == ref["key"] and out["size"] == 6 * MiB, out
    assert await stored_keys(s3, bucket) == [ref["key"]]
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


# --- one complete at a time: the claim ----------------------------------------------


def test_parts_make_etag() -> None:
    """The multipart ETag rule (md5 of the parts' binary md5s, "-N"); None where it cannot
    be told (not a multipart ETag)."""
    a, b = hashlib.md5(b"a").hexdigest(), hashlib.md5(b"b").hexdigest()
    whole = hashlib.md5(bytes.fromhex(a) + bytes.fromhex(b)).hexdigest()
    assert presign_identity.parts_make_etag({1: a, 2: b}, f'"{whole}-2"') is True
    assert presign_identity.parts_make_etag({1: b, 2: a}, f"{whole}-2") is False
    assert presign_identity.parts_make_etag({1: a}, f"{whole}-2") is False
    assert presign_identity.parts_make_etag({1: a, 3: b}, f"{whole}-2") is False
    assert presign_identity.parts_make_etag({1: "bogus", 2: b}, f"{whole}-2") is False
    assert presign_identity.parts_make_etag({1: a}, a) is None
    assert presign_identity.parts_make_etag({1: a}, None) is None


async def complete_until_decided(
    proxy: Any, ref: dict[str, Any], within: float = 10.0
) -> tuple[int, dict[str, Any]]:
    """A complete retried as a client does on 409 COMPLETE_IN_PROGRESS (after Retry-After)."""
    ends = time.monotonic() + within
    while True:
        resp = await proxy.post("/sign/multipart/complete", data=json.dumps(ref).encode())
        out = await resp.json()
        if resp.status != 409 or code(out) != "COMPLETE_IN_PROGRESS" or time.monotonic() > ends:
            return resp.status, out
        assert resp.headers["Retry-After"] == "2"
        await asyncio.sleep(0.3)


async def test_a_retried_complete_with_parts_that_do_not_match_is_refused(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """The reprobe's F5: once the object existed, a complete with a bogus part list was
    answered 200 with it (README: parts not matching are 400 INVALID_REQUEST)."""
    proxy = await proxy_factory(key_template="uploads/{uuid}/{filename}")
    ref = await _multipart_done(proxy, s3, bucket)
    status, out = await call(proxy, "/sign/multipart/complete", ref, {})
    assert status == 200, out
    bogus = {**ref, "parts": [{"part_number": 1, "etag": "bogus"}]}
    status, out = await call(proxy, "/sign/multipart/complete", bogus, {})
    assert (status, code(out)) == (400, "INVALID_REQUEST"), out
    other = {**ref, "parts": [{"part_number": 1, "etag": hashlib.md5(b"x").hexdigest()}]}
    status, out = await call(proxy, "/sign/multipart/complete", other, {})
    assert (status, code(out)) == (400, "INVALID_REQUEST"), out
    listed = (await asyncio.to_thread(s3.head_object, Bucket=bucket, Key=ref["key"]))["ETag"]
    assert listed.strip('"').endswith("-1")
    # its own part list (the part's ETag is its MD5) is answered for
    mine = {**ref, "parts": [{"part_number": 1, "etag": hashlib.md5(b"x" * 6 * MiB).hexdigest()}]}
    status, out = await call(proxy, "/sign/multipart/complete", mine, {})
    assert status == 200, out
    assert await stored_keys(s3, bucket) == [ref["key"]]
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


async def _slow_failing_receiver(aiohttp_server: Any) -> tuple[Any, list[str]]:
    """A receiver that takes 3 s over the first upload.completed and answers 500, then
    answers every event 204 at once (the reprobe's presrace.py)."""
    got: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        event = (await request.json())["event"]
        got.append(event)
        if got.count("upload.completed") == 1 and event == "upload.completed":
            await asyncio.sleep(3)
            return web.Response(status=500)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    return await aiohttp_server(app), got


@pytest.mark.parametrize("trigger", ["webhook-rollback", "size-unchecked"])
async def test_no_complete_answers_200_for_an_object_another_still_deletes(
    proxy_factory: Any, aiohttp_server: Any, moto: Any, s3: Any, bucket: str, trigger: str
) -> None:
    """The reprobe's F2: complete A stores the object and is still deciding (its webhook
    slow to fail; or its Complete answered 2 s late and then its size check failing) when
    complete B of the same upload (a retry through another instance) finds the object and
    answered 200 for it; then A deleted it (502), and the object was gone after B's 200.
    Now B is answered 409 COMPLETE_IN_PROGRESS while A holds the upload's claim, and a
    retry after A has decided agrees with A."""
    server, got = await _slow_failing_receiver(aiohttp_server)
    head_fails = False

    def rule(op: str, n: int) -> Fault | None:
        if trigger == "size-unchecked" and (op, n) == ("CompleteMultipartUpload", 1):
            return Fault(late=2.0)
        if head_fails and op == "HeadObject":
            return Fault(status=500)
        return None

    async with FaultyS3(moto.endpoint_url, rule, name=claim_operation) as faulty:
        settings: dict[str, Any] = {
            "endpoint_url": faulty.endpoint_url,
            "s3_max_attempts": 1,
            "key_template": "uploads/{uuid}/{filename}",
        }
        if trigger == "webhook-rollback":
            settings.update(
                webhook_url=str(server.make_url("/hook")),
                webhook_secret=HOOK_SECRET,
                webhook_attempts=1,
            )
        one, other = await proxy_factory(**settings), await proxy_factory(**settings)
        ref = await _multipart_done(one, s3, bucket)
        first = asyncio.create_task(call(one, "/sign/multipart/complete", ref, {}))
        await asyncio.sleep(0.7 if trigger == "size-unchecked" else 1.0)
        resp = await other.post("/sign/multipart/complete", data=json.dumps(ref).encode())
        b_status, b_out = resp.status, await resp.json()
        head_fails = True
        a_status, a_out = await first
        head_fails = False
        keys = await stored_keys(s3, bucket)
        assert b_status != 200 or keys == [ref["key"]], (b_status, b_out, a_status, a_out, keys)
        assert (b_status, code(b_out)) == (409, "COMPLETE_IN_PROGRESS"), b_out
        assert resp.headers["Retry-After"] == "2"
        assert a_status == 502 and keys == [], (a_out, keys)
        # once A has decided, a retry agrees: the object is gone
        again, out = await complete_until_decided(other, ref)
    assert (again, code(out)) == (404, "NO_SUCH_UPLOAD"), out
    assert "upload.completed" not in got[1:], got  # B told the receiver nothing
    assert await stored_keys(s3, bucket) == []


async def test_a_lapsed_claim_is_taken_over_and_a_live_one_refuses(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """A claim another instance holds refuses the complete (409, Retry-After); one whose
    holder died lapses after its lease (plus --cleanup-clock-skew) and the next complete
    takes it over, completes and leaves no claim behind. The sweep deletes lapsed claims
    only."""
    proxy = await proxy_factory(key_template="uploads/{uuid}/{filename}", cleanup_clock_skew=5)
    ref = await _multipart_done(proxy, s3, bucket)
    where = presign_claim.claim_key(ref["key"], ref["upload_id"])

    def claim(until: float) -> None:
        body = json.dumps({"owner": "another", "until": until}).encode()
        s3.put_object(Bucket=bucket, Key=where, Body=body)

    await asyncio.to_thread(claim, time.time() + 60)
    resp = await proxy.post("/sign/multipart/complete", data=json.dumps(ref).encode())
    out = await resp.json()
    assert (resp.status, code(out)) == (409, "COMPLETE_IN_PROGRESS"), out
    assert resp.headers["Retry-After"] == "2" and "in 65 s" in out["error"]["message"], out
    await asyncio.to_thread(claim, time.time() - 6)  # lapsed: past until + skew
    status, out = await call(proxy, "/sign/multipart/complete", ref, {})
    assert status == 200, out
    assert await stored_keys(s3, bucket) == [ref["key"]]  # the claim released
    sink = proxy.app[STATE].require_sink()
    await asyncio.to_thread(claim, time.time() - 6)
    lapsed, live = where, presign_claim.PREFIX + "live"
    await asyncio.to_thread(
        s3.put_object, Bucket=bucket, Key=live,
        Body=json.dumps({"owner": "x", "until": time.time() + 60}).encode(),
    )  # fmt: skip
    assert await presign_claim.sweep(sink, time.time(), 5) == 1
    assert await stored_keys(s3, bucket) == [live, ref["key"]]
    assert lapsed not in await stored_keys(s3, bucket)
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=live)
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


@pytest.mark.parametrize(
    ("settings", "lease"),
    [
        # the defaults: the delete (30 s, plus 240 s to land) and one renewal attempt
        # (10 s + 120 s), times 1.5, and a margin: ~10 min (it was ~40, 3 S3 calls of
        # 5 x (10 s + 120 s), the webhook, the delete: reprobe9a F5 and its note)
        ({}, 1.5 * ((30 + 240) + (10 + 120)) + 5),
        # the webhook's attempts and waits do not lengthen it: renewals cover them
        ({"webhook_url": "http://hook.example/"}, 1.5 * ((30 + 240) + (10 + 120)) + 5),
        ({"s3_read_timeout": 30.0}, 1.5 * ((30 + 60) + (10 + 30)) + 5),
        # an S3 call shorter than a cleanup's 30 s bounds the delete instead
        (
            {"s3_read_timeout": 2.0, "s3_connect_timeout": 1.0, "s3_max_attempts": 1},
            1.5 * ((3 + 4) + (1 + 2)) + 5,
        ),
    ],
    ids=["defaults", "webhook", "read-30s", "fast"],
)
def test_the_lease_is_short_and_a_renewed_holder_may_still_delete(
    settings: dict[str, Any], lease: float
) -> None:
    """The lease stands from the last renewal: a third on, another renewal begins; with one
    attempt of it timed out (``renew_time``) the holder still has ``delete_bound`` left."""
    s = Settings(**settings)
    assert presign_claim.lease(s) == pytest.approx(lease)
    every = presign_claim.renew_every(presign_claim.lease(s))
    left = presign_claim.lease(s) - every - presign_claim.renew_time(s)
    assert left >= presign_claim.delete_bound(s)
    assert presign_claim.stands(0.0, left, presign_claim.delete_bound(s))


@pytest.mark.parametrize(
    ("now", "ends", "bound", "stands"),
    [(0, 10, 5, True), (5, 10, 5, False), (4.9, 10, 5, True), (11, 10, 0, False)],
)
def test_a_claim_stands_for_a_delete_only_if_it_lands_before_the_lease_ends(
    now: float, ends: float, bound: float, stands: bool
) -> None:
    assert presign_claim.stands(now, ends, bound) is stands


@pytest.mark.parametrize(
    ("hold", "every", "steps"),
    [
        (10, 3, (3, 6, 9, 10)),
        (9, 3, (3, 6, 9)),
        (2, 3, (2,)),
        (0, 3, (0,)),
    ],
)
def test_a_held_claim_is_renewed_until_its_release(
    hold: float, every: float, steps: tuple[float, ...]
) -> None:
    """After its request, a claim held for rechecks is renewed by the janitor every
    ``every`` seconds; the last step releases it."""
    assert presign_claim.hold_steps(hold, every) == steps


def _short_claim(sink: Any, key: str, lease: float = 1.5) -> presign_claim.Claim:
    claim = presign_claim.Claim(sink, presign_claim.PREFIX + key, lease, 0.2)
    claim.window = 0.3  # rechecks 0.3 s and 1.2 s on
    return claim


async def test_a_claim_is_renewed_while_its_complete_runs(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """A claim on a 1.5 s lease, held 3 s (a long complete): still its holder's, refusing
    another complete (409, the countdown within the lease), and its holder may delete; its
    release removes it. Before, the lease was fixed at the take: past it another complete
    took the claim over while the first still ran."""
    proxy = await proxy_factory()
    sink = proxy.app[STATE].require_sink()
    held = _short_claim(sink, "renewed")
    await held.take("k", "u", 0.0, None)
    await asyncio.sleep(3.0)
    assert held.may_delete() and not held.lost
    other = _short_claim(sink, "renewed")
    with pytest.raises(ProxyError) as refused:
        await other.take("k", "u", 0.0, None)
    assert refused.value.kind is COMPLETE_IN_PROGRESS
    countdown = re.search(r"if its instance died: in (\d+) s", refused.value.message)
    assert countdown is not None and int(countdown[1]) <= 2, refused.value.message
    await held.release(None)
    assert presign_claim.PREFIX + "renewed" not in await stored_keys(s3, bucket)


async def test_a_claim_taken_over_is_lost_and_its_holder_deletes_nothing(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """A holder that stalled past its lease finds at its next renewal that another
    complete took the claim over: it deletes nothing more, and its release leaves the
    other's claim alone."""
    proxy = await proxy_factory()
    sink = proxy.app[STATE].require_sink()
    held = _short_claim(sink, "lost")
    await held.take("k", "u", 0.0, None)
    body = json.dumps({"owner": "another", "until": time.time() + 60}).encode()
    await asyncio.to_thread(
        s3.put_object, Bucket=bucket, Key=presign_claim.PREFIX + "lost", Body=body
    )
    await eventually(lambda: held.lost, within=3, what="the renewal finding it lost")
    assert not held.may_delete()
    await held.release(None)
    got = await asyncio.to_thread(s3.get_object, Bucket=bucket, Key=presign_claim.PREFIX + "lost")
    assert json.loads(got["Body"].read())["owner"] == "another"
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=presign_claim.PREFIX + "lost")


async def test_a_claim_held_for_rechecks_is_renewed_by_the_janitor(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """A complete whose Complete may land late holds its claim after the request for the
    rechecks (``release_after``): renewed meanwhile (it outlasts its 1.5 s lease, its
    holder may still delete), released at the end of the hold."""
    proxy = await proxy_factory()
    sink = proxy.app[STATE].require_sink()
    janitor = proxy.app[STATE].janitor
    held = _short_claim(sink, "held")
    await held.take("k", "u", 0.0, janitor)
    held.release_after(janitor, 3.5)
    await asyncio.sleep(2.5)
    assert held.may_delete()
    with pytest.raises(ProxyError):
        await _short_claim(sink, "held").take("k", "u", 0.0, None)
    await eventually(
        lambda: stored_keys(s3, bucket),
        until=lambda keys: presign_claim.PREFIX + "held" not in keys,
        within=5,
        what="the release at the end of the hold",
    )
    assert not held.may_delete()


@pytest.mark.parametrize("attempts", [1, 2], ids=["complete-failed", "complete-retried"])
async def test_a_claim_written_late_is_released_again_later(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, attempts: int
) -> None:
    """reprobe9a F5: S3 holds the claim's PutObject past --s3-read-timeout and then stores
    it. With one attempt the complete answers 504 and its release finds nothing yet; with
    two, the retry writes the claim, the complete answers 200 and releases it, and the
    first attempt lands after. Either way a claim nobody holds stood, and every retry was
    409 COMPLETE_IN_PROGRESS until it lapsed (lease and clock skew: over a minute here, ~40
    min with the defaults). Now
    the release is made again 2 x and 8 x --s3-read-timeout later: a retry soon gets 200."""

    held = asyncio.Event()  # S3 holds the first attempt until the complete has answered

    def rule(op: str, n: int) -> Fault | None:
        return Fault(until=held) if (op, n) == ("PutObject:claim", 1) else None

    async with FaultyS3(moto.endpoint_url, rule, name=claim_operation) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            key_template="uploads/{uuid}/{filename}",
            s3_read_timeout=1.0,
            s3_connect_timeout=1.0,
            s3_max_attempts=attempts,
        )
        ref = await _multipart_done(proxy, s3, bucket)
        where = presign_claim.claim_key(ref["key"], ref["upload_id"])
        first, out = await call(proxy, "/sign/multipart/complete", ref, {})
        assert (first, first == 200 or code(out)) == (
            (504, "UPSTREAM_TIMEOUT") if attempts == 1 else (200, True)
        ), out
        held.set()
        await eventually(
            lambda: stored_keys(s3, bucket),
            until=lambda keys: where in keys,
            within=5,
            what="the claim written late",
        )
        landed = time.monotonic()
        again, out = await complete_until_decided(proxy, ref, within=12)
        waited = time.monotonic() - landed
    assert again == 200, out
    assert waited < 6, waited  # the recheck 2 s after the release; before, over a minute
    assert await stored_keys(s3, bucket) == [ref["key"]]


# --- a Complete carried out after its answer was lost (reprobe9a) -------------------


def _completed_events(got: list[dict[str, Any]]) -> list[str]:
    return [e["body"]["files"][0]["key"] for e in got if e["body"]["event"] == "upload.completed"]


@pytest.mark.parametrize(
    ("template", "stored"),
    [
        ("uploads/{uuid}/{filename}", 6 * MiB),
        ("plain/{filename}", 6 * MiB),
        ("plain/{filename}", 7 * MiB),
    ],
    ids=["unique-key", "shared-key", "shared-key-wrong-size"],
)
async def test_a_complete_carried_out_after_its_504_is_checked_later_and_told(
    proxy_factory: Any,
    aiohttp_server: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    template: str,
    stored: int,
) -> None:
    """reprobe9a F1/F2: S3 holds the Complete past --s3-read-timeout and then carries it
    out. The client got 504 saying nothing of a retry; the object stayed, the webhook
    never heard of it and nothing rechecked it; on a shared key (no {uuid}) the retried
    complete answered 404 while the client's bytes took the key. Now the 504 says to
    retry the complete, a check 2 x and 8 x --s3-read-timeout later holds the object to
    its size (keeps and tells the webhook a right-sized one, deletes a wrong-sized one),
    and a retry listing its parts recognises the object on a shared key too (its
    multipart ETag is made of the parts' ETags) and agrees: 200."""
    server, got = await receiver(aiohttp_server, 204)
    held = lambda o, n: Fault(delay=1.0) if (o, n) == ("CompleteMultipartUpload", 1) else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, held, name=claim_operation) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=1,
            s3_read_timeout=0.5,
            key_template=template,
            webhook_url=str(server.make_url("/hook")),
            webhook_secret=HOOK_SECRET,
        )
        janitor = proxy.app[STATE].janitor
        status, up = await call(proxy, "/sign/multipart", pdf(6 * MiB), {})
        assert status == 200, up
        ref = {"key": up["key"], "upload_id": up["upload_id"]}
        await asyncio.to_thread(
            s3.upload_part, Bucket=bucket, PartNumber=1, Body=b"x" * stored,
            Key=ref["key"], UploadId=ref["upload_id"],
        )  # fmt: skip
        mine = [{"part_number": 1, "etag": hashlib.md5(b"x" * stored).hexdigest()}]
        status, out = await call(proxy, "/sign/multipart/complete", {**ref, "parts": mine}, {})
        assert (status, code(out)) == (504, "UPSTREAM_TIMEOUT"), out
        assert "retry the complete" in out["error"]["message"], out
        right = stored == 6 * MiB
        if right:  # landed at 1 s, checked at 2 x 0.5 s after the 504: kept and told
            await eventually(
                lambda: _completed_events(got), within=5.0, what="the late check's webhook"
            )
            # and the check's claim released once it has told the webhook
            await eventually(
                lambda: stored_keys(s3, bucket),
                until=lambda keys: keys == [ref["key"]],
                within=5.0,
                what="the object alone",
            )
            again, out2 = await complete_until_decided(proxy, {**ref, "parts": mine})
            assert again == 200 and out2["size"] == 6 * MiB, out2
        await eventually(lambda: not janitor._rechecks, within=8.0, what="the late checks")
        assert "CompleteMultipartUpload" in faulty.calls
    assert await stored_keys(s3, bucket) == ([ref["key"]] if right else [])
    told = _completed_events(got)
    assert len(told) >= 3 if right else told == [], told  # two checks and the retry
    if right:
        await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


async def test_another_uploads_object_at_a_shared_key_is_never_taken_as_ours(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """F2's guard: on a shared key another client's object there (other parts) is neither
    answered for nor deleted (told by the upload's nonce now, by its ETag before)."""
    proxy = await proxy_factory(key_template="plain/{filename}")
    ref = await _multipart_done(proxy, s3, bucket)

    def other_upload() -> None:
        up = s3.create_multipart_upload(
            Bucket=bucket, Key=ref["key"], Metadata={presign_identity.SIZE_META: str(6 * MiB)}
        )
        etag = s3.upload_part(
            Bucket=bucket, Key=ref["key"], UploadId=up["UploadId"], PartNumber=1,
            Body=b"y" * 6 * MiB,
        )["ETag"]  # fmt: skip
        s3.complete_multipart_upload(
            Bucket=bucket, Key=ref["key"], UploadId=up["UploadId"],
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
        )  # fmt: skip

    await asyncio.to_thread(other_upload)
    before = await asyncio.to_thread(s3.head_object, Bucket=bucket, Key=ref["key"])
    mine = [{"part_number": 1, "etag": hashlib.md5(b"x" * 6 * MiB).hexdigest()}]
    status, out = await call(proxy, "/sign/multipart/complete", {**ref, "parts": mine}, {})
    assert (status, code(out)) == (409, "KEY_EXISTS"), out  # ours aborted, theirs stays
    status, out = await call(proxy, "/sign/multipart/complete", {**ref, "parts": mine}, {})
    assert (status, code(out)) == (404, "NO_SUCH_UPLOAD"), out
    status, out = await call(proxy, "/sign/multipart/complete", ref, {})  # no parts
    assert (status, code(out)) == (404, "NO_SUCH_UPLOAD"), out
    # told by the upload's record, not its parts: no hint to list them (reprobe11a)
    assert "list the upload's 'parts'" not in out["error"]["message"], out
    after = await asyncio.to_thread(s3.head_object, Bucket=bucket, Key=ref["key"])
    assert after["ETag"] == before["ETag"]
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


@pytest.mark.parametrize(
    "template", ["uploads/{uuid}/{filename}", "plain/{filename}"], ids=["unique-key", "shared-key"]
)
async def test_a_rollback_whose_delete_fails_says_so(
    proxy_factory: Any,
    aiohttp_server: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
    template: str,
) -> None:
    """reprobe9a F6: the webhook fails, and so does the rollback's delete. The 502 said
    "the upload was rolled back" and the log presign.rolled_back, while the janitor then
    kept the object and told the webhook. Now both say the rollback did not finish. On a
    shared key the janitor's retry was a delete the released claim always skipped: the
    object stayed untold; now it is held to its size there too (recognised by its parts)."""
    server, got = await receiver(aiohttp_server, 500)
    armed = True
    rule = lambda o, n: Fault(status=500) if armed and o == "DeleteObject" else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule, name=claim_operation) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=1,
            key_template=template,
            webhook_url=str(server.make_url("/hook")),
            webhook_secret=HOOK_SECRET,
            webhook_attempts=1,
        )
        janitor = proxy.app[STATE].janitor
        janitor.interval = 0.3
        ref = await _multipart_done(proxy, s3, bucket)
        caplog.set_level("INFO", logger="s3proxy.presign")
        status, out = await call(proxy, "/sign/multipart/complete", ref, {})
        assert (status, code(out)) == (502, "WEBHOOK_FAILED"), out
        message = out["error"]["message"]
        assert "rolled back" not in message and "did not finish" in message, message
        assert "retry the complete" in message, message
        lines = [r.getMessage() for r in caplog.records if r.name == "s3proxy.presign"]
        assert not any(m.startswith("presign.rolled_back") for m in lines), lines
        assert any(m.startswith("presign.rollback_unfinished") for m in lines), lines
        armed = False
        await eventually(lambda: not janitor._tasks, within=10, what="the janitor's retry")
    assert await stored_keys(s3, bucket) == [ref["key"]]  # kept, as documented, and told
    events = ["upload.completed", "upload.rolled_back", "upload.completed"]
    assert [e["body"]["event"] for e in got] == events
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


async def test_parts_lists_are_read_alike_on_a_first_complete_and_a_retry(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """reprobe9a's parts-list nits: an upper-case hex ETag was 400 on a first complete
    and 200 on a retry (hex ETags name the same part in either case: both 200 now); a
    part listed twice was accepted (the dict kept one): 400 on both now."""
    proxy = await proxy_factory(key_template="uploads/{uuid}/{filename}")
    ref = await _multipart_done(proxy, s3, bucket)
    etag = hashlib.md5(b"x" * 6 * MiB).hexdigest()
    twice = {**ref, "parts": [{"part_number": 1, "etag": etag}] * 2}
    upper = {**ref, "parts": [{"part_number": 1, "etag": etag.upper()}]}
    status, out = await call(proxy, "/sign/multipart/complete", twice, {})
    assert (status, code(out)) == (400, "INVALID_REQUEST"), out
    assert "more than once" in out["error"]["message"], out
    # Not a list (reprobe11a R5: an object was read as an empty list): 400 too.
    for bad in ({}, {"1": etag}, "parts"):
        status, out = await call(proxy, "/sign/multipart/complete", {**ref, "parts": bad}, {})
        assert (status, code(out)) == (400, "INVALID_REQUEST"), (bad, out)
        assert "must be a list" in out["error"]["message"], out
    status, out = await call(proxy, "/sign/multipart/complete", upper, {})
    assert status == 200, out
    status, out = await call(proxy, "/sign/multipart/complete", upper, {})
    assert status == 200, out
    status, out = await call(proxy, "/sign/multipart/complete", twice, {})
    assert (status, code(out)) == (400, "INVALID_REQUEST"), out
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


def test_a_part_listed_twice_is_named_in_a_list_of_ten_thousand() -> None:
    """The smallest part number listed more than once, found in one count (it was a
    pairwise count: 5 s of the event loop for 10,000 parts)."""
    parts = [{"part_number": n, "etag": "e"} for n in range(1, 10_001)]
    parts += [{"part_number": 7_000, "etag": "e"}, {"part_number": 42, "etag": "e"}]
    with pytest.raises(ProxyError, match="lists part 42 more than once"):
        presign._claimed_parts({"parts": parts})


# --- shared keys: another upload of the same bytes (reprobe10a N1) -------------------


async def _twin(proxy: Any, s3: Any, bucket: str, signed: int, stored: int) -> dict[str, Any]:
    """A presigned multipart upload of report.pdf signed for ``signed`` bytes, its one part
    ``stored`` bytes of "x": on a shared key, twins have the same key and multipart ETag."""
    status, up = await call(proxy, "/sign/multipart", pdf(signed), {})
    assert status == 200, up
    ref = {"key": up["key"], "upload_id": up["upload_id"]}
    await asyncio.to_thread(
        s3.upload_part, Bucket=bucket, PartNumber=1, Body=b"x" * stored,
        Key=ref["key"], UploadId=ref["upload_id"],
    )  # fmt: skip
    return ref


async def test_a_lost_create_leaves_a_browsers_upload_of_its_shared_key_open(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """A browser's presigned multipart upload of plain/report.pdf is under way (a part in)
    when another /sign/multipart for that name loses its CreateMultipartUpload answer and
    retries it. Before, the retry's cleanup aborted every open upload of the key, the
    browser's too (its next part PUT: NoSuchUpload). Now none is aborted: the lost one is
    the orphan sweep's once idle (``AioObjectStore.create``)."""
    async with FaultyS3(moto.endpoint_url, second_create_lost, name=claim_operation) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=2,
            s3_read_timeout=0.5,
            key_template="plain/{filename}",
        )
        browsers = await _twin(proxy, s3, bucket, 1000, 1000)
        status, second = await call(proxy, "/sign/multipart", pdf(1000), {})
        assert status == 200, second
        assert second["key"] == browsers["key"]
        assert faulty.calls.count("CreateMultipartUpload") == 3
        await asyncio.sleep(1.2)  # the lost attempt's upload is made by now
        assert "AbortMultipartUpload" not in faulty.calls
    left = await open_uploads_async(s3, bucket)
    ids = {u["UploadId"] for u in left}
    assert {browsers["upload_id"], second["upload_id"]} < ids and len(ids) == 3, ids
    for u in left:
        await asyncio.to_thread(
            s3.abort_multipart_upload, Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]
        )


@pytest.mark.parametrize(
    ("a_signed", "b_signed", "b_head_held"),
    [(1000, 1000, False), (2000, 1000, False), (1000, 2000, True)],
    ids=["same", "a-signed-more", "b-wrong-size-checking"],
)
async def test_another_uploads_object_of_the_same_bytes_is_not_ours(
    proxy_factory: Any,
    aiohttp_server: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    a_signed: int,
    b_signed: int,
    b_head_held: bool,
) -> None:
    """reprobe10a N1: uploads A and B of one shared key (no {uuid}, --no-overwrite) with
    byte-identical parts; B completes first, then A. A's complete took B's object as its
    own by the multipart ETag alone: 200 for it (A's upload left open), 200 for an upload
    signed at 2000 judged by B's signed 1000, and with B's size check still running, 400
    "the object was deleted" for B's wrong size and B's object deleted (B then got 502).
    Now S3 refused A's very Complete while it lists A's upload: 409 KEY_EXISTS, A's upload
    aborted, B's object untouched and not announced for A; B decides its own (400)."""
    server, got = await receiver(aiohttp_server, 204)
    held = asyncio.Event()
    heads = 0
    armed = False

    def rule(op: str, n: int) -> Fault | None:
        nonlocal heads
        if armed and op == "HeadObject":
            heads += 1
            if heads == 1:  # B's size check, held while A completes
                return Fault(until=held)
        return None

    async with FaultyS3(moto.endpoint_url, rule, name=claim_operation) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            key_template="plain/{filename}",
            webhook_url=str(server.make_url("/hook")),
            webhook_secret=HOOK_SECRET,
        )
        a = await _twin(proxy, s3, bucket, a_signed, 1000)
        b = await _twin(proxy, s3, bucket, b_signed, 1000)
        assert a["key"] == b["key"] == "plain/report.pdf"
        armed = b_head_held
        b_done = asyncio.create_task(call(proxy, "/sign/multipart/complete", b, {}))
        if b_head_held:
            await eventually(lambda: heads, within=5, what="B's size check under way")
        else:
            b_status, b_out = await b_done
            assert b_status == 200, b_out
        before = await asyncio.to_thread(s3.head_object, Bucket=bucket, Key=b["key"])
        a_status, a_out = await call(proxy, "/sign/multipart/complete", a, {})
        assert (a_status, code(a_out)) == (409, "KEY_EXISTS"), a_out
        assert [u["UploadId"] for u in await open_uploads_async(s3, bucket)] == [], "A aborted"
        if b_head_held:
            after = await asyncio.to_thread(s3.head_object, Bucket=bucket, Key=b["key"])
            assert after["ETag"] == before["ETag"]  # B's object still there for B to judge
            held.set()
            b_status, b_out = await b_done
            assert (b_status, code(b_out)) == (400, "INVALID_REQUEST"), b_out
            assert await stored_keys(s3, bucket) == []
        else:
            assert await stored_keys(s3, bucket) == [b["key"]]
    # the receiver heard of B's object once, from B's own 200, never for A
    assert _completed_events(got) == ([] if b_head_held else [b["key"]]), got
    if not b_head_held:
        await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


async def test_a_complete_that_did_not_happen_does_not_take_another_uploads_object(
    proxy_factory: Any, aiohttp_server: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """reprobe10a N1, the lost-answer side, on a shared key with overwrites allowed
    (--no-overwrite false): B's upload of the same bytes is stored; A's Complete fails
    without S3 carrying it out (500). A's complete looked for its object, found B's by
    the ETag and answered 200 for it. Now the upload S3 still lists had no Complete: the
    error stands and says to retry, the later checks leave B's object alone (nothing
    announced for A), and the retry completes A's upload itself."""
    server, got = await receiver(aiohttp_server, 204)
    armed = False
    rule = lambda o, n: Fault(status=500) if armed and o == "CompleteMultipartUpload" else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule, name=claim_operation) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=1,
            s3_read_timeout=0.5,
            key_template="plain/{filename}",
            no_overwrite=False,
            webhook_url=str(server.make_url("/hook")),
            webhook_secret=HOOK_SECRET,
        )
        janitor = proxy.app[STATE].janitor
        a = await _twin(proxy, s3, bucket, 1000, 1000)
        b = await _twin(proxy, s3, bucket, 1000, 1000)
        b_status, b_out = await call(proxy, "/sign/multipart/complete", b, {})
        assert b_status == 200, b_out
        armed = True
        a_status, a_out = await call(proxy, "/sign/multipart/complete", a, {})
        armed = False
        assert (a_status, code(a_out)) == (502, "UPSTREAM_ERROR"), a_out
        assert "retry the complete" in a_out["error"]["message"], a_out
        await asyncio.sleep(1.5)  # the first check (2 x 0.5 s on) has looked
        assert [u["UploadId"] for u in await open_uploads_async(s3, bucket)] == [a["upload_id"]]
        assert _completed_events(got) == [b["key"]], got  # B's own, nothing for A
        again, out = await complete_until_decided(proxy, a)
        assert again == 200 and out["size"] == 1000, out
        await eventually(lambda: not janitor._rechecks, within=8.0, what="the late checks")
    assert await stored_keys(s3, bucket) == [b["key"]]
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


# --- a rollback the claim skipped (reprobe10a N2) -----------------------------------


@pytest.mark.parametrize("how", ["lapsed-alone", "taken-over"])
async def test_a_rollback_the_claim_skipped_is_not_announced_and_the_object_is_answered_for(
    proxy_factory: Any,
    aiohttp_server: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """reprobe10a N2: the webhook fails after the claim stopped standing for a delete (its
    renewals failing till it lapsed; or another complete took it over), so the rollback's
    delete is skipped. The receiver was still sent upload.rolled_back, and nothing checked
    the object: it stayed, unannounced, though the log said the janitor held it. Now no
    upload.rolled_back (no delete was sent), the 502 says the rollback did not finish;
    taken over, the object is left to the complete holding the claim; lapsed alone, it is
    checked later under the claim: kept and told (right-sized)."""
    monkeypatch.setattr(presign_claim, "MARGIN", 0.0)  # a 4.5 s lease, renewed every 1.5 s
    got: list[str] = []
    claim_fails = False
    where = ""

    async def hook(request: web.Request) -> web.Response:
        nonlocal claim_fails
        event = (await request.json())["event"]
        got.append(event)
        if got != ["upload.completed"]:
            return web.Response(status=204)
        if how == "taken-over":  # another complete takes the claim over meanwhile
            body = json.dumps({"owner": "another", "until": time.time() + 60}).encode()
            await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=where, Body=body)
        else:  # the claim's renewals fail from now on
            claim_fails = True
        await asyncio.sleep(3.0)  # past the lease less the delete's bound (2.5 s)
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    rule = lambda o, n: Fault(status=500) if claim_fails and o == "PutObject:claim" else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule, name=claim_operation) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=1,
            s3_read_timeout=0.5,
            s3_connect_timeout=0.5,
            key_template="uploads/{uuid}/{filename}",
            webhook_url=str(server.make_url("/hook")),
            webhook_attempts=1,
            webhook_timeout=10,
        )
        janitor = proxy.app[STATE].janitor
        ref = await _multipart_done(proxy, s3, bucket)
        where = presign_claim.claim_key(ref["key"], ref["upload_id"])
        caplog.set_level("INFO", logger="s3proxy.presign")
        status, out = await call(proxy, "/sign/multipart/complete", ref, {})
        claim_fails = False
        assert (status, code(out)) == (502, "WEBHOOK_FAILED"), out
        assert "did not finish" in out["error"]["message"], out
        assert "DeleteObject" not in faulty.calls  # the rollback's delete was skipped
        lines = [r.getMessage() for r in caplog.records if r.name == "s3proxy.presign"]
        [unfinished] = [m for m in lines if m.startswith("presign.rollback_unfinished")]
        if how == "taken-over":
            assert "took the claim over" in unfinished, unfinished
            assert not [r.what for r in janitor._rechecks.values() if r.what.startswith("check")]
            assert got == ["upload.completed"]
            assert sorted(await stored_keys(s3, bucket)) == sorted([ref["key"], where])
            await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=where)
        else:
            assert "checked later" in unfinished, unfinished
            await eventually(lambda: got, until=lambda g: len(g) >= 2, within=5, what="check")
            await eventually(lambda: not janitor._rechecks, within=8.0, what="the late checks")
            assert await stored_keys(s3, bucket) == [ref["key"]]
    assert "upload.rolled_back" not in got, got
    assert set(got) == {"upload.completed"}
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


async def test_a_claim_written_late_is_released_at_shutdown_with_the_claims_advice(
    proxy_factory: Any, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """reprobe10a N3: a claim whose write went unanswered is released again later; at
    shutdown that recheck runs before the exit (here the claim landed meanwhile: it goes),
    and one that may still land after the exit is logged. It was logged with the advice
    for an object ("delete it by hand"); a claim only refuses retries until it lapses."""
    proxy = await proxy_factory()
    sink = proxy.app[STATE].require_sink()
    janitor = Janitor()
    claim = presign_claim.Claim(sink, presign_claim.PREFIX + "late", 60.0, 1.0, window=5.0)
    claim.upload, claim.late = ("k", "u"), True
    await claim.release(janitor)  # nothing there yet: the write is still on its way
    landed = {"owner": claim.owner, "until": time.time() + 60}
    await asyncio.to_thread(
        s3.put_object, Bucket=bucket, Key=claim.key, Body=json.dumps(landed).encode()
    )
    caplog.set_level("INFO", logger="s3proxy.janitor")
    janitor.deadline.set(asyncio.get_running_loop().time() + 1.2)
    await janitor.close()
    assert claim.key not in await stored_keys(s3, bucket)  # released before the exit
    [line] = [r.getMessage() for r in caplog.records if "reason=late_write" in r.getMessage()]
    assert line.startswith(f"cleanup.abandoned what=claim key={claim.key}"), line
    assert "409 COMPLETE_IN_PROGRESS" in line and "by hand" not in line, line


# --- the later checks: what they hold and what they carry (reprobe10a N4, N5) --------


def test_readme_says_a_check_holds_the_claim() -> None:
    """reprobe10a N4: README said the claim is not held for the later checks, so a retry
    is not refused; a check holds it while it decides (a retry then got 409)."""
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert "the claim is not held for these checks" not in readme
    assert "while a check decides it holds the claim" in readme
    assert "answered 409 `COMPLETE_IN_PROGRESS` with `Retry-After: 2`" in readme


async def test_a_check_run_at_shutdown_carries_the_completes_request_and_upload_id(
    proxy_factory: Any,
    aiohttp_server: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """reprobe10a N5: a later check made by the shutdown (the janitor's own task) sent its
    webhook with "request_id": "-", and the checks logged an empty upload_id=."""
    server, got = await receiver(aiohttp_server, 204)
    held = lambda o, n: Fault(delay=1.0) if (o, n) == ("CompleteMultipartUpload", 1) else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, held, name=claim_operation) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url,
            s3_max_attempts=1,
            s3_read_timeout=0.5,
            key_template="uploads/{uuid}/{filename}",
            webhook_url=str(server.make_url("/hook")),
            webhook_secret=HOOK_SECRET,
        )
        janitor = proxy.app[STATE].janitor
        ref = await _multipart_done(proxy, s3, bucket)
        caplog.set_level("INFO", logger="s3proxy.presign")
        resp = await proxy.post(
            "/sign/multipart/complete",
            data=json.dumps(ref).encode(),
            headers={"X-Request-ID": "complete-n5"},
        )
        assert resp.status == 504, await resp.text()
        # shutdown now: the check due 1 s on runs before the deadline, in the janitor's task
        janitor.deadline.set(asyncio.get_running_loop().time() + 2.5)
        await janitor.close()
    assert _completed_events(got) and set(_completed_events(got)) == {ref["key"]}, got
    assert {e["body"]["request_id"] for e in got} == {"complete-n5"}, got
    kept = [r for r in caplog.records if r.getMessage().startswith("presign.checked_later")]
    assert kept and all(f"upload_id={ref['upload_id']} " in r.getMessage() for r in kept)
    done = [r for r in caplog.records if r.getMessage().startswith("presign.multipart_completed")]
    assert done and all(f"upload_id={ref['upload_id']} " in r.getMessage() for r in done)
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


# --- shared keys on SeaweedFS: the nonce round-trips (reprobe11a) ------------------


@e2e
async def test_the_nonce_rides_from_create_to_the_object_on_seaweedfs(
    store_proxy: Any, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    """The upload's nonce (tests/test_presign_identity.py), set at CreateMultipartUpload,
    is on the object after the Complete (HeadObject), and a retried complete recognises
    the object by it."""
    name = f"ident-{uuid.uuid4().hex[:8]}.txt"
    proxy = await store_proxy(key_template="presign/shared/{filename}")
    file = {"filename": name, "content_type": "text/plain", "size": 3000}
    status, up = await call(proxy, "/sign/multipart", file, headers={})
    assert status == 200, up
    ref = {"key": up["key"], "upload_id": up["upload_id"]}
    sink = proxy.app[STATE].require_sink()
    record = await presign_record.read(sink, ref["key"], ref["upload_id"])
    try:
        assert record is not None
        status, signed = await call(
            proxy, "/sign/multipart/parts", {**ref, "part_numbers": [1]}, headers={}
        )
        assert status == 200, signed
        await put_parts(signed["parts"], [b"s" * 3000])
        status, done = await call(proxy, "/sign/multipart/complete", ref, headers={})
        assert status == 200 and done["size"] == 3000, done
        head = await asyncio.to_thread(sw.head_object, Bucket=seaweedfs.bucket, Key=ref["key"])
        assert head["Metadata"][NONCE_META] == record.nonce
        status, again = await call(proxy, "/sign/multipart/complete", ref, headers={})
        assert status == 200 and again["etag"] == done["etag"], again
    finally:
        await presign_record.forget(sink, ref["key"], ref["upload_id"])
