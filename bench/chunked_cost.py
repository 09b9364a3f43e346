"""``python -m bench.chunked_cost``: the proxy's CPU per GiB of file, by HTTP chunk size.

A chunked upload's cost depends on its chunks: every chunk has a size line to read, and
before s3proxy.chunked each was a parser callback and a StreamReader piece of its own
(1-byte chunks cost ~1,956 CPU s per GiB of file, 64 KiB ones ~2.6). This starts moto and
``s3proxy serve`` (``--memory-budget`` 16MiB), and for each ``--chunks`` size sends one
``curl -F``-shaped upload whose body is prebuilt in HTTP chunks of that size, written by
a raw socket (no client-side framing cost in the way), then reads the answer. The proxy's
CPU is read from /proc (``bench.procs.cpu_seconds``); files are smaller for tiny chunks
(``--size`` is the 64 KiB file size, scaled down with the chunk size) so a run stays short.
A ``content-length`` row sends the same form with a Content-Length, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench import body, procs
from bench.backends import child_env, start_backend
from bench.load_config import parse_size

GIB = 1 << 30
MIB = 1 << 20
DEFAULT_CHUNKS = "1,7,100,16KiB,64KiB"


def chunk_framed(data: bytes, size: int) -> bytes:
    """``data`` in HTTP chunks of ``size`` bytes and the last chunk, built without a
    Python step per chunk: a frame repeated, the data's bytes set in it by strided
    slices (one per byte of a chunk)."""
    whole, tail = divmod(len(data), size)
    prefix = b"%x\r\n" % size
    period = len(prefix) + size + 2
    framed = bytearray(prefix + bytes(size) + b"\r\n") * whole
    view = memoryview(data)[: whole * size]
    if size <= 1024:
        for i in range(size):
            framed[len(prefix) + i :: period] = view[i::size]
    else:
        for n in range(whole):
            at = n * period + len(prefix)
            framed[at : at + size] = view[n * size : (n + 1) * size]
    if tail:
        framed += b"%x\r\n" % tail + data[-tail:] + b"\r\n"
    return bytes(framed + b"0\r\n\r\n")


def request(form: bytes, chunk: int | None) -> bytes:
    ct = f"multipart/form-data; boundary={body.JUNK_BOUNDARY}"
    head = f"POST /upload HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: {ct}\r\n"
    if chunk is None:
        return (head + f"Content-Length: {len(form)}\r\n\r\n").encode() + form
    return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunk_framed(form, chunk)


async def send(port: int, raw: bytes) -> tuple[int, float]:
    """Write ``raw`` on a new connection, read the answer; its status and the wall time."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await reader.read()  # the proxy answers, then the client closes
    writer.close()
    return int(answer.split(b" ", 2)[1]), time.perf_counter() - t0


async def run(args: Any, out: Callable[[str], None]) -> list[tuple[str, int, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="chunked-cost-") as tmp:
        work = Path(tmp)
        opts = SimpleNamespace(backend="moto", bucket="bench", region="us-east-1")
        backend = await start_backend(opts, work, work)  # type: ignore[arg-type]
        port = procs.free_port()
        argv = [
            *(sys.executable, "-m", "s3proxy", "serve", "--host", "127.0.0.1"),
            *("--port", str(port)),
            *("--endpoint-url", backend.endpoint_url, "--bucket", backend.bucket),
            *("--region", "us-east-1", "--memory-budget", args.memory_budget),
        ]
        env = child_env(backend, "us-east-1", args.src)
        # (in the temp folder: ``-m`` puts the working folder first on sys.path)
        proxy = procs.Child("s3proxy", argv, env, work, cwd=work)
        try:
            await proxy.start()
            try:
                await proxy.wait_http(f"http://127.0.0.1:{port}/healthz")
            except RuntimeError:
                out(proxy.log_path.read_text()[-2000:])
                raise
            sizes: list[int | None] = [None]
            sizes += [parse_size(s) for s in args.chunks.split(",")]
            for chunk in sizes:
                scale = 1 if chunk is None else min(1.0, chunk / (64 * 1024)) ** 0.5
                file_size = max(MIB, int(args.size * scale) // MIB * MIB)
                data = b"".join(body.chunks(1, file_size))
                raw = request(body.form_head("f.bin") + data + body.form_tail(), chunk)
                cpu0 = procs.cpu_seconds(proxy.pid)
                status, wall = await send(port, raw)
                cpu = procs.cpu_seconds(proxy.pid) - cpu0
                if status != 201:
                    raise AssertionError(f"chunk {chunk}: answered {status}")
                name = "content-length" if chunk is None else f"{chunk} B chunks"
                rows.append((name, file_size, cpu, wall))
                out(
                    f"{name:<16} file {file_size / MIB:6.0f} MiB  wire {len(raw) / MIB:7.0f} MiB"
                    f"  CPU {cpu:7.2f} s  {cpu / (file_size / GIB):9.1f} CPU s/GiB"
                    f"  {file_size / wall / 1e6:7.1f} MB/s"
                )
        finally:
            await proxy.stop()
            await backend.stop()
    return rows


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.chunked_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", type=parse_size, default=parse_size("256MiB"), help="file size")
    p.add_argument("--chunks", default=DEFAULT_CHUNKS, help="HTTP chunk sizes")
    p.add_argument("--memory-budget", default="16MiB")
    p.add_argument(
        "--src", type=Path, help="run s3proxy from this folder (a snapshot holding s3proxy/)"
    )
    asyncio.run(run(p.parse_args(argv), out))


if __name__ == "__main__":
    main()
