"""Comparison design: ``await request.post()`` spools each file to a temp file, then upload.

This is the handler most aiohttp examples show. The whole file reaches disk before the first
byte goes to S3, so latency is receive time plus upload time and the disk sees every byte.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import IO

from aiohttp import web

from bench.designs import _server


async def _file_parts(f: IO[bytes], part_size: int) -> AsyncIterator[bytes]:
    try:
        while part := f.read(part_size):  # blocking reads, as the naive handler does
            yield part
    finally:
        f.close()


async def receive(
    request: web.Request, args: argparse.Namespace
) -> list[tuple[str, str, AsyncIterator[bytes]]]:
    form = await request.post()
    out = []
    for name, value in form.items():
        if isinstance(value, web.FileField):
            out.append((name, value.filename, _file_parts(value.file, args.part_size)))
    return out


if __name__ == "__main__":
    _server.run("naive-tempfile", receive, __doc__ or "")
