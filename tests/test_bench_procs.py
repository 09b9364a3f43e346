"""The harness's child processes: a design's long answer line is read whole."""

from __future__ import annotations

import subprocess
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


def test_cpu_seconds_counts_a_few_milliseconds_that_ticks_would_miss() -> None:
    """A child spends 3 ms of CPU between two readings: /proc's 10 ms ticks show 0 or 10 ms
    for that, which left a small cell's floor at 0 s and its ratio unknown (a bench smoke
    test failed in CI)."""
    spin = (
        "import sys, time\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.003: pass\n"
        "print('spun', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        before = procs.cpu_seconds(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "spun\n"
        spent = procs.cpu_seconds(child.pid) - before
        assert 0.003 <= spent < 0.0095, spent
    finally:
        child.communicate("")
