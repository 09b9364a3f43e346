"""``python -m bench.deploy_sizing``: the measurements behind docs/deploy.md's sizing model.

On one multi-node SeaweedFS (the scale-out test's cluster, ``tests.seaweed_cluster``), the
same closed-loop load (``bench.load.run_load``) against four deployments, one after the
other:

- one instance with ``--workers 1``, then ``--workers 2`` (clients straight to it);
- one instance, then three, behind HAProxy on the guide's config (``tests.loadbalancers``;
  for one instance every server line names it).

For each: throughput, p50/p95 latency, the proxies' CPU seconds per GiB stored (their whole
process trees, from /proc), their peak RSS, and the store's CPU per GiB. It reuses the test
fixtures on purpose: the figures are for the configurations the tests run. Writes
``sizing.json`` into ``--out``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import procs
from bench.load import run_load
from bench.load_config import LoadConfig, parse_duration, parse_mix
from tests.loadbalancers import running_haproxy
from tests.s3util import ProxyProcess, free_port
from tests.seaweed_cluster import ADMIN, BUCKET, SeaweedCluster, running_cluster

GiB = 1 << 30


@contextlib.contextmanager
def proxies(
    cluster: SeaweedCluster, count: int, workers: int, logdir: Path, budget: str, gateways: int
) -> Iterator[list[ProxyProcess]]:
    """``count`` s3proxy processes, taking turns over ``gateways`` S3 gateways."""
    started = []
    try:
        for i in range(count):
            args = [
                "--endpoint-url",
                cluster.endpoint(1 + i % gateways),
                "--bucket",
                BUCKET,
                "--workers",
                str(workers),
                "--memory-budget",
                budget,
            ]
            started.append(
                ProxyProcess.start(
                    args, cluster.proxy_env(), logdir / f"proxy-{i}.log", port=free_port()
                )
            )
        yield started
    finally:
        for p in started:
            p.proc.send_signal(signal.SIGTERM)
        for p in started:
            try:
                p.proc.wait(30)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()


def tree_hwm(pid: int) -> int:
    """Peak RSS of the process and each of its workers, summed."""
    return sum(procs.hwm_bytes(p) for p in procs.tree(pid))


async def measure(
    name: str, target: str, cluster: SeaweedCluster, running: list[ProxyProcess], cfg: Any
) -> dict[str, Any]:
    weeds = [n.proc.pid for n in cluster.nodes.values() if n.proc is not None]
    cpu0 = sum(procs.cpu_seconds(p.proc.pid) for p in running)
    weed0 = sum(procs.cpu_seconds(w) for w in weeds)
    busy0 = procs.machine_busy_seconds()
    result = await run_load(LoadConfig(target=target, **cfg))
    cpu = sum(procs.cpu_seconds(p.proc.pid) for p in running) - cpu0
    weed = sum(procs.cpu_seconds(w) for w in weeds) - weed0
    busy = procs.machine_busy_seconds() - busy0
    gib = result.bytes_ok / GiB
    row = {
        "deployment": name,
        "uploads": result.ok,
        "failed": result.failed,
        "verified": result.verified,
        "MB/s": result.throughput_mbps,
        "p50_s": result.latency_s["p50"],
        "p95_s": result.latency_s["p95"],
        "proxy_cpu_s_per_GiB": round(cpu / gib, 2) if gib else None,
        "store_cpu_s_per_GiB": round(weed / gib, 2) if gib else None,
        "machine_busy_cores": round(busy / max(result.wall_s, 1e-9), 2),
        "proxy_peak_rss_MiB": round(sum(tree_hwm(p.proc.pid) for p in running) / (1 << 20)),
        "proxy_processes": sum(len(procs.tree(p.proc.pid)) for p in running),
    }
    print(json.dumps(row), flush=True)
    return row


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = ADMIN
    rows = []
    with tempfile.TemporaryDirectory(prefix="s3proxy-sizing-") as tmp:
        root = Path(tmp)
        with running_cluster(root / "weed") as cluster:
            cfg = {
                "mix": parse_mix(args.sizes),
                "concurrency": args.concurrency,
                "duration": parse_duration(args.duration),
                "verify": True,
                "cleanup": True,
                "s3_endpoint": cluster.endpoint(1),
                "bucket": BUCKET,
            }
            for workers in (1, 2) if not args.lb_only else ():
                with proxies(cluster, 1, workers, root, args.budget, args.gateways) as run:
                    rows.append(
                        await measure(
                            f"1 instance, --workers {workers}", run[0].url, cluster, run, cfg
                        )
                    )
            for count in (1, 3):
                with proxies(cluster, count, 1, root, args.budget, args.gateways) as run:
                    servers = [f"127.0.0.1:{run[i % count].port}" for i in range(3)]
                    with running_haproxy(servers, root / f"haproxy-{count}") as lb:
                        await asyncio.sleep(5)  # two checks: every server UP
                        rows.append(
                            await measure(
                                f"{count} behind HAProxy, {args.gateways} gateway(s)",
                                lb.url,
                                cluster,
                                run,
                                cfg,
                            )
                        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.deploy_sizing", description=__doc__)
    p.add_argument("--sizes", default="32MiB")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", default="20s")
    p.add_argument("--budget", default="128MiB", help="--memory-budget of each worker")
    p.add_argument("--gateways", type=int, choices=(1, 2), default=2, help="S3 gateways used")
    p.add_argument("--lb-only", action="store_true", help="only the HAProxy deployments")
    p.add_argument("--out", type=Path, default=Path("bench/results/deploy-sizing"))
    args = p.parse_args(argv)
    began = time.time()
    rows = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"args": {k: str(v) for k, v in vars(args).items()}, "started": began, "rows": rows}
    (args.out / "sizing.json").write_text(json.dumps(doc, indent=2) + "\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
