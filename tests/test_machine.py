"""The upload state machine, driven byte by byte without an event loop.

Sweeps in the manner of tusd's part-size tests: every file size around every
part boundary, chunk sizes from 1 byte up, reads that return less than asked,
and the limits. A tiny part plan stands in for S3's 5 MiB parts: the machine
only does arithmetic on it.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field

import pytest

from s3proxy.machine import (
    Complete,
    CreateUpload,
    FileTooLarge,
    PutObject,
    Read,
    Reserve,
    Resume,
    SendPart,
    Stage,
    TooManyParts,
    UploadMachine,
)
from s3proxy.parts import MAX_PARTS, PartPlan


@dataclass
class Trace:
    """What a driver saw: the stored bytes and the actions, with the checks a driver relies on."""

    put: bytes | None = None
    created: bool = False
    parts: dict[int, bytes] = field(default_factory=dict)
    completed: Complete | None = None
    reads: list[Read] = field(default_factory=list)
    reserves: list[int] = field(default_factory=list)
    peeks: int = 0


def join(chunks: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def drive(machine: UploadMachine, data: bytes, give: int) -> Trace:
    """Feed ``data`` at most ``give`` bytes per read (a client's packets), like the I/O loop."""
    trace = Trace()
    pos = 0
    reserved = 0  # bytes of the current reservation
    while True:
        action = machine.next_action()
        if isinstance(action, Reserve):
            assert reserved == 0, "a reservation was left unused"
            assert action.size >= 1
            reserved = action.size
            trace.reserves.append(action.size)
        elif isinstance(action, Read):
            assert action.size >= 1
            trace.reads.append(action)
            trace.peeks += action.peek
            if not action.peek:
                assert reserved, "read before reserving"
            n = min(action.size, give, len(data) - pos)
            machine.feed(data[pos : pos + n])
            pos += n
        elif isinstance(action, PutObject):
            assert not trace.created
            assert action.size <= reserved
            trace.put = join(action.chunks)
            assert len(trace.put) == action.size
            return trace
        elif isinstance(action, CreateUpload):
            assert not trace.created
            trace.created = True
        elif isinstance(action, SendPart):
            assert trace.created
            assert action.size >= 1, "no empty parts"
            assert action.size <= reserved, "a part is larger than its reservation"
            assert action.number == len(trace.parts) + 1, "part numbers are contiguous"
            trace.parts[action.number] = join(action.chunks)
            assert len(trace.parts[action.number]) == action.size
            reserved = 0
        elif isinstance(action, Complete):
            assert trace.created
            trace.completed = action
            return trace


def test_empty_file_is_one_put() -> None:
    trace = drive(UploadMachine(PartPlan(8, growing=False), max_size=100), b"", 4)
    assert trace.put == b""
    assert not trace.created


@pytest.mark.parametrize("part", [1, 3, 8])
@pytest.mark.parametrize("give", [1, 2, 3, 7, 8, 9, 1000])
@pytest.mark.parametrize("read_size", [1, 5, 8, 256])
def test_sizes_around_every_boundary(part: int, give: int, read_size: int) -> None:
    plan = PartPlan(part, growing=False)
    for size in range(0, 5 * part + 2):
        data = bytes(i % 251 for i in range(size))
        trace = drive(UploadMachine(plan, max_size=10**6, read_size=read_size), data, give)
        if size <= part:
            assert trace.put == data, size
            assert not trace.parts
        else:
            assert trace.put is None
            assert trace.completed == Complete(parts=len(trace.parts), size=size)
            assert b"".join(trace.parts[n] for n in sorted(trace.parts)) == data
            *full, last = [len(trace.parts[n]) for n in sorted(trace.parts)]
            assert all(n == part for n in full), "every part but the last has the planned size"
            assert 1 <= last <= part
        assert all(r.size <= read_size for r in trace.reads)
        # The only read outside a reservation is the one-byte peek after a full first part.
        assert trace.peeks == (1 if size >= part else 0), size


def test_known_limit_reserves_only_what_can_arrive() -> None:
    plan = PartPlan(100, growing=False)
    trace = drive(UploadMachine(plan, max_size=10**6, limit=30), b"x" * 30, 7)
    assert trace.reserves == [30]
    assert trace.put == b"x" * 30


def test_bytes_past_a_known_limit_are_refused_not_read_into_unreserved_parts() -> None:
    """A ``limit`` is a promise that sizes reservations (what is left of it): bytes past it
    would fill parts reserved for 1 byte. Before, a gzip body's Content-Length (coded bytes)
    came in as the limit, and every part after it was 5 MiB of memory held outside the
    budget (20 uploads of 40 MiB of zeros: +204 MiB RSS on a 16 MiB budget)."""
    machine = UploadMachine(PartPlan(10, growing=False), max_size=10**6, limit=30)
    with pytest.raises(FileTooLarge) as info:
        drive(machine, b"x" * 100, 7)
    assert info.value.limit == 30
    assert machine.finished


def test_growing_plan_changes_part_size_by_tier() -> None:
    plan = PartPlan(1, growing=True)  # parts 1-1000 of 1 byte, 1001-2000 of 2 ...
    data = b"y" * 1003
    trace = drive(UploadMachine(plan, max_size=10**6), data, 64)
    assert len(trace.parts) == 1002
    assert (len(trace.parts[1000]), len(trace.parts[1001]), len(trace.parts[1002])) == (1, 2, 1)
    assert trace.completed == Complete(parts=1002, size=1003)


def test_file_too_large_is_refused_on_the_chunk_that_passes_it() -> None:
    machine = UploadMachine(PartPlan(4, growing=False), max_size=10)
    with pytest.raises(FileTooLarge) as info:
        drive(machine, b"z" * 11, 3)
    assert info.value.limit == 10
    assert machine.size == 11
    assert machine.finished


def test_file_of_exactly_the_limit_is_stored() -> None:
    trace = drive(UploadMachine(PartPlan(4, growing=False), max_size=10), b"z" * 10, 3)
    assert trace.completed == Complete(parts=3, size=10)


@pytest.mark.parametrize("give", [1, 3])
def test_ten_thousand_parts_fit_and_one_byte_more_does_not(give: int) -> None:
    plan = PartPlan(1, growing=False)
    exact = drive(UploadMachine(plan, max_size=10**6), b"a" * MAX_PARTS, give)
    assert exact.completed == Complete(parts=MAX_PARTS, size=MAX_PARTS)
    with pytest.raises(TooManyParts):
        drive(UploadMachine(plan, max_size=10**6), b"a" * (MAX_PARTS + 1), give)


def test_read_must_be_answered_before_the_next_action() -> None:
    machine = UploadMachine(PartPlan(4, growing=False), max_size=100)
    assert machine.next_action() == Reserve(4)
    assert machine.next_action() == Read(4)
    with pytest.raises(RuntimeError):
        machine.next_action()
    machine.feed(b"")
    assert machine.next_action() == PutObject([], 0)
    with pytest.raises(RuntimeError):
        machine.next_action()
    with pytest.raises(RuntimeError):
        machine.feed(b"x")


def test_a_dropped_machine_is_freed_at_once_with_its_chunks() -> None:
    """No reference cycle: a failed upload's partial part must go when the upload goes,
    not at the next cyclic GC (which let 50 stalled uploads pile up 150 MiB past the
    budget in test_under_load)."""
    machine = UploadMachine(PartPlan(8, growing=False), max_size=100)
    assert isinstance(machine.next_action(), Reserve)
    assert isinstance(machine.next_action(), Read)
    machine.feed(b"abc")  # mid-part: the machine holds these bytes
    machine.next_action()
    ref = weakref.ref(machine)
    gc.disable()
    try:
        del machine
        assert ref() is None
    finally:
        gc.enable()


def test_a_part_handed_over_leaves_none_of_its_chunks_with_the_machine() -> None:
    """Once a part is sent and its chunk list emptied (the budget has its bytes back), the
    machine holds none of its chunks while it waits for the next part's memory or bytes.
    Its generator kept the last chunk read (and the peek) as locals: an upload waiting
    for the budget held a read of a part already sent and given back, outside the budget
    (300 cut uploads, 1 MiB reads: 6.8 MiB in 25 such locals at the peak)."""
    k = 64 * 1024  # chunks this size are kept by reference, not gathered
    machine = UploadMachine(PartPlan(4 * k, growing=False), max_size=100 * k, read_size=2 * k)
    a, b, c, d = (bytes([n]) * (2 * k) for n in range(4))
    sent: list[list[bytes | memoryview]] = []
    for chunk in (a, b, c, d, None):
        action = machine.next_action()
        while not isinstance(action, Read):
            if isinstance(action, SendPart):
                sent.append(action.chunks)
            action = machine.next_action()
        if chunk is None:
            break
        machine.feed(chunk)
    assert [bytes(b"".join(part)) for part in sent] == [a + b, c + d]
    for part in sent:
        part.clear()  # acknowledged: what the pipeline does before the budget gets them back
    gen = machine._gen
    named = {"a": a, "b": b, "c": c, "d": d}
    assert [name for name, v in named.items() if gen in gc.get_referrers(v)] == []


def test_close_drops_the_partial_part() -> None:
    machine = UploadMachine(PartPlan(8, growing=False), max_size=100)
    machine.next_action()
    machine.next_action()
    machine.feed(b"abc")
    machine.close()
    assert machine.finished
    assert machine._slicer.filled == 0
    with pytest.raises(RuntimeError):
        machine.next_action()


# --- resuming (tus): a file's bytes spread over several requests -------------------------


@dataclass
class Stored:
    """What S3 holds of a resumed file between requests: parts, and the staged tail."""

    total: int
    created: bool = False
    parts: dict[int, bytes] = field(default_factory=dict)
    staged: bytes = b""  # of the unfinished part
    offset: int = 0
    put: bytes | None = None
    completed: Complete | None = None
    stages: list[Stage] = field(default_factory=list)


def resume_request(plan: PartPlan, stored: Stored, data: bytes, give: int) -> None:
    """One request bringing ``data`` from ``stored.offset``, driven like the I/O loop."""
    point = Resume(stored.offset, stored.total, len(stored.staged), stored.created)
    machine = UploadMachine(plan, max_size=10**6, read_size=5, resume=point)
    pos = 0
    reserved = 0
    while True:
        action = machine.next_action()
        if isinstance(action, Reserve):
            assert reserved == 0
            reserved = action.size
        elif isinstance(action, Read):
            n = min(action.size, give, len(data) - pos)
            machine.feed(data[pos : pos + n])
            pos += n
        elif isinstance(action, Stage):
            assert action.size <= reserved or action.size == 0
            assert action.start == stored.offset + pos - action.size
            assert action.number == len(stored.parts) + 1
            stored.staged += join(action.chunks)
            stored.offset += pos
            stored.stages.append(action)
            assert len(stored.staged) < plan.size(action.number)
            return
        elif isinstance(action, PutObject):
            assert action.staged == len(stored.staged)
            assert action.size <= reserved
            stored.put = stored.staged + join(action.chunks)
            stored.offset += pos
            return
        elif isinstance(action, CreateUpload):
            assert not stored.created and action.staged == len(stored.staged)
            stored.created = True
        elif isinstance(action, SendPart):
            assert stored.created and action.size <= reserved
            assert action.number == len(stored.parts) + 1
            assert action.staged == len(stored.staged)
            stored.parts[action.number] = stored.staged + join(action.chunks)
            assert len(stored.parts[action.number]) == action.size
            stored.staged = b""
            reserved = 0
        elif isinstance(action, Complete):
            assert action.size == stored.total
            stored.completed = action
            stored.offset += pos
            return


@pytest.mark.parametrize("step", [1, 2, 3, 4, 7, 8, 9, 17])
@pytest.mark.parametrize("give", [1, 3, 1000])
def test_resumed_requests_of_any_length_make_the_file(step: int, give: int) -> None:
    """Every total around the part boundaries, sent in requests of ``step`` bytes: the
    parts and the single PutObject hold exactly the file; no part is short but the last."""
    part = 4
    plan = PartPlan(part, growing=False)
    for total in range(1, 4 * part + 2):
        data = bytes(i % 251 for i in range(total))
        stored = Stored(total)
        while stored.put is None and stored.completed is None:
            before = stored.offset
            resume_request(plan, stored, data[before : before + step], give)
            assert stored.offset == min(total, before + step)
        if total <= part:
            assert stored.put == data and not stored.created, total
        else:
            assert stored.completed is not None
            assert b"".join(stored.parts[n] for n in sorted(stored.parts)) == data
            *full, _ = [len(stored.parts[n]) for n in sorted(stored.parts)]
            assert all(n == part for n in full)


def test_a_resumed_request_past_the_total_is_too_large() -> None:
    plan = PartPlan(4, growing=False)
    stored = Stored(6)
    resume_request(plan, stored, b"abc", 10)
    with pytest.raises(FileTooLarge):
        resume_request(plan, stored, b"defg", 10)
    # Part 1 may have gone out first (the extra byte came after it): the driver commits
    # nothing of a failed request, so the stored offset stays where it was.
    assert stored.offset == 3


def test_a_request_ending_on_a_part_boundary_stages_nothing() -> None:
    plan = PartPlan(4, growing=False)
    stored = Stored(10)
    resume_request(plan, stored, b"abcd", 2)
    assert stored.parts == {1: b"abcd"} and stored.staged == b""
    assert stored.stages == [Stage(2, 4, [], 0)]
    resume_request(plan, stored, b"efgh", 2)
    assert stored.parts[2] == b"efgh" and stored.stages[-1] == Stage(3, 8, [], 0)


@pytest.mark.parametrize(
    "point",
    [Resume(5, 10, 0), Resume(3, 10, 4), Resume(4, 10, 0, created=False), Resume(11, 10, 0)],
)
def test_a_resume_point_off_the_plan_is_refused(point: Resume) -> None:
    with pytest.raises(ValueError):
        point.part(PartPlan(4, growing=False))
