"""``python -m bench.parser_cost``: CPU per GiB of s3proxy's body parser, good and hostile bodies.

Issue #15's worst case: Python multipart parsers that scan line by line drop from GB/s to
10-50 MB/s on a body of "junk" (CRLF runs, near-boundaries, dash runs). This feeds one
multipart/form-data body per case through what s3proxy runs on every upload, in process and
without sockets: aiohttp's StreamReader (fed 256 KiB at a time, with its flow control),
aiohttp's MultipartReader, and s3proxy.form's ``iter_form`` reading the file part in
``--read-buffer`` chunks, as the pipeline does (whole chunks, scanned for the part's end
by s3proxy.delimiter). Nothing is hashed or sent: this is the parser alone. ``aiohttp``
rows read the file part with aiohttp's ``read_chunk`` alone (what s3proxy.form used
before issue #15: a window copy and a join per chunk).

Bodies (bench/body.py): ``random`` is the bench's usual file, ``junk`` its hostile one (every
MiB holds about 4,000 near-boundaries and 170,000 CRLFs), ``crlf`` nothing but CRLFs, and
``near`` nothing but the delimiter minus its last byte, back to back. CPU time is
``time.process_time`` (this process only; the best of ``--repeat``, since other load only
ever adds time), MB/s is the body's size over the wall time of that best run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aiohttp import BodyPartReader, MultipartReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from bench import body
from bench.load_config import parse_size
from s3proxy.form import FilePart, FormLimits, iter_form

GIB = 1 << 30
FEED = 256 * 1024  # what one socket read hands aiohttp (s3proxy's --read-buffer)
BODIES = ("random", "junk", "crlf", "near")


class Feed(BaseProtocol):
    """The StreamReader's protocol: its pause/resume gate the feeder, as they would a socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.transport = asyncio.Transport()  # "connected": StreamReader waits only then
        self.room = asyncio.Event()
        self.room.set()

    def pause_reading(self) -> None:
        self._reading_paused = True
        self.room.clear()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        self.room.set()


def file_chunks(kind: str, size: int, seed: int = 1) -> Iterator[memoryview | bytes]:
    """The file part's content for ``kind``, in pieces."""
    if kind in ("random", "junk"):
        yield from body.chunks(seed, size, kind)
        return
    unit = b"\r\n" if kind == "crlf" else body.DELIMITER[:-1]
    block = unit * (body.BLOCK // len(unit))
    for start in range(0, size, len(block)):
        yield block[: min(len(block), size - start)]


def form_body(kind: str, size: int) -> bytes:
    """A whole one-file form (head, file, closing delimiter) with bench/body.py's boundary."""
    return b"".join([body.form_head("f.bin"), *file_chunks(kind, size), body.form_tail()])


def _headers() -> CIMultiDictProxy[str]:
    ct = f"multipart/form-data; boundary={body.JUNK_BOUNDARY}"
    return CIMultiDictProxy(CIMultiDict({"Content-Type": ct}))


async def _feed(stream: StreamReader, proto: Feed, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(view), FEED):
        await proto.room.wait()
        stream.feed_data(bytes(view[i : i + FEED]))  # a socket read makes new bytes too
        await asyncio.sleep(0)
    stream.feed_eof()


async def parse(data: bytes, chunk: int, wrapper: bool) -> int:
    """Parse one body as s3proxy does (``wrapper``) or with aiohttp alone; the file's size."""
    loop = asyncio.get_running_loop()
    proto = Feed(loop)
    stream = StreamReader(proto, FEED, loop=loop)
    feeder = asyncio.create_task(_feed(stream, proto, data))
    reader = MultipartReader(_headers(), stream)
    got = 0
    if wrapper:
        limits = FormLimits(20, 100, 64 * 1024, 1 << 40, chunk)
        async for item in iter_form(reader, limits, lambda: stream.total_bytes):
            if isinstance(item, FilePart):
                while piece := await item.source.read(chunk):
                    got += len(piece)
    else:
        part = await reader.next()
        assert isinstance(part, BodyPartReader)
        while piece := await part.read_chunk(chunk):
            got += len(piece)
    await feeder
    return got


@dataclass
class Row:
    parser: str
    body: str
    size: int
    cpu_s: float
    wall_s: float

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.size / GIB)

    @property
    def mbps(self) -> float:
        return self.size / self.wall_s / 1e6


def measure(kind: str, size: int, chunk: int, wrapper: bool, repeat: int) -> Row:
    data = form_body(kind, size)
    best: tuple[float, float] | None = None
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        got = asyncio.run(parse(data, chunk, wrapper))
        c1, w1 = time.process_time(), time.perf_counter()
        if got != size:
            raise AssertionError(f"{kind}: parsed {got} bytes of {size}")
        best = min(best or (c1 - c0, w1 - w0), (c1 - c0, w1 - w0))
    assert best is not None
    return Row("s3proxy.form" if wrapper else "aiohttp", kind, size, *best)


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> list[Row]:
    p = argparse.ArgumentParser(
        prog="python -m bench.parser_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", type=parse_size, default=parse_size("256MiB"), help="file size")
    p.add_argument("--chunk", type=parse_size, default=FEED, help="read size (--read-buffer)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the best is shown")
    p.add_argument("--bodies", default=",".join(BODIES), help=f"from {','.join(BODIES)}")
    args = p.parse_args(argv)
    rows = [
        measure(kind, args.size, args.chunk, wrapper, args.repeat)
        for kind in args.bodies.split(",")
        for wrapper in (True, False)
    ]
    normal = {r.parser: r.cpu_s_per_gib for r in rows if r.body == "random"}
    out(f"{'parser':<13} {'body':<7} {'MB/s':>8} {'CPU s/GiB':>10} {'x random':>9}")
    for r in rows:
        ratio = r.cpu_s_per_gib / normal[r.parser] if normal.get(r.parser) else float("nan")
        out(f"{r.parser:<13} {r.body:<7} {r.mbps:8.0f} {r.cpu_s_per_gib:10.3f} {ratio:9.2f}")
    return rows


if __name__ == "__main__":
    main()
