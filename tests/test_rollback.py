"""Cleanup under cancellation, without HTTP: an in-memory S3 whose calls can be held
at chosen moments, and the upload pipeline driven directly.

What must hold whatever stops an upload (an error, a cancellation, a second
cancellation during the cleanup): every multipart upload is completed or aborted,
every object a write may have created is deleted, and the caller's cancellation
is re-raised, never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from s3proxy.body import Chunk
from s3proxy.budget import MemoryBudget
from s3proxy.errors import CLIENT_DISCONNECTED, ProxyError
from s3proxy.form import Field, FilePart
from s3proxy.janitor import Janitor
from s3proxy.pipeline import FileSpec, FileUpload, PipelineConfig, StoredFile
from s3proxy.s3 import ObjectHead, ObjectOptions, Written, refusal
from s3proxy.uploads import RequestUpload
from tests.polling import eventually

MiB = 1024**2
CFG = PipelineConfig(part_size=5 * MiB, parts_in_flight=2, max_file_size=1024**3)


async def forever() -> None:
    await asyncio.Event().wait()


@dataclass
class MemoryS3:
    """An ObjectSink over dicts; ``hang`` holds a call after S3 carried it out (a lost answer)."""

    objects: dict[str, bytes] = field(default_factory=dict)
    uploads: dict[str, dict[int, bytes]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    hang: set[str] = field(default_factory=set)
    delete_delay: float = 0.0
    part_stop_delay: float = 0.0  # how long a cancelled part call takes to end

    async def put(
        self, key: str, data: Sequence[Chunk], options: ObjectOptions, **_: object
    ) -> Written:
        self.objects[key] = b"".join(bytes(c) for c in data)
        self.events.append("put")
        if "put" in self.hang:
            await forever()
        return Written('"etag"')

    async def create(self, key: str, options: ObjectOptions, **_: object) -> str:
        upload_id = f"up-{len(self.uploads) + 1}"
        self.uploads[upload_id] = {}
        return upload_id

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: Sequence[Chunk], **_: object
    ) -> str:
        self.events.append(f"part-{number}")
        try:
            if "part" in self.hang:
                await forever()
        except asyncio.CancelledError:
            self.events.append(f"part-{number}-cancelled")
            # The request is on the wire: stopping it takes a moment, whatever else is cancelled.
            end = asyncio.get_running_loop().time() + self.part_stop_delay
            while (left := end - asyncio.get_running_loop().time()) > 0:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(left)
            self.events.append(f"part-{number}-ended")
            raise
        self.uploads[upload_id][number] = b"".join(bytes(c) for c in data)
        return f'"p{number}"'

    async def complete(
        self, key: str, upload_id: str, parts: Sequence[tuple[int, str]], **_: object
    ) -> Written:
        stored = self.uploads.pop(upload_id)
        self.objects[key] = b"".join(stored[n] for n, _ in parts)
        self.events.append("complete")
        if "complete" in self.hang:
            await forever()
        return Written('"etag-2"')

    async def abort(self, key: str, upload_id: str) -> None:
        self.events.append("abort")
        self.uploads.pop(upload_id, None)  # NoSuchUpload is no error

    async def tag(self, key: str, tags: Mapping[str, str]) -> int:
        return 0

    async def tags(self, key: str) -> dict[str, str]:
        return {}

    async def untag(self, key: str) -> int:
        return 0

    async def delete(self, key: str, **_: object) -> None:
        self.events.append(f"delete {key}")
        await asyncio.sleep(self.delete_delay)
        self.objects.pop(key, None)

    async def head(self, key: str, **_: object) -> ObjectHead:
        if key not in self.objects:
            raise refusal("HeadObject", "NoSuchKey", 404)
        return ObjectHead(length=len(self.objects[key]))

    async def check(self, within: float | None = None) -> None:
        pass


class Source:
    """A file's bytes; at their end: EOF, an error, or waiting forever."""

    def __init__(self, data: bytes, then: BaseException | None = None, hang: bool = False) -> None:
        self._data = memoryview(data)
        self._then = then
        self._hang = hang

    async def read(self, size: int) -> bytes:
        await asyncio.sleep(0)
        if self._data:
            chunk, self._data = bytes(self._data[:size]), self._data[size:]
            return chunk
        if self._hang:
            await forever()
        if self._then is not None:
            raise self._then
        return b""

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def expire(self, message: str) -> None:
        raise AssertionError(f"no eviction expected here: {message}")

    def arrival(self) -> None:
        return None


def spec(key: str = "k/a.bin") -> FileSpec:
    return FileSpec(field="f", filename="a.bin", key=key)


FINE = 0.005  # seconds between looks: the windows these tests aim into are 50-200 ms


async def test_rollback_deletes_every_file_despite_a_second_cancellation() -> None:
    s3 = MemoryS3()

    async def form() -> AsyncIterator[Field | FilePart]:
        for i in range(3):
            yield FilePart(f"f{i}", f"{i}.txt", "text/plain", Source(b"hello"))
        await forever()  # the client stalls after three files

    job = RequestUpload(s3, MemoryBudget(64 * MiB), CFG, "u/{uuid}/{filename}", None)
    task = asyncio.create_task(job.run(form()))
    await eventually(
        lambda: list(s3.objects),
        until=lambda keys: len(keys) == 3,
        within=5,
        what="3 files stored",
        every=FINE,
    )
    s3.delete_delay = 0.05
    task.cancel()  # shutdown: the rollback starts
    await eventually(
        lambda: s3.events,
        until=lambda events: any(e.startswith("delete") for e in events),
        within=5,
        what="the rollback deleting (events)",
        every=FINE,
    )
    task.cancel()  # and a second cancellation arrives during it
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s3.objects == {}, "every stored file must be deleted"


async def test_cancellation_while_parts_stop_is_not_swallowed() -> None:
    """The client fails mid-file with a part in flight; while that part call is being
    stopped, the request is cancelled: the abort still waits for the part to end, and the
    caller gets its CancelledError, not the earlier error."""
    s3 = MemoryS3(hang={"part"}, part_stop_delay=0.2)
    source = Source(bytes(5 * MiB + 100), then=ProxyError(CLIENT_DISCONNECTED, "gone"))
    upload = FileUpload(spec(), s3, MemoryBudget(64 * MiB), CFG)
    task = asyncio.create_task(upload.run(source))
    await eventually(
        lambda: s3.events,
        until=lambda events: "part-1-cancelled" in events,
        within=5,
        what="part 1 cancelled (events)",
        every=FINE,
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s3.events.index("part-1-ended") < s3.events.index("abort")
    assert s3.uploads == {}


@pytest.mark.parametrize(
    ("hang", "size"), [("put", 1000), ("complete", 6 * MiB)], ids=["put", "complete"]
)
async def test_cancelled_after_the_write_reached_s3_deletes_it(hang: str, size: int) -> None:
    """PutObject or CompleteMultipartUpload was carried out but its answer never came
    back before the upload was cancelled: the object must not stay."""
    s3 = MemoryS3(hang={hang})
    upload = FileUpload(spec(), s3, MemoryBudget(64 * MiB), CFG)
    task = asyncio.create_task(upload.run(Source(bytes(size))))
    await eventually(
        lambda: s3.events,
        until=lambda events: hang in events,
        within=5,
        what=f"{hang} reached S3 (events)",
        every=FINE,
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s3.objects == {} and s3.uploads == {}


async def test_error_after_put_deletes_it() -> None:
    """Any exception once a write may have reached S3 deletes the key (keys are unique)."""

    class Boom(MemoryS3):
        async def put(
            self, key: str, data: Sequence[Chunk], options: ObjectOptions, **_: object
        ) -> Written:
            await super().put(key, data, options)
            raise ProxyError(CLIENT_DISCONNECTED, "answer lost")

    s3 = Boom()
    upload = FileUpload(spec(), s3, MemoryBudget(64 * MiB), CFG)
    with pytest.raises(ProxyError):
        await upload.run(Source(b"data"))
    assert s3.objects == {}


async def test_stored_file_reports_its_metadata() -> None:
    s3 = MemoryS3()

    async def form() -> AsyncIterator[Field | FilePart]:
        yield Field("Title", "Grüße")
        yield Field("tag", "a")
        yield Field("tag", "b")
        yield FilePart("f", "a.txt", "text/plain", Source(b"hi"))
        yield Field("late", "x")

    job = RequestUpload(s3, MemoryBudget(64 * MiB), CFG, "u/{uuid}/{filename}", None)
    result = await job.run(form())
    [f] = result.files
    assert isinstance(f, StoredFile)
    assert f.to_json()["metadata"] == {"Title": "Grüße", "tag": "a,b"}
    assert result.to_json()["fields"] == {"Title": "Grüße", "tag": ["a", "b"], "late": "x"}


async def test_a_cancelled_rollback_still_deletes_a_late_write_again_later() -> None:
    """A stored file whose write may land late (an attempt went unanswered) is deleted, and
    again later (``recheck_late``). A cancellation during the delete (a shutdown's drain,
    the client's second try) finished the delete, but the re-raised CancelledError skipped
    scheduling the later deletes: a late write then stayed behind a failure."""
    s3 = MemoryS3(delete_delay=0.05)
    janitor = Janitor(interval=0.001)
    cfg = dataclasses.replace(CFG, late_write_window=60.0)
    job = RequestUpload(
        s3, MemoryBudget(64 * MiB), cfg, "u/{uuid}/{filename}", None, janitor=janitor
    )
    stored = StoredFile("f", "a.bin", "u/1/a.bin", 5, "text/plain", '"e"', "", 1)
    job.result.files.append(dataclasses.replace(stored, may_land_late=True))
    s3.objects[stored.key] = b"hello"
    task = asyncio.create_task(job.rollback("CLIENT_DISCONNECTED"))
    await eventually(lambda: s3.events, within=5, what="the rollback deleting", every=FINE)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s3.objects == {}
    assert [r.what for r in janitor._rechecks.values()] == [f"rollback key={stored.key}"]
    await janitor.close()
