"""RequestUpload and iter_form without HTTP: one request's files, all or nothing.

The form arrives either as parts made directly (``Field``/``FilePart`` over an
in-memory ``ClientSource``) or as raw multipart bytes read by aiohttp's own
``MultipartReader`` over an in-memory ``StreamReader`` (``FormClient``), and is
stored into the in-memory S3. What must hold: a failed request leaves nothing
stored, whichever file failed and however often it is cancelled while cleaning
up; metadata comes only from the fields sent before a file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence

import pytest
from prometheus_client import generate_latest

from s3proxy.budget import MemoryBudget
from s3proxy.errors import (
    CLIENT_DISCONNECTED,
    FIELD_TOO_LARGE,
    FILE_TOO_LARGE,
    INVALID_FIELD,
    MALFORMED_MULTIPART,
    METADATA_TOO_LARGE,
    NO_FILE,
    REQUEST_TOO_LARGE,
    TOO_MANY_FIELDS,
    TOO_MANY_FILES,
    UPSTREAM_ERROR,
    ErrorKind,
    ProxyError,
)
from s3proxy.form import Field, FilePart, FormLimits, iter_form
from s3proxy.janitor import Janitor, Kind, advice
from s3proxy.pipeline import PipelineConfig
from s3proxy.tokens import UploadGrant
from s3proxy.uploads import RequestUpload, UploadResult
from tests import bodies
from tests.fake_client import ClientSource, FormClient, GatedS3, MiB, payload
from tests.test_metrics import parse, value

PART = 5 * MiB
CFG = PipelineConfig(part_size=PART, parts_in_flight=2, max_file_size=1024**3)
TEMPLATE = "u/{uuid}/{filename}"
LIMITS = FormLimits(
    max_files=4,
    max_fields=4,
    max_field_size=64,
    max_request_size=64 * MiB,
    chunk_size=256 * 1024,
)
Part = Field | FilePart


@pytest.fixture
async def store() -> AsyncIterator[GatedS3]:
    """The in-memory bucket; like the moto ``bucket`` fixture, no upload may stay open."""
    s3 = GatedS3()
    yield s3
    assert s3.uploads == {}, "a multipart upload was left open"


async def parts(items: Sequence[Part], stall: asyncio.Event | None = None) -> AsyncIterator[Part]:
    """The form as iter_form would yield it; with ``stall`` the client stops after it."""
    for item in items:
        yield item
    if stall is not None:
        await stall.wait()


def file(name: str, data: bytes, then: BaseException | None = None) -> FilePart:
    return FilePart(name, f"{name}.bin", None, ClientSource(data, then=then))


def job(
    s3: GatedS3,
    budget: MemoryBudget,
    grant: UploadGrant | None = None,
    janitor: Janitor | None = None,
) -> RequestUpload:
    return RequestUpload(s3, budget, CFG, TEMPLATE, None, grant=grant, janitor=janitor)


def stored_keys(s3: GatedS3) -> list[str]:
    """Keys in the order their writes succeeded."""
    return [
        e.label
        for e in s3.events
        if e.op in ("PutObject", "CompleteMultipartUpload") and e.phase == "ok"
    ]


# -- all or nothing -----------------------------------------------------------------


GONE = ProxyError(CLIENT_DISCONNECTED, "the client went away")


@pytest.mark.parametrize(
    ("size", "fail_at", "then", "code", "aborts"),
    [
        # file 2 has two parts (UploadPart calls 1, 2): call 3 is file 3's first part
        (PART + 9, 3, None, UPSTREAM_ERROR, 1),
        (PART + 9, None, GONE, CLIENT_DISCONNECTED, 1),
        (100, None, GONE, CLIENT_DISCONNECTED, 0),  # ends before any S3 call
    ],
    ids=["s3-refuses-a-part", "client-gone-mid-multipart", "client-gone-small"],
)
async def test_third_file_fails_the_first_two_are_deleted(
    store: GatedS3,
    size: int,
    fail_at: int | None,
    then: BaseException | None,
    code: ErrorKind,
    aborts: int,
) -> None:
    if fail_at is not None:
        store.fail("UploadPart", at=fail_at)
    budget = MemoryBudget(4 * PART)
    first, second = file("a", payload(10)), file("b", payload(PART + 1, seed=1))
    third = file("c", payload(size, seed=2), then=then)
    up = job(store, budget)
    with pytest.raises(ProxyError) as err:
        await up.run(parts([Field("t", "x"), first, second, third]))
    assert err.value.kind == code
    kept = stored_keys(store)
    assert len(kept) == 2
    deleted = [e.label for e in store.events if e.op == "DeleteObject" and e.phase == "ok"]
    assert sorted(deleted) == sorted(kept)
    assert store.count("AbortMultipartUpload") == aborts
    assert store.objects == {} and budget.in_use == 0
    assert up.result.files == []
    # every file started ends once: the two deleted ones aborted with the third
    samples = parse(generate_latest(up.metrics.registry).decode())
    assert value(samples, "s3proxy_uploads_started_total") == 3
    assert value(samples, "s3proxy_uploads_completed_total") == 0
    assert value(samples, "s3proxy_bytes_stored_total") == 0
    assert value(samples, "s3proxy_uploads_aborted_total", reason=code.code) == 3


async def test_every_file_stored_nothing_deleted(store: GatedS3) -> None:
    data = [payload(1), payload(PART, seed=2), payload(2 * PART + 3, seed=3)]
    budget = MemoryBudget(4 * PART)
    result = await job(store, budget).run(
        parts([file(n, d) for n, d in zip("abc", data, strict=True)])
    )
    assert [f.field for f in result.files] == ["a", "b", "c"]
    assert [store.objects[f.key].data for f in result.files] == data
    assert [f.sha256 for f in result.files] == [hashlib.sha256(d).hexdigest() for d in data]
    assert [f.parts for f in result.files] == [0, 0, 3]
    assert len({f.key for f in result.files}) == 3
    assert store.count("DeleteObject") == 0 and budget.in_use == 0


async def test_rollback_after_success_deletes_every_file(store: GatedS3) -> None:
    """What the handler does when a later step (a webhook) fails: rollback() returns the
    keys it deleted, in the order they were stored."""
    up = job(store, MemoryBudget(4 * PART))
    result = await up.run(parts([file("a", b"1"), file("b", b"22"), file("c", b"333")]))
    keys = [f.key for f in result.files]
    assert await up.rollback("WEBHOOK_FAILED") == keys
    assert store.objects == {}
    assert await up.rollback("WEBHOOK_FAILED") == []  # nothing twice
    samples = parse(generate_latest(up.metrics.registry).decode())
    assert value(samples, "s3proxy_uploads_completed_total") == 0
    assert value(samples, "s3proxy_uploads_aborted_total", reason="WEBHOOK_FAILED") == 3


async def test_settled_files_count_completed_once(store: GatedS3) -> None:
    up = job(store, MemoryBudget(4 * PART))
    await up.run(parts([file("a", b"1"), file("b", b"22")]))
    samples = parse(generate_latest(up.metrics.registry).decode())
    assert value(samples, "s3proxy_uploads_completed_total") == 0  # not final yet
    up.settle()
    samples = parse(generate_latest(up.metrics.registry).decode())
    assert value(samples, "s3proxy_uploads_completed_total") == 2
    assert value(samples, "s3proxy_bytes_stored_total") == 3


async def test_rollback_cancelled_twice_still_deletes_every_file(store: GatedS3) -> None:
    """The request is cancelled with three files stored and the client stalled; the
    deletes run at once, and two more cancellations while they are held change nothing
    but the CancelledError the caller gets."""
    stall = asyncio.Event()
    items: list[Part] = [
        file("a", b"1"),
        Field("t", "x"),
        file("b", payload(PART + 1)),
        file("c", b"3"),
    ]
    budget = MemoryBudget(4 * PART)
    task = asyncio.create_task(job(store, budget).run(parts(items, stall)))
    await store.until(lambda: len(store.objects) == 3, "three files stored")
    store.hold("DeleteObject")
    task.cancel()
    await store.reached("DeleteObject", 3)  # all three at once, not one after another
    task.cancel()
    task.cancel()
    await asyncio.sleep(0)  # let the cancellations land while the deletes are held
    assert not task.done() and len(store.objects) == 3
    store.release("DeleteObject")
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.objects == {}
    assert store.count("DeleteObject", "ok") == 3
    assert budget.in_use == 0


async def test_direct_rollback_cancelled_twice_still_deletes(store: GatedS3) -> None:
    up = job(store, MemoryBudget(4 * PART))
    await up.run(parts([file("a", b"1"), file("b", b"2")]))
    store.hold("DeleteObject")
    task = asyncio.create_task(up.rollback("WEBHOOK_FAILED"))
    await store.reached("DeleteObject", 2)
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    store.release("DeleteObject")
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.objects == {}


async def test_rollback_s3_down_is_retried_by_the_janitor(store: GatedS3) -> None:
    janitor = Janitor(interval=0.001)
    up = job(store, MemoryBudget(4 * PART), janitor=janitor)
    try:
        await up.run(parts([file("a", b"1"), file("b", b"2")]))
        store.down = True
        assert len(await up.rollback("WEBHOOK_FAILED")) == 2  # returns at once: S3 is down
        assert len(store.objects) == 2
        await store.reached("DeleteObject", 6, "failed")  # retried while down
        store.down = False
        await store.reached("DeleteObject", 2, "ok")
        assert store.objects == {}
    finally:
        await janitor.close()


async def test_a_rollback_owed_at_shutdown_gets_a_last_try(
    store: GatedS3, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollback delete still owed when the proxy stops is tried once more at close: S3
    back meanwhile, the object goes (the faults probe's s9: the 502'd request's object
    stayed, and the log sent the operator to `s3proxy cleanup`, which never removes it)."""
    janitor = Janitor(interval=60)  # its next retry would come long after the close
    up = job(store, MemoryBudget(4 * PART), janitor=janitor)
    await up.run(parts([file("a", b"1")]))
    store.down = True
    await up.rollback("UPSTREAM_ERROR")
    assert len(store.objects) == 1
    store.down = False
    with caplog.at_level(logging.INFO, "s3proxy.janitor"):
        await janitor.close()
    assert store.objects == {}
    assert "cleanup.retried what=rollback key=" in caplog.text
    assert "cleanup.abandoned" not in caplog.text


async def test_a_rollback_that_fails_at_shutdown_is_logged_with_its_key_and_remedy(
    store: GatedS3, caplog: pytest.LogCaptureFixture
) -> None:
    """S3 still away at close: the last try fails within its bound, and each owed delete
    is logged with its key and what removes it (by hand: nothing removes it later)."""
    janitor = Janitor(interval=60)
    up = job(store, MemoryBudget(4 * PART), janitor=janitor)
    await up.run(parts([file("a", b"1"), file("b", b"2")]))
    keys = sorted(store.objects)
    store.down = True
    await up.rollback("UPSTREAM_ERROR")
    with caplog.at_level(logging.INFO, "s3proxy.janitor"):
        await asyncio.wait_for(janitor.close(last_try=0.5), 5)
    abandoned = [r.getMessage() for r in caplog.records if "cleanup.abandoned" in r.getMessage()]
    assert len(abandoned) == 2
    for key, line in zip(keys, sorted(abandoned), strict=True):
        assert f"what=rollback key={key}" in line
        assert "delete it by hand" in line and "s3proxy cleanup" not in line


@pytest.mark.parametrize(
    ("kind", "remedy"),
    [
        (Kind.UPLOAD, "`s3proxy cleanup --execute` removes it"),  # abort key=... upload_id=...
        (Kind.TUS_UPLOAD, "`s3proxy cleanup --execute` removes it"),  # tus state|end id=...
        (Kind.OBJECT, "delete it by hand"),  # delete key=..., rollback key=... etag=...
        (Kind.OBJECT_SIZE_UNCHECKED, "x-amz-meta-s3proxy-size"),
        (Kind.COMPLETE_UNANSWERED, "a retried complete answers for it"),
        (Kind.TUS_PATCH, "resumes from its last commit"),  # tus commit|lock id=...
    ],
)
def test_an_abandoned_cleanup_names_what_undoes_it(kind: Kind, remedy: str) -> None:
    assert remedy in advice(kind)


# -- fields and metadata -------------------------------------------------------------


async def test_metadata_comes_only_from_fields_before_the_file(store: GatedS3) -> None:
    items: list[Part] = [
        Field("Title", "Grüße"),
        Field("tag", "a"),
        file("one", b"1"),
        Field("tag", "b"),
        file("two", b"2"),
        Field("late", "x"),
    ]
    result = await job(store, MemoryBudget(4 * PART)).run(parts(items))
    one, two = result.files
    assert one.metadata == {"Title": "Grüße", "tag": "a"}
    assert two.metadata == {"Title": "Grüße", "tag": "a,b"}
    assert store.objects[one.key].options.metadata == {
        "title": "=?UTF-8?B?R3LDvMOfZQ==?=",  # RFC 2047, as S3 itself encodes
        "tag": "a",
        "sha256": one.sha256,
    }
    assert store.objects[two.key].options.metadata["tag"] == "a,b"
    assert "late" not in store.objects[two.key].options.metadata
    assert result.fields == {"Title": "Grüße", "tag": ["a", "b"], "late": "x"}
    assert result.to_json()["files"][1]["metadata"] == {"Title": "Grüße", "tag": "a,b"}


async def test_multipart_file_gets_its_metadata_at_create(store: GatedS3) -> None:
    result = await job(store, MemoryBudget(4 * PART)).run(
        parts([Field("x", "1"), file("big", payload(PART + 1))])
    )
    [f] = result.files
    obj = store.objects[f.key]
    assert obj.options.metadata == {"x": "1"}  # sha256 comes as a tag: unknown at Create
    assert obj.tags == {"sha256": f.sha256}


@pytest.mark.parametrize(
    ("items", "code"),
    [
        ([], NO_FILE),
        ([Field("a", "1"), Field("b", "2")], NO_FILE),
        ([Field("Foo", "1"), Field("foo", "2"), "file"], INVALID_FIELD),
        ([Field("sha256", "x"), "file"], INVALID_FIELD),
        # the proxy's own names, which it reads back as proof: a tus upload's id (a
        # field of it made another client's object pass as that upload's, 204), a
        # --no-overwrite nonce, a presigned upload's size; any other under s3proxy-
        ([Field("s3proxy-tus", "x"), "file"], INVALID_FIELD),
        ([Field("S3Proxy-Upload", "x"), "file"], INVALID_FIELD),
        ([Field("s3proxy-size", "1"), "file"], INVALID_FIELD),
        ([Field("s3proxy-anything", "1"), "file"], INVALID_FIELD),
        ([Field("a b", "x"), "file"], INVALID_FIELD),
        ([Field("big", "v" * 2048), "file"], METADATA_TOO_LARGE),
        # a bad field between two files: the first, already stored, is deleted
        (["file", Field("Foo", "1"), Field("FOO", "2"), "file"], INVALID_FIELD),
    ],
    ids=[
        "empty",
        "only-fields",
        "case",
        "reserved",
        "tus-id",
        "nonce",
        "size",
        "proxy-prefix",
        "bad-name",
        "too-big",
        "after-a-file",
    ],
)
async def test_refused_forms_store_nothing(
    store: GatedS3, items: list[Field | str], code: ErrorKind
) -> None:
    form = [file(f"f{i}", b"data") if item == "file" else item for i, item in enumerate(items)]
    budget = MemoryBudget(4 * PART)
    with pytest.raises(ProxyError) as err:
        await job(store, budget).run(parts(form))  # type: ignore[arg-type]
    assert err.value.kind == code
    assert store.objects == {} and budget.in_use == 0
    assert store.count("DeleteObject") == store.count("PutObject", "ok")  # each one stored


@pytest.mark.parametrize(
    ("sizes", "limit", "stored"),
    [
        ([6, 4], 10, 2),  # exactly the token's bytes
        ([6, 5], 10, 1),  # the second file goes over what the first left
        ([11], 10, 0),
    ],
)
async def test_token_limit_counts_every_file_of_the_request(
    store: GatedS3, sizes: list[int], limit: int, stored: int
) -> None:
    grant = UploadGrant(
        prefix="t/", max_size=limit, types=(), max_files=None, subject=None, expires=0
    )
    up = job(store, MemoryBudget(4 * PART), grant=grant)
    form = parts([file(f"f{i}", payload(n, seed=i)) for i, n in enumerate(sizes)])
    if stored == len(sizes):
        result = await up.run(form)
        assert [f.size for f in result.files] == sizes
        assert all(f.key.startswith("t/") for f in result.files)
    else:
        with pytest.raises(ProxyError) as err:
            await up.run(form)
        assert err.value.kind == FILE_TOO_LARGE
        assert store.count("PutObject", "ok") == stored
        assert store.objects == {}


# -- iter_form over aiohttp's reader, no socket -----------------------------------------


async def read_form(client: FormClient, limits: FormLimits = LIMITS) -> list[tuple[str, ...]]:
    """Everything iter_form yields, files read to their end (as the pipeline does)."""
    out: list[tuple[str, ...]] = []
    async with client.sending():
        async for part in iter_form(client.reader, limits, client.body_bytes):
            if isinstance(part, Field):
                out.append(("field", part.name, part.value))
                continue
            data = bytearray()
            while chunk := await part.source.read(limits.chunk_size):
                data += chunk
            out.append(("file", part.field, part.filename, str(part.declared_type), data.hex()))
    return out


async def test_iter_form_yields_fields_and_files_in_order() -> None:
    blob = payload(300_000)  # more than the reader's buffer: the client is paused
    body = bodies.body(
        [
            bodies.field("title", "Grüße"),
            bodies.file("doc", "../../etc/a.txt", b"hello", "text/plain"),
            bodies.file("unused", "", b""),  # a browser's empty file input: skipped
            bodies.file("anon", "", b"x"),  # no filename but content: a file named upload
            bodies.file("blob", "b.bin", blob, None),
            bodies.field("after", "1"),
        ]
    )
    client = FormClient(body)
    got = await read_form(client)
    assert got == [
        ("field", "title", "Grüße"),
        ("file", "doc", "a.txt", "text/plain", b"hello".hex()),
        ("file", "anon", "upload", "application/octet-stream", b"x".hex()),
        ("file", "blob", "b.bin", "None", blob.hex()),
        ("field", "after", "1"),
    ]
    assert client.wire.pauses > 0  # backpressure reached the client


@pytest.mark.parametrize(
    ("body", "cut", "code"),
    [
        (bodies.body([bodies.file(f"f{i}", "a", b"x") for i in range(5)]), None, TOO_MANY_FILES),
        (bodies.body([bodies.field(f"n{i}", "v") for i in range(5)]), None, TOO_MANY_FIELDS),
        (bodies.body([bodies.field("n", "v" * 65)]), None, FIELD_TOO_LARGE),
        (bodies.body([bodies.file("f", "a", payload(1000))]), 500, MALFORMED_MULTIPART),
        (bodies.body([bodies.file("f", "a", payload(65 * MiB))]), None, REQUEST_TOO_LARGE),
    ],
    ids=["files", "fields", "field-size", "truncated", "request-size"],
)
async def test_iter_form_limits(body: bytes, cut: int | None, code: ErrorKind) -> None:
    with pytest.raises(ProxyError) as err:
        await read_form(FormClient(body, cut=cut))
    assert err.value.kind == code


async def test_form_bytes_to_stored_objects(store: GatedS3) -> None:
    """The whole path below HTTP: raw multipart bytes -> aiohttp's reader -> iter_form ->
    RequestUpload -> S3, with a multipart file among small ones."""
    big = payload(PART + 12345, seed=7)
    body = bodies.body(
        [
            bodies.field("who", "me"),
            bodies.file("a", "a.bin", b"small"),
            bodies.file("b", "b.bin", big),
        ]
    )
    client = FormClient(body)
    budget = MemoryBudget(4 * PART)
    async with client.sending():
        result: UploadResult = await job(store, budget).run(
            iter_form(client.reader, LIMITS, client.body_bytes)
        )
    a, b = result.files
    assert store.objects[a.key].data == b"small"
    assert store.objects[b.key].data == big and b.parts == 2
    assert a.metadata == b.metadata == {"who": "me"}
    assert budget.in_use == 0


@pytest.mark.parametrize(
    "then", [None, ConnectionResetError("reset")], ids=["truncated", "connection-lost"]
)
async def test_form_cut_in_the_second_file_stores_nothing(
    store: GatedS3, then: BaseException | None
) -> None:
    body = bodies.body(
        [bodies.file("a", "a.bin", b"small"), bodies.file("b", "b", payload(PART + 5000))]
    )
    client = FormClient(body, cut=len(body) - 1000, then=then)
    budget = MemoryBudget(4 * PART)
    with pytest.raises(ProxyError) as err:
        async with client.sending():
            await job(store, budget).run(iter_form(client.reader, LIMITS, client.body_bytes))
    assert err.value.kind == (MALFORMED_MULTIPART if then is None else CLIENT_DISCONNECTED)
    assert store.count("PutObject", "ok") == 1 and store.count("DeleteObject", "ok") == 1
    # Every upload begun was aborted. After a truncation part 1 of file b was sent
    # first; a reset drops what the reader still buffered (aiohttp raises before
    # serving it), so there it depends on how far the reader got.
    creates = store.count("CreateMultipartUpload", "ok")
    assert store.count("AbortMultipartUpload", "ok") == creates == (1 if then is None else creates)
    assert store.count("CompleteMultipartUpload") == 0
    assert store.objects == {} and budget.in_use == 0
