"""Probes of what the S3 stores behind the proxy do with additional checksums and conditional
writes: the facts issue #12 (S3 verifies every byte it stores) relies on, kept as tests so that a
store upgrade which changes one fails here rather than in the field.

Each probe runs against moto (server mode; the suite's default store) and SeaweedFS (``weed
mini``, the embedded store; ``e2e``). What each store does is one ``Facts`` row below; the
tests assert the store does exactly that. The clients are boto3 with
``request_checksum_calculation="when_required"``, as the proxy's is, so botocore adds no
checksum of its own: every ``x-amz-checksum-*`` sent is the one a probe passes explicitly
(``ChecksumCRC64NVME=...``), computed by ``s3proxy.checksums`` or deliberately wrong.
Corruption in transit is simulated by a botocore ``before-send`` hook that flips one bit of
the body after the request was signed. docs/integrity-notes.md sums the findings up.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from s3proxy.checksums import Algorithm, Crc, CrcValue, full_object
from s3proxy.embedded import EmbeddedStore
from tests.s3util import BOTO_CONFIG, CREDS, MotoServer, all_keys, open_uploads
from tests.seaweed_fixture import s3_client_kwargs

# S3 refuses a part under 5 MiB unless it is the last (S3 multipart limits); moto checks it.
MIN_PART = 5 * 1024 * 1024
UNSIGNED = "UNSIGNED-PAYLOAD"  # x-amz-content-sha256 when the payload is not signed (SigV4)


@dataclass(frozen=True)
class Facts:
    """What one store does; every field is asserted by a probe below."""

    # A wrong x-amz-checksum-* on PutObject / UploadPart, or a wrong FULL_OBJECT value at
    # CompleteMultipartUpload, is refused 400 BadDigest (and nothing is stored).
    verifies_checksums: bool
    # PutObject and UploadPart sent with only the checksum header answer with the checksum, and
    # HeadObject(ChecksumMode=ENABLED) returns it. (moto keeps a checksum only when botocore's
    # x-amz-sdk-checksum-algorithm header comes with it, and then does not check it either.)
    reports_put_checksum: bool
    # A part whose checksum is another algorithm than the upload declared: the status it gets.
    other_algorithm_part: int
    # The FULL_OBJECT CRC32C HeadObject reports is the object's real CRC32C. moto ignores the
    # value sent and computes its own: without the optional `crc32c` package it computes zlib's
    # CRC32 instead (moto.s3.utils.compute_checksum); its CRC64NVME is right only while awscrt
    # is installed (else it is a CRC32 too).
    crc32c_full_object_correct: bool
    # With a signed payload, a body whose sha256 differs from x-amz-content-sha256 is refused.
    verifies_signed_payload: bool


STORES: dict[str, Facts] = {
    "moto": Facts(
        verifies_checksums=False,
        reports_put_checksum=False,
        other_algorithm_part=200,
        crc32c_full_object_correct=False,
        verifies_signed_payload=False,
    ),
    "seaweedfs": Facts(
        verifies_checksums=True,
        reports_put_checksum=True,
        other_algorithm_part=400,
        crc32c_full_object_correct=True,
        verifies_signed_payload=False,
    ),
}


@dataclass
class Store:
    name: str
    facts: Facts
    bucket: str
    prefix: str  # every key a probe writes starts with it
    connect: Callable[[Config], Any]  # a boto3 S3 client with BOTO_CONFIG merged with this

    def client(self, **config: Any) -> Any:
        """One attempt per call unless asked: botocore's default (legacy) mode retries 400
        BadDigest five times, which would only slow every refusal down."""
        config.setdefault("retries", {"mode": "standard", "max_attempts": 1})
        return self.connect(BOTO_CONFIG.merge(Config(**config)))

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"


def _moto_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    moto: MotoServer = request.getfixturevalue("moto")
    bucket: str = request.getfixturevalue("bucket")  # its teardown asserts no upload left open

    def connect(config: Config) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=moto.endpoint_url,
            region_name="us-east-1",
            config=config,
            **CREDS,
        )

    yield Store("moto", STORES["moto"], bucket, "", connect)


def _seaweed_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    weed: EmbeddedStore = request.getfixturevalue("seaweedfs")

    def connect(config: Config) -> Any:
        return boto3.client("s3", config=config, **s3_client_kwargs(weed))

    store = Store(
        "seaweedfs", STORES["seaweedfs"], weed.bucket, f"probe-{uuid.uuid4().hex}/", connect
    )
    yield store
    # The session's bucket is shared with other e2e tests: clean up only our prefix, then
    # fail if a probe left a multipart upload open.
    s3 = store.client()
    leftover = [u for u in open_uploads(s3, store.bucket) if u["Key"].startswith(store.prefix)]
    for up in leftover:
        s3.abort_multipart_upload(Bucket=store.bucket, Key=up["Key"], UploadId=up["UploadId"])
    for key in all_keys(s3, store.bucket):
        if key.startswith(store.prefix):
            s3.delete_object(Bucket=store.bucket, Key=key)
    assert not leftover, f"multipart uploads left open: {leftover}"


@pytest.fixture
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "moto":
        yield from _moto_store(request)
    else:
        yield from _seaweed_store(request)


MOTO = "moto"
SEAWEED = pytest.param("seaweedfs", marks=pytest.mark.e2e)
BOTH = pytest.mark.parametrize("store", [MOTO, SEAWEED], indirect=True)
ALGORITHMS = pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda a: a.value)


def crc(algorithm: Algorithm, data: bytes) -> CrcValue:
    running = Crc(algorithm)
    running.update(data)
    return running.result()


def refusal(call: Callable[[], Any]) -> tuple[int, str] | None:
    """(status, S3 error code) if ``call`` is refused, None if it succeeds."""
    try:
        call()
    except ClientError as err:
        return err.response["ResponseMetadata"]["HTTPStatusCode"], err.response["Error"]["Code"]
    return None


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def flip_one_bit(first_attempt_only: bool = False) -> Callable[..., None]:
    """A ``before-send`` hook: the signed request goes out with one bit of its body flipped."""
    calls = 0

    def hook(request: Any, **_: Any) -> None:
        nonlocal calls
        calls += 1
        if first_attempt_only and calls > 1:
            return
        body = request.body
        raw = bytearray(body.getvalue() if hasattr(body, "getvalue") else body)
        raw[len(raw) // 2] ^= 0x01
        request.body = bytes(raw)

    return hook


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def recorder(sent: list[dict[str, str]]) -> Callable[..., None]:
    """A ``before-send`` hook keeping each request's headers (lower-cased names) in ``sent``."""

    def hook(request: Any, **_: Any) -> None:
        sent.append({k.lower(): _text(v) for k, v in request.headers.items()})

    return hook


def get(s3: Any, store: Store, key: str) -> bytes:
    data: bytes = s3.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    return data


BAD_DIGEST = (400, "BadDigest")


@BOTH
@ALGORITHMS
def test_put_object_checksum(store: Store, algorithm: Algorithm) -> None:
    s3 = store.client()
    data = payload(10_000)
    good, wrong = crc(algorithm, data), crc(algorithm, data + b"!")

    answer = s3.put_object(
        Bucket=store.bucket, Key=store.key("good"), Body=data, **{algorithm.param: good.b64()}
    )
    head = s3.head_object(Bucket=store.bucket, Key=store.key("good"), ChecksumMode="ENABLED")
    if store.facts.reports_put_checksum:
        assert answer[algorithm.param] == head[algorithm.param] == good.b64()
    else:
        assert algorithm.param not in answer and algorithm.param not in head

    refused = refusal(
        lambda: s3.put_object(
            Bucket=store.bucket, Key=store.key("wrong"), Body=data, **{algorithm.param: wrong.b64()}
        )
    )
    if store.facts.verifies_checksums:
        assert refused == BAD_DIGEST
        assert store.key("wrong") not in all_keys(s3, store.bucket)
    else:
        assert refused is None
        assert get(s3, store, store.key("wrong")) == data


@BOTH
@ALGORITHMS
def test_upload_part_checksum(store: Store, algorithm: Algorithm) -> None:
    s3 = store.client()
    data = payload(10_000)
    good, wrong = crc(algorithm, data), crc(algorithm, data + b"!")
    key = store.key("parts")
    upload_id = s3.create_multipart_upload(
        Bucket=store.bucket, Key=key, ChecksumAlgorithm=algorithm.value
    )["UploadId"]
    try:
        part = {"Bucket": store.bucket, "Key": key, "UploadId": upload_id, "Body": data}
        refused = refusal(
            lambda: s3.upload_part(PartNumber=1, **part, **{algorithm.param: wrong.b64()})
        )
        assert refused == (BAD_DIGEST if store.facts.verifies_checksums else None)

        answer = s3.upload_part(PartNumber=2, **part, **{algorithm.param: good.b64()})
        if store.facts.reports_put_checksum:
            assert answer[algorithm.param] == good.b64()

        other = Algorithm.CRC32C if algorithm is Algorithm.CRC64NVME else Algorithm.CRC64NVME
        refused = refusal(
            lambda: s3.upload_part(PartNumber=3, **part, **{other.param: crc(other, data).b64()})
        )
        assert (refused or (200, ""))[0] == store.facts.other_algorithm_part
    finally:
        s3.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id)


@BOTH
@ALGORITHMS
def test_full_object_checksum_at_complete(store: Store, algorithm: Algorithm) -> None:
    """CreateMultipartUpload(ChecksumType=FULL_OBJECT), parts with their CRCs, then Complete
    with a wrong and with the right combined value; HeadObject reports the stored one."""
    s3 = store.client()
    chunks = [payload(MIN_PART, seed=1), payload(1234, seed=2)]
    parts = [crc(algorithm, c) for c in chunks]
    whole = full_object(parts, algorithm)
    assert whole == crc(algorithm, b"".join(chunks))

    def start() -> tuple[str, list[dict[str, Any]]]:
        upload_id = s3.create_multipart_upload(
            Bucket=store.bucket,
            Key=key,
            ChecksumAlgorithm=algorithm.value,
            ChecksumType="FULL_OBJECT",
        )["UploadId"]
        done = []
        for number, (chunk, value) in enumerate(zip(chunks, parts, strict=True), start=1):
            etag = s3.upload_part(
                Bucket=store.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=chunk,
                **{algorithm.param: value.b64()},
            )["ETag"]
            done.append({"PartNumber": number, "ETag": etag, algorithm.param: value.b64()})
        return upload_id, done

    def complete(upload_id: str, done: list[dict[str, Any]], value: CrcValue) -> Any:
        return s3.complete_multipart_upload(
            Bucket=store.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": done},
            ChecksumType="FULL_OBJECT",
            **{algorithm.param: value.b64()},
        )

    key = store.key("full")
    upload_id, done = start()
    try:
        refused = refusal(lambda: complete(upload_id, done, crc(algorithm, b"not the object")))
        if store.facts.verifies_checksums:
            assert refused == BAD_DIGEST
            # The refused Complete leaves the upload open: it can be completed right or aborted.
            assert upload_id in {u["UploadId"] for u in open_uploads(s3, store.bucket)}
            assert store.key("full") not in all_keys(s3, store.bucket)
            answer = complete(upload_id, done, whole)
            assert answer[algorithm.param] == whole.b64()
            assert answer["ChecksumType"] == "FULL_OBJECT"
        else:
            assert refused is None  # stored: the wrong value was not checked
    except BaseException:
        s3.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id)
        raise

    if not store.facts.verifies_checksums:  # complete a second upload with the right value
        upload_id, done = start()
        complete(upload_id, done, whole)

    head = s3.head_object(Bucket=store.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumType"] == "FULL_OBJECT"
    if algorithm is Algorithm.CRC32C and not store.facts.crc32c_full_object_correct:
        crc32 = zlib.crc32(b"".join(chunks)).to_bytes(4, "big")
        assert head[algorithm.param] == CrcValue(algorithm, int.from_bytes(crc32, "big"), 0).b64()
    else:
        assert head[algorithm.param] == whole.b64()
    assert get(s3, store, key) == b"".join(chunks)


@BOTH
def test_full_object_checksum_without_the_values(store: Store) -> None:
    """Parts and Complete sent with no checksum at all on a CRC64NVME FULL_OBJECT upload: the
    store computes the object's CRC64NVME itself (so the proxy's value can be compared)."""
    s3 = store.client()
    chunks = [payload(MIN_PART, seed=3), payload(99, seed=4)]
    key = store.key("computed")
    upload_id = s3.create_multipart_upload(
        Bucket=store.bucket, Key=key, ChecksumAlgorithm="CRC64NVME", ChecksumType="FULL_OBJECT"
    )["UploadId"]
    try:
        done = [
            {
                "PartNumber": n,
                "ETag": s3.upload_part(
                    Bucket=store.bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=chunk
                )["ETag"],
            }
            for n, chunk in enumerate(chunks, start=1)
        ]
        s3.complete_multipart_upload(
            Bucket=store.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
        )
    except BaseException:
        s3.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id)
        raise
    head = s3.head_object(Bucket=store.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumType"] == "FULL_OBJECT"
    assert head["ChecksumCRC64NVME"] == crc(Algorithm.CRC64NVME, b"".join(chunks)).b64()


@BOTH
def test_if_none_match_refuses_an_existing_key(store: Store) -> None:
    """``If-None-Match: *`` on PutObject and CompleteMultipartUpload: 412, nothing overwritten;
    the refused Complete leaves its upload open, so the caller must abort it."""
    s3 = store.client()
    key = store.key("taken")
    s3.put_object(Bucket=store.bucket, Key=key, Body=b"first")

    assert refusal(
        lambda: s3.put_object(Bucket=store.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    ) == (412, "PreconditionFailed")
    s3.put_object(Bucket=store.bucket, Key=store.key("free"), Body=b"new", IfNoneMatch="*")

    upload_id = s3.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
    try:
        etag = s3.upload_part(
            Bucket=store.bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"third"
        )["ETag"]
        refused = refusal(
            lambda: s3.complete_multipart_upload(
                Bucket=store.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
                IfNoneMatch="*",
            )
        )
        assert refused == (412, "PreconditionFailed")
        assert upload_id in {u["UploadId"] for u in open_uploads(s3, store.bucket)}
    finally:
        s3.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id)
    assert get(s3, store, key) == b"first"


@BOTH
def test_unsigned_payload_with_checksum_over_plain_http(store: Store) -> None:
    """The proxy's client (``payload_signing_enabled=False``) sends UNSIGNED-PAYLOAD even over
    http://, and the checksum header beside it; the store takes the pair."""
    s3 = store.client(s3={"addressing_style": "path", "payload_signing_enabled": False})
    sent: list[dict[str, str]] = []
    s3.meta.events.register("before-send.s3.PutObject", recorder(sent))
    data = payload(100_000)
    value = crc(Algorithm.CRC64NVME, data)
    s3.put_object(Bucket=store.bucket, Key=store.key("u"), Body=data, ChecksumCRC64NVME=value.b64())

    assert s3.meta.endpoint_url.startswith("http://")
    assert sent[0]["x-amz-content-sha256"] == UNSIGNED
    assert sent[0]["x-amz-checksum-crc64nvme"] == value.b64()
    assert get(store.client(), store, store.key("u")) == data


@BOTH
def test_corruption_in_transit(store: Store) -> None:
    """One flipped bit between the signer and the store: only a checksum the store verifies
    stops it. Neither store checks a signed payload's sha256 against the body."""
    data = payload(100_000)
    value = crc(Algorithm.CRC64NVME, data).b64()
    unsigned_s3 = store.client(s3={"addressing_style": "path", "payload_signing_enabled": False})
    signed_s3 = store.client()
    signed: list[dict[str, str]] = []
    signed_s3.meta.events.register("before-send.s3.PutObject", recorder(signed))
    for s3 in (unsigned_s3, signed_s3):
        s3.meta.events.register("before-send.s3.PutObject", flip_one_bit())
    plain = store.client()

    def put(s3: Any, name: str, **checksum: str) -> tuple[int, str] | None:
        return refusal(
            lambda: s3.put_object(Bucket=store.bucket, Key=store.key(name), Body=data, **checksum)
        )

    refused = put(unsigned_s3, "with-crc", ChecksumCRC64NVME=value)
    if store.facts.verifies_checksums:
        assert refused == BAD_DIGEST
        assert store.key("with-crc") not in all_keys(plain, store.bucket)
    else:
        assert refused is None
        assert get(plain, store, store.key("with-crc")) != data  # stored corrupted

    assert put(unsigned_s3, "no-crc") is None
    assert get(plain, store, store.key("no-crc")) != data  # nothing could tell

    refused = put(signed_s3, "signed")
    assert signed[0]["x-amz-content-sha256"] == hashlib.sha256(data).hexdigest()  # SigV4 signed
    if store.facts.verifies_signed_payload:
        assert refused is not None
    else:
        assert refused is None
        assert get(plain, store, store.key("signed")) != data


@pytest.mark.parametrize("store", [SEAWEED], indirect=True)
@pytest.mark.parametrize(("mode", "retried"), [("standard", False), ("legacy", True)])
def test_bad_digest_retry_by_botocore_mode(store: Store, mode: str, retried: bool) -> None:
    """A part corrupted once in transit: botocore's legacy retry mode retries 400 BadDigest
    (its _retry.json ``contentmd5`` policy) and the resend lands intact; standard mode, which
    the proxy uses, does not, so the pipeline must resend the part itself or fail the upload."""
    s3 = store.client(retries={"mode": mode, "max_attempts": 3})
    s3.meta.events.register("before-send.s3.PutObject", flip_one_bit(first_attempt_only=True))
    data = payload(50_000)
    value = crc(Algorithm.CRC64NVME, data).b64()
    refused = refusal(
        lambda: s3.put_object(
            Bucket=store.bucket, Key=store.key("retry"), Body=data, ChecksumCRC64NVME=value
        )
    )
    if retried:
        assert refused is None
        assert get(store.client(), store, store.key("retry")) == data
    else:
        assert refused == BAD_DIGEST
