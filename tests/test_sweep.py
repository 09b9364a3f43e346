"""The orphan sweep by activity (issue #11, #14): crash orphans go without an operator,
live uploads are never touched however long they run.

Three layers: the decision and the figures as tables (no event loop); the sweep over
the in-memory store with injected times (moto dates every upload in 2010 and cannot be
told otherwise); and the real thing, ``s3proxy serve`` on moto and on SeaweedFS.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest

from s3proxy import limits
from s3proxy.cleanup import Rule, is_orphan, newest_part, sweep
from s3proxy.embedded import EmbeddedStore
from s3proxy.s3 import PartInfo, refusal
from s3proxy.s3_aiobotocore import AioObjectStore, ClientOptions, open_client
from s3proxy.settings import Settings
from tests.bodies import BOUNDARY, MiB, headers, part_head
from tests.bodies import file as file_part
from tests.memory_s3 import MemoryS3
from tests.s3util import BOTO_CONFIG, MotoServer, ProxyProcess, open_uploads
from tests.seaweed_fixture import s3_client_kwargs

T0 = datetime(2030, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)
IDLE = Rule.idle(100 * S)
AGE = Rule.age(100 * S)
README = (Path(__file__).parent.parent / "README.md").read_text()


# --- the decision -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "initiated", "newest", "now", "orphan"),
    [
        (IDLE, T0, None, T0 + 99 * S, False),  # no part yet, young
        (IDLE, T0, None, T0 + 100 * S, False),  # exactly at the threshold: kept
        (IDLE, T0, None, T0 + 100 * S + timedelta(microseconds=1), True),
        (IDLE, T0, T0 + 50 * S, T0 + 101 * S, False),  # old, but a part 51 s ago
        (IDLE, T0, T0 + 50 * S, T0 + 150 * S, False),  # the part exactly at the threshold
        (IDLE, T0, T0 + 50 * S, T0 + 151 * S, True),  # and past it
        (IDLE, T0, T0 + 10 * 86400 * S, T0 + 10 * 86400 * S + 60 * S, False),  # days old, live
        (IDLE, T0, T0 - 10 * S, T0 + 101 * S, True),  # a part dated before it (clocks): initiation
        (IDLE, T0 + 5 * S, None, T0, False),  # initiated "in the future" (skew): kept
        (AGE, T0, T0 + 50 * S, T0 + 101 * S, True),  # age alone ignores parts
        (AGE, T0, None, T0 + 100 * S, False),
        (Rule.idle(timedelta(0)), T0, None, T0, False),
        (Rule.idle(timedelta(0)), T0, None, T0 + timedelta(microseconds=1), True),
    ],
)
def test_is_orphan(
    rule: Rule, initiated: datetime, newest: datetime | None, now: datetime, orphan: bool
) -> None:
    assert is_orphan(rule, now, initiated, newest) is orphan


@pytest.mark.parametrize(
    ("times", "newest"),
    [
        ([], None),
        ([T0], T0),
        ([T0 + 5 * S, T0, T0 + 2 * S], T0 + 5 * S),  # parts land out of number order
    ],
)
def test_newest_part(times: list[datetime], newest: datetime | None) -> None:
    parts = [PartInfo(n, f'"{n}"', 5 * MiB, t) for n, t in enumerate(times, 1)]
    assert newest_part(parts) == newest


def test_a_part_without_a_date_cannot_be_judged() -> None:
    with pytest.raises(ValueError):
        newest_part([PartInfo(1, '"1"', 1, T0), PartInfo(2, '"2"', 1, None)])


def test_a_negative_threshold_is_refused() -> None:
    with pytest.raises(ValueError):
        Rule.age(-S)


# --- the figures --------------------------------------------------------------------


def settings(**kw: Any) -> Settings:
    return Settings(endpoint_url="http://127.0.0.1:1", bucket="b", **kw)


def test_default_figures() -> None:
    s = settings()
    # 8 MiB at 32 KiB/s + 30 s grace + 60 s idle + 5 x (10 + 120) s of S3 call
    assert limits.longest_part_interval(s) == 256 + 30 + 60 + 650 == 996
    assert s.orphan_rule == (2 * 996 + 60, True) == (2052, True)
    assert s.sweep_every == 513
    assert s.cleanup_prefixes == ("uploads/",)
    # Age alone would have to wait out the longest upload: days.
    assert limits.longest_upload(s) > 3 * 86400


def test_the_readme_states_the_default_bound() -> None:
    s = settings()
    bound = s.orphan_rule[0] + s.sweep_every
    assert f"within {round(bound / 60)} minutes of its last activity" in " ".join(README.split())
    assert f"{s.orphan_rule[0] / 60:.0f} minutes" in README


@pytest.mark.parametrize(
    ("kw", "rule", "every"),
    [
        ({"cleanup_clock_skew": 0}, (1992, True), 498),
        ({"cleanup_older_than": 7200}, (7200, False), 1800),
        ({"cleanup_older_than": 7200, "cleanup_interval": 60}, (7200, False), 60),
        ({"cleanup_interval": 0}, (2052, True), 0),
        ({"min_upload_rate": 64 * 1024}, (2 * (128 + 30 + 60 + 650) + 60, True), 449),
    ],
)
def test_figures_follow_the_settings(
    kw: dict[str, Any], rule: tuple[float, bool], every: float
) -> None:
    s = settings(**kw)
    assert s.orphan_rule == rule
    assert s.sweep_every == every


def test_cleanup_settings_from_flags_and_environment() -> None:
    s = Settings.load(
        {"cleanup_interval": "auto", "cleanup_prefix": ["", "t/"]},
        {
            "S3PROXY_CLEANUP_CLOCK_SKEW": "5s",
            "S3PROXY_ENDPOINT_URL": "http://x",
            "S3PROXY_BUCKET": "b",
        },
    )
    assert s.cleanup_interval is None and s.cleanup_clock_skew == 5
    assert s.cleanup_prefixes == ("", "t/")
    assert Settings.load({"cleanup_interval": "10m"}).cleanup_interval == 600


# --- the sweep, with injected times -------------------------------------------------


async def upload(store: MemoryS3, key: str, initiated: datetime, *part_times: datetime) -> str:
    upload_id = await store.create(key, file_options())
    store.uploads[upload_id].initiated = initiated
    for n, t in enumerate(part_times, 1):
        await store.upload_part(key, upload_id, n, [b"x"])
        store.uploads[upload_id].parts.modified[n] = t
    return upload_id


def file_options() -> Any:
    from s3proxy.s3 import ObjectOptions

    return ObjectOptions(content_type="application/octet-stream")


NOW = T0 + 3600 * S


@pytest.fixture
async def store() -> MemoryS3:
    s = MemoryS3()
    await upload(s, "p/young", NOW - 10 * S)
    await upload(s, "p/dead-no-part", NOW - 101 * S)
    await upload(s, "p/live-long", NOW - 3000 * S, NOW - 3000 * S, NOW - 20 * S)
    await upload(s, "p/dead-with-parts", NOW - 3000 * S, NOW - 2000 * S, NOW - 500 * S)
    await upload(s, "elsewhere/dead", NOW - 3000 * S)
    s.calls.clear()
    return s


async def test_activity_keeps_the_live_and_takes_the_dead(store: MemoryS3) -> None:
    result = await sweep(store, "p/", IDLE, dry_run=False, now=NOW)
    assert sorted(o.key for o in result.aborted) == ["p/dead-no-part", "p/dead-with-parts"]
    assert result.live == 2 and result.errors == []
    assert sorted(u.key for u in store.uploads.values()) == [
        "elsewhere/dead",
        "p/live-long",
        "p/young",
    ]
    # A young upload needs no ListParts: no part can make it older.
    assert [k for op, k in store.calls if op == "ListParts"] == [
        "p/dead-no-part",
        "p/dead-with-parts",
        "p/live-long",
    ]
    [with_parts] = [o for o in result.aborted if o.key == "p/dead-with-parts"]
    assert with_parts.idle_since == NOW - 500 * S


async def test_age_alone_takes_the_live_long_upload_too(store: MemoryS3) -> None:
    result = await sweep(store, "p/", AGE, dry_run=False, now=NOW)
    assert sorted(o.key for o in result.aborted) == [
        "p/dead-no-part",
        "p/dead-with-parts",
        "p/live-long",
    ]
    assert "ListParts" not in store.ops()


async def test_overlapping_prefixes_judge_each_upload_once(store: MemoryS3) -> None:
    result = await sweep(store, ["", "p/", "p/dead"], IDLE, now=NOW)
    assert sorted(o.key for o in result.found) == [
        "elsewhere/dead",
        "p/dead-no-part",
        "p/dead-with-parts",
    ]
    assert result.live == 2


async def test_an_upload_it_cannot_judge_is_kept(
    store: MemoryS3, caplog: pytest.LogCaptureFixture
) -> None:
    store.fail("ListParts", at=1)  # p/dead-no-part: S3 500
    caplog.set_level(logging.WARNING, "s3proxy.cleanup")
    result = await sweep(store, "p/", IDLE, dry_run=False, now=NOW)
    assert [o.key for o in result.aborted] == ["p/dead-with-parts"]
    assert result.live == 3
    assert "cleanup.unjudged key=p/dead-no-part" in caplog.text


async def test_an_upload_that_ends_while_judged_is_skipped(store: MemoryS3) -> None:
    store.fail("ListParts", at=1, error=refusal("ListParts", "NoSuchUpload", 404))
    result = await sweep(store, "p/", IDLE, dry_run=False, now=NOW)
    assert [o.key for o in result.aborted] == ["p/dead-with-parts"]
    assert result.live == 2  # young, live-long; the ended one is neither


async def test_a_store_without_part_dates_keeps_uploads_with_parts(store: MemoryS3) -> None:
    class Undated(MemoryS3):
        async def list_parts(
            self, key: str, upload_id: str, *, max_parts: int | None = None
        ) -> list[PartInfo]:
            parts = await super().list_parts(key, upload_id, max_parts=max_parts)
            return [PartInfo(p.number, p.etag, p.size) for p in parts]

    undated = Undated()
    undated.uploads = store.uploads
    result = await sweep(undated, "p/", IDLE, dry_run=False, now=NOW)
    assert [o.key for o in result.aborted] == ["p/dead-no-part"]  # no part: initiation tells


# --- on moto: part dates are real ---------------------------------------------------


@pytest.fixture
async def aio(moto: MotoServer) -> AsyncIterator[Any]:
    async with open_client(ClientOptions(endpoint_url=moto.endpoint_url, region="us-east-1")) as c:
        yield c


async def test_list_parts_reports_when_each_part_landed(aio: Any, bucket: str) -> None:
    key = "p/x.bin"
    upload_id = (await aio.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]
    try:
        before = datetime.now(UTC).replace(microsecond=0)
        await aio.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x")
        after = datetime.now(UTC)
        [part] = await AioObjectStore(aio, bucket).list_parts(key, upload_id)
        assert part.last_modified is not None
        assert before - S <= part.last_modified <= after + S
    finally:
        await aio.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


# Limits that make the orphan threshold a few seconds: 5 MiB at 100 MiB/s + 0.1 s grace
# + 0.5 s idle + one attempt of (0.5 + 1) s of S3 call = 2.15 s; twice that, no skew.
FAST = {
    "max_file_size": 10 * MiB,
    "min_upload_rate": 100 * MiB,
    "min_rate_window": 0.1,
    "client_timeout": 0.5,
    "s3_connect_timeout": 0.5,
    "s3_read_timeout": 1.0,
    "s3_max_attempts": 1,
    "cleanup_clock_skew": 0.0,
    "cleanup_interval": 0.5,
}


def swept_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("cleanup.swept")]


async def test_serve_keeps_a_live_upload_older_than_any_age_threshold(
    proxy_factory: Any, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The regression: a sweep by age aborted uploads still streaming (moto dates every
    upload in 2010, so by age this one is 20 years old); by activity it is live."""
    caplog.set_level(logging.INFO, "s3proxy.app")
    live = s3.create_multipart_upload(Bucket=bucket, Key="uploads/live.bin")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="uploads/live.bin", UploadId=live, PartNumber=1, Body=b"x")
    s3.create_multipart_upload(Bucket=bucket, Key="uploads/dead.bin")  # no part since 2010
    await proxy_factory(cleanup_interval=0.5)
    deadline = time.monotonic() + 10
    while not swept_lines(caplog):
        assert time.monotonic() < deadline, "no sweep ran"
        await asyncio.sleep(0.05)
    assert [u["Key"] for u in open_uploads(s3, bucket)] == ["uploads/live.bin"]
    assert swept_lines(caplog)[0] == "cleanup.swept found=1 aborted=1 failed=0 live=1"
    s3.abort_multipart_upload(Bucket=bucket, Key="uploads/live.bin", UploadId=live)


async def test_serve_aborts_an_upload_once_it_falls_silent(
    proxy_factory: Any, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "s3proxy.app")
    proxy = await proxy_factory(**FAST)
    threshold = 2 * (5 / 100 + 0.1 + 0.5 + 1.5)
    key = "uploads/falls-silent.bin"
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    # Alive for a while: a part every second, longer than the threshold in all.
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < threshold + 1.5:
        n += 1
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=b"x")
        last = time.monotonic()
        await asyncio.sleep(1.0)
        assert open_uploads(s3, bucket), f"aborted while live, {time.monotonic() - last:.1f}s idle"
    # Then silent: gone within threshold + interval (+ the sweep itself) of its last part.
    while open_uploads(s3, bucket):
        assert time.monotonic() - last < threshold + 0.5 + 1.5, "not swept in time"
        await asyncio.sleep(0.05)
    idle = time.monotonic() - last
    assert idle > threshold - 1.0, f"aborted after {idle:.1f}s idle, threshold {threshold}s"
    deadline = time.monotonic() + 5  # the sweep logs once its aborts are done
    while not any(" aborted=1 " in line for line in swept_lines(caplog)):
        assert time.monotonic() < deadline, swept_lines(caplog)
        await asyncio.sleep(0.05)
    metrics = await (await proxy.get("/metrics")).text()
    assert "s3proxy_orphans_aborted_total 1.0" in metrics
    assert 's3proxy_cleanup_sweeps_total{outcome="ok"}' in metrics


# --- end to end on SeaweedFS: kill -9 one instance, another sweeps -------------------


def proxy_env(store: EmbeddedStore) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}
    env.update(AWS_ACCESS_KEY_ID=store.access_key, AWS_SECRET_ACCESS_KEY=store.secret_key)
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return env


# Shared limits (every instance must have the same): 5 MiB at 2 MiB/s + 2 s grace + 1 s
# idle + one attempt of (1 + 3) s of S3 call = 9.5 s between parts; twice that + 1 s of
# skew = a 20 s threshold; sweeps every 5 s (2.5-5 s with jitter).
E2E_LIMITS = {
    "--part-size": "5MiB",
    "--memory-budget": "64MiB",
    "--max-file-size": "128MiB",
    "--min-upload-rate": "2MiB",
    "--min-rate-window": "2s",
    "--client-timeout": "1",
    "--s3-connect-timeout": "1",
    "--s3-read-timeout": "3",
    "--s3-max-attempts": "1",
    "--cleanup-clock-skew": "1s",
}
E2E_THRESHOLD, E2E_INTERVAL = 20.0, 5.0
RATE = 3 * MiB  # what the clients send: above the minimum


async def paced_upload(url: str, name: str, data: bytes, rate: float) -> tuple[int, Any]:
    """POST one file at ``rate`` bytes/s (chunked: the body is a generator)."""
    head = part_head(file_part("file", name, data))
    tail = b"\r\n--" + BOUNDARY.encode() + b"--\r\n"

    async def body() -> AsyncIterator[bytes]:
        yield head
        started = time.monotonic()
        step = 64 * 1024
        for i in range(0, len(data), step):
            ahead = (i / rate) - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
            yield data[i : i + step]
        yield tail

    timeout = aiohttp.ClientTimeout(total=300)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{url}/upload", data=body(), headers=headers()) as resp,
    ):
        return resp.status, await resp.json()


def doomed_with_a_part(c: Any, b: str, prefix: str) -> tuple[str, str] | None:
    """The doomed upload's (key, upload id), once it has a part."""
    for up in c.list_multipart_uploads(Bucket=b, Prefix=prefix).get("Uploads", []):
        if up["Key"].endswith("/doomed.bin"):
            parts = c.list_parts(Bucket=b, Key=up["Key"], UploadId=up["UploadId"])
            if parts.get("Parts"):
                return up["Key"], up["UploadId"]
    return None


def is_open(c: Any, b: str, prefix: str, upload: tuple[str, str]) -> bool:
    listed = c.list_multipart_uploads(Bucket=b, Prefix=prefix).get("Uploads", [])
    return upload in [(u["Key"], u["UploadId"]) for u in listed]


@pytest.fixture
def sw_prefix(seaweedfs: EmbeddedStore) -> Iterator[str]:
    prefix = f"sweep-{uuid.uuid4().hex[:8]}/"
    yield prefix
    c = boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(seaweedfs))
    for up in c.list_multipart_uploads(Bucket=seaweedfs.bucket, Prefix=prefix).get("Uploads", []):
        c.abort_multipart_upload(Bucket=seaweedfs.bucket, Key=up["Key"], UploadId=up["UploadId"])
    for obj in c.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=prefix).get("Contents", []):
        c.delete_object(Bucket=seaweedfs.bucket, Key=obj["Key"])


@pytest.mark.e2e
@pytest.mark.slow
async def test_kill_9_orphan_is_swept_by_another_instance_and_a_live_one_is_not(
    seaweedfs: EmbeddedStore, sw_prefix: str, tmp_path: Path
) -> None:
    c = boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(seaweedfs))
    b = seaweedfs.bucket
    common = ["--endpoint-url", seaweedfs.endpoint_url, "--bucket", b]
    common += ["--key-template", sw_prefix + "{uuid}/{filename}"]
    common += [x for kv in E2E_LIMITS.items() for x in kv]
    env = proxy_env(seaweedfs)
    doomed = ProxyProcess.start([*common, "--cleanup-interval", "0"], env, tmp_path / "a.log")
    sweeper = ProxyProcess.start(common, env, tmp_path / "b.log")  # the default: sweeps
    try:
        # The live upload: long enough (about 28 s) that by age alone it would be an orphan.
        data = os.urandom(84 * MiB)
        live = asyncio.create_task(paced_upload(sweeper.url, "live.bin", data, RATE))
        # The doomed one: killed -9 once its first part has landed.
        doomed_data = os.urandom(100 * MiB)
        dying = asyncio.create_task(paced_upload(doomed.url, "doomed.bin", doomed_data, RATE))
        deadline = time.monotonic() + 30
        while (orphan := doomed_with_a_part(c, b, sw_prefix)) is None:
            assert time.monotonic() < deadline, "the doomed upload never sent a part"
            await asyncio.sleep(0.2)
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
            await dying
        parts = c.list_parts(Bucket=b, Key=orphan[0], UploadId=orphan[1]).get("Parts", [])
        last_active: datetime = max(p["LastModified"] for p in parts)

        while is_open(c, b, sw_prefix, orphan):
            idle = (datetime.now(UTC) - last_active).total_seconds()
            assert idle < E2E_THRESHOLD + E2E_INTERVAL + 3, f"orphan still open after {idle:.1f}s"
            await asyncio.sleep(0.2)
        idle = (datetime.now(UTC) - last_active).total_seconds()
        print(f"orphan aborted {idle:.1f}s after its last part (threshold {E2E_THRESHOLD}s)")
        assert idle > E2E_THRESHOLD - 1.5, f"aborted early: {idle:.1f}s after its last part"

        status, answer = await live
        assert status == 201, answer
        [stored] = answer["files"]
        got = c.get_object(Bucket=b, Key=stored["key"])["Body"].read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        log = sweeper.log_path.read_text()
        swept = re.findall(r"cleanup\.swept found=(\d+) aborted=(\d+) failed=0 live=(\d+)", log)
        assert ("1", "1") in [(f, a) for f, a, _ in swept], log[-3000:]
        assert all(f == a for f, a, _ in swept), swept
    finally:
        sweeper.stop()
        doomed.stop()
