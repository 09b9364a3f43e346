"""In-memory stand-ins for the two ends of an upload, for tests without HTTP.

``ClientSource`` is a ``ChunkSource`` over bytes: what a client sends, then its end
(EOF, an error, or a stall until the test lets go), with every ``pause``/``resume``
recorded. ``GatedS3`` is ``tests.memory_s3.MemoryS3`` (the in-memory S3, failure
injection per call) with what cancellation tests need on top: calls held at a gate
until the test releases them, the order in which calls started and ended, how many
of one operation ran at once, a switch that makes the store unreachable, and
``until`` to wait for any of that on an event rather than on a clock. ``FormClient``
sends a raw multipart body into aiohttp's own ``StreamReader`` and ``MultipartReader``
(no socket), stopping whenever the reader's buffer is full, as TCP would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import MultipartReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader

from s3proxy.s3 import Body, ObjectOptions, refusal
from tests import bodies
from tests.memory_s3 import MemoryS3

T = TypeVar("T")

MiB = 1024**2
WAIT = 10.0  # seconds ``until`` waits before failing the test: a bound, never a sync


class ClientSource:
    """A file's bytes as a client sends them, at most ``chunk`` per read.

    At the end: ``then`` is raised if given; else with ``stall`` the read waits until
    the event is set (a client that stopped sending) and then returns b"".
    Reads never suspend while bytes remain, so a test knows exactly how far the
    reader got whenever it is suspended elsewhere.
    """

    def __init__(
        self,
        data: bytes,
        *,
        chunk: int = 256 * 1024,
        then: BaseException | None = None,
        stall: asyncio.Event | None = None,
    ) -> None:
        self.data = data
        self.chunk = chunk
        self.then = then
        self.stall = stall
        self.position = 0  # bytes handed to the reader so far
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.paused_event = asyncio.Event()  # set at every pause: the reader waits for memory
        self.at_end = asyncio.Event()  # set once every byte was handed over

    async def read(self, size: int) -> bytes:
        assert size > 0, "a read of 0 bytes cannot tell the end from nothing"
        assert not self.paused, "read while paused: the socket would be read outside the budget"
        if self.position < len(self.data):
            n = min(size, self.chunk, len(self.data) - self.position)
            out = self.data[self.position : self.position + n]
            self.position += n
            return out
        self.at_end.set()
        if self.then is not None:
            raise self.then
        if self.stall is not None:
            await self.stall.wait()
        return b""

    def pause(self) -> None:
        assert not self.paused, "paused twice"
        self.paused = True
        self.pauses += 1
        self.paused_event.set()

    def resume(self) -> None:
        assert self.paused, "resumed without a pause"
        self.paused = False
        self.resumes += 1

    def expire(self, message: str) -> None:
        raise AssertionError(f"no eviction expected here: {message}")

    def arrival(self) -> None:
        return None


class Wire(BaseProtocol):
    """The protocol under an in-memory StreamReader: the reader pauses and resumes it
    at its high and low water marks; ``can_send`` is what a TCP window would say."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.can_send = asyncio.Event()
        self.can_send.set()
        self.pauses = 0

    @property
    def connected(self) -> bool:
        return True  # the reader waits for more only on a connected protocol

    def pause_reading(self) -> None:
        self._reading_paused = True
        self.pauses += 1
        self.can_send.clear()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        self.can_send.set()


class FormClient:
    """A client sending ``body`` (multipart/form-data, tests.bodies' boundary) in
    ``piece``-byte writes, waiting whenever the reader's buffer is full.

    It stops after ``cut`` bytes if given, then closes the body (``then=None``) or
    fails it with ``then`` (a dropped connection).
    """

    def __init__(
        self,
        body: bytes,
        *,
        piece: int = 64 * 1024,
        cut: int | None = None,
        then: BaseException | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.body = body if cut is None else body[:cut]
        self.piece = piece
        self.then = then
        self.sent = 0
        self.wire = Wire(loop)
        self.stream = StreamReader(self.wire, 2**16, loop=loop)
        self.reader = MultipartReader(bodies.headers(), self.stream)

    def body_bytes(self) -> int:
        return self.sent

    @contextlib.asynccontextmanager
    async def sending(self) -> AsyncIterator[None]:
        """Send while the block runs; a reader that failed leaves the client waiting
        for room, so it is stopped then, and must have finished otherwise."""
        sender = asyncio.create_task(self.send())
        try:
            yield
        except BaseException:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            raise
        async with asyncio.timeout(WAIT):
            await sender

    async def send(self) -> None:
        for start in range(0, len(self.body), self.piece):
            await self.wire.can_send.wait()
            data = self.body[start : start + self.piece]
            self.stream.feed_data(data)
            self.sent += len(data)
        if self.then is not None:
            self.stream.set_exception(self.then)
        else:
            self.stream.feed_eof()


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` bytes no two offsets of which are alike in a way a bug could hide behind."""
    import random

    return random.Random(seed).randbytes(size)


@dataclass(frozen=True)
class Event:
    """One moment of one S3 call: ``phase`` is start, ok, failed, cancelled or ended
    (a cancelled call that has finished stopping)."""

    op: str
    label: str  # the part number for UploadPart, else the key
    phase: str


class GatedS3(MemoryS3):
    """MemoryS3 whose calls can be held, observed and made to fail all at once."""

    def __init__(self, bucket: str = "memory") -> None:
        super().__init__(bucket)
        self.events: list[Event] = []
        self.peak: Counter[str] = Counter()  # most calls of an operation in progress at once
        self.down = False  # every call fails with 503 before reaching the store
        self.slow_stop: asyncio.Event | None = None  # a cancelled call ends only once set
        self._active: Counter[str] = Counter()
        self._gates: dict[str, asyncio.Event] = {}
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    # -- test controls --------------------------------------------------------------

    def hold(self, *ops: str) -> None:
        """Calls of ``ops`` wait (after being recorded as started) until ``release``."""
        for op in ops:
            self._gates[op] = asyncio.Event()

    def release(self, *ops: str) -> None:
        for op in ops:
            self._gates.pop(op).set()

    def count(self, op: str, phase: str = "start") -> int:
        return sum(1 for e in self.events if e.op == op and e.phase == phase)

    def index(self, op: str, phase: str, label: str | None = None) -> int:
        """Position of the first such event (ValueError if none)."""
        for i, e in enumerate(self.events):
            if e.op == op and e.phase == phase and label in (None, e.label):
                return i
        raise ValueError(f"no {op} {phase} {label or ''}")

    async def until(self, pred: Callable[[], bool], what: str = "condition") -> None:
        """Wait until ``pred()`` holds; it is checked at every recorded event."""
        if pred():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pred, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(WAIT):
                await fut
        except TimeoutError:
            raise AssertionError(f"{what} not reached; events: {self.events}") from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def reached(self, op: str, n: int = 1, phase: str = "start") -> None:
        await self.until(lambda: self.count(op, phase) >= n, f"{n} x {op} {phase}")

    # -- the wrapper ----------------------------------------------------------------

    def _note(self, op: str, label: str, phase: str) -> None:
        self.events.append(Event(op, label, phase))
        for pred, fut in list(self._waiters):
            if not fut.done() and pred():
                fut.set_result(None)

    async def _run(self, op: str, label: str, call: Callable[[], Awaitable[T]]) -> T:
        self._note(op, label, "start")
        self._active[op] += 1
        self.peak[op] = max(self.peak[op], self._active[op])
        try:
            gate = self._gates.get(op)
            if gate is not None:
                await gate.wait()
            if self.down:
                raise refusal(op, "ServiceUnavailable", 503)
            result = await call()
        except asyncio.CancelledError:
            self._note(op, label, "cancelled")
            # The request is on the wire: stopping it takes a moment, whatever else
            # is cancelled meanwhile.
            while self.slow_stop is not None and not self.slow_stop.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await self.slow_stop.wait()
            self._note(op, label, "ended")
            raise
        except BaseException:
            self._note(op, label, "failed")
            raise
        finally:
            self._active[op] -= 1
        self._note(op, label, "ok")
        return result

    # Each call passes its keyword options (checksums, conditions) through unchanged:
    # the gate only decides when a call runs, never what it does.
    async def put(self, key: str, data: Body, options: ObjectOptions, **kw: Any) -> Any:
        return await self._run(
            "PutObject", key, lambda: super(GatedS3, self).put(key, data, options, **kw)
        )

    async def create(self, key: str, options: ObjectOptions, **kw: Any) -> str:
        return await self._run(
            "CreateMultipartUpload", key, lambda: super(GatedS3, self).create(key, options, **kw)
        )

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: Body, **kw: Any
    ) -> Any:
        return await self._run(
            "UploadPart",
            str(number),
            lambda: super(GatedS3, self).upload_part(key, upload_id, number, data, **kw),
        )

    async def complete(
        self, key: str, upload_id: str, parts: Sequence[tuple[int, str]], **kw: Any
    ) -> Any:
        return await self._run(
            "CompleteMultipartUpload",
            key,
            lambda: super(GatedS3, self).complete(key, upload_id, parts, **kw),
        )

    async def abort(self, key: str, upload_id: str) -> None:
        await self._run(
            "AbortMultipartUpload", key, lambda: super(GatedS3, self).abort(key, upload_id)
        )

    async def tag(self, key: str, tags: Mapping[str, str]) -> int:
        return await self._run("PutObjectTagging", key, lambda: super(GatedS3, self).tag(key, tags))

    async def delete(self, key: str, **kw: Any) -> None:
        await self._run("DeleteObject", key, lambda: super(GatedS3, self).delete(key, **kw))
