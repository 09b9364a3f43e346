"""Where ``python -m bench`` writes: never into the committed bench/results/ unless asked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.__main__ import options

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
