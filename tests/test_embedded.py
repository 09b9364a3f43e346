"""The embedded SeaweedFS store, for real: spawned, used with boto3, killed, restarted.

Everything runs on 127.0.0.1 against the real ``weed`` binary; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from s3proxy import embedded
from s3proxy.embedded import (
    CREDENTIALS_NAME,
    EmbeddedConfig,
    EmbeddedStore,
    EmbeddedStoreError,
    taken_port,
)
from tests.polling import eventually
from tests.s3util import read_object_async
from tests.seaweed_fixture import (
    WEED_SIGTERM_EXIT,
    process_alive,
    running_store,
    s3_client_kwargs,
    wait_no_weed,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def environ_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def client(store: EmbeddedStore, **overrides: Any) -> Any:
    s3_options = overrides.pop("s3", {})
    config = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path", **s3_options},
    )
    return boto3.client("s3", **{**s3_client_kwargs(store), **overrides}, config=config)


@pytest.fixture
def s3(seaweedfs: EmbeddedStore) -> Iterator[Any]:
    with closing(client(seaweedfs)) as c:
        yield c


def test_put_get_and_multipart(seaweedfs: EmbeddedStore, s3: Any) -> None:
    assert seaweedfs.endpoint_url.startswith("http://127.0.0.1:")
    s3.put_object(Bucket=seaweedfs.bucket, Key="small.txt", Body=b"hello")
    assert s3.get_object(Bucket=seaweedfs.bucket, Key="small.txt")["Body"].read() == b"hello"

    key = "big.bin"
    parts = [b"a" * (5 * MiB), b"tail"]  # S3's 5 MiB minimum for all but the last part
    upload_id = s3.create_multipart_upload(Bucket=seaweedfs.bucket, Key=key)["UploadId"]
    etags = [
        s3.upload_part(
            Bucket=seaweedfs.bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=body
        )["ETag"]
        for n, body in enumerate(parts, start=1)
    ]
    s3.complete_multipart_upload(
        Bucket=seaweedfs.bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={
            "Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, start=1)]
        },
    )
    assert s3.get_object(Bucket=seaweedfs.bucket, Key=key)["Body"].read() == b"".join(parts)
    assert not s3.list_multipart_uploads(Bucket=seaweedfs.bucket).get("Uploads")


def test_credentials_are_enforced(seaweedfs: EmbeddedStore) -> None:
    bad = client(seaweedfs, aws_secret_access_key="wrong-secret")
    with closing(bad), pytest.raises(ClientError) as refused:
        bad.put_object(Bucket=seaweedfs.bucket, Key="nope", Body=b"x")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"

    unknown = client(seaweedfs, aws_access_key_id="UNKNOWNKEY")
    with closing(unknown), pytest.raises(ClientError) as refused:
        unknown.head_bucket(Bucket=seaweedfs.bucket)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    url = f"{seaweedfs.endpoint_url}/{seaweedfs.bucket}/anonymous"
    request = urllib.request.Request(url, data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(request, timeout=5)
    assert anonymous.value.code == 403
    anonymous.value.close()


def test_the_keys_cannot_create_buckets(seaweedfs: EmbeddedStore, s3: Any) -> None:
    """No Admin action: a bucket-name typo fails instead of creating a bucket."""
    with pytest.raises(ClientError) as refused:
        s3.create_bucket(Bucket="not-ours")
    assert refused.value.response["Error"]["Code"] == "AccessDenied"


def test_unsigned_payload_over_plain_http(seaweedfs: EmbeddedStore) -> None:
    """SeaweedFS takes ``X-Amz-Content-SHA256: UNSIGNED-PAYLOAD`` over http.

    A before-sign handler cannot ask for it: botocore's S3 signer overwrites the header
    with the body's sha256 on http. ``s3={"payload_signing_enabled": False}`` works.
    """
    sent: list[str] = []

    def record(request: Any, **_: Any) -> None:
        value = request.headers["X-Amz-Content-SHA256"]
        sent.append(value.decode() if isinstance(value, bytes) else value)

    def ask_unsigned(request: Any, **_: Any) -> None:
        request.headers["X-Amz-Content-SHA256"] = "UNSIGNED-PAYLOAD"

    with closing(client(seaweedfs)) as hooked:
        hooked.meta.events.register("before-sign.s3", ask_unsigned)
        hooked.meta.events.register("before-send.s3", record)
        hooked.put_object(Bucket=seaweedfs.bucket, Key="hooked", Body=b"body")
    assert len(sent[-1]) == 64 and sent[-1] != "UNSIGNED-PAYLOAD"  # the hash, not our value

    sent.clear()
    bucket, key = seaweedfs.bucket, "unsigned.bin"
    with closing(client(seaweedfs, s3={"payload_signing_enabled": False})) as unsigned:
        unsigned.meta.events.register("before-send.s3", record)
        unsigned.put_object(Bucket=bucket, Key="unsigned-put", Body=b"put body")
        upload_id = unsigned.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        etag = unsigned.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"part body"
        )["ETag"]
        unsigned.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
        )
        assert unsigned.get_object(Bucket=bucket, Key=key)["Body"].read() == b"part body"
        assert unsigned.get_object(Bucket=bucket, Key="unsigned-put")["Body"].read() == (
            b"put body"
        )
    assert set(sent) == {"UNSIGNED-PAYLOAD"}

    # The signature still covers everything else: a wrong secret is still refused.
    with (
        closing(
            client(seaweedfs, aws_secret_access_key="wrong", s3={"payload_signing_enabled": False})
        ) as bad,
        pytest.raises(ClientError) as refused,
    ):
        bad.put_object(Bucket=bucket, Key="unsigned-bad", Body=b"x")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


async def test_taken_port_fails_fast(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        store = EmbeddedStore(EmbeddedConfig(data_dir=data_dir, s3_port=port))
        started = time.monotonic()
        with pytest.raises(EmbeddedStoreError, match=rf"port {port} \(s3\) on 127.0.0.1") as taken:
            await store.start()
    assert taken.value.setting == "s3_port"  # the CLI names its own flag for it
    assert time.monotonic() - started < 5
    assert store.pid is None
    assert not data_dir.exists()  # refused before anything was written or spawned


@pytest.mark.parametrize("broken", ["directory", "json"])
async def test_unusable_credentials_file_is_a_store_error(tmp_path: Path, broken: str) -> None:
    # Not an OSError (which the CLI once reported as "cannot listen on host:port").
    creds = tmp_path / CREDENTIALS_NAME
    if broken == "directory":
        creds.mkdir()
    else:
        creds.write_text('{"access_key": ')
    store = EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0))
    with pytest.raises(EmbeddedStoreError, match=str(creds)) as failed:
        await store.start()
    assert failed.value.setting == "data_dir"
    assert "\n" not in str(failed.value)
    assert store.pid is None


@contextmanager
def held_by_another_address() -> Iterator[int]:
    """A port free on 127.0.0.1 (s3proxy's check passes) but held on 127.0.0.2, which
    weed's own all-interfaces check refuses: how a port taken between the two looks."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.2", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def test_weed_exiting_during_start_reports_its_output(tmp_path: Path) -> None:
    # weed itself exits, and we must say why.
    with held_by_another_address() as port:
        store = EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0, master_port=port))
        with pytest.raises(EmbeddedStoreError) as failed:
            await store.start(timeout=30)
    message = str(failed.value)
    assert "weed exited with code" in message
    assert str(port) in message.split("last lines of", 1)[1]  # weed's own words
    assert store.pid is None
    wait_no_weed(None, tmp_path, within=1.0)


async def test_a_picked_port_taken_before_weed_binds_it_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ports s3proxy picks are free when checked and bound by weed a moment later; another
    process may take one in between (seen in CI: weed's filer port, on a busy machine).
    Here the first pick of the filer port is one held on 127.0.0.2 (free by our check,
    refused by weed's), as such a race leaves it: the store starts on a fresh pick."""
    real = embedded._resolve_ports
    calls = 0
    with held_by_another_address() as port:

        def first_pick_taken(config: EmbeddedConfig, previous: Any) -> dict[str, int]:
            nonlocal calls
            calls += 1
            ports = real(config, previous)
            return {**ports, "filer.port": port} if calls == 1 else ports

        monkeypatch.setattr(embedded, "_resolve_ports", first_pick_taken)
        store = EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0))
        try:
            await store.start(timeout=30)
            assert calls == 2
            assert store._ports["filer.port"] != port
            assert json.loads((tmp_path / "ports.json").read_text()) == store._ports
            assert f"embedded.port_taken port={port} attempt=1" in caplog.text
        finally:
            await store.stop()
    wait_no_weed(None, tmp_path, within=5.0)


async def test_a_given_port_weed_cannot_bind_is_not_picked_again(tmp_path: Path) -> None:
    with held_by_another_address() as port:
        store = EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0, filer_port=port))
        with pytest.raises(EmbeddedStoreError) as failed:
            await store.start(timeout=30)
    assert taken_port(str(failed.value)) == port
    assert store.pid is None


def test_taken_port_reads_weeds_words() -> None:
    line = (
        "E1202 03:00:03.289779 mini.go:1244 Port allocation failed: port 33049 for Filer "
        "(specified by flag filer.port) is not available on 127.0.0.1 and cannot be used"
    )
    assert taken_port("weed exited; last lines:\n" + line) == 33049
    grpc = (  # a port taken between weed's own check and its S3 gRPC server's bind (CI)
        "F1202 06:17:30.055975 s3.go:448 s3 failed to listen on grpc port 35693: "
        "listen tcp 127.0.0.1:35693: bind: address already in use"
    )
    assert taken_port("weed exited; last lines:\n" + grpc) == 35693
    assert taken_port("listen tcp [::1]:9333: bind: address already in use") == 9333
    assert taken_port("embedded S3 store: not ready after 30s") is None


async def test_not_ready_in_time_kills_weed(tmp_path: Path) -> None:
    store = EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0))
    with pytest.raises(EmbeddedStoreError, match="not ready after"):
        await store.start(timeout=0.05)
    assert store.pid is None
    wait_no_weed(None, tmp_path, within=1.0)


def test_invalid_bucket_name_is_refused_before_start(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedStoreError, match="not a valid S3 bucket name"):
        EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, bucket="Uploads_1"))


def test_missing_binary_says_how_to_get_it(tmp_path: Path) -> None:
    config = EmbeddedConfig(data_dir=tmp_path, s3_port=0, weed_binary=str(tmp_path / "weed"))
    with pytest.raises(EmbeddedStoreError, match="not found"), running_store(config):
        pass


def volume_bytes(data_dir: Path) -> int:
    """Bytes in weed's volume files (``.dat``): where objects' bytes live until compacted."""
    return sum(p.stat().st_size for p in data_dir.rglob("*.dat"))


async def test_vacuum_gives_back_the_bytes_of_deleted_objects(tmp_path: Path) -> None:
    # Deleted bytes stay in the volumes until weed's sweep (840 s, over 30% garbage);
    # the bench writes and deletes ~60 GiB per run and filled the store before it came.
    async with EmbeddedStore(EmbeddedConfig(data_dir=tmp_path / "data", s3_port=0)) as store:
        with closing(client(store)) as s3:
            blob = os.urandom(16 * MiB)
            for i in range(4):
                await asyncio.to_thread(s3.put_object, Bucket=store.bucket, Key=f"k{i}", Body=blob)
            await asyncio.to_thread(s3.put_object, Bucket=store.bucket, Key="kept", Body=b"kept")
            for i in range(4):
                await asyncio.to_thread(s3.delete_object, Bucket=store.bucket, Key=f"k{i}")
            before = volume_bytes(store.data_dir)
            assert before >= 64 * MiB

            async def vacuumed() -> int:
                await store.vacuum()
                return volume_bytes(store.data_dir)

            # The filer marks a deleted object's chunks deleted in the volumes in the
            # background: on a busy machine (CI) a first vacuum came before it, with no
            # garbage to take. A vacuum that does nothing never passes.
            await eventually(
                vacuumed,
                within=30,
                what="the deleted objects' bytes to leave the volumes",
                until=lambda after: after < before - 60 * MiB,
            )
            kept = await asyncio.to_thread(s3.get_object, Bucket=store.bucket, Key="kept")
            assert kept["Body"].read() == b"kept"
            await asyncio.to_thread(s3.put_object, Bucket=store.bucket, Key="new", Body=blob)
    with pytest.raises(EmbeddedStoreError, match="not running"):
        await store.vacuum()


async def test_restart_keeps_objects_and_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # weed mini would turn these into an extra admin identity; it must never see them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "LEAKEDKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leakedsecret")
    config = EmbeddedConfig(data_dir=tmp_path / "data", s3_port=0)
    timings = []
    async with EmbeddedStore(config) as first:
        timings.append(first.startup_seconds)
        pid = first.pid
        assert pid is not None
        assert b"AWS_" not in environ_of(pid)
        keys = (first.access_key, first.secret_key)
        with closing(client(first)) as s3:
            await asyncio.to_thread(
                s3.put_object, Bucket=first.bucket, Key="kept", Body=b"still here"
            )
        leaked = client(first, aws_access_key_id="LEAKEDKEY", aws_secret_access_key="leakedsecret")
        with closing(leaked), pytest.raises(ClientError):
            await asyncio.to_thread(leaked.list_buckets)
    assert first.pid is None
    wait_no_weed(pid, config.data_dir, within=1.0)
    credentials = config.data_dir / CREDENTIALS_NAME
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600

    second = EmbeddedStore(config)
    await second.start()
    exited = asyncio.ensure_future(second.wait())
    try:
        timings.append(second.startup_seconds)
        assert (second.access_key, second.secret_key) == keys
        with closing(client(second)) as s3:
            body = await read_object_async(s3, second.bucket, "kept")
        assert body == b"still here"
    finally:
        pid = second.pid
        assert not exited.done()
        await second.stop()
        await second.stop()  # idempotent
    assert exited.done() and exited.result() is not None
    wait_no_weed(pid, config.data_dir, within=1.0)
    print(f"start to ready: first {timings[0]:.2f}s, restart {timings[1]:.2f}s")


KEEPER = """
import asyncio, sys
from pathlib import Path
from s3proxy.embedded import EmbeddedConfig, EmbeddedStore

async def main() -> None:
    store = EmbeddedStore(EmbeddedConfig(data_dir=Path(sys.argv[1]), s3_port=0))
    await store.start()
    print("ready", store.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_sigkilled_parent_leaves_no_weed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", KEEPER, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert parent.stdout is not None
        readable, _, _ = select.select([parent.stdout], [], [], 60)
        assert readable, "the store did not start within 60 s"
        word, weed_pid = parent.stdout.readline().decode().split()
        assert word == "ready"
        assert process_alive(int(weed_pid))
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    # The kernel SIGTERMs weed (parent-death signal); it shuts down in about a second,
    # or in 11 s when its filer waits for a gRPC stream (see WEED_SIGTERM_EXIT).
    killed = time.monotonic()
    wait_no_weed(int(weed_pid), tmp_path, within=WEED_SIGTERM_EXIT)
    print(f"weed gone {time.monotonic() - killed:.2f}s after its parent was SIGKILLed")


def start_and_kill_keeper(data_dir: Path) -> int:
    """Run a store in a child process (KEEPER), SIGKILL the child once it is ready; the
    pid of the weed it leaves, stopping on its parent-death signal."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", KEEPER, str(data_dir)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert parent.stdout is not None
        readable, _, _ = select.select([parent.stdout], [], [], 60)
        assert readable, "the store did not start within 60 s"
        _, weed_pid = parent.stdout.readline().decode().split()
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    return int(weed_pid)


async def test_a_store_started_right_after_its_parent_was_killed_waits_for_the_old_weed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tus tester: after kill -9 of a proxy, an immediate restart failed "weed exited
    with code 255 while starting" (1 of 3 tries): the old weed, stopping on its
    parent-death signal (about 1 s), still held its data. It holds the data dir's lock
    too now (inherited), so the new store waits for it, then starts."""
    weed_pid = start_and_kill_keeper(tmp_path)
    caplog.set_level(logging.INFO, "s3proxy.embedded")
    store = EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0))
    t0 = time.monotonic()
    try:
        await store.start()  # at once: the old weed is still stopping
        took = time.monotonic() - t0
        assert not process_alive(weed_pid)
        assert "embedded.waiting_for_lock" in caplog.text
    finally:
        await store.stop()
    print(f"started {took:.2f}s after the old store's parent was SIGKILLed")


async def test_a_data_dir_in_use_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    async with EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0)) as first:
        ports = (tmp_path / "ports.json").read_bytes()
        second = EmbeddedStore(
            EmbeddedConfig(data_dir=tmp_path, s3_port=0, access_key="a" * 16, secret_key="b" * 32)
        )
        with pytest.raises(EmbeddedStoreError) as err:
            await second.start()
        assert str(err.value) == (
            f"data dir {tmp_path} is in use by another s3proxy (pid {os.getpid()})"
        )
        assert (tmp_path / "ports.json").read_bytes() == ports
        assert first.up
    # once stopped, the dir is free again
    async with EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0)) as again:
        assert again.up


# --- ports.json: a hint, and where `cleanup` finds the store ----------------------------


@pytest.mark.parametrize(
    "value", ["70000", "-5", "0", "true", "false", "99999999999999999999999", '"8333"', "8333.0"]
)
def test_a_recorded_port_that_is_no_port_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    """Regression (reprobe7 F8): `s3proxy cleanup` with ports.json {"s3.port": 70000} (or
    -5, true, a huge number) failed with "EndpointResolutionError", and true was read as
    port 1 (a bool is an int). An unusable port now counts as none recorded, as an
    unreadable file already did, with a warning naming the file."""
    (tmp_path / "ports.json").write_text(f'{{"s3.port": {value}, "master.port": 9333}}')
    with caplog.at_level(logging.WARNING, logger="s3proxy.embedded"):
        assert embedded._read_ports(tmp_path / "ports.json") == {"master.port": 9333}
        assert embedded.recorded_s3_port(tmp_path) is None
    [warning, *_] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("embedded.port_ignored") and str(tmp_path / "ports.json") in warning
    assert "name=s3.port" in warning
    (tmp_path / "credentials.json").write_text('{"access_key": "AK", "secret_key": "SK"}')
    with pytest.raises(EmbeddedStoreError, match=r"no S3 port recorded in .*ports\.json"):
        embedded.store_access(tmp_path, 0)  # 0: the recorded one (was http://127.0.0.1:1)


def test_ports_json_missing_is_quiet_and_unreadable_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ports.json"
    with caplog.at_level(logging.WARNING, logger="s3proxy.embedded"):
        assert embedded._read_ports(path) == {}  # never started here
        assert caplog.records == []
        for text in ("{not json", "[8333]"):
            path.write_text(text)
            assert embedded._read_ports(path) == {}
    assert [r.getMessage().split()[0] for r in caplog.records] == ["embedded.ports_ignored"] * 2
    path.write_text('{"s3.port": 8333}')
    assert embedded.recorded_s3_port(tmp_path) == 8333
