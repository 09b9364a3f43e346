"""Pure: the decisions of one file's upload, as a sans-IO state machine.

Like h11, the machine never touches a socket, the budget or S3: the I/O loop asks
it what to do next (``next_action``), does it, and reports the bytes a ``Read``
brought (``feed``). That keeps every decision in one place that tests can drive
byte by byte without an event loop:

- how much memory to reserve before filling the next part (``Reserve``);
- how much to ask of the client at once (``Read``), and when to read one byte
  beyond a full first part to tell "exactly one part" from "more follows"
  (``Read(peek=True)``: what it brings, one byte or up to one whole chunk, is held
  outside the budget);
- one ``PutObject`` for a file that ends within its first part, else
  ``CreateUpload``, then ``SendPart`` 1..n, then ``Complete``;
- no empty part when a file ends exactly on a part boundary;
- the file-size limit, checked on every chunk, and S3's 10,000-part cap.

Rules the driver keeps: bytes reserved by a ``Reserve`` belong to the next
``SendPart``, ``PutObject`` or ``Stage`` (shrink the reservation to its ``size``);
whatever is still reserved when the machine finishes or raises is released.
``CreateUpload`` and ``PutObject`` carry the first part's chunks so the driver can
sniff the type.

Resuming (``Resume``, for tus): one request may carry only a stretch of a file whose
total length is known. The machine then starts at the part the stored bytes end in;
``staged`` bytes of that part are already stored elsewhere (not in this request), so
the first ``SendPart``/``CreateUpload``/``PutObject`` says how many to put in front
of its chunks, and the reservation covers them. The request's end is not the file's
end: when the bytes stop before ``total``, the machine ends with ``Stage`` (keep this
request's bytes of the unfinished part) instead of sending a short part. A byte past
``total`` is FileTooLarge. Without ``Resume`` nothing changes.
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
    peek: bool = False  # a byte (or a chunk) past a full first part, outside the budget


@dataclass(frozen=True)
class PutObject:
    """The whole file is ``chunks`` (after ``staged`` stored bytes): one PutObject."""

    chunks: list[Chunk]
    size: int  # the whole file's, staged bytes included
    staged: int = 0


@dataclass(frozen=True)
class CreateUpload:
    """Start a multipart upload; ``first`` is part 1's data, for sniffing (not yet sent);
    ``staged`` stored bytes come before it."""

    first: list[Chunk]
    staged: int = 0


@dataclass(frozen=True)
class SendPart:
    number: int
    chunks: list[Chunk]
    size: int  # the part's, staged bytes included
    staged: int = 0  # stored bytes of this part that go before ``chunks``


@dataclass(frozen=True)
class Stage:
    """The request ended inside the file (resuming only): keep ``chunks``, this request's
    ``size`` bytes of part ``number`` starting at file offset ``start``; nothing is sent.
    The machine is finished; ``size`` may be 0."""

    number: int
    start: int
    chunks: list[Chunk]
    size: int


@dataclass(frozen=True)
class Resume:
    """Where a file stands when this request's bytes begin: ``offset`` bytes are stored,
    of which the last ``staged`` belong to the unfinished part (stored apart, not yet
    sent as a part); ``created``: the multipart upload exists; ``total``: its length."""

    offset: int
    total: int
    staged: int = 0
    created: bool = False

    def part(self, plan: PartPlan) -> int:
        """The number of the part this request continues; ValueError if ``offset - staged``
        is not where a part begins, or ``staged`` does not fit that part."""
        if not 0 <= self.staged <= self.offset <= self.total:
            raise ValueError(f"inconsistent resume point {self}")
        start, number = 0, 1
        while start < self.offset - self.staged:
            start += plan.size(number)
            number += 1
        if start != self.offset - self.staged or self.staged >= plan.size(number):
            raise ValueError(f"resume point {self} is not on the plan's part boundaries")
        if number > 1 and not self.created:
            raise ValueError("parts were sent but no multipart upload was created")
        return number


@dataclass(frozen=True)
class Complete:
    """Every part was handed out: complete the upload once they are acknowledged."""

    parts: int
    size: int


Action = Reserve | Read | PutObject | CreateUpload | SendPart | Complete | Stage


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
    ``limit`` what it cannot exceed if known (the request's length as read, so a small
    file reserves no more than it can use; a byte past it is FileTooLarge), ``read_size``
    the most bytes asked at once.
    """

    def __init__(
        self,
        plan: PartPlan,
        max_size: int,
        limit: int | None = None,
        read_size: int = 256 * 1024,
        resume: Resume | None = None,
    ) -> None:
        if read_size < 1:
            raise ValueError("read_size must be positive")
        self.read_size = read_size
        self.size = 0  # bytes received so far (by this request, when resuming)
        self.finished = False
        self._slicer = PartSlicer(plan, limit=limit)
        self._base = 0  # file bytes stored before this request
        if limit is not None:
            # The slicer reserves what is left of ``limit``: a byte past it would fill a
            # part reserved for 1 byte, outside the budget. Refused instead (a gzip body's
            # coded Content-Length taken for the file's bound did that, 5 MiB a part).
            max_size = min(max_size, limit)
        if resume is not None:
            max_size = min(max_size, resume.total)
            self._base = resume.offset
            self._slicer = PartSlicer(plan, limit=resume.total)
            self._slicer.resume(resume.part(plan), resume.offset, resume.staged)
        self.max_size = max_size
        # The generator must not hold ``self``: a machine <-> generator cycle would keep
        # the part's chunks alive until the cyclic GC runs, long after the budget let go.
        self._gen = _decide(self._slicer, read_size, resume)
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
        elif isinstance(action, PutObject | Complete | Stage):
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
        if len(chunk) and self._base + self.size + len(chunk) > self.max_size:
            self.size += len(chunk)
            self.close()
            raise FileTooLarge(self.max_size)
        self.size += len(chunk)
        self._fed = chunk


def _decide(
    slicer: PartSlicer, read_size: int, resume: Resume | None = None
) -> Generator[Action, bytes | None, None]:
    """The decisions, in order; ``send`` it the bytes each Read brought."""
    total = None if resume is None else resume.total
    created = resume is not None and resume.created
    staged = 0 if resume is None else resume.staged  # stored bytes before the first part's
    leftover = memoryview(b"")
    eof = False
    parts = slicer.number - 1
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
            # The part holds it now: as a local it outlived the part, held past the
            # budget's release while the upload waits for the next part's memory.
            del chunk
        size = slicer.filled
        held = size - staged  # of the part, the bytes this request brought
        number, data = slicer.take()
        if eof and total is not None and slicer.consumed < total:
            # The request ended, the file did not: keep this request's bytes of the part.
            yield Stage(number, slicer.consumed - held, data, held)
            return
        if number == 1 and not created:
            if not eof and not leftover:
                peek = yield Read(1, peek=True)
                leftover = memoryview(peek or b"")
                eof = not peek
                del peek  # ``leftover`` and then the next part hold it (as ``chunk`` above)
            if eof and (total is None or slicer.consumed == total):
                yield PutObject(data, size, staged)
                return
            if eof:  # a resumed first part that is full, and the request ended with it
                yield CreateUpload(data, staged)
                yield SendPart(number, data, size, staged)
                yield Stage(number + 1, slicer.consumed, [], 0)
                return
            yield CreateUpload(data, staged)
            created = True
        if size:
            parts = number
            yield SendPart(number, data, size, staged)
        staged = 0
        if eof:
            yield Complete(parts, slicer.consumed)
            return
