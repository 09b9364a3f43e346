"""Pure part-size arithmetic and slicing of a byte stream into parts.

S3 limits (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html):
parts are 5 MiB to 5 GiB except the last, numbered 1 to 10,000; an object is at
most 5 TiB. A file of unknown length must still fit in 10,000 parts, so part
sizes grow along a fixed schedule: ``base`` for parts 1-1000, ``2*base`` for parts
1001-2000, and so on (capped at 5 GiB). A known upper bound (the request's
Content-Length) picks one equal size instead, which stores such as R2 require.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024**2
GiB = 1024**3
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * 1024**4
# A part's chunks under this size are gathered into one (``PartSlicer``), up to
# GATHER_SIZE: every chunk held is a Python object of ~40 bytes more than its data, so
# a part of 1-byte chunks (a client trickling tiny HTTP chunks, one per socket read) held
# ~66 bytes per byte, far past the memory budget that counts its bytes. A few KiB per
# read cost more than their bytes too: each was cut from the block its socket read was
# given (256 KiB or more) and held there until its part was sent, which left the heap in
# pieces (24 clients sending 4-10 KiB writes grew a process 99 MiB past its idle on a
# 64 MiB budget; gathered, 72-80). Chunks of 64 KiB and more are kept as they came (no
# copy: a fast upload's reads are 256 KiB or more).
GATHER_BELOW = 64 * 1024
GATHER_SIZE = 64 * 1024
TIER_PARTS = 1000  # parts per doubling step of the growth schedule


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass(frozen=True)
class PartPlan:
    """How big each part of one file is: fixed, or growing by tiers when unbounded."""

    base: int
    growing: bool

    def size(self, number: int) -> int:
        """Size of part ``number`` (1-based); every part but the last is exactly this."""
        if number < 1 or number > MAX_PARTS:
            raise ValueError(f"part number {number} outside 1..{MAX_PARTS}")
        if not self.growing:
            return self.base
        return min(self.base << ((number - 1) // TIER_PARTS), MAX_PART_SIZE)

    def capacity(self) -> int:
        """Largest object this plan can hold in 10,000 parts."""
        return sum(self.size(n) for n in range(1, MAX_PARTS + 1, TIER_PARTS)) * TIER_PARTS

    def parts_for(self, total: int) -> int:
        """How many parts a file of ``total`` bytes takes (at least 1)."""
        count, stored = 0, 0
        while stored < total or count == 0:
            count += 1
            stored += self.size(count)
        return count


def plan_parts(base: int, upper_bound: int | None, max_file_size: int) -> PartPlan:
    """Choose the part plan for one file.

    ``upper_bound`` is what the file cannot exceed if known (the request's
    Content-Length); the plan always reaches ``max_file_size`` within 10,000 parts, or
    ValueError when no plan can (past 10,000 parts of 5 GiB: the growing search below
    would otherwise never end).
    """
    if base < MIN_PART_SIZE or base > MAX_PART_SIZE:
        raise ValueError("part size must be between 5 MiB and 5 GiB")
    bound = max_file_size if upper_bound is None else min(upper_bound, max_file_size)
    if bound > MAX_PARTS * MAX_PART_SIZE:
        raise ValueError(f"{bound} bytes do not fit in {MAX_PARTS} parts of at most 5 GiB")
    if bound <= base * MAX_PARTS:
        return PartPlan(base, growing=False)
    if upper_bound is not None:
        return PartPlan(min(_round_up(-(-bound // MAX_PARTS), MiB), MAX_PART_SIZE), growing=False)
    plan = PartPlan(base, growing=True)
    while plan.capacity() < bound:  # only a 5 MiB base short of 5 TiB needs this
        if plan.base >= MAX_PART_SIZE:  # unreachable after the check above; never spin
            raise ValueError(f"no growing plan holds {bound} bytes")
        plan = PartPlan(plan.base + MiB, growing=True)
    return plan


def largest_part(base: int, max_file_size: int) -> int:
    """The biggest single part any file up to ``max_file_size`` can need (sizes the budget)."""
    plan = plan_parts(base, None, max_file_size)
    biggest = plan.size(plan.parts_for(max_file_size))
    known = plan_parts(base, max_file_size, max_file_size).base
    return max(biggest, known)


class PartSlicer:
    """Cuts a stream of chunks into parts of planned sizes.

    ``feed`` keeps as much of ``chunk`` as fits the current part (by reference: a
    chunk is only sliced, as a memoryview, at a part boundary) and returns the
    rest; ``full`` says the part is ready; ``take`` hands over its chunks, never
    joined (small ones are copied together: GATHER_BELOW), and starts the next.
    ``limit`` is what the whole file cannot exceed, if known, so a small file
    reserves no more than it can use.
    """

    def __init__(self, plan: PartPlan, limit: int | None = None) -> None:
        self.plan = plan
        self.number = 1
        self.consumed = 0
        self._limit = limit
        self._target = plan.size(1)
        self._chunks: list[bytes | memoryview] = []
        self._gathered = bytearray()  # small chunks after the last of ``_chunks``
        self._filled = 0

    @property
    def target(self) -> int:
        return self._target

    @property
    def filled(self) -> int:
        return self._filled

    @property
    def full(self) -> bool:
        return self._filled >= self._target

    def allocation(self) -> int:
        """Bytes the current part can hold: its target, or less near a known end."""
        if self._limit is None:
            return self._target
        return max(0, min(self._target, self._limit - self.consumed + self._filled))

    def resume(self, number: int, consumed: int, staged: int) -> None:
        """Start at part ``number``, ``consumed`` bytes into the file, of which ``staged``
        are the part's first bytes, stored elsewhere: they count as filled, but only the
        chunks fed from now on are handed out (resumed uploads, s3proxy.machine)."""
        if self.consumed or self._chunks or not 0 <= staged < self.plan.size(number):
            raise ValueError("resume a fresh slicer, within the part")
        self.number = number
        self.consumed = consumed
        self._target = self.plan.size(number)
        self._filled = staged

    def feed(self, chunk: bytes | memoryview) -> memoryview:
        room = self._target - self._filled
        if len(chunk) <= room:
            head: bytes | memoryview = chunk
            rest = memoryview(b"")
        else:
            view = memoryview(chunk)
            head, rest = view[:room], view[room:]
        if len(head):
            if len(head) < GATHER_BELOW:
                self._gathered += head
                if len(self._gathered) >= GATHER_SIZE:
                    self._flush()
            else:
                self._flush()
                self._chunks.append(head)
            self._filled += len(head)
            self.consumed += len(head)
        return rest

    def _flush(self) -> None:
        """The small chunks gathered so far become one chunk (``bytes``: what ``take``
        hands over is never changed after)."""
        if self._gathered:
            self._chunks.append(bytes(self._gathered))
            self._gathered = bytearray()

    def take(self) -> tuple[int, list[bytes | memoryview]]:
        """Return (part number, its chunks) and start the next part."""
        self._flush()
        number, chunks = self.number, self._chunks
        self._chunks = []
        self.number += 1
        self._filled = 0
        self._target = self.plan.size(self.number) if self.number <= MAX_PARTS else 0
        return number, chunks
