"""tus on the embedded store's SeaweedFS (end to end): the conditional writes the state
object relies on, measured on this version; tuspy uploads verified byte for byte and by
the full-object CRC64NVME SeaweedFS checked; racing PATCHes."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import boto3
import pytest
from aiohttp.test_utils import TestClient

from s3proxy.app import create_app
from s3proxy.checksums import Algorithm, Crc
from s3proxy.embedded import EmbeddedStore
from s3proxy.s3 import ObjectOptions, PreconditionFailed
from s3proxy.s3_aiobotocore import ClientOptions, open_store
from s3proxy.tus import TUS
from s3proxy.tus_url import RESERVED_PREFIX, verify
from tests.conftest import make_settings
from tests.s3util import all_keys, open_uploads
from tests.seaweed_fixture import s3_client_kwargs
from tests.test_tus import KiB, MiB, body, tuspy_upload

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning"),
]


@pytest.fixture
async def weed_proxy(
    seaweedfs: EmbeddedStore, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[TestClient[Any, Any], Any]]:
    """A proxy on SeaweedFS with its own key prefix; at teardown nothing of it may be left
    open, and its keys and reserved objects go."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    prefix = f"tus-{time.time_ns()}/"
    settings = make_settings(
        seaweedfs.endpoint_url,
        bucket=seaweedfs.bucket,
        key_template=prefix + "{uuid}/{filename}",
        request_checksum="when_required",
    )
    proxy: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    sw = boto3.client("s3", **s3_client_kwargs(seaweedfs))
    try:
        yield proxy, sw
    finally:
        left = [u for u in open_uploads(sw, seaweedfs.bucket) if u["Key"].startswith(prefix)]
        for up in left:
            sw.abort_multipart_upload(
                Bucket=seaweedfs.bucket, Key=up["Key"], UploadId=up["UploadId"]
            )
        for key in all_keys(sw, seaweedfs.bucket):
            if key.startswith(prefix):
                sw.delete_object(Bucket=seaweedfs.bucket, Key=key)
        assert not left, f"multipart uploads left open: {left}"


async def test_seaweedfs_has_the_conditional_writes_the_state_needs(
    seaweedfs: EmbeddedStore,
) -> None:
    """Measured: PutObject If-None-Match: * refuses an existing key, If-Match swaps only
    the version read (412 on a stale ETag); the tus state is a compare-and-swap on these."""
    opts = ClientOptions(
        endpoint_url=seaweedfs.endpoint_url,
        region="us-east-1",
        max_attempts=1,
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
    )
    key = f"{RESERVED_PREFIX}probe-{time.time_ns()}/state"
    plain = ObjectOptions("application/json")
    async with open_store(opts, seaweedfs.bucket) as store:
        try:
            first = (await store.put(key, [b"1"], plain, if_none_match=True)).etag
            with pytest.raises(PreconditionFailed):
                await store.put(key, [b"2"], plain, if_none_match=True)
            second = (await store.put(key, [b"3"], plain, if_match=first)).etag
            with pytest.raises(PreconditionFailed):
                await store.put(key, [b"4"], plain, if_match=first)
            third = await store.put(key, [b"5"], plain, if_match=second)
            assert third.etag != second
            assert await store.credential_secret() == seaweedfs.secret_key
        finally:
            await store.delete(key)


@pytest.mark.parametrize(("size", "chunk"), [(12 * MiB + 5, 64 * MiB), (6 * MiB + 1, 100 * KiB)])
async def test_tuspy_on_seaweedfs(
    weed_proxy: tuple[TestClient[Any, Any], Any], seaweedfs: EmbeddedStore, size: int, chunk: int
) -> None:
    proxy, sw = weed_proxy
    data = body(size)
    url = await tuspy_upload(proxy, data, chunk, upload_checksum=True)
    upload = verify(url.rsplit("/tus/", 1)[1], proxy.app[TUS].keys, time.time())
    got = sw.get_object(Bucket=seaweedfs.bucket, Key=upload.key)["Body"].read()
    assert got == data
    # The whole-file integrity value S3 verified: the CRC64NVME combined from the parts.
    head = sw.head_object(Bucket=seaweedfs.bucket, Key=upload.key, ChecksumMode="ENABLED")
    crc = Crc(Algorithm.CRC64NVME)
    crc.update(data)
    assert head["ChecksumCRC64NVME"] == crc.b64()
    assert head["ContentType"] == "application/pdf"
    reserved = [k for k in all_keys(sw, seaweedfs.bucket) if k.startswith(upload.prefix)]
    assert reserved == []


async def test_racing_patches_on_seaweedfs(
    weed_proxy: tuple[TestClient[Any, Any], Any], seaweedfs: EmbeddedStore
) -> None:
    proxy, sw = weed_proxy
    data = body(6 * MiB)
    resp = await proxy.post(
        "/tus/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(len(data))}
    )
    url = resp.headers["Location"]
    headers = {
        "Tus-Resumable": "1.0.0",
        "Upload-Offset": "0",
        "Content-Type": "application/offset+octet-stream",
    }
    results = await asyncio.gather(
        *(proxy.patch(url, data=io.BytesIO(data), headers=headers) for _ in range(3))
    )
    statuses = sorted(r.status for r in results)
    assert statuses[0] == 204 and all(s in (409, 423) for s in statuses[1:]), statuses
    upload = verify(url.removeprefix("/tus/"), proxy.app[TUS].keys, time.time())
    assert sw.get_object(Bucket=seaweedfs.bucket, Key=upload.key)["Body"].read() == data
