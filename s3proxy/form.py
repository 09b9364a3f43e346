"""aiohttp's multipart reader behind a small iterator of fields and files, with the limits.

Parsing is aiohttp's (``MultipartReader`` / ``BodyPartReader.read_chunk``); this
module only walks the parts in order, enforces counts and sizes as bytes arrive,
and turns the reader's many failure modes into the two a client can be told
about: the body was malformed, or the client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError, PayloadEncodingError

from s3proxy.errors import (
    CLIENT_DISCONNECTED,
    CLIENT_TIMEOUT,
    FIELD_TOO_LARGE,
    INVALID_FIELD,
    MALFORMED_MULTIPART,
    REQUEST_TOO_LARGE,
    TOO_MANY_FIELDS,
    TOO_MANY_FILES,
    ProxyError,
)

MAX_EMPTY_READS = 4  # aiohttp returns b"" a few times at a truncated end before it raises


@dataclass(frozen=True)
class FormLimits:
    max_files: int
    max_fields: int
    max_field_size: int
    max_request_size: int
    chunk_size: int
    idle_timeout: float = 60.0  # seconds without a byte from the client


@dataclass(frozen=True)
class Field:
    name: str
    value: str


class ChunkSource(Protocol):
    """A file's bytes as they arrive: ``read`` returns up to ``size`` bytes, b"" at its end.

    ``pause``/``resume`` stop and restart reading the socket while the reader waits for
    memory, so a waiting upload does not fill socket buffers outside the budget.
    """

    async def read(self, size: int) -> bytes: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...


class TransportFlow:
    """Stops and restarts reading one request's socket while its upload waits for memory.

    aiohttp pauses the same transport when its own buffer passes the high-water mark;
    resuming is left to aiohttp whenever it still holds such a pause of its own, so the
    two never undo each other.
    """

    def __init__(self, request: web.BaseRequest) -> None:
        self._protocol = request.protocol
        self._transport = request.transport

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        held = getattr(self._protocol, "_reading_paused", False) or getattr(
            self._protocol, "_buffer_paused", False
        )
        if self._transport is not None and not self._transport.is_closing() and not held:
            self._transport.resume_reading()


@dataclass(frozen=True)
class FilePart:
    """One file part; ``source`` must be read to its end before the next part is asked for."""

    field: str
    filename: str
    declared_type: str | None
    source: ChunkSource


@contextlib.contextmanager
def client_errors() -> Iterator[None]:
    """Map what aiohttp's reader raises to MALFORMED_MULTIPART or CLIENT_DISCONNECTED."""
    try:
        yield
    except ProxyError:
        raise
    except TimeoutError as exc:
        raise ProxyError(CLIENT_TIMEOUT, "the client sent nothing for too long") from exc
    except (ConnectionError, PayloadEncodingError) as exc:
        raise ProxyError(
            CLIENT_DISCONNECTED, "the client closed the connection before the body was complete"
        ) from exc
    except (HttpProcessingError, ValueError, AssertionError, LookupError, RuntimeError) as exc:
        raise ProxyError(MALFORMED_MULTIPART, f"malformed multipart body: {exc}") from exc


async def iter_form(
    reader: MultipartReader,
    limits: FormLimits,
    body_bytes: Callable[[], int],
    flow: TransportFlow | None = None,
) -> AsyncIterator[Field | FilePart]:
    """Yield the form's parts in order; raise ProxyError on any limit or parse failure.

    ``body_bytes`` says how many bytes of the request body have been received so
    far, so a chunked request is cut off as soon as it passes the request limit.
    """
    files = fields = 0

    def check_request_size() -> None:
        if body_bytes() > limits.max_request_size:
            raise ProxyError(
                REQUEST_TOO_LARGE, f"request body over the limit of {limits.max_request_size} bytes"
            )

    while True:
        with client_errors():
            async with asyncio.timeout(limits.idle_timeout):
                part = await reader.next()
        check_request_size()
        if part is None:
            return
        if not isinstance(part, BodyPartReader):
            raise ProxyError(MALFORMED_MULTIPART, "nested multipart parts are not supported")
        name = part.name
        if name is None:
            raise ProxyError(MALFORMED_MULTIPART, "a part has no name in its Content-Disposition")
        if part.filename is not None:
            files += 1
            if files > limits.max_files:
                raise ProxyError(
                    TOO_MANY_FILES, f"more than {limits.max_files} files in one request"
                )
            source = PartSource(part, check_request_size, limits.idle_timeout, flow)
            yield FilePart(name, part.filename, part.headers.get("Content-Type"), source)
            if not part.at_eof():
                raise RuntimeError("file part was not read to its end")
        else:
            fields += 1
            if fields > limits.max_fields:
                raise ProxyError(TOO_MANY_FIELDS, f"more than {limits.max_fields} form fields")
            yield Field(name, await _read_field(part, name, limits, check_request_size))


class PartSource:
    """One part's bytes; ends only once the part's closing boundary was seen."""

    # aiohttp needs room for a boundary in every read of a part without a length.
    MIN_READ = 256

    def __init__(
        self,
        part: BodyPartReader,
        check_request_size: Callable[[], None],
        idle_timeout: float,
        flow: TransportFlow | None = None,
    ) -> None:
        self._part = part
        self._check = check_request_size
        self._timeout = idle_timeout
        self._flow = flow
        self._paused = False

    def pause(self) -> None:
        if self._flow is not None and not self._paused:
            self._paused = True
            self._flow.pause_reading()

    def resume(self) -> None:
        if self._flow is not None and self._paused:
            self._paused = False
            self._flow.resume_reading()

    async def read(self, size: int) -> bytes:
        for _ in range(MAX_EMPTY_READS + 1):
            with client_errors():
                async with asyncio.timeout(self._timeout):
                    chunk = await self._part.read_chunk(max(size, self.MIN_READ))
            self._check()
            if chunk or self._part.at_eof():
                return chunk
        raise ProxyError(MALFORMED_MULTIPART, "the body ended inside a file part")


async def _read_field(
    part: BodyPartReader, name: str, limits: FormLimits, check_request_size: Callable[[], None]
) -> str:
    data = bytearray()
    source = PartSource(part, check_request_size, limits.idle_timeout)
    while chunk := await source.read(limits.chunk_size):
        data += chunk
        if len(data) > limits.max_field_size:
            raise ProxyError(
                FIELD_TOO_LARGE, f"field {name!r} over the limit of {limits.max_field_size} bytes"
            )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyError(INVALID_FIELD, f"field {name!r} is not UTF-8 text") from None
