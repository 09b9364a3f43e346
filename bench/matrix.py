"""Running the whole matrix: set up once (bodies, the store, the designs), every cell, tear down.

Within each (size, concurrency) the designs run back to back in an order rotated from cell
to cell, so that machine noise (page cache, the store compacting, another process waking up)
falls on all of them alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import body, designs
from bench.backends import Backend, start_backend, warm_backend
from bench.cells import Setup, run_cell, verify_and_clean
from bench.options import REPO, CellSpec, Options
from bench.progress import Bar, log
from bench.result import CellResult, RunResult
from bench.snapshot import snapshot_s3proxy


async def reclaim(b: Backend) -> None:
    """Let the store take back what the last cell deleted, outside any measurement; a
    failure is logged, not fatal (the run goes on, and may meet a full store later)."""
    if b.reclaim is None:
        return
    t = time.monotonic()
    try:
        await b.reclaim()
    except Exception as e:
        log(f"reclaiming the store's deleted space failed: {e}")
    else:
        log(f"store space reclaimed in {time.monotonic() - t:.1f} s")


async def run(opts: Options) -> RunResult:
    """Run the whole matrix and return the raw results (report.py summarizes them)."""
    started = time.time()
    load0 = os.getloadavg()
    opts.out.mkdir(parents=True, exist_ok=True)
    log_dir = opts.out / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # logs of this run only
    notes: list[str] = []
    names = list(opts.designs)
    wants_b = opts.s3proxy_b_args is not None or opts.s3proxy_b_rev is not None
    if wants_b and designs.S3PROXY_B not in names:
        names.insert(names.index("s3proxy") + 1 if "s3proxy" in names else 0, designs.S3PROXY_B)
    if "s3proxy" in names and not (REPO / "s3proxy" / "cli.py").exists():
        names.remove("s3proxy")
        notes.append("s3proxy skipped: s3proxy/cli.py does not exist yet")
    node_dirs: dict[str, Path] = {}
    client_names = list(opts.clients)
    for which in designs.node_packages(names, client_names):
        folder, note = await asyncio.to_thread(designs.prepare_node, which, opts.cache_dir)
        if folder is None:
            # without it: the design it holds, and (tus) every tus client
            names = [d for d in names if designs.NODE_OF.get(d) != which]
            if which == "tus":
                client_names = [c for c in client_names if designs.protocol(c) != "tus"]
            notes.append(note)
        else:
            node_dirs[which] = folder
    pairs, skipped = designs.pairs(names, client_names)
    notes += skipped
    names = [d for d in names if any(d == pd for pd, _ in pairs)]
    for n in notes:
        log(n)
    workdir = Path(tempfile.mkdtemp(prefix="s3proxy-bench-"))
    s3proxy_src = workdir / "s3proxy-src"
    source: dict[str, Any] = {}
    b_source: dict[str, Any] = {}
    s3proxy_b_src = s3proxy_src
    if opts.s3proxy_b_rev is not None and designs.S3PROXY_B in names:
        s3proxy_b_src = workdir / "s3proxy-b-src"
        b_source = await asyncio.to_thread(snapshot_s3proxy, opts.s3proxy_b_rev, s3proxy_b_src)
        log(f"s3proxy-b from {b_source['rev']} ({b_source['commit']})")
    if "s3proxy" in names or designs.S3PROXY_B in names:
        source = await asyncio.to_thread(snapshot_s3proxy, opts.s3proxy_rev, s3proxy_src)
        log(
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
    body_files: dict[tuple[int, str], Path] = {}
    runs: list[CellResult] = []
    grid = opts.cells or [(s, c) for s in opts.sizes for c in opts.concurrency]
    cells = opts.specs or [CellSpec(s, c) for s, c in grid]
    total = sum(c.size * c.uploads for c in cells) * len(pairs) * opts.reps
    bar = Bar(total)
    b: Backend | None = None
    try:
        for size, kind in sorted({(c.size, c.body) for c in cells}):
            await asyncio.to_thread(body.sha256, opts.seed, size, kind)
            if "curl" in opts.clients:
                body_files[size, kind] = await asyncio.to_thread(
                    body.write_file, opts.seed, size, body_dir / f"body-{size}-{kind}.bin", kind
                )
        log(f"starting the {opts.backend} backend ...")
        b = await start_backend(opts, workdir, log_dir)
        log(
            f"backend {b.kind} at {b.endpoint_url} bucket {b.bucket}; "
            f"{len(cells) * len(pairs) * opts.reps} cells, {total / 2**30:.2f} GiB to upload"
        )
        await warm_backend(b, opts)
        setup = Setup(b, opts, bar, log_dir, body_files, node_dirs, s3proxy_src, s3proxy_b_src)
        bar.start()
        for rep in range(opts.reps):
            for i, spec in enumerate(cells):
                k = (i + rep) % len(pairs)
                for design, client in pairs[k:] + pairs[:k]:
                    try:
                        cell = await run_cell(setup, design, client, spec, rep)
                    except Exception as e:  # one broken cell must not lose the whole run
                        cell = CellResult.failed(
                            design, client, spec.size, spec.concurrency, rep, e
                        )
                        cell.uploads = cell.failures = spec.uploads
                        cell.body = spec.body
                        bar.finish_cell(spec.uploads * spec.size, f"{design}-{client}: FAILED {e}")
                        with contextlib.suppress(Exception):
                            await verify_and_clean(b, opts.region, [], opts.seed, spec.size)
                    runs.append(cell)
                    await reclaim(b)
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
        "designs": names,
        "s3proxy_source": source,
        "s3proxy_b_source": b_source,
        "notes": notes,
    }
    return RunResult(meta, runs)
