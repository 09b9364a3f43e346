"""Every failure path: the right status and JSON code, and nothing left in S3."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import Callable
from typing import Any

import pytest

from s3proxy import errors
from s3proxy.errors import UPSTREAM_ERROR, UPSTREAM_UNAVAILABLE, ProxyError
from s3proxy.s3 import S3Error
from tests import bodies
from tests.bodies import MiB
from tests.faults import OBJECT_WRITES, Fault, FaultyS3
from tests.polling import eventually
from tests.s3util import all_keys_async, open_uploads_async, read_object_async


async def wait_clean(s3: Any, bucket: str, within: float = 10.0) -> None:
    """Poll until the bucket holds no object and no open multipart upload."""

    async def left() -> tuple[list[dict[str, Any]], list[str]]:
        return await open_uploads_async(s3, bucket), await all_keys_async(s3, bucket)

    await eventually(
        left,
        until=lambda uploads_keys: uploads_keys == ([], []),
        within=within,
        what="no open upload and no object left (uploads, keys)",
    )


async def post_raw(proxy: Any, raw: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    headers = kw.pop("headers", bodies.headers())
    if isinstance(raw, bytes):
        raw = io.BytesIO(raw)  # aiohttp warns (an error here) about large raw bytes bodies
    resp = await proxy.post("/upload", data=raw, headers=headers, **kw)
    assert resp.content_type == "application/json", await resp.text()
    return resp.status, await resp.json()


def expect_error(status: int, out: dict[str, Any], want_status: int, code: str) -> None:
    assert status == want_status, out
    assert out["error"]["code"] == code, out
    assert out["error"]["message"]


# --- client faults -------------------------------------------------------------------


async def test_not_multipart(proxy: Any, s3: Any, bucket: str) -> None:
    status, out = await post_raw(proxy, b"{}", headers={"Content-Type": "application/json"})
    expect_error(status, out, 415, "NOT_MULTIPART")


async def test_no_file_part(proxy: Any, s3: Any, bucket: str) -> None:
    status, out = await post_raw(proxy, bodies.body([bodies.field("title", "x")]))
    expect_error(status, out, 400, "NO_FILE")


async def test_missing_boundary_parameter(proxy: Any) -> None:
    raw = bodies.body([bodies.file("file", "a.bin", b"x")])
    status, out = await post_raw(proxy, raw, headers={"Content-Type": "multipart/form-data"})
    expect_error(status, out, 400, "MALFORMED_MULTIPART")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"this is not multipart at all", id="garbage"),
        pytest.param(
            bodies.body([bodies.file("file", "a.bin", os.urandom(6 * MiB))], close=False)[:-2],
            id="no-closing-boundary",
        ),
        pytest.param(
            bodies.body([bodies.file("file", "a.bin", os.urandom(100))], close=False),
            id="no-final-boundary",
        ),
        pytest.param(
            b"--" + bodies.BOUNDARY.encode() + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n"
            b"--" + bodies.BOUNDARY.encode() + b"--\r\n",
            id="part-without-name",
        ),
    ],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_malformed_multipart(
    proxy: Any, s3: Any, bucket: str, raw: bytes, chunked: bool
) -> None:
    data: Any = bodies.chunked(raw) if chunked else raw
    status, out = await post_raw(proxy, data)
    expect_error(status, out, 400, "MALFORMED_MULTIPART")
    await wait_clean(s3, bucket)


async def test_file_too_large_aborts_and_rolls_back(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory(max_file_size=8 * MiB)
    raw = bodies.body(
        [
            bodies.file("a", "small.pdf", bodies.pdf(1000)),
            bodies.file("b", "big.bin", os.urandom(9 * MiB)),
        ]
    )
    status, out = await post_raw(proxy, bodies.chunked(raw))
    expect_error(status, out, 413, "FILE_TOO_LARGE")
    await wait_clean(s3, bucket)


async def test_type_not_allowed_rolls_back(proxy_factory: Any, s3: Any, bucket: str) -> None:
    proxy = await proxy_factory(allow_type=("application/pdf", "image/*"))
    png = (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00"
        + bytes(64)
    )
    raw = bodies.body(
        [
            bodies.file("a", "ok.pdf", bodies.pdf(7 * MiB)),
            bodies.file("b", "pic.png", png, "image/png"),
            bodies.file("c", "evil.pdf", b"MZ\x90\x00" + os.urandom(7 * MiB), "application/pdf"),
        ]
    )
    status, out = await post_raw(proxy, raw)
    expect_error(status, out, 415, "TYPE_NOT_ALLOWED")
    assert "evil.pdf" in out["error"]["message"]
    await wait_clean(s3, bucket)


async def test_too_many_files(proxy_factory: Any, s3: Any, bucket: str) -> None:
    proxy = await proxy_factory(max_files=2)
    raw = bodies.body([bodies.file(f"f{i}", f"{i}.txt", b"hello", "text/plain") for i in range(3)])
    status, out = await post_raw(proxy, raw)
    expect_error(status, out, 413, "TOO_MANY_FILES")
    await wait_clean(s3, bucket)


async def test_too_many_fields(proxy_factory: Any) -> None:
    proxy = await proxy_factory(max_fields=3)
    raw = bodies.body(
        [bodies.field(f"k{i}", "v") for i in range(4)] + [bodies.file("f", "a.txt", b"x")]
    )
    status, out = await post_raw(proxy, raw)
    expect_error(status, out, 413, "TOO_MANY_FIELDS")


async def test_field_too_large(proxy_factory: Any) -> None:
    proxy = await proxy_factory(max_field_size=1000)
    raw = bodies.body([bodies.field("note", "x" * 1001), bodies.file("f", "a.txt", b"x")])
    status, out = await post_raw(proxy, raw)
    expect_error(status, out, 413, "FIELD_TOO_LARGE")


async def test_field_not_utf8(proxy: Any) -> None:
    raw = bodies.body([bodies.Part("note", b"\xff\xfe\xfa"), bodies.file("f", "a.txt", b"x")])
    status, out = await post_raw(proxy, raw)
    expect_error(status, out, 400, "INVALID_FIELD")


async def test_metadata_too_large(proxy: Any, s3: Any, bucket: str) -> None:
    raw = bodies.body([bodies.field("note", "x" * 2100), bodies.file("f", "a.txt", b"x")])
    status, out = await post_raw(proxy, raw)
    expect_error(status, out, 413, "METADATA_TOO_LARGE")
    await wait_clean(s3, bucket)


@pytest.mark.parametrize(
    "name", ["a b", "post[title]", "form[_token]", "tags[]", "100%", "café", "a:b", ""]
)
async def test_field_name_not_storable(proxy: Any, s3: Any, bucket: str, name: str) -> None:
    """A name S3 metadata cannot carry as it is, before a file: refused, and the message
    says which characters a name may hold and that the field may follow the file."""
    raw = bodies.body([bodies.field(name, "x"), bodies.file("f", "a.txt", b"x")])
    status, out = await post_raw(proxy, raw)
    expect_error(status, out, 400, "INVALID_FIELD")
    message = out["error"]["message"]
    assert repr(name) in message and "'_', '.' and '-'" in message and "after" in message
    await wait_clean(s3, bucket)


async def test_field_name_not_storable_after_the_file(proxy: Any) -> None:
    """The same names after the last file are not metadata: returned under "fields"."""
    raw = bodies.body([bodies.file("f", "a.txt", b"x"), bodies.field("post[title]", "t")])
    status, out = await post_raw(proxy, raw)
    assert status == 201, out
    assert out["fields"] == {"post[title]": "t"} and out["files"][0]["metadata"] == {}


async def test_request_too_large_by_content_length(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory(max_request_size=1 * MiB)
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(2 * MiB))])
    status, out = await post_raw(proxy, raw)
    expect_error(status, out, 413, "REQUEST_TOO_LARGE")
    await wait_clean(s3, bucket)


async def test_request_too_large_chunked(proxy_factory: Any, s3: Any, bucket: str) -> None:
    proxy = await proxy_factory(max_request_size=6 * MiB, max_file_size=100 * MiB)
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(12 * MiB))])
    status, out = await post_raw(proxy, bodies.chunked(raw))
    expect_error(status, out, 413, "REQUEST_TOO_LARGE")
    await wait_clean(s3, bucket)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, await asyncio.wait_for(reader.readexactly(length), 10)


async def test_expect_continue_refused_before_body(proxy_factory: Any) -> None:
    proxy = await proxy_factory(max_request_size=1 * MiB)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n"
        b"Content-Type: multipart/form-data; boundary=" + bodies.BOUNDARY.encode() + b"\r\n\r\n"
    )
    await writer.drain()
    status, payload = await read_response(reader)  # no body byte was sent
    assert status == 413
    assert b"REQUEST_TOO_LARGE" in payload
    writer.close()


async def test_expect_continue_accepted(proxy: Any, s3: Any, bucket: str) -> None:
    raw = bodies.body([bodies.file("f", "a.txt", b"hello", "text/plain")])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n"
        b"Content-Type: multipart/form-data; boundary=%s\r\n\r\n"
        % (len(raw), bodies.BOUNDARY.encode())
    )
    await writer.drain()
    line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert line.startswith(b"HTTP/1.1 100")
    writer.write(raw)
    await writer.drain()
    status, payload = await read_response(reader)
    assert status == 201, payload
    writer.close()


async def test_expect_continue_not_multipart(proxy: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    await writer.drain()
    status, payload = await read_response(reader)
    assert status == 415 and b"NOT_MULTIPART" in payload
    writer.close()


@pytest.mark.parametrize("at", [3 * MiB, 13 * MiB], ids=["in-first-part", "after-parts-sent"])
async def test_client_disconnect_mid_body(proxy: Any, s3: Any, bucket: str, at: int) -> None:
    raw = bodies.body(
        [
            bodies.file("a", "first.pdf", bodies.pdf(2000)),
            bodies.file("b", "big.bin", os.urandom(20 * MiB)),
        ]
    )
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(bodies.request_head(len(raw)))
    writer.write(raw[:at])
    await writer.drain()
    if at > 10 * MiB:
        # wait until the proxy has at least one part in S3, then vanish
        await eventually(
            lambda: open_uploads_async(s3, bucket),
            within=5,
            what="the multipart upload to start",
        )
    writer.transport.abort()  # RST, like a killed client
    await wait_clean(s3, bucket)
    assert (await proxy.get("/healthz")).status == 200


# --- upstream faults ------------------------------------------------------------------


@pytest.mark.parametrize("template", ["u/{uuid}/{filename}", "docs/{filename}"])
async def test_no_credentials_owes_no_delete(
    proxy_factory: Any,
    s3: Any,
    bucket: str,
    template: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression (config probe): with no S3 credentials every failed upload logged
    "upload.deleted", then "cleanup.failed what=delete" and at shutdown "cleanup.abandoned
    ... delete it by hand" for an object no request was ever sent for (signing failed
    first): the operator hunted objects that do not exist."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 169.254.169.254 probe
    monkeypatch.setenv("HOME", str(tmp_path))
    proxy = await proxy_factory(key_template=template, s3_max_attempts=1)
    with caplog.at_level(logging.INFO, logger="s3proxy"):
        status, out = await post_raw(proxy, bodies.body([bodies.file("f", "a.bin", b"x" * 100)]))
        await proxy.close()  # shutdown: the janitor reports what it still owes
    expect_error(status, out, 502, "UPSTREAM_ERROR")
    assert "credentials" in out["error"]["message"]
    owed = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(("upload.deleted", "upload.not_deleted", "cleanup."))
    ]
    assert owed == []
    assert await all_keys_async(s3, bucket) == []


async def run_with_faults(
    proxy_factory: Any,
    moto: Any,
    rule: Callable[[str, int], Fault | None],
    raw: bytes,
    **settings: Any,
) -> tuple[int, dict[str, Any], FaultyS3]:
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url, **settings)
        status, out = await post_raw(proxy, raw)
        return status, out, faulty


async def test_transient_part_errors_are_retried(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    data = os.urandom(11 * MiB)

    def rule(op: str, n: int) -> Fault | None:
        if op == "UploadPart" and n <= 2:
            return Fault(status=503, code="SlowDown")
        if op == "UploadPart" and n == 3:
            return Fault(drop=True)
        return None

    status, out, faulty = await run_with_faults(
        proxy_factory, moto, rule, bodies.body([bodies.file("f", "a.bin", data)]), s3_max_attempts=5
    )
    assert status == 201, out
    assert faulty.calls.count("UploadPart") == 3 + 3  # three parts, three failures retried
    [f] = out["files"]
    assert await read_object_async(s3, bucket, f["key"]) == data


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault(status=500), 502, "UPSTREAM_ERROR"),
        (Fault(status=403, code="AccessDenied"), 502, "UPSTREAM_ERROR"),
        (Fault(status=503, code="SlowDown"), 503, "UPSTREAM_UNAVAILABLE"),
        (Fault(drop=True), 503, "UPSTREAM_UNAVAILABLE"),
        (Fault(delay=3.0), 504, "UPSTREAM_TIMEOUT"),
    ],
    ids=["500", "403", "503", "drop", "timeout"],
)
async def test_part_upload_failure_aborts(
    proxy_factory: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    fault: Fault,
    status: int,
    code: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(errors, "_upstream_limits", {})
    caplog.set_level(logging.WARNING, "s3proxy.errors")
    raw = bodies.body(
        [
            bodies.file("a", "first.pdf", bodies.pdf(1000)),
            bodies.file("b", "b.bin", os.urandom(12 * MiB)),
        ]
    )
    got, out, faulty = await run_with_faults(
        proxy_factory,
        moto,
        lambda op, n: fault if op == "UploadPart" and n >= 2 else None,
        raw,
        s3_max_attempts=2,
        s3_read_timeout=1.0,
    )
    expect_error(got, out, status, code)
    assert "AbortMultipartUpload" in faulty.calls
    await wait_clean(s3, bucket)
    # The outside test: a 502 was only an INFO upload.aborted, nothing at WARNING said
    # which S3 call failed or how.
    [line] = [r.getMessage() for r in caplog.records if "upstream_failed" in r.getMessage()]
    assert line.startswith("request.upstream_failed operation=UploadPart code="), line
    assert f"error={code} status={status} times=1" in line, line
    assert "code=- " not in line and f"code={code} " not in line, line  # S3's code, not ours


def test_upstream_failures_are_logged_once_per_interval_per_call_and_code(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(errors, "_upstream_limits", {})
    caplog.set_level(logging.INFO, "s3proxy.errors")
    failed = S3Error(UPSTREAM_ERROR, "S3 UploadPart failed", operation="UploadPart", reason="E")
    try:
        raise ProxyError(UPSTREAM_ERROR, "wrapped") from failed
    except ProxyError as exc:
        wrapped = exc
    for err in (failed, failed, wrapped, ProxyError(UPSTREAM_UNAVAILABLE, "store down")):
        errors.error_response(err)
    errors.error_response(ProxyError(errors.FILE_TOO_LARGE, "client's"))  # not upstream
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "request.upstream_failed operation=UploadPart code=E error=UPSTREAM_ERROR status=502 "
        "times=1",
        "request.upstream_failed operation=- code=UPSTREAM_UNAVAILABLE "
        "error=UPSTREAM_UNAVAILABLE status=503 times=1",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize(
    "op", ["CompleteMultipartUpload", "PutObjectTagging", "CreateMultipartUpload"]
)
async def test_late_failures_leave_nothing(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, op: str
) -> None:
    raw = bodies.body(
        [
            bodies.file("a", "first.pdf", bodies.pdf(1000)),
            bodies.file("b", "b.bin", os.urandom(7 * MiB)),
        ]
    )
    got, out, _ = await run_with_faults(
        proxy_factory,
        moto,
        lambda o, n: Fault(status=500) if o == op else None,
        raw,
        s3_max_attempts=1,
    )
    expect_error(got, out, 502, "UPSTREAM_ERROR")
    await wait_clean(s3, bucket)


async def test_s3_unreachable(proxy_factory: Any) -> None:
    from tests.s3util import free_port

    proxy = await proxy_factory(endpoint_url=f"http://127.0.0.1:{free_port()}", s3_max_attempts=1)
    status, out = await post_raw(proxy, bodies.body([bodies.file("f", "a.txt", b"x")]))
    expect_error(status, out, 503, "UPSTREAM_UNAVAILABLE")
    resp = await proxy.get("/readyz")
    assert resp.status == 503
    assert resp.content_type == "application/json"


async def test_stalled_client_gets_408_and_upload_aborted(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory(client_timeout=1.0)
    raw = bodies.body([bodies.file("f", "big.bin", os.urandom(12 * MiB))])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nX-Request-ID: stall-1\r\n"
        b"Content-Type: multipart/form-data; boundary=%s\r\n\r\n"
        % (len(raw), bodies.BOUNDARY.encode())
    )
    writer.write(raw[: 7 * MiB])  # a part goes to S3, then the client stalls
    await writer.drain()
    status, payload = await read_response(reader)
    writer.close()
    assert status == 408 and b"CLIENT_TIMEOUT" in payload
    await wait_clean(s3, bucket)


async def test_request_id_is_echoed_or_made(proxy: Any) -> None:
    resp = await proxy.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await proxy.get("/healthz", headers={"X-Request-ID": "bad id {with} spaces"})
    assert len(resp.headers["X-Request-ID"]) == 32
    resp = await proxy.post("/upload", data=b"x", headers={"Content-Type": "text/plain"})
    assert resp.status == 415 and len(resp.headers["X-Request-ID"]) == 32


@OBJECT_WRITES
async def test_lost_answer_deletes_what_s3_stored(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, op: str, size: int
) -> None:
    """S3 carried out the write but every answer came after --s3-read-timeout: the client
    is told 504, so the object S3 did store must go (a retry would make a duplicate)."""
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(size))])
    got, out, faulty = await run_with_faults(
        proxy_factory,
        moto,
        lambda o, n: Fault(late=1.5) if o == op else None,
        raw,
        s3_max_attempts=2,
        s3_read_timeout=0.5,
    )
    expect_error(got, out, 504, "UPSTREAM_TIMEOUT")
    assert faulty.calls.count(op) >= 2  # retried, and every attempt reached S3
    assert "DeleteObject" in faulty.calls
    await wait_clean(s3, bucket, within=2.0)


@OBJECT_WRITES
async def test_a_write_s3_carries_out_after_the_proxy_gave_up_is_deleted_too(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, op: str, size: int
) -> None:
    """Each attempt reached S3 only after --s3-read-timeout (held on the way, then carried
    out): the rollback's delete ran before they landed, and the object stayed behind a
    504. The delete is made again once such late writes have had time to land."""
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(size))])
    async with FaultyS3(
        moto.endpoint_url, lambda o, n: Fault(delay=1.5) if o == op else None
    ) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url, s3_max_attempts=2, s3_read_timeout=0.5
        )
        got, out = await post_raw(proxy, raw)
        expect_error(got, out, 504, "UPSTREAM_TIMEOUT")
        await asyncio.sleep(2.0)  # every held attempt has landed
        assert faulty.calls.count(op) == 2
        await wait_clean(s3, bucket, within=6.0)


@OBJECT_WRITES
async def test_a_retried_write_whose_first_attempt_lands_after_the_rollback_is_deleted_again(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, op: str, size: int
) -> None:
    """The soak probe's object kept for good behind a 400: the file's first PutObject (or
    Complete) attempt was held on the way past --s3-read-timeout, botocore's retry stored
    the file, a later part failed the request and the rollback deleted the file; then the
    held attempt reached S3 and stored it again. The call did get an answer (the retry's),
    yet one attempt went unanswered: the rollback's delete is made again later too."""
    raw = bodies.body(
        [bodies.file("f", "a.bin", os.urandom(size)), bodies.file("g", "b.bin", b"x" * 1000)],
        close=False,
    )[:-2]  # the second file never ends: 400 MALFORMED_MULTIPART after the first is stored
    held = lambda o, n: Fault(delay=1.5) if (o, n) == (op, 1) else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, held) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url, s3_max_attempts=3, s3_read_timeout=0.5
        )
        got, out = await post_raw(proxy, raw)
        expect_error(got, out, 400, "MALFORMED_MULTIPART")
        assert faulty.calls.count(op) == 2  # the held attempt and the retry that stored it
        await asyncio.sleep(2.0)  # the held attempt has landed (moto refuses a late Complete)
        await wait_clean(s3, bucket, within=6.0)
        await eventually(
            lambda: faulty.calls.count("DeleteObject"),
            until=lambda n: n >= 3,
            within=6.0,
            what="the rollback's delete and its two rechecks",
        )


async def test_token_size_limit_is_one_error(proxy_factory: Any, s3: Any, bucket: str) -> None:
    """Over an upload token's size: 413 FILE_TOO_LARGE naming the token's limit, whether
    seen from Content-Length or while streaming after earlier files."""
    from s3proxy.tokens import issue

    secret = "t" * 32
    proxy = await proxy_factory(token_secret=(secret,))
    token = issue(secret.encode(), prefix="p/", ttl=60, max_size=1 * MiB)
    auth = {**bodies.headers(), "Authorization": f"Bearer {token}"}
    allows = f"the upload token allows {MiB} bytes of file data per request"

    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(3 * MiB))])
    status, out = await post_raw(proxy, raw, headers=auth)
    expect_error(status, out, 413, "FILE_TOO_LARGE")
    assert allows in out["error"]["message"]

    raw = bodies.body(
        [
            bodies.file("a", "a.bin", os.urandom(MiB)),  # exactly the token's size
            bodies.file("b", "b.bin", b"x"),
        ]
    )
    status, out = await post_raw(proxy, bodies.chunked(raw), headers=auth)
    expect_error(status, out, 413, "FILE_TOO_LARGE")
    assert allows in out["error"]["message"], out
    assert "b.bin" in out["error"]["message"]
    await wait_clean(s3, bucket)


async def test_a_token_bounds_a_coded_bodys_file_not_its_content_length(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """A gzip body's Content-Length counts its coding's framing too (23 bytes a member):
    a file of exactly a token's size in 2,000-byte members has a Content-Length some
    100 KB over it, and was refused 413 FILE_TOO_LARGE before a byte was read. The
    token bounds the file's decoded bytes, counted as they arrive."""
    import gzip

    from s3proxy.tokens import issue

    secret = "t" * 32
    proxy = await proxy_factory(token_secret=(secret,))
    token = issue(secret.encode(), prefix="p/", ttl=60, max_size=8 * MiB)
    auth = {**bodies.headers(), "Authorization": f"Bearer {token}", "Content-Encoding": "gzip"}
    for size, stored in ((8 * MiB, True), (8 * MiB + 1, False)):
        data = os.urandom(size)
        form = bodies.body([bodies.file("f", "a.bin", data)])
        coded = b"".join(gzip.compress(form[i : i + 2000], 0) for i in range(0, len(form), 2000))
        assert len(coded) > size + 64 * 1024 + 1024  # past the early check's allowance
        status, out = await post_raw(proxy, coded, headers=auth)
        if stored:
            assert status == 201, out
            [file] = out["files"]
            assert await read_object_async(s3, bucket, file["key"]) == data
        else:
            expect_error(status, out, 413, "FILE_TOO_LARGE")
            assert "a.bin" in out["error"]["message"], out

    async def left() -> tuple[list[dict[str, Any]], int]:
        return await open_uploads_async(s3, bucket), len(await all_keys_async(s3, bucket))

    await eventually(
        left, until=lambda got: got == ([], 1), within=10.0, what="the 201's file only"
    )


async def test_fields_differing_only_in_case_are_refused(proxy: Any, s3: Any, bucket: str) -> None:
    """S3 metadata names are case-insensitive: Foo and foo cannot both be stored."""
    raw = bodies.body(
        [bodies.field("Foo", "1"), bodies.field("foo", "2"), bodies.file("f", "a.txt", b"x")]
    )
    status, out = await post_raw(proxy, raw)
    expect_error(status, out, 400, "INVALID_FIELD")
    assert "'Foo'" in out["error"]["message"] and "'foo'" in out["error"]["message"]
    await wait_clean(s3, bucket)
