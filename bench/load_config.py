"""What one load test does: ``LoadConfig``, the parsers of its flags, and the CLI's flags.

Everything here is pure: sizes (``64MiB``), durations (``5m``), rates (``20/s``), the size
mix (``--sizes 1MiB,20MiB --mix 70,30``) are parsed into numbers, validated once, and the
runner (``bench.load``) gets a frozen config. The scale-out test builds a ``LoadConfig``
directly and calls ``bench.load.run_load``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}
DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
RATE_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 1 / 60, "min": 1 / 60, "h": 1 / 3600}
ARRIVALS = ("poisson", "fixed")


def parse_size(text: str) -> int:
    """``64MiB`` -> 67108864; binary (KiB, MiB, GiB, or K/M/G) and decimal (KB, MB, GB) units."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (try 20MiB)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str) -> float:
    """``90`` or ``90s`` -> 90.0; ``5m``, ``1h``, ``1m30s``, ``500ms``; must be above zero."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", "", text).strip():
        raise ValueError(f"not a duration: {text!r} (try 30s, 5m)")
    total = 0.0
    for number, unit in parts:
        if unit.lower() not in DURATION_UNITS:
            raise ValueError(f"not a duration: {text!r} (units: ms, s, m, h)")
        total += float(number) * DURATION_UNITS[unit.lower()]
    if total <= 0:
        raise ValueError(f"duration must be above zero: {text!r}")
    return total


def parse_rate(text: str) -> float:
    """Arrivals per second: ``5``, ``5/s``, ``300/m``, ``0.5/s``; must be above zero."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([a-zA-Z]*))?\s*", text)
    if not m or (m.group(2) or "").lower() not in RATE_UNITS:
        raise ValueError(f"not a rate: {text!r} (try 5/s or 300/m)")
    rate = float(m.group(1)) * RATE_UNITS[(m.group(2) or "").lower()]
    if rate <= 0:
        raise ValueError(f"rate must be above zero: {text!r}")
    return rate


def parse_mix(sizes: str, mix: str | None = None) -> tuple[tuple[int, float], ...]:
    """``("1MiB,20MiB", "70,30")`` -> ((1048576, 0.7), (20971520, 0.3)): sizes with weights.

    Without ``mix`` every size weighs the same. Weights are relative (``7,3`` is ``70,30``);
    a size may weigh 0; at least one must weigh more.
    """
    size_list = [parse_size(s) for s in sizes.split(",") if s.strip()]
    if not size_list:
        raise ValueError("no sizes given")
    if mix is None or not mix.strip():
        weights = [1.0] * len(size_list)
    else:
        try:
            weights = [float(w) for w in mix.split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"not a list of weights: {mix!r} (try 70,25,5)") from None
        if len(weights) != len(size_list):
            raise ValueError(f"{len(size_list)} sizes but {len(weights)} weights in --mix {mix}")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum: {mix!r}")
    total = sum(weights)
    return tuple((s, w / total) for s, w in zip(size_list, weights, strict=True))


def upload_url(target: str) -> str:
    """The URL to POST to: ``http://lb:8080`` or ``http://lb:8080/`` mean its ``/upload``."""
    base = target.strip()
    if not re.match(r"https?://", base):
        raise ValueError(f"--target must be an http(s) URL: {target!r}")
    _host, _, path = base.partition("://")[2].partition("/")
    if path.strip("/"):
        return base
    return base.rstrip("/") + "/upload"


@dataclass(frozen=True)
class LoadConfig:
    """One load test; every field says its default (the CLI's default too)."""

    target: str  # base URL of the deployment (``http://lb:8080``) or its upload URL
    mix: tuple[tuple[int, float], ...] = ((1 << 20, 1.0),)  # (file size, weight); 1 MiB
    concurrency: int = 4  # closed loop: workers; with ``rate``: the cap on requests in flight
    rate: float | None = None  # arrivals per second (open loop); None: closed loop
    arrivals: str = "poisson"  # open loop: "poisson" (exponential gaps) or "fixed" gaps
    duration: float | None = 30.0  # seconds of arrivals; None: until ``requests`` are done
    requests: int | None = None  # stop after this many uploads (with ``duration``: first wins)
    chunked: bool = False  # Transfer-Encoding: chunked instead of a Content-Length
    keepalive: bool = True  # reuse connections (browsers do); False: one per upload
    retry: int = 0  # retries per upload when the answer says it is safe (see load.should_retry)
    timeout: float = 300.0  # seconds per attempt, connect to last byte of the answer
    api_key: str | None = None  # sent as ``Authorization: Bearer``
    token: str | None = None  # an upload token, sent as ``X-Upload-Token``
    seed: int = 1  # sizes, arrivals and bodies all follow from it
    verify: bool = False  # HEAD every 201's key: size and sha256 (needs s3_endpoint, bucket)
    s3_endpoint: str | None = None  # S3 endpoint of the bucket; credentials from AWS_* env
    bucket: str | None = None  # the deployment's bucket
    region: str = "us-east-1"
    cleanup: bool = False  # delete the objects that verified (needs ``verify``)
    out: Path | None = None  # where load.json and load.png go; None: nowhere
    progress: bool = False  # a live progress line on stderr (the CLI turns it on)
    label: str = field(default="", compare=False)  # free text recorded in load.json

    def __post_init__(self) -> None:
        upload_url(self.target)
        if not self.mix or any(s < 0 for s, _ in self.mix):
            raise ValueError("mix needs at least one size >= 0")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.duration is None and self.requests is None:
            raise ValueError("give a duration or a number of requests")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be above zero")
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"arrivals: one of {', '.join(ARRIVALS)}")
        if self.retry < 0 or self.timeout <= 0:
            raise ValueError("retry must be >= 0 and timeout above zero")
        if self.verify and not (self.s3_endpoint and self.bucket):
            raise ValueError("--verify needs --s3-endpoint and --bucket")
        if self.cleanup and not self.verify:
            raise ValueError("--cleanup needs --verify (only verified objects are deleted)")

    @property
    def url(self) -> str:
        return upload_url(self.target)

    def to_json(self) -> dict[str, Any]:
        """For load.json: everything but the credentials."""
        d = asdict(self)
        d["api_key"] = "***" if self.api_key else None
        d["token"] = "***" if self.token else None
        d["out"] = str(self.out) if self.out else None
        d["mix"] = [[s, w] for s, w in self.mix]
        return d


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench load",
        description="Load-test a running s3proxy deployment: stream generated uploads to it,"
        " closed-loop (--concurrency workers) or at a fixed arrival rate (--rate), report"
        " throughput, latency percentiles and errors, and with --verify check every 201 in S3.",
    )
    p.add_argument("--target", required=True, help="base URL, e.g. http://lb:8080")
    p.add_argument("--sizes", default="1MiB", help="file sizes, e.g. 1MiB,20MiB,200MiB")
    p.add_argument("--mix", help="relative weight of each size, e.g. 70,25,5 (default equal)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="closed loop: uploads in flight; with --rate: the cap on uploads in flight,"
        " arrivals beyond it are dropped and counted (default 4)",
    )
    p.add_argument("--rate", help="open loop: arrivals per second, e.g. 5/s or 300/m")
    p.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="open loop gaps")
    p.add_argument("--duration", help="how long to send, e.g. 30s, 5m (default 30s)")
    p.add_argument("--requests", type=int, help="stop after this many uploads")
    p.add_argument("--chunked", action="store_true", help="chunked bodies, no Content-Length")
    p.add_argument("--no-keepalive", action="store_true", help="a new connection per upload")
    p.add_argument(
        "--retry",
        type=int,
        default=0,
        help="retries per upload when safe (503 SHUTTING_DOWN/OVERLOADED/UPSTREAM_UNAVAILABLE,"
        " connection refused); counted apart (default 0)",
    )
    p.add_argument("--timeout", default="300s", help="per attempt (default 300s)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("S3PROXY_API_KEY"),
        help="sent as Authorization: Bearer (default $S3PROXY_API_KEY)",
    )
    p.add_argument("--token", help="an upload token, sent as X-Upload-Token")
    p.add_argument("--seed", type=int, default=1, help="seed of sizes, arrivals and bodies")
    p.add_argument(
        "--verify",
        action="store_true",
        help="HEAD every 201's key in S3: size and sha256 (needs --s3-endpoint, --bucket and"
        " AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or another AWS credential source)",
    )
    p.add_argument("--s3-endpoint", help="the bucket's S3 endpoint URL")
    p.add_argument("--bucket", help="the deployment's bucket")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--cleanup", action="store_true", help="delete the verified objects")
    p.add_argument("--out", type=Path, help="write load.json and load.png here")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--label", default="", help="free text recorded in load.json")
    return p


def config_from_argv(argv: list[str]) -> LoadConfig:
    """Parse the CLI's flags; a bad value exits with argparse's usage message."""
    p = parser()
    args = p.parse_args(argv)
    try:
        duration = parse_duration(args.duration) if args.duration else None
        if duration is None and args.requests is None:
            duration = 30.0
        return LoadConfig(
            target=args.target,
            mix=parse_mix(args.sizes, args.mix),
            concurrency=args.concurrency,
            rate=parse_rate(args.rate) if args.rate else None,
            arrivals=args.arrivals,
            duration=duration,
            requests=args.requests,
            chunked=args.chunked,
            keepalive=not args.no_keepalive,
            retry=args.retry,
            timeout=parse_duration(args.timeout),
            api_key=args.api_key,
            token=args.token,
            seed=args.seed,
            verify=args.verify,
            s3_endpoint=args.s3_endpoint,
            bucket=args.bucket,
            region=args.region,
            cleanup=args.cleanup,
            out=args.out,
            progress=not args.quiet,
            label=args.label,
        )
    except ValueError as exc:
        p.error(str(exc))
