"""PutObject's lean path (``s3proxy.s3_parts.PartSender.put_object``): the request
botocore would send, for a fraction of its CPU (every small file is one PutObject).
Signatures and headers are checked by SeaweedFS; retries through FaultyS3 on moto."""

from __future__ import annotations

import os
from typing import Any

import pytest

from s3proxy.checksums import Algorithm, Crc
from s3proxy.s3 import ObjectOptions, PreconditionFailed, S3Error
from s3proxy.s3_aiobotocore import AioObjectStore, ClientOptions, open_store
from s3proxy.s3_parts import PartSender, header_names, object_headers
from s3proxy.uploads import encode_metadata_value
from tests.faults import Fault, FaultyS3
from tests.test_s3_parts import TRICKY_KEYS

pytest_plugins = ["tests.seaweed_fixture"]

NAMES = {
    "ContentType": "Content-Type",
    "ContentDisposition": "Content-Disposition",
    "ACL": "x-amz-acl",
    "StorageClass": "x-amz-storage-class",
    "ServerSideEncryption": "x-amz-server-side-encryption",
    "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id",
    "IfNoneMatch": "If-None-Match",
    "IfMatch": "If-Match",
    "Metadata": "x-amz-meta-",
}


def crc(data: bytes) -> Any:
    c = Crc(Algorithm.CRC64NVME)
    c.update(data)
    return c.result()


# --- pure ---------------------------------------------------------------------------


async def test_header_names_are_botocores(moto: Any, bucket: str) -> None:
    opts = ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1")
    async with open_store(opts, bucket) as store:
        sender = store._part_sender()
        assert isinstance(sender, PartSender)
        assert sender.put_names == NAMES
        op = store._client.meta.service_model.operation_model("PutObject")
        assert header_names(op) == NAMES


def test_object_headers_carry_every_parameter_and_the_metadata() -> None:
    params = {
        "ContentType": "text/plain",
        "ContentDisposition": 'attachment; filename="a.txt"',
        "ACL": "private",
        "StorageClass": "STANDARD_IA",
        "ServerSideEncryption": "aws:kms",
        "SSEKMSKeyId": "key-1",
        "IfNoneMatch": "*",
        "SSECustomerKey": None,  # left out, as botocore leaves out what is not given
    }
    headers = object_headers(NAMES, params, {"owner": "ann", "note": "=?UTF-8?B?w6k=?="})
    assert headers == {
        "Content-Type": "text/plain",
        "Content-Disposition": 'attachment; filename="a.txt"',
        "x-amz-acl": "private",
        "x-amz-storage-class": "STANDARD_IA",
        "x-amz-server-side-encryption": "aws:kms",
        "x-amz-server-side-encryption-aws-kms-key-id": "key-1",
        "If-None-Match": "*",
        "x-amz-meta-owner": "ann",
        "x-amz-meta-note": "=?UTF-8?B?w6k=?=",
    }


@pytest.mark.parametrize(
    ("params", "metadata"),
    [
        ({"ContentType": "text/plain", "Tagging": "a=b"}, {}),  # a parameter it does not know
        ({"ContentType": "text/plain"}, {"note": "é"}),  # non-ASCII: botocore's answer
        ({"ContentType": "text/plain"}, {"note": "a\r\nb"}),
        ({"ContentDisposition": 'attachment; filename="é"'}, {}),
    ],
)
def test_what_this_path_cannot_send_is_left_to_botocore(
    params: dict[str, Any], metadata: dict[str, str]
) -> None:
    assert object_headers(NAMES, params, metadata) is None


# --- against a store that checks signatures -----------------------------------------


def _no_botocore_put(store: AioObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make botocore's put_object fail: what passes was sent by the lean path."""

    async def refuse(**kwargs: Any) -> Any:
        raise AssertionError("PutObject went through botocore")

    monkeypatch.setattr(store._client, "put_object", refuse)


@pytest.mark.e2e
@pytest.mark.parametrize("key", TRICKY_KEYS)
async def test_lean_puts_are_accepted_by_a_store_that_checks_signatures(
    weed_store: AioObjectStore, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_botocore_put(weed_store, monkeypatch)
    data = os.urandom(100 * 1024)
    options = ObjectOptions(
        content_type="text/plain; charset=utf-8",
        content_disposition="attachment; filename*=UTF-8''%C3%A9t%C3%A9.txt",
        metadata={"owner": "ann", "note": encode_metadata_value("été ✓")},
        storage_class="STANDARD",
    )
    chunks: list[bytes | memoryview] = [data[:1000], memoryview(data)[1000:]]
    written = await weed_store.put(key, chunks, options, checksum=crc(data))
    assert written.etag.strip('"')
    assert written.checksum is not None and written.checksum.value == crc(data).b64()
    head = await weed_store.head(key)
    async with await weed_store.get(key) as body:
        got = bytearray()
        while chunk := await body.read(1 << 20):
            got += chunk
    await weed_store.delete(key)
    assert bytes(got) == data
    assert head.content_type == options.content_type
    assert head.content_disposition == options.content_disposition
    assert head.metadata == dict(options.metadata)


@pytest.mark.e2e
async def test_a_conditional_lean_put_on_a_taken_key_is_precondition_failed(
    weed_store: AioObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_botocore_put(weed_store, monkeypatch)
    key = "lean/taken.bin"
    options = ObjectOptions("application/octet-stream")
    await weed_store.put(key, [b"first"], options, if_none_match=True)
    try:
        with pytest.raises(PreconditionFailed):
            await weed_store.put(key, [b"second"], options, if_none_match=True)
        async with await weed_store.get(key) as body:
            assert await body.read(100) == b"first"
    finally:
        await weed_store.delete(key)


# --- retries and errors, as botocore's ----------------------------------------------


async def _one_put(endpoint: str, bucket: str, rule: Any, **opts: Any) -> tuple[Any, FaultyS3]:
    async with FaultyS3(endpoint, rule) as faulty:
        options = ClientOptions(endpoint_url=faulty.endpoint_url, region="us-east-1", **opts)
        async with open_store(options, bucket) as store:
            assert isinstance(store._part_sender(), PartSender)
            try:
                result: Any = await store.put("k.bin", [b"x" * 1000], ObjectOptions("text/plain"))
            except S3Error as err:
                result = err
    return result, faulty


def _first(times: int, fault: Fault) -> Any:
    return lambda op, n: fault if op == "PutObject" and n <= times else None


@pytest.mark.parametrize(
    "fault",
    [Fault(status=500), Fault(status=503, code="SlowDown"), Fault(drop=True)],
    ids=["500", "SlowDown", "dropped"],
)
async def test_transient_put_failures_are_retried_like_botocore(
    moto: Any, bucket: str, fault: Fault
) -> None:
    result, faulty = await _one_put(moto.endpoint_url, bucket, _first(2, fault))
    assert result.etag.strip('"'), result
    assert faulty.calls.count("PutObject") == 3


async def test_a_put_refusal_is_not_retried_and_keeps_s3s_code(moto: Any, bucket: str) -> None:
    rule = _first(5, Fault(status=403, code="AccessDenied"))
    result, faulty = await _one_put(moto.endpoint_url, bucket, rule)
    assert isinstance(result, S3Error)
    assert result.kind.status == 502 and result.reason == "AccessDenied"
    assert result.operation == "PutObject"
    assert faulty.calls.count("PutObject") == 1
