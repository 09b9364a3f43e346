"""A load test's report: the summary table, load.json and load.png.

``load.json`` holds the config (credentials masked), the counts and every request (start,
end, size, status, code, key, sha256, retries, error, request id, verify outcome), so a
run can be looked at again without rerunning it. ``load.png`` has latency over time (one
dot per upload at its end, coloured by status) and throughput per second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.load_stats import LoadResult, throughput_series

JSON_NAME = "load.json"
PNG_NAME = "load.png"


def _s(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % (scale // 16) == 0:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def summary_text(r: LoadResult) -> str:
    """What the CLI prints when the run is over."""
    lat = r.latency_s
    rows = [
        ("uploads", f"{len(r.records)} ({r.ok} ok, {r.failed} failed)"),
        ("retries", f"{r.retries} ({r.retried_ok} uploads ok after a retry)"),
        ("throughput", f"{r.throughput_mbps:.1f} MB/s, {r.uploads_per_s:.2f} uploads/s"),
        ("data", f"{r.bytes_ok / 1e6:.1f} MB in {r.wall_s:.1f} s"),
        (
            "latency s",
            f"p50 {_s(lat.get('p50'))}  p95 {_s(lat.get('p95'))}  p99 {_s(lat.get('p99'))}"
            f"  max {_s(lat.get('max'))}",
        ),
    ]
    if r.bytes_ok:
        rows.append(
            (
                "client CPU",
                f"{r.client_cpu_s:.1f} s, {r.client_cpu_s / (r.bytes_ok / 2**30):.2f} s/GiB",
            )
        )
    if r.dropped:
        rows.append(("dropped", f"{r.dropped} arrivals over the in-flight cap"))
    if r.config.get("verify"):
        rows.append(
            (
                "verified",
                f"{r.verified}/{r.ok}: lost {r.lost}, partial {r.partial},"
                f" mismatched {r.mismatched}, check errors {r.verify_errors}"
                + (f", deleted {r.deleted}" if r.config.get("cleanup") else ""),
            )
        )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if len(r.by_size) > 1:
        lines += ["", f"{'size':>10} {'ok':>6} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8} {'max s':>8}"]
        for size, lat in r.by_size.items():
            lines.append(
                f"{_size(int(size)):>10} {lat['count']:>6.0f} {_s(lat['p50']):>8}"
                f" {_s(lat['p95']):>8} {_s(lat['p99']):>8} {_s(lat['max']):>8}"
            )
    if r.retries_by:
        lines += ["", "retried on (status code: retries)"]
        lines += [f"  {k}: {n}" for k, n in r.retries_by.items()]
    if r.errors:
        lines += ["", "errors (status code: count)"]
        lines += [f"  {k}: {n}" for k, n in r.errors.items()]
    return "\n".join(lines)


def write(r: LoadResult, out: Path) -> tuple[Path, Path]:
    """Write load.json and load.png into ``out`` (made if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / JSON_NAME
    json_path.write_text(json.dumps(r.to_json(), indent=1, allow_nan=False) + "\n")
    png_path = out / PNG_NAME
    plot(r, png_path)
    return json_path, png_path


def _colour(status: int) -> str:
    if status == 201:
        return "tab:green"
    if status == 0:
        return "black"
    return "tab:orange" if status < 500 else "tab:red"


def plot(r: LoadResult, path: Path) -> None:
    """Latency over time (coloured by status) above throughput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    by_status: dict[int, list[tuple[float, float]]] = {}
    for rec in r.records:
        by_status.setdefault(rec.status, []).append((rec.end, rec.latency))
    for status, pts in sorted(by_status.items()):
        label = "no answer" if status == 0 else str(status)
        ax_lat.scatter(
            [p[0] for p in pts], [p[1] for p in pts], s=8, c=_colour(status), label=label
        )
    ax_lat.set_ylabel("latency s (at completion)")
    if by_status:
        ax_lat.legend(loc="upper left", fontsize="small", title="status")
    ax_lat.grid(alpha=0.3)
    series = throughput_series(r.records)
    ax_tp.stairs(series, range(len(series) + 1), color="tab:blue")
    ax_tp.set_ylabel("MB/s (successful uploads)")
    ax_tp.set_xlabel("seconds since start")
    ax_tp.grid(alpha=0.3)
    lat = r.latency_s
    fig.suptitle(
        f"{r.ok} ok, {r.failed} failed, {r.throughput_mbps:.1f} MB/s,"
        f" p50 {_s(lat.get('p50'))} s, p99 {_s(lat.get('p99'))} s"
        + (f", lost {r.lost}, partial {r.partial}" if r.config.get("verify") else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
