"""``python -m bench.hold_cost``: what holding a part before sending it costs a relay.

s3proxy keeps each part's chunks until S3 acknowledges it (a retry resends them), so every
byte is sent some 8 MiB after it was read. The floor design sends each read on at once,
from one small buffer it reuses. Measured: what costs is the memory a part takes, not the
delay (``streamed`` costs what ``held`` does). This relays ``--size``
bytes from a sender process to a sink process over loopback TCP, with sha256 over every
read as both do, in five ways, and reports this process's CPU per GiB (``getrusage``):

- ``floor``: ``recv_into`` one reused 256 KiB buffer, hash it, ``sendall`` it (the floor);
- ``fresh``: ``recv`` a new bytes object per read (as asyncio does), hash, send at once;
- ``held``: as ``fresh``, but the reads are held until ``--part-size`` of them have come,
  then sent one by one (as s3proxy's parts);
- ``streamed``: as ``fresh`` (each read sent at once, from cache), but kept until
  ``--part-size`` of them have come, as a design that streams a part while it fills must
  keep them for a retry: no read's memory is reused before its part is done;
- ``pooled``: ``recv_into`` two reused part-size buffers in turn, each sent once full (a
  pool of part buffers instead of a new object per read).

``held`` minus ``fresh`` is the cost of holding; ``held`` minus ``streamed`` what streaming
a part while it fills would save; ``fresh`` minus ``floor`` the cost of a new object per
read. The best of ``--repeat`` runs of each is reported (interference only adds).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import resource
import socket

READ = 256 * 1024
BLOCK = 1024 * 1024
MODES = ("floor", "fresh", "held", "streamed", "pooled")


def _sender(port: int, size: int) -> None:
    block = bytes(range(256)) * (BLOCK // 256)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(size // BLOCK):
            sock.sendall(block)


def _sink(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    buf = bytearray(BLOCK)
    with conn:
        while conn.recv_into(buf):
            pass


def _relay(mode: str, src: socket.socket, dst: socket.socket, part_size: int) -> None:
    digest = hashlib.sha256()
    if mode == "floor":
        buf = bytearray(READ)
        view = memoryview(buf)
        while n := src.recv_into(buf):
            digest.update(view[:n])
            dst.sendall(view[:n])
        return
    if mode == "pooled":
        pool = [bytearray(part_size) for _ in range(2)]
        turn = 0
        while True:
            part = memoryview(pool[turn])
            filled = 0
            while filled < part_size and (
                n := src.recv_into(part[filled:], min(READ, part_size - filled))
            ):
                digest.update(part[filled : filled + n])
                filled += n
            for at in range(0, filled, READ):
                dst.sendall(part[at : min(at + READ, filled)])
            if filled < part_size:
                return
            turn ^= 1
    held: list[bytes] = []
    filled = 0
    while True:
        data = src.recv(READ)
        if data:
            digest.update(data)
            if mode == "fresh":
                dst.sendall(data)
                continue
            if mode == "streamed":
                dst.sendall(data)
            held.append(data)
            filled += len(data)
        if mode == "streamed":
            if filled >= part_size:
                held, filled = [], 0
        elif held and (filled >= part_size or not data):
            for chunk in held:
                dst.sendall(chunk)
            held, filled = [], 0
        if not data:
            return


def run(mode: str, size: int, part_size: int) -> float:
    """CPU seconds per GiB this process spent relaying ``size`` bytes in ``mode``."""
    with (
        socket.create_server(("127.0.0.1", 0)) as sink_listener,
        socket.create_server(("127.0.0.1", 0)) as listener,
    ):
        sink = multiprocessing.Process(target=_sink, args=(sink_listener,))
        sink.start()
        dst = socket.create_connection(sink_listener.getsockname())
        sender = multiprocessing.Process(target=_sender, args=(listener.getsockname()[1], size))
        sender.start()
        src, _ = listener.accept()
        before = resource.getrusage(resource.RUSAGE_SELF)
        with src, dst:
            _relay(mode, src, dst, part_size)
        after = resource.getrusage(resource.RUSAGE_SELF)
        sender.join()
        sink.join()
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu / (size / 2**30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size", type=int, default=1024, help="MiB relayed per run")
    p.add_argument("--part-size", type=int, default=8, help="MiB held per part (held)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    args = p.parse_args()
    best = {mode: float("inf") for mode in MODES}
    for _ in range(args.repeat):
        for mode in MODES:
            best[mode] = min(best[mode], run(mode, args.size * 2**20, args.part_size * 2**20))
    print(f"CPU s/GiB relayed, best of {args.repeat} ({args.size} MiB, sha256 of every read)")
    for mode in MODES:
        print(f"{mode:<6} {best[mode]:.2f}")
    print(f"holding {args.part_size} MiB parts costs {best['held'] - best['fresh']:+.2f} CPU s/GiB")
    print(f"streaming them while they fill saves {best['held'] - best['streamed']:+.2f} CPU s/GiB")
    print(f"a pool of part buffers saves {best['held'] - best['pooled']:+.2f} CPU s/GiB")


if __name__ == "__main__":
    main()
