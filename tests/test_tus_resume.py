"""The pipeline's resumed files (``pipeline.Resumed``) over the in-memory store, which
checks every CRC as S3 does: a file sent in requests of any size, with staged bytes in
front of parts, gets part CRCs combined right and the full-object CRC of its bytes; the
budget is back to 0 after every request."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from s3proxy.body import Chunk
from s3proxy.budget import MemoryBudget
from s3proxy.checksums import Algorithm, Crc, CrcValue
from s3proxy.errors import ProxyError
from s3proxy.machine import Resume
from s3proxy.parts import plan_parts
from s3proxy.pipeline import FileSpec, FileUpload, PipelineConfig, Resumed, Staged, StoredFile
from tests.fake_client import ClientSource, MiB
from tests.memory_s3 import MemoryS3
from tests.test_tus import body

CFG = PipelineConfig(
    part_size=5 * MiB,
    parts_in_flight=2,
    max_file_size=1024**3,
    checksum=Algorithm.CRC64NVME,
)


@dataclass
class Progress:
    """What a tus state would hold between requests (here in memory)."""

    total: int
    offset: int = 0
    staged: list[bytes] = field(default_factory=list)
    staged_crc: CrcValue | None = None  # theirs, from the CRCs stage() was given
    upload_id: str | None = None
    content_type: str = ""
    etags: dict[int, str] = field(default_factory=dict)
    crcs: dict[int, CrcValue] = field(default_factory=dict)
    tail: tuple[int, bytes, CrcValue | None] | None = None  # what the last request staged
    stores: int = 0  # object writes the pipeline was about to make (before_store)

    async def load(self) -> Staged:
        return Staged(list(self.staged), self.staged_crc)

    async def stage(
        self, number: int, start: int, chunks: list[Chunk], size: int, crc: CrcValue | None
    ) -> None:
        tail = b"".join(bytes(c) for c in chunks)
        # The CRC handed over is the one of exactly these bytes, also for a request that
        # began inside the part (PartCrcs' running value, no second pass).
        assert crc == (crc_of(tail) if size else None)
        self.tail = (start, tail, crc)

    async def before_store(self) -> None:
        self.stores += 1


def crc_of(data: bytes) -> CrcValue:
    running = Crc(Algorithm.CRC64NVME)
    running.update(data)
    return running.result()


async def send(
    store: MemoryS3, budget: MemoryBudget, p: Progress, data: bytes
) -> StoredFile | None:
    plan = plan_parts(CFG.part_size, p.total, CFG.max_file_size)
    staged = sum(len(s) for s in p.staged)
    resumed = Resumed(
        point=Resume(p.offset + staged, p.total, staged, created=p.upload_id is not None),
        plan=plan,
        staging=p,
        content_type=p.content_type,
        upload_id=p.upload_id,
        etags=p.etags,
        crcs=p.crcs,
    )
    spec = FileSpec(field="file", filename="deck.pdf", key="k/deck.pdf")
    upload = FileUpload(spec, store, budget, CFG, resume=resumed)
    p.tail = None
    stored = await upload.proceed(ClientSource(data, chunk=64 * 1024))
    assert budget.in_use == 0
    acked = upload.acknowledged()
    if len(acked) > len(p.etags):  # a part was sent: the staged bytes went into it
        p.staged, p.staged_crc = [], None
        p.offset = sum(plan.size(n) for n in acked)
    if p.tail is not None and p.tail[1]:
        start, tail, crc = p.tail
        assert start == p.offset + sum(len(s) for s in p.staged) and crc is not None
        p.staged.append(tail)
        p.staged_crc = crc if p.staged_crc is None else p.staged_crc.then(crc)
    p.etags = {n: e for n, (e, _) in acked.items()}
    p.crcs = {n: c for n, (_, c) in acked.items() if c is not None}
    p.upload_id = upload.upload_id
    p.content_type = upload.content_type
    return stored


@pytest.mark.parametrize("step", [100 * 1024, 1 * MiB + 3, 5 * MiB, 7 * MiB])
async def test_a_file_in_requests_of_any_size_is_stored_with_its_crc(step: int) -> None:
    store = MemoryS3()
    budget = MemoryBudget(32 * MiB)
    data = body(11 * MiB + 17)
    p = Progress(len(data))
    stored = None
    position = 0
    while stored is None:
        stored = await send(store, budget, p, data[position : position + step])
        position = min(len(data), position + step)
    assert store.objects["k/deck.pdf"].data == data
    crc = Crc(Algorithm.CRC64NVME)
    crc.update(data)
    assert stored.checksum is not None and stored.checksum.value == crc.b64()
    assert stored.size == len(data)
    assert stored.content_type == "application/pdf"
    assert not store.uploads
    assert p.stores == 1  # asked once, right before the one object write (before_store)


async def test_a_request_past_the_total_is_refused_and_keeps_the_upload() -> None:
    store = MemoryS3()
    budget = MemoryBudget(32 * MiB)
    data = body(6 * MiB)
    p = Progress(len(data))
    assert await send(store, budget, p, data[: 5 * MiB + 10]) is None
    with pytest.raises(ProxyError) as err:
        await send(store, budget, p, data[5 * MiB + 10 :] + b"extra")
    assert err.value.kind.code == "FILE_TOO_LARGE"
    assert budget.in_use == 0
    assert p.upload_id in store.uploads  # not aborted: the caller decides (still resumable)
    await store.abort("k/deck.pdf", p.upload_id or "")
