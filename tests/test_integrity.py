"""S3 verifies every byte (issue #12): the checksum each write carries, what the 201 reports,
and what happens when the bytes change between the proxy and the store.

Corruption in transit is ``tests.faults.Fault(flip=True)``: a proxy between s3proxy and the
store flips one bit of a request body after s3proxy sent it. Only SeaweedFS verifies the
checksum (moto accepts anything, docs/integrity-notes.md), so the detection tests run there
(``e2e``); the pipeline's reactions to S3's answers (resend once on BadDigest, a store that
refuses checksums) are driven on moto through injected answers.
"""

from __future__ import annotations

import io
import os
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web

from s3proxy.app import create_app
from s3proxy.checksums import Algorithm, Crc, CrcValue
from s3proxy.config import Config
from s3proxy.embedded import EmbeddedStore
from s3proxy.parts import PartPlan
from s3proxy.pipeline import PartCrcs
from s3proxy.s3 import ChecksumDiffers, StoredChecksum, stored_checksum
from s3proxy.settings import Settings, SettingsError
from s3proxy.tus_keys import KEY_OBJECT
from tests.conftest import make_settings
from tests.faults import OBJECT_WRITES, Fault, FaultyS3, tus_operation
from tests.s3util import BOTO_CONFIG, all_keys, open_uploads
from tests.seaweed_fixture import s3_client_kwargs

MiB = 1024**2
PART = 5 * MiB  # the tests' --part-size (S3's minimum)
Rule = Callable[[str, int], Fault | None]


def crc(data: bytes, algorithm: Algorithm = Algorithm.CRC64NVME) -> CrcValue:
    running = Crc(algorithm)
    running.update(data)
    return running.result()


def form(data: bytes, filename: str = "f.bin") -> aiohttp.FormData:
    out = aiohttp.FormData()
    out.add_field("file", io.BytesIO(data), filename=filename, content_type="application/x-test")
    return out


async def upload(proxy: Any, data: bytes) -> tuple[int, dict[str, Any]]:
    resp = await proxy.post("/upload", data=form(data))
    return resp.status, await resp.json()


# --- pure: each part's CRC, fed as the bytes arrive ---------------------------------------


@pytest.mark.parametrize(
    ("plan", "total"),
    [
        (PartPlan(1000, growing=False), 0),
        (PartPlan(1000, growing=False), 1),
        (PartPlan(1000, growing=False), 1000),  # exactly one part: no empty second
        (PartPlan(1000, growing=False), 1001),
        (PartPlan(1000, growing=False), 4321),
        (PartPlan(3, growing=True), 3 * 1000 + 6 * 2 + 1),  # past the first tier: 6-byte parts
    ],
)
@pytest.mark.parametrize("chunking", [1, 7, 999, 1000, 1001, 4096, "random"])
def test_part_crcs_match_the_slices(plan: PartPlan, total: int, chunking: int | str) -> None:
    data = random.Random(total).randbytes(total)
    crcs = PartCrcs(Algorithm.CRC64NVME, plan)
    rng = random.Random(7)
    pos = 0
    while pos < total:
        step = rng.randint(1, 2500) if chunking == "random" else int(chunking)
        crcs.update(data[pos : pos + step])
        pos += step
    start, number, got, want = 0, 1, [], []
    while start < total or number == 1:
        size = min(plan.size(number), total - start)
        got.append(crcs.take(number))
        want.append(crc(data[start : start + size]))
        start += size
        number += 1
    assert got == want


# --- what the 201 reports (moto computes CRC64NVME itself; it verifies nothing) -----------


SIZES = pytest.mark.parametrize(
    "size", [0, 1, 100_000, 2 * PART + 123], ids=["empty", "one-byte", "one-part", "multipart"]
)


@SIZES
async def test_reported_checksum_is_the_crc64nvme_of_the_bytes(
    proxy: Any, s3: Any, bucket: str, size: int
) -> None:
    data = os.urandom(size)
    status, out = await upload(proxy, data)
    assert status == 201, out
    [f] = out["files"]
    assert f["checksum"] == {
        "algorithm": "crc64nvme",
        "type": "FULL_OBJECT",
        "value": crc(data).b64(),
    }
    assert s3.get_object(Bucket=bucket, Key=f["key"])["Body"].read() == data


async def test_checksums_on_the_wire(proxy_factory: Any, moto: Any) -> None:
    """Every UploadPart and PutObject carries its CRC; Create declares FULL_OBJECT; with
    ``--checksum off`` none is sent and none reported (today's behaviour before #12)."""
    data = os.urandom(PART + 10)
    async with FaultyS3(moto.endpoint_url) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url)
        assert (await upload(proxy, data))[0] == 201
        assert (await upload(proxy, b"small"))[0] == 201
        sent = {op: h for op, h in faulty.headers if op != "UploadPart"}
        parts = [h for op, h in faulty.headers if op == "UploadPart"]
        assert sent["CreateMultipartUpload"]["x-amz-checksum-algorithm"] == "CRC64NVME"
        assert sent["CreateMultipartUpload"]["x-amz-checksum-type"] == "FULL_OBJECT"
        assert sorted(h["x-amz-checksum-crc64nvme"] for h in parts) == sorted(
            [crc(data[:PART]).b64(), crc(data[PART:]).b64()]
        )
        assert sent["PutObject"]["x-amz-checksum-crc64nvme"] == crc(b"small").b64()
        assert sent["CompleteMultipartUpload"]["x-amz-checksum-crc64nvme"] == crc(data).b64()
        assert all(h["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD" for h in parts)

        faulty.headers.clear()
        off = await proxy_factory(endpoint_url=faulty.endpoint_url, checksum="off")
        status, out = await upload(off, data)
        assert status == 201 and out["files"][0]["checksum"] is None
        # PutObjectTagging always has one: botocore's model requires a checksum for it.
        sums = [k for op, h in faulty.headers for k in h if k.startswith("x-amz-checksum")]
        assert sums == ["x-amz-checksum-crc32"]
        assert [op for op, h in faulty.headers if "x-amz-checksum-crc32" in h] == [
            "PutObjectTagging"
        ]


async def test_crc32c_is_reported_as_sent(proxy_factory: Any) -> None:
    proxy = await proxy_factory(checksum="crc32c")
    status, out = await upload(proxy, b"hello")
    assert status == 201, out
    assert out["files"][0]["checksum"] == {
        "algorithm": "crc32c",
        "type": "FULL_OBJECT",
        "value": crc(b"hello", Algorithm.CRC32C).b64(),
    }


async def test_moto_stores_corrupted_bytes(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """The documented fact that makes SeaweedFS the proof: moto checks no checksum, so a
    flipped bit is stored even with the checksum on."""
    data = os.urandom(1000)
    async with FaultyS3(
        moto.endpoint_url, lambda op, n: Fault(flip=True) if op == "PutObject" else None
    ) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url)
        status, out = await upload(proxy, data)
    assert status == 201, out
    stored = s3.get_object(Bucket=bucket, Key=out["files"][0]["key"])["Body"].read()
    assert len(stored) == len(data) and stored != data


# --- the pipeline's answer to S3's (injected on moto) -------------------------------------


def bad_digest(op: str, at: Callable[[int], bool]) -> Rule:
    return lambda o, n: Fault(status=400, code="BadDigest") if o == op and at(n) else None


@pytest.mark.parametrize(
    ("op", "size"), [("UploadPart", 2 * PART + 1), ("PutObject", 1000)], ids=["part", "put"]
)
async def test_bad_digest_once_is_resent(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, op: str, size: int
) -> None:
    """Regression (#12): a 400 BadDigest is not retried by botocore's standard mode; the
    bytes are still in memory, so the proxy sends them once more and the upload succeeds."""
    data = os.urandom(size)
    async with FaultyS3(moto.endpoint_url, bad_digest(op, lambda n: n == 1)) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url)
        status, out = await upload(proxy, data)
        assert status == 201, out
        assert faulty.calls.count(op) == (4 if op == "UploadPart" else 2)
    assert s3.get_object(Bucket=bucket, Key=out["files"][0]["key"])["Body"].read() == data


@pytest.mark.parametrize(
    ("op", "size"), [("UploadPart", 2 * PART + 1), ("PutObject", 1000)], ids=["part", "put"]
)
async def test_bad_digest_twice_fails_clean(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, keys_in: Any, op: str, size: int
) -> None:
    """Refused again: 502 UPSTREAM_CORRUPTION, the upload aborted, nothing stored (the
    ``bucket`` fixture fails on an open upload)."""
    async with FaultyS3(moto.endpoint_url, bad_digest(op, lambda n: True)) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url, parts_in_flight=1)
        status, out = await upload(proxy, os.urandom(size))
        assert faulty.calls.count(op) == 2  # the first part's two attempts, nothing after
    assert status == 502, out
    assert out["error"]["code"] == "UPSTREAM_CORRUPTION"
    assert "twice" in out["error"]["message"] and "nothing was stored" in out["error"]["message"]
    assert keys_in(bucket) == [] and open_uploads(s3, bucket) == []


# --- a store that answers with another checksum than the one sent -----------------------

OTHER_CRC = "AAAAAAAAAAE="  # a CRC-64/NVME no test file has


def test_stored_checksum_is_the_one_sent_or_refused() -> None:
    """Pure: S3's FULL_OBJECT value must be the CRC sent; a COMPOSITE one cannot be
    compared and is reported as given; none reported is the value sent."""
    sent = crc(b"the bytes")
    same = stored_checksum("PutObject", sent, sent.b64(), "FULL_OBJECT")
    assert same == StoredChecksum(Algorithm.CRC64NVME, sent.b64(), "FULL_OBJECT")
    assert stored_checksum("PutObject", sent, sent.b64(), None) == same
    assert stored_checksum("PutObject", sent, None, None) == StoredChecksum.sent(sent)
    assert stored_checksum("PutObject", None, OTHER_CRC, "FULL_OBJECT") is None
    composite = stored_checksum("CompleteMultipartUpload", sent, OTHER_CRC + "-3", "COMPOSITE")
    assert composite == StoredChecksum(Algorithm.CRC64NVME, OTHER_CRC + "-3", "COMPOSITE")
    for reported in (OTHER_CRC, OTHER_CRC + "-3", "not base64!", sent.b64()[:-4]):
        with pytest.raises(ChecksumDiffers) as caught:
            stored_checksum("CompleteMultipartUpload", sent, reported, "FULL_OBJECT")
        assert caught.value.kind.code == "UPSTREAM_CORRUPTION"
        assert sent.b64() in caught.value.message


def other_checksum(resp: web.Response) -> None:
    """S3's answer, naming another CRC-64/NVME than the one the proxy sent: a PutObject's
    header, a CompleteMultipartUpload's element."""
    if "x-amz-checksum-crc64nvme" in resp.headers or not resp.body:
        resp.headers["x-amz-checksum-crc64nvme"] = OTHER_CRC
        resp.headers["x-amz-checksum-type"] = "FULL_OBJECT"
        return
    assert isinstance(resp.body, bytes)
    text = re.sub(r"<ChecksumCRC64NVME>[^<]*</ChecksumCRC64NVME>", "", resp.body.decode())
    text = text.replace(
        "</CompleteMultipartUploadResult>",
        f"<ChecksumCRC64NVME>{OTHER_CRC}</ChecksumCRC64NVME>"
        "<ChecksumType>FULL_OBJECT</ChecksumType></CompleteMultipartUploadResult>",
    )
    resp.body = text.encode()


@OBJECT_WRITES
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
async def test_a_write_answered_with_another_checksum_is_undone(
    proxy_factory: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    keys_in: Any,
    op: str,
    size: int,
    lean: bool,
) -> None:
    """S3 carried out the write but says it stored another CRC than the one sent: it
    holds other bytes, so the object is deleted and the client told 502
    UPSTREAM_CORRUPTION, not 201 with S3's value (it was logged and passed on)."""
    rule: Rule = lambda o, n: Fault(answer=other_checksum) if o == op else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url, lean_upload_part=lean)
        status, out = await upload(proxy, os.urandom(size))
        assert faulty.calls.count(op) == 1  # carried out: not sent again
    assert (status, out["error"]["code"]) == (502, "UPSTREAM_CORRUPTION"), out
    assert OTHER_CRC in out["error"]["message"]
    assert keys_in(bucket) == [] and open_uploads(s3, bucket) == []


@OBJECT_WRITES
async def test_a_tus_upload_answered_with_another_checksum_ends(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, keys_in: Any, op: str, size: int
) -> None:
    """The same answer to a tus upload's last PATCH: its object is deleted and the upload
    ended (its parts went into that object), never found "complete" by a retry."""
    rule: Rule = lambda o, n: Fault(answer=other_checksum) if o == op else None  # noqa: E731
    tus = {"Tus-Resumable": "1.0.0"}
    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url)
        resp = await proxy.post("/tus/", headers={**tus, "Upload-Length": str(size)})
        url = resp.headers["Location"]
        headers = {
            **tus,
            "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream",
        }
        resp = await proxy.patch(url, data=io.BytesIO(os.urandom(size)), headers=headers)
        assert resp.status == 502 and (await resp.json())["error"]["code"] == (
            "UPSTREAM_CORRUPTION"
        )
        assert (await proxy.head(url, headers=tus)).status == 404
        resp = await proxy.patch(url, data=io.BytesIO(os.urandom(size)), headers=headers)
        assert resp.status == 404
    assert keys_in(bucket) == [KEY_OBJECT] and open_uploads(s3, bucket) == []


@pytest.mark.parametrize("op", ["CreateMultipartUpload", "PutObject", "UploadPart"])
async def test_store_refusing_checksums_names_the_way_out(
    proxy_factory: Any, moto: Any, s3: Any, bucket: str, keys_in: Any, op: str
) -> None:
    """A store that takes no x-amz-checksum-* (InvalidArgument) gets a 502 that says
    ``--checksum off``; the same answer with checksums off stays a plain 502."""
    rule: Rule = lambda o, n: Fault(status=400, code="InvalidArgument") if o == op else None  # noqa: E731
    size = 1000 if op == "PutObject" else PART + 1
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = await proxy_factory(endpoint_url=faulty.endpoint_url)
        status, out = await upload(proxy, os.urandom(size))
        assert (status, out["error"]["code"]) == (502, "UPSTREAM_ERROR")
        assert "--checksum off" in out["error"]["message"]
        off = await proxy_factory(endpoint_url=faulty.endpoint_url, checksum="off")
        status, out = await upload(off, os.urandom(size))
        assert (status, out["error"]["code"]) == (502, "UPSTREAM_ERROR")
        assert "--checksum" not in out["error"]["message"]
    assert keys_in(bucket) == [] and open_uploads(s3, bucket) == []


# --- SeaweedFS: the store verifies, so corruption in transit is caught --------------------


WeedProxy = Callable[..., Any]


@pytest.fixture
async def weed(
    seaweedfs: EmbeddedStore, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[WeedProxy, Any, str]]:
    """(make a proxy through a FaultyS3 in front of SeaweedFS, a boto3 client, the key
    prefix); at teardown no upload under the prefix may be open, and its keys go."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    prefix = f"integrity-{uuid.uuid4().hex[:8]}/"
    sw = boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(seaweedfs))
    faults: list[FaultyS3] = []

    async def make(rule: Rule | None = None, **overrides: Any) -> Any:
        faulty = FaultyS3(seaweedfs.endpoint_url, rule or (lambda op, n: None), keep_host=True)
        faults.append(await faulty.__aenter__())
        overrides.setdefault("key_template", prefix + "{uuid}/{filename}")
        settings = make_settings(faulty.endpoint_url, bucket=seaweedfs.bucket, **overrides)
        return await aiohttp_client(create_app(settings))

    try:
        yield make, sw, prefix
    finally:
        for faulty in faults:
            await faulty.__aexit__(None, None, None)
        left = [u for u in open_uploads(sw, seaweedfs.bucket) if u["Key"].startswith(prefix)]
        for up in left:
            sw.abort_multipart_upload(
                Bucket=seaweedfs.bucket, Key=up["Key"], UploadId=up["UploadId"]
            )
        for key in all_keys(sw, seaweedfs.bucket):
            if key.startswith(prefix):
                sw.delete_object(Bucket=seaweedfs.bucket, Key=key)
        assert not left, f"multipart uploads left open: {left}"


def stored_under(sw: Any, bucket: str, prefix: str) -> list[str]:
    return [k for k in all_keys(sw, bucket) if k.startswith(prefix)]


def flip(op: str, at: Callable[[int], bool]) -> Rule:
    return lambda o, n: Fault(flip=True) if o == op and at(n) else None


@pytest.mark.e2e
@SIZES
async def test_seaweedfs_stores_and_reports_the_checksum(
    weed: tuple[WeedProxy, Any, str], seaweedfs: EmbeddedStore, size: int
) -> None:
    make, sw, _ = weed
    data = os.urandom(size)
    status, out = await upload(await make(), data)
    assert status == 201, out
    [f] = out["files"]
    assert f["checksum"]["value"] == crc(data).b64()
    head = sw.head_object(Bucket=seaweedfs.bucket, Key=f["key"], ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == crc(data).b64()
    assert sw.get_object(Bucket=seaweedfs.bucket, Key=f["key"])["Body"].read() == data


@pytest.mark.e2e
async def test_seaweedfs_crc32c_multipart(
    weed: tuple[WeedProxy, Any, str], seaweedfs: EmbeddedStore
) -> None:
    make, sw, _ = weed
    data = os.urandom(PART + 77)
    status, out = await upload(await make(checksum="crc32c"), data)
    assert status == 201, out
    value = crc(data, Algorithm.CRC32C).b64()
    assert out["files"][0]["checksum"] == {
        "algorithm": "crc32c",
        "type": "FULL_OBJECT",
        "value": value,
    }
    head = sw.head_object(
        Bucket=seaweedfs.bucket, Key=out["files"][0]["key"], ChecksumMode="ENABLED"
    )
    assert head["ChecksumCRC32C"] == value


CASES = pytest.mark.parametrize(
    ("op", "size"), [("UploadPart", 2 * PART + 5), ("PutObject", 100_000)], ids=["part", "put"]
)


@pytest.mark.e2e
@CASES
async def test_seaweedfs_corrupted_once_is_resent(
    weed: tuple[WeedProxy, Any, str], seaweedfs: EmbeddedStore, op: str, size: int
) -> None:
    """One bit flipped in the first attempt of part 2 (or of the PutObject): SeaweedFS
    refuses it (BadDigest), the proxy resends the bytes it still holds, the object is right."""
    make, sw, _ = weed
    data = os.urandom(size)
    target = 2 if op == "UploadPart" else 1
    proxy = await make(flip(op, lambda n: n == target), parts_in_flight=1)
    status, out = await upload(proxy, data)
    assert status == 201, out
    assert sw.get_object(Bucket=seaweedfs.bucket, Key=out["files"][0]["key"])["Body"].read() == data


@pytest.mark.e2e
@CASES
async def test_seaweedfs_corrupted_every_time_fails_clean(
    weed: tuple[WeedProxy, Any, str], seaweedfs: EmbeddedStore, op: str, size: int
) -> None:
    """Every attempt of part 2 (or the PutObject) corrupted: 502 UPSTREAM_CORRUPTION,
    nothing stored, nothing left open (the fixture checks)."""
    make, sw, prefix = weed
    target = (2, 3) if op == "UploadPart" else (1, 2)  # one part in flight: 2 and its resend
    proxy = await make(flip(op, lambda n: n in target), parts_in_flight=1)
    status, out = await upload(proxy, os.urandom(size))
    assert status == 502, out
    assert out["error"]["code"] == "UPSTREAM_CORRUPTION"
    assert stored_under(sw, seaweedfs.bucket, prefix) == []
    assert [u for u in open_uploads(sw, seaweedfs.bucket) if u["Key"].startswith(prefix)] == []


@pytest.mark.e2e
@CASES
async def test_seaweedfs_without_checksums_stores_corruption_silently(
    weed: tuple[WeedProxy, Any, str], seaweedfs: EmbeddedStore, op: str, size: int
) -> None:
    """``--checksum off`` (the behaviour before #12): the same flipped bit is stored, and
    the 201's sha256 describes bytes S3 does not hold."""
    make, sw, _ = weed
    data = os.urandom(size)
    proxy = await make(flip(op, lambda n: True), parts_in_flight=1, checksum="off")
    status, out = await upload(proxy, data)
    assert status == 201, out
    stored = sw.get_object(Bucket=seaweedfs.bucket, Key=out["files"][0]["key"])["Body"].read()
    assert len(stored) == len(data) and stored != data


# --- the setting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "algorithm"),
    [
        (None, Algorithm.CRC64NVME),  # the default, auto
        ("auto", Algorithm.CRC64NVME),
        ("CRC64NVME", Algorithm.CRC64NVME),
        ("crc32c", Algorithm.CRC32C),
        ("off", None),
    ],
)
def test_checksum_setting_reaches_the_pipeline(
    given: str | None, algorithm: Algorithm | None
) -> None:
    settings = Settings.load(
        {"checksum": given}, {"S3PROXY_ENDPOINT_URL": "http://s3", "S3PROXY_BUCKET": "b"}
    )
    assert Config.from_settings(settings).pipeline.checksum is algorithm


def test_checksum_setting_refuses_others() -> None:
    with pytest.raises(
        SettingsError, match="--checksum must be one of auto, crc64nvme, crc32c, off"
    ):
        Settings.load({"checksum": "sha256"})
    env = {"S3PROXY_CHECKSUM": "md5"}
    with pytest.raises(SettingsError, match="S3PROXY_CHECKSUM must be one of"):
        Settings.load({}, env)
