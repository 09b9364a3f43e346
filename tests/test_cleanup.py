"""Sweeping orphaned multipart uploads, against moto's S3 over HTTP.

Two things moto (5.x) does not do like S3, and how the tests cope:

- every upload is listed as initiated at the same fixed time, so the tests read
  ``Initiated`` from the listing and set ``now`` relative to it (on a real S3
  the same tests hold);
- ListMultipartUploads ignores MaxUploads and the markers, so ``PagedS3`` below
  pages moto's full answer the way S3 documents it (sorted by key then upload id,
  KeyMarker/UploadIdMarker, IsTruncated, NextKeyMarker/NextUploadIdMarker).
  Every other call, and every abort, goes to moto unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from s3proxy.cleanup import Orphan, Rule, SweepResult, sweep
from s3proxy.embedded import EmbeddedStore
from s3proxy.errors import ProxyError
from s3proxy.s3_aiobotocore import AioObjectStore, ClientOptions, open_client
from tests.s3util import MotoServer, open_uploads, open_uploads_async
from tests.seaweed_fixture import s3_client_kwargs

PREFIX = "orphans/"
HOUR = timedelta(hours=1)
AGE = Rule.age(HOUR)  # moto dates every upload alike: these tests judge by age


class PagedS3:
    """The real aiobotocore client, with ListMultipartUploads paged on top of moto's answer.

    ``markers`` is what the store sends to continue: ``"s3"`` both Next* markers
    (ordered by key, then upload id); ``"upload_id"`` only NextUploadIdMarker,
    ordered by upload id, and an empty page if a KeyMarker comes along (SeaweedFS,
    observed); ``"none"`` neither (ordered as S3).
    """

    def __init__(
        self,
        client: Any,
        *,
        markers: str = "s3",
        stuck: bool = False,
        abort_bucket: str | None = None,
        ignore_prefix: bool = False,
    ) -> None:
        self._client = client
        self.markers = markers
        self.stuck = stuck  # a broken store: truncated, with markers that never advance
        self.abort_bucket = abort_bucket  # send aborts elsewhere, so S3 refuses them
        self.ignore_prefix = ignore_prefix  # a store that lists the whole bucket
        self.list_calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def list_multipart_uploads(self, **kwargs: Any) -> dict[str, Any]:
        self.list_calls.append(kwargs)
        prefix = "" if self.ignore_prefix else kwargs.get("Prefix", "")
        page: dict[str, Any] = await self._client.list_multipart_uploads(
            Bucket=kwargs["Bucket"], Prefix=prefix
        )
        uploads: list[dict[str, Any]] = page.get("Uploads", [])
        if self.markers == "upload_id":
            uploads.sort(key=lambda u: u["UploadId"])
            after = kwargs.get("UploadIdMarker", "")
            if "KeyMarker" in kwargs:
                uploads = []
            elif not self.stuck:
                uploads = [u for u in uploads if u["UploadId"] > after]
        else:
            uploads.sort(key=lambda u: (u["Key"], u["UploadId"]))
            position = (kwargs.get("KeyMarker", ""), kwargs.get("UploadIdMarker", ""))
            if not self.stuck:
                uploads = [u for u in uploads if (u["Key"], u["UploadId"]) > position]
        limit = kwargs.get("MaxUploads", 1000)
        page["Uploads"], page["IsTruncated"] = uploads[:limit], len(uploads) > limit
        if page["IsTruncated"] and self.markers in ("s3", "upload_id"):
            page["NextUploadIdMarker"] = uploads[limit - 1]["UploadId"]
            if self.markers == "s3":
                page["NextKeyMarker"] = uploads[limit - 1]["Key"]
        return page

    async def abort_multipart_upload(self, **kwargs: Any) -> Any:
        if self.abort_bucket:
            kwargs["Bucket"] = self.abort_bucket
        return await self._client.abort_multipart_upload(**kwargs)


@pytest.fixture
async def aio(moto: MotoServer) -> AsyncIterator[Any]:
    async with open_client(ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1")) as c:
        yield c


@pytest.fixture
def tidy(s3: Any, bucket: str) -> Iterator[None]:
    """Abort what a test left open on purpose, before ``bucket`` checks for leftovers."""
    yield
    for up in open_uploads(s3, bucket):
        s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])


async def start(client: Any, bucket: str, *keys: str) -> list[str]:
    ids = []
    for key in keys:
        resp = await client.create_multipart_upload(Bucket=bucket, Key=key)
        ids.append(resp["UploadId"])
    return ids


async def open_under(s3: Any, bucket: str, prefix: str) -> list[tuple[str, str]]:
    """The uploads open under ``prefix``, listed in a worker thread."""
    page = await asyncio.to_thread(s3.list_multipart_uploads, Bucket=bucket, Prefix=prefix)
    uploads = page.get("Uploads", [])
    return sorted((u["Key"], u["UploadId"]) for u in uploads if u["Key"].startswith(prefix))


async def newest_initiated(s3: Any, bucket: str) -> datetime:
    initiated: datetime = max(u["Initiated"] for u in await open_uploads_async(s3, bucket))
    return initiated


def keys_of(orphans: list[Orphan]) -> list[str]:
    return sorted(o.key for o in orphans)


@pytest.fixture
async def mixed(aio: Any, s3: Any, bucket: str, tidy: None) -> datetime:
    """Two uploads under the prefix, three beside it; returns when they were initiated."""
    [with_part] = await start(aio, bucket, f"{PREFIX}a/with-part.bin")
    await aio.upload_part(
        Bucket=bucket, Key=f"{PREFIX}a/with-part.bin", UploadId=with_part, PartNumber=1, Body=b"x"
    )
    await start(aio, bucket, f"{PREFIX}b.bin", "other/c.bin", "orphans.bin", "orphansX/d.bin")
    return await newest_initiated(s3, bucket)


async def test_dry_run_reports_and_aborts_nothing(
    aio: Any, s3: Any, bucket: str, mixed: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    before = await open_uploads_async(s3, bucket)
    caplog.set_level(logging.INFO, "s3proxy.cleanup")
    result = await sweep(AioObjectStore(aio, bucket), PREFIX, AGE, now=mixed + 2 * HOUR)
    assert keys_of(result.found) == [f"{PREFIX}a/with-part.bin", f"{PREFIX}b.bin"]
    assert result.aborted == [] and result.errors == []
    assert await open_uploads_async(s3, bucket) == before
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all(" action=would-abort" in line and " age=7200s " in line for line in lines)
    assert lines[0].startswith(f"cleanup.orphan key={PREFIX}a/with-part.bin upload_id=")


async def test_real_run_aborts_everything_old_under_the_prefix_and_nothing_else(
    aio: Any, s3: Any, bucket: str, mixed: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    outside = sorted(
        (u["Key"], u["UploadId"])
        for u in await open_uploads_async(s3, bucket)
        if not u["Key"].startswith(PREFIX)
    )
    caplog.set_level(logging.INFO, "s3proxy.cleanup")
    result = await sweep(
        AioObjectStore(aio, bucket), PREFIX, AGE, dry_run=False, now=mixed + 2 * HOUR
    )
    assert (
        keys_of(result.aborted)
        == keys_of(result.found)
        == [
            f"{PREFIX}a/with-part.bin",
            f"{PREFIX}b.bin",
        ]
    )
    assert result.errors == []
    assert await open_under(s3, bucket, PREFIX) == []
    assert (
        sorted((u["Key"], u["UploadId"]) for u in await open_uploads_async(s3, bucket)) == outside
    )
    assert all(" action=aborted" in r.getMessage() for r in caplog.records)
    assert len(caplog.records) == 2


@pytest.mark.parametrize(
    ("age", "older_than", "found"),
    [
        (timedelta(minutes=1), HOUR, 0),  # young: kept
        (HOUR, HOUR, 0),  # exactly at the cut-off: kept (only older is orphaned)
        (HOUR + timedelta(seconds=1), HOUR, 2),
        (timedelta(days=3), timedelta(days=2), 2),
        (timedelta(0), timedelta(0), 0),
    ],
)
async def test_age_cutoff(
    aio: Any,
    s3: Any,
    bucket: str,
    mixed: datetime,
    age: timedelta,
    older_than: timedelta,
    found: int,
) -> None:
    result = await sweep(
        AioObjectStore(aio, bucket), PREFIX, Rule.age(older_than), dry_run=False, now=mixed + age
    )
    assert len(result.found) == len(result.aborted) == found
    assert len(await open_under(s3, bucket, PREFIX)) == 2 - found


async def test_default_now_is_timezone_aware(aio: Any, bucket: str, mixed: datetime) -> None:
    result = await sweep(AioObjectStore(aio, bucket), PREFIX, Rule.age(timedelta(days=365 * 100)))
    assert result == SweepResult([], [], [], live=2)


@pytest.mark.parametrize("markers", ["s3", "upload_id", "none"])
async def test_pagination(aio: Any, s3: Any, bucket: str, tidy: None, markers: str) -> None:
    # Several uploads of one key, so a page can end between two of them and
    # only UploadIdMarker tells where to go on.
    keys = [f"{PREFIX}{i % 4}.bin" for i in range(11)] + ["other/x.bin"] * 2
    await start(aio, bucket, *keys)
    paged = PagedS3(aio, markers=markers)
    now = await newest_initiated(s3, bucket) + 2 * HOUR

    dry = await sweep(AioObjectStore(paged, bucket), PREFIX, AGE, now=now, page_size=3)
    assert len(dry.found) == len({(o.key, o.upload_id) for o in dry.found}) == 11
    assert len(paged.list_calls) == 4  # 3 + 3 + 3 + 2
    assert [c["MaxUploads"] for c in paged.list_calls] == [3] * 4
    assert "KeyMarker" not in paged.list_calls[0]
    assert all(c["Prefix"] == PREFIX for c in paged.list_calls)

    result = await sweep(
        AioObjectStore(paged, bucket), PREFIX, AGE, dry_run=False, now=now, page_size=3
    )
    assert len(result.aborted) == 11 and result.errors == []
    assert await open_under(s3, bucket, PREFIX) == []
    assert len(await open_uploads_async(s3, bucket)) == 2


async def test_a_store_that_ignores_prefix_cannot_widen_the_sweep(
    aio: Any, s3: Any, bucket: str, mixed: datetime
) -> None:
    wide = PagedS3(aio, ignore_prefix=True)
    result = await sweep(
        AioObjectStore(wide, bucket), PREFIX, AGE, dry_run=False, now=mixed + 2 * HOUR
    )
    assert keys_of(result.aborted) == [f"{PREFIX}a/with-part.bin", f"{PREFIX}b.bin"]
    assert len(await open_uploads_async(s3, bucket)) == 3


async def test_a_store_that_never_advances_is_an_error(
    aio: Any, bucket: str, mixed: datetime
) -> None:
    with pytest.raises(ProxyError, match="does not advance"):
        await sweep(
            AioObjectStore(PagedS3(aio, stuck=True), bucket), PREFIX, AGE, now=mixed, page_size=1
        )


async def test_already_gone_is_not_an_error(
    aio: Any, s3: Any, bucket: str, mixed: datetime
) -> None:
    """Between listing and aborting, someone else (a lifecycle rule) aborted it."""
    [gone] = await open_under(s3, bucket, f"{PREFIX}b")
    await asyncio.to_thread(s3.abort_multipart_upload, Bucket=bucket, Key=gone[0], UploadId=gone[1])
    stale = Orphan(gone[0], gone[1], mixed)

    class StaleListing(PagedS3):
        async def list_multipart_uploads(self, **kwargs: Any) -> dict[str, Any]:
            page = await super().list_multipart_uploads(**kwargs)
            page["Uploads"].append(
                {"Key": stale.key, "UploadId": stale.upload_id, "Initiated": mixed}
            )
            return page

    result = await sweep(
        AioObjectStore(StaleListing(aio), bucket), PREFIX, AGE, dry_run=False, now=mixed + 2 * HOUR
    )
    assert stale in result.aborted and len(result.aborted) == 2
    assert result.errors == []
    assert await open_under(s3, bucket, PREFIX) == []


async def test_refused_abort_is_recorded_and_the_sweep_goes_on(
    aio: Any, s3: Any, bucket: str, mixed: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = PagedS3(aio, abort_bucket=f"{bucket}-missing")
    caplog.set_level(logging.INFO, "s3proxy.cleanup")
    result = await sweep(
        AioObjectStore(refusing, bucket), PREFIX, AGE, dry_run=False, now=mixed + 2 * HOUR
    )
    assert result.aborted == []
    assert [o for o, _ in result.errors] == result.found and len(result.found) == 2
    assert all("NoSuchBucket" in why for _, why in result.errors)
    assert len(await open_under(s3, bucket, PREFIX)) == 2
    assert all(" action=failed " in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"page_size": 0},
        {"page_size": 1001},
        {"now": datetime(2030, 1, 1)},  # naive
    ],
)
async def test_bad_arguments(aio: Any, bucket: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        await sweep(AioObjectStore(aio, bucket), PREFIX, AGE, **kwargs)


def test_a_negative_threshold_is_refused() -> None:
    with pytest.raises(ValueError):
        Rule.idle(timedelta(seconds=-1))


@pytest.mark.e2e
async def test_pagination_on_seaweedfs(seaweedfs: EmbeddedStore) -> None:
    """A real store's own paging (SeaweedFS sends NextUploadIdMarker but no NextKeyMarker)."""
    kw = s3_client_kwargs(seaweedfs)
    opts = ClientOptions(
        endpoint_url=kw["endpoint_url"],
        region=kw["region_name"],
        access_key=kw["aws_access_key_id"],
        secret_key=kw["aws_secret_access_key"],
    )
    prefix = f"sweep-{uuid.uuid4().hex[:8]}/"
    async with open_client(opts) as client:
        created = set()
        try:
            for i in range(7):
                key = f"{prefix}{i % 3}.bin"
                resp = await client.create_multipart_upload(Bucket=seaweedfs.bucket, Key=key)
                created.add((key, resp["UploadId"]))
            await client.create_multipart_upload(Bucket=seaweedfs.bucket, Key=f"{prefix[:-1]}.x")
            far = datetime.now(UTC) + timedelta(days=1)
            dry = await sweep(
                AioObjectStore(client, seaweedfs.bucket), prefix, AGE, now=far, page_size=2
            )
            assert {(o.key, o.upload_id) for o in dry.found} == created
            assert len(dry.found) == 7

            result = await sweep(
                AioObjectStore(client, seaweedfs.bucket),
                prefix,
                AGE,
                dry_run=False,
                now=far,
                page_size=2,
            )
            assert len(result.aborted) == 7 and result.errors == []
            left = await client.list_multipart_uploads(Bucket=seaweedfs.bucket, Prefix=prefix)
            assert left.get("Uploads", []) == []
        finally:
            listing = await client.list_multipart_uploads(
                Bucket=seaweedfs.bucket, Prefix=prefix[:-1]
            )
            for up in listing.get("Uploads", []):
                await client.abort_multipart_upload(
                    Bucket=seaweedfs.bucket, Key=up["Key"], UploadId=up["UploadId"]
                )
