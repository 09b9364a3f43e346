"""What operators' endpoints and the log disclose: /readyz names nothing, /metrics wants
an API key when auth is on (or --metrics-listen), and no credential reaches the log."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from s3proxy.app import create_app, create_operator_app
from s3proxy.log import REDACTED, redact
from s3proxy.state import STATE
from s3proxy.tokens import issue
from tests import bodies
from tests.conftest import make_settings
from tests.s3util import MotoServer, ProxyProcess, fake_aws_env, free_port

KEY = "k-" + "a" * 30
TUS_BODY = "eyJpZCI6IjAxNzY5MDAwMDAwLWFiYyIsImtleSI6InUvYS5iaW4ifQ"
TUS_SIG = "l5FfYeG1Qm-KpeJ_ieKx6rH3KeaOnBzvm9Ip78M_AnU"
SECRET = "s" * 32


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            '127.0.0.1 "POST /upload?token=eyJ.abc HTTP/1.1" 201',
            '127.0.0.1 "POST /upload?token=REDACTED HTTP/1.1" 201',
        ),
        ("GET /u?a=1&TOKEN=x&b=2", "GET /u?a=1&TOKEN=REDACTED&b=2"),
        ("/x?api_key=k1", "/x?api_key=REDACTED"),
        ("/x?key=k1&upload_id=7", "/x?key=REDACTED&upload_id=7"),
        (
            "https://s3/b/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&X-Amz-Expires=900",
            "https://s3/b/k?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&X-Amz-Expires=900",
        ),
        ("?X-Amz-Security-Token=IQo", "?X-Amz-Security-Token=REDACTED"),
        (
            "https://s3/b/k?AWSAccessKeyId=AK&Signature=x",
            "https://s3/b/k?AWSAccessKeyId=REDACTED&Signature=REDACTED",
        ),
        ("Authorization: Bearer sk_live_1", "Authorization: Bearer REDACTED"),
        # not credentials: other names that end in "key", and the usage hint's placeholder
        ("monkey=1 /x?turkey=2&tokens=3", "monkey=1 /x?turkey=2&tokens=3"),
        ('curl -H "Authorization: Bearer $KEY"', 'curl -H "Authorization: Bearer $KEY"'),
        ("upload.completed key=uploads/a.pdf size=3", "upload.completed key=uploads/a.pdf size=3"),
        # the name the app decodes is what counts (outside test, finding 3: ?%74oken= was
        # taken as the token, 201, and logged in clear)
        ("/upload?%74oken=eyJ.abc HTTP/1.1", "/upload?%74oken=REDACTED HTTP/1.1"),
        ("/upload?tok%65n=eyJ.abc&a=1", "/upload?tok%65n=REDACTED&a=1"),
        ("/upload?a=1&%54OKEN=x", "/upload?a=1&%54OKEN=REDACTED"),
        (
            "?X-Amz-Sig%6Eature=ab&X%2DAmz%2DCredential=AK",
            "?X-Amz-Sig%6Eature=REDACTED&X%2DAmz%2DCredential=REDACTED",
        ),
        ("?api+key=1&api%5Fkey=2", "?api+key=1&api%5Fkey=REDACTED"),
        ("/u?next=/a?token=x", "/u?next=/a?token=REDACTED"),
        ("/u?a=1&&token=x", "/u?a=1&&token=REDACTED"),
        # a tus upload URL is a bearer capability: its signature goes (finding 2)
        (
            f'"PATCH /tus/{TUS_BODY}.{TUS_SIG} HTTP/1.1" 204',
            f'"PATCH /tus/{TUS_BODY}.REDACTED HTTP/1.1" 204',
        ),
        (
            f"Location: http://h/tus/{TUS_BODY}.{TUS_SIG}",
            f"Location: http://h/tus/{TUS_BODY}.REDACTED",
        ),
        (f"/tus/{TUS_BODY}%2E{TUS_SIG}?x=1", f"/tus/{TUS_BODY}.REDACTED?x=1"),
        (f"/tus/{TUS_BODY}.%{ord(TUS_SIG[0]):02X}{TUS_SIG[1:]}", f"/tus/{TUS_BODY}.REDACTED"),
        # a path slightly off (each a 404) still carries a valid signature (the re-probe)
        (
            f'"HEAD /tus/{TUS_BODY}.{TUS_SIG}%20 HTTP/1.1"',
            f'"HEAD /tus/{TUS_BODY}.REDACTED HTTP/1.1"',
        ),
        (f"/tus/{TUS_BODY}.{TUS_SIG};x", f"/tus/{TUS_BODY}.REDACTED"),
        (f"/tus/{TUS_BODY}.{TUS_SIG}%2Fmore", f"/tus/{TUS_BODY}.REDACTED"),
        (f"/TUS/{TUS_BODY}.{TUS_SIG}", f"/tus/{TUS_BODY}.REDACTED"),
        (f"/tus%2F{TUS_BODY}.{TUS_SIG}", f"/tus/{TUS_BODY}.REDACTED"),
        (f"/tus/x/{TUS_BODY}.{TUS_SIG}", f"/tus/{TUS_BODY}.REDACTED"),
        # not upload URLs: a key under tus/, the creation endpoint
        ("upload.completed key=u/tus/report.pdf", "upload.completed key=u/tus/report.pdf"),
        ('"POST /tus/ HTTP/1.1" 201', '"POST /tus/ HTTP/1.1" 201'),
    ],
)
def test_redact(line: str, expected: str) -> None:
    assert redact(line) == expected


async def test_readyz_names_no_bucket(proxy: Any, bucket: str) -> None:
    resp = await proxy.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready"}


async def test_readyz_not_ready_names_nothing(proxy_factory: Any) -> None:
    proxy = await proxy_factory(bucket="secret-bucket-name")
    resp = await proxy.get("/readyz")
    assert resp.status == 503
    text = await resp.text()
    assert "secret-bucket-name" not in text and "127.0.0.1" not in text
    assert json.loads(text)["error"]["code"].startswith("UPSTREAM")


async def test_metrics_need_an_api_key_when_auth_is_on(proxy_factory: Any) -> None:
    proxy = await proxy_factory(api_key=(KEY,), token_secret=(SECRET,))
    assert (await proxy.get("/metrics")).status == 401
    bad = await proxy.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert bad.status == 401
    token = issue(SECRET.encode(), prefix="u/", ttl=60)
    scoped = await proxy.get("/metrics", params={"token": token})
    assert scoped.status == 403 and (await scoped.json())["error"]["code"] == "TOKEN_SCOPE"
    ok = await proxy.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status == 200 and "s3proxy_uploads_started_total" in await ok.text()
    # the load balancer's checks stay open
    assert (await proxy.get("/healthz")).status == 200
    assert (await proxy.get("/readyz")).status == 200


async def test_metrics_open_without_auth(proxy: Any) -> None:
    assert (await proxy.get("/metrics")).status == 200


async def test_operator_listener(aiohttp_client: Any, moto: MotoServer, bucket: str) -> None:
    main = create_app(make_settings(moto.endpoint_url, bucket=bucket, api_key=(KEY,)))
    await aiohttp_client(main)  # starts the S3 client the operator app reads
    operator = await aiohttp_client(create_operator_app(main))
    metrics = await operator.get("/metrics")
    assert metrics.status == 200 and "s3proxy_http_request_seconds" in await metrics.text()
    ready = await operator.get("/readyz")
    body = await ready.json()
    assert ready.status == 200 and body["status"] == "ready" and body["bucket"] == bucket
    assert (await operator.get("/healthz")).status == 200
    assert (await operator.post("/upload")).status in (404, 405)  # nothing else there


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_no_token_in_the_access_log(
    moto: MotoServer, bucket: str, tmp_path: Path, fmt: str
) -> None:
    """Neither an upload token, however its parameter's name is spelled (the app decodes
    ``%74oken`` as ``token``: the outside test's finding 3), nor a tus upload URL's
    signature (a bearer capability: finding 2) is written to the log."""
    proxy = ProxyProcess.start(
        ["--endpoint-url", moto.endpoint_url, "--bucket", bucket, "--log-format", fmt],
        {**fake_aws_env(), "S3PROXY_TOKEN_SECRET": SECRET},
        tmp_path / "proxy.log",
    )
    token = issue(SECRET.encode(), prefix="u/", ttl=60)
    raw = bodies.body([bodies.file("f", "a.txt", os.urandom(100))])
    tus = {"Tus-Resumable": "1.0.0"}
    try:
        async with aiohttp.ClientSession() as session:
            for name in ("token", "%74oken", "tok%65n"):
                async with session.post(
                    URL(f"{proxy.url}/upload?{name}={token}", encoded=True),
                    data=io.BytesIO(raw),
                    headers=bodies.headers(),
                ) as resp:
                    assert resp.status == 201, (name, await resp.text())
            async with session.post(
                f"{proxy.url}/tus/",
                headers={**tus, "Upload-Length": "3", "Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status == 201, await resp.text()
                upload_url = proxy.url + resp.headers["Location"]
            async with session.head(upload_url, headers=tus) as resp:
                assert resp.status == 200
            async with session.delete(upload_url, headers=tus) as resp:
                assert resp.status == 204
    finally:
        proxy.stop()
    log = proxy.log_path.read_text()
    for name in ("token", "%74oken", "tok%65n"):
        assert f"/upload?{name}=REDACTED" in log
    assert token not in log and token.split(".")[-1] not in log
    signature = upload_url.rsplit(".", 1)[-1]
    assert signature not in log
    assert log.count(".REDACTED HTTP/1.1") == 2, log  # HEAD and DELETE


async def test_a_client_gone_mid_body_is_499_in_the_access_log_and_metrics(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """The outside test's cut uploads showed as ``"POST /upload" 400 0`` and
    ``status="400"``: an answer nobody was left to read. Like nginx: 499. (A real
    process: aiohttp's test server cancels a handler whose client left, the CLI's not.)"""
    proxy = ProxyProcess.start(
        ["--endpoint-url", moto.endpoint_url, "--bucket", bucket],
        fake_aws_env(),
        tmp_path / "proxy.log",
    )
    raw = bodies.body([bodies.file("f", "a.bin", b"x" * (1 << 20))])
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(bodies.request_head(len(raw)) + raw[:50_000])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()
        for _ in range(100):
            if '"POST /upload HTTP/1.1"' in proxy.log_path.read_text():
                break
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/metrics") as r:
            scrape = await r.text()
    finally:
        proxy.stop()
    line = next(x for x in proxy.log_path.read_text().splitlines() if "POST /upload" in x)
    assert '"POST /upload HTTP/1.1" 499 0 ' in line, line
    assert 'route="/upload",status="499"' in scrape, scrape
    assert 'route="/upload",status="400"' not in scrape


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("127.0.0.1", None),
        (":9100", None),
        ("127.0.0.1:0", None),
        ("127.0.0.1:http", None),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int] | None) -> None:
    from s3proxy.settings import parse_listen

    if expected is None:
        with pytest.raises(ValueError):
            parse_listen(text)
    else:
        assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "line",
    [
        "upload.stored key=a/b.bin size=102400 etag=abc",
        "GET /x?Token=abc&sig=def HTTP/1.1",
        "a;key=1 b&password=2",
        "BEARER abcdef",  # no '=': the old shortcut skipped it
        "authorization: bearer x.y.z",
        "x=1 Bearer $KEY",
        f"/tus/{TUS_BODY}.{TUS_SIG}",
        "",
    ],
)
def test_redact_shortcuts_mask_what_both_patterns_would(line: str) -> None:
    """redact's cheap pre-checks skip a pattern only where it cannot match."""

    from s3proxy import log

    full = log._QUERY_PAIR.sub(log._mask_param, line)
    full = log._TUS_SEGMENT.sub(log._mask_tus, full)
    full = log._BEARER.sub(r"\1" + REDACTED, full)
    assert redact(line) == full


async def test_readyz_says_a_refusing_store_is_unreachable_not_slow(proxy_factory: Any) -> None:
    """A store that refuses every connection, its HeadBucket retried (5 attempts, as
    botocore's standard mode) past the 1 s readiness timeout: UPSTREAM_UNAVAILABLE with
    the attempt's failure (reprobe21c: UPSTREAM_TIMEOUT, "did not answer its check
    within 1s", as if the store were slow)."""
    proxy = await proxy_factory(
        f"http://127.0.0.1:{free_port()}",
        s3_max_attempts=5,
        readiness_timeout=1.0,
    )
    resp = await proxy.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "UPSTREAM_UNAVAILABLE"
    state = proxy.server.app[STATE]
    assert state.store_check.last is not None
    assert "cannot reach S3" in state.store_check.last.message, state.store_check.last.message
