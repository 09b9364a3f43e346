"""Raw HTTP/1.1 over a socket: send exactly the bytes a test means (malformed ones
included, which no HTTP client library will send) and read the answer until the
server closes the connection or goes quiet."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    raw: bytes  # everything the server sent, status line included
    closed: bool  # the server closed the connection (rather than going quiet)
    interim: list[int] = field(default_factory=list)  # 1xx statuses before the final one

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return str(self.json()["error"]["code"])


def parse(raw: bytes, closed: bool) -> RawResponse:
    interim: list[int] = []
    rest = raw
    while True:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"no complete response in {raw[:300]!r}")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        if 100 <= status < 200:
            interim.append(status)
            continue
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        body = rest
        if "Content-Length" in headers:
            body = rest[: int(headers["Content-Length"])]
        return RawResponse(status, headers, body, raw, closed, interim)


async def exchange(
    host: str,
    port: int,
    *chunks: bytes,
    pause: float = 0.2,
    quiet: float = 3.0,
) -> RawResponse:
    """Send ``chunks`` (pausing between them, so each arrives as its own read) and
    read until the server closes the connection or sends nothing for ``quiet`` s."""
    reader, writer = await asyncio.open_connection(host, port)
    received = b""
    closed = False
    try:
        for i, chunk in enumerate(chunks):
            if i:
                await asyncio.sleep(pause)
            writer.write(chunk)
            try:
                await writer.drain()
            except ConnectionError:
                break
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), quiet)
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not data:
                closed = True
                break
            received += data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse(received, closed)
