"""Operating it: the token and cleanup commands, the periodic sweep, worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from s3proxy.tokens import verify
from tests import bodies
from tests.bodies import MiB
from tests.polling import eventually
from tests.s3util import MotoServer, ProxyProcess, fake_aws_env, open_uploads, open_uploads_async

NEW_SECRET, OLD_SECRET = "n" * 32, "o" * 32


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or fake_aws_env(),
    )


def test_token_command_issues_verifiable_tokens() -> None:
    env = {**fake_aws_env(), "S3PROXY_TOKEN_SECRET": f"{NEW_SECRET},{OLD_SECRET}"}
    proc = cli(
        "token",
        "--prefix",
        "users/7/",
        "--ttl",
        "10m",
        "--max-size",
        "5MiB",
        "--type",
        "application/pdf",
        "--subject",
        "user-7",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    grant = verify(proc.stdout.strip(), [NEW_SECRET.encode()])
    assert grant.prefix == "users/7/" and grant.max_size == 5 * MiB
    assert grant.types == ("application/pdf",) and grant.subject == "user-7"
    assert 590 <= grant.expires - time.time() <= 600


def test_token_command_without_secret_is_one_line() -> None:
    proc = cli("token", "--prefix", "p/")
    assert proc.returncode == 2 and "S3PROXY_TOKEN_SECRET" in proc.stderr
    assert "Traceback" not in proc.stderr
    env = {**fake_aws_env(), "S3PROXY_TOKEN_SECRET": NEW_SECRET}
    proc = cli("token", "--prefix", "../evil/", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.fixture
def orphans(s3: Any, bucket: str) -> Iterator[None]:
    """Two uploads under the proxy's prefix and one outside it, which must survive."""
    for key in ("uploads/a/1.bin", "uploads/b/2.bin", "elsewhere/3.bin"):
        s3.create_multipart_upload(Bucket=bucket, Key=key)
    yield
    survivors = open_uploads(s3, bucket)
    assert [u["Key"] for u in survivors] == ["elsewhere/3.bin"]
    s3.abort_multipart_upload(
        Bucket=bucket, Key="elsewhere/3.bin", UploadId=survivors[0]["UploadId"]
    )


def test_cleanup_command_dry_run_then_execute(
    moto: MotoServer, s3: Any, bucket: str, orphans: None
) -> None:
    args = [
        "cleanup",
        "--endpoint-url",
        moto.endpoint_url,
        "--bucket",
        bucket,
        "--older-than",
        "1h",
    ]
    proc = cli(*args)  # moto dates every upload in 2010: all are old
    assert proc.returncode == 0, proc.stderr
    assert "2 orphaned uploads found" in proc.stdout and "dry run" in proc.stdout
    assert len(open_uploads(s3, bucket)) == 3
    proc = cli(*args, "--execute")
    assert proc.returncode == 0, proc.stderr
    assert "2 orphaned uploads found; aborted 2, failed 0" in proc.stdout


async def test_serve_sweeps_periodically(
    proxy_factory: Any, s3: Any, bucket: str, orphans: None
) -> None:
    await proxy_factory(cleanup_interval=3600, cleanup_older_than=3600)
    await eventually(
        lambda: open_uploads_async(s3, bucket),
        until=lambda ups: len(ups) == 1,
        within=10,
        what="the sweep to leave only the upload outside its prefix",
    )


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two free ports in a row")


async def started_total(url: str) -> float | None:
    from tests.test_metrics import parse, value

    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        return value(parse(await resp.text()), "s3proxy_uploads_started_total")


async def test_workers_share_the_port(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    metrics = free_port_pair()
    proxy = ProxyProcess.start(
        [
            "--endpoint-url",
            moto.endpoint_url,
            "--bucket",
            bucket,
            "--workers",
            "2",
            "--part-size",
            "5MiB",
            "--memory-budget",
            "32MiB",
            "--metrics-listen",
            f"127.0.0.1:{metrics}",
        ],
        fake_aws_env(),
        tmp_path / "workers.log",
    )
    try:
        workers = children(proxy.proc.pid)
        assert len(workers) == 2

        async def one(i: int) -> int:
            raw = bodies.body([bodies.file("f", f"{i}.bin", os.urandom(6 * MiB))])
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    proxy.url + "/upload", data=bodies.chunked(raw), headers=bodies.headers()
                ) as resp,
            ):
                return resp.status

        assert await asyncio.gather(*(one(i) for i in range(6))) == [201] * 6

        # Each worker's own metrics, on the port plus its index: together, every upload
        # (one shared port answered each scrape from a random worker).
        # (a worker still starting, under load, has not bound its port yet: asked again)
        async def scraped() -> list[float | None]:
            return [await started_total(f"http://127.0.0.1:{metrics + i}/metrics") for i in (0, 1)]

        counts = await eventually(
            scraped,
            within=15,
            what="both workers' metrics",
            until=lambda c: True,
            ignoring=(aiohttp.ClientConnectorError,),
        )
        assert sum(c or 0 for c in counts) == 6, counts
        os.kill(workers[0], signal.SIGKILL)  # a crashed worker is replaced
        await eventually(
            lambda: set(children(proxy.proc.pid)) - {workers[0]},
            until=lambda live: len(live) >= 2,
            within=15,
            what="the dead worker replaced (live workers)",
        )
    finally:
        code = proxy.stop()
    assert code == 0
    assert not [pid for pid in workers if alive(pid)]


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
