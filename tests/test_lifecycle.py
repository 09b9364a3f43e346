"""Shutdown of a real proxy process: in-flight uploads get a grace period, then are
aborted; nothing is left in S3. Plus routing errors and object options."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import bodies
from tests.bodies import MiB
from tests.polling import eventually
from tests.s3util import (
    MotoServer,
    all_keys_async,
    head_object_async,
    open_uploads_async,
    read_object_async,
    start_proxy,
)


async def open_upload(port: int, raw: bytes, sent: int) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(bodies.request_head(len(raw)))
    writer.write(raw[:sent])
    await writer.drain()
    return reader, writer


async def test_sigterm_aborts_stalled_upload_after_grace(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    proxy = start_proxy(moto, bucket, tmp_path, "--shutdown-timeout", "1")
    raw = bodies.body([bodies.file("f", "big.bin", os.urandom(20 * MiB))])
    reader, writer = await open_upload(proxy.port, raw, 12 * MiB)  # then the client stalls
    await eventually(
        lambda: open_uploads_async(s3, bucket), within=20, what="the multipart upload open"
    )
    proxy.proc.send_signal(signal.SIGTERM)
    # The client is told, rather than left with a dropped connection.
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    assert head.startswith(b"HTTP/1.1 503"), head
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    assert b'"SHUTTING_DOWN"' in await asyncio.wait_for(reader.readexactly(length), 5)
    code = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 30)
    writer.close()
    assert code == 0
    assert await open_uploads_async(s3, bucket) == []
    assert await all_keys_async(s3, bucket) == []
    assert "upload.aborted" in proxy.log_path.read_text()


async def test_sigterm_lets_running_upload_finish(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    proxy = start_proxy(moto, bucket, tmp_path, "--shutdown-timeout", "20")
    data = os.urandom(12 * MiB)
    raw = bodies.body([bodies.file("f", "big.bin", data)])
    reader, writer = await open_upload(proxy.port, raw, 6 * MiB)
    await eventually(
        lambda: open_uploads_async(s3, bucket), within=20, what="the multipart upload open"
    )
    proxy.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    # Nothing asked /readyz (--drain-delay auto is 0): the listener closes at once, and a
    # new connection is refused, which a load balancer retries elsewhere.
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(raw[6 * MiB :])  # the client finishes during the grace period
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    assert head.startswith(b"HTTP/1.1 201"), head
    writer.close()
    assert await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 30) == 0
    [key] = await all_keys_async(s3, bucket)
    assert await read_object_async(s3, bucket, key) == data


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/upload", 405, "METHOD_NOT_ALLOWED"), ("GET", "/nope", 404, "NOT_FOUND")],
)
async def test_routing_errors_are_json(
    proxy: Any, method: str, path: str, status: int, code: str
) -> None:
    resp = await proxy.request(method, path)
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code


async def test_object_options_are_applied(proxy_factory: Any, s3: Any, bucket: str) -> None:
    proxy = await proxy_factory(storage_class="STANDARD_IA", sse="AES256", acl="private")
    for size in (100, 6 * MiB):  # one PutObject, and a multipart upload
        raw = bodies.body([bodies.file("f", "a.bin", os.urandom(size))])
        resp = await proxy.post("/upload", data=bodies.chunked(raw), headers=bodies.headers())
        assert resp.status == 201, await resp.text()
        [f] = (await resp.json())["files"]
        head = await head_object_async(s3, bucket, f["key"])
        assert head["StorageClass"] == "STANDARD_IA"
        assert head["ServerSideEncryption"] == "AES256"


async def test_non_ascii_field_is_rfc2047_metadata(proxy: Any, s3: Any, bucket: str) -> None:
    raw = bodies.body(
        [bodies.field("title", "Grüße, 日本"), bodies.file("f", "a.txt", b"hi", "text/plain")]
    )
    resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
    assert resp.status == 201, await resp.text()
    out = await resp.json()
    assert out["fields"] == {"title": "Grüße, 日本"}
    assert out["files"][0]["metadata"] == {"title": "Grüße, 日本"}  # as sent, not encoded
    meta = (await head_object_async(s3, bucket, out["files"][0]["key"]))["Metadata"]
    import email.header

    decoded = email.header.decode_header(meta["title"])
    assert decoded[0][0].decode(decoded[0][1]) == "Grüße, 日本"


def rfc2047_decoded(value: str) -> str:
    """What a reader of the metadata gets: encoded words decoded, plain text as it is."""
    import email.header

    return "".join(
        part.decode(charset or "ascii") if isinstance(part, bytes) else part
        for part, charset in email.header.decode_header(value)
    )


@pytest.mark.parametrize("size", [100, 6 * MiB])
async def test_field_values_that_headers_would_change_are_stored_encoded(
    proxy: Any, s3: Any, bucket: str, size: int
) -> None:
    """Surrounding spaces were trimmed in transit (stored "Q3 review", reported
    " Q3 review "); a plain value shaped as an encoded word read back as other text."""
    sent = {"title": " Q3 review ", "word": "=?UTF-8?B?aGk=?=", "plain": "Q3 review", "note": ""}
    raw = bodies.body(
        [*(bodies.field(k, v) for k, v in sent.items()), bodies.file("f", "a.bin", b"x" * size)]
    )
    resp = await proxy.post("/upload", data=bodies.chunked(raw), headers=bodies.headers())
    assert resp.status == 201, await resp.text()
    [f] = (await resp.json())["files"]
    assert f["metadata"] == sent
    meta = (await head_object_async(s3, bucket, f["key"]))["Metadata"]
    assert {k: rfc2047_decoded(meta[k]) for k in sent} == sent
    assert meta["plain"] == "Q3 review"  # plain text stays plain


async def test_field_after_file_is_returned_not_stored(proxy: Any, s3: Any, bucket: str) -> None:
    raw = bodies.body(
        [
            bodies.field("a", "1"),
            bodies.file("f", "x.txt", b"x", "text/plain"),
            bodies.field("b", "2"),
        ]
    )
    resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
    out = await resp.json()
    assert out["fields"] == {"a": "1", "b": "2"}
    # The response says what was stored with the object: "a", not "b".
    assert out["files"][0]["metadata"] == {"a": "1"}
    meta = (await head_object_async(s3, bucket, out["files"][0]["key"]))["Metadata"]
    assert meta.get("a") == "1" and "b" not in meta


async def test_repeated_field_is_stored_joined(proxy: Any, s3: Any, bucket: str) -> None:
    raw = bodies.body(
        [
            bodies.field("Tag", "x"),
            bodies.field("Tag", "y"),
            bodies.file("f", "x.txt", b"x", "text/plain"),
        ]
    )
    resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
    out = await resp.json()
    assert resp.status == 201, out
    assert out["fields"] == {"Tag": ["x", "y"]}
    assert out["files"][0]["metadata"] == {"Tag": "x,y"}
    meta = (await head_object_async(s3, bucket, out["files"][0]["key"]))["Metadata"]
    assert meta["tag"] == "x,y"


async def test_browser_empty_file_input_is_skipped(proxy: Any, s3: Any, bucket: str) -> None:
    raw = bodies.body([bodies.file("none", "", b""), bodies.file("f", "x.txt", b"x", "text/plain")])
    resp = await proxy.post("/upload", data=raw, headers=bodies.headers())
    assert resp.status == 201
    assert [f["field"] for f in (await resp.json())["files"]] == ["f"]


async def test_json_logs_carry_request_id_and_upload_id(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    import json

    proxy = start_proxy(moto, bucket, tmp_path, "--log-format", "json")
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(6 * MiB))])
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + "/upload",
            data=io.BytesIO(raw),
            headers={**bodies.headers(), "X-Request-ID": "rid-42"},
        ) as resp,
    ):
        assert resp.status == 201
    proxy.stop()
    lines = [
        json.loads(line) for line in proxy.log_path.read_text().splitlines() if line.startswith("{")
    ]
    mine = [r for r in lines if r["request_id"] == "rid-42"]
    assert any("upload.completed" in r["message"] for r in mine)
    assert any(r["logger"] == "aiohttp.access" and "/upload" in r["message"] for r in mine)


async def test_metrics_count_uploads_bytes_and_s3_calls(proxy: Any, s3: Any, bucket: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    ok = bodies.body([bodies.file("f", "a.bin", os.urandom(6 * MiB))])
    assert (
        await proxy.post("/upload", data=bodies.chunked(ok), headers=bodies.headers())
    ).status == 201
    bad = bodies.body([bodies.file("f", "a.bin", os.urandom(100))], close=False)
    assert (await proxy.post("/upload", data=bad, headers=bodies.headers())).status == 400
    text = await (await proxy.get("/metrics")).text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("s3proxy_uploads_started_total", ())] == 2
    assert samples[("s3proxy_uploads_completed_total", ())] == 1
    assert samples[("s3proxy_uploads_aborted_total", (("reason", "MALFORMED_MULTIPART"),))] == 1
    assert samples[("s3proxy_bytes_stored_total", ())] == 6 * MiB
    assert samples[("s3proxy_bytes_received_total", ())] >= 6 * MiB + 100
    assert samples[("s3proxy_uploads_in_flight", ())] == 0
    assert samples[("s3proxy_s3_request_seconds_count", (("operation", "UploadPart"),))] == 2
    assert samples[("s3proxy_memory_budget_bytes_in_use", ())] == 0
    assert samples[("s3proxy_memory_budget_bytes_limit", ())] == 64 * MiB
    key = (
        "s3proxy_http_request_seconds_count",
        (("method", "POST"), ("route", "/upload"), ("status", "201")),
    )
    assert samples[key] == 1
