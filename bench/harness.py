"""Orchestration: the backend, one fresh server per cell, the clients, the checks.

A cell is (size, concurrency, design, client, repetition). Within each (size, concurrency)
the designs run back to back in an order rotated from cell to cell, so that machine noise
(page cache, the store compacting, another process waking up) falls on all of them alike.
Each design's server is started fresh for its cell, so its peak RSS is that cell's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import body, clients, procs, s3util

REPO = Path(__file__).resolve().parent.parent
DESIGNS = ("s3proxy", "direct", "naive-tempfile", "naive-memory", "multer-s3")
CLIENTS = ("curl", "aiohttp")
# The committed, official results; a run writes here only when asked (--out, --update-readme).
RESULTS_DIR = REPO / "bench" / "results"
# Where runs go by default: ignored by git, so a run never overwrites committed results.
RUNS_DIR = REPO / "bench" / "runs"
MULTER_SRC = Path(__file__).resolve().parent / "designs" / "multer"


@dataclass
class Options:
    """Everything one run needs; the CLI fills it in."""

    sizes: list[int]
    concurrency: list[int]
    designs: list[str]
    clients: list[str]
    reps: int = 1
    backend: str = "seaweedfs"  # seaweedfs | moto | external
    endpoint_url: str | None = None
    bucket: str = "uploads"
    region: str = "us-east-1"
    seed: int = 1
    part_size: int = 8 << 20
    parts_in_flight: int = 2
    memory_budget: int = 64 << 20
    sign_payload: bool = False  # s3proxy's default; every design is given the same
    # (size, concurrency) pairs to run; empty: every size with every concurrency
    cells: list[tuple[int, int]] = field(default_factory=list)
    s3proxy_args: list[str] = field(default_factory=list)
    # Which s3proxy to measure: None copies the working tree's s3proxy/ once at the start (so
    # edits made while the run goes on do not change it halfway); a git revision exports that.
    s3proxy_rev: str | None = None
    out: Path = RUNS_DIR
    cache_dir: Path = Path.home() / ".cache" / "s3proxy-bench"
    sample_interval: float = 0.05
    preset: str = "custom"
    command: str = ""


@dataclass
class Backend:
    kind: str
    endpoint_url: str
    bucket: str
    access_key: str | None
    secret_key: str | None
    pid: int | None
    owned: bool  # ours alone: every object in the bucket is the bench's to check and delete
    stop: Callable[[], Awaitable[None]]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _ensure_bucket(b: Backend, region: str) -> None:
    async with s3util.client(b.endpoint_url, region, b.access_key, b.secret_key) as s3:
        try:
            await s3.head_bucket(Bucket=b.bucket)
        except Exception:
            await s3.create_bucket(Bucket=b.bucket)


async def start_backend(opts: Options, workdir: Path, log_dir: Path) -> Backend:
    """Start (or attach to) the S3 store the run uploads into."""
    if opts.backend == "external":
        if not opts.endpoint_url:
            raise SystemExit("--endpoint-url is needed with an external backend")

        async def nothing() -> None:
            return None

        b = Backend(
            "external",
            opts.endpoint_url,
            opts.bucket,
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
            None,
            False,
            nothing,
        )
    elif opts.backend == "moto":
        port = procs.free_port()
        moto_server = Path(sys.executable).parent / "moto_server"
        argv = [
            str(moto_server) if moto_server.exists() else "moto_server",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ]
        child = procs.Child("moto", argv, None, log_dir)
        await child.start()
        await child.wait_http(f"http://127.0.0.1:{port}/", limit_s=60)
        b = Backend(
            "moto",
            f"http://127.0.0.1:{port}",
            opts.bucket,
            "bench",
            "bench-secret",
            child.pid,
            True,
            lambda: _stopped(child),
        )
    else:
        try:
            from s3proxy.embedded import EmbeddedConfig, EmbeddedStore
        except ImportError as e:
            raise SystemExit(
                f"the embedded SeaweedFS store is not available ({e}); try --backend moto"
            ) from e
        store = EmbeddedStore(EmbeddedConfig(data_dir=workdir / "seaweedfs", bucket=opts.bucket))
        await store.start(timeout=90)
        b = Backend(
            "seaweedfs",
            store.endpoint_url,
            store.bucket,
            store.access_key,
            store.secret_key,
            store.pid,
            True,
            store.stop,
        )
    await _ensure_bucket(b, opts.region)
    return b


async def _stopped(child: procs.Child) -> None:
    await child.stop()


def _child_env(b: Backend, region: str, src: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}
    env.update(
        AWS_ACCESS_KEY_ID=b.access_key or "",
        AWS_SECRET_ACCESS_KEY=b.secret_key or "",
        AWS_REGION=region,
        AWS_DEFAULT_REGION=region,
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(src) if src else None, str(REPO), env.get("PYTHONPATH")])
        ),
    )
    return env


def _size_arg(n: int) -> str:
    return f"{n // (1 << 20)}MiB" if n % (1 << 20) == 0 else str(n)


def design_argv(
    design: str, port: int, b: Backend, opts: Options, multer_dir: Path | None
) -> list[str]:
    common = ["--endpoint-url", b.endpoint_url, "--bucket", b.bucket, "--region", opts.region]
    sizing = ["--part-size", str(opts.part_size), "--parts-in-flight", str(opts.parts_in_flight)]
    if opts.sign_payload:
        sizing.append("--sign-payload")
    listen = ["--host", "127.0.0.1", "--port", str(port)]
    py = sys.executable
    if design == "s3proxy":
        return [
            py,
            "-m",
            "s3proxy",
            "serve",
            *listen,
            *common,
            "--memory-budget",
            _size_arg(opts.memory_budget),
            "--part-size",
            _size_arg(opts.part_size),
            "--parts-in-flight",
            str(opts.parts_in_flight),
            "--sign-payload",
            "true" if opts.sign_payload else "false",
            *opts.s3proxy_args,
        ]
    if design == "direct":
        return [py, "-m", "bench.designs.direct", *common, *sizing]
    if design in ("naive-tempfile", "naive-memory"):
        module = "bench.designs." + design.replace("-", "_")
        return [py, "-m", module, *listen, *common, *sizing]
    if design == "multer-s3":
        assert multer_dir is not None
        return ["node", str(multer_dir / "server.js"), *listen, *common]
    raise ValueError(design)


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def snapshot_s3proxy(rev: str | None, dest: Path) -> dict[str, Any]:
    """Copy the s3proxy package to measure into ``dest`` and say which code it is.

    Every s3proxy cell imports it from there, so the whole run measures one version of the
    code even while someone edits the working tree.
    """
    dest.mkdir(parents=True, exist_ok=True)
    head = _git("rev-parse", "--short", "HEAD")
    if rev is not None:
        commit = _git("rev-parse", "--short", f"{rev}^{{commit}}")
        if not commit:
            raise SystemExit(f"--s3proxy-rev {rev}: not a git revision")
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "s3proxy"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return {"rev": rev, "commit": commit, "uncommitted_changes": False}
    shutil.copytree(
        REPO / "s3proxy", dest / "s3proxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    dirty = bool(_git("status", "--porcelain", "--", "s3proxy"))
    return {"rev": "worktree", "commit": head, "uncommitted_changes": dirty}


def prepare_multer(cache_dir: Path) -> tuple[Path | None, str]:
    """npm-install the multer-s3 design into a cache folder outside the repo, once."""
    if not (shutil.which("node") and shutil.which("npm")):
        return None, "multer-s3 skipped: node and npm are not both on PATH"
    src = [MULTER_SRC / "package.json", MULTER_SRC / "server.js"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in src)).hexdigest()[:12]
    target = cache_dir / f"multer-{digest}"
    if (target / "node_modules" / "multer-s3").is_dir():
        return target, ""
    target.mkdir(parents=True, exist_ok=True)
    for p in src:
        shutil.copy(p, target / p.name)
    _log(f"installing multer-s3 into {target} (npm install) ...")
    try:
        r = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=target,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"multer-s3 skipped: npm install failed ({e})"
    if r.returncode != 0:
        return None, f"multer-s3 skipped: npm install failed: {r.stderr.strip()[-300:]}"
    return target, ""


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Bar:
    """A one-line progress bar on stderr (a plain line per cell when stderr is no TTY)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.label = ""
        self.cell_bytes: Callable[[], int] = lambda: 0
        self.cell_t0 = time.perf_counter()
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.tty:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.render()
            await asyncio.sleep(0.25)

    def render(self) -> None:
        cur = self.cell_bytes()
        done = self.done + cur
        frac = min(1.0, done / self.total) if self.total else 1.0
        rate = cur / max(1e-6, time.perf_counter() - self.cell_t0) / 1e6
        el = int(time.perf_counter() - self.t0)
        bar = "#" * int(frac * 24)
        sys.stderr.write(
            f"\r[{bar:<24}] {frac:4.0%} {done / 2**30:6.2f}/{self.total / 2**30:.2f}"
            f" GiB {rate:6.1f} MB/s {el // 60}:{el % 60:02d}  {self.label:<44}"
        )
        sys.stderr.flush()

    def cell(self, label: str, current: Callable[[], int]) -> None:
        self.label = label
        self.cell_bytes = current
        self.cell_t0 = time.perf_counter()

    def finish_cell(self, nbytes: int, line: str) -> None:
        self.done += nbytes
        self.cell_bytes = lambda: 0
        if self.tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
        _log(line)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            sys.stderr.write("\r" + " " * 110 + "\r")


async def verify_and_clean(
    b: Backend, region: str, uploads: list[clients.Upload], seed: int, size: int
) -> dict[str, Any]:
    """Check every reported object against the generated body, then delete everything."""
    expected = body.sha256(seed, size)
    reported = [k for u in uploads for k in u.keys]
    async with s3util.client(b.endpoint_url, region, b.access_key, b.secret_key) as s3:
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
    return {
        "verified": sum(c.ok for c in checks),
        "verify_errors": [f"{c.key}: {c.error}" for c in checks if not c.ok][:5],
        "stray_objects": len(stray),
        "stray_keys": stray[:5],
        "open_multipart_uploads": open_uploads,
    }


async def warm_backend(b: Backend, opts: Options) -> None:
    """Write 32 parts straight into the store first, so no design meets it cold.

    A fresh SeaweedFS allocates volumes on its first writes; whichever design ran first
    would pay for that.
    """
    async with s3util.client(b.endpoint_url, opts.region, b.access_key, b.secret_key) as s3:

        async def one(i: int) -> str:
            key = f"bench/warm-up/{i}.bin"
            parts = s3util.rechunk(body.chunks(opts.seed, 8 * opts.part_size), opts.part_size)
            await s3util.multipart_upload(s3, b.bucket, key, parts, opts.parts_in_flight)
            return key

        keys = await asyncio.gather(*(one(i) for i in range(4)))
        await s3util.delete_keys(s3, b.bucket, keys)


async def warm_up(url: str, b: Backend, opts: Options) -> None:
    """One upload of just over a part before measuring, so one-off setup is not charged."""
    size = opts.part_size + 1
    up = (
        await clients.run_clients("aiohttp", url, 1, opts.seed, size, None, 60, clients.Progress())
    )[0]
    if not up.ok:
        raise RuntimeError(f"warm-up upload failed: {up.error}")
    async with s3util.client(b.endpoint_url, opts.region, b.access_key, b.secret_key) as s3:
        await s3util.delete_keys(s3, b.bucket, up.keys)


async def run_cell(
    design: str,
    client: str,
    size: int,
    conc: int,
    rep: int,
    b: Backend,
    opts: Options,
    body_files: dict[int, Path],
    multer_dir: Path | None,
    bar: Bar,
    log_dir: Path,
    s3proxy_src: Path | None = None,
) -> dict[str, Any]:
    """One design, one client kind, ``conc`` uploads of ``size`` bytes at once, measured."""
    port = procs.free_port()
    name = f"{design}-{client}-{_size_arg(size)}-c{conc}-r{rep}"
    argv = design_argv(design, port, b, opts, multer_dir)
    # s3proxy runs from its snapshot (cwd first on sys.path with -m); the others from the repo
    src = s3proxy_src if design == "s3proxy" else None
    child = procs.Child(
        name,
        argv,
        _child_env(b, opts.region, src),
        log_dir,
        cwd=src or REPO,
        pipes=design == "direct",
    )
    timeout = 60 + conc * size / 5e6  # bounded: assumes at least 5 MB/s in aggregate
    progress = clients.Progress()
    await child.start()
    try:
        if design == "direct":
            assert child.proc is not None and child.proc.stdout is not None
            ready = await asyncio.wait_for(child.proc.stdout.readline(), 60)
            if b"ready" not in ready:
                raise RuntimeError(f"direct did not start; see {child.log_path}")
        else:
            await child.wait_http(f"http://127.0.0.1:{port}/healthz", limit_s=60)
            await warm_up(f"http://127.0.0.1:{port}/upload", b, opts)
        # What the server holds at rest once warmed up, so peak - idle is what the cell cost.
        idle_rss = procs.rss_bytes(procs.tree(child.pid))
        server = procs.Sampler(child.pid, opts.sample_interval)
        store = procs.Sampler(b.pid, opts.sample_interval, whole_tree=False) if b.pid else None
        wchar0 = procs.io_chars(child.pid)[1]
        if design == "direct":
            bar.cell(name, lambda: min(conc * size, procs.io_chars(child.pid)[1] - wchar0))
        elif client == "curl":
            bar.cell(name, progress.curl_bytes)
        else:
            bar.cell(name, lambda: progress.sent)
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
            uploads = await clients.direct_job(child.proc, conc, opts.seed, size, prefix, timeout)
        else:
            uploads = await clients.run_clients(
                client,
                f"http://127.0.0.1:{port}/upload",
                conc,
                opts.seed,
                size,
                body_files.get(size),
                timeout,
                progress,
            )
        wall = time.perf_counter() - t0
        busy = procs.machine_busy_seconds() - busy0
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
        harness_cpu = self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
        usage = await server.stop()
        store_usage = await store.stop() if store else None
        bar.label = f"{name} (verifying)"
    finally:
        if design == "direct" and child.proc is not None and child.proc.stdin is not None:
            child.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 10)
        code = await child.stop()
    checks = await verify_and_clean(b, opts.region, uploads, opts.seed, size)
    ok_bytes = sum(u.size for u in uploads if u.ok)
    gib = ok_bytes / 2**30
    latencies = [u.latency for u in uploads if u.ok]
    failures = sum(not u.ok for u in uploads) + (sum(u.ok for u in uploads) - checks["verified"])
    cell = {
        "design": design,
        "client": client,
        "size": size,
        "concurrency": conc,
        "rep": rep,
        "uploads": conc,
        "bytes": ok_bytes,
        "wall_s": wall,
        "throughput_mbps": ok_bytes / wall / 1e6 if wall > 0 else None,
        "latencies_s": latencies,
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p95_s": _percentile(latencies, 0.95),
        "peak_rss_bytes": usage.peak_rss,
        "idle_rss_bytes": idle_rss,
        "cpu_s": usage.cpu_s,
        "cpu_s_per_gib": usage.cpu_s / gib if gib else None,
        "s3_cpu_s": store_usage.cpu_s if store_usage else None,
        "s3_cpu_s_per_gib": store_usage.cpu_s / gib if store_usage and gib else None,
        "s3_peak_rss_bytes": store_usage.peak_rss if store_usage else None,
        # where the machine's CPU went during the cell: the server, the store, the clients
        # (curl; direct has none apart from itself), the harness, and all CPUs' busy time
        "client_cpu_s": client_cpu,
        "harness_cpu_s": harness_cpu,
        "machine_busy_cpu_s": busy,
        "machine_busy_fraction": busy / (wall * (os.cpu_count() or 1)) if wall > 0 else None,
        "disk_write_bytes": usage.write_bytes,
        "peak_tmp_bytes": usage.peak_tmp_bytes,
        "peak_tmp_files": usage.peak_tmp_files,
        "failures": failures,
        "errors": [u.error for u in uploads if not u.ok][:5],
        "size_misreports": sum(bool(u.ok and u.error) for u in uploads),
        "size_misreport_example": next((u.error for u in uploads if u.ok and u.error), ""),
        "exit_code": code,
        "log": str(child.log_path),
        **checks,
    }
    mbps = cell["throughput_mbps"] or 0.0
    bar.finish_cell(
        conc * size,
        f"{name:<44} {mbps:7.1f} MB/s  rss {usage.peak_rss / 2**20:6.0f}"
        f" MiB  cpu {usage.cpu_s:6.2f} s  failures {failures}",
    )
    return cell


def failed_cell(
    design: str, client: str, size: int, conc: int, rep: int, e: Exception
) -> dict[str, Any]:
    """The record of a cell that could not run at all (every upload counts as failed)."""
    return {
        "design": design,
        "client": client,
        "size": size,
        "concurrency": conc,
        "rep": rep,
        "uploads": conc,
        "bytes": 0,
        "wall_s": 0.0,
        "throughput_mbps": None,
        "latencies_s": [],
        "latency_p50_s": None,
        "latency_p95_s": None,
        "peak_rss_bytes": 0,
        "idle_rss_bytes": 0,
        "cpu_s": 0.0,
        "cpu_s_per_gib": None,
        "s3_cpu_s": None,
        "s3_cpu_s_per_gib": None,
        "s3_peak_rss_bytes": None,
        "disk_write_bytes": 0,
        "peak_tmp_bytes": 0,
        "peak_tmp_files": 0,
        "failures": conc,
        "errors": [f"{type(e).__name__}: {e}"],
        "size_misreports": 0,
        "size_misreport_example": "",
        "exit_code": None,
        "log": "",
        "verified": 0,
        "verify_errors": [],
        "stray_objects": 0,
        "stray_keys": [],
        "open_multipart_uploads": 0,
    }


async def run(opts: Options) -> dict[str, Any]:
    """Run the whole matrix and return the raw results (report.py summarizes them)."""
    started = time.time()
    load0 = os.getloadavg()
    opts.out.mkdir(parents=True, exist_ok=True)
    log_dir = opts.out / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # logs of this run only
    notes: list[str] = []
    designs = list(opts.designs)
    if "s3proxy" in designs and not (REPO / "s3proxy" / "cli.py").exists():
        designs.remove("s3proxy")
        notes.append("s3proxy skipped: s3proxy/cli.py does not exist yet")
    multer_dir = None
    if "multer-s3" in designs:
        multer_dir, note = await asyncio.to_thread(prepare_multer, opts.cache_dir)
        if multer_dir is None:
            designs.remove("multer-s3")
            notes.append(note)
    for n in notes:
        _log(n)
    workdir = Path(tempfile.mkdtemp(prefix="s3proxy-bench-"))
    s3proxy_src = workdir / "s3proxy-src"
    source: dict[str, Any] = {}
    if "s3proxy" in designs:
        source = await asyncio.to_thread(snapshot_s3proxy, opts.s3proxy_rev, s3proxy_src)
        _log(
            f"s3proxy from {source['rev']} ({source['commit']}"
            + (", with uncommitted changes)" if source["uncommitted_changes"] else ")")
        )
    # curl's body files live in RAM when they can, so the client side writes no disk.
    shm = "/dev/shm"
    body_dir = Path(
        tempfile.mkdtemp(
            prefix="s3proxy-bench-bodies-", dir=shm if os.access(shm, os.W_OK) else None
        )
    )
    body_files: dict[int, Path] = {}
    runs: list[dict[str, Any]] = []
    pairs = [(d, c) for d in designs for c in (["builtin"] if d == "direct" else opts.clients)]
    cells = opts.cells or [(s, c) for s in opts.sizes for c in opts.concurrency]
    total = sum(s * c for s, c in cells) * len(pairs) * opts.reps
    bar = Bar(total)
    b: Backend | None = None
    try:
        for size in sorted({s for s, _ in cells}):
            await asyncio.to_thread(body.sha256, opts.seed, size)
            if "curl" in opts.clients:
                body_files[size] = await asyncio.to_thread(
                    body.write_file, opts.seed, size, body_dir / f"body-{size}.bin"
                )
        _log(f"starting the {opts.backend} backend ...")
        b = await start_backend(opts, workdir, log_dir)
        _log(
            f"backend {b.kind} at {b.endpoint_url} bucket {b.bucket}; "
            f"{len(cells) * len(pairs) * opts.reps} cells, {total / 2**30:.2f} GiB to upload"
        )
        await warm_backend(b, opts)
        bar.start()
        for rep in range(opts.reps):
            for i, (size, conc) in enumerate(cells):
                k = (i + rep) % len(pairs)
                for design, client in pairs[k:] + pairs[:k]:
                    try:
                        cell = await run_cell(
                            design,
                            client,
                            size,
                            conc,
                            rep,
                            b,
                            opts,
                            body_files,
                            multer_dir,
                            bar,
                            log_dir,
                            s3proxy_src,
                        )
                    except Exception as e:  # one broken cell must not lose the whole run
                        cell = failed_cell(design, client, size, conc, rep, e)
                        bar.finish_cell(conc * size, f"{design}-{client}: FAILED {e}")
                        with contextlib.suppress(Exception):
                            await verify_and_clean(b, opts.region, [], opts.seed, size)
                    runs.append(cell)
    finally:
        await bar.stop()
        if b is not None:
            await b.stop()
        shutil.rmtree(body_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "command": opts.command,
        "preset": opts.preset,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": time.time() - started,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "backend": opts.backend if b is None else b.kind,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "designs": designs,
        "s3proxy_source": source,
        "notes": notes,
    }
    return {"meta": meta, "runs": runs}
