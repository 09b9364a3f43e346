"""A body's codings: what aiohttp decodes is stored decoded; what it would pass through
as it came (an unknown Content-Encoding, a transfer coding before chunked) is refused
before a byte is read, never stored as the client's coded bytes and answered 201; a
body that does not decode is a 400 with nothing stored and no traceback.

Before: ``Transfer-Encoding: gzip, chunked``, ``Content-Encoding: x-gzip`` (or
``x-unknown``, ``gzip, gzip``, ``gzip`` then ``identity``) were answered 201 with the
coded bytes stored; ``br`` was a 400 BAD_HTTP_REQUEST asking to "install Brotli"; a body
that was not gzip logged aiohttp's "Unhandled exception" traceback."""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import zlib
from typing import Any

import pytest

from tests import bodies
from tests.rawhttp import RawResponse, exchange
from tests.s3util import all_keys, open_uploads
from tests.test_tus import _new, _patch_headers

MiB = 1024 * 1024

FILE = b"%PDF-1.4 the bytes the client means\n" + bytes(range(256)) * 40
FORM = bodies.body([bodies.file("f", "doc.pdf", FILE)])
BOUNDARY = bodies.BOUNDARY.encode()


def request(body: bytes, headers: bytes, *, chunked: bool = False) -> bytes:
    """A POST /upload of ``body`` as framed: Content-Length, or one chunk (with
    ``Transfer-Encoding: chunked`` unless ``headers`` has a Transfer-Encoding)."""
    if chunked and b"transfer-encoding:" not in headers.lower():
        headers += b"Transfer-Encoding: chunked\r\n"
    head = (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Type: multipart/form-data; boundary="
        + BOUNDARY
        + b"\r\n"
        + headers
    )
    if chunked:
        return head + b"\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


# (coded body, headers, chunked): each stores FILE exactly
DECODED = {
    "gzip": (gzip.compress(FORM), b"Content-Encoding: gzip\r\n", False),
    "deflate": (zlib.compress(FORM), b"Content-Encoding: deflate\r\n", False),
    "GZIP-upper-case": (gzip.compress(FORM), b"Content-Encoding: GZIP\r\n", False),
    "identity": (FORM, b"Content-Encoding: identity\r\n", False),
    "identity-then-gzip": (
        gzip.compress(FORM),
        b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n",
        False,
    ),
    "gzip-chunked": (
        gzip.compress(FORM),
        b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        True,
    ),
    "CHUNKED-upper-case": (FORM, b"Transfer-Encoding: CHUNKED\r\n", True),
    # RFC 1952 section 2.2: members decode to their concatenation
    "gzip-two-members": (
        gzip.compress(FORM[:1000]) + gzip.compress(FORM[1000:]),
        b"Content-Encoding: gzip\r\n",
        False,
    ),
}

# (coded body, headers, chunked, status, code)
REFUSED = {
    "te-gzip-chunked": (
        gzip.compress(FORM),
        b"Transfer-Encoding: gzip, chunked\r\n",
        True,
        501,
        "UNSUPPORTED_TRANSFER_CODING",
    ),
    "te-unknown-chunked": (
        FORM,
        b"Transfer-Encoding: x-foo, chunked\r\n",
        True,
        501,
        "UNSUPPORTED_TRANSFER_CODING",
    ),
    "ce-x-gzip": (gzip.compress(FORM), b"Content-Encoding: x-gzip\r\n", False, 415, ""),
    "ce-unknown": (FORM, b"Content-Encoding: x-unknown\r\n", False, 415, ""),
    "ce-compress": (FORM, b"Content-Encoding: compress\r\n", False, 415, ""),
    "ce-gzip-twice": (
        gzip.compress(gzip.compress(FORM)),
        b"Content-Encoding: gzip, gzip\r\n",
        False,
        415,
        "",
    ),
    "ce-gzip-then-identity": (
        gzip.compress(FORM),
        b"Content-Encoding: gzip\r\nContent-Encoding: identity\r\n",
        False,
        415,
        "",
    ),
    "ce-br-not-installed": (FORM, b"Content-Encoding: br\r\n", False, 415, ""),
    "ce-zstd-not-installed": (FORM, b"Content-Encoding: zstd\r\n", False, 415, ""),
}


def quiet_log(caplog: pytest.LogCaptureFixture) -> None:
    """The client's fault: no traceback, nothing at ERROR."""
    loud = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not loud, [(r.name, r.getMessage()) for r in loud]
    assert "Traceback" not in caplog.text


def refused(resp: RawResponse, status: int, code: str) -> None:
    assert resp.status == status, resp.raw[:400]
    assert resp.code == code, resp.json()
    # The body was not read: it must not be parsed as a next request (HTTP/1.0: the
    # parser's own answers, which close).
    closing = resp.headers.get("Connection", "").lower() == "close"
    assert closing or resp.raw.startswith(b"HTTP/1.0 "), resp.raw[:400]


@pytest.mark.parametrize("name", list(DECODED))
async def test_a_body_coded_as_aiohttp_decodes_is_stored_decoded(
    proxy: Any, s3: Any, bucket: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    body, headers, chunked = DECODED[name]
    resp = await exchange(proxy.host, proxy.port, request(body, headers, chunked=chunked))
    assert resp.status == 201, resp.raw[:400]
    [stored] = resp.json()["files"]
    assert stored["size"] == len(FILE)
    assert s3.get_object(Bucket=bucket, Key=stored["key"])["Body"].read() == FILE
    quiet_log(caplog)


@pytest.mark.parametrize("name", list(REFUSED))
async def test_a_coding_the_proxy_would_store_as_it_came_is_refused(
    proxy: Any, s3: Any, bucket: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    body, headers, chunked, status, code = REFUSED[name]
    resp = await exchange(proxy.host, proxy.port, request(body, headers, chunked=chunked))
    refused(resp, status, code or "UNSUPPORTED_ENCODING")
    message = resp.json()["error"]["message"]
    assert "gzip or deflate" in message or "chunked alone" in message, message
    assert "install" not in message.lower(), message  # not aiohttp's advice to operators
    assert all_keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []
    quiet_log(caplog)


async def test_refused_before_the_body_is_sent_with_expect_100_continue(proxy: Any) -> None:
    head = request(b"", b"Content-Encoding: x-gzip\r\nExpect: 100-continue\r\n").replace(
        b"Content-Length: 0", b"Content-Length: %d" % len(FORM)
    )
    resp = await exchange(proxy.host, proxy.port, head)  # the body is never sent
    assert resp.interim == [], "no 100 Continue for a body that will be refused"
    refused(resp, 415, "UNSUPPORTED_ENCODING")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_that_does_not_decode_is_a_400_without_traceback(
    proxy: Any, s3: Any, bucket: str, chunked: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    raw = request(b"not gzip at all " * 64, b"Content-Encoding: gzip\r\n", chunked=chunked)
    head, _, body = raw.partition(b"\r\n\r\n")
    # The body after the head, as a client sends it once its head went: the upload is
    # reading it when it fails to decode.
    resp = await exchange(proxy.host, proxy.port, head + b"\r\n\r\n", body)
    assert resp.status == 400, resp.raw[:400]
    assert resp.code == "BAD_HTTP_REQUEST", resp.json()
    assert "not valid gzip data" in resp.json()["error"]["message"]
    assert all_keys(s3, bucket) == []
    quiet_log(caplog)


@pytest.mark.parametrize("cut", [1, 4])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("segments", ["one-segment", "head-then-body"])
async def test_a_deflate_body_cut_short_is_a_400_and_nothing_is_stored(
    proxy: Any,
    s3: Any,
    bucket: str,
    cut: int,
    chunked: bool,
    segments: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deflate body without (part of) its Adler-32 was 415 "not supported" when it
    came in one segment (the parser's decode failure taken for a missing decoder), and
    "not valid HTTP/1.1 framing" when the body came after the head."""
    caplog.set_level(logging.INFO)
    coding = "deflate"
    coded = zlib.compress(FORM)
    raw = request(coded[:-cut], f"Content-Encoding: {coding}\r\n".encode(), chunked=chunked)
    if segments == "one-segment":
        resp = await exchange(proxy.host, proxy.port, raw)
    else:
        head, _, body = raw.partition(b"\r\n\r\n")
        resp = await exchange(proxy.host, proxy.port, head + b"\r\n\r\n", body)
    assert resp.status == 400, resp.raw[:400]
    assert resp.code == "BAD_HTTP_REQUEST", resp.json()
    assert f"not valid {coding} data" in resp.json()["error"]["message"]
    assert all_keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []
    quiet_log(caplog)


async def test_gzip_that_breaks_after_parts_were_stored_aborts_the_upload(
    proxy_factory: Any, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Valid gzip for 12 MiB of file (one 5 MiB part is in S3), then garbage."""
    caplog.set_level(logging.INFO)
    proxy = await proxy_factory(part_size=5 * 1024 * 1024)
    coder = zlib.compressobj(6, zlib.DEFLATED, 31)
    head = bodies.part_head(bodies.file("f", "big.bin", b""))
    good = coder.compress(head + os.urandom(12 * 1024 * 1024)) + coder.flush(zlib.Z_SYNC_FLUSH)
    body = good + b"\x00garbage" * 4096
    resp = await exchange(
        proxy.host, proxy.port, request(body, b"Content-Encoding: gzip\r\n"), quiet=20
    )
    assert resp.status == 400, resp.raw[:400]
    assert "not valid gzip data" in resp.json()["error"]["message"]
    assert all_keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []
    quiet_log(caplog)


async def test_a_tus_patch_with_a_coding_not_decoded_is_refused(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory()
    url = await _new(proxy, len(FILE))
    resp = await proxy.patch(
        url, data=gzip.compress(FILE), headers=_patch_headers(0, **{"Content-Encoding": "x-gzip"})
    )
    assert resp.status == 415, await resp.text()
    assert (await resp.json())["error"]["code"] == "UNSUPPORTED_ENCODING"
    head = await proxy.head(url, headers={"Tus-Resumable": "1.0.0"})
    assert head.headers["Upload-Offset"] == "0"  # nothing of it was kept


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_that_fails_to_decode_after_the_answer_logs_no_traceback(
    proxy: Any, chunked: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused before its body was read (415 NOT_MULTIPART), the body comes anyway and
    aiohttp reads it to drain the connection: its bad gzip failed there, and aiohttp
    logged "Unhandled exception" with a traceback."""
    body = b"not gzip at all " * 64
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n"
    head += b"Content-Encoding: gzip\r\n"
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        head += b"Content-Length: %d\r\n\r\n" % len(body)
    resp = await exchange(proxy.host, proxy.port, head, body)
    assert resp.status == 415 and resp.code == "NOT_MULTIPART", resp.raw[:400]
    await asyncio.sleep(0.2)  # the drain's read of the body has failed by now
    quiet_log(caplog)


def test_a_missing_decoder_is_told_from_bad_data() -> None:
    """aiohttp's one ContentEncodingError means either; the answer differs (415 or 400)."""
    from aiohttp.http_exceptions import ContentEncodingError

    from s3proxy.errors import undecodable_coding

    missing = "Can not decode content-encoding: brotli (br). Please install `Brotli`"
    assert undecodable_coding(ContentEncodingError(missing)) is None
    assert undecodable_coding(ContentEncodingError("deflate")) == "deflate"
    bad = ContentEncodingError("Can not decode content-encoding: gzip")
    assert undecodable_coding(bad) == "gzip"
    wrapped = ValueError("malformed body")
    wrapped.__cause__ = bad
    assert undecodable_coding(wrapped) == "gzip"
    assert undecodable_coding(ValueError("x")) is None


def _sync_flushed(data: bytes) -> bytes:
    """A gzip stream flushed (every byte decodable) but never finished: no last block."""
    coder = zlib.compressobj(6, zlib.DEFLATED, 31)
    return coder.compress(data) + coder.flush(zlib.Z_SYNC_FLUSH)


GZ = gzip.compress(FORM)
# (coded body, coding): none is a whole stream of its coding; each decodes to a prefix
# of FORM, FORM and more, or FORM then bytes that are not a member
UNENDED = {
    "gzip-no-trailer": (GZ[:-8], "gzip"),
    "gzip-no-isize": (GZ[:-4], "gzip"),
    "gzip-cut-in-half": (GZ[: len(GZ) // 2], "gzip"),
    "gzip-sync-flushed": (_sync_flushed(FORM), "gzip"),
    "gzip-then-a-member-begun": (GZ + GZ[:10], "gzip"),
    "gzip-then-zero-padding": (GZ + b"\0" * 8, "gzip"),
    "gzip-then-garbage": (GZ + b"garbage", "gzip"),
    "deflate-then-a-stream-begun": (zlib.compress(FORM) + zlib.compress(b"x")[:3], "deflate"),
}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("name", list(UNENDED))
async def test_a_coded_body_whose_stream_does_not_end_is_a_400_and_nothing_is_stored(
    proxy: Any, s3: Any, bucket: str, name: str, chunked: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A gzip body without its CRC-32 and ISIZE trailer, cut in half or only flushed was
    answered 201 and its decoded prefix stored: aiohttp checks a deflate stream's end,
    not a gzip one's."""
    caplog.set_level(logging.INFO)
    coded, coding = UNENDED[name]
    raw = request(coded, f"Content-Encoding: {coding}\r\n".encode(), chunked=chunked)
    head, _, body = raw.partition(b"\r\n\r\n")
    resp = await exchange(proxy.host, proxy.port, head + b"\r\n\r\n", body)
    assert resp.status == 400, resp.raw[:400]
    assert resp.code == "BAD_HTTP_REQUEST", resp.json()
    assert f"not valid {coding} data" in resp.json()["error"]["message"]
    assert all_keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []
    quiet_log(caplog)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("name", list(UNENDED))
async def test_a_coded_body_that_does_not_end_is_a_400_at_once_with_a_request_behind_it(
    proxy: Any, s3: Any, bucket: str, name: str, chunked: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """reprobe16a F1: with a request pipelined behind it in the same read, the body's end
    was cut from what followed, and the parser's refusal at that end (the reader got no
    EOF) was taken for a held tail: what followed waited for the body, never ended, and
    the client got nothing until --client-timeout's 408. Now the 400 comes at once, the
    connection closes after it (nothing after a broken body is read), nothing is kept."""
    caplog.set_level(logging.INFO)
    coded, coding = UNENDED[name]
    raw = request(coded, f"Content-Encoding: {coding}\r\n".encode(), chunked=chunked)
    behind = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    resp = await exchange(proxy.host, proxy.port, raw + behind)
    assert resp.status == 400, resp.raw[:400]
    assert resp.code == "BAD_HTTP_REQUEST", resp.json()
    assert f"not valid {coding} data" in resp.json()["error"]["message"]
    assert resp.closed
    assert resp.raw.count(b"HTTP/1.1 ") == 1, resp.raw[:600]
    assert all_keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []
    quiet_log(caplog)


@pytest.mark.parametrize("size", [7, 1000])
async def test_a_held_coded_body_that_does_not_end_is_a_400_with_a_request_behind_it(
    proxy: Any, s3: Any, bucket: str, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, its body's tail held by the parser (300 KB of gzip in small chunks: its
    reader fills, and the parser keeps the rest until the handler reads on): the
    refusal comes when the handler's read makes the parser parse the held end."""
    caplog.set_level(logging.INFO)
    form = bodies.body([bodies.file("f", "doc.bin", os.urandom(300_000))])
    coded = gzip.compress(form)[:-8]
    framed = b"".join(
        b"%x\r\n%s\r\n" % (len(coded[i : i + size]), coded[i : i + size])
        for i in range(0, len(coded), size)
    )
    head = (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Type: multipart/form-data; boundary="
        + BOUNDARY
        + b"\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    behind = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    resp = await exchange(proxy.host, proxy.port, head + framed + b"0\r\n\r\n" + behind)
    assert resp.status == 400, resp.raw[:400]
    assert "not valid gzip data" in resp.json()["error"]["message"]
    assert resp.closed
    assert resp.raw.count(b"HTTP/1.1 ") == 1, resp.raw[:600]
    assert all_keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []
    quiet_log(caplog)


@pytest.mark.parametrize("cut", ["half", "trailer"])
async def test_a_tus_patch_whose_gzip_does_not_end_keeps_nothing(
    proxy_factory: Any, cut: str
) -> None:
    """A PATCH of gzip cut in half was 204 and the decoded prefix kept; one without its
    trailer completed the upload."""
    proxy = await proxy_factory()
    url = await _new(proxy, len(FILE))
    coded = gzip.compress(FILE)
    body = coded[: len(coded) // 2] if cut == "half" else coded[:-8]
    resp = await proxy.patch(
        url, data=body, headers=_patch_headers(0, **{"Content-Encoding": "gzip"})
    )
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] == "BAD_HTTP_REQUEST"
    head = await proxy.head(url, headers={"Tus-Resumable": "1.0.0"})
    assert head.headers["Upload-Offset"] == "0"


async def test_a_sign_request_whose_gzip_does_not_end_is_a_400(proxy: Any) -> None:
    """Every route that reads a body: /sign's JSON decoded whole without its trailer."""
    coded = gzip.compress(b'{"filename": "a.txt", "size": 3}')[:-8]
    raw = (
        b"POST /sign HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(coded)
    ) + coded
    resp = await exchange(proxy.host, proxy.port, raw)
    assert resp.status == 400, resp.raw[:400]
    assert resp.code == "BAD_HTTP_REQUEST", resp.json()
    assert "not valid gzip data" in resp.json()["error"]["message"]


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_sign_request_with_a_coded_body_is_answered(
    proxy: Any, coding: str, chunked: bool
) -> None:
    """reprobe17a F1: /sign compared the decoded JSON's length with the Content-Length,
    which counts coded bytes: a gzip body (always longer than small JSON) was 400
    CLIENT_DISCONNECTED, and a request pipelined behind it was never answered."""
    data = b'{"filename": "a.txt", "size": 3}'
    coded = gzip.compress(data) if coding == "gzip" else zlib.compress(data)
    head = (
        b"POST /sign HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: %s\r\n" % coding.encode()
    )
    if chunked:
        raw = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            len(coded),
            coded,
        )
    else:
        raw = head + b"Content-Length: %d\r\n\r\n" % len(coded) + coded
    behind = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    resp = await exchange(proxy.host, proxy.port, raw + behind)
    assert resp.status == 200, resp.raw[:400]
    assert "url" in resp.json(), resp.json()
    assert resp.raw.count(b"HTTP/1.1 200") == 2, resp.raw[-300:]


def _raw_deflate(data: bytes) -> bytes:
    coder = zlib.compressobj(6, zlib.DEFLATED, -15)  # no zlib header, no Adler-32
    return coder.compress(data) + coder.flush()


@pytest.mark.parametrize("flipped", [False, True], ids=["intact", "byte-flipped"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_raw_deflate_is_refused(
    proxy: Any, s3: Any, bucket: str, flipped: bool, chunked: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """reprobe17a F4: aiohttp took a deflate body whose first byte is no zlib header for
    raw deflate, which has no checksum: one flipped byte was stored as other bytes and
    answered 201 (3/3). RFC 9110: deflate is the zlib format; raw deflate is refused."""
    caplog.set_level(logging.INFO)
    coded = _raw_deflate(FORM)
    if flipped:
        i = len(coded) // 2
        coded = coded[:i] + bytes([coded[i] ^ 0x55]) + coded[i + 1 :]
    raw = request(coded, b"Content-Encoding: deflate\r\n", chunked=chunked)
    resp = await exchange(proxy.host, proxy.port, raw)
    assert resp.status == 400, resp.raw[:400]
    assert resp.code == "BAD_HTTP_REQUEST", resp.json()
    assert "not valid deflate data" in resp.json()["error"]["message"]
    assert all_keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []
    quiet_log(caplog)


def _members(data: bytes, size: int, coding: str) -> bytes:
    """``data`` coded as one gzip member (or zlib stream) per ``size`` bytes."""
    code = gzip.compress if coding == "gzip" else zlib.compress
    return b"".join(code(data[i : i + size]) for i in range(0, len(data), size))


def _in_writes(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)]


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("writes", ["one", "small"])
async def test_many_members_are_taken_or_refused_by_the_body_not_its_reads(
    proxy: Any, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture, coding: str, writes: str
) -> None:
    """A body of more than 1,024 members was refused 400 when they came in one socket
    read and stored when the same bytes came in small writes: aiohttp caps the members
    one decode call takes (reprobe18a F3: 1,815 gzip members). Now 2,000 members of 1.5
    KiB coded each are stored either way, and 1,025 members under 1 KiB each on average
    (a new decoder per tiny member costs up to 330 CPU s per GiB) refused either way,
    with a message that says why."""
    form = bodies.body([bodies.file("f", "many.bin", os.urandom(2000 * 1536))])
    head = form.index(b"\r\n\r\n") + 4
    tail = len(form) - len(b"\r\n--" + BOUNDARY + b"--\r\n")
    # the form's head in a member of its own, then one per 1.5 KiB of (random) file bytes
    big = _members(form[:head], len(form), coding) + _members(form[head:], 1536, coding)
    # the head, 1,023 empty members, the last one (file and tail): the 1,025th
    few = bodies.body([bodies.file("f", "few.bin", os.urandom(500))])
    few_head = few.index(b"\r\n\r\n") + 4
    small = _members(few[:few_head], len(few), coding)
    empty = gzip.compress(b"") if coding == "gzip" else zlib.compress(b"")
    small += empty * 1023 + _members(few[few_head:], len(few), coding)
    headers = b"Content-Encoding: %s\r\n" % coding.encode()
    for body, size, stored in ((big, 64 * 1024, True), (small, 1024, False)):
        raw = request(body, headers)
        chunks = [raw] if writes == "one" else _in_writes(raw, size)
        resp = await exchange(proxy.host, proxy.port, *chunks, pause=0.01)
        if stored:
            assert resp.status == 201, resp.raw[:400]
            [file] = resp.json()["files"]
            got = s3.get_object(Bucket=bucket, Key=file["key"])["Body"].read()
            assert got == form[head:tail]
        else:
            refused(resp, 400, "BAD_HTTP_REQUEST")
            assert "more than 1024 members" in resp.json()["error"]["message"]
    assert len(all_keys(s3, bucket)) == 1
    assert not open_uploads(s3, bucket)
    quiet_log(caplog)


def _exact_members(data: bytes, coded: int, coding: str) -> bytes:
    """``data`` as stored (level 0) members of exactly ``coded`` bytes each."""
    code = gzip.compress if coding == "gzip" else zlib.compress
    size = coded - len(code(b"", 0))  # a stored member's framing is fixed
    assert len(data) % size == 0
    members = [code(data[i : i + size], 0) for i in range(0, len(data), size)]
    assert {len(m) for m in members} == {coded}
    return b"".join(members)


def _form_of(members: int, size: int) -> bytes:
    """A one-file form exactly ``members`` x ``size`` bytes long."""
    base = len(bodies.body([bodies.file("f", "exact.bin", b"")]))
    return bodies.body([bodies.file("f", "exact.bin", os.urandom(members * size - base))])


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize(
    "reads", ["one-write", "small-writes", "4MiB-reads", "chunked-small-writes"]
)
async def test_member_rule_is_a_rule_of_the_bytes(
    proxy_factory: Any,
    s3: Any,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
    coding: str,
    reads: str,
) -> None:
    """reprobe18c: the rule counted decoders made, with the coded bytes of the read in
    hand. Exactly 1,024 gzip members were refused (aiohttp makes a spare decoder when a
    member ends where a read ends); 1,024 tiny members then one of 2 MiB (2 KiB each on
    average) were refused; 1,500 members of exactly 1,024 bytes were taken or refused by
    how the reads split. Now each member's exact coded bytes are counted as it ends, and
    all three are stored however they are read."""
    proxy = await proxy_factory(**({"read_buffer": 4 * MiB} if reads == "4MiB-reads" else {}))
    empty = gzip.compress(b"") if coding == "gzip" else zlib.compress(b"")
    few = bodies.body([bodies.file("f", "few.bin", os.urandom(500))])
    few_head = few.index(b"\r\n\r\n") + 4
    # the head, 1,022 empty members, the last one: 1,024 in all
    exact = _members(few[:few_head], len(few), coding)
    exact += empty * 1022 + _members(few[few_head:], len(few), coding)
    # the head, 1,023 empty members, then one of 2 MiB: 1,025 of 2 KiB on average
    big = bodies.body([bodies.file("f", "big.bin", os.urandom(2 * MiB))])
    big_head = big.index(b"\r\n\r\n") + 4
    late = _members(big[:big_head], len(big), coding)
    late += empty * 1023 + _members(big[big_head:], len(big), coding)
    # 1,500 members of exactly 1,024 coded bytes: an average of exactly 1 KiB
    even = _form_of(1500, 1024 - len((gzip if coding == "gzip" else zlib).compress(b"", 0)))
    headers = b"Content-Encoding: %s\r\nConnection: close\r\n" % coding.encode()
    for form, body in ((few, exact), (big, late), (even, _exact_members(even, 1024, coding))):
        raw = request(body, headers, chunked=reads.startswith("chunked"))
        chunks = _in_writes(raw, 64 * 1024 if len(raw) > MiB else 1024)
        resp = await exchange(
            proxy.host,
            proxy.port,
            *(chunks if reads.endswith("small-writes") else [raw]),
            pause=0.01,
        )
        assert resp.status == 201, resp.raw[:400]
        [file] = resp.json()["files"]
        got = s3.get_object(Bucket=bucket, Key=file["key"])["Body"].read()
        head = form.index(b"\r\n\r\n") + 4
        assert got == form[head : len(form) - len(b"\r\n--" + BOUNDARY + b"--\r\n")]
    assert len(all_keys(s3, bucket)) == 3
    assert not open_uploads(s3, bucket)
    quiet_log(caplog)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("limit", [0, 4096, 65536])
def test_members_and_their_bytes_are_counted_exactly_however_split(coding: str, limit: int) -> None:
    """No event loop: aiohttp's decoder, fed a body of members of many sizes in random
    splits and under an output limit (as DeflateBuffer feeds it), counts every member
    and every coded byte once: a member that ends where a split ends, one left whole in
    ``unused_data`` by a limit, and zlib's ``unconsumed_tail``, which repeats
    ``unused_data`` once a member ended under a limit (a count went negative)."""
    import random

    from aiohttp.compression_utils import ZLibDecompressor

    from s3proxy.codings import install_end_check

    assert install_end_check()
    rng = random.Random(limit)
    code = gzip.compress if coding == "gzip" else zlib.compress
    pieces = [os.urandom(rng.choice([0, 1, 100, 1000, 5000, 70_000])) for _ in range(300)]
    body = b"".join(code(p, rng.choice([0, 1, 9])) for p in pieces)
    for _ in range(5):
        decoder = ZLibDecompressor(encoding=coding)
        out, at = [], 0
        while at < len(body):
            step = rng.choice([1, 7, 1024, 20_000, len(body)])
            out.append(decoder.decompress_sync(body[at : at + step], limit))
            at += step
            while decoder.data_available and (decoded := decoder.decompress_sync(b"", limit)):
                out.append(decoded)
        members = decoder._s3proxy_members  # type: ignore[attr-defined]
        assert b"".join(out) == b"".join(pieces)
        assert (members.ended, members.coded) == (len(pieces), len(body))


def test_members_are_judged_by_their_average_size() -> None:
    from s3proxy.codings import too_many_members

    assert not too_many_members(1024, 0)  # the first 1,024 are free
    assert too_many_members(1025, 1025 * 1024 - 1)
    assert not too_many_members(1025, 1025 * 1024)
    assert not too_many_members(100_000, 200 * 1024**2)
