"""``Expect: 100-continue`` on the tus routes: a PATCH (or creation) the headers already
refuse is answered before the client sends a byte of body, not after a 100 Continue."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from tests.conftest import ProxyFactory
from tests.polling import eventually
from tests.test_tus_lifecycle import new_upload


async def _first_answer(port: int | None, request: bytes) -> bytes:
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    return head


def _patch(url: str, **headers: str) -> bytes:
    base = {
        "Host": "x",
        "Tus-Resumable": "1.0.0",
        "Upload-Offset": "0",
        "Content-Type": "application/offset+octet-stream",
        "Content-Length": "100",
        "Expect": "100-continue",
        **headers,
    }
    lines = "".join(f"{k}: {v}\r\n" for k, v in base.items() if v)
    return f"PATCH {url} HTTP/1.1\r\n{lines}\r\n".encode()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Upload-Offset": "7", "Content-Length": "50"}, b"409"),  # not where the upload stands
        ({"Content-Length": "101"}, b"413"),  # past Upload-Length
        ({"Content-Type": "text/plain"}, b"415"),
        ({"Tus-Resumable": "0.2.2"}, b"412"),
        ({"Upload-Checksum": "crc32 AAAAAA=="}, b"400"),
        ({"Content-Digest": "sha-256=:AAAA:"}, b"400"),  # only Upload-Checksum is checked
        ({"url": "/tus/AAAA.BBBB"}, b"404"),
    ],
)
async def test_a_refused_patch_gets_no_100_continue(
    proxy_factory: ProxyFactory, headers: dict[str, str], status: bytes
) -> None:
    proxy = await proxy_factory()
    url = await new_upload(proxy, 100)
    target = headers.pop("url", url)
    head = await _first_answer(proxy.port, _patch(target, **headers))
    assert head.startswith(b"HTTP/1.1 " + status), head
    assert b"Tus-Resumable: 1.0.0" in head
    assert (await proxy.delete(url, headers={"Tus-Resumable": "1.0.0"})).status == 204


async def test_a_good_patch_gets_100_continue(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory()
    url = await new_upload(proxy, 100)
    head = await _first_answer(proxy.port, _patch(url))
    assert head.startswith(b"HTTP/1.1 100"), head

    # The client's close ends the PATCH's body, which is answered (a half-close could
    # still read it) after it gives its lock back: until then a DELETE meets 423.
    async def delete() -> int:
        return (await proxy.delete(url, headers={"Tus-Resumable": "1.0.0"})).status

    await eventually(delete, within=5, what="the DELETE after the PATCH", until=(204).__eq__)


async def test_a_refused_creation_gets_no_100_continue(proxy_factory: ProxyFactory) -> Any:
    proxy = await proxy_factory()
    request = (
        b"POST /tus/ HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Length: 10\r\n"
        b"Content-Type: application/offset+octet-stream\r\nContent-Length: 11\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    head = await _first_answer(proxy.port, request)
    assert head.startswith(b"HTTP/1.1 413"), head


async def test_a_concatenation_gets_no_100_continue(proxy_factory: ProxyFactory) -> Any:
    """A partial upload with its first bytes (tus-js-client, parallelUploads and
    uploadDataDuringCreation): refused on its headers, before the body."""
    proxy = await proxy_factory()
    request = (
        b"POST /tus/ HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Length: 10\r\n"
        b"Upload-Concat: partial\r\n"
        b"Content-Type: application/offset+octet-stream\r\nContent-Length: 10\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    head = await _first_answer(proxy.port, request)
    assert head.startswith(b"HTTP/1.1 400"), head


def _creation(**headers: str) -> bytes:
    base = {
        "Host": "x",
        "Tus-Resumable": "1.0.0",
        "Upload-Length": "10",
        "Content-Type": "application/offset+octet-stream",
        "Content-Length": "10",
        "Expect": "100-continue",
        **headers,
    }
    lines = "".join(f"{k}: {v}\r\n" for k, v in base.items())
    return f"POST /tus/ HTTP/1.1\r\n{lines}\r\n".encode()


def _meta(**pairs: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Upload-Metadata": _meta(**{"a:b": "x"})}, b"400"),  # not a metadata name
        ({"Upload-Metadata": _meta(sha256="x")}, b"400"),  # reserved
        ({"Upload-Metadata": _meta(note="x" * 2000)}, b"413"),  # over S3's 2 KB
        ({"Upload-Length": "20000000000"}, b"413"),  # over --max-file-size
        ({"Upload-Metadata": _meta(filename="taken.bin")}, b"409"),  # a shared key, stored
    ],
    ids=["name", "reserved", "too-large", "too-long", "key-taken"],
)
async def test_a_creation_its_headers_refuse_gets_no_100_continue(
    proxy_factory: ProxyFactory, s3: Any, bucket: str, headers: dict[str, str], status: bytes
) -> None:
    """Every refusal the creation's headers decide comes before the body is sent: the
    metadata stored as S3 metadata, the size, a taken key (the re-probe: 100 Continue,
    then the refusal after the whole body)."""
    s3.put_object(Bucket=bucket, Key="in/taken.bin", Body=b"someone else's")
    proxy = await proxy_factory(key_template="in/{filename}")
    head = await _first_answer(proxy.port, _creation(**headers))
    assert head.startswith(b"HTTP/1.1 " + status), head
    assert b"Tus-Resumable: 1.0.0" in head


@pytest.mark.parametrize(
    "request_bytes",
    [
        # a coding the proxy cannot decode: refused by the HTTP layer, not a tus handler
        b"PATCH /tus/abc HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\n",
        b"POST /tus/ HTTP/1.1\r\nHost: x\r\nContent-Encoding: zstd\r\nContent-Length: 1\r\n\r\n",
        # a head the parser refuses
        b"HEAD /tus/abc HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    ],
    ids=["br", "zstd", "bad-head"],
)
async def test_answers_the_http_layer_gives_under_tus_carry_the_tus_headers(
    proxy_factory: ProxyFactory, request_bytes: bytes
) -> None:
    """Every answer under /tus/ says the version and no-store, also those aiohttp's
    layer makes before the app sees the request (the re-probe: 415 without them)."""
    proxy = await proxy_factory()
    head = await _first_answer(proxy.port, request_bytes)
    assert head.split(b" ")[1][:1] == b"4", head
    assert b"Tus-Resumable: 1.0.0" in head and b"Cache-Control: no-store" in head, head
