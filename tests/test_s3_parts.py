"""UploadPart's lean path (``s3proxy.s3_parts``): the same request, retries and errors as
botocore's, for a third of the CPU. Signatures are checked by SeaweedFS (moto does not
check them); retries and error shapes through the fault-injecting proxy on moto."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiobotocore.credentials import AioRefreshableCredentials
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from s3proxy.checksums import Algorithm, Crc
from s3proxy.embedded import EmbeddedStore
from s3proxy.s3 import BadDigest, ObjectOptions, S3Error
from s3proxy.s3_aiobotocore import AioObjectStore, ClientOptions, open_store
from s3proxy.s3_parts import PartSender, error_response, network_error, part_url, unanswered
from tests.faults import Fault, FaultyS3

pytest_plugins = ["tests.seaweed_fixture"]

MiB = 1024**2
OPTS = ObjectOptions("application/octet-stream", "attachment", {})
# Keys whose encoding a hand-built request gets wrong first: reserved and unicode characters.
TRICKY_KEYS = [
    "plain/a.bin",
    "dir/a b+c%d~e=f&g;h,i'j(k)l!m*n$o@p.bin",
    "ünïcødé/çø ✓ 文件.pdf",
    "x/==/+/%2F/a?b#c.txt",
]


def crc(data: bytes) -> Any:
    c = Crc(Algorithm.CRC64NVME)
    c.update(data)
    return c.result()


# --- pure ---------------------------------------------------------------------------


def test_error_response_reads_s3s_code_and_message() -> None:
    xml = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>easy</Message></Error>"
    parsed = error_response(503, {"X-Amz-Request-Id": "r1"}, xml)
    assert parsed["Error"] == {"Code": "SlowDown", "Message": "easy"}
    assert parsed["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert parsed["ResponseMetadata"]["HTTPHeaders"] == {"x-amz-request-id": "r1"}


@pytest.mark.parametrize("body", [b"", b"<html>bad gateway</html", b"not xml at all"])
def test_an_answer_that_is_not_s3_xml_is_named_by_its_status(body: bytes) -> None:
    assert error_response(502, {}, body)["Error"]["Code"] == "502"


def test_part_url_encodes_the_upload_id_as_sigv4_canonical_query() -> None:
    url = part_url("http://h:1/b/k", "a+b/c=d e~f_g.h-i", 7)
    assert url == "http://h:1/b/k?partNumber=7&uploadId=a%2Bb%2Fc%3Dd%20e~f_g.h-i"


def test_network_failures_become_botocores_exceptions() -> None:
    url = "http://127.0.0.1:1/b"
    connect = aiohttp.ConnectionTimeoutError()
    assert isinstance(network_error(connect, url), ConnectTimeoutError)
    assert isinstance(network_error(aiohttp.SocketTimeoutError(), url), ReadTimeoutError)
    assert isinstance(network_error(TimeoutError(), url), ReadTimeoutError)
    refused = aiohttp.ClientConnectorError(
        aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None),
        ConnectionRefusedError(111, "refused"),
    )
    assert isinstance(network_error(refused, url), EndpointConnectionError)
    closed = aiohttp.ServerDisconnectedError()
    assert isinstance(network_error(closed, url), ConnectionClosedError)


def test_which_failed_attempts_may_still_land() -> None:
    """A read timeout or a dropped connection: S3 may have the request (or get it later,
    held on the way); no connection made: nothing left the proxy."""
    url = "http://127.0.0.1:1/b"
    assert unanswered(network_error(aiohttp.SocketTimeoutError(), url))
    assert unanswered(network_error(aiohttp.ServerDisconnectedError(), url))
    assert not unanswered(network_error(aiohttp.ConnectionTimeoutError(), url))
    assert not unanswered(EndpointConnectionError(endpoint_url=url))


# --- which path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "lean"),
    [
        ({}, True),
        ({"lean_parts": False}, False),
        ({"sign_payload": True}, False),  # the payload hash needs the body: botocore's path
        ({"request_checksum": "when_supported"}, False),  # botocore adds a CRC32
    ],
)
async def test_the_lean_path_is_taken_only_where_it_sends_what_botocore_would(
    moto: Any, bucket: str, changes: dict[str, Any], lean: bool
) -> None:
    opts = ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1", **changes)
    async with open_store(opts, bucket) as store:
        assert isinstance(store._part_sender(), PartSender) is lean


@pytest.mark.parametrize(
    ("env", "lean"),
    [
        ({"HTTP_PROXY": "http://127.0.0.1:9"}, False),  # botocore would send through it
        ({"HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"}, True),  # not here
        ({"HTTPS_PROXY": "http://127.0.0.1:9"}, True),  # the endpoint is plain HTTP
        ({"NO_PROXY": "example.com"}, True),
    ],
)
async def test_an_http_proxy_that_applies_leaves_the_calls_to_botocore(
    moto: Any, bucket: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], lean: bool
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    opts = ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1")
    async with open_store(opts, bucket) as store:
        assert isinstance(store._part_sender(), PartSender) is lean


# --- against a store that checks signatures -----------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("key", TRICKY_KEYS)
async def test_lean_parts_are_accepted_by_a_store_that_checks_signatures(
    weed_store: AioObjectStore, key: str
) -> None:
    first, last = os.urandom(5 * MiB), os.urandom(1000)
    upload_id = await weed_store.create(key, OPTS, checksum=Algorithm.CRC64NVME)
    try:
        # a part as several chunks, as the pipeline hands them over
        chunks: list[bytes | memoryview] = [first[: MiB + 3], memoryview(first)[MiB + 3 :]]
        etags = [
            await weed_store.upload_part(key, upload_id, 1, chunks, checksum=crc(first)),
            await weed_store.upload_part(key, upload_id, 2, [last], checksum=crc(last)),
        ]
        parts = list(enumerate(etags, start=1))
        await weed_store.complete(key, upload_id, parts, checksums=[crc(first), crc(last)])
    except BaseException:
        await weed_store.abort(key, upload_id)
        raise
    async with await weed_store.get(key) as body:
        got = bytearray()
        while chunk := await body.read(MiB):
            got += chunk
    await weed_store.delete(key)
    assert bytes(got) == first + last


@pytest.mark.e2e
async def test_a_wrong_checksum_is_refused_as_bad_digest_by_the_store(
    weed_store: AioObjectStore,
) -> None:
    key = "lean/bad-digest.bin"
    data = os.urandom(1000)
    upload_id = await weed_store.create(key, OPTS, checksum=Algorithm.CRC64NVME)
    try:
        with pytest.raises(BadDigest):
            await weed_store.upload_part(key, upload_id, 1, [data], checksum=crc(data + b"x"))
    finally:
        await weed_store.abort(key, upload_id)


@pytest.mark.e2e
async def test_refreshable_credentials_are_fetched_fresh_for_every_signature(
    seaweedfs: EmbeddedStore,
) -> None:
    """Credentials that refresh (an assumed role, instance metadata): every signature asks
    for them (awaiting the refresh), and our signer signs with them."""
    refreshed = 0

    async def refresh() -> dict[str, str]:
        nonlocal refreshed
        refreshed += 1
        # inside botocore's advisory window (15 min): refreshed again on every use
        expiry = datetime.now(UTC) + timedelta(minutes=5)
        return {
            "access_key": seaweedfs.access_key,
            "secret_key": seaweedfs.secret_key,
            "token": "",  # SeaweedFS takes a token as STS's: none here (see test_sigv4)
            "expiry_time": expiry.isoformat(),
        }

    opts = ClientOptions(
        endpoint_url=seaweedfs.endpoint_url,
        region=seaweedfs.region,
        access_key="stale",
        secret_key="stale",
        max_attempts=1,
    )
    async with open_store(opts, seaweedfs.bucket) as store:
        store._client._request_signer._credentials = AioRefreshableCredentials.create_from_metadata(
            await refresh(), refresh_using=refresh, method="test"
        )
        sender = store._part_sender()
        assert isinstance(sender, PartSender)
        key, data = "lean/refreshed.bin", os.urandom(1000)
        upload_id = await store.create(key, OPTS)
        try:
            before = refreshed
            etag = await store.upload_part(key, upload_id, 1, [data])
            assert refreshed > before  # the part's signature asked for fresh credentials
            await store.complete(key, upload_id, [(1, etag)])
        except BaseException:
            await store.abort(key, upload_id)
            raise
        before = refreshed
        await store.put("lean/refreshed-put.bin", [data], OPTS)
        assert refreshed > before
        for name in (key, "lean/refreshed-put.bin"):
            async with await store.get(name) as body:
                assert await body.read(2000) == data
            await store.delete(name)
        assert sender._keys.derived == 1  # ours signed both, with one key for the day


@pytest.mark.e2e
async def test_static_credentials_without_a_token_are_signed_by_ours(
    weed_store: AioObjectStore,
) -> None:
    sender = weed_store._part_sender()
    assert isinstance(sender, PartSender)
    written = await weed_store.put("lean/static.bin", [b"static"], OPTS)
    assert written.etag.strip('"')
    await weed_store.delete("lean/static.bin")
    assert sender._keys.derived == 1


# --- retries and errors, as botocore's ----------------------------------------------


async def _one_part(endpoint: str, bucket: str, rule: Any, **opts: Any) -> tuple[Any, FaultyS3]:
    """Upload one part through FaultyS3 with ``rule``: (the etag or the S3Error, the proxy)."""
    async with FaultyS3(endpoint, rule) as faulty:
        options = ClientOptions(endpoint_url=faulty.endpoint_url, region="us-east-1", **opts)
        async with open_store(options, bucket) as store:
            assert isinstance(store._part_sender(), PartSender)
            upload_id = await store.create("k.bin", OPTS)
            try:
                result: Any = await store.upload_part("k.bin", upload_id, 1, [b"x" * 1000])
            except S3Error as err:
                result = err
            finally:
                await store.abort("k.bin", upload_id)
    return result, faulty


def _first(times: int, fault: Fault) -> Any:
    return lambda op, n: fault if op == "UploadPart" and n <= times else None


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=500),
        Fault(status=503, code="SlowDown"),
        Fault(status=400, code="RequestTimeout"),
        Fault(drop=True),
    ],
    ids=["500", "SlowDown", "RequestTimeout", "dropped"],
)
async def test_transient_failures_are_retried_like_botocore(
    moto: Any, bucket: str, fault: Fault
) -> None:
    result, faulty = await _one_part(moto.endpoint_url, bucket, _first(2, fault))
    assert isinstance(result, str) and result.strip('"'), result
    assert faulty.calls.count("UploadPart") == 3


async def test_a_refusal_is_not_retried_and_keeps_s3s_code(moto: Any, bucket: str) -> None:
    rule = _first(5, Fault(status=403, code="AccessDenied"))
    result, faulty = await _one_part(moto.endpoint_url, bucket, rule)
    assert isinstance(result, S3Error)
    assert result.kind.status == 502 and result.reason == "AccessDenied"
    assert result.operation == "UploadPart"
    assert faulty.calls.count("UploadPart") == 1


async def test_max_attempts_counts_the_first_attempt(moto: Any, bucket: str) -> None:
    rule = _first(10, Fault(status=500))
    result, faulty = await _one_part(moto.endpoint_url, bucket, rule, max_attempts=2)
    assert isinstance(result, S3Error) and result.kind.status == 502
    assert faulty.calls.count("UploadPart") == 2


async def test_a_slow_answer_is_a_read_timeout_504(moto: Any, bucket: str) -> None:
    rule = _first(10, Fault(delay=1.0))
    result, faulty = await _one_part(
        moto.endpoint_url, bucket, rule, max_attempts=2, read_timeout=0.3
    )
    assert isinstance(result, S3Error) and result.kind.status == 504
    assert faulty.calls.count("UploadPart") == 2


async def test_an_unreachable_store_is_a_503() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens there now
    opts = ClientOptions(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key="a",
        secret_key="b",
        max_attempts=2,
    )
    async with open_store(opts, "bucket") as store:
        assert isinstance(store._part_sender(), PartSender)
        with pytest.raises(S3Error) as err:
            await store.upload_part("k", "id", 1, [b"x"])
    assert err.value.kind.status == 503 and err.value.operation == "UploadPart"
