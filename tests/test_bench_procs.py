"""The harness's child processes: a design's long answer line is read whole."""

from __future__ import annotations

import sys
from pathlib import Path

from bench import procs


async def test_a_piped_child_may_answer_in_one_long_line(tmp_path: Path) -> None:
    # the direct design answers a job of 1,000 uploads in one ~150 kB JSON line
    line = "x" * 300_000
    child = procs.Child(
        "long-line", [sys.executable, "-c", "print('x' * 300_000)"], None, tmp_path, pipes=True
    )
    await child.start()
    try:
        assert child.proc is not None and child.proc.stdout is not None
        assert (await child.proc.stdout.readline()).rstrip() == line.encode()
    finally:
        await child.stop()
