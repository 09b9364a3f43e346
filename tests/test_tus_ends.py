"""How a tus upload ends when its last PATCH does not go as planned: a refused completion
(409 KEY_EXISTS), a lost answer to CompleteMultipartUpload, a lost 204, a state S3 will
not delete. Each test checks
what HEAD says, what a retried PATCH gets, and what the bucket holds."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web

from s3proxy.state import STATE
from s3proxy.tus_protocol import OFFSET_STREAM
from s3proxy.tus_url import RESERVED_PREFIX
from tests import bodies
from tests.conftest import ProxyFactory
from tests.faults import OBJECT_WRITES, Fault, FaultyS3, tus_operation
from tests.polling import eventually
from tests.s3util import all_keys_async, open_uploads_async, read_object_async
from tests.test_tus import TUS, MiB, body, meta, reserved
from tests.test_tus_lifecycle import new_upload, patch_headers
from tests.test_webhook_flow import SECRET as SECRET_HOOK
from tests.test_webhook_flow import receiver


async def _code(resp: Any) -> tuple[int, str]:
    return resp.status, (await resp.json())["error"]["code"]


async def test_a_refused_completion_never_reports_an_offset_past_the_length(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """Under --no-overwrite another upload stored the key first: the last PATCH of this one
    is 409 KEY_EXISTS, and the upload is ended (it can never finish at that key): HEAD and
    a retried PATCH are 404, its multipart upload is aborted, nothing is left reserved,
    and the first upload's object is untouched."""
    proxy = await proxy_factory(key_template="uploads/{filename}")
    first, second = body(7 * MiB, seed=1), body(7 * MiB, seed=2)
    named = meta(filename="same.pdf")
    url_a = await new_upload(proxy, len(first), **{"Upload-Metadata": named})
    url_b = await new_upload(proxy, len(second), **{"Upload-Metadata": named})
    resp = await proxy.patch(url_a, data=io.BytesIO(first), headers=patch_headers(0))
    assert resp.status == 204, await resp.text()
    resp = await proxy.patch(url_b, data=io.BytesIO(second[: 6 * MiB]), headers=patch_headers(0))
    assert resp.status == 204, await resp.text()
    rest = second[6 * MiB :]
    resp = await proxy.patch(url_b, data=io.BytesIO(rest), headers=patch_headers(6 * MiB))
    assert await _code(resp) == (409, "KEY_EXISTS")
    head = await proxy.head(url_b, headers=TUS)
    assert head.status == 404, head.headers  # not an offset past Upload-Length
    resp = await proxy.patch(url_b, data=io.BytesIO(rest), headers=patch_headers(6 * MiB))
    assert await _code(resp) == (404, "NO_SUCH_UPLOAD")
    assert await reserved(s3, bucket) == []
    assert await open_uploads_async(s3, bucket) == []
    assert await read_object_async(s3, bucket, "uploads/same.pdf") == first


async def test_a_key_taken_before_creation_is_refused_at_creation(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """Under --no-overwrite a POST for a key that is already stored is 409 at once, not
    after the client sent the whole file; nothing is made for it."""
    proxy = await proxy_factory(key_template="uploads/{filename}")
    named = meta(filename="taken.pdf")
    url = await new_upload(proxy, 10, **{"Upload-Metadata": named})
    resp = await proxy.patch(url, data=body(10), headers=patch_headers(0))
    assert resp.status == 204
    resp = await proxy.post(
        "/tus/", headers={**TUS, "Upload-Length": "10", "Upload-Metadata": named}
    )
    assert await _code(resp) == (409, "KEY_EXISTS")
    assert "Location" not in resp.headers
    assert await reserved(s3, bucket) == []


async def test_a_patch_cut_after_its_last_part_keeps_only_whole_parts(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """A PATCH refused after S3 acknowledged the file's short last part (a body running
    past Upload-Length): the offset kept is never past the length nor past a whole part."""
    proxy = await proxy_factory()
    data = body(7 * MiB)
    url = await new_upload(proxy, len(data))

    async def too_long() -> Any:
        yield data
        yield b"x" * (64 * 1024)

    resp = await proxy.patch(url, data=too_long(), headers=patch_headers(0))
    assert await _code(resp) == (413, "FILE_TOO_LARGE")
    head = await proxy.head(url, headers=TUS)
    offset = int(head.headers["Upload-Offset"])
    assert offset in (0, 5 * MiB), offset
    resp = await proxy.patch(url, data=io.BytesIO(data[offset:]), headers=patch_headers(offset))
    assert resp.status == 204, await resp.text()
    assert await read_object_async(s3, bucket, resp.headers["S3Proxy-Key"]) == data
    assert await reserved(s3, bucket) == []


async def test_a_patch_resent_after_a_lost_204_is_told_the_offset(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """The 204 of the last PATCH was lost and the client sends it again at the same offset:
    409 OFFSET_MISMATCH (a tus client then asks HEAD, which says it is complete), not 404."""
    proxy = await proxy_factory()
    data = body(300 * 1024)
    url = await new_upload(proxy, len(data))
    resp = await proxy.patch(url, data=data[:1000], headers=patch_headers(0))
    assert resp.status == 204
    resp = await proxy.patch(url, data=data[1000:], headers=patch_headers(1000))
    assert resp.status == 204
    resp = await proxy.patch(url, data=data[1000:], headers=patch_headers(1000))
    assert await _code(resp) == (409, "OFFSET_MISMATCH")
    head = await proxy.head(url, headers=TUS)
    assert head.headers["Upload-Offset"] == head.headers["Upload-Length"] == str(len(data))
    resp = await proxy.patch(url, data=b"", headers=patch_headers(len(data)))
    assert resp.status == 204 and resp.headers["Upload-Offset"] == str(len(data))


async def test_a_lost_complete_answer_ends_in_the_stored_object(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """S3 completed the multipart upload but its answer came after --s3-read-timeout: the
    proxy finds the object it made (HeadObject: this upload's, the right size) and answers
    204 with its key; the object stays, nothing is left reserved or open."""
    armed = {"on": False}

    def rule(op: str, _: int) -> Fault | None:
        if armed["on"] and op == "CompleteMultipartUpload":
            return Fault(late=2.0)
        return None

    data = body(7 * MiB, seed=3)
    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_read_timeout=1.0, s3_max_attempts=2)
        url = await new_upload(proxy, len(data))
        resp = await proxy.patch(url, data=io.BytesIO(data[: 6 * MiB]), headers=patch_headers(0))
        assert resp.status == 204
        armed["on"] = True
        rest = io.BytesIO(data[6 * MiB :])
        resp = await proxy.patch(url, data=rest, headers=patch_headers(6 * MiB))
        assert resp.status == 204, await resp.text()
        key = resp.headers["S3Proxy-Key"]
        assert resp.headers["Upload-Offset"] == str(len(data))
        head = await proxy.head(url, headers=TUS)
        assert head.status == 200 and head.headers["Upload-Offset"] == str(len(data))
        # counted once, as completed (it was also counted aborted)
        text = await (await proxy.get("/metrics")).text()
        assert "s3proxy_uploads_completed_total 1.0" in text
        assert "s3proxy_uploads_aborted_total{" not in text
    assert await read_object_async(s3, bucket, key) == data
    assert await reserved(s3, bucket) == []
    assert await open_uploads_async(s3, bucket) == []
    assert [k for k in await all_keys_async(s3, bucket) if not k.startswith(RESERVED_PREFIX)]


async def test_a_lost_put_answer_of_a_small_file_ends_in_the_stored_object(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """The same for a file within one part, stored by one PutObject whose answer is lost."""
    armed = {"on": False}

    def rule(op: str, _: int) -> Fault | None:
        # The state's writes (the lock, its confirm) are ``PutObject:state``.
        return Fault(late=2.0) if armed["on"] and op == "PutObject" else None

    data = body(1000, seed=4)
    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_read_timeout=1.0, s3_max_attempts=1)
        url = await new_upload(proxy, len(data))
        armed["on"] = True
        resp = await proxy.patch(url, data=data, headers=patch_headers(0))
        armed["on"] = False
        # The state's swap never ran: the lost answer was the object's PutObject.
        assert resp.status == 204, await resp.text()
        assert await read_object_async(s3, bucket, resp.headers["S3Proxy-Key"]) == data
    assert await reserved(s3, bucket) == []


@pytest.mark.parametrize("attempts", [1, 3])
async def test_a_commit_that_landed_unseen_is_this_patchs(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str, attempts: int
) -> None:
    """The PATCH that filled the first part (its multipart upload made here) had its
    commit stored by S3, the answer late: it took the commit for lost, aborted the
    multipart upload the stored state named, and every later PATCH failed (502) while
    HEAD said resumable, for good (the re-probe, 3 of 3). Its own commit read back is
    recognised now, and nothing named by the state is aborted."""
    armed = {"on": False}
    states: list[str] = []

    def rule(op: str, _: int) -> Fault | None:
        if armed["on"] and op == "PutObject:state":
            states.append(op)  # the lock first, then the commit
            return Fault(late=2.0) if len(states) == 2 else None
        return None

    data = body(11 * MiB, seed=5)
    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url, s3_read_timeout=1.0, s3_max_attempts=attempts, part_size=8 * MiB
        )
        url = await new_upload(proxy, len(data))
        first = io.BytesIO(data[: 4 * MiB])
        assert (await proxy.patch(url, data=first, headers=patch_headers(0))).status == 204
        armed["on"] = True
        second = io.BytesIO(data[4 * MiB : 8 * MiB])
        resp = await proxy.patch(url, data=second, headers=patch_headers(4 * MiB))
        armed["on"] = False
        assert resp.status == 204, await resp.text()
        assert resp.headers["Upload-Offset"] == str(8 * MiB)
        rest = io.BytesIO(data[8 * MiB :])
        resp = await proxy.patch(url, data=rest, headers=patch_headers(8 * MiB))
        assert resp.status == 204, await resp.text()
        key = resp.headers["S3Proxy-Key"]
    assert await read_object_async(s3, bucket, unquote(key)) == data
    assert await reserved(s3, bucket) == []
    assert await open_uploads_async(s3, bucket) == []


@pytest.mark.parametrize("ending", ["completed", "deferred", "key-exists"])
async def test_an_ending_whose_state_delete_fails_is_answered_at_once(
    proxy_factory: ProxyFactory, aiohttp_server: Any, moto: Any, s3: Any, bucket: str, ending: str
) -> None:
    """The last PATCH ended the upload, but S3 refuses to delete its state (DeleteObject on
    it: 500, for ever; the janitor retries). Before, HEAD went on answering the offset
    before that PATCH (a client resuming from it re-sent bytes of a finished upload), a
    resent PATCH and a DELETE got 423 until the last PATCH's lock lapsed (lease + skew,
    ≈90 s), then the PATCH completed the upload again and the webhook heard of it twice.
    Now the state says how it ended: complete (HEAD offset = length with the key, a PATCH
    at the length 204, one resent at the old offset 409, DELETE 403, the webhook told
    once), or, ended by another upload's object at the key, gone (404)."""
    server, got = await receiver(aiohttp_server, 204)
    armed = False

    def rule(op: str, _: int) -> Fault | None:
        return Fault(status=500) if armed and op == "DeleteObject:state" else None

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url,
            s3_max_attempts=1,
            key_template="uploads/{filename}",
            webhook_url=str(server.make_url("/hook")),
            webhook_secret=SECRET_HOOK,
        )
        named = meta(filename="same.pdf")
        data, other = body(1000), body(10, seed=2)
        if ending == "deferred":
            headers = {**TUS, "Upload-Defer-Length": "1", "Upload-Metadata": named}
            url = (await proxy.post("/tus/", headers=headers)).headers["Location"]
        else:
            url = await new_upload(proxy, len(data), **{"Upload-Metadata": named})
        resp = await proxy.patch(url, data=data[:400], headers=patch_headers(0))
        assert resp.status == 204, await resp.text()
        if ending == "key-exists":
            first = await new_upload(proxy, len(other), **{"Upload-Metadata": named})
            resp = await proxy.patch(first, data=other, headers=patch_headers(0))
            assert resp.status == 204, await resp.text()
        armed = True
        declared = {"Upload-Length": "1000"} if ending == "deferred" else {}
        last = await proxy.patch(url, data=data[400:], headers=patch_headers(400, **declared))
        head = await proxy.head(url, headers=TUS)
        resent = await proxy.patch(url, data=data[400:], headers=patch_headers(400))
        at_end = await proxy.patch(url, data=b"", headers=patch_headers(1000))
        delete = await proxy.delete(url, headers=TUS)
        if ending == "key-exists":
            assert await _code(last) == (409, "KEY_EXISTS")
            assert head.status == 404, head.headers
            assert await _code(resent) == (404, "NO_SUCH_UPLOAD")
            assert await _code(at_end) == (404, "NO_SUCH_UPLOAD")
            assert await _code(delete) == (404, "NO_SUCH_UPLOAD")
        else:
            assert last.status == 204, await last.text()
            assert head.status == 200, await head.text()
            assert head.headers["Upload-Offset"] == head.headers["Upload-Length"] == "1000"
            assert unquote(head.headers["S3Proxy-Key"]) == "uploads/same.pdf"
            assert await _code(resent) == (409, "OFFSET_MISMATCH")
            assert at_end.status == 204 and at_end.headers["Upload-Offset"] == "1000"
            assert await _code(delete) == (403, "UPLOAD_COMPLETE")
            assert [e["body"]["event"] for e in got] == ["upload.completed"]
        armed = False
        await proxy.app[STATE].janitor.close()  # the owed removal's last try
        assert await reserved(s3, bucket) == []
        stored = other if ending == "key-exists" else data
        assert await read_object_async(s3, bucket, "uploads/same.pdf") == stored


class _HeldCreation:
    """The fault proxy with ``fault`` on the first state write once armed (a creation's:
    the URL key, written at the first creation, is out of the way by then)."""

    def __init__(self, moto: Any, fault: Fault) -> None:
        self.armed = False
        self.writes = 0
        self.fault = fault
        self.faulty = FaultyS3(moto.endpoint_url, self.rule, name=tus_operation)

    def rule(self, op: str, n: int) -> Fault | None:
        if not self.armed or op != "PutObject:state":
            return None
        self.writes += 1
        return self.fault if self.writes == 1 else None


@pytest.mark.parametrize("upload", ["zero-length", "with-upload"])
async def test_a_creation_write_that_lands_late_never_brings_a_completed_upload_back(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str, upload: str
) -> None:
    """The soak probe: the creation's state write (If-None-Match: *) held on the way past
    --s3-read-timeout; its retry made the state, the upload completed in the creation's
    request and its state went; then the held write landed on the absent key and made the
    state again. HEAD said offset 0 with no S3Proxy-Key, a PATCH completed it a second
    time (completed_total 1 -> 2), or the sweep counted it aborted too. Now HEAD and PATCH
    answer it complete, it counts once, and the state goes again (2x/8x the timeout)."""
    from tests.test_metrics import scrape, value

    data = b"" if upload == "zero-length" else body(1000)
    held = _HeldCreation(moto, Fault(delay=1.5))
    async with held.faulty as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_read_timeout=0.5, s3_max_attempts=3)
        first = await new_upload(proxy, 10)  # the URL key is written
        assert (await proxy.delete(first, headers=TUS)).status == 204
        held.armed = True
        headers = {**TUS, "Upload-Length": str(len(data))}
        if data:
            headers["Content-Type"] = "application/offset+octet-stream"
        resp = await proxy.post("/tus/", data=data or None, headers=headers)
        assert resp.status == 201, await resp.text()
        key = unquote(resp.headers["S3Proxy-Key"])
        url = resp.headers["Location"]
        await asyncio.sleep(1.5)  # the held write has landed
        assert held.writes >= 2  # the held one and its retry (then the PATCH's swaps)
        head = await proxy.head(url, headers=TUS)
        assert head.status == 200, head.headers
        assert head.headers["Upload-Offset"] == str(len(data))
        assert unquote(head.headers["S3Proxy-Key"]) == key
        resp = await proxy.patch(url, data=b"", headers=patch_headers(len(data)))
        assert resp.status == 204, await resp.text()
        assert unquote(resp.headers["S3Proxy-Key"]) == key
        samples = await scrape(proxy)
        # this one and the first (terminated): each ends once
        assert value(samples, "s3proxy_uploads_started_total") == 2
        assert value(samples, "s3proxy_uploads_completed_total") == 1
        aborted = {k[1]: v for k, v in samples.items() if k[0] == "s3proxy_uploads_aborted_total"}
        assert aborted == {frozenset({("reason", "TERMINATED")}): 1}
        await eventually(
            lambda: reserved(s3, bucket), until=lambda left: left == [], within=6.0,
            what="no state left under the reserved prefix",
        )  # fmt: skip
    assert await read_object_async(s3, bucket, key) == data


async def test_a_creation_whose_own_state_write_landed_unseen_is_created(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """The creation's state write landed but its answer came past --s3-read-timeout; the
    retry was refused 412 by that very write. It was 502 UPSTREAM_ERROR "PutObject
    PreconditionFailed" (and the upload undone): the state read back is the one sent,
    so it is this creation's, and the upload is created."""
    held = _HeldCreation(moto, Fault(late=1.0))
    async with held.faulty as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_read_timeout=0.5, s3_max_attempts=3)
        first = await new_upload(proxy, 10)  # the URL key is written
        assert (await proxy.delete(first, headers=TUS)).status == 204
        held.armed = True
        data = body(1000)
        url = await new_upload(proxy, len(data))
        assert held.writes == 2  # the late one and its retry, refused 412
        resp = await proxy.patch(url, data=data, headers=patch_headers(0))
        assert resp.status == 204, await resp.text()
        key = unquote(resp.headers["S3Proxy-Key"])
    assert await read_object_async(s3, bucket, key) == data
    assert await reserved(s3, bucket) == []


async def test_a_rolled_back_upload_whose_write_lands_late_is_deleted_again(
    proxy_factory: ProxyFactory, moto: Any, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """The object's PutObject held past --s3-read-timeout, its retry stored it, the
    webhook failed and --webhook-failure rollback deleted it; then the held attempt landed
    and stored it again, behind a 502. The rollback's delete is made again later."""
    server, _ = await receiver(aiohttp_server, 500)
    held = lambda op, n: Fault(delay=1.5) if (op, n) == ("PutObject", 1) else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, held, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url,
            s3_read_timeout=0.5,
            s3_max_attempts=3,
            webhook_url=str(server.make_url("/hook")),
            webhook_secret=SECRET_HOOK,
            webhook_attempts=1,
        )
        url = await new_upload(proxy, 1000)
        resp = await proxy.patch(url, data=body(1000), headers=patch_headers(0))
        assert resp.status == 502 and (await resp.json())["error"]["code"] == "WEBHOOK_FAILED"
        assert faulty.calls.count("PutObject") == 2
        await asyncio.sleep(1.5)  # the held attempt has landed
        await eventually(
            lambda: all_keys_async(s3, bucket),
            until=lambda keys: [k for k in keys if not k.startswith(RESERVED_PREFIX)] == [],
            within=6.0,
            what="no object of the rolled back upload",
        )


async def nothing_reserved(s3: Any, bucket: str, within: float) -> None:
    """Wait until nothing is left under the reserved prefix (a late segment removed)."""
    await eventually(
        lambda: reserved(s3, bucket),
        until=lambda keys: keys == [],
        within=within,
        what="no segment left under the reserved prefix",
    )


async def test_a_segment_whose_write_lands_after_the_upload_completed_is_deleted_again(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """reprobe16b: the first PATCH's segment write held on the way past
    --s3-read-timeout, its retry stored it, the second PATCH completed the upload and its
    prefix went; then the held attempt landed, and the segment (client bytes under
    .s3proxy/) stayed until the expiry sweep, 24 hours on. Its delete is made again later,
    once the upload's state is gone."""
    held = lambda op, n: Fault(delay=1.5) if (op, n) == ("PutObject:segment", 1) else None  # noqa: E731
    async with FaultyS3(moto.endpoint_url, held, name=tus_operation) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_read_timeout=0.5, s3_max_attempts=3)
        data = body(2000)
        url = await new_upload(proxy, len(data))
        resp = await proxy.patch(url, data=data[:1000], headers=patch_headers(0))
        assert resp.status == 204, await resp.text()
        assert faulty.calls.count("PutObject:segment") == 2
        resp = await proxy.patch(url, data=data[1000:], headers=patch_headers(1000))
        assert resp.status == 204, await resp.text()
        key = unquote(resp.headers["S3Proxy-Key"])
        await asyncio.sleep(1.5)  # the held attempt has landed
        await nothing_reserved(s3, bucket, within=8.0)
    assert await read_object_async(s3, bucket, key) == data


async def test_a_failed_segment_write_that_lands_after_the_upload_ended_is_deleted(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """The same for a segment write that failed: its first attempt held on the way, the
    retries refused (503), the PATCH answered 503; the client then terminated the upload
    (DELETE) and its prefix went; the held attempt landed after that."""

    release = asyncio.Event()  # held until then, not for a time: a loaded machine's
    # PATCH and DELETE took longer than the 3 s hold once

    def held(op: str, n: int) -> Fault | None:
        if op != "PutObject:segment":
            return None
        return Fault(until=release) if n == 1 else Fault(status=503, code="SlowDown")

    async with FaultyS3(moto.endpoint_url, held, name=tus_operation) as faulty:
        proxy = await proxy_factory(faulty.endpoint_url, s3_read_timeout=0.5, s3_max_attempts=3)
        url = await new_upload(proxy, 2000)
        resp = await proxy.patch(url, data=body(1000), headers=patch_headers(0))
        assert resp.status >= 500, await resp.text()
        assert (await proxy.delete(url, headers=TUS)).status == 204
        assert await reserved(s3, bucket) == []  # before the held attempt lands
        release.set()
        await asyncio.sleep(0.5)  # the held attempt has landed
        await nothing_reserved(s3, bucket, within=6.0)


class _Receiver:
    """A webhook receiver answering ``status`` (changed as the test goes), after ``delay``
    seconds over upload.completed; the events it got."""

    def __init__(self, status: int, delay: float = 0.0) -> None:
        self.status = status
        self.delay = delay
        self.got: list[str] = []
        self.heard = asyncio.Event()

    async def hook(self, request: web.Request) -> web.Response:
        event = json.loads(await request.read())["event"]
        status = self.status  # as when the event came
        self.got.append(event)
        self.heard.set()
        if event == "upload.completed":
            await asyncio.sleep(self.delay)
        return web.Response(status=status)

    async def serve(self, aiohttp_server: Any) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        return str((await aiohttp_server(app)).make_url("/hook"))


async def _upload(proxy: Any, filename: str, data: bytes) -> Any:
    raw = bodies.body([bodies.file("file", filename, data)])
    return await proxy.post("/upload", data=raw, headers=bodies.headers())


@pytest.mark.parametrize("refused", ["state-delete", "every-delete"])
async def test_a_retried_rollback_never_deletes_another_uploads_object_at_the_key(
    proxy_factory: ProxyFactory, aiohttp_server: Any, moto: Any, s3: Any, bucket: str, refused: str
) -> None:
    """The re-probe's F1 (2 of 2, and a variant): a key template without {uuid}; the
    webhook failed and the rollback could not finish (S3 refused the state's delete, or
    every delete), so the janitor owed it. Meanwhile another client's /upload stored the
    same key and was answered 201. The janitor's retry then deleted that object (the
    rollback's delete had no condition): a stored file gone, nobody told. The rollback
    deletes only an object this upload stored (its id, If-Match), on every attempt."""
    hook = _Receiver(500)
    armed = False

    def rule(op: str, _: int) -> Fault | None:
        if refused == "state-delete":
            failing = op == "DeleteObject:state"
        else:
            failing = op.startswith("DeleteObject")
        return Fault(status=500) if armed and failing else None

    overwrite = {} if refused == "state-delete" else {"no_overwrite": False}
    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url,
            s3_max_attempts=1,
            key_template="plain/{filename}",
            webhook_url=await hook.serve(aiohttp_server),
            webhook_attempts=1,
            **overwrite,
        )
        url = await new_upload(proxy, 10, **{"Upload-Metadata": meta(filename="c1.bin")})
        armed = True
        resp = await proxy.patch(url, data=b"0123456789", headers=patch_headers(0))
        out = await resp.json()
        assert (resp.status, out["error"]["code"]) == (502, "WEBHOOK_FAILED")
        # it said "the upload was rolled back" while the object stood (reprobe12a F2)
        assert "the rollback did not finish" in out["error"]["message"], out
        assert (await proxy.head(url, headers=TUS)).status == 404
        hook.status = 204
        other = b"OTHER-CLIENT-BYTES"
        resp = await _upload(proxy, "c1.bin", other)
        assert resp.status == 201, await resp.text()
        armed = False  # S3 recovers: the owed rollback is retried
        await proxy.app[STATE].janitor.close()
        assert await read_object_async(s3, bucket, "plain/c1.bin") == other
        assert await reserved(s3, bucket) == []


async def test_a_rollback_keeps_an_object_another_upload_stored_meanwhile(
    proxy_factory: ProxyFactory, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """The same on the rollback's first attempt: keys shared and overwrites allowed,
    another client's /upload stored the key while this upload's webhook was failing; the
    rollback deleted that object along with its own state (a 201 for a file gone)."""
    hook = _Receiver(500, delay=1.0)
    proxy = await proxy_factory(
        key_template="nov/{filename}",
        no_overwrite=False,
        webhook_url=await hook.serve(aiohttp_server),
        webhook_attempts=1,
    )
    url = await new_upload(proxy, 10, **{"Upload-Metadata": meta(filename="c2.bin")})
    patching = asyncio.ensure_future(proxy.patch(url, data=b"0123456789", headers=patch_headers(0)))
    await asyncio.wait_for(hook.heard.wait(), 10)  # stored, the webhook failing
    hook.status = 204
    hook.heard.clear()
    other = b"OTHER-CLIENT-BYTES"
    resp = await _upload(proxy, "c2.bin", other)
    assert resp.status == 201, await resp.text()
    assert await _code(await patching) == (502, "WEBHOOK_FAILED")
    assert await read_object_async(s3, bucket, "nov/c2.bin") == other
    assert await reserved(s3, bucket) == []
    # no upload.rolled_back names the key: it holds the other client's file (reprobe12a F1)
    assert hook.got.count("upload.rolled_back") == 0, hook.got


async def test_a_late_write_recheck_keeps_the_object_a_retried_patch_reported(
    proxy_factory: ProxyFactory, aiohttp_server: Any, moto: Any, s3: Any, bucket: str
) -> None:
    """The rollback's recheck for a write that may land late deleted this upload's object
    whatever happened since. Its FAILED mark refused by S3 until the lock lapsed (the
    rollback retries it at the lock's cadence: only S3 refusing it that long lets a PATCH
    in), a PATCH retried then completed the upload again (the webhook back: told, 204);
    the recheck (2x --s3-read-timeout later) then deleted that reported object. It deletes
    only once the FAILED mark is down (no PATCH can complete the upload after it)."""
    hook = _Receiver(500)
    armed = {"on": False, "puts": 0, "open": False}

    def rule(op: str, _: int) -> Fault | None:
        if not armed["on"]:
            return None
        if op == "PutObject":
            armed["puts"] += 1
            return Fault(late=0.8) if armed["puts"] == 1 else None  # its answer lost
        if op == "PutObject:state" and armed["puts"] >= 2 and not armed["open"]:
            return Fault(status=500)  # the rollback's mark (the lock's swap came before)
        return None

    data = body(1000, seed=7)
    lease = 3.0
    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url,
            s3_read_timeout=0.5,
            s3_max_attempts=2,
            tus_lock_lease=lease,
            cleanup_clock_skew=0,
            webhook_url=await hook.serve(aiohttp_server),
            webhook_attempts=1,
        )
        url = await new_upload(proxy, len(data))
        armed["on"] = True
        resp = await proxy.patch(url, data=data, headers=patch_headers(0))
        assert await _code(resp) == (502, "WEBHOOK_FAILED")
        hook.status = 204
        await asyncio.sleep(lease + 0.2)  # the lock lapses, the mark still refused
        tries = faulty.calls.count("PutObject:state")
        await eventually(  # S3 is back just after a try: the next is lease/3 away
            lambda: faulty.calls.count("PutObject:state"),
            until=lambda n: n > tries,
            within=lease,
            what="the rollback's next try",
        )
        armed["open"] = True
        resp = await proxy.patch(url, data=data, headers=patch_headers(0))
        assert resp.status == 204, await resp.text()
        key = unquote(resp.headers["S3Proxy-Key"])
        await asyncio.sleep(2.5)  # past the recheck (1 s) of the rolled back write
        assert await read_object_async(s3, bucket, key) == data


@pytest.mark.parametrize("then", ["head", "patch"])
async def test_a_patch_cut_by_shutdown_while_telling_the_webhook_is_complete_elsewhere(
    proxy_factory: ProxyFactory,
    aiohttp_server: Any,
    s3: Any,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
    then: str,
) -> None:
    """The re-probe's F4 (2 of 2): SIGTERM while the completing PATCH waited on a slow
    webhook, the object stored. The PATCH got 503 "resume (HEAD, then PATCH)", but its
    lock stayed: another instance's HEAD said offset 0 and its PATCH got 423 for about
    87 s (lease + clock skew). Now the cut PATCH writes the completion down as owed and
    drops its lock (within the shutdown's deadline, logged): another instance answers
    complete at once, first telling the webhook (at least once), and the object stays."""
    from s3proxy.app import drain

    hook = _Receiver(204, delay=5.0)
    url_hook = await hook.serve(aiohttp_server)
    first = await proxy_factory(webhook_url=url_hook, webhook_attempts=1, shutdown_timeout=0.2)
    data = body(1000, seed=8)
    url = await new_upload(first, len(data))
    patching = asyncio.ensure_future(first.patch(url, data=data, headers=patch_headers(0)))
    await asyncio.wait_for(hook.heard.wait(), 10)  # stored, the webhook not yet answering
    with caplog.at_level(logging.INFO, logger="s3proxy.tus"):
        await asyncio.wait_for(drain(first.app[STATE]), 10)
    assert await _code(await patching) == (503, "SHUTTING_DOWN")
    hook.delay = 0
    other = await proxy_factory(webhook_url=url_hook, webhook_attempts=1)
    if then == "head":
        resp = await other.head(url, headers=TUS)
        assert resp.status == 200, resp.headers
    else:
        resp = await other.patch(url, data=b"", headers=patch_headers(len(data)))
        assert resp.status == 204, await resp.text()
    assert resp.headers["Upload-Offset"] == str(len(data))
    key = unquote(resp.headers["S3Proxy-Key"])
    assert hook.got == ["upload.completed", "upload.completed"]  # told again: at least once
    assert await read_object_async(s3, bucket, key) == data
    assert await reserved(s3, bucket) == []
    head = await other.head(url, headers=TUS)  # the ordinary finished upload now
    assert head.status == 200 and head.headers["Upload-Offset"] == str(len(data))
    assert hook.got == ["upload.completed", "upload.completed"]
    assert "tus.lock_released" in caplog.text


@OBJECT_WRITES
async def test_a_patch_cut_while_its_object_is_written_is_complete_elsewhere(
    proxy_factory: ProxyFactory,
    aiohttp_server: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    op: str,
    size: int,
) -> None:
    """The same cut one step earlier: S3 stored the object, the answer of its PutObject
    or CompleteMultipartUpload still on the way. Before, the PATCH released its lock and
    either HEAD elsewhere answered complete with the webhook never told (a file stored
    that the application never hears of), or, for a multipart upload, it committed its
    whole parts: HEAD said 5 MiB of a stored 7 MiB file. It finds its object and writes
    the completion down as owed: HEAD elsewhere tells the webhook and answers complete."""
    from s3proxy.app import drain

    hook = _Receiver(204)
    url_hook = await hook.serve(aiohttp_server)
    armed = {"on": False}

    def rule(name: str, _: int) -> Fault | None:
        return Fault(late=2.0) if armed["on"] and name == op else None

    data = body(size, seed=9)
    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        first = await proxy_factory(
            faulty.endpoint_url, s3_max_attempts=1, shutdown_timeout=0.5, webhook_url=url_hook
        )
        url = await new_upload(first, len(data))
        armed["on"] = True
        patching = asyncio.ensure_future(
            first.patch(url, data=io.BytesIO(data), headers=patch_headers(0))
        )
        await eventually(
            lambda: faulty.calls, until=lambda calls: op in calls, within=10, what="the write"
        )
        await asyncio.wait_for(drain(first.app[STATE]), 10)
        assert await _code(await patching) == (503, "SHUTTING_DOWN")
    other = await proxy_factory(webhook_url=url_hook)
    head = await other.head(url, headers=TUS)
    assert head.status == 200, head.headers
    assert head.headers["Upload-Offset"] == str(len(data))
    key = unquote(head.headers["S3Proxy-Key"])
    assert hook.got == ["upload.completed"]
    assert await read_object_async(s3, bucket, key) == data
    assert await reserved(s3, bucket) == []


async def test_an_owed_completion_whose_webhook_fails_is_rolled_back(
    proxy_factory: ProxyFactory, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """The completion a cut PATCH left owed, finished by a HEAD elsewhere whose webhook
    fails: rolled back as that PATCH would have been (the object deleted, the receiver
    told), and the upload answers 404, never complete for a deleted file."""
    from s3proxy.app import drain

    hook = _Receiver(204, delay=5.0)
    url_hook = await hook.serve(aiohttp_server)
    first = await proxy_factory(webhook_url=url_hook, webhook_attempts=1, shutdown_timeout=0.2)
    url = await new_upload(first, 1000)
    patching = asyncio.ensure_future(first.patch(url, data=body(1000), headers=patch_headers(0)))
    await asyncio.wait_for(hook.heard.wait(), 10)
    await asyncio.wait_for(drain(first.app[STATE]), 10)
    assert await _code(await patching) == (503, "SHUTTING_DOWN")
    hook.status, hook.delay = 500, 0
    other = await proxy_factory(webhook_url=url_hook, webhook_attempts=1)
    assert (await other.head(url, headers=TUS)).status == 404
    assert await _code(await other.patch(url, data=b"", headers=patch_headers(1000))) == (
        404,
        "NO_SUCH_UPLOAD",
    )
    assert hook.got == ["upload.completed", "upload.completed", "upload.rolled_back"]
    objects = [k for k in await all_keys_async(s3, bucket) if not k.startswith(RESERVED_PREFIX)]
    assert objects == []
    assert await reserved(s3, bucket) == []


async def _create_with(proxy: Any, data: bytes) -> Any:
    """A creation-with-upload: the whole file in the POST that creates the upload."""
    headers = {**TUS, "Upload-Length": str(len(data)), "Content-Type": OFFSET_STREAM}
    return await proxy.post("/tus/", data=io.BytesIO(data), headers=headers)


async def _objects(s3: Any, bucket: str) -> list[str]:
    return [k for k in await all_keys_async(s3, bucket) if not k.startswith(RESERVED_PREFIX)]


async def _told_to_create_again(resp: Any) -> None:
    """The 503 of a creation cut by shutdown: no URL, and nothing to resume."""
    assert await _code(resp) == (503, "SHUTTING_DOWN")
    assert "Location" not in resp.headers
    message = (await resp.json())["error"]["message"]
    assert "create it again" in message and "HEAD" not in message, message


async def test_a_creation_cut_by_shutdown_while_telling_the_webhook_keeps_nothing(
    proxy_factory: ProxyFactory, aiohttp_server: Any, s3: Any, bucket: str
) -> None:
    """A creation-with-upload cut by shutdown while its completion webhook was in flight:
    its state was removed and its object left stored, while the client got 503 "resume
    (HEAD, then PATCH)" with no URL to resume, and the webhook may have heard of a file
    nobody else ever would. Now the object goes with the state (the client was told it
    failed), the webhook hears upload.rolled_back, and the 503 says to create it again."""
    from s3proxy.app import drain

    hook = _Receiver(204, delay=5.0)
    proxy = await proxy_factory(
        webhook_url=await hook.serve(aiohttp_server), webhook_attempts=1, shutdown_timeout=0.2
    )
    posting = asyncio.ensure_future(_create_with(proxy, body(1000, seed=10)))
    await asyncio.wait_for(hook.heard.wait(), 10)  # stored, the webhook not yet answering
    await asyncio.wait_for(drain(proxy.app[STATE]), 10)
    await _told_to_create_again(await posting)
    assert hook.got == ["upload.completed", "upload.rolled_back"]
    assert await _objects(s3, bucket) == []
    assert await reserved(s3, bucket) == []


@OBJECT_WRITES
async def test_a_creation_cut_while_its_object_is_written_keeps_nothing(
    proxy_factory: ProxyFactory,
    aiohttp_server: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    op: str,
    size: int,
) -> None:
    """The same cut one step earlier, S3 having stored the object with the answer of its
    PutObject or CompleteMultipartUpload on the way: the completion was written down as
    owed, then the creation's undo removed that state and left the object. It goes now;
    the webhook never heard of it and is told nothing."""
    from s3proxy.app import drain

    hook = _Receiver(204)
    armed = {"on": False}

    def rule(name: str, _: int) -> Fault | None:
        return Fault(late=2.0) if armed["on"] and name == op else None

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url,
            s3_max_attempts=1,
            shutdown_timeout=0.5,
            webhook_url=await hook.serve(aiohttp_server),
        )
        armed["on"] = True
        posting = asyncio.ensure_future(_create_with(proxy, body(size, seed=11)))
        await eventually(
            lambda: faulty.calls, until=lambda calls: op in calls, within=10, what="the write"
        )
        await asyncio.wait_for(drain(proxy.app[STATE]), 10)
        await _told_to_create_again(await posting)
    assert hook.got == []
    assert await _objects(s3, bucket) == []
    assert await reserved(s3, bucket) == []
    assert await open_uploads_async(s3, bucket) == []


@pytest.mark.parametrize("op", ["PutObject:state", "PutObject"], ids=["state", "object"])
async def test_a_creation_whose_write_s3_holds_past_the_cut_keeps_nothing(
    proxy_factory: ProxyFactory,
    moto: Any,
    s3: Any,
    bucket: str,
    op: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """reprobe9a F3/F4: S3 holding a creation-with-upload's write at the cut, then carrying
    it out. Its state write (F4): the request was not tracked as an upload, so the drain
    cut it with no answer at all (499) and the state landed after the exit, an upload no
    client has a URL for. Its object's PutObject (F3): answered 503 "nothing of it is
    kept", and the object landed after the exit, logged nowhere. Now both get 503 "create
    it again" (the object's saying a write may still land); the rechecks run just before
    the shutdown's deadline, removing what landed, and what may land later is logged."""
    from s3proxy.app import drain

    armed = {"on": False}

    def rule(name: str, _: int) -> Fault | None:
        return Fault(delay=1.5) if armed["on"] and name == op else None

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url, s3_max_attempts=1, s3_read_timeout=10.0, shutdown_timeout=0.2
        )
        # The URL key made first (one more PutObject:state): the held write is the creation's.
        assert (await proxy.head("/tus/x", headers=TUS)).status == 404
        armed["on"] = True
        before = faulty.calls.count(op)
        posting = asyncio.ensure_future(_create_with(proxy, body(3000, seed=15)))
        await eventually(
            lambda: faulty.calls.count(op), until=lambda n: n > before, within=10, what="the write"
        )
        with caplog.at_level(logging.INFO):
            await asyncio.wait_for(drain(proxy.app[STATE]), 10)
            resp = await asyncio.wait_for(posting, 10)
        await _told_to_create_again(resp)
        message = (await resp.json())["error"]["message"]
        assert ("may still land" in message) is (op == "PutObject"), message
        assert await _objects(s3, bucket) == []
        assert await reserved(s3, bucket) == []
    late = [r.getMessage() for r in caplog.records if "reason=late_write" in r.getMessage()]
    what = "what=tus creation id=" if op == "PutObject:state" else "what=rollback key="
    assert any(what in line and "cleanup.abandoned" in line for line in late), late


async def test_a_termination_cut_by_shutdown_is_answered_and_carried_on_elsewhere(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """The class of reprobe9a F4: a DELETE writes to S3 (its lock, then the removal) but
    was not tracked as an upload, so the drain cut it with no answer while its write
    still landed. Now it gets the grace period and, cut, 503 saying to send it again;
    sent again on another instance, the removal is carried on (204), nothing left."""
    from s3proxy.app import drain

    armed = {"on": False}

    def rule(name: str, _: int) -> Fault | None:
        return Fault(delay=1.5) if armed["on"] and name == "PutObject:state" else None

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url, s3_max_attempts=1, s3_read_timeout=10.0, shutdown_timeout=0.2
        )
        url = await new_upload(proxy, 1000)
        armed["on"] = True
        before = faulty.calls.count("PutObject:state")
        deleting = asyncio.ensure_future(proxy.delete(url, headers=TUS))
        await eventually(
            lambda: faulty.calls.count("PutObject:state"),
            until=lambda n: n > before,
            within=10,
            what="the termination's lock",
        )
        await asyncio.wait_for(drain(proxy.app[STATE]), 10)
        resp = await asyncio.wait_for(deleting, 10)
        assert await _code(resp) == (503, "SHUTTING_DOWN")
        assert "DELETE again" in (await resp.json())["error"]["message"]
        await asyncio.sleep(1.5)  # the held lock write lands
    other = await proxy_factory()
    assert (await other.delete(url, headers=TUS)).status == 204
    assert await reserved(s3, bucket) == []


async def test_a_creation_cut_mid_body_is_told_to_create_it_again(
    proxy_factory: ProxyFactory, s3: Any, bucket: str
) -> None:
    """Cut while its body still came (a part already in S3): its 503 said "resume the
    upload (HEAD, then PATCH)", to a client with no URL. Nothing of it is kept, and the
    answer says so."""
    from s3proxy.app import drain

    proxy = await proxy_factory(shutdown_timeout=0.2)
    data = body(7 * MiB, seed=12)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(
            (
                f"POST /tus/ HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                f"Upload-Length: {len(data)}\r\nContent-Type: {OFFSET_STREAM}\r\n"
                f"Content-Length: {len(data)}\r\n\r\n"
            ).encode()
            + data[: 6 * MiB]
        )
        await writer.drain()
        await eventually(
            lambda: open_uploads_async(s3, bucket), within=10, what="the first part under way"
        )
        await asyncio.wait_for(drain(proxy.app[STATE]), 10)
        answer = await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.transport.abort()
    head, _, text = answer.partition(b"\r\n\r\n")
    assert b" 503 " in head.split(b"\r\n", 1)[0], answer
    assert b"Location" not in head
    message = json.loads(text)["error"]["message"]
    assert "create it again" in message and "HEAD" not in message, message
    assert await reserved(s3, bucket) == []
    assert await open_uploads_async(s3, bucket) == []


async def test_a_creation_whose_object_cannot_go_by_the_deadline_is_logged_with_its_key(
    proxy_factory: ProxyFactory,
    aiohttp_server: Any,
    moto: Any,
    s3: Any,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cut creation's object delete held by S3 past the shutdown's deadline: the
    process does not wait for it; the object is logged abandoned with its key and what to
    do (nothing else removes it), and the webhook is still told it was rolled back."""
    from s3proxy.app import drain

    hook = _Receiver(204, delay=5.0)
    released = asyncio.Event()

    def rule(name: str, _: int) -> Fault | None:
        return Fault(until=released, status=500) if name == "DeleteObject" else None

    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url,
            s3_max_attempts=1,
            shutdown_timeout=0.2,
            webhook_url=await hook.serve(aiohttp_server),
            webhook_attempts=1,
        )
        posting = asyncio.ensure_future(_create_with(proxy, body(1000, seed=13)))
        await asyncio.wait_for(hook.heard.wait(), 10)
        with caplog.at_level(logging.INFO):
            await asyncio.wait_for(drain(proxy.app[STATE]), 10)
            await _told_to_create_again(await posting)
        released.set()
    [key] = await _objects(s3, bucket)
    abandoned = [r.getMessage() for r in caplog.records if "cleanup.abandoned" in r.getMessage()]
    assert any(
        f"what=rollback key={key} " in line and "delete it by hand" in line for line in abandoned
    ), abandoned
    assert hook.got == ["upload.completed", "upload.rolled_back"]


async def test_a_corrupt_object_s3_will_not_remove_is_never_reported_stored(
    proxy_factory: ProxyFactory, moto: Any, s3: Any, bucket: str
) -> None:
    """S3 stored the last PATCH's object with other bytes (its Complete names another CRC:
    502 UPSTREAM_CORRUPTION) and refused both its delete and the FAILED mark. The ending's
    retry was the removal alone, and the PATCH's lock lapsed: a PATCH retried then (S3
    taking state writes again, not yet deletes) found the object whole and answered 204,
    reporting the corrupt object stored. Now it is rolled back as a webhook failure is,
    its mark retried at the lock's cadence: HEAD and a retried PATCH answer 404, and the
    object goes once S3 deletes again."""
    from tests.test_integrity import other_checksum

    faults = {"complete": False, "refuse": False}

    def rule(op: str, _: int) -> Fault | None:
        if faults["complete"] and op == "CompleteMultipartUpload":
            faults["refuse"] = True  # from here S3 refuses the object's delete and the mark
            return Fault(answer=other_checksum)
        if faults["refuse"] and (op.startswith("DeleteObject") or op == "PutObject:state"):
            return Fault(status=500)
        return None

    data = body(7 * MiB, seed=14)
    async with FaultyS3(moto.endpoint_url, rule, name=tus_operation) as faulty:
        proxy = await proxy_factory(
            faulty.endpoint_url, s3_max_attempts=1, tus_lock_lease=1.0, cleanup_clock_skew=0
        )
        url = await new_upload(proxy, len(data))
        first = io.BytesIO(data[: 6 * MiB])
        assert (await proxy.patch(url, data=first, headers=patch_headers(0))).status == 204
        faults["complete"] = True
        rest = data[6 * MiB :]
        resp = await proxy.patch(url, data=io.BytesIO(rest), headers=patch_headers(6 * MiB))
        assert await _code(resp) == (502, "UPSTREAM_CORRUPTION")
        faults["complete"] = False
        faults["refuse"] = False
        deletes = {"refused": True}

        def deleting(op: str, n: int) -> Fault | None:  # state writes back, deletes not yet
            if op == "UploadPart":  # to the completed upload: S3's answer (moto's is a 500)
                return Fault(status=404, code="NoSuchUpload")
            refused = deletes["refused"] and op.startswith("DeleteObject")
            return Fault(status=500) if refused else None

        faulty.rule = deleting
        await asyncio.sleep(1.5)  # the last PATCH's lock has lapsed
        resp = await proxy.patch(url, data=io.BytesIO(rest), headers=patch_headers(6 * MiB))
        assert resp.status == 404, resp.headers  # not 204 with the corrupt object's key
        assert (await resp.json())["error"]["code"] == "NO_SUCH_UPLOAD"
        head = await proxy.head(url, headers=TUS)
        assert head.status == 404, head.headers
        deletes["refused"] = False
        await proxy.app[STATE].janitor.close()  # the owed rollback's last try
    assert await _objects(s3, bucket) == []
    assert await reserved(s3, bucket) == []
    assert await open_uploads_async(s3, bucket) == []
