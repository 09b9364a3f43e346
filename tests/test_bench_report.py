"""The report of a run: repetitions folded, the ratios, and a saved run rendered again.

Pure: saved and made-up results, no processes.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.report import Report
from bench.result import CellResult, RunResult

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
GIB = 2**30


def cell(design: str = "s3proxy", client: str = "curl", **kw: Any) -> CellResult:
    base = CellResult(design, client, GIB, 1, 0, 1, bytes=GIB, wall_s=10.0, throughput_mbps=100.0)
    return dataclasses.replace(base, **kw)


def meta(cpus: int = 2) -> dict[str, object]:
    return {
        "command": "python -m bench --smoke",
        "started": "2026-01-01T00:00:00Z",
        "duration_s": 12.0,
        "machine": {"cpus": cpus},
        "backend": "moto",
        "notes": [],
    }


@pytest.mark.parametrize(
    ("reps", "key", "expected"),
    [
        # throughput: the median of the repetitions
        ([{"throughput_mbps": t} for t in (90.0, 120.0, 100.0)], "throughput_mbps", 100.0),
        # a repetition that did not run has no throughput and is left out of the median
        ([{"throughput_mbps": 80.0}, {"throughput_mbps": None}], "throughput_mbps", 80.0),
        # peak RSS: the largest; growth: the largest of peak - idle
        (
            [{"peak_rss_bytes": 5, "idle_rss_bytes": 1}, {"peak_rss_bytes": 4}],
            "rss_growth_bytes",
            4,
        ),
        # CPU per GiB: total CPU over total bytes
        ([{"cpu_s": 2.0}, {"cpu_s": 4.0}], "cpu_s_per_gib", 3.0),
        # the store's CPU, only where it was recorded
        ([{"s3_cpu_s": None}, {"s3_cpu_s": None}], "s3_cpu_s_per_gib", None),
        # latency percentiles over every upload of every repetition
        ([{"latencies_s": [1.0, 2.0]}, {"latencies_s": [3.0]}], "latency_p50_s", 2.0),
        # counts add up
        ([{"failures": 1, "verified": 0}, {"verified": 1}], "failures", 1),
        ([{"errors": ["a"], "verify_errors": ["b"]}, {"errors": ["c"]}], "errors", ["a", "b", "c"]),
        # what else ran on the machine: all busy time less ours, over all cores' time
        (
            [
                {
                    "machine_busy_cpu_s": 12.0,
                    "cpu_s": 2.0,
                    "s3_cpu_s": 3.0,
                    "client_cpu_s": 1.0,
                    "harness_cpu_s": 1.0,
                }
            ],
            "other_cpu_fraction",
            0.25,
        ),
    ],
)
def test_summarize_folds_repetitions(
    reps: list[dict[str, Any]], key: str, expected: object
) -> None:
    runs = [cell(rep=i, **kw) for i, kw in enumerate(reps)]
    (summary,) = report.summarize(runs, cpus=2)
    assert summary["reps"] == len(reps)
    assert summary[key] == (pytest.approx(expected) if isinstance(expected, float) else expected)


def test_summaries_are_ordered_and_ratios_are_against_s3proxy() -> None:
    runs = [
        cell("direct", "builtin", throughput_mbps=200.0, peak_rss_bytes=400, cpu_s=1.0),
        cell("naive-memory", peak_rss_bytes=800, cpu_s=4.0),
        cell("s3proxy", "aiohttp", peak_rss_bytes=100, cpu_s=2.0),
        cell("s3proxy", peak_rss_bytes=100, cpu_s=2.0),
    ]
    rep = Report.of(RunResult(meta(), runs))
    assert [(c["design"], c["client"]) for c in rep.cells] == [
        ("s3proxy", "curl"),
        ("s3proxy", "aiohttp"),
        ("direct", "builtin"),
        ("naive-memory", "curl"),
    ]
    by = {(r["client"], r["other"]): r for r in rep.ratios}
    assert set(by) == {("curl", "direct"), ("curl", "naive-memory"), ("aiohttp", "direct")}
    assert by["curl", "direct"]["throughput"] == 0.5
    assert by["curl", "naive-memory"]["peak_rss"] == 0.125
    assert by["aiohttp", "direct"]["cpu_per_gib"] == 2.0


def test_a_saved_run_renders_as_its_committed_markdown() -> None:
    rep = Report.of(RunResult.load(RESULTS / "latest.json"))
    assert report.markdown(rep, Path("latest.png")) == (RESULTS / "latest.md").read_text()


def test_the_terminal_table_has_a_row_per_cell() -> None:
    rep = Report.of(RunResult.load(RESULTS / "latest.json"))
    lines = report.terminal(rep).splitlines()
    assert lines[0].startswith(rep.meta["command"])
    assert sum(" s3proxy " in line and "curl" in line for line in lines) >= 9


def _status() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "bench"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_writing_a_saved_run_elsewhere_leaves_the_committed_files_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "plot", lambda cells, path: False)  # matplotlib is slow to load
    saved = RESULTS / "issue-conc" / "latest.json"
    before = _status()
    written = report.write(Report.of(RunResult.load(saved)), tmp_path)
    # the same run (newer fields such as the body kind read back with their defaults)
    assert RunResult.load(written["json"]) == RunResult.load(saved)
    assert written["md"].parent == tmp_path
    assert _status() == before


def test_every_design_is_a_ratio_of_the_floor_in_the_same_cell() -> None:
    runs = [
        cell("s3proxy", cpu_s=2.4),
        cell("s3proxy", "aiohttp", cpu_s=3.0),
        cell("direct", "builtin", cpu_s=1.8),
        cell("floor", cpu_s=1.2),
        cell("floor", "aiohttp", cpu_s=1.0),
        # another cell (the same sizes with a junk file): its own floor, or none
        cell("s3proxy", cpu_s=2.4, body="junk"),
    ]
    rep = Report.of(RunResult(meta(), runs))
    by = {(c["design"], c["client"], c["body"]): c["cpu_vs_floor"] for c in rep.cells}
    assert by["s3proxy", "curl", "random"] == pytest.approx(2.0)
    assert by["s3proxy", "aiohttp", "random"] == pytest.approx(3.0)  # the aiohttp floor's
    assert by["direct", "builtin", "random"] == pytest.approx(1.5)  # curl's floor
    assert by["floor", "curl", "random"] == pytest.approx(1.0)
    assert by["s3proxy", "curl", "junk"] is None
    table = report.markdown(rep, None)
    assert "| CPU/floor |" in table
    assert "| 1 GiB junk | 1 | s3proxy | curl |" in table


def test_small_file_cells_report_requests_per_second_and_cpu_per_request() -> None:
    kib100 = 100 * 1024
    runs = [
        cell(size=kib100, concurrency=16, uploads=1000, bytes=1000 * kib100, wall_s=4.0, cpu_s=6.0),
        cell(size=kib100, concurrency=16, rep=1, uploads=1000, bytes=999 * kib100, wall_s=5.0),
    ]
    [c] = Report.of(RunResult(meta(), runs)).cells
    assert c["requests_per_s"] == pytest.approx((250.0 + 199.8) / 2)  # the median of two
    assert c["cpu_ms_per_request"] == pytest.approx(1000 * 6.0 / 2000)
    header, _, row = report.markdown(Report.of(RunResult(meta(), runs)), None).splitlines()[2:5]
    assert "| req/s | CPU ms/req |" in header
    assert row.startswith("| 100 KiB | 16 (1000) | s3proxy | curl |")


def test_older_runs_render_without_the_new_columns() -> None:
    rep = Report.of(RunResult(meta(), [cell("s3proxy"), cell("direct", "builtin")]))
    assert report.columns(rep.cells) == report.COLUMNS


def test_the_header_names_both_revisions_of_a_before_and_after() -> None:
    info = {
        **meta(),
        "s3proxy_source": {"rev": "HEAD", "commit": "db85b60", "uncommitted_changes": False},
        "s3proxy_b_source": {"rev": "0000bb0", "commit": "0000bb0", "uncommitted_changes": False},
    }
    table = report.markdown(Report.of(RunResult(info, [cell("s3proxy")])), None)
    assert "s3proxy at commit db85b60, s3proxy-b at commit 0000bb0." in table.splitlines()[0]
