"""The upload clients: real ``curl -F`` processes, and an aiohttp client that streams.

curl is what users run; it reads its body from a file and sends a Content-Length, as browsers
do. The aiohttp client sends the same bytes straight from the generator (also with a
Content-Length), so it needs nothing on disk. Both report the key the server gave each object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractStreamWriter

from bench import body, procs

KINDS = ("curl", "aiohttp")  # what --clients offers (direct's own client is "builtin")


@dataclass
class Upload:
    """One upload as the client saw it."""

    ok: bool
    latency: float
    size: int
    keys: list[str] = field(default_factory=list)
    status: int = 0
    error: str = ""


def _parse_reply(status: int, text: str, size: int, latency: float) -> Upload:
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = None
    if status != 201 or not isinstance(data, dict):
        return Upload(False, latency, 0, status=status, error=f"HTTP {status}: {text[:300]}")
    files = data.get("files") or []
    keys = [f["key"] for f in files if isinstance(f, dict) and "key" in f]
    sizes = [f.get("size") for f in files if isinstance(f, dict)]
    if len(keys) != 1:
        return Upload(False, latency, 0, keys, status, f"expected 1 file, got {text[:300]}")
    # A wrong reported size is the server's bug but not a lost upload: the object itself is
    # checked afterwards, so it is counted apart (multer-s3 reports 0 for streamed files).
    misreport = "" if sizes[0] == size else f"reported size {sizes[0]} != {size}"
    return Upload(True, latency, size, keys, status, misreport)


class Progress:
    """Bytes sent so far by the clients of the running cell (read by the progress bar)."""

    def __init__(self) -> None:
        self.sent = 0
        self.curl_pids: set[int] = set()

    def curl_bytes(self) -> int:
        return sum(procs.io_chars(pid)[0] for pid in list(self.curl_pids))


async def curl_upload(
    url: str,
    path: Path,
    size: int,
    name: str,
    limit_s: float,
    progress: Progress,
    kind: str = "random",
) -> Upload:
    """``curl -F file=@PATH`` as a user would type it; the reply and timing via ``-w``.

    A junk body's file is already the whole form (its near-boundaries need the boundary
    known), so curl sends it as it is, with that boundary in its Content-Type.
    """
    if kind == "junk":
        send = [
            "-H",
            f"Content-Type: multipart/form-data; boundary={body.JUNK_BOUNDARY}",
            "--data-binary",
            f"@{path}",
        ]
    else:
        send = ["-F", f"file=@{path};filename={name};type=application/octet-stream"]
    argv = [
        "curl",
        "-sS",
        "--max-time",
        f"{limit_s:.0f}",
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{time_total}",
        *send,
        url,
    ]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    progress.curl_pids.add(proc.pid)
    try:
        out, err = await proc.communicate()
    finally:
        progress.curl_pids.discard(proc.pid)
    latency = time.perf_counter() - t0
    text, _, tail = out.decode(errors="replace").rpartition("\n")
    status = int(tail.split()[0]) if tail.split() else 0
    if proc.returncode != 0:
        return Upload(
            False,
            latency,
            0,
            status=status,
            error=f"curl exit {proc.returncode}: {err.decode(errors='replace')[:300]}",
        )
    return _parse_reply(status, text, size, latency)


class _BodyPayload(aiohttp.payload.Payload):
    """The generated body as an aiohttp payload with a known size (so Content-Length is set)."""

    def __init__(self, seed: int, size: int, progress: Progress, kind: str = "random") -> None:
        super().__init__(None, content_type="application/octet-stream")
        self._seed = seed
        self._size = size  # Payload's own field: it sets Content-Length
        self._length = size  # the same, typed int (Payload types _size as int | None)
        self._progress = progress
        self._kind = kind

    async def write(self, writer: AbstractStreamWriter) -> None:
        for chunk in body.chunks(self._seed, self._length, self._kind):
            await writer.write(chunk)
            self._progress.sent += len(chunk)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("binary body")


async def aiohttp_upload(
    session: aiohttp.ClientSession,
    url: str,
    seed: int,
    size: int,
    name: str,
    limit_s: float,
    progress: Progress,
    kind: str = "random",
) -> Upload:
    boundary = body.JUNK_BOUNDARY if kind == "junk" else None
    with aiohttp.MultipartWriter("form-data", boundary) as form:
        payload = _BodyPayload(seed, size, progress, kind)
        payload.set_content_disposition("form-data", name="file", filename=name)
        form.append_payload(payload)
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=form, timeout=aiohttp.ClientTimeout(total=limit_s)) as r:
            text = await r.text()
            return _parse_reply(r.status, text, size, time.perf_counter() - t0)
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        return Upload(False, time.perf_counter() - t0, 0, error=f"{type(e).__name__}: {e}")


async def run_clients(
    kind: str,
    url: str,
    count: int,
    seed: int,
    size: int,
    body_file: Path | None,
    limit_s: float,
    progress: Progress,
    total: int | None = None,
    body_kind: str = "random",
) -> list[Upload]:
    """Start ``count`` uploads at once and wait for all of them; with ``total``, send that
    many uploads in all, ``count`` at a time (each client starts its next upload as soon as
    its last one is answered: the small-files cell)."""
    names = [f"bench-{size}-{i}.bin" for i in range(total or count)]
    slots = asyncio.Semaphore(count)
    if kind == "curl":
        assert body_file is not None

        async def by_curl(name: str) -> Upload:
            async with slots:
                return await curl_upload(url, body_file, size, name, limit_s, progress, body_kind)

        return list(await asyncio.gather(*(by_curl(n) for n in names)))
    connector = aiohttp.TCPConnector(limit=count, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def by_aiohttp(name: str) -> Upload:
            async with slots:
                return await aiohttp_upload(
                    session, url, seed, size, name, limit_s, progress, body_kind
                )

        return list(await asyncio.gather(*(by_aiohttp(n) for n in names)))


async def direct_job(
    proc: asyncio.subprocess.Process,
    count: int,
    seed: int,
    size: int,
    prefix: str,
    limit_s: float,
    total: int | None = None,
    body_kind: str = "random",
) -> list[Upload]:
    """Hand one job to the direct design's process and read its per-upload results
    (``total`` uploads, ``count`` at a time; by default ``count`` at once)."""
    assert proc.stdin is not None and proc.stdout is not None
    job = {
        "count": total or count,
        "concurrency": count,
        "seed": seed,
        "size": size,
        "prefix": prefix,
        "body": body_kind,
    }
    proc.stdin.write((json.dumps(job) + "\n").encode())
    await proc.stdin.drain()
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), limit_s)
    except TimeoutError:
        return [Upload(False, limit_s, 0, error="direct: timed out")] * (total or count)
    with contextlib.suppress(ValueError):
        uploads = json.loads(line)["uploads"]
        return [
            Upload(
                u["ok"],
                u["latency"],
                u["size"] if u["ok"] else 0,
                [u["key"]],
                error=u.get("error", ""),
            )
            for u in uploads
        ]
    return [Upload(False, 0.0, 0, error=f"direct: bad reply {line[:200]!r}")] * (total or count)
