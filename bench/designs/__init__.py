"""Comparison designs: what s3proxy is measured against, not part of the package.

This module is their catalogue: the names, and how each is started as a server (``argv``).
The designs themselves are the modules beside it (and multer/, a Node.js server). Starting one
imports this module too, so it imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bench.progress import log

if TYPE_CHECKING:
    from bench.backends import Backend
    from bench.options import Options

DESIGNS = ("s3proxy", "direct", "naive-tempfile", "naive-memory", "multer-s3")
# The floor (bench/designs/floor.py): the least a relay can spend; the report gives every
# design's CPU per GiB as a ratio of it. Every named matrix runs it.
FLOOR = "floor"
# s3proxy once more with other flags (--s3proxy-b-args), for an A/B in the same run.
S3PROXY_B = "s3proxy-b"
ALL = (*DESIGNS, FLOOR)
MULTER_SRC = Path(__file__).resolve().parent / "multer"


def size_arg(n: int) -> str:
    """``n`` bytes as a size flag: 8MiB, or the plain number."""
    return f"{n // (1 << 20)}MiB" if n % (1 << 20) == 0 else str(n)


def argv(design: str, port: int, b: Backend, opts: Options, multer_dir: Path | None) -> list[str]:
    """The command that starts ``design`` listening on ``port`` and uploading into ``b``."""
    common = ["--endpoint-url", b.endpoint_url, "--bucket", b.bucket, "--region", opts.region]
    sizing = ["--part-size", str(opts.part_size), "--parts-in-flight", str(opts.parts_in_flight)]
    if opts.sign_payload:
        sizing.append("--sign-payload")
    listen = ["--host", "127.0.0.1", "--port", str(port)]
    py = sys.executable
    if design in ("s3proxy", S3PROXY_B):
        flags = opts.s3proxy_args if design == "s3proxy" else opts.s3proxy_b_args or []
        return [
            py,
            "-m",
            "s3proxy",
            "serve",
            *listen,
            *common,
            "--memory-budget",
            size_arg(opts.memory_budget),
            "--part-size",
            size_arg(opts.part_size),
            "--parts-in-flight",
            str(opts.parts_in_flight),
            "--sign-payload",
            "true" if opts.sign_payload else "false",
            *flags,
        ]
    if design == "direct":
        return [py, "-m", "bench.designs.direct", *common, *sizing]
    if design == FLOOR:
        return [py, "-m", "bench.designs.floor", *listen, *common]
    if design in ("naive-tempfile", "naive-memory"):
        module = "bench.designs." + design.replace("-", "_")
        return [py, "-m", module, *listen, *common, *sizing]
    if design == "multer-s3":
        assert multer_dir is not None
        return ["node", str(multer_dir / "server.js"), *listen, *common]
    raise ValueError(design)


def prepare_multer(cache_dir: Path) -> tuple[Path | None, str]:
    """npm-install the multer-s3 design into a cache folder outside the repo, once.

    Returns the folder, or None and the note that says why the design is skipped.
    """
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
    log(f"installing multer-s3 into {target} (npm install) ...")
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
