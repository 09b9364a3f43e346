"""Profile the s3proxy server of a running bench cell with py-spy, and summarize the profile.

``python -m bench.pyspy attach HARNESS_PID OUT.txt`` waits until the harness (``python -m bench
--designs s3proxy ...``) has an ``s3proxy serve`` child with curl clients running, then runs
``py-spy record --format raw --nonblocking`` on that server until the clients are done.
``python -m bench.pyspy top OUT.txt`` prints the leaf frames (where the CPU time is spent) and
the inclusive totals of the frames that matter, from py-spy's raw (collapsed stack) output.
py-spy is not a dependency: ``pip install py-spy``.
``python -m bench.pyspy attach --perf HARNESS_PID OUT.data`` records with Linux ``perf``
instead (CPU time only; py-spy's samples are wall time, see ``attach_perf``) and
``python -m bench.pyspy split OUT.data`` prints the CPU by library and the top symbols.
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


def _cell_server(harness: int, limit_s: float) -> int | None:
    """The ``s3proxy serve`` child of ``harness`` once a measured cell's clients run."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        kids = _children(harness)
        servers = [k for k in kids if "s3proxy" in _cmdline(k) and "serve" in _cmdline(k)]
        curls = [k for k in kids if _cmdline(k)[:1] == ["curl"]]
        # any curl is the cell's: the warm-up upload uses the aiohttp client
        if servers and curls:
            print(f"recording s3proxy pid {servers[0]} ({len(curls)} clients)", file=sys.stderr)
            return servers[0]
        time.sleep(0.1)
    print("no s3proxy cell seen", file=sys.stderr)
    return None


def _record(harness: int, command: list[str]) -> int:
    """Run a recorder until the cell's clients are gone (both write their file on SIGINT)."""
    proc = subprocess.Popen(command)
    while any(_cmdline(k)[:1] == ["curl"] for k in _children(harness)):
        time.sleep(0.2)
    proc.send_signal(2)
    return proc.wait()


def attach(harness: int, out: Path, rate: int, limit_s: float) -> int:
    """Wait for a measured s3proxy cell of ``harness`` and record its server until it ends."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    server = _cell_server(harness, limit_s)
    if server is None:
        return 1
    raw = ["--format", "raw", "--rate", str(rate), "--nonblocking", "--output", str(out)]
    return _record(harness, [spy, "record", "--pid", str(server), *raw])


def attach_perf(harness: int, out: Path, rate: int, limit_s: float) -> int:
    """``attach`` with Linux ``perf record`` (CPU-clock samples, on-CPU only), for ``split``.

    py-spy samples wall time: a thread preempted inside a loopback ``send`` (which wakes
    the store on the other core's run queue) counts as busy there, so py-spy makes socket
    writes look dearer than their CPU. perf counts only CPU time, by library."""
    server = _cell_server(harness, limit_s)
    if server is None:
        return 1
    return _record(harness, ["perf", "record", "-F", str(rate), "-p", str(server), "-o", str(out)])


def _perf_report(path: Path, sort: str) -> str:
    command = ["perf", "report", "-i", str(path), "--sort", sort, "--stdio", "-q"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip("\n")


def split(path: Path) -> None:
    """Where the CPU went, by library (``perf report --sort dso``): the kernel's socket
    work, libcrypto (the file's sha256), libpython (the interpreter, and ``bytes.find``:
    the multipart scan), awscrt (the CRC64NVME), libmagic (the type sniff)."""
    print(_perf_report(path, "dso"))
    print("\ntop symbols:")
    print("\n".join(_perf_report(path, "dso,sym").splitlines()[:15]))


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
    a.add_argument("--perf", action="store_true", help="record with Linux perf, for split")
    sp = sub.add_parser("split")
    sp.add_argument("profile", type=Path)
    t = sub.add_parser("top")
    t.add_argument("profile", type=Path)
    t.add_argument("-n", type=int, default=25)
    args = p.parse_args()
    if args.cmd == "attach":
        record = attach_perf if args.perf else attach
        sys.exit(record(args.harness_pid, args.out, args.rate, args.wait))
    if args.cmd == "split":
        split(args.profile)
        return
    top(args.profile, args.n)


if __name__ == "__main__":
    main()
