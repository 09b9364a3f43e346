"""Requests the tus routes refuse: each refusal leaves nothing behind (no state under
the reserved prefix, no multipart upload open) and carries the code README's table
names."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from s3proxy.state import STATE
from tests.conftest import ProxyFactory
from tests.faults import Fault, FaultyS3, tus_operation
from tests.s3util import open_uploads_async
from tests.test_tus import TUS, KiB, body, meta, objects
from tests.test_tus_lifecycle import new_upload, patch_headers

STREAM = {"Content-Type": "application/offset+octet-stream"}


async def _code(resp: Any) -> tuple[int, str]:
    return resp.status, (await resp.json())["error"]["code"]


async def _nothing_left(s3: Any, bucket: str) -> None:
    assert await objects(s3, bucket) == []
    assert await open_uploads_async(s3, bucket) == []


def _sha1(data: bytes) -> str:
    return "sha1 " + base64.b64encode(hashlib.sha1(data).digest()).decode()


@pytest.mark.parametrize(
    ("headers", "data", "expected"),
    [
        ({"Upload-Length": "10"}, b"x" * 11, (413, "FILE_TOO_LARGE")),
        (
            {"Upload-Length": "10", "Upload-Checksum": "crc32 AAAAAA=="},
            b"x",
            (400, "INVALID_DIGEST"),
        ),
        (
            {"Upload-Length": "10", "Upload-Checksum": _sha1(b"other")},
            b"x" * 5,
            (460, "CHECKSUM_MISMATCH"),
        ),
        (
            {"Upload-Length": str(200 * KiB), "Upload-Checksum": _sha1(b"other")},
            body(200 * KiB),
            (460, "CHECKSUM_MISMATCH"),
        ),
    ],
)
async def test_a_refused_creation_with_upload_leaves_nothing(
    proxy_factory: ProxyFactory,
    s3: Any,
    bucket: str,
    headers: dict[str, str],
    data: bytes,
    expected: tuple[int, str],
) -> None:
    proxy = await proxy_factory()
    resp = await proxy.post("/tus/", data=data, headers={**TUS, **STREAM, **headers})
    assert await _code(resp) == expected
    assert "Location" not in resp.headers
    await _nothing_left(s3, bucket)


async def test_an_empty_upload_of_a_type_not_allowed_leaves_nothing(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory(allow_type=("application/pdf",))
    resp = await proxy.post("/tus/", headers={**TUS, "Upload-Length": "0"})
    assert await _code(resp) == (415, "TYPE_NOT_ALLOWED")
    await _nothing_left(s3, bucket)


async def test_a_creation_whose_state_write_landed_unseen_leaves_nothing(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """The state's PutObject is carried out by S3 but answered 500 (every attempt): the
    POST gets 502 with no Location, so the state it made is removed too (it stayed until
    Upload-Expires, 24 h, in the faults probe)."""
    armed = False

    def error(resp: Any) -> None:
        resp.set_status(500)
        resp.body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"

    rule = lambda op, n: (  # noqa: E731
        Fault(answer=error) if armed and op == "PutObject:state" else None
    )
    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_max_attempts=2)
        await new_upload(proxy, 10)  # the URL key is made; this upload's state stays
        before = await objects(s3, bucket)
        armed = True
        resp = await proxy.post("/tus/", headers={**TUS, "Upload-Length": "10"})
        assert await _code(resp) == (502, "UPSTREAM_ERROR")
        assert "Location" not in resp.headers
        assert faulty.calls.count("PutObject:state") >= 2
    assert await objects(s3, bucket) == before


async def test_a_creation_body_that_stalls_leaves_nothing(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """408 in the POST's body: the client has no Location, so nothing of it may stay."""
    proxy = await proxy_factory(client_timeout=1.0)
    data = body(6 * 1024 * KiB)

    async def stalls() -> AsyncIterator[bytes]:
        yield data
        await asyncio.sleep(4)
        yield b"x"

    resp = await proxy.post(
        "/tus/", data=stalls(), headers={**TUS, **STREAM, "Upload-Length": str(len(data) + 10)}
    )
    assert await _code(resp) == (408, "CLIENT_TIMEOUT")

    async def settled() -> bool:
        return not await objects(s3, bucket) and not await open_uploads_async(s3, bucket)

    for _ in range(50):
        if await settled():
            break
        await asyncio.sleep(0.1)
    await _nothing_left(s3, bucket)
    assert proxy.app[STATE].metrics.uploads_started._value.get() == 1


@pytest.mark.parametrize("filetype", ['"' * 2300, '"' * 3000, "\x01" * 1000, "a" * 3000])
async def test_metadata_that_makes_the_url_too_long_is_refused(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, filetype: str
) -> None:
    """A Location the proxy would not accept back is never given out: 400, nothing made."""
    proxy = await proxy_factory()
    resp = await proxy.post(
        "/tus/",
        headers={
            **TUS,
            "Upload-Length": "5",
            "Upload-Metadata": meta(filename="a.bin", filetype=filetype),
        },
    )
    if resp.status == 201:  # short enough: the URL it gave works
        url = resp.headers["Location"]
        assert (await proxy.patch(url, data=b"hello", headers=patch_headers(0))).status == 204
        return
    assert await _code(resp) == (400, "INVALID_REQUEST")
    await _nothing_left(s3, bucket)


@pytest.mark.parametrize(
    "name", ["Upload-Length", "Tus-Resumable", "Upload-Metadata", "Upload-Defer-Length"]
)
async def test_a_repeated_creation_header_is_refused(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, name: str
) -> None:
    proxy = await proxy_factory()
    values = {
        "Upload-Length": ["5", "7"],
        "Tus-Resumable": ["1.0.0", "1.0.0"],
        "Upload-Metadata": [meta(filename="a.bin"), meta(filename="b.bin")],
        "Upload-Defer-Length": ["1", "1"],
    }[name]
    headers = [(k, v) for k, v in {**TUS, "Upload-Length": "5"}.items() if k != name]
    headers += [(name, v) for v in values]
    resp = await proxy.post("/tus/", headers=headers)
    assert await _code(resp) == (400, "INVALID_REQUEST")
    await _nothing_left(s3, bucket)


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("Upload-Offset", ["0", "5"]),
        ("Tus-Resumable", ["1.0.0", "1.0.0"]),
        ("Upload-Checksum", [_sha1(b"hello"), _sha1(b"other")]),
        ("Upload-Length", ["5", "5"]),
    ],
)
async def test_a_repeated_patch_header_is_refused(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, name: str, values: list[str]
) -> None:
    proxy = await proxy_factory()
    url = await new_upload(proxy, 5)
    headers = [(k, v) for k, v in patch_headers(0).items() if k != name]
    headers += [(name, v) for v in values]
    resp = await proxy.patch(url, data=b"hello", headers=headers)
    assert await _code(resp) == (400, "INVALID_REQUEST")
    head = await proxy.head(url, headers=TUS)
    assert head.headers["Upload-Offset"] == "0"
    assert (await proxy.delete(url, headers=TUS)).status == 204


async def test_length_and_deferred_length_together_are_refused(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    resp = await proxy.post(
        "/tus/", headers={**TUS, "Upload-Length": "5", "Upload-Defer-Length": "1"}
    )
    assert await _code(resp) == (400, "INVALID_REQUEST")
    await _nothing_left(s3, bucket)


async def test_a_patch_naming_another_length_is_refused(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    url = await new_upload(proxy, 5)
    resp = await proxy.patch(url, data=b"hel", headers=patch_headers(0, **{"Upload-Length": "9"}))
    assert await _code(resp) == (400, "INVALID_REQUEST")
    resp = await proxy.patch(url, data=b"hello", headers=patch_headers(0, **{"Upload-Length": "5"}))
    assert resp.status == 204


@pytest.mark.parametrize("lines", [("gzip",), ("identity", "gzip")], ids=["gzip", "two-lines"])
async def test_a_gzip_coded_patch_is_measured_by_its_decoded_bytes(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, lines: tuple[str, ...]
) -> None:
    """Content-Encoding: gzip is decoded and stored decoded: the length check counts the
    decoded bytes, not the coded Content-Length (random bytes grow when gzipped). Also
    when gzip is on a second Content-Encoding line (aiohttp decodes by the last one)."""
    import gzip
    import os

    from multidict import CIMultiDict

    proxy = await proxy_factory()
    data = body(9) + os.urandom(991)
    coded = gzip.compress(data)
    assert len(coded) > len(data)
    url = await new_upload(proxy, len(data))
    headers = CIMultiDict(patch_headers(0))
    for line in lines:
        headers.add("Content-Encoding", line)
    resp = await proxy.patch(url, data=coded, headers=headers)
    assert resp.status == 204, await resp.text()
    keys = await objects(s3, bucket)
    assert len(keys) == 1
    got = await asyncio.to_thread(s3.get_object, Bucket=bucket, Key=keys[0])
    assert got["Body"].read() == data
    # and decoded bytes past Upload-Length are still refused
    url = await new_upload(proxy, 10)
    resp = await proxy.patch(
        url,
        data=gzip.compress(b"x" * 100),
        headers=patch_headers(0, **{"Content-Encoding": "gzip"}),
    )
    assert await _code(resp) == (413, "FILE_TOO_LARGE")
    assert (await proxy.delete(url, headers=TUS)).status == 204


@pytest.mark.parametrize(
    ("extra", "sent", "expected"),
    [
        ({"Upload-Checksum": _sha1(b"other")}, 200, (460, "CHECKSUM_MISMATCH")),
        ({}, 250, (413, "FILE_TOO_LARGE")),
    ],
)
async def test_a_refused_patch_does_not_declare_its_length(
    proxy_factory: ProxyFactory,
    extra: dict[str, str],
    sent: int,
    expected: tuple[int, str],
) -> None:
    """A deferred Upload-Length comes with the PATCH that is accepted: a refused PATCH
    (460, 413) changes nothing, so the client can send the right length after it."""
    proxy = await proxy_factory()
    data = body(400)
    resp = await proxy.post("/tus/", headers={**TUS, "Upload-Defer-Length": "1"})
    url = resp.headers["Location"]
    assert (await proxy.patch(url, data=data[:100], headers=patch_headers(0))).status == 204
    refused = await proxy.patch(
        url,
        data=data[100 : 100 + sent],
        headers={**patch_headers(100), "Upload-Length": "300", **extra},
    )
    assert await _code(refused) == expected
    head = await proxy.head(url, headers=TUS)
    assert head.headers["Upload-Offset"] == "100"
    assert head.headers.get("Upload-Defer-Length") == "1" and "Upload-Length" not in head.headers
    resp = await proxy.patch(
        url, data=data[100:], headers={**patch_headers(100), "Upload-Length": "400"}
    )
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "400"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5"])
async def test_a_460_names_the_upload_checksum_sent(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, algorithm: str
) -> None:
    """The message names Upload-Checksum and its algorithm, each value as the client wrote
    it (probe: sha256 was named "Content-Digest sha-256", md5 "Content-MD5")."""
    proxy = await proxy_factory()
    data = body(1000)
    url = await new_upload(proxy, len(data))
    wrong = base64.b64encode(hashlib.new(algorithm, b"other").digest()).decode()
    right = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    resp = await proxy.patch(
        url, data=data, headers=patch_headers(0, **{"Upload-Checksum": f"{algorithm} {wrong}"})
    )
    assert resp.status == 460
    message = (await resp.json())["error"]["message"]
    assert f"its Upload-Checksum {algorithm} (declared {wrong}, received {right})" in message
    assert "Content-" not in message
    assert (await proxy.delete(url, headers=TUS)).status == 204
    await _nothing_left(s3, bucket)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Content-Digest", "sha-256=:" + base64.b64encode(bytes(32)).decode() + ":"),
        ("Repr-Digest", "sha-256=:" + base64.b64encode(bytes(32)).decode() + ":"),
        ("Content-MD5", base64.b64encode(bytes(16)).decode()),
        ("Digest", "SHA-256=" + base64.b64encode(bytes(32)).decode()),
        ("x-amz-checksum-crc32", "AAAAAA=="),
    ],
)
async def test_a_digest_header_other_than_upload_checksum_is_refused(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, name: str, value: str
) -> None:
    """Ignored, a wrong one was a 204 (probe finding 4): refused on a PATCH and on a
    creation-with-upload, nothing kept."""
    proxy = await proxy_factory()
    data = body(1000)
    url = await new_upload(proxy, len(data))
    resp = await proxy.patch(url, data=data, headers={**patch_headers(0), name: value})
    assert await _code(resp) == (400, "INVALID_DIGEST")
    assert "Upload-Checksum" in (await resp.json())["error"]["message"]
    assert (await proxy.head(url, headers=TUS)).headers["Upload-Offset"] == "0"
    assert (await proxy.delete(url, headers=TUS)).status == 204
    resp = await proxy.post(
        "/tus/",
        data=data,
        headers={**TUS, **STREAM, "Upload-Length": str(len(data)), name: value},
    )
    assert await _code(resp) == (400, "INVALID_DIGEST")
    assert "Location" not in resp.headers
    await _nothing_left(s3, bucket)


# tus-js-client 4.3.1 with parallelUploads: 2 creates two partial uploads (no metadata), then
# the final one naming them; Tus-Extension lacks "concatenation", but it does not look.
PARTIAL = {"Upload-Concat": "partial", "Upload-Length": "8912896"}
FINAL = {"Upload-Concat": "final;/tus/a.b /tus/c.d", "Upload-Metadata": meta(filename="p.bin")}


@pytest.mark.parametrize("headers", [PARTIAL, FINAL], ids=["partial", "final"])
async def test_a_concatenation_is_refused_before_anything_is_made(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, headers: dict[str, str]
) -> None:
    """Was: each partial made an ordinary upload, completed as an object named ``upload``,
    and the final POST was 400 "Upload-Length is required": the client was told it failed
    and two half-files stayed stored."""
    proxy = await proxy_factory()
    resp = await proxy.post("/tus/", headers={**TUS, **headers})
    assert await _code(resp) == (400, "UNSUPPORTED_EXTENSION")
    assert "concatenation" in (await resp.json())["error"]["message"]
    assert "Location" not in resp.headers
    # with its body (creation-with-upload), which is not read
    resp = await proxy.post("/tus/", data=body(1000), headers={**TUS, **STREAM, **headers})
    assert await _code(resp) == (400, "UNSUPPORTED_EXTENSION")
    await _nothing_left(s3, bucket)
    assert proxy.app[STATE].metrics.uploads_started._value.get() == 0


@pytest.mark.parametrize(
    ("header", "extension"),
    [
        ({"Upload-Concat": "partial"}, "concatenation"),
        ({"Upload-Challenge": "sha256 AAAA"}, "challenge"),
        ({"Trailer": "Upload-Checksum"}, "checksum-trailer"),
    ],
)
async def test_an_extension_header_on_an_upload_url_is_refused(
    proxy_factory: ProxyFactory,
    s3: Any,
    bucket: str,
    header: dict[str, str],
    extension: str,
) -> None:
    """PATCH, HEAD and DELETE carrying a header of an extension the proxy does not serve:
    400 naming it, and the upload is as it was (a checksum sent as a trailer would go
    unchecked; a PATCH to a partial upload would be appended to a whole one)."""
    proxy = await proxy_factory()
    url = await new_upload(proxy, 5)
    resp = await proxy.patch(url, data=b"hello", headers={**patch_headers(0), **header})
    assert await _code(resp) == (400, "UNSUPPORTED_EXTENSION")
    assert extension in (await resp.json())["error"]["message"]
    resp = await proxy.head(url, headers={**TUS, **header})
    assert resp.status == 400
    resp = await proxy.delete(url, headers={**TUS, **header})
    assert await _code(resp) == (400, "UNSUPPORTED_EXTENSION")
    head = await proxy.head(url, headers=TUS)
    assert head.status == 200 and head.headers["Upload-Offset"] == "0"
    assert (await proxy.delete(url, headers=TUS)).status == 204
    await _nothing_left(s3, bucket)


async def test_a_creation_asking_for_a_secret_is_refused(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """Upload-Secret (the challenge extension) asks that only its holder may continue the
    upload: served without it, the upload would be open to whoever has the URL."""
    proxy = await proxy_factory()
    headers = {**TUS, "Upload-Length": "5", "Upload-Secret": "s" * 48}
    resp = await proxy.post("/tus/", headers=headers)
    assert await _code(resp) == (400, "UNSUPPORTED_EXTENSION")
    assert "challenge" in (await resp.json())["error"]["message"]
    await _nothing_left(s3, bucket)


@pytest.mark.parametrize("offset", ["5", "x"])
async def test_a_creation_with_upload_at_another_offset_is_refused(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, offset: str
) -> None:
    """A creation's body is the file's start: one that says it is not (Upload-Offset other
    than 0) is refused, not stored at 0."""
    proxy = await proxy_factory()
    headers = {**TUS, **STREAM, "Upload-Length": "10", "Upload-Offset": offset}
    resp = await proxy.post("/tus/", data=b"hello", headers=headers)
    assert await _code(resp) == (400, "INVALID_REQUEST")
    await _nothing_left(s3, bucket)
    resp = await proxy.post("/tus/", data=b"hello", headers={**headers, "Upload-Offset": "0"})
    assert resp.status == 201 and resp.headers["Upload-Offset"] == "5"
    assert (await proxy.delete(resp.headers["Location"], headers=TUS)).status == 204


@pytest.mark.parametrize("method", ["DELETE", "PATCH", "HEAD", "GET"])
async def test_a_creation_url_post_standing_in_for_another_method_makes_nothing(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, method: str
) -> None:
    """tus: the server MUST use X-HTTP-Method-Override as the method. POST /tus/ standing
    in for another method is that method on the creation URL (405), not a creation."""
    proxy = await proxy_factory()
    headers = {**TUS, "Upload-Length": "5", "X-HTTP-Method-Override": method}
    resp = await proxy.post("/tus/", headers=headers)
    assert await _code(resp) == (405, "METHOD_NOT_ALLOWED")
    await _nothing_left(s3, bucket)
    resp = await proxy.post("/tus/", headers={**headers, "X-HTTP-Method-Override": "POST"})
    assert resp.status == 201
    assert (await proxy.delete(resp.headers["Location"], headers=TUS)).status == 204


@pytest.mark.parametrize("method", ["PATCH", "DELETE", "HEAD", "POST-PATCH", "POST-DELETE"])
async def test_every_method_needs_tus_1_0_0(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, method: str
) -> None:
    proxy = await proxy_factory()
    url = await new_upload(proxy, 5)
    headers = {**patch_headers(0), "Tus-Resumable": "2.0.0"}
    if method.startswith("POST-"):
        headers["X-HTTP-Method-Override"] = method[5:]
        method = "POST"
    data = None if method == "HEAD" else b"hello"
    resp = await proxy.request(method, url, data=data, headers=headers)
    assert resp.status == 412 and resp.headers["Tus-Version"] == "1.0.0"
    assert (await proxy.head(url, headers=TUS)).headers["Upload-Offset"] == "0"
    assert (await proxy.delete(url, headers=TUS)).status == 204
