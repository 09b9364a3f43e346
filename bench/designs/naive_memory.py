"""Comparison design: read the whole file into memory, then upload it.

The other common shortcut (``await part.read()``): no disk, but memory grows with file size
times concurrent uploads, and nothing reaches S3 until the whole file has arrived.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web

from bench.designs import _server


async def _slices(data: bytes, part_size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), part_size):
        yield data[i : i + part_size]


async def receive(
    request: web.Request, args: argparse.Namespace
) -> list[tuple[str, str, AsyncIterator[bytes]]]:
    reader = await request.multipart()
    out = []
    while (part := await reader.next()) is not None:
        if isinstance(part, BodyPartReader) and part.filename:
            data = await part.read()
            out.append((part.name or "file", part.filename, _slices(data, args.part_size)))
        elif isinstance(part, BodyPartReader):
            await part.read()
    return out


if __name__ == "__main__":
    _server.run("naive-memory", receive, __doc__ or "")
