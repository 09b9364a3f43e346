"""Scale-out, end to end (issue #14): three ``s3proxy serve`` processes over the two S3
gateways of a multi-node SeaweedFS, behind HAProxy and behind nginx from Debian's packages
on the deployment guide's own configs (docs/deploy/), under a continuous stream of
mixed-size uploads from ``bench.load.run_load``.

What must hold, as docs/deploy.md promises:

- a rolling restart by plain SIGTERM (wait for the exit, start, wait until the load
  balancer sees the instance) fails no upload, after at most one client retry where the
  answer says a retry is safe; every 201 is in the bucket with its sha256, nothing partial,
  no multipart upload left open;
- ``kill -9`` of one instance fails only the uploads it had in flight (told failed or no
  answer), and the orphans it leaves are aborted by the others' sweep;
- an S3 gateway or a volume server going down gives JSON 5xx, never a 201 for data that
  cannot be read back, and ``/readyz`` takes the instance whose gateway is down out of
  HAProxy's rotation by its answer (503), not by a check timeout.

The figures (uploads, failures before and after retry, lost, orphans, time to sweep) are
printed; run with ``-s`` to read them. One cluster serves the whole module.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.load import run_load
from bench.load_config import LoadConfig, parse_mix
from bench.load_stats import LoadResult, RequestRecord
from s3proxy import limits
from s3proxy.settings import Settings
from tests import bodies
from tests.bodies import MiB
from tests.loadbalancers import HAProxy, running_haproxy, running_nginx
from tests.polling import eventually
from tests.s3util import ProxyProcess, free_port
from tests.seaweed_cluster import ADMIN, BUCKET, SeaweedCluster, running_cluster
from tests.test_lifecycle import open_upload

# Both tests take 1.5-4 minutes on a 2-core machine, depending on what else runs on it.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

INSTANCES = 3
GATEWAY_OF = {0: 1, 1: 2, 2: 1}  # instance -> the S3 gateway it talks to
# Short limits, so that the orphan threshold the sweep derives from them (by activity,
# the default rule) is seconds, not half an hour; every instance has the same ones.
LIMITS = {
    "--part-size": "5MiB",
    "--max-file-size": "16MiB",
    "--memory-budget": "48MiB",
    "--min-upload-rate": "2MiB",
    "--min-rate-window": "2s",
    "--client-timeout": "3",
    "--s3-connect-timeout": "1",
    "--s3-read-timeout": "4",
    "--s3-max-attempts": "2",
    "--cleanup-clock-skew": "1s",
    "--cleanup-interval": "3s",
    "--shutdown-timeout": "20",
}
ORPHAN_AFTER = limits.orphan_after(
    Settings(
        endpoint_url="http://x",
        bucket="b",
        part_size=5 << 20,
        max_file_size=16 << 20,
        memory_budget=48 << 20,
        min_upload_rate=2 << 20,
        min_rate_window=2.0,
        client_timeout=3.0,
        s3_connect_timeout=1.0,
        s3_read_timeout=4.0,
        s3_max_attempts=2,
    ),
    clock_skew=1.0,
)
SWEPT_WITHIN = ORPHAN_AFTER + 3.0 + 10.0  # threshold + interval + a sweep's run and slack
MIX = parse_mix("64KiB,1MiB,6MiB,11MiB", "6,3,2,1")  # 6 and 12 MiB go up as multipart
FIVE_XX_CODES = {"UPSTREAM_UNAVAILABLE", "UPSTREAM_ERROR", "UPSTREAM_TIMEOUT"}


# --- the fleet ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    with running_cluster(tmp_path_factory.mktemp("weed")) as c:
        yield c


@dataclass
class Fleet:
    """The s3proxy processes, each on a fixed port, restartable as an orchestrator does."""

    cluster: SeaweedCluster
    workdir: Path
    ports: list[int] = field(default_factory=lambda: [free_port() for _ in range(INSTANCES)])
    procs: dict[int, ProxyProcess] = field(default_factory=dict)
    starts: int = 0

    def addr(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def url(self, i: int) -> str:
        return f"http://{self.addr(i)}"

    def start(self, i: int) -> ProxyProcess:
        self.starts += 1
        args = ["--endpoint-url", self.cluster.endpoint(GATEWAY_OF[i]), "--bucket", BUCKET]
        for flag, value in LIMITS.items():
            args += [flag, value]
        proc = ProxyProcess.start(
            args,
            self.cluster.proxy_env(),
            self.workdir / f"proxy-{i + 1}-{self.starts}.log",
            port=self.ports[i],
        )
        self.procs[i] = proc
        return proc

    def sigterm(self, i: int) -> int:
        """SIGTERM and wait for the exit, as an orchestrator's rolling update does."""
        proc = self.procs[i].proc
        proc.send_signal(signal.SIGTERM)
        return proc.wait(60)

    def kill(self, i: int) -> None:
        proc = self.procs[i].proc
        proc.kill()
        proc.wait()

    def logs(self) -> dict[Path, str]:
        return {p: p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log"))}

    def stop_all(self) -> None:
        for proxy in self.procs.values():
            if proxy.proc.poll() is None:
                proxy.proc.send_signal(signal.SIGTERM)
        for proxy in self.procs.values():
            try:
                proxy.proc.wait(30)
            except subprocess.TimeoutExpired:
                proxy.proc.kill()
                proxy.proc.wait()


@pytest.fixture
def fleet(cluster: SeaweedCluster, tmp_path: Path) -> Iterator[Fleet]:
    gone = [n.name for n in cluster.nodes.values() if not n.running]
    assert not gone, f"weed nodes died since the last test: {gone}"
    fleet = Fleet(cluster, tmp_path)
    try:
        for i in range(INSTANCES):
            fleet.start(i)
        yield fleet
    finally:
        fleet.stop_all()
    tracebacks = [str(p) for p, text in fleet.logs().items() if "Traceback" in text]
    assert not tracebacks, f"tracebacks in {tracebacks}"


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.load's --verify reads the AWS_* chain: the cluster's admin keys."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ADMIN[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ADMIN[1])


# --- load, and what to check after it -----------------------------------------------------


@dataclass
class Load:
    """A run_load in the background until ``finish()``."""

    task: asyncio.Task[LoadResult]
    stop: asyncio.Event
    t0: float  # monotonic time of the run's start (records count from it)

    async def finish(self) -> LoadResult:
        self.stop.set()
        return await asyncio.wait_for(self.task, 120)

    def at(self, monotonic: float) -> float:
        """A monotonic time as the records' clock (seconds from the run's start)."""
        return monotonic - self.t0


def start_load(target: str, cluster: SeaweedCluster, retry: int, seed: int) -> Load:
    cfg = LoadConfig(
        target=target,
        mix=MIX,
        concurrency=3,
        duration=600.0,  # until stopped
        retry=retry,
        timeout=60.0,
        seed=seed,
        verify=True,
        s3_endpoint=cluster.endpoint(1),
        bucket=BUCKET,
    )
    stop = asyncio.Event()
    t0 = time.monotonic()
    return Load(asyncio.create_task(run_load(cfg, stop, origin=t0)), stop, t0)


def open_uploads(cluster: SeaweedCluster) -> list[tuple[str, str]]:
    s3 = cluster.client(1)
    ups = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    return sorted((u["Key"], u["UploadId"]) for u in ups)


def summary(name: str, result: LoadResult, **more: object) -> str:
    first_failures = sum(1 for r in result.records if r.retries or not r.ok)
    extra = "".join(f", {k} {v}" for k, v in more.items())
    return (
        f"{name}: uploads {len(result.records)}, ok {result.ok}, failed before retry "
        f"{first_failures} ({dict(result.retries_by)}), failed after retry {result.failed} "
        f"({result.errors}), lost {result.lost}, partial {result.partial}, mismatched "
        f"{result.mismatched}, {result.throughput_mbps:.1f} MB/s{extra}"
    )


def assert_every_201_stored(result: LoadResult) -> None:
    assert result.verified == result.ok, result.errors
    assert (result.lost, result.partial, result.mismatched, result.verify_errors) == (0, 0, 0, 0)


async def rolling_restart(
    fleet: Fleet, seen_up: Callable[[int], Awaitable[bool]]
) -> list[tuple[float, float, float]]:
    """SIGTERM, wait for the exit, start, wait until seen up; per instance the seconds
    from the signal to (exit, answering /healthz, seen up)."""
    took = []
    for i in range(INSTANCES):
        began = time.monotonic()
        code = await asyncio.to_thread(fleet.sigterm, i)
        assert code == 0, fleet.procs[i].log_path.read_text()[-3000:]
        exited = time.monotonic() - began
        await asyncio.to_thread(fleet.start, i)
        started = time.monotonic() - began
        await eventually(
            functools.partial(seen_up, i), within=30, what=f"instance {i + 1} seen up", every=0.2
        )
        took.append((round(exited, 1), round(started, 1), round(time.monotonic() - began, 1)))
    return took


def haproxy_sees(haproxy: HAProxy, status: str) -> Callable[[int], Awaitable[bool]]:
    async def probe(i: int) -> bool:
        return await asyncio.to_thread(haproxy.status, f"s3proxy-{i + 1}") == status

    return probe


async def get_status(url: str) -> tuple[int, dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession() as session, session.get(url, timeout=timeout) as resp:
        return resp.status, await resp.json()


def read_back(cluster: SeaweedCluster, records: list[RequestRecord]) -> list[str]:
    """Every record's object read in full through gateway 1: the keys that do not match."""
    s3 = cluster.client(1)
    bad = []
    for r in records:
        try:
            data = s3.get_object(Bucket=BUCKET, Key=r.key)["Body"].read()
        except Exception as exc:  # an unreadable 201 is the failure this looks for
            bad.append(f"{r.key}: {type(exc).__name__}: {exc}")
            continue
        if len(data) != r.size or hashlib.sha256(data).hexdigest() != r.sha256:
            bad.append(f"{r.key}: {len(data)} bytes, not the {r.size} sent")
    return bad


def assert_json_5xx(result: LoadResult) -> None:
    """Every failure is one of s3proxy's JSON 5xx answers about the store."""
    for r in result.records:
        if not r.ok:
            assert r.status >= 500 and r.code in FIVE_XX_CODES, (r.status, r.code, r.error)
        for why in r.retried_on:
            assert why.split()[1] in FIVE_XX_CODES | {"SHUTTING_DOWN"}, why


# --- behind HAProxy ---------------------------------------------------------------------------


async def test_haproxy_rolling_restart_kill_and_store_outages(
    cluster: SeaweedCluster, fleet: Fleet, tmp_path: Path, admin_env: None
) -> None:
    servers = [fleet.addr(i) for i in range(INSTANCES)]
    with running_haproxy(servers, tmp_path / "haproxy") as haproxy:
        up = haproxy_sees(haproxy, "UP")
        await eventually(
            lambda: all_up(up), within=20, what="HAProxy sees every instance up", every=0.2
        )

        # 1. kill -9 of instance 3 mid-stream: only its in-flight uploads fail. One of
        # them is a multipart upload sent to it directly, so that it leaves an orphan.
        load = start_load(haproxy.url, cluster, retry=0, seed=11)
        raw = bodies.body([bodies.file("file", "orphan.bin", os.urandom(11 * MiB))])
        reader, writer = await open_upload(fleet.ports[2], raw, 6 * MiB)
        await eventually(
            lambda: asyncio.to_thread(orphan_uploads, cluster),
            within=20,
            what="the direct upload's multipart upload open",
        )
        in_flight = await uploads_in_flight(fleet.url(2))
        on_it = int((await asyncio.to_thread(haproxy.server, "s3proxy-3"))["scur"])
        killed_log = fleet.procs[2].log_path
        killed_at = time.monotonic()
        await asyncio.to_thread(fleet.kill, 2)
        dead_at = time.monotonic()  # the kill happened between the two
        # the direct client is told nothing but a closed (or reset) connection
        try:
            told = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            told = b""
        assert told == b""
        writer.close()
        await asyncio.sleep(2.0)
        killed = await load.finish()
        # every other upload has finished: what is still open is the dead instance's
        orphans = await asyncio.to_thread(open_uploads, cluster)
        assert [k for k, _ in orphans if k.endswith("/orphan.bin")], orphans
        kill_t, dead_t = load.at(killed_at), load.at(dead_at)
        failed = [r for r in killed.records if not r.ok]
        # told failed (the balancer's 502, a reset) or no answer, never a 201 or a 5xx of
        # ours for an upload the instance was streaming; each was in flight at the kill
        for r in failed:
            assert r.start <= dead_t and r.end >= kill_t, (kill_t, dead_t, r)
            assert r.status in (0, 502, 503), (r.status, r.code, r.error)
        assert len(failed) <= 3  # the load's concurrency: a bound, not the count
        # and none of them reached a surviving instance
        survivors = "".join(t for p, t in fleet.logs().items() if p != killed_log)
        assert not [r for r in failed if r.request_id in survivors]
        assert_every_201_stored(killed)
        swept = asyncio.create_task(time_to_sweep(cluster, orphans, killed_at))
        await asyncio.to_thread(fleet.start, 2)
        await eventually(lambda: up(2), within=30, what="instance 3 back in rotation", every=0.2)
        print(
            summary(
                "kill -9",
                killed,
                files_in_flight_on_killed=in_flight,
                haproxy_sessions_on_killed=on_it,
                orphans=len(orphans),
            ),
            flush=True,
        )

        # 2. rolling restart by SIGTERM alone, at most one retry where it is safe
        load = start_load(haproxy.url, cluster, retry=1, seed=12)
        await asyncio.sleep(1.0)
        took = await rolling_restart(fleet, up)
        await asyncio.sleep(1.0)
        rolled = await load.finish()
        print(summary("HAProxy rolling restart", rolled, per_instance_s=took), flush=True)
        assert rolled.failed == 0, rolled.errors
        assert rolled.ok >= 10
        assert_every_201_stored(rolled)
        assert set(rolled.retries_by) <= {"503 SHUTTING_DOWN", "0 CONNECTION_REFUSED"}

        # 3. gateway 2 stops: instance 2 says 503 on /readyz, HAProxy takes it out by that
        load = start_load(haproxy.url, cluster, retry=1, seed=13)
        await asyncio.sleep(1.0)
        down_at = time.monotonic()
        await asyncio.to_thread(cluster.stop_node, "s3-2")
        await eventually(
            lambda: readyz_is(fleet.url(1), 503), within=5, what="instance 2 unready", every=0.1
        )
        unready_s = time.monotonic() - down_at
        await eventually(
            lambda: haproxy_sees(haproxy, "DOWN")(1), within=15, what="out of rotation", every=0.1
        )
        out_s = time.monotonic() - down_at
        row = await asyncio.to_thread(haproxy.server, "s3proxy-2")
        assert row["check_status"] == "L7STS", row  # by its 503 answer, not L7TOUT
        await asyncio.sleep(2.0)
        outage_end = time.monotonic()
        cluster.spawn_node("s3-2")  # on this thread: see spawn_node
        await asyncio.to_thread(cluster.wait_serving, "s3-2")
        await eventually(lambda: up(1), within=30, what="instance 2 back", every=0.2)
        gw = await load.finish()
        assert_json_5xx(gw)
        assert_every_201_stored(gw)
        during = [r for r in gw.records if r.ok and r.end >= load.at(down_at)]
        assert during, "no upload finished while the gateway was down"
        assert await asyncio.to_thread(read_back, cluster, during) == []
        print(
            summary(
                "gateway down",
                gw,
                readyz_503_after_s=round(unready_s, 2),
                haproxy_down_after_s=round(out_s, 2),
                outage_s=round(outage_end - down_at, 1),
            ),
            flush=True,
        )

        # 4. a volume server dies: JSON 5xx at worst, and every 201 reads back meanwhile
        load = start_load(haproxy.url, cluster, retry=1, seed=14)
        await asyncio.sleep(1.0)
        vol_down = time.monotonic()
        await asyncio.to_thread(cluster.kill_node, "volume2")
        await asyncio.sleep(5.0)
        vol = await load.finish()
        during = [r for r in vol.records if r.ok and r.end >= load.at(vol_down)]
        assert during, "no upload finished while the volume server was down"
        unreadable = await asyncio.to_thread(read_back, cluster, during)  # volume2 still down
        cluster.spawn_node("volume2")
        await asyncio.to_thread(cluster.wait_serving, "volume2")
        assert unreadable == []
        assert_json_5xx(vol)
        assert_every_201_stored(vol)
        print(summary("volume server down", vol, read_back_during_outage=len(during)))

        # the kill's orphans are gone within the documented delay, and nothing else is open
        sweep_s = await swept
        left = await eventually(
            lambda: asyncio.to_thread(open_uploads, cluster),
            until=lambda ups: not ups,
            within=SWEPT_WITHIN,
            what="no multipart upload left open",
        )
        assert left == []
        print(
            f"orphans of kill -9: {len(orphans)}, swept {sweep_s:.1f} s after the kill "
            f"(threshold {ORPHAN_AFTER:.0f} s + interval 3 s)",
            flush=True,
        )


async def all_up(up: Callable[[int], Awaitable[bool]]) -> bool:
    return all([await up(i) for i in range(INSTANCES)])


async def readyz_is(url: str, status: int) -> bool:
    return (await get_status(url + "/readyz"))[0] == status


def orphan_uploads(cluster: SeaweedCluster) -> list[tuple[str, str]]:
    return [(k, u) for k, u in open_uploads(cluster) if k.endswith("/orphan.bin")]


async def uploads_in_flight(url: str) -> int:
    timeout = aiohttp.ClientTimeout(total=2)
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/metrics", timeout=timeout) as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("s3proxy_uploads_in_flight "):
            return int(float(line.split()[1]))
    raise AssertionError("no s3proxy_uploads_in_flight in /metrics")


async def time_to_sweep(
    cluster: SeaweedCluster, orphans: list[tuple[str, str]], since: float
) -> float:
    """Seconds from ``since`` until none of ``orphans`` is open any more."""
    wanted = set(orphans)
    await eventually(
        lambda: asyncio.to_thread(open_uploads, cluster),
        until=lambda ups: not wanted & set(ups),
        within=SWEPT_WITHIN + 60,
        what=f"the orphans {sorted(wanted)} swept",
        every=0.5,
    )
    return time.monotonic() - since


# --- behind nginx ---------------------------------------------------------------------------


async def test_nginx_rolling_restart_by_sigterm_alone(
    cluster: SeaweedCluster, fleet: Fleet, tmp_path: Path, admin_env: None
) -> None:
    """nginx has passive checks only and never asks /readyz, so --drain-delay auto is 0:
    the listener closes at once and nginx passes the refused connection to the next
    server. Before: new uploads got 503 SHUTTING_DOWN, 215 of 445 failed after a retry."""
    servers = [fleet.addr(i) for i in range(INSTANCES)]
    with running_nginx(servers, tmp_path / "nginx") as nginx:

        async def seen_up(i: int) -> bool:
            # nothing to ask nginx (passive checks only; max_fails=0 never marks it down)
            return (await get_status(fleet.url(i) + "/healthz"))[0] == 200

        load = start_load(nginx.url, cluster, retry=1, seed=21)
        await asyncio.sleep(1.0)
        took = await rolling_restart(fleet, seen_up)
        await asyncio.sleep(1.0)
        result = await load.finish()
        print(summary("nginx rolling restart", result, per_instance_s=took), flush=True)
        # nginx's own account of a failure (a 502 in CI, 1 upload of 373 and later of 228:
        # a connection completed in the loop turns before the listener closed was reset;
        # tests/test_drain.py, the connection that comes while the accepted settle)
        failures = [line for line in nginx.error_log.read_text().splitlines() if "[error]" in line]
        assert result.failed == 0, (result.errors, failures[-10:])
        assert result.ok >= 10
        assert_every_201_stored(result)
        # SEND_FAILED (the client's connection broke mid-body) is retried by the load tool
        # as nothing can be stored of a body that did not arrive whole; seen once in CI at
        # 1b9870a (a first attempt that reached no instance, nginx logged nothing for it;
        # its retry was stored). nginx does that to the request after an early answer on a
        # kept-alive connection, when the instance closed before reading the answered
        # body's rest (a stopping one cut it 1 s after its drain; now its drain waits up to
        # 10 s for it, tests/test_drain.py): docs/deploy.md, What to retry.
        first_tries = {"503 SHUTTING_DOWN", "0 CONNECTION_REFUSED", "0 SEND_FAILED"}
        assert set(result.retries_by) <= first_tries, result.retries_by
        assert await asyncio.to_thread(open_uploads, cluster) == []
        # request bodies were streamed, never spooled to nginx's disk
        assert "buffered to a temporary file" not in nginx.error_log.read_text()
        stopping = [
            line
            for text in fleet.logs().values()
            for line in text.splitlines()
            if "proxy.stopping" in line
        ]
        assert len(stopping) == INSTANCES, stopping
        assert all("drain_delay=0s" in line for line in stopping), stopping
