"""The load generator against a real s3proxy on moto: ``run_load`` in-process, and the CLI.

The proxy is built by tests/conftest.py's ``proxy_factory`` (create_app, served on
127.0.0.1); ``--verify`` reads the objects' size and sha256 back from moto, where
s3proxy's own metadata or tag holds them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.load import run_load
from bench.load_config import LoadConfig, parse_mix
from tests.conftest import ProxyFactory
from tests.s3util import MotoServer, free_port

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def _verify_cfg(moto: MotoServer, bucket: str, **kw: Any) -> dict[str, Any]:
    return {"verify": True, "s3_endpoint": moto.endpoint_url, "bucket": bucket, **kw}


@pytest.mark.timeout(60)
async def test_run_load_closed_loop_every_201_is_in_s3_with_its_sha256(
    proxy_factory: ProxyFactory,
    moto: MotoServer,
    bucket: str,
    keys_in: Any,
    tmp_path: Path,
) -> None:
    proxy = await proxy_factory()  # 5 MiB parts: the 6 MiB files go up as multipart uploads
    cfg = LoadConfig(
        target=str(proxy.make_url("/")),
        mix=parse_mix("64KiB,1MiB,6MiB", "3,2,1"),
        concurrency=4,
        duration=3.0,
        out=tmp_path,
        **_verify_cfg(moto, bucket),
    )
    result = await run_load(cfg)

    assert result.failed == 0, result.errors
    assert result.ok >= 6
    assert result.verified == result.ok
    assert (result.lost, result.partial, result.mismatched, result.verify_errors) == (0, 0, 0, 0)
    assert result.clean
    sizes = {r.size for r in result.records}
    assert 6 * MiB in sizes and 64 << 10 in sizes  # both the tag and the metadata path checked
    assert sorted(keys_in(bucket)) == sorted(r.key for r in result.records)
    assert result.throughput_mbps > 0 and result.latency_s["p99"] is not None
    assert result.wall_s >= 3.0

    doc = json.loads((tmp_path / "load.json").read_text())
    assert doc["ok"] == result.ok and len(doc["records"]) == len(result.records)
    rec = doc["records"][0]
    for field in ("start", "end", "size", "status", "code", "key", "sha256", "retries", "error"):
        assert field in rec
    assert rec["status"] == 201 and len(rec["sha256"]) == 64 and rec["verify"] == "ok"
    assert (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
async def test_run_load_chunked_bodies_with_auth_and_cleanup(
    proxy_factory: ProxyFactory, moto: MotoServer, bucket: str, keys_in: Any
) -> None:
    proxy = await proxy_factory(api_key=("k-" + "x" * 30,))
    target = str(proxy.make_url("/"))
    without = await run_load(LoadConfig(target=target, requests=2, duration=None))
    assert without.errors == {"401 AUTH_REQUIRED": 2}
    assert not without.clean

    cfg = LoadConfig(
        target=target,
        mix=parse_mix("100KiB,6MiB"),
        requests=4,
        duration=None,
        concurrency=2,
        chunked=True,
        api_key="k-" + "x" * 30,
        cleanup=True,
        **_verify_cfg(moto, bucket),
    )
    result = await run_load(cfg)
    assert (result.ok, result.verified, result.deleted) == (4, 4, 4), result.errors
    assert keys_in(bucket) == []


@pytest.mark.timeout(60)
async def test_overloaded_answers_are_retried_and_counted(
    proxy_factory: ProxyFactory, moto: MotoServer, bucket: str
) -> None:
    """Past --max-connections s3proxy answers 503 OVERLOADED: safe to send again."""
    proxy = await proxy_factory(max_connections=1)
    cfg = LoadConfig(
        target=str(proxy.make_url("/")),
        mix=parse_mix("2MiB"),
        requests=8,
        duration=None,
        concurrency=4,
        retry=30,
        **_verify_cfg(moto, bucket),
    )
    result = await run_load(cfg)
    assert result.failed == 0, result.errors
    assert result.ok == result.verified == 8
    assert result.retries > 0 and result.retried_ok > 0
    # a client over the cap sees the 503, or a broken pipe if it was still sending
    assert set(result.retries_by) <= {"503 OVERLOADED", "0 SEND_FAILED"}
    assert sum(result.retries_by.values()) == result.retries


async def test_connection_refused_is_retried_then_reported() -> None:
    cfg = LoadConfig(target=f"http://127.0.0.1:{free_port()}", requests=2, duration=None, retry=2)
    result = await run_load(cfg)
    assert result.errors == {"0 CONNECTION_REFUSED": 2}
    assert result.retries == 4 and result.retried_ok == 0
    assert result.retries_by == {"0 CONNECTION_REFUSED": 4}
    assert all(r.sha256 == "" and r.key == "" for r in result.records)


@pytest.mark.timeout(60)
async def test_open_loop_drops_arrivals_over_the_in_flight_cap(
    proxy_factory: ProxyFactory,
) -> None:
    proxy = await proxy_factory()
    cfg = LoadConfig(
        target=str(proxy.make_url("/")),
        mix=parse_mix("3MiB"),
        rate=40.0,
        arrivals="fixed",
        concurrency=1,
        duration=1.5,
    )
    result = await run_load(cfg)
    assert result.failed == 0, result.errors
    assert result.ok >= 1 and result.dropped >= 1
    assert result.ok + result.dropped == pytest.approx(1.5 * 40, abs=2)


@pytest.mark.timeout(60)
async def test_cli_help_and_a_short_run(
    proxy_factory: ProxyFactory, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench",
            "load",
            *args,
            cwd=REPO,
            env=dict(os.environ),  # the fake AWS_* credentials conftest put there
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 40)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, _ = await cli("--help")
    assert code == 0
    for flag in ("--target", "--concurrency", "--rate", "--mix", "--retry", "--verify"):
        assert flag in out

    proxy = await proxy_factory()
    code, out, err = await cli(
        "--target",
        str(proxy.make_url("/")),
        "--duration",
        "2s",
        "--sizes",
        "256KiB,1MiB",
        "--mix",
        "1,1",
        "--verify",
        "--s3-endpoint",
        moto.endpoint_url,
        "--bucket",
        bucket,
        "--out",
        str(tmp_path),
    )
    assert code == 0, out + err
    assert "p50" in out and "p99" in out and "lost 0, partial 0" in out
    doc = json.loads((tmp_path / "load.json").read_text())
    assert doc["ok"] > 0 and doc["verified"] == doc["ok"] and doc["failed"] == 0
    assert (tmp_path / "load.png").exists()
