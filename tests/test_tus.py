"""tus 1.0.0 at /tus/ against moto: the real ``tuspy`` client, and the raw protocol.

Every test ends with the bucket fixture's check that no multipart upload is left open;
the ones that finish an upload also check that nothing is left under the reserved prefix.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import urllib.parse
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from tusclient import client as tus_client

from s3proxy.state import STATE
from s3proxy.tus_keys import KEY_OBJECT
from s3proxy.tus_url import RESERVED_PREFIX
from tests.conftest import ProxyFactory
from tests.s3util import all_keys_async, head_object_async, read_object_async

# tuspy's asyncio uploader hands aiohttp each chunk as raw bytes, which aiohttp warns about
# over 1 MiB (the client's business, not the proxy's).
pytestmark = pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")

MiB = 1024**2
KiB = 1024
TUS = {"Tus-Resumable": "1.0.0"}
PDF = b"%PDF-1.4\n"


def body(size: int, seed: int = 1) -> bytes:
    """``size`` bytes that start like a PDF (the sniffed type) and never repeat a pattern."""
    data = bytearray(PDF)
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(data) < size:
        block = hashlib.sha256(block).digest()
        data += block * 64
    return bytes(data[:size])


def meta(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def tuspy_upload(
    proxy: TestClient[Any, Any], data: bytes, chunk_size: int, **kwargs: Any
) -> str:
    """Upload with tuspy's asyncio uploader; the upload URL."""
    c = tus_client.TusClient(str(proxy.make_url("/tus/")))
    kwargs.setdefault("metadata", {"filename": "deck.pdf", "filetype": "application/pdf"})
    uploader = c.async_uploader(file_stream=io.BytesIO(data), chunk_size=chunk_size, **kwargs)
    await uploader.upload()
    assert uploader.url is not None
    return str(uploader.url)


async def stored_key(s3: Any, bucket: str) -> str:
    keys = [k for k in await all_keys_async(s3, bucket) if not k.startswith(RESERVED_PREFIX)]
    assert len(keys) == 1, keys
    return keys[0]


async def objects(s3: Any, bucket: str) -> list[str]:
    """Every key in the bucket but the URL key (made on first use; it stays: tus_keys)."""
    return [k for k in await all_keys_async(s3, bucket) if k != KEY_OBJECT]


async def reserved(s3: Any, bucket: str) -> list[str]:
    """What uploads left under the reserved prefix (not the URL key: it stays, tus_keys)."""
    keys = await all_keys_async(s3, bucket)
    return [k for k in keys if k.startswith(RESERVED_PREFIX) and k != KEY_OBJECT]


@pytest.mark.parametrize(
    ("size", "chunk"),
    [
        (12 * MiB + 123, 64 * MiB),  # one PATCH, three parts
        # mobile-sized PATCHes: staged segments, two parts (62 PATCHes: ~25 s on moto)
        pytest.param(6 * MiB + 5, 100 * KiB, marks=pytest.mark.slow),
        (300 * KiB + 7, 100 * KiB),  # within one part: one PutObject from the segments
        (1, 100 * KiB),
    ],
)
async def test_tuspy_uploads_make_the_object(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, size: int, chunk: int
) -> None:
    proxy = await proxy_factory()
    data = body(size)
    await tuspy_upload(proxy, data, chunk)
    key = await stored_key(s3, bucket)
    assert key.endswith("/deck.pdf")
    assert await read_object_async(s3, bucket, key) == data
    head = await head_object_async(s3, bucket, key)
    assert head["ContentType"] == "application/pdf"
    assert await reserved(s3, bucket) == []
    assert proxy.app[STATE].budget.in_use == 0


async def test_tuspy_with_checksums(proxy_factory: ProxyFactory, s3: Any, bucket: str) -> None:
    proxy = await proxy_factory()
    data = body(5 * MiB + 300 * KiB)
    await tuspy_upload(proxy, data, 1 * MiB, upload_checksum=True)
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data


async def test_head_reports_the_offset_and_a_finished_upload(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    data = body(300 * KiB)
    resp = await proxy.post(
        "/tus/",
        headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta(filename="a.pdf")},
    )
    assert resp.status == 201, await resp.text()
    url = resp.headers["Location"]
    assert url.startswith("/tus/")
    assert "Upload-Expires" in resp.headers
    head = await proxy.head(url, headers=TUS)
    assert head.status == 200
    assert head.headers["Upload-Offset"] == "0"
    assert head.headers["Upload-Length"] == str(len(data))
    assert head.headers["Cache-Control"] == "no-store"
    patch = await proxy.patch(
        url,
        data=data[:100_000],
        headers={**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    assert patch.status == 204, await patch.text()
    assert patch.headers["Upload-Offset"] == "100000"
    assert (await proxy.head(url, headers=TUS)).headers["Upload-Offset"] == "100000"
    patch = await proxy.patch(
        url,
        data=data[100_000:],
        headers={
            **TUS,
            "Upload-Offset": "100000",
            "Content-Type": "application/offset+octet-stream",
        },
    )
    assert patch.status == 204
    assert patch.headers["Upload-Offset"] == str(len(data))
    # Finished: an ordinary object, nothing reserved left, and HEAD still answers.
    assert await reserved(s3, bucket) == []
    head = await proxy.head(url, headers=TUS)
    assert head.status == 200 and head.headers["Upload-Offset"] == str(len(data))


async def test_options_announces_the_extensions(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory()
    resp = await proxy.options("/tus/")
    assert resp.status == 204
    assert resp.headers["Tus-Version"] == "1.0.0"
    assert set(resp.headers["Tus-Extension"].split(",")) >= {
        "creation",
        "creation-with-upload",
        "termination",
        "expiration",
        "checksum",
    }
    assert resp.headers["Tus-Max-Size"] == str(1024**3)
    assert "sha256" in resp.headers["Tus-Checksum-Algorithm"].split(",")


async def test_creation_with_upload(proxy_factory: ProxyFactory, s3: Any, bucket: str) -> None:
    proxy = await proxy_factory()
    data = body(200 * KiB)
    resp = await proxy.post(
        "/tus/",
        data=data[:150_000],
        headers={
            **TUS,
            "Upload-Length": str(len(data)),
            "Content-Type": "application/offset+octet-stream",
        },
    )
    assert resp.status == 201, await resp.text()
    assert resp.headers["Upload-Offset"] == "150000"
    url = resp.headers["Location"]
    patch = await proxy.patch(
        url,
        data=data[150_000:],
        headers={
            **TUS,
            "Upload-Offset": "150000",
            "Content-Type": "application/offset+octet-stream",
        },
    )
    assert patch.status == 204
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data


async def test_empty_upload_is_stored_at_creation(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    resp = await proxy.post("/tus/", headers={**TUS, "Upload-Length": "0"})
    assert resp.status == 201
    assert resp.headers["Upload-Offset"] == "0"
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == b""
    assert await reserved(s3, bucket) == []


async def _new(proxy: TestClient[Any, Any], length: int) -> str:
    resp = await proxy.post("/tus/", headers={**TUS, "Upload-Length": str(length)})
    assert resp.status == 201, await resp.text()
    return resp.headers["Location"]


def _patch_headers(offset: int, **extra: str) -> dict[str, str]:
    return {
        **TUS,
        "Upload-Offset": str(offset),
        "Content-Type": "application/offset+octet-stream",
        **extra,
    }


async def test_the_key_header_is_percent_encoded(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """A key with non-ASCII and ``%`` travels as ASCII (its UTF-8 percent-encoded), on the
    finishing PATCH and on HEAD: it went out as raw UTF-8, which browsers read as Latin-1."""
    proxy = await proxy_factory()
    name = "日本 50%41.txt"
    meta = "filename " + base64.b64encode(name.encode()).decode()
    resp = await proxy.post("/tus/", headers={**TUS, "Upload-Length": "3", "Upload-Metadata": meta})
    assert resp.status == 201, await resp.text()
    url = resp.headers["Location"]
    resp = await proxy.patch(url, data=b"abc", headers=_patch_headers(0))
    assert resp.status == 204, await resp.text()
    key = await stored_key(s3, bucket)
    assert key.endswith("/" + name)
    head = await proxy.head(url, headers=TUS)
    for answer in (resp, head):
        raw = dict(answer.raw_headers)[b"S3Proxy-Key"]
        assert raw.isascii() and b"%" in raw
        assert urllib.parse.unquote(raw.decode()) == key


async def test_the_finishing_patch_names_the_stored_object(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """The PATCH that completes an upload answers ``S3Proxy-Key`` (and ``S3Proxy-Sha256``
    when it carried the whole file); an earlier PATCH does not; HEAD of the finished
    upload answers the key too."""
    proxy = await proxy_factory(cors_origin=("https://app.example",))
    origin = {"Origin": "https://app.example"}
    whole = body(300 * KiB, seed=5)
    url = await _new(proxy, len(whole))
    resp = await proxy.patch(url, data=whole, headers={**_patch_headers(0), **origin})
    assert resp.status == 204, await resp.text()
    key = await stored_key(s3, bucket)
    assert resp.headers["S3Proxy-Key"] == key
    assert resp.headers["S3Proxy-Sha256"] == hashlib.sha256(whole).hexdigest()
    exposed = resp.headers["Access-Control-Expose-Headers"].lower()
    assert "s3proxy-key" in exposed and "s3proxy-sha256" in exposed
    head = await proxy.head(url, headers=TUS)
    assert head.status == 200 and head.headers["S3Proxy-Key"] == key

    halves = body(300 * KiB, seed=6)
    url = await _new(proxy, len(halves))
    first = await proxy.patch(url, data=halves[: 100 * KiB], headers=_patch_headers(0))
    assert first.status == 204
    assert "S3Proxy-Key" not in first.headers
    head = await proxy.head(url, headers=TUS)
    assert "S3Proxy-Key" not in head.headers
    last = await proxy.patch(url, data=halves[100 * KiB :], headers=_patch_headers(100 * KiB))
    assert last.status == 204
    second_key = last.headers["S3Proxy-Key"]
    assert second_key != key and "S3Proxy-Sha256" not in last.headers  # not known over two
    assert await read_object_async(s3, bucket, second_key) == halves
    assert await reserved(s3, bucket) == []


async def test_protocol_errors_have_their_statuses(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    url = await _new(proxy, 1000)

    async def code(resp: Any) -> tuple[int, str]:
        return resp.status, (await resp.json())["error"]["code"]

    # 412: a version the server does not speak, with Tus-Version in the answer
    resp = await proxy.head(url, headers={"Tus-Resumable": "0.2.2"})
    assert resp.status == 412 and resp.headers["Tus-Version"] == "1.0.0"
    resp = await proxy.post("/tus/", headers={"Upload-Length": "5"})
    assert await code(resp) == (412, "UNSUPPORTED_VERSION")
    # 409: the wrong offset
    resp = await proxy.patch(url, data=PDF, headers=_patch_headers(5))
    assert await code(resp) == (409, "OFFSET_MISMATCH")
    # 415: not application/offset+octet-stream
    resp = await proxy.patch(
        url, data=PDF, headers={**TUS, "Upload-Offset": "0", "Content-Type": "text/plain"}
    )
    assert await code(resp) == (415, "NOT_OFFSET_STREAM")
    # 413: past Upload-Length, and over the proxy's limit at creation
    resp = await proxy.patch(url, data=b"x" * 1001, headers=_patch_headers(0))
    assert await code(resp) == (413, "FILE_TOO_LARGE")
    resp = await proxy.post("/tus/", headers={**TUS, "Upload-Length": str(2 * 1024**3)})
    assert await code(resp) == (413, "FILE_TOO_LARGE")
    # 404: a tampered or unknown URL
    resp = await proxy.head(url[:-3] + "AAA", headers=TUS)  # HEAD: the status, no body
    assert resp.status == 404
    resp = await proxy.patch(url[:-3] + "AAA", data=PDF, headers=_patch_headers(0))
    assert await code(resp) == (404, "NO_SUCH_UPLOAD")
    # 400: malformed headers
    resp = await proxy.patch(url, data=PDF, headers=_patch_headers(0, **{"Upload-Offset": "-1"}))
    assert await code(resp) == (400, "INVALID_REQUEST")
    resp = await proxy.post(
        "/tus/", headers={**TUS, "Upload-Length": "5", "Upload-Metadata": "a b c"}
    )
    assert await code(resp) == (400, "INVALID_REQUEST")
    # 460: the bytes do not match Upload-Checksum; nothing of that PATCH is kept
    wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    resp = await proxy.patch(
        url, data=PDF, headers=_patch_headers(0, **{"Upload-Checksum": f"sha1 {wrong}"})
    )
    assert await code(resp) == (460, "CHECKSUM_MISMATCH")
    assert (await proxy.head(url, headers=TUS)).headers["Upload-Offset"] == "0"
    right = base64.b64encode(hashlib.sha256(PDF).digest()).decode()
    resp = await proxy.patch(
        url, data=PDF, headers=_patch_headers(0, **{"Upload-Checksum": f"sha256 {right}"})
    )
    assert resp.status == 204 and resp.headers["Upload-Offset"] == str(len(PDF))
    resp = await proxy.patch(
        url, data=PDF, headers=_patch_headers(9, **{"Upload-Checksum": "crc32 AAAAAA=="})
    )
    assert await code(resp) == (400, "INVALID_DIGEST")
    # termination: 204, then 404; the staged bytes are gone
    resp = await proxy.delete(url, headers=TUS)
    assert resp.status == 204
    resp = await proxy.head(url, headers=TUS)
    assert resp.status == 404
    resp = await proxy.patch(url, data=PDF, headers=_patch_headers(9))
    assert await code(resp) == (404, "NO_SUCH_UPLOAD")
    assert await reserved(s3, bucket) == []
    assert await objects(s3, bucket) == []


async def test_method_override(proxy_factory: ProxyFactory, s3: Any, bucket: str) -> None:
    proxy = await proxy_factory()
    url = await _new(proxy, len(PDF))
    resp = await proxy.post(
        url, data=PDF, headers=_patch_headers(0, **{"X-HTTP-Method-Override": "PATCH"})
    )
    assert resp.status == 204
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == PDF


async def test_termination_aborts_the_multipart_upload(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    data = body(7 * MiB)
    url = await _new(proxy, len(data))
    resp = await proxy.patch(url, data=data[: 6 * MiB], headers=_patch_headers(0))
    assert resp.status == 204
    assert (await asyncio.to_thread(s3.list_multipart_uploads, Bucket=bucket)).get("Uploads")
    resp = await proxy.delete(url, headers=TUS)
    assert resp.status == 204
    assert await objects(s3, bucket) == []
    # the bucket fixture checks that no multipart upload is left open


async def test_cors_lets_a_page_elsewhere_speak_tus(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(cors_origin=("https://app.example",))
    origin = {"Origin": "https://app.example"}
    pre = await proxy.options(
        "/tus/x",
        headers={
            **origin,
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type",
        },
    )
    assert pre.status == 204
    assert "PATCH" in pre.headers["Access-Control-Allow-Methods"]
    allowed = pre.headers["Access-Control-Allow-Headers"].lower()
    for name in ("tus-resumable", "upload-offset", "upload-length", "upload-metadata"):
        assert name in allowed
    resp = await proxy.post("/tus/", headers={**TUS, **origin, "Upload-Length": "9"})
    assert resp.status == 201
    exposed = {h.strip().lower() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {
        "location",
        "upload-offset",
        "upload-length",
        "upload-expires",
        "tus-resumable",
        "s3proxy-key",
        "s3proxy-sha256",
    } <= exposed


async def test_tus_can_be_turned_off(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(tus=False)
    resp = await proxy.post("/tus/", headers={**TUS, "Upload-Length": "5"})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "NOT_FOUND"


async def test_deferred_length(proxy_factory: ProxyFactory, s3: Any, bucket: str) -> None:
    """Upload-Defer-Length: the length comes with a later PATCH; until then the upload
    stages what it gets (across a part boundary too) and HEAD says the length is deferred."""
    proxy = await proxy_factory()
    data = body(6 * MiB + 11)
    resp = await proxy.post("/tus/", headers={**TUS, "Upload-Defer-Length": "1"})
    assert resp.status == 201, await resp.text()
    url = resp.headers["Location"]
    head = await proxy.head(url, headers=TUS)
    assert head.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in head.headers
    cut = 5 * MiB + 100
    resp = await proxy.patch(url, data=io.BytesIO(data[:cut]), headers=_patch_headers(0))
    assert resp.status == 204 and resp.headers["Upload-Offset"] == str(cut)
    assert await reserved(s3, bucket) != []  # not complete: the length is not known yet
    resp = await proxy.patch(
        url,
        data=io.BytesIO(data[cut:]),
        headers=_patch_headers(cut, **{"Upload-Length": str(len(data))}),
    )
    assert resp.status == 204 and resp.headers["Upload-Offset"] == str(len(data))
    assert await read_object_async(s3, bucket, await stored_key(s3, bucket)) == data
    assert await reserved(s3, bucket) == []
    head = await proxy.head(url, headers=TUS)
    assert head.headers["Upload-Length"] == str(len(data))
    # over the limit when declared
    resp = await proxy.post("/tus/", headers={**TUS, "Upload-Defer-Length": "1"})
    url = resp.headers["Location"]
    resp = await proxy.patch(
        url, data=b"x", headers=_patch_headers(0, **{"Upload-Length": str(2 * 1024**3)})
    )
    assert resp.status == 413
    assert (await proxy.delete(url, headers=TUS)).status == 204


async def test_deleting_a_finished_upload_keeps_its_object(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """A finished upload's URL does not delete the stored file: 403 UPLOAD_COMPLETE, as
    HEAD says (200, complete); was 404 NO_SUCH_UPLOAD "finished, terminated or never
    created" while HEAD answered 200. tus-js-client does not retry a 403 (it does a 409)."""
    proxy = await proxy_factory()
    url = await _new(proxy, len(PDF))
    assert (await proxy.patch(url, data=PDF, headers=_patch_headers(0))).status == 204
    key = await stored_key(s3, bucket)
    for resp in (
        await proxy.delete(url, headers=TUS),
        await proxy.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"}),
    ):
        assert resp.status == 403
        error = (await resp.json())["error"]
        assert error["code"] == "UPLOAD_COMPLETE" and "kept" in error["message"]
    head = await proxy.head(url, headers=TUS)
    assert head.status == 200 and head.headers["Upload-Offset"] == str(len(PDF))
    assert await read_object_async(s3, bucket, key) == PDF
    # a terminated upload's URL is still 404
    url = await _new(proxy, len(PDF))
    assert (await proxy.delete(url, headers=TUS)).status == 204
    resp = await proxy.delete(url, headers=TUS)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "NO_SUCH_UPLOAD"


SHA1 = "sha1 " + "A" * 27 + "="  # a sha1 digest no bytes here have


async def test_every_tus_answer_is_not_stored_by_caches(proxy_factory: ProxyFactory) -> None:
    """tus: HEAD answers carry Cache-Control: no-store, and so does every answer of the
    tus routes, errors included (a cached 404 or 423 would mislead a client resuming).
    Was: only the successes had it."""
    proxy = await proxy_factory(max_file_size=1000)
    url = await _new(proxy, 10)
    gone = url[:-3] + "AAA"
    answers = {
        "201": await proxy.post("/tus/", headers={**TUS, "Upload-Length": "1"}),
        "200": await proxy.head(url, headers=TUS),
        "404 head": await proxy.head(gone, headers=TUS),
        "404 patch": await proxy.patch(gone, data=PDF, headers=_patch_headers(0)),
        "409": await proxy.patch(url, data=PDF[:2], headers=_patch_headers(3)),
        "412": await proxy.head(url),
        "413": await proxy.post("/tus/", headers={**TUS, "Upload-Length": "1001"}),
        "415": await proxy.patch(url, data=PDF, headers={**TUS, "Upload-Offset": "0"}),
        "460": await proxy.patch(
            url, data=PDF, headers=_patch_headers(0, **{"Upload-Checksum": SHA1})
        ),
        "405 route": await proxy.get(url),
        "405 override": await proxy.post(url, headers={**TUS, "X-HTTP-Method-Override": "PUT"}),
        "204": await proxy.patch(url, data=PDF[:5], headers=_patch_headers(0)),
    }
    for name, resp in answers.items():
        assert resp.status == int(name[:3]), (name, resp.status, await resp.text())
        assert resp.headers.get("Cache-Control") == "no-store", name
        assert resp.headers.get("Tus-Resumable") == "1.0.0", name
    assert (await proxy.delete(url, headers=TUS)).headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("size", "chunk"),
    [(300 * KiB, 100 * KiB), (6 * MiB + 1, 4 * MiB), (5, 64 * MiB)],
    ids=["one-put-from-segments", "multipart", "one-patch"],
)
async def test_upload_metadata_is_stored_as_the_objects_metadata(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, size: int, chunk: int
) -> None:
    """Upload-Metadata keys other than filename/name and filetype/type are stored as the
    object's S3 metadata, as /upload stores form fields (was: accepted, then dropped)."""
    proxy = await proxy_factory()
    data = body(size)
    extra = {"note": "Q3 review", "relativePath": "a/b.pdf", "empty": "", "who": "Zoë"}
    await tuspy_upload(proxy, data, chunk, metadata={"filename": "d.pdf", **extra})
    key = await stored_key(s3, bucket)
    assert key.endswith("/d.pdf")
    head = await head_object_async(s3, bucket, key)
    stored = head["Metadata"]
    assert stored["note"] == "Q3 review" and stored["relativepath"] == "a/b.pdf"
    assert "filename" not in stored and "filetype" not in stored
    assert stored["empty"] == "=?UTF-8?B??="  # as /upload stores an empty field
    assert base64.b64decode(stored["who"][10:-2]).decode() == "Zoë"
    assert stored["s3proxy-tus"]  # which upload made it
    assert await read_object_async(s3, bucket, key) == data


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (meta(filename="a.pdf", **{"a:b": "x"}), (400, "INVALID_FIELD")),  # not a metadata name
        (meta(sha256="0" * 64), (400, "INVALID_FIELD")),  # reserved, as on /upload
        (meta(**{"s3proxy-tus": "x"}), (400, "INVALID_FIELD")),  # the proxy's own
        (meta(Note="a", note="b"), (400, "INVALID_FIELD")),  # one S3 name
        (meta(note="x" * 2000), (413, "METADATA_TOO_LARGE")),  # over S3's 2 KB
        (meta(note="x" * 1900), (413, "METADATA_TOO_LARGE")),  # with the upload id it is
    ],
    ids=["name", "reserved", "proxy-own", "case", "too-large", "too-large-with-id"],
)
async def test_metadata_that_cannot_be_stored_is_refused_at_creation(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, metadata: str, expected: tuple[int, str]
) -> None:
    """Refused as /upload refuses such fields, before anything is stored (not at the PATCH
    that would make the object, after the client was given a URL)."""
    proxy = await proxy_factory()
    resp = await proxy.post(
        "/tus/",
        data=PDF,
        headers={
            **TUS,
            "Upload-Length": str(len(PDF)),
            "Upload-Metadata": metadata,
            "Content-Type": "application/offset+octet-stream",
        },
    )
    assert (resp.status, (await resp.json())["error"]["code"]) == expected
    message = (await resp.json())["error"]["message"]
    assert "Upload-Metadata" in message
    assert "field" not in message and "file" not in message  # tus's words, not /upload's
    assert "Location" not in resp.headers
    assert await objects(s3, bucket) == []


async def test_metadata_just_within_s3s_limit_is_stored(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    value = "x" * 1750
    url = await _new_with(proxy, len(PDF), meta(filename="a.pdf", note=value))
    assert (await proxy.patch(url, data=PDF, headers=_patch_headers(0))).status == 204
    head = await head_object_async(s3, bucket, await stored_key(s3, bucket))
    assert head["Metadata"]["note"] == value


async def _new_with(proxy: TestClient[Any, Any], length: int, metadata: str) -> str:
    headers = {**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata}
    resp = await proxy.post("/tus/", headers=headers)
    assert resp.status == 201, await resp.text()
    return resp.headers["Location"]
