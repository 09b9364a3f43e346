"""A cell's result: one definition, to JSON and back, and the saved runs still read.

Pure tables: no processes, no event loop.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bench.report import Report
from bench.result import CellResult, RunResult, percentile

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
SAVED = sorted(RESULTS.glob("**/latest.json"))
FIELDS = [f.name for f in dataclasses.fields(CellResult)]

MEASURED = CellResult(
    design="s3proxy",
    client="curl",
    size=64 << 20,
    concurrency=2,
    rep=1,
    uploads=2,
    bytes=128 << 20,
    wall_s=1.5,
    throughput_mbps=89.5,
    latencies_s=[1.2, 1.4],
    latency_p50_s=1.3,
    latency_p95_s=1.39,
    peak_rss_bytes=90 << 20,
    idle_rss_bytes=70 << 20,
    cpu_s=0.3,
    cpu_s_per_gib=2.4,
    s3_cpu_s=1.1,
    s3_cpu_s_per_gib=8.8,
    s3_peak_rss_bytes=500 << 20,
    client_cpu_s=0.1,
    harness_cpu_s=0.05,
    machine_busy_cpu_s=2.0,
    machine_busy_fraction=0.66,
    exit_code=0,
    log="/tmp/logs/s3proxy-curl-64MiB-c2-r1.log",
    verified=2,
)


@pytest.mark.parametrize(
    "cell",
    [
        MEASURED,
        CellResult.failed("direct", "builtin", 1 << 20, 4, 0, RuntimeError("no store")),
        dataclasses.replace(MEASURED, s3_cpu_s=None, s3_cpu_s_per_gib=None, s3_peak_rss_bytes=None),
        dataclasses.replace(
            MEASURED, failures=1, errors=["HTTP 502: x"], stray_keys=["a"], stray_objects=1
        ),
    ],
    ids=["measured", "failed", "external store", "with errors"],
)
def test_round_trip(cell: CellResult) -> None:
    data = json.loads(json.dumps(cell.to_json()))
    assert list(data) == FIELDS  # every key, in field order
    assert CellResult.from_json(data) == cell


def test_a_failed_cell_has_the_same_keys_as_a_measured_one() -> None:
    failed = CellResult.failed("naive-memory", "curl", 6 << 20, 3, 2, OSError("boom")).to_json()
    assert list(failed) == list(MEASURED.to_json())
    assert failed["failures"] == failed["uploads"] == 3
    assert failed["errors"] == ["OSError: boom"]
    assert failed["throughput_mbps"] is None and failed["client_cpu_s"] is None


@pytest.mark.parametrize(
    ("missing", "default"),
    [
        ("idle_rss_bytes", 0),
        ("size_misreports", 0),
        ("size_misreport_example", ""),
        ("client_cpu_s", None),
        ("machine_busy_fraction", None),
        ("stray_keys", []),
    ],
)
def test_an_older_record_without_a_key_reads_with_the_default(missing: str, default: Any) -> None:
    data = MEASURED.to_json()
    del data[missing]
    data["a_key_from_the_future"] = 1
    cell = CellResult.from_json(data)
    assert getattr(cell, missing) == default
    assert "a_key_from_the_future" not in cell.to_json()


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 0.5, None),
        ([3.0], 0.95, 3.0),
        ([1.0, 2.0, 3.0], 0.5, 2.0),
        ([4.0, 1.0], 0.5, 2.5),  # unsorted input, interpolated
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0.95, 4.8),
    ],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == pytest.approx(expected)


@pytest.mark.parametrize("path", SAVED, ids=lambda p: str(p.relative_to(RESULTS)))
def test_a_saved_run_reads_back_unchanged(path: Path) -> None:
    """Loaded and written again, a committed results file is the same to the byte: the run's
    records round-trip, and the summaries recomputed from them equal the saved ones."""
    text = path.read_text()
    data = json.loads(text)
    run = RunResult.from_json(data)
    assert [r.to_json() for r in run.runs] == data["runs"]
    assert json.dumps(Report.of(run).to_json(), indent=1) + "\n" == text


def test_there_are_saved_runs_to_check() -> None:
    assert RESULTS / "latest.json" in SAVED
