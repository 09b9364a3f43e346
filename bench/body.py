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


def chunks(seed: int, size: int) -> Iterator[memoryview]:
    """Yield the body of ``size`` bytes for ``seed`` as read-only 1 MiB (or shorter) views."""
    view = memoryview(_pool(seed))
    for index in range(-(-size // BLOCK)):
        n = min(BLOCK, size - index * BLOCK)
        off = _offset(seed, index)
        yield view[off : off + n]


def offsets(seed: int, size: int) -> list[int]:
    """Where each 1 MiB window of the body starts in the pool (the Node.js client's input)."""
    return [_offset(seed, index) for index in range(-(-size // BLOCK))]


@functools.lru_cache(maxsize=64)
def sha256(seed: int, size: int) -> str:
    """The hex sha256 every uploaded copy of this body must have."""
    h = hashlib.sha256()
    for chunk in chunks(seed, size):
        h.update(chunk)
    return h.hexdigest()


def write_file(seed: int, size: int, path: Path) -> Path:
    """Write the body to ``path`` (for curl, which needs a file to send a Content-Length)."""
    with path.open("wb") as f:
        for chunk in chunks(seed, size):
            f.write(chunk)
    return path
