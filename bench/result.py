"""What a run records: one ``CellResult`` per cell and repetition, and the run's metadata.

This is the one definition of a cell's result and the one place it becomes JSON and comes back.
The JSON keys are the field names, in field order, so files written before this module existed
(bench/results/) read back unchanged; a key missing from an older file takes the field's
default, and a key this version does not know is dropped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values``, linearly interpolated; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class CellResult:
    """One design, one client kind, ``concurrency`` uploads of ``size`` bytes, measured once.

    The defaults are what a cell that could not run at all records (see ``failed``).
    """

    design: str
    client: str  # curl | aiohttp | builtin (direct generates its own bodies)
    size: int  # bytes per upload
    concurrency: int
    rep: int  # repetition, from 0
    uploads: int  # uploads started (= concurrency, or more when each client sends several)
    bytes: int = 0  # bytes of the uploads that succeeded
    wall_s: float = 0.0  # first request to last reply
    throughput_mbps: float | None = None  # bytes / wall_s, in 10^6 bytes/s
    latencies_s: list[float] = field(default_factory=list)  # per successful upload
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    peak_rss_bytes: int = 0  # the server's process tree
    idle_rss_bytes: int = 0  # the same at rest, after the warm-up upload, before the cell
    cpu_s: float = 0.0  # the server tree's utime + stime during the cell
    cpu_s_per_gib: float | None = None
    s3_cpu_s: float | None = None  # the store's; None when it is not ours to watch
    s3_cpu_s_per_gib: float | None = None
    s3_peak_rss_bytes: int | None = None
    # Where the machine's CPU went during the cell: the clients (curl; direct has none apart
    # from itself), the harness, and all CPUs' busy time. None when the cell did not run.
    client_cpu_s: float | None = None
    harness_cpu_s: float | None = None
    machine_busy_cpu_s: float | None = None
    machine_busy_fraction: float | None = None  # of all cores
    disk_write_bytes: int = 0  # the server's write_bytes (/proc/PID/io)
    peak_tmp_bytes: int = 0  # temp files it held open, at most
    peak_tmp_files: int = 0
    failures: int = 0  # failed uploads, and stored objects that did not match
    errors: list[str] = field(default_factory=list)  # the first few
    size_misreports: int = 0  # successful replies that gave a wrong size
    size_misreport_example: str = ""
    exit_code: int | None = None  # the server's
    log: str = ""  # the server's log file
    verified: int = 0  # stored objects whose size and sha256 matched
    verify_errors: list[str] = field(default_factory=list)
    stray_objects: int = 0  # objects in the bucket nobody reported
    stray_keys: list[str] = field(default_factory=list)
    open_multipart_uploads: int = 0  # left open by the design (and aborted by the harness)
    # What the file holds: "random" (the generated body) or "junk" (hostile to a multipart
    # parser: CRLF runs, near-boundaries, dash runs; bench/body.py)
    body: str = "random"

    @classmethod
    def failed(
        cls, design: str, client: str, size: int, conc: int, rep: int, e: BaseException
    ) -> CellResult:
        """The record of a cell that could not run at all (every upload counts as failed)."""
        return cls(
            design,
            client,
            size,
            conc,
            rep,
            uploads=conc,
            failures=conc,
            errors=[f"{type(e).__name__}: {e}"],
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CellResult:
        return cls(**{k: v for k, v in data.items() if k in _CELL_FIELDS})


_CELL_FIELDS = frozenset(f.name for f in dataclasses.fields(CellResult))


@dataclass
class RunResult:
    """A whole run: its metadata (command, machine, options, notes) and every cell measured.

    The saved JSON also holds ``cells`` and ``ratios``, the summaries report.py derives from
    ``runs``; they are written by report.py and recomputed, not read, when a run is loaded.
    """

    meta: dict[str, Any]
    runs: list[CellResult]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "runs": [r.to_json() for r in self.runs]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        return cls(data["meta"], [CellResult.from_json(r) for r in data["runs"]])

    @classmethod
    def load(cls, path: Path) -> RunResult:
        return cls.from_json(json.loads(path.read_text()))
