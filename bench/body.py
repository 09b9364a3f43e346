"""Reproducible pseudo-random upload bodies, generated on the fly.

Generating fresh random bytes costs more CPU than the servers under test spend per byte, so
a body is cut from a 16 MiB pool (derived from the seed) in 1 MiB windows at pseudo-random
offsets: free to produce, incompressible, not deduplicable at block boundaries, and the same
for a given (seed, size) on every run, so its sha256 is computed once.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path

BLOCK = 1 << 20
POOL = 16 << 20


@functools.lru_cache(maxsize=4)
def _pool(seed: int) -> bytes:
    return hashlib.shake_256(f"s3proxy-bench:{seed}".encode()).digest(POOL + BLOCK)


def _offset(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % POOL


def chunks(seed: int, size: int, kind: str = "random") -> Iterator[memoryview]:
    """Yield the body of ``size`` bytes for ``seed`` as read-only 1 MiB (or shorter) views."""
    if kind == "junk":
        yield from _junk_chunks(seed, size)
        return
    view = memoryview(_pool(seed))
    for index in range(-(-size // BLOCK)):
        n = min(BLOCK, size - index * BLOCK)
        off = _offset(seed, index)
        yield view[off : off + n]


# Junk: a file that is hard on a multipart parser, sent with this boundary (the near-misses
# are built from it). It holds no ``CRLF--JUNK_BOUNDARY``, so it is a valid file part.
JUNK_BOUNDARY = "s3proxy-bench-junk-7f3a9c"
DELIMITER = b"\r\n--" + JUNK_BOUNDARY.encode()


def _near_misses() -> list[bytes]:
    b = JUNK_BOUNDARY.encode()
    return [
        b"\r\n--" + b[:-1],  # the delimiter but its last byte
        b"\r\n--" + b[:-1] + b"X",  # ... with another last byte
        b"\r\n--" + b[: len(b) // 2],  # half of it
        b"\r\n-" + b,  # one dash short
        b"\n--" + b,  # no CR
        b"\r--" + b,  # no LF
        b"--" + b + b"--",  # a closing delimiter's line without the CRLF before it
        b"\r\n\r\n--" + b[:-1] + b"\r\n",
    ]


@functools.lru_cache(maxsize=4)
def junk_block(seed: int) -> bytes:
    """1 MiB of junk: runs of CRLFs, near-boundaries and dashes, with a few random bytes.

    The body repeats this block, so it must not hold the delimiter, nor make one where it
    meets its own start.
    """
    rnd = hashlib.shake_256(f"s3proxy-bench-junk:{seed}".encode()).digest(4 * BLOCK)
    near = _near_misses()
    out = bytearray()
    i = 0
    while len(out) < BLOCK:
        r = rnd[i]
        n = 1 + rnd[i + 1] % 64
        i += 2
        match r % 5:
            case 0:
                out += b"\r\n" * n
            case 1 | 2:
                out += near[rnd[i] % len(near)]
                i += 1
            case 3:
                out += b"-" * (2 * n)
            case _:
                out += rnd[i : i + n]
                i += n
    # Runs that happen to meet as a delimiter lose its last byte; the block ends in a byte
    # the delimiter has none of, so it cannot make one with the next block's start either.
    block = bytes(out[: BLOCK - 1]).replace(DELIMITER, DELIMITER[:-1] + b"X") + b"Z"
    if DELIMITER in block + block:  # pragma: no cover - by construction
        raise AssertionError("the junk block holds the multipart delimiter")
    return block


def _junk_chunks(seed: int, size: int) -> Iterator[memoryview]:
    view = memoryview(junk_block(seed))
    for index in range(-(-size // BLOCK)):
        yield view[: min(BLOCK, size - index * BLOCK)]


def form_head(filename: str, boundary: str = JUNK_BOUNDARY) -> bytes:
    """The start of a one-file multipart/form-data body, as curl -F writes it."""
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def form_tail(boundary: str = JUNK_BOUNDARY) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode()


def offsets(seed: int, size: int) -> list[int]:
    """Where each 1 MiB window of the body starts in the pool (the Node.js client's input)."""
    return [_offset(seed, index) for index in range(-(-size // BLOCK))]


@functools.lru_cache(maxsize=64)
def sha256(seed: int, size: int, kind: str = "random") -> str:
    """The hex sha256 every uploaded copy of this body must have."""
    h = hashlib.sha256()
    for chunk in chunks(seed, size, kind):
        h.update(chunk)
    return h.hexdigest()


def write_file(seed: int, size: int, path: Path, kind: str = "random") -> Path:
    """Write the body to ``path`` (for curl, which needs a file to send a Content-Length).

    A junk body is written as a whole multipart/form-data body with ``JUNK_BOUNDARY`` (curl
    -F would choose its own boundary, and the near-misses must be near the real one)."""
    with path.open("wb") as f:
        if kind == "junk":
            f.write(form_head(path.name))
        for chunk in chunks(seed, size, kind):
            f.write(chunk)
        if kind == "junk":
            f.write(form_tail())
    return path
