"""GET/HEAD /files/{key} through the HTTP API against moto: streamed with ranges and
validators, or redirected to a presigned URL; keys outside the prefix never reach S3."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import gzip
import hashlib
import http.client
import io
import logging
import os
import socket
import tracemalloc
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from s3proxy import downloads
from s3proxy.auth import Principal
from s3proxy.download_limits import download_slots
from s3proxy.errors import ProxyError
from s3proxy.http_dates import format_http_date, parse_http_date
from s3proxy.keys import content_disposition
from s3proxy.s3 import Conditions, ObjectBody, ObjectHead
from s3proxy.state import STATE
from s3proxy.tokens import UploadGrant, issue
from tests import bodies
from tests.faults import FaultyS3
from tests.polling import eventually
from tests.rawhttp import exchange

MiB = 1024**2
KEY = "uploads/2024/05/0123abcd/report.pdf"
API_KEY = "k3y-0123456789abcdef"
SECRET = b"s" * 32


def put(s3: Any, bucket: str, key: str, data: bytes, **extra: Any) -> str:
    return str(s3.put_object(Bucket=bucket, Key=key, Body=data, **extra)["ETag"])


async def put_async(s3: Any, bucket: str, key: str, data: bytes, **extra: Any) -> str:
    """``put`` in a worker thread, for async tests: their loop also serves the proxy."""
    return await asyncio.to_thread(put, s3, bucket, key, data, **extra)


def path(key: str) -> str:
    return "/files/" + quote(key)


async def raw_get(proxy: Any, raw_path: str, **kwargs: Any) -> aiohttp.ClientResponse:
    """GET a path exactly as written: no client-side dot-segment removal or re-quoting."""
    url = URL(f"http://{proxy.host}:{proxy.port}{raw_path}", encoded=True)
    resp: aiohttp.ClientResponse = await proxy.session.get(url, **kwargs)
    return resp


async def error_code(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json()
    return str(body["error"]["code"])


@pytest.fixture
def data() -> bytes:
    return os.urandom(300_000)


@pytest.fixture
def stored(s3: Any, bucket: str, data: bytes) -> str:
    return put(
        s3,
        bucket,
        KEY,
        data,
        ContentType="application/pdf",
        ContentDisposition='attachment; filename="report.pdf"',
    )


# --- pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        (None, None),
        ("bytes=0-99", "bytes=0-99"),
        ("bytes=100-", "bytes=100-"),
        ("bytes=-100", "bytes=-100"),
        ("bytes = 0 - 9", "bytes=0-9"),
        ("bytes=5-1", None),  # invalid: ignored
        ("bytes=0-1,5-6", None),  # several ranges: S3 cannot, so the whole object
        ("items=0-1", None),
        ("garbage", None),
        ("bytes=-", None),
        ("bytes=007-010", "bytes=7-10"),
        # Past Python's int-string limit (4300 digits): still a range, never a 500.
        ("bytes=1-" + "9" * 5000, "bytes=1-"),  # a last byte past any object: to the end
        ("bytes=0-" + "0" * 5000 + "5", "bytes=0-5"),
        ("bytes=-" + "9" * 5000, "bytes=0-"),  # a suffix longer than any object: all of it
        ("bytes=" + "9" * 5000 + "-", f"bytes={2**63 - 1}-"),  # unsatisfiable
        ("bytes=" + "9" * 5000 + "-1", None),  # last < first: invalid, ignored
        ("bytes=5-" + "9" * 30, "bytes=5-"),
    ],
)
def test_single_range(value: str | None, sent: str | None) -> None:
    assert downloads.single_range(value) == sent


# Which keys each caller may read is keys.KeyPolicy's table (tests/test_key_policy.py);
# here, that downloads applies it and how a refusal is answered.
TOKEN_7 = Principal("token", UploadGrant("users/7/", None, (), None, None, 0))


@pytest.mark.parametrize(
    ("key", "principal", "code"),
    [
        ("uploads/a/b.txt", Principal("api_key"), None),
        ("users/7/uploads/a/b.txt", TOKEN_7, None),
        ("users/7/a/b.txt", TOKEN_7, "KEY_FORBIDDEN"),  # the grant prefix alone: not any more
        ("uploads/a/b.txt", TOKEN_7, "KEY_FORBIDDEN"),
        ("users/7/uploads/a/b.txt", Principal("api_key"), "KEY_FORBIDDEN"),
        ("uploads/../secret", Principal("api_key"), "KEY_FORBIDDEN"),
        ("uploads//a", Principal("anonymous"), "KEY_FORBIDDEN"),
        ("uploads/" + "a" * 1017, Principal("api_key"), "INVALID_REQUEST"),
    ],
)
def test_check_key(key: str, principal: Principal, code: str | None) -> None:
    template = "uploads/{yyyy}/{uuid}/{filename}"
    if code is None:
        downloads.check_key(key, principal, template)
    else:
        with pytest.raises(ProxyError) as err:
            downloads.check_key(key, principal, template)
        assert err.value.kind.code == code


def test_conditions_follow_rfc_precedence() -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    when = dt.datetime(2015, 10, 21, 7, 28, tzinfo=dt.UTC)
    assert downloads.conditions({"If-Modified-Since": date}) == Conditions(if_modified_since=when)
    assert downloads.conditions(
        {"If-None-Match": 'W/"a", "b"', "If-Modified-Since": date}
    ) == Conditions(if_none_match='"a", "b"')
    assert downloads.conditions({"If-Match": '"a"', "If-Unmodified-Since": date}) == Conditions(
        if_match='"a"'
    )
    assert downloads.conditions({"If-Modified-Since": "not a date"}) == Conditions()
    # Dates whose fields overflow are invalid dates too: ignored (RFC 9110 13.1.3).
    for junk in (
        "Mon, 01 Jan 99999999999999 00:00:00 GMT",
        "Mon, 01 Jan 2020 00:00:00 +" + "9" * 20,
    ):
        assert downloads.conditions({"If-Modified-Since": junk}) == Conditions()
        assert downloads.conditions({"If-Unmodified-Since": junk}) == Conditions()


@pytest.mark.parametrize(
    "value",
    ["nope", '"a" junk', ",", '"a\udcff"', "\udcff", 'W/ "a"', '"a"b"', '*, "a"', "a,b"],
)
def test_malformed_entity_tags_are_refused(value: str) -> None:
    for name in ("If-Match", "If-None-Match"):
        with pytest.raises(ProxyError) as err:
            downloads.conditions({name: value})
        assert err.value.kind.code == "INVALID_REQUEST"
        assert value not in err.value.message


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ('"a"', '"a"'),
        ('"a", W/"b",\t "c"', '"a", W/"b", "c"'),
        ('"a",,', '"a"'),  # empty list elements are skipped (RFC 9110 5.6.1.2)
        (" * ", "*"),
        ('W/"x"', 'W/"x"'),
        ('""', '""'),
    ],
)
def test_entity_tag_lists(value: str, sent: str) -> None:
    assert downloads.conditions({"If-Match": value}) == Conditions(if_match=sent)


def test_if_range_holds() -> None:
    text = "Wed, 21 Oct 2015 07:28:00 GMT"
    date = dt.datetime(2015, 10, 21, 7, 28, tzinfo=dt.UTC)
    assert downloads.if_range_holds('"x"', '"x"', date)
    assert not downloads.if_range_holds('"x"', '"y"', date)
    assert not downloads.if_range_holds('W/"x"', 'W/"x"', date)
    assert downloads.if_range_holds(text, '"x"', date)
    assert not downloads.if_range_holds("Thu, 22 Oct 2015 07:28:00 GMT", '"x"', date)


# --- stream mode ----------------------------------------------------------------------


async def test_full_get(proxy: Any, stored: str, data: bytes) -> None:
    resp = await proxy.get(path(KEY))
    assert resp.status == 200
    assert await resp.read() == data
    h = resp.headers
    assert h["Content-Type"] == "application/pdf"
    assert h["Content-Length"] == str(len(data))
    assert h["ETag"] == stored
    assert email.utils.parsedate_to_datetime(h["Last-Modified"])
    assert h["Content-Disposition"] == 'attachment; filename="report.pdf"'
    assert h["Accept-Ranges"] == "bytes"
    assert h["Cache-Control"] == "private"
    assert h["X-Content-Type-Options"] == "nosniff"


async def test_percent_encoded_key_and_default_disposition(
    proxy: Any, s3: Any, bucket: str
) -> None:
    key = "uploads/x/naïve 50% file?#.txt"
    await put_async(s3, bucket, key, b"hello")
    resp = await proxy.get(path(key))
    assert resp.status == 200, await resp.text()
    assert await resp.read() == b"hello"
    assert resp.headers["Content-Type"] == "binary/octet-stream"  # S3's default
    assert resp.headers["Content-Disposition"] == content_disposition("naïve 50% file?#.txt")


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-99", 0, 100), ("bytes=-100", 299_900, 300_000), ("bytes=100-", 100, 300_000)],
)
async def test_range(
    proxy: Any, stored: str, data: bytes, header: str, start: int, end: int
) -> None:
    resp = await proxy.get(path(KEY), headers={"Range": header})
    assert resp.status == 206
    assert await resp.read() == data[start:end]
    assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert resp.headers["Content-Length"] == str(end - start)
    assert resp.headers["ETag"] == stored


async def test_range_past_the_end(proxy: Any, stored: str, data: bytes) -> None:
    resp = await proxy.get(path(KEY), headers={"Range": f"bytes={len(data) + 10}-"})
    assert resp.status == 416
    assert await error_code(resp) == "RANGE_NOT_SATISFIABLE"
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_head_range_past_the_end(proxy: Any, stored: str, data: bytes) -> None:
    resp = await proxy.head(path(KEY), headers={"Range": f"bytes={len(data)}-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=9-3", "nonsense"])
async def test_unusable_range_sends_everything(
    proxy: Any, stored: str, data: bytes, header: str
) -> None:
    resp = await proxy.get(path(KEY), headers={"Range": header})
    assert resp.status == 200
    assert await resp.read() == data


async def test_if_range(proxy: Any, stored: str, data: bytes) -> None:
    same = await proxy.get(path(KEY), headers={"Range": "bytes=0-9", "If-Range": stored})
    assert same.status == 206
    assert await same.read() == data[:10]
    changed = await proxy.get(path(KEY), headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert changed.status == 200
    assert await changed.read() == data


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("validator", ['"old"', "Wed, 01 Jan 2020 00:00:00 GMT"])
async def test_a_stale_if_range_sends_everything_even_for_a_range_past_the_end(
    proxy: Any, stored: str, data: bytes, method: str, validator: str
) -> None:
    """RFC 9110 13.1.5: the Range of a stale If-Range is ignored (was 416)."""
    headers = {"Range": f"bytes={len(data) + 10}-", "If-Range": validator}
    resp = await proxy.request(method, path(KEY), headers=headers)
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    if method == "GET":
        assert await resp.read() == data
    still = await proxy.request(method, path(KEY), headers={**headers, "If-Range": stored})
    assert still.status == 416
    assert still.headers["Content-Range"] == f"bytes */{len(data)}"


@pytest.mark.parametrize("name", ["If-Modified-Since", "If-Unmodified-Since", "If-Range"])
@pytest.mark.parametrize(
    "date",
    ["Fri, 31 Dec 9999 23:59:59 -2359", "Fri, 31 Dec 9999 23:59:59 -0001"],
)
async def test_a_date_with_no_utc_form_is_ignored_not_a_500(
    proxy: Any, stored: str, data: bytes, name: str, date: str
) -> None:
    """The parse worked; moving it to UTC overflowed, inside botocore: 500 and a traceback."""
    headers = {name: date, "Range": "bytes=0-9"}
    for method in ("GET", "HEAD"):
        resp = await proxy.request(method, path(KEY), headers=headers)
        # an invalid date is ignored (RFC 9110 13.1.3); an invalid If-Range ignores the Range
        assert resp.status == (200 if name == "If-Range" else 206), (method, resp.status)


async def test_a_stored_content_encoding_is_not_passed_on(proxy: Any, s3: Any, bucket: str) -> None:
    """A presigned PUT cannot bind Content-Encoding: 48 KB stored as "gzip" were
    inflated to 50 MB by every client that downloaded them. Served as stored."""
    bomb = gzip.compress(b"\0" * 5_000_000)
    put(s3, bucket, KEY, bomb, ContentType="image/png", ContentEncoding="gzip")
    for method in ("GET", "HEAD"):
        resp = await proxy.request(method, path(KEY))
        assert resp.status == 200
        assert "Content-Encoding" not in resp.headers
        assert resp.headers["Content-Length"] == str(len(bomb))
    assert await (await proxy.get(path(KEY))).read() == bomb


async def test_a_redirect_asks_s3_not_to_pass_a_stored_content_encoding_on(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    bomb = gzip.compress(b"\0" * 5_000_000)
    put(s3, bucket, KEY, bomb, ContentType="image/png", ContentEncoding="gzip")
    proxy = await proxy_factory(download_mode="redirect")
    resp = await proxy.get(path(KEY), allow_redirects=False)
    location = URL(resp.headers["Location"], encoded=True)
    async with (
        aiohttp.ClientSession(auto_decompress=False) as plain,
        plain.get(location) as got,
    ):
        assert got.status == 200
        assert got.headers.get("Content-Encoding", "identity") == "identity"
        assert await got.read() == bomb


def test_http_dates_with_no_utc_form() -> None:
    assert parse_http_date("Fri, 31 Dec 9999 23:59:59 -2359") is None
    assert parse_http_date("Fri, 31 Dec 9999 23:59:59 +2359") == dt.datetime(
        9999, 12, 31, 0, 0, 59, tzinfo=dt.UTC
    )
    west = dt.timezone(-dt.timedelta(hours=23, minutes=59))
    assert format_http_date(dt.datetime(9999, 12, 31, 23, 59, tzinfo=west)) is None
    assert format_http_date(dt.datetime(2015, 10, 21, 7, 28, tzinfo=dt.UTC)) == (
        "Wed, 21 Oct 2015 07:28:00 GMT"
    )


@pytest.mark.parametrize("weak", [False, True])
async def test_if_none_match(proxy: Any, stored: str, weak: bool) -> None:
    tag = f"W/{stored}" if weak else stored
    resp = await proxy.get(path(KEY), headers={"If-None-Match": tag})
    assert resp.status == 304
    assert await resp.read() == b""
    assert resp.headers["ETag"] == stored
    other = await proxy.get(path(KEY), headers={"If-None-Match": '"other"'})
    assert other.status == 200


async def test_if_match_wrong_etag(proxy: Any, stored: str) -> None:
    resp = await proxy.get(path(KEY), headers={"If-Match": '"not-the-etag"'})
    assert resp.status == 412
    assert await error_code(resp) == "PRECONDITION_FAILED"
    right = await proxy.get(path(KEY), headers={"If-Match": stored})
    assert right.status == 200


async def test_if_modified_since(proxy: Any, stored: str) -> None:
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    resp = await proxy.get(
        path(KEY), headers={"If-Modified-Since": email.utils.format_datetime(future, usegmt=True)}
    )
    assert resp.status == 304
    assert await resp.read() == b""
    past = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    resp = await proxy.get(
        path(KEY), headers={"If-Modified-Since": email.utils.format_datetime(past, usegmt=True)}
    )
    assert resp.status == 200


async def test_missing_key(proxy: Any) -> None:
    resp = await proxy.get(path("uploads/nope.txt"))
    assert resp.status == 404
    assert await error_code(resp) == "NO_SUCH_KEY"
    head = await proxy.head(path("uploads/nope.txt"))
    assert head.status == 404


async def test_head(proxy: Any, stored: str, data: bytes) -> None:
    resp = await proxy.head(path(KEY))
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["ETag"] == stored
    assert resp.headers["Content-Type"] == "application/pdf"
    assert await resp.read() == b""
    not_modified = await proxy.head(path(KEY), headers={"If-None-Match": stored})
    assert not_modified.status == 304


@pytest.mark.parametrize(
    "raw_path",
    [
        "/files/secret/plans.txt",
        "/files/uploads/../secret/plans.txt",
        "/files/uploads/%2E%2E/secret/plans.txt",
        "/files/uploads%2F..%2Fsecret%2Fplans.txt",
        "/files/uploadsfake/x",
        "/files/uploads/",
    ],
)
async def test_key_outside_prefix_never_reaches_s3(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, raw_path: str
) -> None:
    await put_async(s3, bucket, "secret/plans.txt", b"top secret")
    async with FaultyS3(moto.endpoint_url) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url)
        resp = await raw_get(proxy, raw_path)
        assert resp.status == 403
        assert await error_code(resp) == "KEY_FORBIDDEN"
        assert faulty.calls == []


@pytest.fixture
async def authed(proxy_factory: Any) -> Any:
    return await proxy_factory(api_key=(API_KEY,), token_secret=(SECRET.decode(),))


async def test_auth(authed: Any, s3: Any, bucket: str) -> None:
    await put_async(s3, bucket, "users/42/uploads/a.txt", b"mine")
    await put_async(s3, bucket, KEY, b"theirs")
    anonymous = await authed.get(path(KEY))
    assert anonymous.status == 401
    assert await error_code(anonymous) == "AUTH_REQUIRED"

    api = await authed.get(path(KEY), headers={"Authorization": f"Bearer {API_KEY}"})
    assert (api.status, await api.read()) == (200, b"theirs")

    token = issue(SECRET, prefix="users/42/", ttl=60)
    bearer = {"Authorization": f"Bearer {token}"}
    own = await authed.get(path("users/42/uploads/a.txt"), headers=bearer)
    assert (own.status, await own.read()) == (200, b"mine")
    by_query = await authed.get(path("users/42/uploads/a.txt"), params={"token": token})
    assert by_query.status == 200
    other = await authed.get(path(KEY), headers=bearer)
    assert other.status == 403
    assert await error_code(other) == "KEY_FORBIDDEN"
    neighbour = await authed.get(path("users/420/a.txt"), headers=bearer)
    assert neighbour.status == 403


async def test_large_object_streams_in_chunks(
    proxy: Any, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = os.urandom(20 * MiB)
    await put_async(s3, bucket, "uploads/big.bin", big)
    writes: list[int] = []
    write = web.StreamResponse.write

    async def counting_write(self: web.StreamResponse, chunk: bytes) -> None:
        writes.append(len(chunk))
        await write(self, chunk)

    monkeypatch.setattr(web.StreamResponse, "write", counting_write)
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        resp = await proxy.get(path("uploads/big.bin"))
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(64 * 1024):
            digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.digest() == hashlib.sha256(big).digest()
    assert sum(writes) == len(big)
    assert len(writes) >= len(big) // downloads.CHUNK_SIZE
    assert max(writes) <= downloads.CHUNK_SIZE
    # Proxy and client together, in this process: far below the object's size.
    assert peak < 8 * MiB, peak


async def test_client_going_away_closes_the_s3_body(
    proxy: Any, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put_async(s3, bucket, "uploads/big.bin", os.urandom(20 * MiB))
    closed: list[int] = []
    close = ObjectBody.close

    def spy(self: ObjectBody) -> None:
        closed.append(self.head.length)
        close(self)

    monkeypatch.setattr(ObjectBody, "close", spy)
    resp = await proxy.get(path("uploads/big.bin"))
    assert resp.status == 200
    await resp.content.readexactly(1024)
    resp.close()  # drop the connection mid-body
    await eventually(lambda: closed, within=10, what="the S3 body closed")
    assert closed == [20 * MiB]
    assert (await proxy.get("/healthz")).status == 200


class BrokenBody:
    """An S3 body that fails after its first chunk, as a dropped S3 connection does."""

    def __init__(self) -> None:
        self.reads = 0
        self.closed = False

    async def read(self, n: int) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise ConnectionError("S3 went away")
        return b"x" * 1000

    def close(self) -> None:
        self.closed = True


async def test_s3_failing_mid_body_cuts_the_response(aiohttp_client: Any) -> None:
    body = BrokenBody()
    answer = ObjectBody(ObjectHead(length=5000), body.read, body.close)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await downloads.send(request, "uploads/a.bin", answer)

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    resp = await client.get("/")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert body.closed


# --- redirect mode --------------------------------------------------------------------


async def test_redirect(proxy_factory: Any, moto: Any, stored: str, data: bytes) -> None:
    proxy = await proxy_factory(download_mode="redirect")
    resp = await proxy.get(path(KEY), allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Cache-Control"] == "no-store"
    location = resp.headers["Location"]
    assert location.startswith(moto.endpoint_url + "/")
    head = await proxy.head(path(KEY), allow_redirects=False)
    assert head.status == 302
    async with aiohttp.ClientSession() as plain:
        async with plain.get(URL(location, encoded=True)) as got:
            assert got.status == 200
            assert await got.read() == data
            assert got.headers["Content-Disposition"] == content_disposition("report.pdf")
        async with plain.get(URL(location, encoded=True), headers={"Range": "bytes=0-9"}) as part:
            assert part.status == 206
            assert await part.read() == data[:10]
        # A HEAD is signed as HeadObject: a URL signed for GET would not take it.
        async with plain.head(URL(head.headers["Location"], encoded=True)) as got:
            assert got.status == 200
            assert got.headers["Content-Length"] == str(len(data))


async def test_redirect_for_the_public_endpoint(
    proxy_factory: Any, moto: Any, stored: str, data: bytes
) -> None:
    """Signed for the host browsers use (here localhost), not the proxy's 127.0.0.1."""
    public = f"http://localhost:{moto.port}"
    proxy = await proxy_factory(download_mode="redirect", presign_endpoint_url=public)
    resp = await proxy.get(path(KEY))  # the test client follows the redirect
    assert resp.status == 200
    assert await resp.read() == data
    assert urlsplit(str(resp.url)).netloc == f"localhost:{moto.port}"


async def test_redirect_refuses_keys_outside_prefix(proxy_factory: Any) -> None:
    proxy = await proxy_factory(download_mode="redirect")
    resp = await proxy.get(path("secret/plans.txt"), allow_redirects=False)
    assert resp.status == 403
    assert await error_code(resp) == "KEY_FORBIDDEN"


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


async def test_huge_range_is_never_a_500(
    proxy: Any, stored: str, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    resp = await proxy.get(path(KEY), headers={"Range": "bytes=1-" + "9" * 5000})
    assert resp.status == 206
    assert await resp.read() == data[1:]
    resp = await proxy.get(path(KEY), headers={"Range": "bytes=" + "9" * 5000 + "-"})
    assert resp.status == 416
    assert await error_code(resp) == "RANGE_NOT_SATISFIABLE"
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    resp = await proxy.get(path(KEY), headers={"Range": "bytes=-" + "9" * 5000})
    assert resp.status == 206
    assert await resp.read() == data
    no_errors_logged(caplog)


# Each header the download path reads, with bytes that are not UTF-8 (or not sane).
@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"Range: bytes=0-\xff", 200),  # not a byte range: ignored
        (b'If-Match: "\xff"', 400),
        (b"If-None-Match: \xff\xfe", 400),
        (b"If-Modified-Since: Mon, 01 Jan 2020 \xff", 200),
        (b"If-Modified-Since: Mon, 01 Jan 99999999999999 00:00:00 GMT", 200),
        (b"If-Unmodified-Since: Mon, 01 Jan 99999999999999 00:00:00 GMT", 200),
        (b"If-Range: \xff\xfe\r\nRange: bytes=0-9", 200),
        (b"X-Request-ID: \xff\xfe", 200),
        (b"Origin: https://\xff.example", 200),
    ],
)
async def test_odd_header_bytes_are_never_a_500(
    proxy: Any,
    stored: str,
    data: bytes,
    caplog: pytest.LogCaptureFixture,
    header: bytes,
    status: int,
) -> None:
    request = (
        b"GET "
        + path(KEY).encode()
        + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + header
        + b"\r\n\r\n"
    )
    resp = await exchange(proxy.host, proxy.port, request)
    assert resp.status == status, resp.raw[:400]
    if status == 200:
        assert resp.body == data
    else:
        assert resp.code == "INVALID_REQUEST"
        assert b"\xff" not in resp.body
    no_errors_logged(caplog)


@pytest.mark.parametrize("ranged", [False, True], ids=["200", "206"])
async def test_streamed_download_carries_request_id_and_cors(
    proxy_factory: Any, stored: str, data: bytes, ranged: bool
) -> None:
    """The headers go out when the handler prepares the stream, before any middleware
    sees the response: they must be set by then (on_response_prepare), or a browser
    blocks the cross-origin download and the request id is lost."""
    page = "http://page.example:8000"
    proxy = await proxy_factory(cors_origin=(page,))
    request = (
        b"GET " + path(KEY).encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Origin: " + page.encode() + b"\r\n" + (b"Range: bytes=10-19\r\n" if ranged else b"")
    )
    for extra, rid in ((b"X-Request-ID: dl-42\r\n", "dl-42"), (b"", None)):
        resp = await exchange(proxy.host, proxy.port, request + extra + b"\r\n")
        assert resp.status == (206 if ranged else 200), resp.raw[:300]
        assert resp.body == (data[10:20] if ranged else data)
        assert resp.headers["Access-Control-Allow-Origin"] == page
        exposed = resp.headers["Access-Control-Expose-Headers"]
        assert "X-Request-ID" in exposed and "Repr-Digest" in exposed  # scripts read both
        assert resp.headers["Vary"] == "Origin"
        assert resp.headers.getall("X-Request-ID") == [rid or resp.headers["X-Request-ID"]]
        assert len(resp.headers["X-Request-ID"]) >= 5
    # Another origin gets the bytes (CORS is the browser's check) but no permission.
    other = await exchange(
        proxy.host, proxy.port, request.replace(page.encode(), b"http://evil.example") + b"\r\n"
    )
    assert other.status in (200, 206) and "Access-Control-Allow-Origin" not in other.headers


async def test_cors_preflight_refusal_is_json(proxy_factory: Any) -> None:
    proxy = await proxy_factory(cors_origin=("http://page.example",))
    resp = await proxy.options(
        path(KEY),
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert resp.status == 403
    assert await error_code(resp) == "ORIGIN_NOT_ALLOWED"
    assert "Access-Control-Allow-Origin" not in resp.headers
    ok = await proxy.options(
        path(KEY),
        headers={
            "Origin": "http://page.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, range",
        },
    )
    assert ok.status == 204
    assert ok.headers["Access-Control-Allow-Origin"] == "http://page.example"
    assert "Range" in ok.headers["Access-Control-Allow-Headers"]
    assert ok.headers["X-Request-ID"]


# --- the one key rule (keys.KeyPolicy), over HTTP ---------------------------------


@pytest.mark.parametrize(
    "raw_path",
    [
        "/files/uploads//x",
        "/files/uploads/x/",
        "/files/uploads/a%00b",
        "/files/uploads/a%01b",
        "/files/uploads/a%0Ab",  # a line feed: unrouted before (404 NOT_FOUND)
        "/files/uploads/a%0A",
        "/files/uploads/a%0D%0Ab",
        "/files/uploads/a%E2%80%A8b",  # U+2028, which a filename turns into a space
        "/files/uploads/a%EE%80%80b",  # U+E000, private use: dropped from a filename
        "/files/uploads/a%C2%85b",  # C1 (NEL)
        "/files/uploads/evil%E2%80%AEtxt.exe",  # a bidi override
        "/files/uploads/a%E2%80%8Bb",  # a zero-width space
        "/files/uploads%5C..%5Csecret%5Cplans.txt",
        "/files/.s3proxy/tus/0123/state",  # the proxy's own (kept out by the prefix, too)
    ],
)
async def test_key_the_proxy_never_makes_never_reaches_s3(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, raw_path: str
) -> None:
    """Refused as /sign refuses it: 403 KEY_FORBIDDEN (was passed on to S3: 404 or 200)."""
    async with FaultyS3(moto.endpoint_url) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url)
        resp = await raw_get(proxy, raw_path)
        assert (resp.status, await error_code(resp)) == (403, "KEY_FORBIDDEN")
        assert faulty.calls == []


async def test_the_proxys_own_objects_are_not_served_under_a_bare_template(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """With no literal prefix in the template, every well-formed key was readable: the tus
    state of any upload (its S3 upload id, its staged bytes) was served with a 200."""
    await put_async(s3, bucket, ".s3proxy/tus/0123/state", b'{"offset": 0}')
    async with FaultyS3(moto.endpoint_url) as faulty:
        proxy = await proxy_factory(
            endpoint_url=faulty.endpoint_url, key_template="{uuid}/{filename}"
        )
        for method in ("GET", "HEAD"):
            resp = await proxy.request(method, "/files/.s3proxy/tus/0123/state")
            assert resp.status == 403, method
        assert (
            (await proxy.get("/files/.s3proxy/tus/0123/state"))
            .headers["Content-Type"]
            .startswith("application/json")
        )
        assert faulty.calls == []


async def test_token_reads_what_it_uploaded_and_nothing_beside(
    authed: Any, s3: Any, bucket: str
) -> None:
    """A token holder reads under its prefix plus the template's prefix, where /upload puts
    its files; not other objects under its prefix (a change: those were readable)."""
    await put_async(s3, bucket, "users/42/avatar.png", b"the backend's")
    bearer = {"Authorization": f"Bearer {issue(SECRET, prefix='users/42/', ttl=60)}"}
    data = bodies.pdf(1000)
    resp = await authed.post(
        "/upload",
        data=bodies.body([bodies.file("f", "a.pdf", data)]),
        headers={**bodies.headers(), **bearer},
    )
    assert resp.status == 201, await resp.text()
    key = (await resp.json())["files"][0]["key"]
    assert key.startswith("users/42/uploads/")
    own = await authed.get(path(key), headers=bearer)
    assert (own.status, await own.read()) == (200, data)
    beside = await authed.get(path("users/42/avatar.png"), headers=bearer)
    assert (beside.status, await error_code(beside)) == (403, "KEY_FORBIDDEN")
    other = {"Authorization": f"Bearer {issue(SECRET, prefix='users/43/', ttl=60)}"}
    theirs = await authed.get(path(key), headers=other)
    assert (theirs.status, await error_code(theirs)) == (403, "KEY_FORBIDDEN")


# --- Repr-Digest (RFC 9530) -------------------------------------------------------------

SHA_OF_X = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize(
    ("metadata", "sent"),
    [
        ({}, None),
        ({"sha256": SHA_OF_X}, "sha-256=:LXEWQrcmsEQBYnyp+6wy9chTD7GQPMTbAiWHF5IaSIE=:"),
        ({"sha256": SHA_OF_X.upper()}, "sha-256=:LXEWQrcmsEQBYnyp+6wy9chTD7GQPMTbAiWHF5IaSIE=:"),
        ({"sha256": SHA_OF_X[:-1]}, None),  # not a sha256: no claim at all
        ({"sha256": "z" * 64}, None),
        ({"title": SHA_OF_X}, None),
    ],
)
def test_repr_digest(metadata: dict[str, str], sent: str | None) -> None:
    assert downloads.repr_digest(ObjectHead(length=1, metadata=metadata)) == sent


def repr_sha256(resp: aiohttp.ClientResponse) -> str:
    """The sha-256 of a Repr-Digest header, as hex."""
    value = resp.headers["Repr-Digest"]
    assert value.startswith("sha-256=:") and value.endswith(":"), value
    return base64.b64decode(value[len("sha-256=:") : -1]).hex()


async def test_repr_digest_is_the_whole_objects_sha256_on_200_206_and_head(proxy: Any) -> None:
    data = os.urandom(100_000)
    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(data), filename="r.bin")
    uploaded = await proxy.post("/upload", data=form)
    assert uploaded.status == 201, await uploaded.text()
    key = (await uploaded.json())["files"][0]["key"]
    whole = hashlib.sha256(data).hexdigest()
    full = await proxy.get(path(key))
    assert full.status == 200 and await full.read() == data
    assert repr_sha256(full) == whole
    part = await proxy.get(path(key), headers={"Range": "bytes=10-19"})
    assert part.status == 206 and await part.read() == data[10:20]
    assert repr_sha256(part) == whole  # the representation's, not the range's
    head = await proxy.head(path(key))
    assert repr_sha256(head) == whole


async def test_no_repr_digest_without_a_stored_sha256(proxy: Any, stored: str) -> None:
    resp = await proxy.get(path(KEY))
    assert resp.status == 200
    assert "Repr-Digest" not in resp.headers


# --- readers that stall or crawl -------------------------------------------------------


@pytest.mark.parametrize(("pool", "slots"), [(1, 1), (2, 1), (4, 3), (8, 6), (64, 48), (100, 75)])
def test_download_slots_keep_a_quarter_of_the_pool_back(pool: int, slots: int) -> None:
    assert download_slots(pool) == slots


# A download holds one connection of the S3 pool while it streams. A client that sends
# its GET and never reads would hold it for ever (issue: probe 10); these readers are
# cut off within --client-timeout or below --min-download-rate, and downloads never take
# the pool's reserve. Timing bounds are several times what is expected (2-core CI).

BIG = "uploads/2024/05/0123abcd/big.bin"  # under the key template's prefix
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}


def stalled_reader(proxy: Any, key: str) -> socket.socket:
    """A client that sends its GET and never reads: a small receive buffer, so the
    proxy's writes back up after a few MiB in the kernel."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((proxy.host, proxy.port))
    sock.sendall(f"GET {path(key)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def read_to_the_end(sock: socket.socket) -> int:
    """Read what the proxy sent until it closed or reset the connection (within 10 s:
    longer means it was never cut); the bytes read."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    received = 0
    async with asyncio.timeout(10):
        while True:
            try:
                data = await loop.sock_recv(sock, 1 << 20)
            except ConnectionError:
                return received
            if not data:
                return received
            received += len(data)


def stalled_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("download.client_stalled")
    ]


async def answered_within(seconds: float, call: Any) -> aiohttp.ClientResponse:
    """The answer to ``call()``, which must come within ``seconds``."""
    async with asyncio.timeout(seconds):
        resp: aiohttp.ClientResponse = await call()
        await resp.read()
        return resp


async def test_stalled_readers_are_cut_off_and_the_pool_is_free_again(
    proxy_factory: Any, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await proxy_factory(s3_max_connections=4, client_timeout=1.0)
    await put_async(s3, bucket, BIG, os.urandom(16 * MiB))
    await put_async(s3, bucket, KEY, b"small")
    socks = [stalled_reader(proxy, BIG) for _ in range(4)]
    try:
        began = asyncio.get_running_loop().time()
        await eventually(
            lambda: len(stalled_lines(caplog)) == 4, within=30, what="the stalled readers cut off"
        )
        took = asyncio.get_running_loop().time() - began
        for s in socks:  # closed, short of the object
            assert await read_to_the_end(s) < 16 * MiB
        # The pool is free again: a download and /readyz answer at once.
        resp = await answered_within(10, lambda: proxy.get(path(KEY)))
        assert resp.status == 200
        assert await resp.read() == b"small"
        assert (await answered_within(10, lambda: proxy.get("/readyz"))).status == 200
    finally:
        for s in socks:
            s.close()
    lines = stalled_lines(caplog)
    assert len(lines) == 4, [r.getMessage() for r in caplog.records]
    assert all(" key=" + BIG in line and " sent=" in line for line in lines), lines
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks"
    # 1 s of timeout each, three at once and the fourth after a slot freed: about 2-3 s.
    assert took < 20, took
    print(f"4 stalled readers cut off within {took:.2f}s")


async def test_stalled_readers_never_take_the_pools_reserve(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    # A long client timeout: the readers stay stalled for the whole test.
    proxy = await proxy_factory(s3_max_connections=4, client_timeout=60.0)
    slots = proxy.app[STATE].downloads
    slots.wait = 1.0  # the 503 past the cap comes sooner than SLOT_WAIT
    await put_async(s3, bucket, BIG, os.urandom(16 * MiB))
    await put_async(s3, bucket, KEY, b"small")
    socks = [stalled_reader(proxy, BIG) for _ in range(4)]
    try:
        await asyncio.sleep(1.0)  # the readers' GetObjects are under way
        assert slots.size == 3 and slots.in_use == 3  # a pool of 4 keeps one back
        assert (await answered_within(10, lambda: proxy.get("/readyz"))).status == 200
        head = await answered_within(10, lambda: proxy.head(path(KEY)))
        assert head.status == 200
        created = await answered_within(
            10, lambda: proxy.post("/tus/", headers={**TUS_HEADERS, "Upload-Length": "5"})
        )
        assert created.status == 201, await created.text()
        state = await answered_within(
            10, lambda: proxy.head(created.headers["Location"], headers=TUS_HEADERS)
        )
        assert state.status == 200
        assert state.headers["Upload-Offset"] == "0"
        # A download past the cap waits a bounded time for a slot, then 503 with Retry-After.
        over = await answered_within(15, lambda: proxy.get(path(KEY)))
        assert over.status == 503
        assert await error_code(over) == "OVERLOADED"
        assert int(over.headers["Retry-After"]) >= 1
        # Still ready after all that.
        assert (await answered_within(10, lambda: proxy.get("/readyz"))).status == 200
    finally:
        for s in socks:
            s.close()


async def test_a_reader_under_the_minimum_rate_is_cut_off(
    proxy_factory: Any, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="s3proxy.downloads")
    proxy = await proxy_factory(client_timeout=30.0, min_download_rate=1024**2, min_rate_window=1.0)
    await put_async(s3, bucket, BIG, os.urandom(16 * MiB))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (proxy.host, proxy.port))
    await loop.sock_sendall(sock, f"GET {path(BIG)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received, closed = 0, False
    began = loop.time()
    try:
        # About 64 KiB/s, never idle: under the 1 MiB/s minimum, over any idle timeout.
        while loop.time() - began < 60 and not closed:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            except ConnectionError:
                closed = True
                break
            if not data:
                closed = True
                break
            received += len(data)
            await asyncio.sleep(4096 / (64 * 1024))
    finally:
        sock.close()
    took = loop.time() - began
    assert closed, f"still served after {took:.1f}s and {received} bytes"
    assert received < 16 * MiB
    assert took < 30, took  # the first second is grace, then one window below the rate
    lines = stalled_lines(caplog)
    assert len(lines) == 1 and "reason=slow" in lines[0], lines


async def test_a_normal_reader_is_unaffected(
    proxy_factory: Any, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="s3proxy.downloads")
    proxy = await proxy_factory(
        s3_max_connections=2, client_timeout=1.0, min_download_rate=64 * 1024, min_rate_window=1.0
    )
    data = os.urandom(16 * MiB)
    await put_async(s3, bucket, BIG, data)
    for _ in range(3):  # one slot (a pool of 2 keeps one back): each frees it for the next
        resp = await answered_within(60, lambda: proxy.get(path(BIG)))
        assert resp.status == 200
        assert hashlib.sha256(await resp.read()).digest() == hashlib.sha256(data).digest()
    # A reader that pauses for less than the timeout between reads keeps its download.
    resp = await proxy.get(path(BIG), headers={"Range": "bytes=0-4194303"})
    assert resp.status == 206
    got = b""
    while chunk := await resp.content.read(1024**2):
        got += chunk
        await asyncio.sleep(0.3)
    assert got == data[: 4 * MiB]
    assert stalled_lines(caplog) == []
    no_errors_logged(caplog)


@pytest.mark.parametrize(
    ("header", "value", "served"),
    [
        ("Content-Type", b"text/plain\x01", ("Content-Type", "application/octet-stream")),
        ("Content-Language", b"en\x1f", ("Content-Language", None)),
        ("Content-Disposition", b"inline\x7f;x", ("Content-Disposition", "attachment")),
    ],
)
async def test_a_stored_header_with_a_control_character_is_replaced_not_a_dead_answer(
    proxy: Any,
    moto: Any,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
    header: str,
    value: bytes,
    served: tuple[str, str | None],
) -> None:
    """reprobe20b: an object stored around the proxy with a control character in such a
    header got no HTTP answer at all on GET and HEAD (aiohttp refused the header at the
    status line), logged download.failed beside an access line of 200. Now the header
    is the proxy's default and the object is served."""
    caplog.set_level(logging.WARNING, "s3proxy.downloads")
    data = b"hello"
    # http.client, which sends such a byte (botocore and aiohttp's client would not)
    conn = http.client.HTTPConnection(urlsplit(moto.endpoint_url).netloc, timeout=10)
    await asyncio.to_thread(conn.request, "PUT", f"/{bucket}/{KEY}", data, {header: value})
    assert (await asyncio.to_thread(conn.getresponse)).status == 200
    conn.close()
    for method in ("GET", "HEAD"):
        resp = await proxy.request(method, path(KEY))
        assert resp.status == 200, await resp.text()
        name, want = served
        got = resp.headers.get(name)
        assert got == want if want != "attachment" else got.startswith("attachment"), got
        if method == "GET":
            assert await resp.read() == data
    assert "download.header_dropped" in caplog.text
