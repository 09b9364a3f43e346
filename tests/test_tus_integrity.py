"""What tus reads back from S3 is checked (README "Integrity"): a segment (a PATCH's tail,
kept until a later PATCH fills its part) goes to S3 with the CRC of its bytes and is
checked against it when read back; the state checks itself. A bit flipped either way is
refused or read again, never stored in the file nor believed as an offset.

Flips on the way to S3 need a store that verifies checksums: SeaweedFS (``e2e``). Flips
on the way back, and a state changed in the bucket, are the proxy's own checks: moto."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import boto3
import pytest
from aiohttp.test_utils import TestClient

from s3proxy.app import create_app
from s3proxy.checksums import Algorithm, Crc
from s3proxy.embedded import EmbeddedStore
from s3proxy.tus_url import RESERVED_PREFIX
from tests.conftest import ProxyFactory, make_settings
from tests.faults import Fault, FaultyS3, tus_operation
from tests.s3util import BOTO_CONFIG, all_keys, open_uploads, read_object_async
from tests.seaweed_fixture import s3_client_kwargs
from tests.test_tus import TUS, MiB, body, reserved
from tests.test_tus_lifecycle import new_upload, offset_of, patch_headers

Rule = Callable[[str, int], Fault | None]
Client = TestClient[Any, Any]

# (file size, first PATCH): the second PATCH finishes a file within one part (PutObject of
# the staged bytes and its own), or fills part 1 with them and sends the rest.
SPLITS = pytest.mark.parametrize(
    ("size", "first"), [(200_000, 100_000), (6 * MiB, 100_000)], ids=["put", "multipart"]
)


def crc64(data: bytes) -> str:
    running = Crc(Algorithm.CRC64NVME)
    running.update(data)
    return running.b64()


class Armed:
    """A rule that injects ``fault`` into calls named ``op`` while armed; ``times`` None:
    every such call, else only the first ``times`` of them after arming."""

    def __init__(self, op: str, fault: Fault, times: int | None = None) -> None:
        self.op, self.fault, self.times = op, fault, times
        self.on = False
        self.hits = 0

    def __call__(self, op: str, _: int) -> Fault | None:
        if not self.on or op != self.op:
            return None
        if self.times is not None and self.hits >= self.times:
            return None
        self.hits += 1
        return self.fault


async def send(proxy: Client, url: str, offset: int, data: bytes) -> tuple[int, str, Any]:
    """A PATCH: (status, error code or "", headers)."""
    resp = await proxy.patch(url, data=io.BytesIO(data), headers=patch_headers(offset))
    code = "" if resp.status < 300 else (await resp.json())["error"]["code"]
    return resp.status, code, resp.headers


# --- SeaweedFS: a segment or state changed on the way in is refused (BadDigest) -----------


Make = Callable[..., Any]


@pytest.fixture
async def weed(
    seaweedfs: EmbeddedStore, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Make, Any]]:
    """(make a proxy through a FaultyS3 naming tus objects in front of SeaweedFS, a boto3
    client); at teardown nothing of the test may be left open, and its objects go."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    prefix = f"tusint-{uuid.uuid4().hex[:8]}/"
    sw = boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(seaweedfs))
    bucket = seaweedfs.bucket
    before = {k for k in all_keys(sw, bucket) if k.startswith(RESERVED_PREFIX)}
    faults: list[FaultyS3] = []

    async def make(rule: Rule, **overrides: Any) -> Client:
        faulty = FaultyS3(seaweedfs.endpoint_url, rule, keep_host=True, name=tus_operation)
        faults.append(await faulty.__aenter__())
        settings = make_settings(
            faulty.endpoint_url,
            bucket=bucket,
            key_template=prefix + "{uuid}/{filename}",
            **overrides,
        )
        client: Client = await aiohttp_client(create_app(settings))
        return client

    try:
        yield make, sw
    finally:
        for faulty in faults:
            await faulty.__aexit__(None, None, None)
        left = [u for u in open_uploads(sw, bucket) if u["Key"].startswith(prefix)]
        for up in left:
            sw.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        mine = [k for k in all_keys(sw, bucket) if k.startswith(prefix)]
        ours = [k for k in all_keys(sw, bucket) if k.startswith(RESERVED_PREFIX)]
        for key in mine + [k for k in ours if k not in before]:
            sw.delete_object(Bucket=bucket, Key=key)
        assert not left, f"multipart uploads left open: {left}"


def stored(sw: Any, bucket: str, key: str) -> tuple[bytes, str]:
    """The object's bytes and the CRC64NVME S3 keeps for it."""
    got = sw.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    return got["Body"].read(), got.get("ChecksumCRC64NVME", "")


@pytest.mark.e2e
@SPLITS
async def test_a_segment_corrupted_on_the_way_in_is_resent(
    weed: tuple[Make, Any], seaweedfs: EmbeddedStore, size: int, first: int
) -> None:
    """One bit of the segment's PutObject flipped: S3 refuses it (the CRC of the bytes as
    they arrived goes with them), the proxy sends it once more; the file is the client's."""
    make, sw = weed
    rule = Armed("PutObject:segment", Fault(flip=True), times=1)
    rule.on = True
    proxy = await make(rule)
    data = body(size, seed=size)
    url = await new_upload(proxy, size)
    assert (await send(proxy, url, 0, data[:first]))[:2] == (204, "")
    assert rule.hits == 1
    status, code, headers = await send(proxy, url, first, data[first:])
    assert (status, code) == (204, "")
    assert stored(sw, seaweedfs.bucket, headers["S3Proxy-Key"]) == (data, crc64(data))


@pytest.mark.e2e
async def test_a_segment_corrupted_every_time_fails_the_patch(
    weed: tuple[Make, Any], seaweedfs: EmbeddedStore
) -> None:
    """Refused again: 502 UPSTREAM_CORRUPTION, nothing of the PATCH kept; sent again
    (the link healed), the upload goes on from where it stood."""
    make, sw = weed
    rule = Armed("PutObject:segment", Fault(flip=True))
    rule.on = True
    proxy = await make(rule)
    data = body(200_000, seed=5)
    url = await new_upload(proxy, len(data))
    assert (await send(proxy, url, 0, data[:100_000]))[:2] == (502, "UPSTREAM_CORRUPTION")
    assert rule.hits == 2  # sent, resent
    assert await offset_of(proxy, url) == 0
    rule.on = False
    assert (await send(proxy, url, 0, data[:100_000]))[:2] == (204, "")
    status, code, headers = await send(proxy, url, 100_000, data[100_000:])
    assert (status, code) == (204, "")
    assert stored(sw, seaweedfs.bucket, headers["S3Proxy-Key"]) == (data, crc64(data))


@pytest.mark.e2e
async def test_a_state_corrupted_on_the_way_in_is_resent(
    weed: tuple[Make, Any], seaweedfs: EmbeddedStore
) -> None:
    """A state write (the PATCH's first: its lock) with one bit flipped: S3 refuses it (the
    state carries the upload's CRC too) and it is sent once more; the offset is right."""
    make, sw = weed
    rule = Armed("PutObject:state", Fault(flip=True), times=1)
    proxy = await make(rule)
    data = body(200_000, seed=6)
    url = await new_upload(proxy, len(data))
    rule.on = True
    status, code, _ = await send(proxy, url, 0, data[:100_000])
    assert (status, code, rule.hits) == (204, "", 1)
    assert await offset_of(proxy, url) == 100_000
    status, code, headers = await send(proxy, url, 100_000, data[100_000:])
    assert (status, code) == (204, "")
    assert stored(sw, seaweedfs.bucket, headers["S3Proxy-Key"]) == (data, crc64(data))


# --- moto: what comes back is checked by the proxy itself ---------------------------------


async def faulty_proxy(
    proxy_factory: ProxyFactory, moto: Any, rule: Rule, **overrides: Any
) -> tuple[Client, FaultyS3]:
    faulty = await FaultyS3(moto.endpoint_url, rule, name=tus_operation).__aenter__()
    return await proxy_factory(faulty.endpoint_url, **overrides), faulty


@pytest.fixture
async def faults() -> AsyncIterator[list[FaultyS3]]:
    opened: list[FaultyS3] = []
    yield opened
    for faulty in opened:
        await faulty.__aexit__(None, None, None)


@SPLITS
@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
async def test_a_segment_corrupted_on_the_way_back_is_never_stored(
    proxy_factory: ProxyFactory,
    moto: Any,
    s3: Any,
    bucket: str,
    faults: list[FaultyS3],
    size: int,
    first: int,
    times: int | None,
) -> None:
    """One bit of the segment flipped in the GetObject that reads it back: checked against
    its CRC, it is read again (once: the PATCH succeeds) or the PATCH fails 502
    UPSTREAM_CORRUPTION with nothing committed, and resumes once the link heals."""
    rule = Armed("GetObject:segment", Fault(flip_answer=True), times=times)
    proxy, faulty = await faulty_proxy(proxy_factory, moto, rule)
    faults.append(faulty)
    data = body(size, seed=size + 1)
    url = await new_upload(proxy, size)
    assert (await send(proxy, url, 0, data[:first]))[:2] == (204, "")
    rule.on = True
    status, code, headers = await send(proxy, url, first, data[first:])
    if times is None:
        assert (status, code, rule.hits) == (502, "UPSTREAM_CORRUPTION", 2)
        assert await offset_of(proxy, url) == first
        rule.on = False
        status, code, headers = await send(proxy, url, first, data[first:])
    assert (status, code) == (204, "")
    assert faulty.calls.count("GetObject:segment") == (2 if times else 3)
    assert await read_object_async(s3, bucket, headers["S3Proxy-Key"]) == data
    assert await reserved(s3, bucket) == []


async def test_every_object_tus_writes_carries_its_crc(
    proxy_factory: ProxyFactory, moto: Any, bucket: str, faults: list[FaultyS3]
) -> None:
    """Segments and states go to S3 with the CRC of their bytes (S3 verifies it);
    ``--checksum off``: none, as everywhere."""
    for checksum in ("auto", "off"):
        proxy, faulty = await faulty_proxy(
            proxy_factory, moto, lambda o, n: None, checksum=checksum
        )
        faults.append(faulty)
        data = body(200_000, seed=7)
        url = await new_upload(proxy, len(data))
        for offset in (0, 50_000, 100_000):
            end = offset + 50_000 if offset < 100_000 else len(data)
            assert (await send(proxy, url, offset, data[offset:end]))[0] == 204
        writes = [
            (op, headers.get("x-amz-checksum-crc64nvme"), crc64(payload))
            for op, (_, headers), (_, payload) in zip(
                faulty.calls, faulty.headers, faulty.bodies, strict=True
            )
            if op in ("PutObject:segment", "PutObject:state")
        ]
        assert {op for op, _, _ in writes} == {"PutObject:segment", "PutObject:state"}
        if checksum == "auto":
            assert all(got == want for _, got, want in writes), writes
        else:
            assert all(got is None for _, got, _ in writes), writes


# --- the state: changed in the bucket, or on the way back --------------------------------


async def state_key(s3: Any, bucket: str) -> str:
    [key] = [k for k in await reserved(s3, bucket) if k.endswith("/state")]
    return key


async def answers(proxy: Client, url: str, offset: int) -> list[tuple[int, str]]:
    """HEAD, PATCH and DELETE on the upload: (status, error code)."""
    out = []
    head = await proxy.head(url, headers=TUS)
    out.append((head.status, head.headers.get("Upload-Offset", "")))
    status, code, _ = await send(proxy, url, offset, b"x" * 10)
    out.append((status, code))
    resp = await proxy.delete(url, headers=TUS)
    out.append((resp.status, "" if resp.status < 300 else (await resp.json())["error"]["code"]))
    return out


@pytest.mark.parametrize("form", ["checked", "older"])
async def test_a_state_changed_in_the_bucket_is_refused(
    proxy: Client, s3: Any, bucket: str, form: str
) -> None:
    """One digit of the offset changed in the stored state (checked by its sha256, or in a
    state of the older code without one, by its parts and segments): HEAD, PATCH and
    DELETE answer 502 UPSTREAM_CORRUPTION; the offset is never believed."""
    data = body(200_000, seed=8)
    url = await new_upload(proxy, len(data))
    assert (await send(proxy, url, 0, data[:100_000]))[0] == 204
    key = await state_key(s3, bucket)
    raw = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    if form == "older":
        raw = older_record(raw)
        s3.put_object(Bucket=bucket, Key=key, Body=raw)
        assert await offset_of(proxy, url) == 100_000  # the older code's state is read
    changed = raw.replace(b'"offset":100000', b'"offset":100001')
    assert changed != raw
    s3.put_object(Bucket=bucket, Key=key, Body=changed)
    gone = [(502, ""), (502, "UPSTREAM_CORRUPTION"), (502, "UPSTREAM_CORRUPTION")]
    assert await answers(proxy, url, 100_001) == gone
    s3.put_object(Bucket=bucket, Key=key, Body=raw)  # put right: the upload goes on
    status, _, headers = await send(proxy, url, 100_000, data[100_000:])
    assert status == 204
    assert await read_object_async(s3, bucket, headers["S3Proxy-Key"]) == data


def older_record(raw: bytes) -> bytes:
    """The state as the code before the check wrote it (no check, no segment CRCs, no
    object metadata)."""
    fields = json.loads(raw)
    del fields["check"], fields["segment_crcs"], fields["metadata"], fields["fields"]
    return json.dumps(fields, separators=(",", ":")).encode()


@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
async def test_a_state_corrupted_on_the_way_back_is_read_again(
    proxy_factory: ProxyFactory,
    moto: Any,
    s3: Any,
    bucket: str,
    faults: list[FaultyS3],
    times: int | None,
) -> None:
    """One bit of the state flipped in the GetObject that reads it: read again (once:
    HEAD answers the right offset) or 502 UPSTREAM_CORRUPTION, never 500 nor a wrong
    offset; with the link healed the upload completes."""
    rule = Armed("GetObject:state", Fault(flip_answer=True), times=times)
    proxy, faulty = await faulty_proxy(proxy_factory, moto, rule)
    faults.append(faulty)
    data = body(200_000, seed=9)
    url = await new_upload(proxy, len(data))
    assert (await send(proxy, url, 0, data[:100_000]))[0] == 204
    rule.on = True
    head = await proxy.head(url, headers=TUS)
    if times is None:
        assert head.status == 502 and (await head.read()) == b""  # HEAD: no body
        status, code, _ = await send(proxy, url, 100_000, data[100_000:])
        assert (status, code) == (502, "UPSTREAM_CORRUPTION")
        rule.on = False
    else:
        assert (head.status, head.headers["Upload-Offset"]) == (200, "100000")
    assert await offset_of(proxy, url) == 100_000
    status, _, headers = await send(proxy, url, 100_000, data[100_000:])
    assert status == 204
    assert await read_object_async(s3, bucket, headers["S3Proxy-Key"]) == data
