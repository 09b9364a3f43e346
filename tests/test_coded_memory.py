"""A content-coded body is held to the memory budget like a plain one (README "Memory").

Before: a ``Content-Encoding: gzip`` upload passed its Content-Length (the coded bytes,
100 KB for 100 MiB of zeros) to the pipeline as the most the file could be. Every part
after those first bytes reserved what was "left" of it, 1 byte, and filled 5 MiB: 20
concurrent gzip uploads of 100 MiB with a 16 MiB budget grew the proxy by 205 MiB RSS
(plain: 13), about two unreserved parts per upload. Measured in-process, the request
StreamReaders held at most 0.38 MiB each meanwhile: aiohttp inflates no further than its
high-water mark, so the decoded bytes outside the budget were never the problem.

Here the bytes of parts on their way to S3 (what the budget exists to bound) are counted
against the budget while S3 is slow, for form uploads and tus PATCHes; the decoded bytes
each request's StreamReader holds are bounded too; and every file arrives byte-exact.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import io
import random
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from s3proxy import protocol
from s3proxy.state import STATE
from tests import bodies
from tests.conftest import ProxyFactory
from tests.rawhttp import exchange
from tests.s3util import (
    MotoServer,
    ProxyProcess,
    fake_aws_env,
    head_object_async,
    read_object_async,
)
from tests.test_resources import proc_status
from tests.test_tus import _new, _patch_headers

MiB = 1024**2
BUDGET = 16 * MiB
PART = 5 * MiB
# What one request's StreamReader may hold of a decoded body: aiohttp pauses past its
# high-water mark (2 x read_bufsize, app.py) and inflates at most max(64 KiB, read_bufsize)
# per step past it.
STREAM_BOUND = 2 * (protocol.RECV_SIZE // 2) + protocol.RECV_SIZE // 2


def compressible(size: int, seed: int) -> bytes:
    """``size`` bytes that gzip to about a thousandth, distinct per ``seed``."""
    block = hashlib.sha256(b"%d" % seed).digest() * 32  # 1 KiB
    return (block * (size // len(block) + 1))[:size]


def moto_proxy(
    moto: MotoServer, bucket: str, tmp_path: Path, budget: str, *more: str
) -> ProxyProcess:
    """A proxy process on ``moto``, with this ``budget`` and 5 MiB parts."""
    args = ["--endpoint-url", moto.endpoint_url, "--bucket", bucket, "--memory-budget", budget]
    return ProxyProcess.start(
        [*args, "--part-size", "5MiB", *more], fake_aws_env(), tmp_path / "proxy.log"
    )


def reset_peak(pid: int) -> None:
    """Make the process's VmHWM its RSS now (proc(5), clear_refs): the peak from here."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class Watch:
    """The bytes of parts inside S3 calls (slowed down: they pile up if unbounded) and of
    every request's StreamReader, at their peaks."""

    def __init__(self, proxy: Any, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        state = proxy.server.app[STATE]
        self.connections = state.connections
        self.budget = state.budget
        self.sending = self.peak_sending = self.peak_stream = self.parts = 0
        sink = state.require_sink()
        original: Callable[..., Awaitable[str]] = sink.upload_part

        async def upload_part(key: str, upload_id: str, number: int, data: Any, **kw: Any) -> str:
            size = sum(len(c) for c in data)
            self.sending += size
            self.peak_sending = max(self.peak_sending, self.sending)
            self.parts += 1
            try:
                await asyncio.sleep(delay)
                return await original(key, upload_id, number, data, **kw)
            finally:
                self.sending -= size

        monkeypatch.setattr(sink, "upload_part", upload_part)

    async def sample(self) -> None:
        while True:
            for conn in self.connections.served:
                request = conn._current_request
                if request is not None:  # a body-less request's EmptyStreamReader has none
                    held = getattr(request.content, "_size", 0)
                    self.peak_stream = max(self.peak_stream, held)
            await asyncio.sleep(0.002)

    async def around(self, work: Awaitable[list[Any]]) -> list[Any]:
        sampler = asyncio.create_task(self.sample())
        try:
            return await asyncio.wait_for(work, 120)
        finally:
            assert not sampler.done(), sampler  # it failed: its peaks would be wrong
            sampler.cancel()


@pytest.fixture
async def slow_s3_proxy(
    proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Any, Watch]]:
    # 1 B/s: a body is sent at once, but one upload's wait for memory may be a while
    proxy = await proxy_factory(memory_budget=BUDGET, part_size=PART, min_upload_rate=1)
    yield proxy, Watch(proxy, monkeypatch, delay=0.05)


async def test_gzip_uploads_waiting_on_a_small_budget_stay_within_it(
    slow_s3_proxy: tuple[Any, Watch], s3: Any, bucket: str
) -> None:
    proxy, watch = slow_s3_proxy
    files = [compressible(16 * MiB + i, seed=i) for i in range(8)]

    async def one(i: int, data: bytes) -> dict[str, Any]:
        coded = gzip.compress(bodies.body([bodies.file("f", f"{i}.bin", data)]), 6)
        assert len(coded) < len(data) // 100
        resp = await proxy.post(
            "/upload", data=coded, headers={**bodies.headers(), "Content-Encoding": "gzip"}
        )
        out: dict[str, Any] = await resp.json()
        assert resp.status == 201, out
        return out

    results = await watch.around(asyncio.gather(*(one(i, d) for i, d in enumerate(files))))
    print(
        f"8 gzip uploads of 16 MiB, budget {BUDGET // MiB} MiB: parts in S3 calls peaked at "
        f"{watch.peak_sending / MiB:.1f} MiB, one StreamReader at "
        f"{watch.peak_stream / 1024:.0f} KiB"
    )
    assert watch.peak_sending <= BUDGET, "parts held outside the budget"
    assert watch.peak_stream <= STREAM_BOUND
    assert watch.parts == 8 * 4
    assert watch.budget.in_use == 0
    for out, data in zip(results, files, strict=True):
        [stored] = out["files"]
        assert stored["size"] == len(data)
        assert stored["sha256"] == hashlib.sha256(data).hexdigest()
        assert await read_object_async(s3, bucket, stored["key"]) == data


async def test_gzip_tus_patches_stay_within_the_budget(
    slow_s3_proxy: tuple[Any, Watch], s3: Any, bucket: str
) -> None:
    """A tus PATCH's machine is bounded by Upload-Length (the decoded file), not by its
    Content-Length: it was right before, and stays so."""
    proxy, watch = slow_s3_proxy
    files = [compressible(12 * MiB + i, seed=100 + i) for i in range(6)]

    async def one(data: bytes) -> str:
        url = await _new(proxy, len(data))
        resp = await proxy.patch(
            url,
            data=gzip.compress(data, 6),
            headers=_patch_headers(0, **{"Content-Encoding": "gzip"}),
        )
        assert resp.status == 204, await resp.text()
        return str(resp.headers["S3Proxy-Key"])

    keys = await watch.around(asyncio.gather(*(one(d) for d in files)))
    print(
        f"6 gzip PATCHes of 12 MiB: parts in S3 calls peaked at {watch.peak_sending / MiB:.1f} "
        f"MiB, one StreamReader at {watch.peak_stream / 1024:.0f} KiB"
    )
    assert watch.peak_sending <= BUDGET
    assert watch.peak_stream <= STREAM_BOUND
    for key, data in zip(keys, files, strict=True):
        assert await read_object_async(s3, bucket, key) == data


async def test_gzip_uploads_grow_a_proxy_process_by_the_budget_not_per_upload(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """The process's RSS, as a user runs it: 12 concurrent gzip uploads of 32 MiB (about
    32 KB each on the wire) with a 16 MiB budget. Before: +123 MiB (unreserved parts,
    about 10 MiB per upload); README's bound is the budget plus under 1 MiB per upload."""
    proxy = moto_proxy(moto, bucket, tmp_path, "16MiB", "--min-upload-rate", "1")
    size = 32 * MiB
    files = [compressible(size, seed=200 + i) for i in range(12)]
    coded = [gzip.compress(bodies.body([bodies.file("f", "z.bin", d)]), 6) for d in files]
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # warm: the first coded upload loads what every one uses
                async with session.post(
                    proxy.url + "/upload",
                    data=coded[0],
                    headers={**bodies.headers(), "Content-Encoding": "gzip"},
                ) as resp:
                    assert resp.status == 201, await resp.text()
            idle = proc_status(proxy.proc.pid, "VmRSS")
            reset_peak(proxy.proc.pid)

            async def one(body: bytes) -> dict[str, Any]:
                async with session.post(
                    proxy.url + "/upload",
                    data=io.BytesIO(body),
                    headers={**bodies.headers(), "Content-Encoding": "gzip"},
                ) as resp:
                    out: dict[str, Any] = await resp.json()
                    assert resp.status == 201, out
                    return out

            results = await asyncio.gather(*(one(b) for b in coded))
        peak = proc_status(proxy.proc.pid, "VmHWM")
    finally:
        proxy.stop()
    print(f"12 x 32 MiB gzip: idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB")
    for out, data in zip(results, files, strict=True):
        [stored] = out["files"]
        assert stored["sha256"] == hashlib.sha256(data).hexdigest()
        assert (await head_object_async(s3, bucket, stored["key"]))["ContentLength"] == size
    assert peak - idle <= BUDGET + 32 * MiB, f"+{(peak - idle) / MiB:.0f} MiB"


async def test_gzip_uploads_refused_mid_body_do_not_grow_a_proxy_process(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """RSS as a user runs it, under 120 gzip uploads of 2 MiB refused 400 for a byte
    changed at 90% of the stream, one after another (reprobe18a F1). Before: the proxy
    grew by about 0.3 MB per upload and never gave it back (400 uploads: +0.28 MB each).
    aiohttp's StreamReader keeps the body's error and raises that object in the handler,
    whose traceback then holds the handler's frames, which hold the request, its reader
    and its zlib decoder (with its input's unread rest): a cycle only the cyclic GC
    freed, and RSS stayed. ``errors.forget_tracebacks`` drops an answered error's
    tracebacks; ``protocol.drop_unread`` empties a broken body's reader."""
    proxy = moto_proxy(moto, bucket, tmp_path, "32MiB")
    data = random.Random(18).randbytes(2 * MiB)  # what gzip cannot shrink
    coded = bytearray(gzip.compress(bodies.body([bodies.file("f", "z.bin", data)]), 1))
    coded[len(coded) * 9 // 10] ^= 0xFF
    headers = {**bodies.headers(), "Content-Encoding": "gzip"}

    async def refused(session: aiohttp.ClientSession, n: int) -> None:
        for _ in range(n):
            async with session.post(
                proxy.url + "/upload", data=io.BytesIO(coded), headers=headers
            ) as resp:
                answer = await resp.json()
                assert resp.status == 400, answer
                assert answer["error"]["code"] == "BAD_HTTP_REQUEST"

    try:
        async with aiohttp.ClientSession() as session:
            await refused(session, 20)  # warm: what every such request uses is loaded
            warm = proc_status(proxy.proc.pid, "VmHWM")
            await refused(session, 120)
            after = proc_status(proxy.proc.pid, "VmHWM")
    finally:
        proxy.stop()
    # The high-water marks, not RSS now: a fresh-clone CI run saw this process at 34 MiB
    # RSS after its warm-up (74-78 in every other run, 56 of it anonymous, no swap here)
    # and 72 after, the same as ever. A leak raises the peak as much as the RSS.
    grown = (after - warm) / 120
    print(
        f"120 refused gzip uploads: peak RSS {warm / MiB:.0f} -> {after / MiB:.0f} MiB, "
        f"{grown / 1024:.1f} KiB each"
    )
    assert "Traceback" not in proxy.log_path.read_text()
    assert grown < 64 * 1024, f"{grown / 1024:.0f} KiB per refused upload"


def broken_bodies() -> dict[str, list[bytes]]:
    """Requests whose bodies break after the proxy has begun to read them, each as the
    pieces a client sends (``rawhttp.exchange``)."""
    body = bodies.body([bodies.file("f", "z.bin", random.Random(18).randbytes(2 * MiB))])
    gz = bytearray(gzip.compress(body, 1))
    gz[len(gz) * 9 // 10] ^= 0xFF
    zl = bytearray(zlib.compress(body, 1))
    zl[len(zl) * 9 // 10] ^= 0xFF
    half = len(gz) // 2
    gzip_head = bodies.request_head(len(gz), b"Content-Encoding: gzip")
    return {
        "gzip": [gzip_head + gz],
        "gzip-in-two-sends": [gzip_head + gz[:half], bytes(gz[half:])],
        "deflate": [bodies.request_head(len(zl), b"Content-Encoding: deflate") + zl],
        "not-gzip": [bodies.request_head(len(body), b"Content-Encoding: gzip") + body],
        "bad-chunk-size": [
            bodies.chunked_request_head() + bodies.chunk_frame(body[:MiB]) + b"zz\r\nxx\r\n"
        ],
        "no-closing-boundary": [bodies.request_head(len(body) - 10) + body[:-10]],
    }


@pytest.mark.parametrize("name", list(broken_bodies()))
async def test_a_broken_body_leaves_no_frames_for_the_cyclic_gc(
    proxy_factory: ProxyFactory, name: str
) -> None:
    """A refused body's error is kept by its reader, and a traceback on it holds the
    frames that read it, which hold the reader: a cycle that keeps the reader (its
    decoder, its buffered body) until the cyclic GC runs, which a busy process may not do
    for a long while (reprobe18a F1: 0.28 MB per gzip upload refused mid-body). Here the
    cyclic GC is off, and what it would find after 10 such requests may hold none of the
    proxy's or aiohttp's frames. Before: every gzip body that broke while aiohttp drained
    the rest of it after the answer (its lingering read, logged ``http.bad_body_unread``)
    left aiohttp's connection frame and the reader's ``readany`` in garbage."""
    proxy: Any = await proxy_factory(memory_budget=32 * MiB, part_size=PART)
    pieces = broken_bodies()[name]
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        answers = [
            await exchange(proxy.host, proxy.port, *pieces, pause=0.01, quiet=5) for _ in range(10)
        ]
        gc.collect()
        frames = [
            f"{f.f_code.co_filename.rsplit('/', 2)[-2:]} {f.f_code.co_name}"
            for f in gc.garbage
            if type(f).__name__ == "frame"
            # the proxy's code; a client reset mid-send leaves asyncio frames of its own
            and any(root in f.f_code.co_filename for root in ("/aiohttp/", "/s3proxy/"))
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert {a.status for a in answers} == {400}, [a.raw[:200] for a in answers]
    assert frames == [], frames
