"""CreateMultipartUpload, CompleteMultipartUpload and PutObjectTagging through the lean
sender (``s3proxy.s3_parts``): the requests botocore would send (its own serializer and
checksum code are the oracles), its reading of S3's answers (a 200 with an ``<Error>``
body is a failure), its retries and errors. Signatures are checked by SeaweedFS; the
requests both paths send, and their retries, are compared through FaultyS3 on moto."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import botocore.session
import pytest
from botocore.handlers import _looks_like_special_case_error
from botocore.httpchecksum import apply_request_checksum, resolve_request_checksum_algorithm
from botocore.serialize import create_serializer

from s3proxy.checksums import Algorithm, Crc, CrcValue
from s3proxy.s3 import ObjectOptions, PreconditionFailed, S3Error, Written, whole_object
from s3proxy.s3_aiobotocore import AioObjectStore, ClientOptions, client_config, open_store
from s3proxy.s3_parts import (
    answer_status,
    complete_body,
    error_response,
    tagging_body,
    tagging_headers,
    xml_fields,
)
from tests.faults import Fault, FaultyS3
from tests.test_s3_parts import TRICKY_KEYS

pytest_plugins = ["tests.seaweed_fixture"]

MiB = 1024**2
CALLS = ("CreateMultipartUpload", "CompleteMultipartUpload", "PutObjectTagging")
OPTIONS = ObjectOptions(
    "text/plain; charset=utf-8",
    "attachment; filename=\"a.txt\"; filename*=UTF-8''%C3%A9.txt",
    {"owner": "ann", "note": "=?UTF-8?B?w6k=?="},
)
MODEL = botocore.session.get_session().get_service_model("s3")


def crc(data: bytes) -> CrcValue:
    c = Crc(Algorithm.CRC64NVME)
    c.update(data)
    return c.result()


def botocore_request(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    """The request botocore builds for ``params``: its serializer, then its checksum
    handling with the proxy's client config (what the client runs before signing)."""
    model = MODEL.operation_model(operation)
    request: dict[str, Any] = create_serializer("rest-xml").serialize_to_request(params, model)
    config = client_config(ClientOptions(endpoint_url="http://127.0.0.1:1", region="us-east-1"))
    request["context"] = {"client_config": config}
    resolve_request_checksum_algorithm(request, model, params)
    apply_request_checksum(request)
    return request


# --- pure: the bodies are botocore's ------------------------------------------------

ETAG = '"5d41402abc4b2a76b9719d911017c592"'


@pytest.mark.parametrize(
    "parts",
    [
        [{"PartNumber": 1, "ETag": ETAG}],
        [
            {"PartNumber": 1, "ETag": ETAG, "ChecksumCRC64NVME": "AAAAAAAAAAA="},
            {"PartNumber": 2, "ETag": '"abc-2"', "ChecksumCRC64NVME": "q83vEjRWeJA="},
        ],
        [{"PartNumber": n, "ETag": f'"{n:032x}"', "ChecksumCRC32C": "yZRlqg=="} for n in (1, 9)],
        [{"PartNumber": 3, "ETag": "a&b<c>d'e\"f é\r\n✓"}],  # escaping, as ElementTree does
        [],
    ],
    ids=["one", "crc64nvme", "crc32c", "escaped", "none"],
)
def test_complete_body_is_botocores_serialisation(parts: list[dict[str, Any]]) -> None:
    params = {"Bucket": "b", "Key": "k", "UploadId": "u", "MultipartUpload": {"Parts": parts}}
    assert complete_body(parts) == botocore_request("CompleteMultipartUpload", params)["body"]


@pytest.mark.parametrize(
    "tags",
    [
        {"sha256": hashlib.sha256(b"x").hexdigest()},
        {"a": "1", "b b": "two words", "c&<>": "é ✓ \"'\r\n"},
        {},
    ],
    ids=["sha256", "escaped", "none"],
)
def test_tagging_body_and_checksum_are_botocores(tags: dict[str, str]) -> None:
    tag_set = [{"Key": k, "Value": v} for k, v in tags.items()]
    params = {"Bucket": "b", "Key": "k", "Tagging": {"TagSet": tag_set}}
    request = botocore_request("PutObjectTagging", params)
    body = tagging_body(tags)
    assert body == request["body"]
    # PutObjectTagging requires a checksum: botocore sends a CRC32 of the body, no MD5
    assert tagging_headers(body) == request["headers"]


# --- pure: answers read as botocore reads them --------------------------------------

INITIATED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Bucket>uploads</Bucket><Key>a/b.bin</Key>"
    b"<UploadId>VXBsb2FkIElEIGZvciA2aWWpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>"
    b"</InitiateMultipartUploadResult>"
)
COMPLETED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Location>http://uploads.s3.amazonaws.com/a/b.bin</Location><Bucket>uploads</Bucket>"
    b"<Key>a/b.bin</Key><ETag>&quot;3858f62230ac3c915f300c664312c11f-9&quot;</ETag>"
    b"<ChecksumCRC64NVME>q83vEjRWeJA=</ChecksumCRC64NVME><ChecksumType>FULL_OBJECT</ChecksumType>"
    b"</CompleteMultipartUploadResult>"
)
# S3 may answer CompleteMultipartUpload 200 and then fail: the error is in the body
# (its API reference; a whitespace keep-alive precedes it while S3 works).
FAILED_LATE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n\n\n'
    b"<Error><Code>InternalError</Code><Message>We encountered an internal error. "
    b"Please try again.</Message><RequestId>656c76696e6727732072657175657374</RequestId>"
    b"<HostId>Uuag1LuByRx9e6j5Onimru9pO4ZVKnJ2Qz7/C1NPcfTWAtRPfTaOFg==</HostId></Error>"
)


def test_the_answers_fields_are_read_without_their_namespace() -> None:
    assert xml_fields(INITIATED)["UploadId"] == (
        "VXBsb2FkIElEIGZvciA2aWWpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA"
    )
    fields = xml_fields(COMPLETED)
    assert fields["ETag"] == '"3858f62230ac3c915f300c664312c11f-9"'
    assert (fields["ChecksumCRC64NVME"], fields["ChecksumType"]) == ("q83vEjRWeJA=", "FULL_OBJECT")
    assert xml_fields(b"") == {} and xml_fields(b"<html>") == {}


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, COMPLETED),
        (200, INITIATED),
        (200, b""),
        (200, FAILED_LATE),
        (200, COMPLETED[:120]),  # cut off: botocore retries it as a 500
        (200, b"<Error><Code>SlowDown</Code></Error>"),
        (200, b"<Errors/>"),
        (500, FAILED_LATE),
        (403, b"<Error><Code>AccessDenied</Code></Error>"),
    ],
)
def test_a_200_with_an_error_body_is_a_500_as_botocore_makes_it(status: int, body: bytes) -> None:
    expected = 500 if _looks_like_special_case_error(status, body) else status
    assert answer_status(status, body) == expected


def test_a_200_with_an_error_body_is_shaped_as_s3s_error() -> None:
    status = answer_status(200, FAILED_LATE)
    parsed = error_response(status, {}, FAILED_LATE)
    assert parsed["Error"]["Code"] == "InternalError"
    assert parsed["ResponseMetadata"]["HTTPStatusCode"] == 500


# --- which path, and what is sent (moto through FaultyS3) ---------------------------


def paths(faulty: FaultyS3) -> dict[str, set[str]]:
    """Which path sent each call: botocore names every request it sends with an
    ``amz-sdk-invocation-id``; the lean sender does not."""
    seen: dict[str, set[str]] = {}
    for op, headers in faulty.headers:
        path = "botocore" if "amz-sdk-invocation-id" in headers else "lean"
        seen.setdefault(op, set()).add(path)
    return seen


# Transport and signature headers: differ between any two requests, or between the two
# HTTP clients, not in what S3 is asked to do.
TRANSPORT = frozenset(
    {
        "authorization",
        "x-amz-date",
        "user-agent",
        "amz-sdk-invocation-id",
        "amz-sdk-request",
        "host",
        "accept",
        "accept-encoding",
        "connection",
        "expect",
    }
)


def sent(faulty: FaultyS3, op: str) -> list[tuple[dict[str, str], bytes]]:
    """The requests of ``op`` as S3 saw them: headers (not TRANSPORT) and body."""
    return [
        ({k: v for k, v in headers.items() if k not in TRANSPORT}, body)
        for (o, headers), (_, body) in zip(faulty.headers, faulty.bodies, strict=True)
        if o == op
    ]


async def multipart(
    store: AioObjectStore,
    key: str,
    parts: Sequence[bytes],
    *,
    checksum: bool,
    options: ObjectOptions = OPTIONS,
) -> Written:
    """One multipart upload as the pipeline makes it: create, parts, complete, the tag."""
    algorithm = Algorithm.CRC64NVME if checksum else None
    upload_id = await store.create(key, options, checksum=algorithm)
    crcs = [crc(p) for p in parts] if checksum else []
    try:
        etags = [
            await store.upload_part(key, upload_id, n, [p], checksum=crcs[n - 1] if crcs else None)
            for n, p in enumerate(parts, start=1)
        ]
        written = await store.complete(key, upload_id, list(enumerate(etags, 1)), checksums=crcs)
    except BaseException:
        await store.abort(key, upload_id)
        raise
    await store.tag(key, {"sha256": hashlib.sha256(b"".join(parts)).hexdigest()})
    return written


async def _upload_through(
    moto: Any,
    bucket: str,
    key: str,
    parts: Sequence[bytes],
    *,
    checksum: bool,
    options: ObjectOptions = OPTIONS,
    **opts: Any,
) -> tuple[Written, FaultyS3, dict[str, str]]:
    async with FaultyS3(moto.endpoint_url) as faulty:
        client = ClientOptions(endpoint_url=faulty.endpoint_url, region="us-east-1", **opts)
        async with open_store(client, bucket) as store:
            written = await multipart(store, key, parts, checksum=checksum, options=options)
            tagging = await store._client.get_object_tagging(Bucket=bucket, Key=key)
    return written, faulty, {t["Key"]: t["Value"] for t in tagging["TagSet"]}


@pytest.mark.parametrize("checksum", [True, False], ids=["crc64nvme", "no-checksum"])
async def test_lean_calls_send_what_botocore_sends(moto: Any, bucket: str, checksum: bool) -> None:
    parts = [os.urandom(5 * MiB), os.urandom(1000)]
    lean, lean_faulty, lean_tags = await _upload_through(
        moto, bucket, "lean/a b+é.bin", parts, checksum=checksum
    )
    boto, boto_faulty, boto_tags = await _upload_through(
        moto, bucket, "lean/a b+é.bin", parts, checksum=checksum, lean_parts=False
    )
    assert {op: paths(lean_faulty)[op] for op in CALLS} == {op: {"lean"} for op in CALLS}
    assert {op: paths(boto_faulty)[op] for op in CALLS} == {op: {"botocore"} for op in CALLS}
    for op in CALLS:
        assert sent(lean_faulty, op) == sent(boto_faulty, op), op
    assert lean == boto  # the same ETag and stored checksum, read from S3's answer
    assert lean_tags == boto_tags == {"sha256": hashlib.sha256(b"".join(parts)).hexdigest()}
    if checksum:
        whole = whole_object([crc(p) for p in parts])
        assert whole is not None and lean.checksum is not None
        assert (lean.checksum.value, lean.checksum.type) == (whole.b64(), "FULL_OBJECT")
    else:
        assert lean.checksum is None


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({}, "lean"),
        ({"lean_parts": False}, "botocore"),
        ({"lean_put": False}, "botocore"),
        ({"request_checksum": "when_supported"}, "botocore"),  # botocore adds CRC32s
    ],
)
async def test_the_calls_go_lean_where_the_parts_do(
    moto: Any, bucket: str, changes: dict[str, Any], path: str
) -> None:
    parts = [os.urandom(5 * MiB), b"end"]
    _, faulty, _ = await _upload_through(moto, bucket, "k.bin", parts, checksum=True, **changes)
    assert {op: paths(faulty)[op] for op in CALLS} == {op: {path} for op in CALLS}


async def test_a_create_the_lean_path_cannot_send_is_botocores(moto: Any, bucket: str) -> None:
    """Metadata with a tab is not plain: botocore sends that create (``object_headers``
    gives None), and the rest of the upload stays lean."""
    tabbed = ObjectOptions("text/plain", None, {"n": "a\tb"})
    parts = [os.urandom(5 * MiB)]
    _, faulty, _ = await _upload_through(
        moto, bucket, "k.bin", parts, checksum=False, options=tabbed
    )
    seen = paths(faulty)
    assert seen["CreateMultipartUpload"] == {"botocore"}
    assert seen["CompleteMultipartUpload"] == seen["PutObjectTagging"] == {"lean"}


# --- answers, errors and retries, as botocore's -------------------------------------


async def _complete_through(
    moto: Any, bucket: str, rule: Any, *, lean: bool, if_none_match: bool = False, **opts: Any
) -> tuple[Any, FaultyS3]:
    """Create, one part and Complete through FaultyS3 with ``rule``: (the Written, or the
    S3Error Complete raised as (type, status, reason, operation)), and the proxy."""
    key = "taken.bin" if if_none_match else f"k-{lean}.bin"
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        options = ClientOptions(
            endpoint_url=faulty.endpoint_url, region="us-east-1", lean_parts=lean, **opts
        )
        async with open_store(options, bucket) as store:
            upload_id = await store.create(key, OPTIONS)
            try:
                etag = await store.upload_part(key, upload_id, 1, [b"x" * 1000])
                result: Any = await store.complete(
                    key, upload_id, [(1, etag)], if_none_match=if_none_match
                )
            except S3Error as err:
                result = (type(err), err.kind.status, err.reason, err.operation)
                await store.abort(key, upload_id)
    return result, faulty


def _completes(times: int, fault: Fault) -> Any:
    return lambda op, n: fault if op == "CompleteMultipartUpload" and n <= times else None


@pytest.mark.parametrize(
    ("times", "fault", "outcome"),
    [
        (1, Fault(status=200, code="InternalError"), None),  # retried, then done
        (2, Fault(status=200, code="SlowDown"), None),
        (5, Fault(status=200, code="InternalError"), (S3Error, 502, "InternalError")),
        (5, Fault(status=200, code="AccessDenied"), (S3Error, 502, "AccessDenied")),
        (5, Fault(status=500), (S3Error, 502, "InternalError")),
    ],
    ids=["once", "slowdown-twice", "always", "access-denied", "500"],
)
async def test_a_200_with_an_error_is_retried_and_raised_like_botocore(
    moto: Any, bucket: str, times: int, fault: Fault, outcome: Any
) -> None:
    results = {}
    for lean in (True, False):
        result, faulty = await _complete_through(
            moto, bucket, _completes(times, fault), lean=lean, max_attempts=3
        )
        assert paths(faulty)["CompleteMultipartUpload"] == {"lean" if lean else "botocore"}
        calls = faulty.calls.count("CompleteMultipartUpload")
        results[lean] = (result if outcome is not None else type(result), calls)
    assert results[True] == results[False]
    if outcome is None:
        assert results[True] == (Written, times + 1)
    else:
        assert results[True] == ((*outcome, "CompleteMultipartUpload"), 3)


async def test_a_conditional_complete_on_a_taken_key_is_translated_as_before(
    moto: Any, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="taken.bin", Body=b"first")
    results = {}
    for lean in (True, False):
        result, faulty = await _complete_through(
            moto, bucket, lambda op, n: None, lean=lean, if_none_match=True
        )
        assert paths(faulty)["CompleteMultipartUpload"] == {"lean" if lean else "botocore"}
        results[lean] = result
    assert results[True] == results[False]
    assert results[True] == (
        PreconditionFailed,
        502,  # S3's 412 to the proxy's own write: the client is told 502 as before
        "PreconditionFailed",
        "CompleteMultipartUpload",
    )
    assert s3.get_object(Bucket=bucket, Key="taken.bin")["Body"].read() == b"first"


@pytest.mark.parametrize(
    ("op", "answer"),
    [
        (
            "CreateMultipartUpload",
            b"<InitiateMultipartUploadResult><Bucket>b</Bucket></InitiateMultipartUploadResult>",
        ),
        ("CreateMultipartUpload", b""),
        ("CompleteMultipartUpload", b"<CompleteMultipartUploadResult/>"),
    ],
    ids=["create-no-upload-id", "create-empty", "complete-no-etag"],
)
async def test_a_200_without_what_the_call_returns_is_an_upstream_error(
    moto: Any, bucket: str, op: str, answer: bytes
) -> None:
    """A 200 without an UploadId or ETag (a broken gateway): a 502 naming the call, not
    retried (its status is not transient), not a KeyError."""
    rule = lambda o, n: Fault(status=200, body=answer) if o == op else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        options = ClientOptions(endpoint_url=faulty.endpoint_url, region="us-east-1")
        async with open_store(options, bucket) as store:
            with pytest.raises(S3Error) as err:
                await multipart(store, "k.bin", [b"x"], checksum=False)
    assert (err.value.kind.status, err.value.operation) == (502, op)
    assert faulty.calls.count(op) == 1
    assert paths(faulty)[op] == {"lean"}


# --- against a store that checks signatures -----------------------------------------


def _no_botocore_calls(store: AioObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make botocore's three calls fail: what passes was sent by the lean path."""

    async def refuse(**kwargs: Any) -> Any:
        raise AssertionError("the call went through botocore")

    for name in ("create_multipart_upload", "complete_multipart_upload", "put_object_tagging"):
        monkeypatch.setattr(store._client, name, refuse)


@pytest.mark.e2e
@pytest.mark.parametrize("checksum", [True, False], ids=["crc64nvme", "no-checksum"])
@pytest.mark.parametrize("key", TRICKY_KEYS)
async def test_lean_multipart_uploads_are_accepted_by_a_store_that_checks_signatures(
    weed_store: AioObjectStore, monkeypatch: pytest.MonkeyPatch, key: str, checksum: bool
) -> None:
    _no_botocore_calls(weed_store, monkeypatch)
    parts = [os.urandom(5 * MiB), os.urandom(1000)]
    written = await multipart(weed_store, key, parts, checksum=checksum)
    head = await weed_store.head(key)
    tagging = await weed_store._client.get_object_tagging(Bucket=weed_store.bucket, Key=key)
    async with await weed_store.get(key) as body:
        got = bytearray()
        while chunk := await body.read(MiB):
            got += chunk
    await weed_store.delete(key)
    assert bytes(got) == b"".join(parts)
    assert written.etag.strip('"')
    assert (head.content_type, head.content_disposition) == (
        OPTIONS.content_type,
        OPTIONS.content_disposition,
    )
    assert head.metadata == dict(OPTIONS.metadata)
    assert tagging["TagSet"] == [{"Key": "sha256", "Value": hashlib.sha256(got).hexdigest()}]
    whole = whole_object([crc(p) for p in parts])
    if checksum:
        assert whole is not None and written.checksum is not None
        assert written.checksum.value == whole.b64()
    else:
        assert written.checksum is None


@pytest.mark.e2e
async def test_a_wrong_whole_object_checksum_is_refused_by_the_store(
    weed_store: AioObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole-object checksum header reaches the store, which checks it."""
    _no_botocore_calls(weed_store, monkeypatch)
    key = "lean/bad-whole.bin"
    data = os.urandom(1000)
    upload_id = await weed_store.create(key, OPTIONS, checksum=Algorithm.CRC64NVME)
    try:
        etag = await weed_store.upload_part(key, upload_id, 1, [data], checksum=crc(data))
        sender = weed_store._part_sender()
        assert sender is not None
        # the part's own value in the list, another object's as the whole
        wrong = crc(data + b"x")
        headers = {"x-amz-checksum-type": "FULL_OBJECT", wrong.algorithm.header: wrong.b64()}
        part = {"PartNumber": 1, "ETag": etag, "ChecksumCRC64NVME": crc(data).b64()}
        with pytest.raises(S3Error) as err:
            async with weed_store.call("CompleteMultipartUpload"):
                await sender.complete(key, upload_id, complete_body([part]), headers)
        assert err.value.reason == "BadDigest"
    finally:
        await weed_store.abort(key, upload_id)


@pytest.mark.e2e
async def test_a_conditional_lean_complete_on_a_taken_key_is_precondition_failed(
    weed_store: AioObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_botocore_calls(weed_store, monkeypatch)
    key = "lean/taken-complete.bin"
    await weed_store.put(key, [b"first"], ObjectOptions("application/octet-stream"))
    upload_id = await weed_store.create(key, OPTIONS)
    try:
        etag = await weed_store.upload_part(key, upload_id, 1, [b"second"])
        with pytest.raises(PreconditionFailed):
            await weed_store.complete(key, upload_id, [(1, etag)], if_none_match=True)
        async with await weed_store.get(key) as body:
            assert await body.read(100) == b"first"
    finally:
        await weed_store.abort(key, upload_id)
        await weed_store.delete(key)
