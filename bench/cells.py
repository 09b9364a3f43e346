"""Measuring one cell: a fresh server, its clients, what it cost, and a check of every object.

A cell is (size, concurrency, design, client, repetition). Each design's server is started
fresh for its cell and warmed up with one upload, so its peak RSS and CPU are that cell's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench import body, clients, designs, procs, s3util
from bench.backends import Backend, child_env
from bench.options import REPO, CellSpec, Options
from bench.progress import Bar
from bench.result import CellResult, percentile


@dataclass
class Setup:
    """What every cell of a run shares."""

    backend: Backend
    opts: Options
    bar: Bar
    log_dir: Path
    body_files: dict[tuple[int, str], Path] = field(default_factory=dict)  # curl's: (size, kind)
    node_dirs: dict[str, Path] = field(default_factory=dict)  # designs.NODE folders installed
    s3proxy_src: Path | None = None  # the snapshot of s3proxy to measure
    s3proxy_b_src: Path | None = None  # s3proxy-b's (--s3proxy-b-rev), else s3proxy_src


@dataclass
class Checks:
    """The stored objects of a cell, read back and compared with the generated body."""

    verified: int = 0
    verify_errors: list[str] = field(default_factory=list)
    stray_objects: int = 0
    stray_keys: list[str] = field(default_factory=list)
    open_multipart_uploads: int = 0


async def verify_and_clean(
    b: Backend,
    region: str,
    uploads: list[clients.Upload],
    seed: int,
    size: int,
    kind: str = "random",
) -> Checks:
    """Check every reported object against the generated body, then delete everything."""
    expected = body.sha256(seed, size, kind)
    reported = [k for u in uploads for k in u.keys]
    async with b.client(region) as s3:
        slots = asyncio.Semaphore(4)

        async def check(key: str) -> s3util.Check:
            async with slots:
                return await s3util.verify(s3, b.bucket, key, size, expected)

        ok_keys = [k for u in uploads if u.ok for k in u.keys]
        checks = await asyncio.gather(*(check(k) for k in ok_keys))
        stray: list[str] = []
        open_uploads = 0
        if b.owned:
            present = await s3util.list_keys(s3, b.bucket)
            stray = sorted(set(present) - set(reported))
            with contextlib.suppress(Exception):
                open_uploads = await s3util.abort_open_uploads(s3, b.bucket)
            await s3util.delete_keys(s3, b.bucket, present)
        else:
            await s3util.delete_keys(s3, b.bucket, reported)
    return Checks(
        verified=sum(c.ok for c in checks),
        verify_errors=[f"{c.key}: {c.error}" for c in checks if not c.ok][:5],
        stray_objects=len(stray),
        stray_keys=stray[:5],
        open_multipart_uploads=open_uploads,
    )


def endpoint(port: int, client: str) -> str:
    """Where a client kind uploads: POST /upload, or the tus creation URL."""
    path = "tus/" if designs.protocol(client) == "tus" else "upload"
    return f"http://127.0.0.1:{port}/{path}"


async def warm_up(design: str, client: str, port: int, s: Setup) -> None:
    """One upload of just over a part before measuring, so one-off setup is not charged.

    In the cell's own protocol (tus-node has no /upload; s3proxy's tus path has state of
    its own to warm).
    """
    b, opts = s.backend, s.opts
    size = opts.part_size + 1
    url = endpoint(port, client)
    if designs.protocol(client) == "tus":
        chunk = clients.tus_chunk(client)
        node = s.node_dirs["tus"]
        ups = await clients.tus_job(
            node, design, url, 1, opts.seed, size, chunk, 60, clients.Progress()
        )
    else:
        ups = await clients.run_clients(
            "aiohttp", url, 1, opts.seed, size, None, 60, clients.Progress()
        )
    up = ups[0]
    if not up.ok:
        raise RuntimeError(f"warm-up upload failed: {up.error}")
    async with b.client(opts.region) as s3:
        # In a bucket of our own, also what the design keeps beside the object (@tus/s3-store's
        # .info), so that the cell's stray objects are the cell's own.
        keys = await s3util.list_keys(s3, b.bucket) if b.owned else up.keys
        await s3util.delete_keys(s3, b.bucket, keys)


async def _ready(child: procs.Child, design: str, client: str, port: int, s: Setup) -> None:
    """Wait until the server answers, and warm it up (direct says "ready" on stdout)."""
    if design == "direct":
        assert child.proc is not None and child.proc.stdout is not None
        ready = await asyncio.wait_for(child.proc.stdout.readline(), 60)
        if b"ready" not in ready:
            raise RuntimeError(f"direct did not start; see {child.log_path}")
    else:
        await child.wait_http(f"http://127.0.0.1:{port}/healthz", limit_s=60)
        await warm_up(design, client, port, s)


@dataclass
class _Measured:
    """What the cell's uploads cost, before the objects are checked."""

    uploads: list[clients.Upload]
    wall: float
    idle_rss: int
    usage: procs.Usage  # the server tree's
    store_usage: procs.Usage | None  # the store's, when it is ours
    client_cpu: float
    harness_cpu: float
    busy: float  # all CPUs' busy time


async def _measure(
    child: procs.Child, design: str, client: str, spec: CellSpec, port: int, s: Setup
) -> _Measured:
    """Run the cell's uploads against the ready server, sampling it and the store."""
    opts, bar = s.opts, s.bar
    size, conc, total = spec.size, spec.concurrency, spec.uploads
    # bounded: assumes at least 5 MB/s in aggregate (and 20 small uploads a second)
    timeout = 60 + total * size / 5e6 + total / 20
    progress = clients.Progress()
    # What the server holds at rest once warmed up, so peak - idle is what the cell cost.
    idle_rss = procs.rss_bytes(procs.tree(child.pid))
    server = procs.Sampler(child.pid, opts.sample_interval)
    pid = s.backend.pid
    store = procs.Sampler(pid, opts.sample_interval, whole_tree=False) if pid else None
    wchar0 = procs.io_chars(child.pid)[1]
    if design == "direct":
        bar.cell(child.name, lambda: min(total * size, procs.io_chars(child.pid)[1] - wchar0))
    elif client == "curl":
        bar.cell(child.name, progress.curl_bytes)
    elif designs.protocol(client) == "tus":
        bar.cell(child.name, progress.node_bytes)
    else:
        bar.cell(child.name, lambda: progress.sent)
    server.start()
    if store:
        store.start()
    # The clients' CPU: curl processes are reaped by the time their cell ends, so the
    # harness's RUSAGE_CHILDREN grows by exactly theirs (the server is still running).
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    busy0 = procs.machine_busy_seconds()
    t0 = time.perf_counter()
    if design == "direct":
        assert child.proc is not None
        prefix = f"bench/direct/{uuid.uuid4().hex}/"
        uploads = await clients.direct_job(
            child.proc, conc, opts.seed, size, prefix, timeout, total, spec.body
        )
    elif designs.protocol(client) == "tus":
        uploads = await clients.tus_job(
            s.node_dirs["tus"],
            design,
            endpoint(port, client),
            conc,
            opts.seed,
            size,
            clients.tus_chunk(client),
            timeout,
            progress,
        )
    else:
        uploads = await clients.run_clients(
            client,
            endpoint(port, client),
            conc,
            opts.seed,
            size,
            s.body_files.get((size, spec.body)),
            timeout,
            progress,
            total,
            spec.body,
        )
    wall = time.perf_counter() - t0
    busy = procs.machine_busy_seconds() - busy0
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    usage = await server.stop()
    store_usage = await store.stop() if store else None
    bar.label = f"{child.name} (verifying)"
    return _Measured(
        uploads=uploads,
        wall=wall,
        idle_rss=idle_rss,
        usage=usage,
        store_usage=store_usage,
        client_cpu=kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime,
        harness_cpu=self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime,
        busy=busy,
    )


async def run_cell(s: Setup, design: str, client: str, spec: CellSpec, rep: int) -> CellResult:
    """One design, one client kind, ``spec.concurrency`` uploads of ``spec.size`` bytes at
    once (``spec.uploads`` in all), measured."""
    size, conc = spec.size, spec.concurrency
    port = procs.free_port()
    extra = (f"x{spec.count}" if spec.count else "") + ("-junk" if spec.body == "junk" else "")
    name = f"{design}-{client}-{designs.size_arg(size)}-c{conc}{extra}-r{rep}"
    argv = designs.argv(design, port, s.backend, s.opts, s.node_dirs)
    # s3proxy runs from its snapshot (cwd first on sys.path with -m); the others from the repo
    src = {"s3proxy": s.s3proxy_src, designs.S3PROXY_B: s.s3proxy_b_src or s.s3proxy_src}.get(
        design
    )
    child = procs.Child(
        name,
        argv,
        child_env(s.backend, s.opts.region, src),
        s.log_dir,
        cwd=src or REPO,
        pipes=design == "direct",
    )
    await child.start()
    try:
        await _ready(child, design, client, port, s)
        m = await _measure(child, design, client, spec, port, s)
    finally:
        if design == "direct" and child.proc is not None and child.proc.stdin is not None:
            child.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 10)
        code = await child.stop()
    checks = await verify_and_clean(
        s.backend, s.opts.region, m.uploads, s.opts.seed, size, spec.body
    )
    cell = _result(design, client, spec, rep, m, checks, code, str(child.log_path))
    s.bar.finish_cell(
        spec.uploads * size,
        f"{name:<44} {cell.throughput_mbps or 0.0:7.1f} MB/s"
        f"  rss {m.usage.peak_rss / 2**20:6.0f} MiB  cpu {m.usage.cpu_s:6.2f} s"
        f"  failures {cell.failures}",
    )
    return cell


def _result(
    design: str,
    client: str,
    spec: CellSpec,
    rep: int,
    m: _Measured,
    checks: Checks,
    exit_code: int | None,
    log: str,
) -> CellResult:
    ups = m.uploads
    size, conc = spec.size, spec.concurrency
    ok_bytes = sum(u.size for u in ups if u.ok)
    gib = ok_bytes / 2**30
    latencies = [u.latency for u in ups if u.ok]
    store = m.store_usage
    return CellResult(
        design=design,
        client=client,
        size=size,
        concurrency=conc,
        rep=rep,
        uploads=spec.uploads,
        bytes=ok_bytes,
        wall_s=m.wall,
        throughput_mbps=ok_bytes / m.wall / 1e6 if m.wall > 0 else None,
        latencies_s=latencies,
        latency_p50_s=percentile(latencies, 0.5),
        latency_p95_s=percentile(latencies, 0.95),
        peak_rss_bytes=m.usage.peak_rss,
        idle_rss_bytes=m.idle_rss,
        cpu_s=m.usage.cpu_s,
        cpu_s_per_gib=m.usage.cpu_s / gib if gib else None,
        s3_cpu_s=store.cpu_s if store else None,
        s3_cpu_s_per_gib=store.cpu_s / gib if store and gib else None,
        s3_peak_rss_bytes=store.peak_rss if store else None,
        client_cpu_s=m.client_cpu,
        harness_cpu_s=m.harness_cpu,
        machine_busy_cpu_s=m.busy,
        machine_busy_fraction=m.busy / (m.wall * (os.cpu_count() or 1)) if m.wall > 0 else None,
        disk_write_bytes=m.usage.write_bytes,
        peak_tmp_bytes=m.usage.peak_tmp_bytes,
        peak_tmp_files=m.usage.peak_tmp_files,
        failures=sum(not u.ok for u in ups) + (sum(u.ok for u in ups) - checks.verified),
        errors=[u.error for u in ups if not u.ok][:5],
        size_misreports=sum(bool(u.ok and u.error) for u in ups),
        size_misreport_example=next((u.error for u in ups if u.ok and u.error), ""),
        exit_code=exit_code,
        log=log,
        verified=checks.verified,
        verify_errors=checks.verify_errors,
        stray_objects=checks.stray_objects,
        stray_keys=checks.stray_keys,
        open_multipart_uploads=checks.open_multipart_uploads,
        body=spec.body,
    )
