"""Where ``python -m bench`` writes: never into the committed bench/results/ unless asked."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from bench import designs
from bench.__main__ import options, parse_cell
from bench.backends import Backend
from bench.options import CellSpec

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@pytest.mark.parametrize(
    "argv",
    [[], ["--smoke"], ["--quick"], ["--matrix", "readme"], ["--matrix", "full", "--reps", "2"]],
)
def test_a_default_run_writes_outside_the_committed_results(argv: list[str]) -> None:
    out = options(argv)[0].out
    assert not out.resolve().is_relative_to(RESULTS)
    # ignored by git, so a run leaves `git status` as it was
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "-q", str(out / "latest.json")]
    )
    assert ignored.returncode == 0, f"{out} is not ignored by git"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--matrix", "readme", "--update-readme"], RESULTS),
        (["--update-readme", "--out", "/tmp/x"], Path("/tmp/x")),
        (["--smoke", "--out", "bench/results/issue-x"], Path("bench/results/issue-x")),
    ],
)
def test_committed_results_are_written_only_when_asked(argv: list[str], expected: Path) -> None:
    assert options(argv)[0].out == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256MiB:4", CellSpec(256 << 20, 4)),
        ("100KiB:16x1000", CellSpec(100 << 10, 16, 1000)),
        ("1GiB:1:junk", CellSpec(1 << 30, 1, 0, "junk")),
        ("1MiB:2x10:junk", CellSpec(1 << 20, 2, 10, "junk")),
    ],
)
def test_cells_are_given_as_specs(text: str, expected: CellSpec) -> None:
    assert parse_cell(text) == expected
    assert options(["--cells", text])[0].specs == [expected]


@pytest.mark.parametrize("text", ["1GiB", "1GiB:0", "1GiB:x", "1GiB:1:zeros", "1GiB:2x-1"])
def test_a_bad_cell_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_cell(text)


def test_small_files_is_a_thousand_uploads_of_100_kib_sixteen_at_a_time() -> None:
    [spec] = options(["--small-files"])[0].specs
    assert (spec.size, spec.concurrency, spec.uploads) == (100 * 1024, 16, 1000)
    specs = options(["--cells", "1GiB:1", "--small-files"])[0].specs
    assert [s.size for s in specs] == [1 << 30, 100 * 1024]


def test_the_floor_runs_in_every_named_matrix_but_the_smoke_one() -> None:
    assert "floor" not in options(["--smoke"])[0].designs  # CI's: kept within its time
    for argv in ([], ["--quick"], ["--matrix", "readme"]):
        assert "floor" in options(argv)[0].designs


def test_an_a_b_of_s3proxy_flags_runs_s3proxy_twice() -> None:
    opts = options(
        ["--s3proxy-args", "--event-loop asyncio", "--s3proxy-b-args", "--event-loop uvloop"]
    )[0]
    b = Backend("moto", "http://127.0.0.1:1", "b", "k", "s", None, True, _never)
    a_argv = designs.argv("s3proxy", 1, b, opts, None)
    b_argv = designs.argv(designs.S3PROXY_B, 1, b, opts, None)
    assert a_argv[-2:] == ["--event-loop", "asyncio"]
    assert b_argv[-2:] == ["--event-loop", "uvloop"]
    assert a_argv[:-2] == b_argv[:-2]


async def _never() -> None:
    raise AssertionError
