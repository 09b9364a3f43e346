"""FileUpload without HTTP: the pipeline driven directly over the in-memory S3.

What must hold for one file, whatever happens: a client told 201 finds exactly its
bytes (sha256 and all); a failure leaves nothing stored and no multipart upload
open, with exactly one abort; the memory budget is back to 0; a cancellation, even
a repeated one, still lets the cleanup finish and is re-raised; an abort S3 could
not take is retried by the janitor until S3 is back.

Synchronization is by events (``GatedS3`` holds calls and reports them), never by
sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from s3proxy.budget import MemoryBudget
from s3proxy.errors import (
    CLIENT_DISCONNECTED,
    FILE_TOO_LARGE,
    TYPE_NOT_ALLOWED,
    UPSTREAM_ERROR,
    UPSTREAM_TIMEOUT,
    ErrorKind,
    ProxyError,
)
from s3proxy.janitor import Janitor
from s3proxy.pipeline import FileSpec, FileUpload, PipelineConfig
from tests.fake_client import ClientSource, GatedS3, MiB, payload

PART = 5 * MiB  # S3's minimum part size, and so the smallest the pipeline may use
CFG = PipelineConfig(part_size=PART, parts_in_flight=2, max_file_size=1024**3)
KEY = "u/0001/a.bin"
MULTIPART = "CreateMultipartUpload"
PART_CALL = "UploadPart"
COMPLETE = "CompleteMultipartUpload"
ABORT = "AbortMultipartUpload"


def spec(size_hint: int | None = None) -> FileSpec:
    return FileSpec(field="file", filename="a.bin", key=KEY, size_hint=size_hint)


@pytest.fixture
async def store() -> AsyncIterator[GatedS3]:
    """The in-memory bucket; like the moto ``bucket`` fixture, no upload may stay open."""
    s3 = GatedS3()
    yield s3
    assert s3.uploads == {}, "a multipart upload was left open"


def assert_clean(s3: GatedS3, budget: MemoryBudget) -> None:
    """What a failed upload must leave: nothing stored, nothing open, no memory held."""
    assert s3.objects == {}
    assert s3.uploads == {}
    assert budget.in_use == 0
    assert budget.waiting == 0


def started(s3: GatedS3) -> list[str]:
    return [e.op for e in s3.events if e.phase == "start"]


# -- what is stored ----------------------------------------------------------------


@pytest.mark.parametrize("hinted", [False, True], ids=["no-length", "length-known"])
@pytest.mark.parametrize(
    ("size", "parts"),
    [
        (0, 0),
        (1, 0),
        (PART - 1, 0),
        (PART, 0),  # the peeked byte says "nothing follows": still one PutObject
        (PART + 1, 2),
        (3 * PART, 3),  # ends on a boundary: no empty 4th part
        (3 * PART + 7, 4),
    ],
    ids=["0", "1", "part-1", "part", "part+1", "3parts", "3parts+7"],
)
async def test_stores_exactly_the_bytes_sent(
    store: GatedS3, size: int, parts: int, hinted: bool
) -> None:
    data = payload(size, seed=size)
    budget = MemoryBudget(4 * PART)
    upload = FileUpload(spec(size if hinted else None), store, budget, CFG)
    source = ClientSource(data)

    stored = await upload.run(source)

    digest = hashlib.sha256(data).hexdigest()
    obj = store.objects[KEY]
    assert obj.data == data
    assert (stored.size, stored.sha256, stored.parts) == (size, digest, parts)
    assert stored.etag == obj.etag.strip('"')
    assert stored.content_type == obj.options.content_type
    if parts == 0:
        assert started(store) == ["PutObject"]
        assert obj.options.metadata["sha256"] == digest
    else:
        assert started(store) == [MULTIPART, *[PART_CALL] * parts, COMPLETE, "PutObjectTagging"]
        assert obj.tags == {"sha256": digest}
        assert obj.etag.endswith(f'-{parts}"')
    assert source.position == size
    assert budget.in_use == 0 and budget.waiting == 0
    assert source.pauses == 0  # the budget was never short


async def test_a_known_length_reserves_no_more_than_the_file() -> None:
    """A small file in a request of known length holds only its own bytes of the budget."""
    s3 = GatedS3()
    budget = MemoryBudget(4 * PART)
    await FileUpload(spec(1000), s3, budget, CFG).run(ClientSource(payload(1000)))
    assert budget.peak == 1000  # not a whole part (the peek byte is outside the budget)


@pytest.mark.parametrize("in_flight", [1, 2, 3])
async def test_parts_in_flight_is_a_bound_and_is_reached(store: GatedS3, in_flight: int) -> None:
    """With every UploadPart held, the reader stops after ``in_flight`` parts; released,
    the upload completes and never had more than ``in_flight`` part calls at once."""
    cfg = PipelineConfig(part_size=PART, parts_in_flight=in_flight, max_file_size=1024**3)
    data = payload(5 * PART + 3)
    source = ClientSource(data)
    budget = MemoryBudget(10 * PART)
    store.hold(PART_CALL)
    task = asyncio.create_task(FileUpload(spec(), store, budget, cfg).run(source))

    await store.reached(PART_CALL, in_flight)
    # The reader runs without suspending while bytes remain, so had it gone on to the
    # next part it would already be past it: it stopped at the end of part ``in_flight``
    # (and the one byte that told part 1 from "the whole file").
    assert source.position <= in_flight * PART + 1
    assert store.count(PART_CALL) == in_flight

    store.release(PART_CALL)
    stored = await task
    assert stored.parts == 6 and store.objects[KEY].data == data
    assert store.peak[PART_CALL] == in_flight
    assert budget.in_use == 0


async def test_waiting_for_the_budget_pauses_the_client(store: GatedS3) -> None:
    """A budget of one part: part 2 waits until part 1 is acknowledged, with the socket
    paused meanwhile; the file is still stored whole."""
    data = payload(2 * PART + 10)
    source = ClientSource(data)
    budget = MemoryBudget(PART)
    store.hold(PART_CALL)
    task = asyncio.create_task(FileUpload(spec(), store, budget, CFG).run(source))
    await source.paused_event.wait()
    await store.reached(PART_CALL)
    assert budget.waiting == 1 and store.count(PART_CALL) == 1
    store.release(PART_CALL)
    stored = await task
    assert store.objects[KEY].data == data and stored.parts == 3
    assert source.pauses == source.resumes >= 1 and not source.paused
    assert budget.in_use == 0 and budget.peak == PART


# -- refused before anything is stored ---------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_size", "allow", "code", "ops"),
    [
        (101, 100, (), FILE_TOO_LARGE, []),
        (PART + 11, PART + 10, (), FILE_TOO_LARGE, [MULTIPART, ABORT]),
        (3 * PART, 2 * PART, (), FILE_TOO_LARGE, [MULTIPART, ABORT]),
        (10, 1024, ("image/png",), TYPE_NOT_ALLOWED, []),
        (PART + 1, 1024**3, ("image/png",), TYPE_NOT_ALLOWED, []),
    ],
    ids=["small-over", "one-past-part", "third-part", "type-put", "type-multipart"],
)
async def test_limits(
    store: GatedS3,
    size: int,
    max_size: int,
    allow: tuple[str, ...],
    code: ErrorKind,
    ops: list[str],
) -> None:
    cfg = PipelineConfig(
        part_size=PART, parts_in_flight=2, max_file_size=max_size, allow_types=allow
    )
    budget = MemoryBudget(4 * PART)
    with pytest.raises(ProxyError) as err:
        await FileUpload(spec(), store, budget, cfg).run(ClientSource(payload(size)))
    assert err.value.kind == code
    # Whether a part call launched just before the limit was crossed got to start is
    # the scheduler's business; what matters is how the upload began and ended.
    assert [op for op in started(store) if op != PART_CALL] == ops
    assert_clean(store, budget)


# -- S3 failures ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3], ids=["first", "second", "last"])
@pytest.mark.parametrize("lost", [False, True], ids=["refused", "answer-lost"])
async def test_part_k_fails_one_abort_nothing_stored(store: GatedS3, k: int, lost: bool) -> None:
    injected = ProxyError(UPSTREAM_ERROR, f"part {k} refused")
    store.fail(PART_CALL, at=k, error=injected, lost=lost)
    budget = MemoryBudget(4 * PART)
    upload = FileUpload(spec(), store, budget, CFG)
    with pytest.raises(ProxyError) as err:
        await upload.run(ClientSource(payload(2 * PART + 1000)))  # 3 parts
    assert err.value is injected
    assert store.count(ABORT) == 1
    assert store.count(COMPLETE) == 0
    assert store.count("DeleteObject") == 0  # nothing was written whole
    # No part call ran on past the abort (S3 would keep its bytes, billed).
    abort = store.index(ABORT, "start")
    assert PART_CALL not in [e.op for e in store.events[abort:]], store.events
    assert_clean(store, budget)


@pytest.mark.parametrize(
    ("op", "lost", "size", "cleanup"),
    [
        (MULTIPART, False, PART + 1, []),
        # S3 made the upload but the answer was lost: the store's contract aborts it.
        (MULTIPART, True, PART + 1, [ABORT]),
        (COMPLETE, False, PART + 1, [ABORT, "DeleteObject"]),
        (COMPLETE, True, PART + 1, [ABORT, "DeleteObject"]),
        ("PutObjectTagging", False, PART + 1, ["DeleteObject"]),
        ("PutObject", False, 10, ["DeleteObject"]),
        ("PutObject", True, 10, ["DeleteObject"]),
    ],
    ids=[
        "create",
        "create-lost",
        "complete",
        "complete-lost",
        "tag",
        "put",
        "put-lost",
    ],
)
async def test_write_fails_nothing_stays(
    store: GatedS3, op: str, lost: bool, size: int, cleanup: list[str]
) -> None:
    """Once a PutObject or Complete was sent the object may exist: it is deleted."""
    injected = ProxyError(UPSTREAM_ERROR, f"{op} refused") if not lost else None
    store.fail(op, at=1, error=injected, lost=lost)
    budget = MemoryBudget(4 * PART)
    with pytest.raises(ProxyError) as err:
        await FileUpload(spec(), store, budget, CFG).run(ClientSource(payload(size)))
    if injected is not None:
        assert err.value is injected
    else:
        assert err.value.kind == UPSTREAM_TIMEOUT
    after = started(store)[started(store).index(op) + 1 :]
    assert after == cleanup
    assert_clean(store, budget)


async def test_client_gone_mid_file_aborts(store: GatedS3) -> None:
    gone = ProxyError(CLIENT_DISCONNECTED, "the client went away")
    budget = MemoryBudget(4 * PART)
    with pytest.raises(ProxyError) as err:
        await FileUpload(spec(), store, budget, CFG).run(
            ClientSource(payload(PART + 100), then=gone)
        )
    assert err.value is gone
    assert store.count(ABORT) == 1 and store.count(COMPLETE) == 0
    assert_clean(store, budget)


# -- cancellation ---------------------------------------------------------------------


async def test_cancelled_while_waiting_for_the_budget(store: GatedS3) -> None:
    """Another upload holds the whole budget; this one, waiting for its first part, is
    cancelled: it leaves no waiter, holds nothing, resumed the socket, started nothing."""
    budget = MemoryBudget(PART)
    other = await budget.acquire(PART)
    source = ClientSource(payload(100))
    task = asyncio.create_task(FileUpload(spec(), store, budget, CFG).run(source))
    await source.paused_event.wait()
    assert budget.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.waiting == 0
    assert budget.in_use == PART  # only the other holder's
    other.release()
    assert budget.in_use == 0 and budget.can_take(PART)
    assert source.pauses == source.resumes == 1
    assert store.events == []


async def test_cancelled_waiting_for_the_budget_mid_file(store: GatedS3) -> None:
    """Part 1 is uploading and holds the budget; part 2 waits for it; cancelled: part 1
    ends, then the one abort, and the budget is 0."""
    budget = MemoryBudget(PART)
    source = ClientSource(payload(2 * PART))
    store.hold(PART_CALL)
    task = asyncio.create_task(FileUpload(spec(), store, budget, CFG).run(source))
    await source.paused_event.wait()
    await store.reached(PART_CALL)
    assert budget.waiting == 1 and budget.in_use == PART
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.index(PART_CALL, "cancelled") < store.index(ABORT, "start")
    assert store.count(ABORT) == 1
    assert_clean(store, budget)


async def test_cancelled_mid_part_aborts_after_the_parts_ended(store: GatedS3) -> None:
    """Parts on the wire take a moment to stop: the abort waits for them, so no part can
    land after it."""
    budget = MemoryBudget(4 * PART)
    store.hold(PART_CALL)
    store.slow_stop = asyncio.Event()
    task = asyncio.create_task(
        FileUpload(spec(), store, budget, CFG).run(ClientSource(payload(2 * PART + 5)))
    )
    await store.reached(PART_CALL, 2)
    task.cancel()
    await store.reached(PART_CALL, 2, "cancelled")
    assert store.count(ABORT) == 0, "aborted while part calls were still on the wire"
    task.cancel()  # impatience: a second cancellation changes nothing
    store.slow_stop.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    abort = store.index(ABORT, "start")
    assert store.index(PART_CALL, "ended", "1") < abort
    assert store.index(PART_CALL, "ended", "2") < abort
    assert store.count(ABORT) == 1 and store.count(PART_CALL, "ok") == 0
    assert_clean(store, budget)


@pytest.mark.parametrize(
    ("how", "held", "size"),
    [
        ("cancel", ABORT, 2 * PART),
        ("part-fails", ABORT, 2 * PART),
        # cancelled during the abort: the delete that follows it must still run
        ("complete-lost", ABORT, PART + 1),
        ("complete-lost", "DeleteObject", PART + 1),
        ("put-lost", "DeleteObject", 10),
    ],
)
async def test_cleanup_finishes_through_repeated_cancellation(
    store: GatedS3, how: str, held: str, size: int
) -> None:
    """Whatever started the cleanup, cancellations arriving during it neither cut it
    short nor get swallowed: the caller sees CancelledError once the cleanup is done."""
    budget = MemoryBudget(4 * PART)
    stall = asyncio.Event()
    if how == "part-fails":
        store.fail(PART_CALL, at=1)
    elif how == "complete-lost":
        store.fail(COMPLETE, lost=True)
    elif how == "put-lost":
        store.fail("PutObject", lost=True)
    source = ClientSource(payload(size), stall=stall if how == "cancel" else None)
    store.hold(held)
    task = asyncio.create_task(FileUpload(spec(), store, budget, CFG).run(source))
    if how == "cancel":
        await source.at_end.wait()  # the client stalls after its bytes
        task.cancel()
    await store.reached(held)
    task.cancel()
    task.cancel()
    await asyncio.sleep(0)  # let the cancellations land while the cleanup is held
    assert not task.done()
    store.release(held)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.count(held, "ok") == 1
    assert_clean(store, budget)


# -- the janitor ----------------------------------------------------------------------


async def test_abort_s3_refused_is_retried_until_s3_is_back(store: GatedS3) -> None:
    """S3 goes away mid-upload: the part fails, the abort fails, the client gets its error
    at once; the janitor retries the abort until S3 answers again."""
    janitor = Janitor(interval=0.001)
    budget = MemoryBudget(4 * PART)
    source = ClientSource(payload(2 * PART))
    store.hold(PART_CALL)
    task = asyncio.create_task(FileUpload(spec(), store, budget, CFG, janitor).run(source))
    await store.reached(PART_CALL, 1)
    store.down = True
    store.release(PART_CALL)
    try:
        with pytest.raises(ProxyError) as err:
            await task
        assert err.value.kind.status == 503
        assert len(store.uploads) == 1, "the abort cannot have reached S3 yet"
        assert budget.in_use == 0
        await store.reached(ABORT, 3, "failed")  # retried while S3 is down
        store.down = False
        await store.reached(ABORT, 1, "ok")
        assert store.uploads == {}
    finally:
        await janitor.close()


async def test_a_recheck_runs_once_per_delay_and_is_dropped_quietly_at_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    janitor = Janitor()
    runs: list[int] = []

    async def delete() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise OSError("S3 away")  # a failed recheck does not stop the next one

    janitor.again_after(delete, "delete key=k", (0.01, 0.05))
    await asyncio.sleep(0.2)
    assert runs == [0, 1]
    janitor.again_after(delete, "delete key=k", (60.0,))
    await janitor.close()
    assert runs == [0, 1]
    assert "cleanup.abandoned" not in caplog.text  # a precaution, not a cleanup owed
