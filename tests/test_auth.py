"""Who may upload: API keys, signed upload tokens, and the loopback-only default.
Every refusal happens before a body byte is read."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import pytest

from s3proxy.settings import Settings, SettingsError
from s3proxy.tokens import issue
from tests import bodies
from tests.bodies import MiB
from tests.rawhttp import exchange
from tests.s3util import all_keys_async, open_uploads_async
from tests.test_client_digests import SIGN_ROUTES

KEY = "k3y-0123456789abcdef"
SECRET = b"s" * 32
OLD_SECRET = b"o" * 32  # a rotated-out secret that still verifies


@pytest.fixture
async def authed(proxy_factory: Any) -> Any:
    return await proxy_factory(api_key=(KEY,), token_secret=(SECRET.decode(), OLD_SECRET.decode()))


def pdf_body(size: int = 1000) -> bytes:
    return bodies.body([bodies.file("f", "a.pdf", bodies.pdf(size))])


async def post(client: Any, raw: bytes, **headers: str) -> tuple[int, dict[str, Any], Any]:
    resp = await client.post(
        "/upload", data=io.BytesIO(raw), headers={**bodies.headers(), **headers}
    )
    return resp.status, await resp.json(), resp


async def test_no_credentials(authed: Any) -> None:
    status, out, resp = await post(authed, pdf_body())
    assert (status, out["error"]["code"]) == (401, "AUTH_REQUIRED")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_api_key(authed: Any, s3: Any, bucket: str) -> None:
    status, _, _ = await post(authed, pdf_body(), Authorization=f"Bearer {KEY}")
    assert status == 201
    status, out, _ = await post(authed, pdf_body(), Authorization="Bearer wrong")
    assert (status, out["error"]["code"]) == (401, "INVALID_CREDENTIALS")


async def test_token_puts_keys_under_its_prefix(authed: Any, s3: Any, bucket: str) -> None:
    token = issue(SECRET, prefix="users/42/", ttl=60, types=["application/pdf"], subject="u42")
    for how in ({"Authorization": f"Bearer {token}"}, {"X-Upload-Token": token}):
        status, out, _ = await post(authed, pdf_body(), **how)
        assert status == 201, out
        assert out["files"][0]["key"].startswith("users/42/uploads/")
    resp = await authed.post(
        f"/upload?token={token}", data=io.BytesIO(pdf_body()), headers=bodies.headers()
    )
    assert resp.status == 201


async def test_rotated_secret_still_verifies(authed: Any) -> None:
    token = issue(OLD_SECRET, prefix="p/", ttl=60)
    status, _, _ = await post(authed, pdf_body(), Authorization=f"Bearer {token}")
    assert status == 201


@pytest.mark.parametrize(
    ("mangle", "code"),
    [
        (lambda t: t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1], "INVALID_CREDENTIALS"),
        (lambda t: "x" + t, "INVALID_CREDENTIALS"),
        (
            lambda t: issue(b"another-secret-another-secret-32", prefix="p/", ttl=60),
            "INVALID_CREDENTIALS",
        ),
        (lambda t: issue(SECRET, prefix="p/", ttl=60, now=0), "TOKEN_EXPIRED"),
    ],
    ids=["tampered", "garbage", "wrong-secret", "expired"],
)
async def test_bad_tokens(authed: Any, mangle: Any, code: str) -> None:
    token = mangle(issue(SECRET, prefix="p/", ttl=60))
    status, out, _ = await post(authed, pdf_body(), Authorization=f"Bearer {token}")
    assert (status, out["error"]["code"]) == (401, code)


async def test_token_type_scope(authed: Any, s3: Any, bucket: str) -> None:
    token = issue(SECRET, prefix="p/", ttl=60, types=["image/*"])
    raw = bodies.body(
        [
            bodies.file("a", "ok.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(80)),
            bodies.file("b", "doc.pdf", bodies.pdf(6 * MiB)),
        ]
    )
    status, out, _ = await post(authed, raw, Authorization=f"Bearer {token}")
    assert (status, out["error"]["code"]) == (403, "TOKEN_SCOPE")
    assert await all_keys_async(s3, bucket) == [] and await open_uploads_async(s3, bucket) == []


async def test_token_type_refusal_names_what_was_found(authed: Any) -> None:
    """A PNG signature then zeros: libmagic cannot identify it, so it is refused as
    unidentified, never as the image/png its client declared (which the token allows)."""
    token = issue(SECRET, prefix="p/", ttl=60, types=["image/png"])
    fake = b"\x89PNG\r\n\x1a\n" + bytes(200)
    raw = bodies.body([bodies.file("f", "fake.png", fake, "image/png")])
    status, out, _ = await post(authed, raw, Authorization=f"Bearer {token}")
    assert (status, out["error"]["code"]) == (403, "TOKEN_SCOPE")
    assert out["error"]["message"] == (
        "file 'fake.png' is unidentified (application/octet-stream); "
        "the upload token allows image/png"
    )


async def test_token_size_scope(authed: Any, s3: Any, bucket: str) -> None:
    token = issue(SECRET, prefix="p/", ttl=60, max_size=1 * MiB)
    status, out, _ = await post(authed, pdf_body(3 * MiB), Authorization=f"Bearer {token}")
    # One code whether the excess shows in Content-Length or while streaming.
    assert (status, out["error"]["code"]) == (413, "FILE_TOO_LARGE")
    assert "upload token allows" in out["error"]["message"]
    # chunked: no Content-Length to refuse up front; the stream is cut at the token's size
    raw = pdf_body(3 * MiB)
    resp = await authed.post(
        "/upload", data=bodies.chunked(raw), headers={**bodies.headers(), "X-Upload-Token": token}
    )
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "FILE_TOO_LARGE"
    assert await all_keys_async(s3, bucket) == [] and await open_uploads_async(s3, bucket) == []


async def test_token_max_files(authed: Any) -> None:
    token = issue(SECRET, prefix="p/", ttl=60, max_files=1)
    raw = bodies.body(
        [
            bodies.file("a", "a.txt", b"a", "text/plain"),
            bodies.file("b", "b.txt", b"b", "text/plain"),
        ]
    )
    status, out, _ = await post(authed, raw, Authorization=f"Bearer {token}")
    assert (status, out["error"]["code"]) == (413, "TOO_MANY_FILES")


async def test_refused_before_any_body_byte(authed: Any) -> None:
    """With Expect: 100-continue, a bad credential is answered without a 100 Continue."""
    reader, writer = await asyncio.open_connection("127.0.0.1", authed.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\nExpect: 100-continue\r\n"
        b"Authorization: Bearer nope\r\n"
        b"Content-Type: multipart/form-data; boundary=" + bodies.BOUNDARY.encode() + b"\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 401")


async def test_health_needs_no_auth(authed: Any) -> None:
    assert (await authed.get("/healthz")).status == 200


def test_non_loopback_needs_auth() -> None:
    with pytest.raises(SettingsError, match="without authentication"):
        Settings(host="0.0.0.0")
    Settings(host="0.0.0.0", api_key=("k",))
    Settings(host="0.0.0.0", insecure_no_auth=True)


def test_secrets_not_in_repr(tmp_path: Any) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n\n")
    s = Settings(api_key=("inline-key",), api_key_file=keys, webhook_secret="whsec")
    assert s.api_keys() == ("inline-key", "file-key")
    assert "inline-key" not in repr(s) and "whsec" not in repr(s)


async def test_cors_preflight_and_response(proxy_factory: Any) -> None:
    client = await proxy_factory(cors_origin=("https://app.example",))
    pre = await client.options(
        "/upload",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    resp = await client.post(
        "/upload",
        data=io.BytesIO(pdf_body()),
        headers={**bodies.headers(), "Origin": "https://app.example"},
    )
    assert resp.status == 201
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Request-ID" in resp.headers["Access-Control-Expose-Headers"]
    other = await client.options(
        "/upload",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert other.status == 403 and "Access-Control-Allow-Origin" not in other.headers


def names(header: str) -> set[str]:
    return {h.strip().lower() for h in header.split(",")}


@pytest.mark.parametrize(
    ("path", "method", "wanted"),
    [
        (
            "/files/k.bin",
            "GET",
            "range,if-none-match,if-match,if-modified-since,if-unmodified-since,if-range",
        ),
        ("/upload", "POST", "authorization,content-type,content-encoding,x-request-id"),
        ("/tus/", "POST", "tus-resumable,upload-length,upload-metadata,content-encoding"),
    ],
    ids=["conditional-download", "coded-upload", "tus"],
)
async def test_cors_preflight_allows_every_header_the_proxy_reads(
    proxy_factory: Any, path: str, method: str, wanted: str
) -> None:
    """What the README advertises must pass a browser's preflight: conditional downloads
    and coded uploads were blocked (their headers are not CORS-safelisted)."""
    client = await proxy_factory(cors_origin=("https://app.example",))
    pre = await client.options(
        path,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": wanted,
        },
    )
    assert pre.status == 204
    allowed = names(pre.headers["Access-Control-Allow-Headers"])
    assert set(wanted.split(",")) <= allowed
    assert "upload-concat" not in allowed  # no concatenation extension
    # every header the README tells a page to read is exposed
    resp = await client.get("/healthz", headers={"Origin": "https://app.example"})
    exposed = names(resp.headers["Access-Control-Expose-Headers"])
    assert {
        "x-request-id",
        "retry-after",
        "etag",
        "content-range",
        "content-disposition",
        "accept-ranges",
        "repr-digest",
        "location",
        "upload-offset",
        "upload-length",
        "upload-defer-length",
        "upload-expires",
        "tus-resumable",
        "tus-version",
        "tus-extension",
        "tus-max-size",
        "tus-checksum-algorithm",
        "s3proxy-key",
        "s3proxy-sha256",
    } <= exposed


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """A client's fault is never logged as an error, nor with a traceback."""
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# Bytes that are not UTF-8: aiohttp hands them on as lone surrogates.
@pytest.mark.parametrize(
    "credential",
    [
        b"Authorization: Bearer \xff\xfe",
        b"Authorization: Bearer k3y-\xc3",
        b"Authorization: Bearer abc\xff.def",
        b"X-Upload-Token: \xff\xfe.\x80",
    ],
    ids=["bearer", "bearer-truncated-utf8", "bearer-token-like", "x-upload-token"],
)
@pytest.mark.parametrize("expect", [False, True], ids=["body", "expect-100"])
async def test_non_utf8_credentials_are_a_json_401(
    authed: Any, caplog: pytest.LogCaptureFixture, credential: bytes, expect: bool
) -> None:
    raw = pdf_body()
    extra = [credential] + ([b"Expect: 100-continue"] if expect else [])
    head = bodies.request_head(len(raw), *extra)
    resp = await exchange(authed.host, authed.port, head + (b"" if expect else raw))
    assert resp.status == 401, resp.raw[:300]
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.code == "INVALID_CREDENTIALS"
    assert resp.interim == []  # refused before a 100 Continue
    no_tracebacks(caplog)


async def test_non_utf8_credentials_on_downloads_and_signing(
    authed: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for request in (
        b"GET /files/uploads/a.txt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n\r\n",
        b"POST /sign HTTP/1.1\r\nHost: x\r\nX-Upload-Token: a\xff.b\r\nContent-Length: 2\r\n"
        b"Content-Type: application/json\r\n\r\n{}",
        b"GET /files/uploads/a.txt?token=%FF%FE.%80 HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        resp = await exchange(authed.host, authed.port, request, quiet=1)
        assert (resp.status, resp.code) == (401, "INVALID_CREDENTIALS"), resp.raw[:300]
    no_tracebacks(caplog)


async def test_token_with_a_deeply_nested_payload_is_refused(authed: Any) -> None:
    """A payload JSON parser's recursion limit is a malformed token, not a 500 (the
    payload is only parsed once the signature holds, so this needs the secret)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    body = b64(b"[" * 2500 + b"]" * 2500)
    sig = b64(hmac.new(SECRET, body.encode(), hashlib.sha256).digest())
    status, out, _ = await post(authed, pdf_body(), Authorization=f"Bearer {body}.{sig}")
    assert (status, out["error"]["code"]) == (401, "INVALID_CREDENTIALS")


@pytest.mark.parametrize("route", SIGN_ROUTES)
@pytest.mark.parametrize(
    ("extra", "status", "code"),
    [
        (b"", 401, "AUTH_REQUIRED"),
        (b"Authorization: Bearer nope\r\n", 401, "INVALID_CREDENTIALS"),
        (b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-MD5: x\r\n", 400, None),
        (b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Encoding: br\r\n", 415, None),
    ],
    ids=["no-credentials", "bad-credentials", "body-digest", "coding"],
)
async def test_signing_refuses_on_its_headers_before_a_100_continue(
    authed: Any, route: str, extra: bytes, status: int, code: str | None
) -> None:
    """reprobe20b: /sign and /sign/multipart/* sent 100 Continue, then refused 401 (and
    413, 400): a refused client was asked for its body. Now as on /upload."""
    head = (
        (
            f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 20\r\nExpect: 100-continue\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )
    resp = await exchange(authed.host, authed.port, head, quiet=1)
    assert resp.status == status, resp.raw[:300]
    assert resp.interim == [], resp.raw[:300]  # refused before a 100 Continue
    assert code is None or resp.code == code, resp.raw[:300]


async def test_signing_over_its_body_limit_is_413_before_a_100_continue(authed: Any) -> None:
    head = (
        b"POST /sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\nExpect: 100-continue\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\n\r\n"
    )
    resp = await exchange(authed.host, authed.port, head, quiet=1)
    assert (resp.status, resp.code, resp.interim) == (413, "REQUEST_TOO_LARGE", [])


async def test_signing_with_good_headers_gets_its_100_continue(authed: Any) -> None:
    body = b'{"filename": "a.pdf", "content_type": "application/pdf", "size": 10}'
    head = (
        b"POST /sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nExpect: 100-continue\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    )
    resp = await exchange(authed.host, authed.port, head, body, quiet=1)
    assert resp.interim and resp.status == 200, resp.raw[:300]
