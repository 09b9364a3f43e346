"""The embedded store supervised: a ``weed`` that dies is restarted, and readiness says so.

The backoff arithmetic is a table; the rest runs the real ``weed`` binary, alone and under
the real ``s3proxy serve`` process, on 127.0.0.1 and free ports, and kills it with SIGKILL
to its process group (what the OOM killer or an operator's ``kill -9`` does).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import boto3
import pytest

from s3proxy.embedded import Backoff, EmbeddedConfig, EmbeddedStore, plan_restart
from s3proxy.settings import Settings, SettingsError
from tests.polling import eventually, eventually_sync
from tests.s3util import BOTO_CONFIG, ProxyProcess, read_object_async
from tests.seaweed_fixture import (
    WEED_SIGTERM_EXIT,
    processes_mentioning,
    wait_no_weed,
)

# --- the backoff, pure ----------------------------------------------------------------

B = Backoff()  # 0.5 s doubling to 30 s, streak ends after 60 s ready


@pytest.mark.parametrize(
    ("streak", "ready_for", "backoff", "expected"),
    [
        (0, 0.2, B, (1, 0.5)),  # first exit: the shortest wait
        (1, 2.0, B, (2, 1.0)),  # died again soon after: doubled
        (2, 2.0, B, (3, 2.0)),
        (3, 59.9, B, (4, 4.0)),  # not up long enough to count as recovered
        (6, 1.0, B, (7, 30.0)),  # 0.5 * 2**6 = 32: capped
        (3, 60.0, B, (1, 0.5)),  # up a minute: the streak starts again
        (9, 3600.0, B, (1, 0.5)),
        (2, None, B, (3, 2.0)),  # a restart that never got ready is one more in a row
        (0, None, B, (1, 0.5)),
        (5000, None, B, (5001, 30.0)),  # no float overflow however long it keeps failing
        (4, None, Backoff(0.1, 1.0), (5, 1.0)),
        (0, None, Backoff(2.0, 2.0), (1, 2.0)),
    ],
)
def test_plan_restart(
    streak: int, ready_for: float | None, backoff: Backoff, expected: tuple[int, float]
) -> None:
    assert plan_restart(streak, ready_for, backoff) == expected


@pytest.mark.parametrize(("first", "cap"), [(0.0, 30.0), (-1.0, 30.0), (2.0, 1.0)])
def test_backoff_refuses_nonsense(first: float, cap: float) -> None:
    with pytest.raises(ValueError, match="restart backoff"):
        Backoff(first, cap)


def test_restart_settings() -> None:
    loaded = Settings.load(
        {"embedded_restart_delay": "0.2"}, {"S3PROXY_EMBEDDED_RESTART_MAX_DELAY": "5"}
    )
    assert (loaded.embedded_restart_delay, loaded.embedded_restart_max_delay) == (0.2, 5.0)
    assert (Settings().embedded_restart_delay, Settings().embedded_restart_max_delay) == (0.5, 30)
    for delay, cap in ((0.0, 30.0), (10.0, 5.0)):
        with pytest.raises(SettingsError, match="--embedded-restart-delay"):
            Settings(embedded_restart_delay=delay, embedded_restart_max_delay=cap)


# --- helpers for the real thing -----------------------------------------------------------


def weed_pids(data_dir: Path) -> list[int]:
    """The weed processes run on ``data_dir`` (not the proxy, whose flag is --data-dir)."""
    return processes_mentioning(f"-dir={data_dir}")


def kill_weed(data_dir: Path) -> int:
    """SIGKILL the one weed on ``data_dir`` and its whole process group; its pid."""
    [pid] = weed_pids(data_dir)
    os.killpg(pid, signal.SIGKILL)
    return pid


def readyz(url: str) -> int:
    return get(url + "/readyz")[0]


STEP = 0.02  # seconds between looks: these waits are timed, to tens of ms


def is_(expected: int) -> Callable[[int], bool]:
    return lambda status: status == expected


def new_weed(data_dir: Path, old: int) -> int | None:
    pids = [p for p in weed_pids(data_dir) if p != old]
    return pids[0] if pids else None


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def curl_upload(url: str, path: Path) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-F", f"file=@{path}", url + "/upload"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body)


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}


def exits_logged(log_path: Path) -> list[tuple[int, float]]:
    """(restart number, delay) of each ``embedded.exited`` line the proxy logged."""
    text = log_path.read_text()
    found = re.findall(r"embedded\.exited .*?restart=(\d+) delay=([\d.]+)s", text)
    return [(int(n), float(d)) for n, d in found]


# --- the proxy, weed killed under it ---------------------------------------------------------


@pytest.mark.e2e
def test_weed_killed_under_the_proxy_comes_back(tmp_path: Path) -> None:
    """Default settings: no flag of this feature, so this fails on a proxy without it."""
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir), "--embedded-s3-port", "0"]
    proxy = ProxyProcess.start(args, plain_env(), tmp_path / "proxy.log")
    try:
        before = tmp_path / "before.txt"
        before.write_bytes(b"stored before the crash\n" * 1000)
        code, out = curl_upload(proxy.url, before)
        assert code == 201, out
        kept = out["files"][0]["key"]
        assert get(proxy.url + "/readyz")[0] == 200

        killed = time.monotonic()
        old = kill_weed(data_dir)

        def ready() -> tuple[int, dict[str, Any]]:
            assert get(proxy.url + "/healthz") == (200, {"status": "ok"})  # the process is fine
            return get(proxy.url + "/readyz")

        waiting = time.monotonic()
        answer = eventually_sync(
            ready, until=lambda got: got[0] == 503, within=5, what="503 after weed died", every=STEP
        )
        to_503 = time.monotonic() - waiting
        assert answer[1]["error"]["code"] == "UPSTREAM_UNAVAILABLE"
        eventually_sync(
            ready, until=lambda got: got[0] == 200, within=20, what="200 after restart", every=STEP
        )
        back = time.monotonic() - killed
        assert new_weed(data_dir, old) is not None  # a new process, not the old one back

        after = tmp_path / "after.txt"
        after.write_bytes(b"stored after the restart\n")
        code, out = curl_upload(proxy.url, after)
        assert code == 201, out
        uploads_work = time.monotonic() - killed
        with urllib.request.urlopen(f"{proxy.url}/files/{kept}", timeout=10) as resp:
            assert resp.read() == before.read_bytes()
        with urllib.request.urlopen(f"{proxy.url}/files/{out['files'][0]['key']}") as resp:
            assert resp.read() == after.read_bytes()
        log = proxy.log_path.read_text()
        assert re.search(r"embedded\.exited pid=\d+ code=-9 .*restart=1 delay=0\.5s", log), log
        assert "embedded.restarted" in log and "Traceback" not in log
        print(
            f"weed SIGKILLed: /readyz 503 after {to_503 * 1000:.0f} ms, 200 again after "
            f"{back:.2f} s, an upload stored {uploads_work:.2f} s after the kill"
        )
    finally:
        assert proxy.stop() == 0
    wait_no_weed(None, data_dir, within=10.0)


@pytest.mark.e2e
def test_repeated_kills_back_off(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir), "--embedded-s3-port", "0"]
    proxy = ProxyProcess.start(args, plain_env(), tmp_path / "proxy.log")
    gaps = []
    try:
        for _ in range(3):
            old = kill_weed(data_dir)  # as soon as it is back: deaths in a row
            killed = time.monotonic()
            eventually_sync(
                lambda: new_weed(data_dir, old),  # noqa: B023
                within=15.0,
                what="weed respawned",
                every=STEP,
            )
            gaps.append(time.monotonic() - killed)
            eventually_sync(
                lambda: readyz(proxy.url), until=is_(200), within=15, what="ready", every=STEP
            )
    finally:
        assert proxy.stop() == 0
    wait_no_weed(None, data_dir, within=10.0)
    assert exits_logged(proxy.log_path) == [(1, 0.5), (2, 1.0), (3, 2.0)]
    for gap, delay in zip(gaps, (0.5, 1.0, 2.0), strict=True):
        assert delay <= gap < delay + 2.0  # respawned after its delay, not long after
    print("kill -> respawn: " + ", ".join(f"{g:.2f} s" for g in gaps))


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_stopping_the_proxy_during_a_restart_leaves_no_weed(
    tmp_path: Path, sig: signal.Signals
) -> None:
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir), "--embedded-s3-port", "0"]
    proxy = ProxyProcess.start(args, plain_env(), tmp_path / "proxy.log")
    try:
        old = kill_weed(data_dir)
        restarting = eventually_sync(
            lambda: new_weed(data_dir, old), within=10.0, what="weed respawned", every=STEP
        )
        assert restarting is not None
        assert get(proxy.url + "/readyz")[0] == 503  # caught while it starts
        proxy.proc.send_signal(sig)
        proxy.proc.wait(30)
    finally:
        proxy.stop()
    if sig == signal.SIGTERM:
        assert proxy.proc.returncode == 0
    waiting = time.monotonic()
    # Its pid too, not only processes on data_dir: an exiting process loses its command
    # line before it is gone (CI: none found while the pid still ran). After a SIGKILL
    # the weed has only its own SIGTERM handling (WEED_SIGTERM_EXIT).
    wait_no_weed(restarting, data_dir, within=WEED_SIGTERM_EXIT)
    gone = time.monotonic() - waiting
    print(f"{sig.name} during a restart: the starting weed gone after {gone:.2f} s")


@pytest.mark.e2e
def test_workers_supervisor_restarts_weed(tmp_path: Path) -> None:
    """With --workers the first process runs the store; the workers see its outage through
    their own S3 check (one attempt, so it answers at once)."""
    data_dir = tmp_path / "data"
    args = [
        *("--data-dir", str(data_dir), "--embedded-s3-port", "0"),
        *("--workers", "2", "--s3-max-attempts", "1", "--embedded-restart-delay", "2"),
    ]
    proxy = ProxyProcess.start(args, plain_env(), tmp_path / "proxy.log")
    try:
        url = proxy.url
        eventually_sync(lambda: readyz(url), until=is_(200), within=20, what="ready", every=STEP)
        old = kill_weed(data_dir)
        killed = time.monotonic()
        eventually_sync(lambda: readyz(url), until=is_(503), within=2, what="503", every=STEP)
        to_503 = time.monotonic() - killed
        # Each worker answers from its own cached check (up to an interval old): a 200 from
        # a worker that has not looked since the kill is not "back"; a new weed is.
        eventually_sync(
            lambda: (readyz(url), new_weed(data_dir, old)),
            until=lambda got: got[0] == 200 and got[1] is not None,
            within=20,
            what="ready again on a new weed",
            every=STEP,
        )
        back = time.monotonic() - killed
        src = tmp_path / "after.txt"
        src.write_bytes(b"after\n")
        code, out = curl_upload(proxy.url, src)
        assert code == 201, out
    finally:
        assert proxy.stop() == 0
    wait_no_weed(None, data_dir, within=10.0)
    assert exits_logged(proxy.log_path) == [(1, 2.0)]
    print(f"workers: /readyz 503 after {to_503 * 1000:.0f} ms, 200 after {back:.2f} s")


# --- the store alone ----------------------------------------------------------------------


@pytest.mark.e2e
async def test_store_restarts_on_the_same_ports_with_its_keys_and_data(tmp_path: Path) -> None:
    store = EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0, restart=Backoff(0.1)))
    await store.start()
    try:
        ports, keys, endpoint = (
            store.ports,
            (store.access_key, store.secret_key),
            store.endpoint_url,
        )
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=store.region,
            aws_access_key_id=keys[0],
            aws_secret_access_key=keys[1],
            config=BOTO_CONFIG,
        )
        with closing(s3):
            await asyncio.to_thread(
                s3.put_object, Bucket=store.bucket, Key="kept", Body=b"still here"
            )
            (tmp_path / "s3-identities.json").unlink()  # rewritten for the restart
            old = store.pid
            assert old is not None and store.up
            os.killpg(old, signal.SIGKILL)
            await eventually(lambda: not store.up, within=1, what="the store down", every=0.01)
            await eventually(lambda: store.up, within=15, what="the store up again")
            assert store.up and store.pid not in (None, old) and store.restarts == 1
            assert (store.ports, store.endpoint_url) == (ports, endpoint)
            assert (store.access_key, store.secret_key) == keys
            got = await read_object_async(s3, store.bucket, "kept")
            assert got == b"still here"
    finally:
        pid = store.pid
        await store.stop()
    wait_no_weed(pid, tmp_path, within=1.0)


@pytest.mark.e2e
@pytest.mark.parametrize("when", ["waiting", "starting"])
async def test_store_stop_during_restart_leaves_no_weed(tmp_path: Path, when: str) -> None:
    delay = 30.0 if when == "waiting" else 0.1
    store = EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0, restart=Backoff(delay)))
    await store.start()
    old = store.pid
    assert old is not None
    os.killpg(old, signal.SIGKILL)
    restarting = None
    if when == "waiting":
        await eventually(lambda: not store.up, within=4, what="the store down", every=0.02)
    else:
        restarting = await eventually(
            lambda: store.pid if store.pid != old else None,
            within=4,
            what="a new weed being started",
            every=0.02,
        )
    assert not store.up
    if when == "starting":
        assert restarting not in (None, old)  # a new weed is being started
    stopping = time.monotonic()
    await store.stop()
    assert time.monotonic() - stopping < 5
    assert store.pid is None
    wait_no_weed(restarting, tmp_path, within=1.0)


@pytest.mark.e2e
async def test_failed_restarts_back_off_and_keep_trying(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its S3 port taken while weed is down: each try fails (logged, with a longer wait),
    none gives up, and the first try after the port is free brings it back there."""
    store = EmbeddedStore(EmbeddedConfig(data_dir=tmp_path, s3_port=0, restart=Backoff(0.2)))
    await store.start()
    try:
        port = store.ports["s3.port"]
        old = store.pid
        assert old is not None
        with socket.socket() as squatter:
            os.killpg(old, signal.SIGKILL)
            await eventually(lambda: not store.up, within=1, what="the store down", every=0.01)
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", port))  # weed is reaped: its listeners are closed
            squatter.listen()
            await eventually(
                lambda: failures(caplog),
                until=lambda found: len(found) >= 2,
                within=5,
                what="two failed restarts logged",
            )
            assert not store.up and store.pid is None  # nothing half-started left running
        await eventually(lambda: store.up, within=15, what="the store up again")
        assert store.up and store.ports["s3.port"] == port and store.restarts == 1
        found = failures(caplog)
        assert found[:2] == [(2, 0.4), (3, 0.8)]  # streak goes on: 0.2, 0.4, 0.8 s ...
        assert f"port {port} (s3.port)" in caplog.text
    finally:
        await store.stop()
    wait_no_weed(None, tmp_path, within=1.0)


def failures(caplog: pytest.LogCaptureFixture) -> list[tuple[int, float]]:
    """(next restart number, its delay) of each ``embedded.restart_failed`` record."""
    found = []
    for record in caplog.records:
        m = re.match(r"embedded\.restart_failed next=(\d+) delay=([\d.]+)s", record.getMessage())
        if m:
            found.append((int(m.group(1)), float(m.group(2))))
    return found
