"""Summaries of a run: the terminal table, the JSON file, the PNG plot, the README section.

Repetitions of a cell are folded together: throughput is their median, latency percentiles
are over all their uploads, peak RSS is the largest, CPU per GiB is total CPU over total bytes.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import designs
from bench.options import REPO
from bench.result import CellResult, RunResult, percentile

GIB = 2**30
MIB = 2**20


def _per_gib(values: Iterable[float | None], nbytes: int) -> float | None:
    """The sum of the recorded values (None: not recorded) per GiB of ``nbytes``."""
    known = [v for v in values if v is not None]
    return sum(known) / (nbytes / GIB) if known and nbytes else None


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def other_cpu_fraction(r: CellResult, cpus: int) -> float | None:
    """Share of all cores busy with something else than the cell (other users' work).

    All CPUs' busy time during the cell, less what the server, the store, the clients and the
    harness used. Near 0 on a quiet machine; on a shared one it says how noisy the cell was.
    """
    if r.machine_busy_cpu_s is None or not r.wall_s:
        return None
    ours = r.cpu_s + (r.s3_cpu_s or 0) + (r.client_cpu_s or 0) + (r.harness_cpu_s or 0)
    return max(0.0, r.machine_busy_cpu_s - ours) / (r.wall_s * cpus)


def summarize(runs: list[CellResult], cpus: int = 1) -> list[dict[str, Any]]:
    """One summary per (design, client, size, concurrency), its repetitions folded together."""
    groups: dict[tuple[str, str, int, int, str, int], list[CellResult]] = {}
    for r in runs:
        key = (r.design, r.client, r.size, r.concurrency, r.body, r.uploads)
        groups.setdefault(key, []).append(r)
    cells: list[dict[str, Any]] = []
    for (design, client, size, conc, kind, _), rs in groups.items():
        nbytes = sum(r.bytes for r in rs)
        lat = [x for r in rs for x in r.latencies_s]
        uploads = sum(r.uploads for r in rs)
        cells.append(
            {
                "design": design,
                "client": client,
                "size": size,
                "concurrency": conc,
                "body": kind,
                "reps": len(rs),
                "uploads": uploads,
                "bytes": nbytes,
                "throughput_mbps": _median(r.throughput_mbps for r in rs),
                "latency_p50_s": percentile(lat, 0.5),
                "latency_p95_s": percentile(lat, 0.95),
                "peak_rss_bytes": max(r.peak_rss_bytes for r in rs),
                "idle_rss_bytes": max(r.idle_rss_bytes for r in rs),
                "rss_growth_bytes": max(r.peak_rss_bytes - r.idle_rss_bytes for r in rs),
                "cpu_s_per_gib": _per_gib((r.cpu_s for r in rs), nbytes),
                # small files: successful uploads per second (median), CPU per upload started
                "requests_per_s": _median(
                    (r.bytes // r.size) / r.wall_s if r.size and r.wall_s else None for r in rs
                ),
                "cpu_ms_per_request": 1000 * sum(r.cpu_s for r in rs) / uploads
                if uploads
                else None,
                "s3_cpu_s_per_gib": _per_gib((r.s3_cpu_s for r in rs), nbytes),
                "client_cpu_s_per_gib": _per_gib((r.client_cpu_s for r in rs), nbytes),
                "machine_busy_fraction": _median(r.machine_busy_fraction for r in rs),
                "other_cpu_fraction": _median(other_cpu_fraction(r, cpus) for r in rs),
                "disk_write_bytes": max(r.disk_write_bytes for r in rs),
                "peak_tmp_bytes": max(r.peak_tmp_bytes for r in rs),
                "failures": sum(r.failures for r in rs),
                "verified": sum(r.verified for r in rs),
                "stray_objects": sum(r.stray_objects for r in rs),
                "open_multipart_uploads": sum(r.open_multipart_uploads for r in rs),
                "size_misreports": sum(r.size_misreports for r in rs),
                "size_misreport_example": next(
                    (r.size_misreport_example for r in rs if r.size_misreport_example), ""
                ),
                "errors": [e for r in rs for e in r.errors + r.verify_errors][:5],
            }
        )
    order = {
        d: i
        for i, d in enumerate(
            (
                "s3proxy",
                "direct",
                "naive-tempfile",
                "naive-memory",
                "multer-s3",
                "tus-node",
                "floor",
            )
        )
    }
    client_order = {"curl": 0, "aiohttp": 1, "builtin": 2, "tus": 3}
    cells.sort(
        key=lambda c: (
            c["size"],
            c["concurrency"],
            c["uploads"] // c["reps"],
            c["body"] != "random",
            order.get(c["design"], 99),
            client_order.get(c["client"].partition(":")[0], 9),
            c["client"],
        )
    )
    for c in cells:
        c["cpu_vs_floor"] = _ratio(c["cpu_s_per_gib"], _floor_cpu(c, cells))
    return cells


def _floor_cpu(c: dict[str, Any], cells: list[dict[str, Any]]) -> float | None:
    """The floor's CPU per GiB in the same cell (same sizes, uploads and body), same client;
    for the direct design, which has no client, the floor's with curl (or any)."""
    same = [
        o
        for o in cells
        if o["design"] == "floor"
        and (o["size"], o["concurrency"], o["body"], o["uploads"] // o["reps"])
        == (c["size"], c["concurrency"], c["body"], c["uploads"] // c["reps"])
    ]
    same.sort(key=lambda o: (o["client"] != c["client"], o["client"] != "curl"))
    return same[0]["cpu_s_per_gib"] if same else None


@dataclass
class Report:
    """A run and what is derived from it: its cells summarized, and the s3proxy ratios."""

    run: RunResult
    cells: list[dict[str, Any]]
    ratios: list[dict[str, Any]]

    @classmethod
    def of(cls, run: RunResult) -> Report:
        cells = summarize(run.runs, run.meta["machine"]["cpus"] or 1)
        return cls(run, cells, ratios(cells))

    @property
    def meta(self) -> dict[str, Any]:
        return self.run.meta

    def to_json(self) -> dict[str, Any]:
        """The saved file: the run, then its summaries (read by people, not read back)."""
        return {**self.run.to_json(), "cells": self.cells, "ratios": self.ratios}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _compared(c: dict[str, Any], o: dict[str, Any]) -> bool:
    """Whether s3proxy's cell ``c`` is set against ``o``: another design with the same client
    (or direct's own), or, for s3proxy over tus, s3proxy's own /upload with curl (issue 13's
    target: tus within 10% of it)."""
    if o["size"] != c["size"] or o["concurrency"] != c["concurrency"] or o["body"] != c["body"]:
        return False
    if o["uploads"] // o["reps"] != c["uploads"] // c["reps"]:
        return False
    if o["design"] != "s3proxy":
        return bool(o["client"] in (c["client"], "builtin"))
    return designs.protocol(c["client"]) == "tus" and o["client"] == "curl"


def ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """s3proxy/direct for throughput; s3proxy/other for peak RSS and CPU per GiB."""
    out = []
    for c in cells:
        if c["design"] != "s3proxy":
            continue
        for o in (o for o in cells if _compared(c, o)):
            out.append(
                {
                    "client": c["client"],
                    "size": c["size"],
                    "concurrency": c["concurrency"],
                    "body": c["body"],
                    "uploads": c["uploads"],
                    "reps": c["reps"],
                    "other": o["design"] if o["design"] != "s3proxy" else "s3proxy-curl",
                    "throughput": _ratio(c["throughput_mbps"], o["throughput_mbps"]),
                    "peak_rss": _ratio(c["peak_rss_bytes"], o["peak_rss_bytes"]),
                    "cpu_per_gib": _ratio(c["cpu_s_per_gib"], o["cpu_s_per_gib"]),
                }
            )
    return out


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _size(n: int) -> str:
    for unit, div in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def _cell_size(c: dict[str, Any]) -> str:
    """The size column: the size, and what the file holds when it is not the usual body."""
    return _size(c["size"]) + ("" if c.get("body", "random") == "random" else f" {c['body']}")


def _conc(c: dict[str, Any]) -> str:
    """The concurrency column; ``16 (1000)`` when the clients sent 1,000 uploads in all."""
    per_rep = c["uploads"] // max(1, c.get("reps", 1))
    return str(c["concurrency"]) + ("" if per_rep == c["concurrency"] else f" ({per_rep})")


COLUMNS = [
    "size",
    "conc",
    "design",
    "client",
    "MB/s",
    "p50 s",
    "p95 s",
    "peak RSS MiB",
    "idle RSS MiB",
    "CPU s/GiB",
    "S3 CPU s/GiB",
    "disk MiB",
    "tmp MiB",
    "other CPU %",
    "fail",
    "ok",
]


# Shown only when a run has what they need, so older runs render as they always did:
# CPU/floor: the cell's CPU per GiB over the floor design's in the same cell;
# req/s, CPU ms/req: for cells of many small uploads (clients send several each).
FLOOR_COLUMN = "CPU/floor"
REQUEST_COLUMNS = ["req/s", "CPU ms/req"]


def columns(cells: list[dict[str, Any]]) -> list[str]:
    cols = list(COLUMNS)
    at = cols.index("CPU s/GiB") + 1
    if any(c.get("cpu_vs_floor") is not None for c in cells):
        cols.insert(at, FLOOR_COLUMN)
    if any(c["uploads"] // max(1, c.get("reps", 1)) != c["concurrency"] for c in cells):
        cols[at:at] = REQUEST_COLUMNS
    return cols


def rows(cells: Iterable[dict[str, Any]], cols: list[str] = COLUMNS) -> list[list[str]]:
    """One row per cell, with the values of ``cols`` (COLUMNS and the optional ones)."""
    out = []
    for c, row in ((c, _row(c)) for c in cells):
        extra = {
            FLOOR_COLUMN: _f(c.get("cpu_vs_floor"), ".2f"),
            "req/s": _f(c.get("requests_per_s"), ".1f"),
            "CPU ms/req": _f(c.get("cpu_ms_per_request"), ".2f"),
        }
        values = dict(zip(COLUMNS, row, strict=True)) | extra
        out.append([values[k] for k in cols])
    return out


def _row(c: dict[str, Any]) -> list[str]:
    return [
        _cell_size(c),
        _conc(c),
        c["design"],
        c["client"],
        _f(c["throughput_mbps"], ".1f"),
        _f(c["latency_p50_s"], ".2f"),
        _f(c["latency_p95_s"], ".2f"),
        _f(c["peak_rss_bytes"] / MIB, ".0f"),
        _f(c["idle_rss_bytes"] / MIB, ".0f"),
        _f(c["cpu_s_per_gib"], ".2f"),
        _f(c["s3_cpu_s_per_gib"], ".2f"),
        _f(c["disk_write_bytes"] / MIB, ".0f"),
        _f(c["peak_tmp_bytes"] / MIB, ".0f"),
        _f(None if c["other_cpu_fraction"] is None else 100 * c["other_cpu_fraction"], ".0f"),
        str(c["failures"]),
        f"{c['verified']}/{c['uploads']}",
    ]


def ratio_rows(rs: Iterable[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            _cell_size(r),
            _conc(r),
            r["client"],
            f"s3proxy/{r['other']}",
            _f(r["throughput"], ".2f"),
            _f(r["peak_rss"], ".2f"),
            _f(r["cpu_per_gib"], ".2f"),
        ]
        for r in rs
    ]


RATIO_COLUMNS = ["size", "conc", "client", "ratio", "throughput", "peak RSS", "CPU/GiB"]


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def notes(rep: Report) -> list[str]:
    cells = rep.cells
    out = list(rep.meta["notes"])
    other = [c["other_cpu_fraction"] for c in cells if c.get("other_cpu_fraction") is not None]
    if other and statistics.median(other) > 0.15:
        out.append(
            f"the machine was not quiet: in the median cell {100 * statistics.median(other):.0f}%"
            f" of all cores (up to {100 * max(other):.0f}%) were busy with work other than the"
            " cell's (column 'other CPU %'), so throughput and latency are noisy; CPU per GiB"
            " and memory are much less affected"
        )
    elif noisy := [c for c in cells if (c.get("other_cpu_fraction") or 0) > 0.2]:
        out.append(
            "cells that competed with other work for the CPU (other CPU % over 20; their"
            " throughput and latency are low and say little): "
            + ", ".join(
                f"{c['design']} {_size(c['size'])} x{c['concurrency']}"
                f" ({100 * c['other_cpu_fraction']:.0f}%)"
                for c in noisy
            )
        )
    for c in cells:
        where = f"{c['design']}/{c['client']} {_size(c['size'])} x{c['concurrency']}"
        if c["stray_objects"]:
            out.append(f"{where}: {c['stray_objects']} objects in the bucket nobody reported")
        if c["open_multipart_uploads"]:
            out.append(f"{where}: {c['open_multipart_uploads']} multipart uploads left open")
        if c["size_misreports"]:
            out.append(
                f"{where}: {c['size_misreports']} replies gave a wrong size "
                f"({c['size_misreport_example']}); the stored objects were checked"
            )
        for e in c["errors"][:2]:
            out.append(f"{where}: {e}")
    return out


def terminal(rep: Report) -> str:
    meta = rep.meta
    parts = [
        f"{meta['command']}: {meta['duration_s']:.0f} s, load average {_load(meta)}",
        text_table(columns(rep.cells), rows(rep.cells, columns(rep.cells))),
    ]
    if rep.ratios:
        parts.append(text_table(RATIO_COLUMNS, ratio_rows(rep.ratios)))
    parts.append("\n".join(f"note: {n}" for n in notes(rep)))
    return "\n\n".join(parts)


def _load(meta: dict[str, Any]) -> str:
    """The 1-minute load average before and after the run ("-" if not recorded)."""
    a, b = meta.get("loadavg_start"), meta.get("loadavg_end")
    return "-" if a is None or b is None else f"{a[0]:.2f} before, {b[0]:.2f} after"


def _source(meta: dict[str, Any]) -> str:
    src = meta.get("s3proxy_source") or {}
    if not src:
        return ""
    dirty = " with uncommitted changes" if src.get("uncommitted_changes") else ""
    b = meta.get("s3proxy_b_source") or {}
    other = f", s3proxy-b at commit {b.get('commit')}" if b else ""
    return f", s3proxy at commit {src.get('commit')}{dirty}{other}"


def markdown(rep: Report, png: Path | None) -> str:
    meta = rep.meta
    parts = [
        f"Produced by `{meta['command']}` on {meta['started']} "
        f"({meta['machine']['cpus']} CPUs, backend {meta['backend']}, "
        f"{meta['duration_s']:.0f} s, load average {_load(meta)}){_source(meta)}.",
        md_table(columns(rep.cells), rows(rep.cells, columns(rep.cells))),
    ]
    if rep.ratios:
        parts.append(md_table(RATIO_COLUMNS, ratio_rows(rep.ratios)))
    if png is not None:
        parts.append(f"![throughput and peak RSS against concurrency]({png.name})")
    parts += [f"- {n}" for n in notes(rep)]
    return "\n\n".join(parts) + "\n"


def plot(cells: list[dict[str, Any]], path: Path) -> bool:
    """Throughput and peak RSS against concurrency, one line per design (and client)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return False
    sizes = sorted({c["size"] for c in cells})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 8), squeeze=False)
    for j, size in enumerate(sizes):
        lines: dict[str, list[dict[str, Any]]] = {}
        for c in cells:
            if c["size"] == size:
                label = (
                    c["design"]
                    if c["client"] in ("builtin", "curl")
                    else f"{c['design']} ({c['client']})"
                )
                lines.setdefault(label, []).append(c)
        for label, cs in lines.items():
            cs.sort(key=lambda c: c["concurrency"])
            x = [c["concurrency"] for c in cs]
            style = "-" if "(" not in label else "--"
            axes[0][j].plot(
                x, [c["throughput_mbps"] or 0 for c in cs], style, marker="o", label=label
            )
            axes[1][j].plot(
                x, [c["peak_rss_bytes"] / MIB for c in cs], style, marker="o", label=label
            )
        for i, ylabel in enumerate(("throughput (MB/s)", "peak RSS (MiB)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            concs = sorted({c["concurrency"] for c in cells if c["size"] == size})
            ax.set_xticks(concs, [str(x) for x in concs])
            ax.minorticks_off()
            ax.set_xlabel("concurrent uploads")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{_size(size)} files")
            ax.grid(True, alpha=0.3)
            if i == 1:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(ScalarFormatter())
            else:
                ax.set_ylim(bottom=0)
        axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


README = REPO / "bench" / "README.md"
README_START = "<!-- bench:latest:start -->"
README_END = "<!-- bench:latest:end -->"


def write(rep: Report, out: Path, readme: Path | None = None) -> dict[str, Path]:
    """Write latest.json, latest.png and latest.md to ``out`` (and the README's section)."""
    written = {"json": out / "latest.json"}
    tmp = out / "latest.json.tmp"
    tmp.write_text(json.dumps(rep.to_json(), indent=1) + "\n")
    tmp.replace(written["json"])
    png = out / "latest.png"
    if plot(rep.cells, png):
        written["png"] = png
    else:
        rep.meta["notes"].append(
            "plot skipped: matplotlib is not installed (pip install -e '.[bench]')"
        )
    md = markdown(rep, written.get("png"))
    written["md"] = out / "latest.md"
    written["md"].write_text(md)
    if readme is not None and readme.exists():
        text = readme.read_text()
        pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
        if pattern.search(text):
            rel = (
                md.replace("](latest.png)", f"]({png.relative_to(readme.parent)})")
                if png.is_relative_to(readme.parent)
                else md
            )
            readme.write_text(pattern.sub(lambda _: f"{README_START}\n{rel}{README_END}", text))
            written["readme"] = readme
    return written


def publish(run: RunResult, out: Path, update_readme: bool = False) -> Report:
    """Summarize ``run``, write it to ``out`` (and the README's section), print the tables."""
    rep = Report.of(run)
    out.mkdir(parents=True, exist_ok=True)
    written = write(rep, out, README if update_readme else None)
    print(terminal(rep))
    print("\n" + "  ".join(f"{k}: {v}" for k, v in written.items()))
    return rep


def main() -> None:
    """``python -m bench.report RESULTS.json [--out DIR] [--update-readme]``: render a saved run
    again, beside the JSON unless ``--out`` says where."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, help="where to write (default: the JSON's directory)")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args()
    publish(RunResult.load(args.json), args.out or args.json.parent, args.update_readme)


if __name__ == "__main__":
    main()
