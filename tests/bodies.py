"""Raw multipart/form-data bodies built by hand, so tests control every byte."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

BOUNDARY = "----s3proxytestboundary7MA4YWxkTrZu0gW"
MiB = 1024**2


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None
    extra_disposition: str = ""


def opaque(size: int, seed: int = 0) -> bytes:
    """Random-looking bytes libmagic calls application/octet-stream, always.

    For tests that depend on the sniffed type: 1.1% of ``os.urandom(100)`` start like
    something libmagic knows (x-dosexec, zlib, audio, even text/plain; 20,000 tried),
    and one CI run stored a test's "unknown" file as application/zlib. Seeded, so the
    same bytes every run (tests/test_sniff.py checks the verdict)."""
    return random.Random(seed).randbytes(size)


def file(
    name: str, filename: str, data: bytes, content_type: str | None = "application/octet-stream"
) -> Part:
    return Part(name, data, filename, content_type)


def field(name: str, value: str) -> Part:
    return Part(name, value.encode())


def part_head(p: Part, boundary: str = BOUNDARY) -> bytes:
    disp = f'form-data; name="{p.name}"'
    if p.filename is not None:
        disp += f'; filename="{p.filename}"'
    disp += p.extra_disposition
    head = f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
    if p.content_type:
        head += f"Content-Type: {p.content_type}\r\n"
    return (head + "\r\n").encode()


def body(parts: Iterable[Part], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    out = bytearray()
    for p in parts:
        out += part_head(p, boundary) + p.data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def request_head(length: int, *extra: bytes) -> bytes:
    """The head of a raw POST /upload, for tests that write the body themselves."""
    return (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % length
        + b"".join(e + b"\r\n" for e in extra)
        + b"Content-Type: multipart/form-data; boundary=%s\r\n\r\n" % BOUNDARY.encode()
    )


def headers(boundary: str = BOUNDARY) -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def chunked(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """An async generator has no length, so aiohttp sends it chunked."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def pdf(size: int) -> bytes:
    head = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
    return head + os.urandom(max(0, size - len(head)))


def raw_part(disposition: bytes, data: bytes, *header_lines: bytes) -> bytes:
    """One part with its Content-Disposition value and header lines given as raw bytes."""
    head = b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n"
    return head + b"".join(h + b"\r\n" for h in header_lines) + b"\r\n" + data + b"\r\n"


def raw_body(*parts: bytes, preamble: bytes = b"") -> bytes:
    """Parts from raw_part, closed by the final boundary."""
    return preamble + b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"


def chunk_frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunked transfer-coding chunk (an empty one ends the body)."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


def chunked_request_head(*extra: bytes) -> bytes:
    """The head of a raw chunked POST /upload."""
    return (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + b"".join(e + b"\r\n" for e in extra)
        + b"Content-Type: multipart/form-data; boundary=%s\r\n\r\n" % BOUNDARY.encode()
    )
