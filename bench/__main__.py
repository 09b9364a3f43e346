"""``python -m bench``: measure s3proxy against the comparison designs.

Matrices (``--matrix NAME``): ``full``, the default (64 MiB, 256 MiB, 1 GiB x 1, 4, 16, 64
uploads); ``readme``, the official results in bench/README.md (64 MiB x 1, 4, 16, 64, 256 MiB x
1, 4, 16, 1 GiB x 1, 4, a 256 MiB file of multipart junk, 1,000 x 100 KiB 16 at a time;
s3proxy with --memory-budget 64MiB --part-size 8MiB --parts-in-flight 2); ``quick``
(``--quick``, about two minutes on 2 cores); ``smoke`` (``--smoke``, tiny, moto, for CI);
``tus`` (resumable uploads: s3proxy over tus and @tus/server + @tus/s3-store with
tus-js-client, in one PATCH per file and in 50 MiB PATCHes, against s3proxy's /upload with
curl, at 1 GiB x 1 and 256 MiB x 16); ``tus-smoke`` (the same designs and clients, tiny,
moto). Other flags given with a matrix override its values.

``python -m bench load --target URL ...`` load-tests a running deployment instead
(``python -m bench load --help``; bench/load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
from pathlib import Path

from bench import clients, designs, load_config, matrix, report
from bench.options import RESULTS_DIR, RUNS_DIR, CellSpec, Options
from bench.result import RunResult

PRESETS: dict[str, dict[str, object]] = {
    "full": {
        "sizes": "64MiB,256MiB,1GiB",
        "concurrency": "1,4,16,64",
        "designs": ",".join(designs.FORM_ALL),
        "clients": "curl",
        "backend": "seaweedfs",
    },
    # The README's official matrix: every (size, concurrency) pair listed, not a cross product
    # (64 x 1 GiB would take an hour per design on 2 cores).
    "readme": {
        "cells": "64MiB:1,64MiB:4,64MiB:16,64MiB:64,256MiB:1,256MiB:4,256MiB:16,1GiB:1,1GiB:4",
        # after them, issue 15's: a file of multipart junk, 1,000 small files 16 at a time
        "extra_cells": "256MiB:1:junk,100KiB:16x1000",
        "designs": ",".join(designs.FORM_ALL),
        "clients": "curl",
        "backend": "seaweedfs",
        "part_size": "8MiB",
        "parts_in_flight": "2",
        "memory_budget": "64MiB",
    },
    # About two minutes on 2 cores: 32 MiB files (four 8 MiB parts) keep concurrency 16,
    # where the designs' memory differs most, within budget.
    "quick": {
        "sizes": "32MiB",
        "concurrency": "1,4,16",
        "designs": ",".join(designs.FORM_ALL),
        "clients": "curl",
        "backend": "seaweedfs",
    },
    # Tiny bodies, but 6 MiB with 5 MiB parts still takes the multipart path (moto enforces
    # the 5 MiB minimum part size, as S3 does).
    "smoke": {
        "sizes": "1MiB,6MiB",
        "concurrency": "1,2",
        "designs": "s3proxy,direct,naive-tempfile,naive-memory",
        "clients": "curl,aiohttp",
        "backend": "moto",
        "part_size": "5MiB",
        "memory_budget": "32MiB",
    },
    # Resumable uploads (issue 13): every tus design with tus-js-client, one PATCH per file and
    # 50 MiB PATCHes, and s3proxy's /upload with curl as the yardstick.
    "tus": {
        "cells": "1GiB:1,256MiB:16",
        "designs": "s3proxy,tus-node",
        "clients": "curl,tus,tus:50MiB",
        "backend": "seaweedfs",
        "part_size": "8MiB",
        "parts_in_flight": "2",
        "memory_budget": "64MiB",
    },
    # The same pairs, tiny, on moto: 6 MiB in 5 MiB PATCHes is two PATCHes, one short.
    "tus-smoke": {
        "sizes": "6MiB",
        "concurrency": "1,2",
        "designs": "s3proxy,tus-node",
        "clients": "curl,tus,tus:5MiB",
        "backend": "moto",
        "part_size": "5MiB",
        "memory_budget": "32MiB",
    },
}


def parse_size(text: str) -> int:
    """``bench.load_config.parse_size`` (one size syntax for both commands), for argparse."""
    try:
        return load_config.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# Issue #15's small-files cell: 1,000 uploads of 100 KiB, 16 at a time.
SMALL_FILES = "100KiB:16x1000"


def parse_cell(text: str) -> CellSpec:
    """``SIZE:CONC[xCOUNT][:junk]``: ``256MiB:4``, ``100KiB:16x1000`` (1,000 uploads, 16 at a
    time), ``1GiB:1:junk`` (a file of multipart junk, bench/body.py)."""
    size, _, rest = text.strip().partition(":")
    conc, _, kind = rest.partition(":")
    conc, _, count = conc.partition("x")
    try:
        spec = CellSpec(parse_size(size), int(conc), int(count or 0), kind or "random")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a cell: {text!r} (SIZE:CONC[xCOUNT][:junk])"
        ) from None
    if spec.body not in ("random", "junk") or spec.concurrency < 1 or spec.count < 0:
        raise argparse.ArgumentTypeError(f"not a cell: {text!r} (SIZE:CONC[xCOUNT][:junk])")
    return spec


def _list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if allowed is not None and (bad := [x for x in items if x not in allowed]):
        raise SystemExit(f"unknown: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def _clients(text: str) -> list[str]:
    """--clients: kinds from clients.KINDS, and tus:SIZE (PATCHes of SIZE bytes)."""
    try:
        return list(dict.fromkeys(clients.parse_client(x) for x in _list(text)))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument(
        "--matrix",
        choices=tuple(PRESETS),
        help="a named matrix: full (default), readme (the official results), quick, smoke,"
        " tus (resumable uploads), tus-smoke",
    )
    preset.add_argument(
        "--quick", action="store_true", help="--matrix quick: 32 MiB x 1,4,16, all designs"
    )
    preset.add_argument("--smoke", action="store_true", help="--matrix smoke: tiny, moto, CI")
    p.add_argument("--sizes", help="comma-separated file sizes, e.g. 64MiB,256MiB,1GiB")
    p.add_argument("--concurrency", help="comma-separated concurrent uploads, e.g. 1,4,16,64")
    p.add_argument(
        "--cells",
        help="comma-separated cells SIZE:CONC[xCOUNT][:junk] to run instead of a matrix's:"
        " 256MiB:4 (4 uploads at once), 100KiB:16x1000 (1,000 uploads, 16 at a time),"
        " 1GiB:1:junk (a file of multipart junk: CRLF runs, near-boundaries, dash runs)",
    )
    p.add_argument(
        "--small-files",
        action="store_true",
        help=f"run the small-files cell, {SMALL_FILES} (after --cells' if any): requests/s"
        " and CPU per request",
    )
    p.add_argument("--reps", type=int, help="repetitions of every cell (default 1)")
    p.add_argument("--designs", help=f"comma-separated, from {','.join(designs.ALL)}")
    p.add_argument(
        "--clients",
        help=f"comma-separated, from {','.join(clients.KINDS)} (default curl); tus sends a file"
        " in one PATCH, tus:50MiB in PATCHes of 50 MiB",
    )
    p.add_argument(
        "--backend",
        choices=("seaweedfs", "moto", "external"),
        help="S3 store: embedded SeaweedFS (default), moto, or --endpoint-url",
    )
    p.add_argument(
        "--endpoint-url",
        help="an external S3 endpoint (implies --backend external);"
        " credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    )
    p.add_argument("--bucket", help="bucket (default uploads)")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated bodies")
    p.add_argument("--part-size", type=parse_size, help="part size for every design (8MiB)")
    p.add_argument("--parts-in-flight", type=int, help="parts in flight per upload (2)")
    p.add_argument("--memory-budget", type=parse_size, help="s3proxy --memory-budget (64MiB)")
    p.add_argument(
        "--sign-payload",
        action="store_true",
        help="sha256-sign every part in every design (default: UNSIGNED-PAYLOAD, as s3proxy)",
    )
    p.add_argument("--s3proxy-args", default="", help="extra flags for `s3proxy serve`")
    p.add_argument(
        "--s3proxy-b-args",
        help="also run s3proxy as the design s3proxy-b with these flags instead of"
        " --s3proxy-args: an A/B in the same run (e.g. '--event-loop uvloop')",
    )
    p.add_argument(
        "--s3proxy-b-rev",
        help="also run s3proxy-b from this git revision (with --s3proxy-args unless"
        " --s3proxy-b-args is given): a before/after of the code in the same run",
    )
    p.add_argument(
        "--s3proxy-rev",
        help="measure s3proxy as of this git revision (e.g. HEAD); default: a copy of the"
        " working tree's s3proxy/ taken at the start",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where latest.json, latest.png and latest.md go (default bench/runs/, untracked;"
        " bench/results/, the committed results, with --update-readme)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Options.cache_dir,
        help="npm packages of the Node.js designs and the tus client (outside the repo)",
    )
    p.add_argument(
        "--update-readme",
        action="store_true",
        help="rewrite the results section of bench/README.md",
    )
    return p


def out_dir(out: Path | None, update_readme: bool) -> Path:
    """Where a run writes: an explicit ``--out``, else the untracked bench/runs/.

    The committed results in bench/results/ are written only when asked for: by ``--out``, or
    by ``--update-readme``, whose README section links the plot there.
    """
    if out is not None:
        return out
    return RESULTS_DIR if update_readme else RUNS_DIR


def options(argv: list[str]) -> tuple[Options, bool]:
    args = parser().parse_args(argv)
    name = args.matrix or ("quick" if args.quick else "smoke" if args.smoke else "full")
    pre = PRESETS[name]

    def pick(flag: str) -> str:
        value = getattr(args, flag)
        return str(value if value is not None else pre.get(flag, ""))

    backend = "external" if args.endpoint_url else (args.backend or str(pre["backend"]))
    size_opt = args.part_size or parse_size(str(pre.get("part_size", "8MiB")))
    budget = args.memory_budget or parse_size(str(pre.get("memory_budget", "64MiB")))
    # A matrix of listed (size, concurrency) pairs; --sizes or --concurrency make it a cross
    # product again, of the given values and the listed ones.
    pairs = [
        (parse_size(a), int(b))
        for a, _, b in (x.partition(":") for x in _list(str(pre.get("cells", ""))))
    ]
    listed_sizes = sorted({s for s, _ in pairs})
    listed_conc = sorted({c for _, c in pairs})
    if args.sizes is not None or args.concurrency is not None:
        pairs = []
    sizes = [parse_size(s) for s in _list(pick("sizes"))] if args.sizes or not listed_sizes else []
    concurrency = (
        [int(c) for c in _list(pick("concurrency"))] if args.concurrency or not listed_conc else []
    )
    cell_specs = specs(args.cells, args.small_files)
    if not cell_specs and pairs and pre.get("extra_cells"):
        # the matrix's own grid, then its cells beyond the grid (a junk body, many files)
        cell_specs = [CellSpec(size, conc) for size, conc in pairs]
        cell_specs += specs(str(pre["extra_cells"]), False)
    sizes = sizes or listed_sizes
    concurrency = concurrency or listed_conc
    opts = Options(
        sizes=sizes,
        concurrency=concurrency,
        cells=pairs,
        designs=_list(pick("designs"), designs.ALL),
        clients=_clients(pick("clients")),
        reps=args.reps or 1,
        backend=backend,
        endpoint_url=args.endpoint_url,
        bucket=args.bucket or "uploads",
        region=args.region,
        seed=args.seed,
        part_size=size_opt,
        parts_in_flight=args.parts_in_flight or int(str(pre.get("parts_in_flight", "2"))),
        memory_budget=budget,
        sign_payload=args.sign_payload,
        s3proxy_args=shlex.split(args.s3proxy_args),
        s3proxy_rev=args.s3proxy_rev,
        out=out_dir(args.out, args.update_readme),
        cache_dir=args.cache_dir,
        preset=name,
        command="python -m bench " + shlex.join(argv),
        specs=cell_specs,
        s3proxy_b_args=None if args.s3proxy_b_args is None else shlex.split(args.s3proxy_b_args),
        s3proxy_b_rev=args.s3proxy_b_rev,
    )
    if not opts.sizes or not opts.concurrency or not opts.designs or not opts.clients:
        raise SystemExit("sizes, concurrency, designs and clients must not be empty")
    return opts, args.update_readme


def specs(cells: str | None, small_files: bool) -> list[CellSpec]:
    """The cells given as specs (they replace the matrix's grid); ``--small-files`` adds
    its cell after them."""
    out = [parse_cell(c) for c in _list(cells or "")]
    if small_files:
        out.append(parse_cell(SMALL_FILES))
    return out


async def _run_until_signalled(opts: Options) -> RunResult:
    """Run; SIGTERM or SIGINT cancel the run so that every child and the store are stopped.

    (A background job's SIGINT is ignored and SIGTERM would kill Python outright, leaving the
    store and the current server running.)
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await matrix.run(opts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["load"]:
        from bench import load  # only the load test needs its modules

        return load.main(args[1:])
    opts, update_readme = options(args)
    run = asyncio.run(_run_until_signalled(opts))
    rep = report.publish(run, opts.out, update_readme)
    failures = sum(c["failures"] for c in rep.cells)
    return 1 if failures or not rep.cells else 0


if __name__ == "__main__":
    sys.exit(main())
