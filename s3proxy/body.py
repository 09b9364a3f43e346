"""A part's bytes as the chunks they arrived in, sent to S3 without being joined.

Joining a part into one ``bytes`` copies every byte once more, and handing aiohttp
a ``BytesIO`` copies it again (``getbuffer`` unshares it). ``ChunkedBody`` is a
seekable file-like object for botocore (length, retries rewind it, and ``read``
serves the rare caller that hashes it) and is written by its own aiohttp payload
straight from the chunks.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter

Chunk = bytes | memoryview
WRITE_SIZE = 256 * 1024  # one socket write; aiohttp drains past 64 KiB buffered


class ChunkedBody:
    """Read-only, seekable view over a sequence of byte chunks.

    It holds the caller's sequence itself, not a copy: when the caller empties it (the
    part's memory goes back to the budget, ``budget.Reservation.cover``), the chunks go
    even if a cancelled request still holds this body, in a reference cycle that only
    the cyclic GC would free. The caller must not change it while a call sends it."""

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self.chunks = chunks
        self._size = sum(len(c) for c in self.chunks)
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        out = bytearray()
        start = 0
        for chunk in self.chunks:
            stop = start + len(chunk)
            if stop > self._pos and start < end:
                out += chunk[max(0, self._pos - start) : end - start]
            start = stop
            if start >= end:
                break
        self._pos = end
        return bytes(out)

    def getvalue(self) -> bytes:
        return b"".join(self.chunks)


class ChunkedBodyPayload(payload.Payload):
    """aiohttp payload that writes a ChunkedBody chunk by chunk, without copies."""

    _value: ChunkedBody

    def __init__(self, value: ChunkedBody, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/octet-stream")
        super().__init__(value, *args, **kwargs)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._value.getvalue().decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        remaining = len(self._value) if content_length is None else content_length
        for chunk in self._value.chunks:
            view = memoryview(chunk)
            for i in range(0, len(view), WRITE_SIZE):
                if remaining <= 0:
                    return
                piece = view[i : i + min(WRITE_SIZE, remaining)]
                await writer.write(piece)
                remaining -= len(piece)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self._value.getvalue()


payload.PAYLOAD_REGISTRY.register(ChunkedBodyPayload, ChunkedBody)
