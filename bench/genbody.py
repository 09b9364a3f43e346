"""Generated multipart/form-data upload bodies for the load generator, hashed as they go.

A load test must not be limited by its own disk or by making random bytes: each upload's
file is cut from one seeded pool (16 MiB of shake_256 output, made once per seed) in 1 MiB
windows at offsets keyed by (seed, upload number, window). So bytes are incompressible,
differ from upload to upload, are the same for an upload number on every attempt and every
run, and cost only a memoryview slice each. The sha256 of the file's bytes is computed while
they are handed to the socket, so verifying what was stored needs no second pass.

The body is exactly what a browser or ``curl -F`` sends for one file input (RFC 7578): one
part ``name="file"; filename="..."``, ``Content-Type: application/octet-stream``, CRLF
framing, the closing delimiter. Its length is known up front, so it can go with a
Content-Length (as browsers send) or chunked.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncGenerator, Callable, Iterator

WINDOW = 1 << 20  # bytes per slice of the pool handed to the socket
POOL = 16 << 20  # distinct bytes per seed; windows start anywhere in it


@functools.lru_cache(maxsize=2)
def pool(seed: int) -> bytes:
    """POOL + WINDOW pseudo-random bytes for ``seed`` (about 40 ms to make, once)."""
    return hashlib.shake_256(f"s3proxy-load:{seed}".encode()).digest(POOL + WINDOW)


def window_offset(seed: int, upload: int, index: int) -> int:
    """Where window ``index`` of upload number ``upload`` starts in the pool."""
    digest = hashlib.blake2b(f"{seed}:{upload}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % POOL


def file_chunks(seed: int, upload: int, size: int) -> Iterator[memoryview]:
    """The ``size`` file bytes of upload number ``upload``, as read-only views of the pool."""
    view = memoryview(pool(seed))
    for index in range(-(-size // WINDOW)):
        n = min(WINDOW, size - index * WINDOW)
        off = window_offset(seed, upload, index)
        yield view[off : off + n]


def file_sha256(seed: int, upload: int, size: int) -> str:
    """The hex sha256 of the file bytes (tests; the generator computes it as it streams)."""
    h = hashlib.sha256()
    for chunk in file_chunks(seed, upload, size):
        h.update(chunk)
    return h.hexdigest()


def boundary(seed: int, upload: int) -> str:
    """A multipart boundary (RFC 2046 section 5.1.1: at most 70 characters) like a browser's."""
    tag = hashlib.blake2b(f"{seed}/{upload}".encode(), digest_size=12).hexdigest()
    return f"----s3proxyload{tag}"


class UploadBody:
    """One upload's multipart/form-data body; iterate ``stream()`` once per attempt."""

    def __init__(
        self, seed: int, upload: int, size: int, filename: str = "", field: str = "file"
    ) -> None:
        self.seed = seed
        self.upload = upload
        self.size = size
        self.boundary = boundary(seed, upload)
        name = filename or f"load-{upload}.bin"
        self.preamble = (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n"
            "\r\n"
        ).encode()
        self.epilogue = f"\r\n--{self.boundary}--\r\n".encode()
        self.sha256 = ""  # the file bytes' hex sha256, set once a stream has yielded them all
        self.started = False  # whether this attempt's stream was asked for bytes (retry safety)
        self.finished = False  # whether aiohttp took the last byte (asked for more after it)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    @property
    def content_length(self) -> int:
        return len(self.preamble) + self.size + len(self.epilogue)

    async def stream(
        self, sent: Callable[[int], None] | None = None
    ) -> AsyncGenerator[bytes | memoryview, None]:
        """Yield the whole body; ``sent(n)`` is told of every n file bytes handed over.

        Sets ``started`` when aiohttp first asks for bytes, i.e. once connected with the
        headers sent: a failure before that (connection refused) sent nothing; and
        ``finished`` once it has written the closing delimiter. The file bytes are
        memoryviews of the pool (aiohttp's writer takes them as they are).
        """
        self.started = True
        self.finished = False
        yield self.preamble
        h = hashlib.sha256()
        for chunk in file_chunks(self.seed, self.upload, self.size):
            h.update(chunk)
            yield chunk
            if sent is not None:
                sent(len(chunk))
        self.sha256 = h.hexdigest()
        yield self.epilogue
        self.finished = True
