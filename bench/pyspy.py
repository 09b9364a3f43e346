"""Profile the s3proxy server of a running bench cell with py-spy, and summarize the profile.

``python -m bench.pyspy attach HARNESS_PID OUT.txt`` waits until the harness (``python -m bench
--designs s3proxy ...``) has an ``s3proxy serve`` child with curl clients running, then runs
``py-spy record --format raw --nonblocking`` on that server until the clients are done.
``python -m bench.pyspy top OUT.txt`` prints the leaf frames (where the CPU time is spent) and
the inclusive totals of the frames that matter, from py-spy's raw (collapsed stack) output.
py-spy is not a dependency: ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def attach(harness: int, out: Path, rate: int, limit_s: float) -> int:
    """Wait for a measured s3proxy cell of ``harness`` and record its server until it ends."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        kids = _children(harness)
        servers = [k for k in kids if "s3proxy" in _cmdline(k) and "serve" in _cmdline(k)]
        curls = [k for k in kids if _cmdline(k)[:1] == ["curl"]]
        # any curl is the cell's: the warm-up upload uses the aiohttp client
        if servers and curls:
            server = servers[0]
            print(f"recording s3proxy pid {server} ({len(curls)} clients)", file=sys.stderr)
            proc = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(server),
                    "--format",
                    "raw",
                    "--rate",
                    str(rate),
                    "--nonblocking",
                    "--output",
                    str(out),
                ]
            )
            # stop once the cell's clients are gone (py-spy writes its file on SIGINT)
            while any(_cmdline(k)[:1] == ["curl"] for k in _children(harness)):
                time.sleep(0.2)
            proc.send_signal(2)
            return proc.wait()
        time.sleep(0.1)
    print("no s3proxy cell seen", file=sys.stderr)
    return 1


FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py:12)``; site-packages paths shortened."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = "/".join(path.split("/")[-2:])
    line = f":{m.group('line')}" if m.group("line") else ""
    return f"{m.group('func')} ({path}{line})"


def top(path: Path, n: int) -> None:
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += c
        leaf[_short(frames[-1])] += c
        for f in {_short(x) for x in frames}:
            incl[f] += c
    print(f"{total} samples (active, non-idle)")
    print(f"\ntop {n} leaf frames (self time):")
    for f, c in leaf.most_common(n):
        print(f"{100 * c / total:6.1f}%  {f}")
    print(f"\ntop {n} frames by inclusive time:")
    for f, c in incl.most_common(n):
        print(f"{100 * c / total:6.1f}%  {f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attach")
    a.add_argument("harness_pid", type=int)
    a.add_argument("out", type=Path)
    a.add_argument("--rate", type=int, default=100)
    a.add_argument("--wait", type=float, default=1800)
    t = sub.add_parser("top")
    t.add_argument("profile", type=Path)
    t.add_argument("-n", type=int, default=25)
    args = p.parse_args()
    if args.cmd == "attach":
        sys.exit(attach(args.harness_pid, args.out, args.rate, args.wait))
    top(args.profile, args.n)


if __name__ == "__main__":
    main()
