"""Comparison designs: what s3proxy is measured against, not part of the package.

This module is their catalogue: the names, and how each is started as a server (``argv``).
The designs themselves are the modules beside it (and multer/ and tus/, Node.js servers). Starting
one imports this module too, so it imports nothing heavy.

Designs speak one or both upload protocols: ``form`` (POST /upload, multipart/form-data, the
curl and aiohttp clients) and ``tus`` (tus 1.0.0 at /tus/, the tus-js-client clients); direct
has its own built-in client. A cell runs only a design with a client that speaks its protocol.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.progress import log

if TYPE_CHECKING:
    from bench.backends import Backend
    from bench.options import Options

DESIGNS = ("s3proxy", "direct", "naive-tempfile", "naive-memory", "multer-s3", "tus-node")
# The designs that take POST /upload: what the form matrices (full, readme, quick) compare.
FORM_DESIGNS = DESIGNS[:5]
# The floor (bench/designs/floor.py): the least a relay can spend; the report gives every
# design's CPU per GiB as a ratio of it. Every named matrix runs it.
FLOOR = "floor"
# s3proxy once more with other flags (--s3proxy-b-args), for an A/B in the same run.
S3PROXY_B = "s3proxy-b"
ALL = (*DESIGNS, FLOOR)
FORM_ALL = (*FORM_DESIGNS, FLOOR)  # the form matrices' designs
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "s3proxy": ("form", "tus"),
    S3PROXY_B: ("form", "tus"),
    FLOOR: ("form",),
    "direct": ("builtin",),
    "naive-tempfile": ("form",),
    "naive-memory": ("form",),
    "multer-s3": ("form",),
    "tus-node": ("tus",),
}
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class NodePackage:
    """A Node.js folder of the bench: its sources, and the npm package that shows it installed."""

    name: str
    files: tuple[str, ...]
    marker: str  # node_modules/<marker> exists once npm install has run


NODE = {
    "multer-s3": NodePackage("multer", ("package.json", "server.js"), "multer-s3"),
    # tus-node's server and the tus clients (tus-js-client) share one install
    "tus": NodePackage("tus", ("package.json", "server.mjs", "client.mjs"), "tus-js-client"),
}

NODE_OF = {"multer-s3": "multer-s3", "tus-node": "tus"}  # the designs that run from NODE


def node_packages(design_names: list[str], client_names: list[str]) -> list[str]:
    """The NODE entries a run needs: multer-s3's, and tus's for tus-node or a tus client."""
    need = [NODE_OF[d] for d in design_names if d in NODE_OF]
    if any(protocol(c) == "tus" for c in client_names) and "tus" not in need:
        need.append("tus")
    return need


def protocol(client: str) -> str:
    """What a client kind speaks: ``form`` (curl, aiohttp), ``tus`` (tus, tus:SIZE)."""
    if client == "builtin":
        return "builtin"
    return "tus" if client == "tus" or client.startswith("tus:") else "form"


def pairs(
    design_names: list[str], client_names: list[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """The (design, client) pairs a run measures, and a note for each design left without one."""
    out: list[tuple[str, str]] = []
    notes = []
    for d in design_names:
        if d == "direct":
            out.append((d, "builtin"))
            continue
        mine = [(d, c) for c in client_names if protocol(c) in PROTOCOLS[d]]
        if not mine:
            notes.append(f"{d} skipped: no client given speaks {' or '.join(PROTOCOLS[d])}")
        out += mine
    return out, notes


def size_arg(n: int) -> str:
    """``n`` bytes as a size flag: 8MiB, or the plain number."""
    return f"{n // (1 << 20)}MiB" if n % (1 << 20) == 0 else str(n)


def argv(
    design: str, port: int, b: Backend, opts: Options, node_dirs: Mapping[str, Path]
) -> list[str]:
    """The command that starts ``design`` listening on ``port`` and uploading into ``b``."""
    common = ["--endpoint-url", b.endpoint_url, "--bucket", b.bucket, "--region", opts.region]
    sizing = ["--part-size", str(opts.part_size), "--parts-in-flight", str(opts.parts_in_flight)]
    if opts.sign_payload:
        sizing.append("--sign-payload")
    listen = ["--host", "127.0.0.1", "--port", str(port)]
    py = sys.executable
    if design in ("s3proxy", S3PROXY_B):
        flags = opts.s3proxy_args
        if design == S3PROXY_B and opts.s3proxy_b_args is not None:
            flags = opts.s3proxy_b_args
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
        return ["node", str(node_dirs["multer-s3"] / "server.js"), *listen, *common]
    if design == "tus-node":
        part = ["--part-size", str(opts.part_size)]
        return ["node", str(node_dirs["tus"] / "server.mjs"), *listen, *common, *part]
    raise ValueError(design)


def prepare_node(which: str, cache_dir: Path) -> tuple[Path | None, str]:
    """npm-install one of the NODE folders into a cache folder outside the repo, once.

    Returns the folder, or None and the note that says why what needs it is skipped.
    """
    pkg = NODE[which]
    if not (shutil.which("node") and shutil.which("npm")):
        return None, f"{which} skipped: node and npm are not both on PATH"
    src = [HERE / pkg.name / f for f in pkg.files]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in src)).hexdigest()[:12]
    target = cache_dir / f"{pkg.name}-{digest}"
    if (target / "node_modules" / pkg.marker).is_dir():
        return target, ""
    target.mkdir(parents=True, exist_ok=True)
    for p in src:
        shutil.copy(p, target / p.name)
    log(f"installing {which} into {target} (npm install) ...")
    try:
        r = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=target,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{which} skipped: npm install failed ({e})"
    if r.returncode != 0:
        return None, f"{which} skipped: npm install failed: {r.stderr.strip()[-300:]}"
    return target, ""
