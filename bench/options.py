"""The options of one run (the CLI fills them in) and where the bench keeps its files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The committed, official results; a run writes here only when asked (--out, --update-readme).
RESULTS_DIR = REPO / "bench" / "results"
# Where runs go by default: ignored by git, so a run never overwrites committed results.
RUNS_DIR = REPO / "bench" / "runs"


@dataclass(frozen=True)
class CellSpec:
    """One cell beyond the size x concurrency grid (``--cells``, ``--small-files``).

    ``count`` uploads in all, ``concurrency`` at a time (0: one each, the grid's cells);
    ``body`` is what every file holds: ``random`` or ``junk`` (bench/body.py).
    """

    size: int
    concurrency: int
    count: int = 0
    body: str = "random"

    @property
    def uploads(self) -> int:
        return self.count or self.concurrency


@dataclass
class Options:
    """Everything one run needs."""

    sizes: list[int]
    concurrency: list[int]
    designs: list[str]
    clients: list[str]
    reps: int = 1
    backend: str = "seaweedfs"  # seaweedfs | moto | external
    endpoint_url: str | None = None
    bucket: str = "uploads"
    region: str = "us-east-1"
    seed: int = 1
    part_size: int = 8 << 20
    parts_in_flight: int = 2
    memory_budget: int = 64 << 20
    sign_payload: bool = False  # s3proxy's default; every design is given the same
    # (size, concurrency) pairs to run; empty: every size with every concurrency
    cells: list[tuple[int, int]] = field(default_factory=list)
    s3proxy_args: list[str] = field(default_factory=list)
    # Which s3proxy to measure: None copies the working tree's s3proxy/ once at the start (so
    # edits made while the run goes on do not change it halfway); a git revision exports that.
    s3proxy_rev: str | None = None
    out: Path = RUNS_DIR
    cache_dir: Path = Path.home() / ".cache" / "s3proxy-bench"
    sample_interval: float = 0.05
    preset: str = "custom"
    command: str = ""
    # Cells given as specs (--cells, --small-files): run instead of the grid when set.
    specs: list[CellSpec] = field(default_factory=list)
    # A second s3proxy design, "s3proxy-b", run with these flags instead (--s3proxy-b-args):
    # an A/B of one setting in the same run (e.g. --event-loop asyncio against uvloop).
    s3proxy_b_args: list[str] | None = None
    # ... and/or as of this git revision (--s3proxy-b-rev): a before/after in one run.
    s3proxy_b_rev: str | None = None
