"""Pure: the decisions of one file's upload, as a sans-IO state machine.

Like h11, the machine never touches a socket, the budget or S3: the I/O loop asks
it what to do next (``next_action``), does it, and reports the bytes a ``Read``
brought (``feed``). That keeps every decision in one place that tests can drive
byte by byte without an event loop:

- how much memory to reserve before filling the next part (``Reserve``);
- how much to ask of the client at once (``Read``), and when to read one byte
  beyond a full first part to tell "exactly one part" from "more follows"
  (``Read(peek=True)``: that byte is held outside the budget);
- one ``PutObject`` for a file that ends within its first part, else
  ``CreateUpload``, then ``SendPart`` 1..n, then ``Complete``;
- no empty part when a file ends exactly on a part boundary;
- the file-size limit, checked on every chunk, and S3's 10,000-part cap.

Rules the driver keeps: bytes reserved by a ``Reserve`` belong to the next
``SendPart`` or ``PutObject`` (shrink the reservation to its ``size``); whatever is
still reserved when the machine finishes or raises is released. ``CreateUpload``
and ``PutObject`` carry the first part's chunks so the driver can sniff the type.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from s3proxy.body import Chunk
from s3proxy.parts import MAX_PARTS, PartPlan, PartSlicer


@dataclass(frozen=True)
class Reserve:
    """Take ``size`` bytes from the memory budget before reading the next part."""

    size: int


@dataclass(frozen=True)
class Read:
    """Read at most ``size`` bytes from the client and ``feed`` them (b"" at the end)."""

    size: int
    peek: bool = False  # one byte past a full first part, outside the budget


@dataclass(frozen=True)
class PutObject:
    """The whole file is ``chunks``: store it with one PutObject."""

    chunks: list[Chunk]
    size: int


@dataclass(frozen=True)
class CreateUpload:
    """Start a multipart upload; ``first`` is part 1's data, for sniffing (not yet sent)."""

    first: list[Chunk]


@dataclass(frozen=True)
class SendPart:
    number: int
    chunks: list[Chunk]
    size: int


@dataclass(frozen=True)
class Complete:
    """Every part was handed out: complete the upload once they are acknowledged."""

    parts: int
    size: int


Action = Reserve | Read | PutObject | CreateUpload | SendPart | Complete


class UploadLimitError(Exception):
    """The file cannot be stored within the limits; the driver names the limit."""


class FileTooLarge(UploadLimitError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"file over the limit of {limit} bytes")
        self.limit = limit


class TooManyParts(UploadLimitError):
    def __init__(self) -> None:
        super().__init__(f"file needs more than S3's {MAX_PARTS:,} parts")


class UploadMachine:
    """One file: events in (``feed``), actions out (``next_action``).

    ``plan`` sizes the parts, ``max_size`` is the most bytes the file may have,
    ``limit`` what it cannot exceed if known (the request's length: a small file
    reserves no more than it can use), ``read_size`` the most bytes asked at once.
    """

    def __init__(
        self, plan: PartPlan, max_size: int, limit: int | None = None, read_size: int = 256 * 1024
    ) -> None:
        if read_size < 1:
            raise ValueError("read_size must be positive")
        self.max_size = max_size
        self.read_size = read_size
        self.size = 0  # bytes received so far
        self.finished = False
        self._slicer = PartSlicer(plan, limit=limit)
        # The generator must not hold ``self``: a machine <-> generator cycle would keep
        # the part's chunks alive until the cyclic GC runs, long after the budget let go.
        self._gen = _decide(self._slicer, read_size)
        self._reading = False
        self._fed: bytes | None = None

    def next_action(self) -> Action:
        """What the driver must do now; after a ``Read``, ``feed`` must come first."""
        if self._reading:
            raise RuntimeError("feed() the bytes of the last Read first")
        if self.finished:
            raise RuntimeError("the upload has no more actions")
        fed, self._fed = self._fed, None
        try:
            action = self._gen.send(fed)
        except BaseException:
            self.close()
            raise
        if isinstance(action, Read):
            self._reading = True
        elif isinstance(action, PutObject | Complete):
            self.finished = True
        return action

    def close(self) -> None:
        """Drop every chunk the machine still holds (an upload that failed mid-part)."""
        self.finished = True
        self._reading = False
        self._fed = None
        self._gen.close()
        self._slicer.take()

    def feed(self, chunk: bytes) -> None:
        """The bytes a ``Read`` brought; b"" when the file ended."""
        if not self._reading:
            raise RuntimeError("feed() without a Read")
        self._reading = False
        if len(chunk) and self.size + len(chunk) > self.max_size:
            self.size += len(chunk)
            self.close()
            raise FileTooLarge(self.max_size)
        self.size += len(chunk)
        self._fed = chunk


def _decide(slicer: PartSlicer, read_size: int) -> Generator[Action, bytes | None, None]:
    """The decisions, in order; ``send`` it the bytes each Read brought."""
    leftover = memoryview(b"")
    eof = False
    parts = 0
    while True:
        if slicer.number > MAX_PARTS:
            # Parts 1..10,000 are out: the file must end right here.
            if not leftover:
                peek = yield Read(1, peek=True)
                leftover = memoryview(peek or b"")
            if leftover:
                raise TooManyParts
            yield Complete(parts, slicer.consumed)
            return
        yield Reserve(max(1, slicer.allocation()))
        while not slicer.full:
            if leftover:
                leftover = slicer.feed(leftover)
                continue
            chunk = yield Read(min(read_size, slicer.target - slicer.filled))
            if not chunk:
                eof = True
                break
            leftover = slicer.feed(chunk)
        size = slicer.filled
        number, data = slicer.take()
        if number == 1:
            if not eof and not leftover:
                peek = yield Read(1, peek=True)
                leftover = memoryview(peek or b"")
                eof = not peek
            if eof:
                yield PutObject(data, size)
                return
            yield CreateUpload(data)
        if size:
            parts = number
            yield SendPart(number, data, size)
        if eof:
            yield Complete(parts, slicer.consumed)
            return
