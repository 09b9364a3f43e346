"""Presigned multipart uploads on a shared key (no ``{uuid}``): which object is an upload's
own. Two uploads of byte-identical parts make one multipart ETag, so the ETag told them
apart no more than S3's listing did (reprobe11a R1-R5): one upload's deletes removed the
other's object after its 200, its checks announced it, its retries answered 200 for it.
Now each upload carries a nonce onto its object and a record of it (``presign_record``).
Real moto behind FaultyS3, as the other presign tests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from s3proxy import (
    keys,
    presign_claim,
    presign_completed,
    presign_identity,
    presign_record,
)
from s3proxy.settings import Settings
from s3proxy.state import STATE
from tests.faults import Fault, FaultyS3, claim_operation
from tests.polling import eventually
from tests.s3util import open_uploads_async
from tests.test_presign import (
    call,
    code,
    complete_until_decided,
    pdf,
    stored_keys,
)

SHARED = "plain/{filename}"
TIGHT = 0.5  # --s3-read-timeout for a test that holds an S3 call past it
BYTES = b"x" * 1000  # every twin's one part: the same bytes, so the same multipart ETag
PARTS = [{"part_number": 1, "etag": hashlib.md5(BYTES).hexdigest()}]


@dataclass
class Rig:
    """A proxy on a shared key in front of FaultyS3 (moto) with a webhook receiver. ``rule``
    and ``hook`` (the webhook's status for each event) may be changed as a test goes."""

    s3: Any
    bucket: str
    rule: Callable[[str, int], Fault | None] = lambda op, n: None
    hook: Callable[[dict[str, Any]], Awaitable[int]] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    proxy: TestClient[Any, Any] = field(init=False)
    faulty: FaultyS3 = field(init=False)

    async def twin(self, signed: int = 1000, body: bytes = BYTES) -> dict[str, str]:
        """A presigned multipart upload signed for ``signed`` bytes, its one part ``body``."""
        status, up = await call(self.proxy, "/sign/multipart", pdf(signed), {})
        assert status == 200, up
        ref = {"key": up["key"], "upload_id": up["upload_id"]}
        await asyncio.to_thread(
            self.s3.upload_part, Bucket=self.bucket, PartNumber=1, Body=body,
            Key=ref["key"], UploadId=ref["upload_id"],
        )  # fmt: skip
        return ref

    async def complete(self, ref: dict[str, Any], **extra: Any) -> tuple[int, dict[str, Any]]:
        return await call(self.proxy, "/sign/multipart/complete", {**ref, **extra}, {})

    def completed(self) -> list[str]:
        """The keys ``upload.completed`` events named, in order."""
        return [e["files"][0]["key"] for e in self.events if e["event"] == "upload.completed"]

    async def settled(self, within: float = 10.0) -> None:
        """Every later check and repeated delete has run (a claim held for them may not
        have been released yet)."""
        rechecks = self.proxy.app[STATE].janitor._rechecks
        await eventually(
            lambda: not [r for r in rechecks.values() if not r.what.startswith("claim")],
            within=within,
            what="the rechecks",
        )

    async def nonce_at(self, key: str) -> str | None:
        """The nonce of the object at ``key``; None if there is none (or no object)."""
        try:
            head = await asyncio.to_thread(self.s3.head_object, Bucket=self.bucket, Key=key)
        except self.s3.exceptions.ClientError:
            return None
        meta: dict[str, str] = head["Metadata"]
        return meta.get(keys.NONCE_META)

    async def record(self, ref: dict[str, str]) -> presign_record.Record | None:
        sink = self.proxy.app[STATE].require_sink()
        return await presign_record.read(sink, ref["key"], ref["upload_id"])


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(
    proxy_factory: Any, aiohttp_server: Any, moto: Any, s3: Any, bucket: str
) -> AsyncIterator[RigFactory]:
    """``await rig(**settings)``: the proxy on ``plain/{filename}``, one S3 attempt, a
    5 s --s3-read-timeout, a webhook answering 204. A test that holds an S3 call past the
    timeout asks for a short one (``TIGHT``, later checks then at +1 s and +4 s): with one
    attempt, 0.5 s for every call let a loaded CI machine's slow answer fail a test that
    holds nothing (an abort answered 504 UPSTREAM_TIMEOUT)."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**settings: Any) -> Rig:
            made = Rig(s3, bucket)

            async def hook(request: web.Request) -> web.Response:
                body = await request.json()
                made.events.append(body)
                status = 204 if made.hook is None else await made.hook(body)
                return web.Response(status=status)

            app = web.Application()
            app.router.add_post("/hook", hook)
            server = await aiohttp_server(app)
            made.faulty = await stack.enter_async_context(
                FaultyS3(moto.endpoint_url, lambda op, n: made.rule(op, n), name=claim_operation)
            )
            values: dict[str, Any] = {
                "key_template": SHARED,
                "s3_max_attempts": 1,
                "s3_read_timeout": 5.0,
                "webhook_url": str(server.make_url("/hook")),
                "webhook_attempts": 1,
                "webhook_timeout": 10,
                **settings,
            }
            made.proxy = await proxy_factory(endpoint_url=made.faulty.endpoint_url, **values)
            return made

        yield make


# --- the nonce and the record, at create ----------------------------------------------


async def test_a_shared_key_upload_gets_a_nonce_and_a_record_and_a_uuid_key_neither(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """On a shared key the record names the upload's nonce, which S3 carries onto the
    object; an abort forgets the record. On {uuid} keys: no record, no call for one."""
    r = await rig()
    a, b = await r.twin(), await r.twin(body=b"y" * 1000)
    record = await r.record(a)
    assert record is not None and (record.key, record.upload_id) == (a["key"], a["upload_id"])
    assert len(record.nonce) == 32 and record.gone_since is None
    status, out = await r.complete(a)
    assert status == 200, out
    assert await r.nonce_at(a["key"]) == record.nonce
    status, out = await call(r.proxy, "/sign/multipart/abort", b, {})
    assert status == 200, out
    assert await r.record(b) is None  # forgotten with the abort
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=a["key"])

    u = await rig(key_template="uploads/{uuid}/{filename}")
    ref = await u.twin()
    status, out = await u.complete(ref)
    assert status == 200, out
    assert not [op for op in u.faulty.calls if op.endswith(":record")]
    assert presign_record.record_key(ref["key"], ref["upload_id"]) not in _all_keys(s3, bucket)
    assert await u.nonce_at(ref["key"]) is None
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


@pytest.mark.parametrize("fault", [Fault(status=500), Fault(late=1.0)], ids=["500", "lost"])
async def test_a_record_that_cannot_be_written_leaves_no_upload_open(
    rig: RigFactory, s3: Any, bucket: str, fault: Fault
) -> None:
    """A record write that fails (or whose answer is lost): the upload is aborted and the
    S3 error answered; nothing is handed out that its completes could not tell."""
    r = await rig(s3_read_timeout=TIGHT)
    r.rule = lambda op, n: fault if op == "PutObject:record" else None
    status, out = await call(r.proxy, "/sign/multipart", pdf(1000), {})
    assert (status, code(out)) in ((502, "UPSTREAM_ERROR"), (504, "UPSTREAM_TIMEOUT")), out
    assert "AbortMultipartUpload" in r.faulty.calls
    assert await open_uploads_async(s3, bucket) == []
    await asyncio.sleep(fault.late)  # a record landed late goes with the sweep
    for key in await asyncio.to_thread(_all_keys, s3, bucket):
        await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=key)


def _all_keys(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


# --- R1: A's deletes made again later, default --no-overwrite ------------------------


async def test_a_size_delete_made_again_later_leaves_another_uploads_object_of_the_same_bytes(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe11a R1, size: A signed 2000 and sent 1000 bytes; its Complete is carried out,
    the answer lost: A finds its object, 400 "2000 were signed", deleted, and the delete is
    made again at +1 s and +4 s. B (signed 1000, the same bytes) completes meanwhile: 200.
    A's repeats (If-Match A's ETag, which B's object has too) deleted B's object, and the
    later checks announced it as A's. Now both tell A's object by its nonce: B's stays."""
    r = await rig(s3_read_timeout=TIGHT)
    a, b = await r.twin(2000), await r.twin(1000)
    r.rule = lambda op, n: Fault(late=1.0) if op == "CompleteMultipartUpload" else None
    status, out = await r.complete(a)
    r.rule = lambda op, n: None
    assert (status, code(out)) == (400, "INVALID_REQUEST"), out
    assert "2000 were signed" in out["error"]["message"], out
    status, out = await r.complete(b)
    assert status == 200 and out["size"] == 1000, out
    record = await r.record(b)
    await r.settled()
    assert record is not None and await r.nonce_at(b["key"]) == record.nonce, "B's stays"
    assert r.completed() == [b["key"]], r.events  # B's own, nothing for A
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


async def test_a_rollback_made_again_later_leaves_another_uploads_object_of_the_same_bytes(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe11a R1, rollback: A's first Complete attempt is held past the read timeout
    (it may land late), the second completes; A's webhook fails: rolled back (502), the
    delete made again at +1 s and +4 s. B completes the same bytes meanwhile (200): A's
    repeats deleted B's object. Now B's stays."""
    r = await rig(s3_max_attempts=2, s3_read_timeout=TIGHT)
    a, b = await r.twin(), await r.twin()

    async def hook(body: dict[str, Any]) -> int:
        return 500 if len(r.events) == 1 else 204  # A's event fails, B's is taken

    r.hook = hook
    held = Fault(delay=1.5, status=500)  # never reaches S3, but A cannot know
    r.rule = lambda op, n: held if (op, n) == ("CompleteMultipartUpload", 1) else None
    status, out = await r.complete(a)
    assert (status, code(out)) == (502, "WEBHOOK_FAILED"), out
    status, out = await r.complete(b)
    assert status == 200, out
    record = await r.record(b)
    await r.settled()
    assert record is not None and await r.nonce_at(b["key"]) == record.nonce, "B's stays"
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


# --- R2: --no-overwrite false: B replaced A's object, then A deletes -----------------


async def test_a_rollback_leaves_the_object_another_upload_replaced_it_with(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe11a R2, rollback (--no-overwrite false): while A's webhook is delivered, B
    completes the same bytes over A's object (200, told); A's webhook fails and its
    rollback (If-Match the ETag both share) deleted B's object. Now B's stays, and the
    receiver is not told the key was rolled back. (A 2 s read timeout: nothing here waits
    for a late write, and 0.5 s timed a HeadObject out once in a loaded CI run.)"""
    r = await rig(no_overwrite=False, s3_read_timeout=2.0)
    a, b = await r.twin(), await r.twin()
    b_answer: list[tuple[int, dict[str, Any]]] = []

    async def hook(body: dict[str, Any]) -> int:
        if len(r.events) > 1:
            return 204  # B's
        b_answer.append(await r.complete(b))  # B replaces A's object meanwhile
        return 500

    r.hook = hook
    status, out = await r.complete(a)
    assert (status, code(out)) == (502, "WEBHOOK_FAILED"), out
    [(b_status, b_out)] = b_answer
    assert b_status == 200, b_out
    record = await r.record(b)
    assert record is not None and await r.nonce_at(b["key"]) == record.nonce, "B's stays"
    assert [e["event"] for e in r.events] == ["upload.completed"] * 2, r.events
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


async def test_a_size_delete_leaves_the_object_another_upload_replaced_it_with(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe11a R2, size (--no-overwrite false): A signed 2000, sent 1000; B (signed
    1000, the same bytes) completes over A's object (200, told) just after A's size check
    read it. A's delete (If-Match the shared ETag) deleted B's object. Now B's stays."""
    r = await rig(no_overwrite=False, s3_read_timeout=2.0)
    a, b = await r.twin(2000), await r.twin(1000)
    held = Fault(late=1.0)  # A's size check: S3 answered, the answer on its way
    r.rule = lambda op, n: held if (op, n) == ("HeadObject", 1) else None
    a_done = asyncio.create_task(r.complete(a))
    await eventually(lambda: "HeadObject" in r.faulty.calls, within=5, what="A's size check")
    await asyncio.sleep(0.2)
    status, out = await r.complete(b)
    assert status == 200, out
    status, out = await a_done
    assert (status, code(out)) == (400, "INVALID_REQUEST"), out
    record = await r.record(b)
    assert record is not None and await r.nonce_at(b["key"]) == record.nonce, "B's stays"
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


# --- R3, R4: A's checks and retries never take B's object ----------------------------


async def test_a_later_check_after_a_409_does_not_announce_another_uploads_object(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe11a R3: A's Complete is held (504; checks at +1 s and +4 s); B completes the
    same bytes (200); A's held Complete is refused (412), A's retry gets 409 KEY_EXISTS and
    A's upload is aborted. The +4 s check then found the upload gone and the ETag matching
    and announced B's object as A's (upload.completed with A's request id). Now nothing is
    announced for A."""
    r = await rig(s3_read_timeout=TIGHT)
    a, b = await r.twin(), await r.twin()
    held = Fault(delay=1.2)
    r.rule = lambda op, n: held if (op, n) == ("CompleteMultipartUpload", 1) else None
    status, out = await r.complete(a)
    assert (status, code(out)) == (504, "UPSTREAM_TIMEOUT"), out
    status, out = await r.complete(b)
    assert status == 200, out
    await asyncio.sleep(1.0)  # A's held Complete reached S3 and was refused
    status, out = await complete_until_decided(r.proxy, {**a, "parts": PARTS})
    assert (status, code(out)) == (409, "KEY_EXISTS"), out
    status, out = await r.complete(a, parts=PARTS)  # R4: and not 200 for B's object
    assert (status, code(out)) == (404, "NO_SUCH_UPLOAD"), out
    await r.settled()
    assert r.completed() == [b["key"]], r.events
    assert await stored_keys(s3, bucket) == [b["key"]]
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


async def test_a_retry_after_a_409_is_not_answered_for_another_uploads_object(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe11a R4: B completes first; A (the same bytes) gets 409 KEY_EXISTS, its upload
    aborted; A's retry listing its parts got 200 for B's object (and announced it). Now
    404, with or without parts."""
    r = await rig()
    a, b = await r.twin(), await r.twin()
    status, out = await r.complete(b)
    assert status == 200, out
    status, out = await r.complete(a)
    assert (status, code(out)) == (409, "KEY_EXISTS"), out
    for extra in ({"parts": PARTS}, {}):
        status, out = await r.complete(a, **extra)
        assert (status, code(out)) == (404, "NO_SUCH_UPLOAD"), (extra, out)
    assert r.completed() == [b["key"]], r.events
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


async def test_a_lost_answer_is_not_answered_with_another_uploads_object_and_size(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe11a R4 (--no-overwrite false): A signed 2000, sent 1000; its Complete is
    carried out, the answer lost; B (signed 1000, the same bytes) replaces the object
    meanwhile. A got 200 "size": 1000 for B's object, held to B's size. Now A's object is
    gone and B's is not A's: no 200, and the retry answers 404."""
    r = await rig(no_overwrite=False, s3_read_timeout=1.0)
    a, b = await r.twin(2000), await r.twin(1000)
    forwarded = asyncio.Event()
    lost = Fault(late=2.0, answer=lambda _: forwarded.set())
    r.rule = lambda op, n: lost if (op, n) == ("CompleteMultipartUpload", 1) else None
    a_done = asyncio.create_task(r.complete(a))
    await asyncio.wait_for(forwarded.wait(), 5)
    status, out = await r.complete(b)
    assert status == 200, out
    status, out = await a_done
    assert status != 200, out
    status, out = await complete_until_decided(r.proxy, {**a, "parts": PARTS})
    assert (status, code(out)) == (404, "NO_SUCH_UPLOAD"), out
    await r.settled(within=12)
    record = await r.record(b)
    assert record is not None and await r.nonce_at(b["key"]) == record.nonce
    assert r.completed() == [b["key"]], r.events
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


# --- R5: a retry's parts are checked against our object -------------------------------


async def test_a_retry_with_wrong_parts_of_its_own_object_is_400_on_a_shared_key(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe11a R5: on a shared key a retry of a completed upload listing wrong parts got
    404 "list the upload's 'parts'" (the parts were what told the object); on {uuid} keys
    and on first completes 400. Now the nonce tells the object, and the parts are checked
    against it: 400 PARTS_DIFFER, as everywhere; right ones, or none, 200."""
    r = await rig()
    a = await r.twin()
    status, out = await r.complete(a)
    assert status == 200, out
    wrong = [
        [{"part_number": 1, "etag": "0" * 32}],
        [*PARTS, {"part_number": 2, "etag": "0" * 32}],
        [],
    ]
    for parts in wrong:
        status, out = await r.complete(a, parts=parts)
        assert (status, code(out)) == (400, "INVALID_REQUEST"), (parts, out)
        assert out["error"]["message"] == presign_completed.PARTS_DIFFER, out
    for extra in ({"parts": PARTS}, {}):
        status, out = await r.complete(a, **extra)
        assert status == 200 and out["size"] == 1000, (extra, out)
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=a["key"])


# --- uploads made before records (a rolling upgrade) ----------------------------------


async def test_an_upload_made_before_records_completes_and_is_recognised_as_before(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """An upload an older instance created (the signed size, no nonce, no record) still
    completes here, and a retry listing its parts is recognised by the ETag, as before;
    without parts it gets the hint to list them."""
    r = await rig()
    up = await asyncio.to_thread(
        s3.create_multipart_upload, Bucket=bucket, Key="plain/report.pdf",
        Metadata={presign_identity.SIZE_META: "1000"}, ContentType="application/pdf",
    )  # fmt: skip
    ref = {"key": "plain/report.pdf", "upload_id": up["UploadId"]}
    await asyncio.to_thread(
        s3.upload_part, Bucket=bucket, Key=ref["key"], UploadId=ref["upload_id"],
        PartNumber=1, Body=BYTES,
    )  # fmt: skip
    status, out = await r.complete(ref)
    assert status == 200 and out["size"] == 1000, out
    status, out = await r.complete(ref, parts=PARTS)
    assert status == 200 and out["size"] == 1000, out
    status, out = await r.complete(ref)
    assert (status, code(out)) == (404, "NO_SUCH_UPLOAD"), out
    assert "list the upload's 'parts'" in out["error"]["message"], out
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=ref["key"])


# --- the sweep ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listed", "gone_since", "step"),
    [
        (True, None, "keep"),
        (False, None, "mark"),
        (False, 1000.0 - 60, "keep"),  # within the retention
        (False, 1000.0 - 101, "remove"),
    ],
)
def test_a_record_is_kept_while_listed_marked_when_gone_and_removed_after_retention(
    listed: bool, gone_since: float | None, step: str
) -> None:
    assert presign_record.sweep_step(listed, gone_since, 1000.0, 100.0) == step


def test_the_retention_covers_the_urls_the_claim_and_the_late_checks() -> None:
    s = Settings(presign_expiry=900, s3_read_timeout=30, cleanup_clock_skew=60)
    lease = presign_claim.lease(s)
    assert presign_record.retention(s) == pytest.approx(900 + lease + 8 * 30 + 60)
    minutes = round(presign_record.retention(Settings()) / 60)
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert f"({minutes} minutes with the defaults): a retried complete recognises its object" in (
        readme
    )
    assert "later, on a shared key, a retry answers 404" in readme


@pytest.mark.parametrize(
    ("carried", "nonce", "verdict"),
    [
        ("n1", "n1", "ours"),
        ("n2", "n1", "another"),
        (None, "n1", "another"),
        ("n2", None, "untold"),  # swept or forgotten: it may be this upload's own (F2)
        (None, None, "legacy"),  # an upload made before records
    ],
)
def test_an_object_is_ours_by_its_nonce(
    carried: str | None, nonce: str | None, verdict: str
) -> None:
    assert presign_record.judge(carried, nonce) == verdict


async def test_the_sweep_keeps_marks_and_removes_records_and_a_dry_run_only_counts(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    r = await rig()
    sink = r.proxy.app[STATE].require_sink()
    live = await r.twin()  # still open: kept
    done = await r.twin(body=b"z" * 1000)
    status, out = await r.complete(done)  # gone from S3's listing: marked, later removed
    assert status == 200, out
    old = presign_record.Record("plain/old", "u-old", "n", time.time() - 999, time.time() - 500)
    await asyncio.to_thread(
        s3.put_object, Bucket=bucket, Key=presign_record.record_key("plain/old", "u-old"),
        Body=presign_record.encode(old),
    )  # fmt: skip
    junk = presign_record.PREFIX + "junk"
    await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=junk, Body=b"{not json")
    before = await asyncio.to_thread(_all_keys, s3, bucket)
    dry = await presign_record.sweep(sink, time.time(), 100, dry_run=True)
    assert (dry.kept, dry.marked, dry.removed) == (1, 1, 2)
    assert await asyncio.to_thread(_all_keys, s3, bucket) == before
    assert (await r.record(done) or old).gone_since is None
    now = time.time()
    swept = await presign_record.sweep(sink, now, 100)
    assert (swept.kept, swept.marked, swept.removed) == (1, 1, 2)
    marked = await r.record(done)
    assert marked is not None and marked.gone_since == pytest.approx(now)
    assert junk not in await asyncio.to_thread(_all_keys, s3, bucket)
    assert await presign_record.read(sink, "plain/old", "u-old") is None
    # the marked one stays for the retention, then goes; the open one stays
    again = await presign_record.sweep(sink, now + 50, 100)
    assert (again.kept, again.marked, again.removed) == (2, 0, 0)
    last = await presign_record.sweep(sink, now + 101, 100)
    assert (last.kept, last.marked, last.removed) == (1, 0, 1)
    assert await r.record(done) is None and await r.record(live) is not None
    status, out = await call(r.proxy, "/sign/multipart/abort", live, {})
    assert status == 200, out
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=done["key"])


async def test_serves_periodic_sweep_marks_and_removes_records(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """Serve's sweep (``app.sweep_once``) sweeps the records beside the claims: a record
    of a completed upload is marked gone, and removed once past the retention."""
    from datetime import timedelta

    from s3proxy.app import sweep_once
    from s3proxy.cleanup import Rule

    r = await rig()
    a = await r.twin()
    status, out = await r.complete(a)
    assert status == 200, out
    state = r.proxy.app[STATE]
    rule = Rule(timedelta(seconds=3600), by_activity=True)
    now = time.time()
    await sweep_once(state.require_sink(), state.settings, state.metrics, rule, now)
    marked = await r.record(a)
    assert marked is not None and marked.gone_since == pytest.approx(now)
    later = now + presign_record.retention(state.settings) + 1
    await sweep_once(state.require_sink(), state.settings, state.metrics, rule, later)
    assert await r.record(a) is None
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=a["key"])


# --- reprobe12b: a failed size delete, an abort after the complete, a record gone ------


def _fast_janitor(r: Rig) -> None:
    r.proxy.app[STATE].janitor.interval = 0.2


async def _absent(r: Rig, key: str) -> bool:
    try:
        await asyncio.to_thread(r.s3.head_object, Bucket=r.bucket, Key=key)
    except r.s3.exceptions.ClientError:
        return True
    return False


@pytest.mark.parametrize(
    ("template", "failing"),
    [
        ("uploads/{uuid}/{filename}", ("DeleteObject", 1)),
        (SHARED, ("DeleteObject", 1)),
        # the nonce check's read of the record (and the log line's, which goes without it)
        (SHARED, ("GetObject:record", 1)),
        (SHARED, ("HeadObject", 2)),  # the nonce check's HeadObject (1: the size check's)
    ],
    ids=["uuid-delete", "shared-delete", "shared-record", "shared-head"],
)
async def test_a_size_delete_that_fails_goes_to_the_janitor_and_the_400_says_so(
    rig: RigFactory, template: str, failing: tuple[str, int]
) -> None:
    """reprobe12b F1: A signed 2000 and sent 1000; its complete's size delete was awaited
    bare: one DeleteObject refused (or, on a shared key, the record's GET or the
    HeadObject before it) answered 502 and the wrong-sized object stayed for good. Now the
    janitor retries it, and the 400 says the delete did not finish (not "deleted")."""
    r = await rig(key_template=template)
    _fast_janitor(r)
    a = await r.twin(2000)
    op, nth = failing  # the nth such call of the complete's
    nth += r.faulty.calls.count(op)
    # the record's reads: the read-back's after the Complete (``replaced``: it tells
    # nothing when it fails), the log line's, the nonce check's
    span = 3 if op == "GetObject:record" else 1
    r.rule = lambda called, n: Fault(status=500) if called == op and nth <= n < nth + span else None
    status, out = await r.complete(a)
    assert (status, code(out)) == (400, "INVALID_REQUEST"), out
    message = out["error"]["message"]
    assert "2000 were signed" in message and "did not finish: the proxy retries it" in message
    await eventually(lambda: _absent(r, a["key"]), within=5, what="the janitor's delete")


async def test_an_abort_while_the_webhook_is_told_leaves_the_rollback_its_own_object(
    rig: RigFactory, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """reprobe12b F2 (t89): the user cancels while the complete is telling the webhook:
    the abort (S3: NoSuchUpload, the upload completed; "aborted") forgot the record, so the
    rollback judged the upload's own object another's: 502 "rolled back", and the object
    stayed. Now an abort of a completed upload keeps its record: the rollback deletes it."""
    caplog.set_level("INFO", logger="s3proxy.presign")
    r = await rig()
    a = await r.twin()
    aborted: list[tuple[int, dict[str, Any]]] = []

    async def hook(body: dict[str, Any]) -> int:
        if body["event"] == "upload.completed":
            aborted.append(await call(r.proxy, "/sign/multipart/abort", a, {}))
            return 500
        return 204

    r.hook = hook
    status, out = await r.complete(a)
    assert (status, code(out)) == (502, "WEBHOOK_FAILED"), out
    assert "rolled back" in out["error"]["message"], out
    [(abort_status, abort_out)] = aborted
    # S3 had completed it: not "aborted" (reprobe13a N1)
    assert (abort_status, code(abort_out)) == (403, "UPLOAD_COMPLETE"), abort_out
    assert await _absent(r, a["key"]), "the upload's own object is rolled back"
    assert [e["event"] for e in r.events] == ["upload.completed", "upload.rolled_back"]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "s3proxy.presign"]
    assert not [line for line in lines if "not_ours" in line], lines


async def test_an_abort_after_a_lost_complete_leaves_the_later_checks_its_own_object(
    rig: RigFactory,
) -> None:
    """reprobe12b F2 (t82): A signed 2000, sent 1000; its Complete is held past the read
    timeout (504; checks at +1 s and +4 s) and lands; the client then aborts ("aborted").
    The checks found no record and judged A's own wrong-sized object another's: it stayed
    for good. Now the record stays with an abort of a completed upload: it is deleted."""
    r = await rig(s3_read_timeout=TIGHT)
    a = await r.twin(2000)
    landed = asyncio.Event()
    held = Fault(delay=1.0, answer=lambda _: landed.set())
    r.rule = lambda op, n: held if (op, n) == ("CompleteMultipartUpload", 1) else None
    status, out = await r.complete(a)
    assert (status, code(out)) == (504, "UPSTREAM_TIMEOUT"), out
    await asyncio.wait_for(landed.wait(), 5)
    status, out = await call(r.proxy, "/sign/multipart/abort", a, {})
    assert (status, code(out)) == (403, "UPLOAD_COMPLETE"), out
    assert await r.record(a) is not None, "kept: S3 had completed the upload"
    await r.settled()
    assert await _absent(r, a["key"]), "the wrong-sized object is deleted"
    assert r.completed() == [], r.events


async def test_an_abort_of_an_open_upload_forgets_its_record(rig: RigFactory) -> None:
    r = await rig()
    a = await r.twin()
    status, out = await call(r.proxy, "/sign/multipart/abort", a, {})
    assert status == 200, out
    assert await r.record(a) is None


def _garbage(resp: web.Response) -> None:
    resp.body = b"{not a record"


async def test_a_record_that_cannot_be_read_fails_the_rollback_rather_than_telling_nothing(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe12b F2 (t90): a record read that could not be parsed counted as "no record":
    the rollback judged the upload's own object another's, answered 502 "rolled back" and
    the object stayed. Now it is an error: the delete fails, the janitor holds the object
    to its size, and the 502 says the rollback did not finish."""
    r = await rig()
    _fast_janitor(r)
    a = await r.twin()
    r.hook = _always(500)
    # the read-back's after the Complete (``replaced``, which then tells nothing) and the
    # rollback's
    r.rule = lambda op, n: Fault(answer=_garbage) if op == "GetObject:record" and n <= 2 else None
    status, out = await r.complete(a)
    assert (status, code(out)) == (502, "WEBHOOK_FAILED"), out
    assert "the rollback did not finish" in out["error"]["message"], out
    sink = r.proxy.app[STATE].require_sink()
    r.rule = lambda op, n: Fault(answer=_garbage) if op == "GetObject:record" else None
    with pytest.raises(presign_record.CorruptRecord):
        await presign_record.read(sink, a["key"], a["upload_id"])
    r.rule = lambda op, n: None
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=a["key"])


def _always(status: int) -> Callable[[dict[str, Any]], Awaitable[int]]:
    async def hook(body: dict[str, Any]) -> int:
        return status

    return hook


async def test_a_retry_after_the_record_went_is_404_saying_so_not_to_list_the_parts(
    rig: RigFactory, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """reprobe12b F4 (t88): the record swept (or forgotten), a retry got 404 "list the
    upload's 'parts'" (the hint for uploads made before records), listing them got 404
    too, and the log blamed "another upload" for the upload's own object. Now the 404 says
    the record is gone and the object cannot be told; the log says so."""
    caplog.set_level("INFO", logger="s3proxy.presign")
    r = await rig()
    a = await r.twin()
    status, out = await r.complete(a)
    assert status == 200, out
    name = presign_record.record_key(a["key"], a["upload_id"])
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=name)
    for extra in ({}, {"parts": PARTS}):
        status, out = await r.complete(a, **extra)
        assert (status, code(out)) == (404, "NO_SUCH_UPLOAD"), out
        message = out["error"]["message"]
        assert "list the upload's 'parts'" not in message, message
        assert "this upload's record is gone" in message, message
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "s3proxy.presign"]
    assert [line for line in lines if line.startswith("presign.untold")], lines
    assert not [line for line in lines if "not_ours" in line], lines
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=a["key"])


@pytest.mark.parametrize(
    ("seen", "parts", "hint"),
    [
        ("untold", False, "record is gone"),
        ("untold", True, "record is gone"),
        ("legacy", False, "list the upload's 'parts'"),
        ("legacy", True, ""),
        ("another", False, ""),
        ("none", False, ""),  # no object: listing parts would tell nothing
        (None, False, ""),
    ],
)
def test_the_404_hint_goes_by_the_object_found(seen: Any, parts: bool, hint: str) -> None:
    got = presign_identity.gone_hint(seen, parts, 2520.0)
    assert (hint in got) if hint else got == "", got
    if seen == "untold":
        assert "42 minutes" in got


async def test_a_rollback_that_found_another_uploads_object_says_nothing_was_rolled_back(
    rig: RigFactory, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """reprobe12b (t75): A's rollback found B's object over A's and sent no DELETE, yet
    logged presign.rolled_back and answered "the upload was rolled back". Now the 502 and
    the log go by whether a DELETE was sent and landed."""
    caplog.set_level("INFO", logger="s3proxy.presign")
    r = await rig(no_overwrite=False, s3_read_timeout=2.0)  # as the R2 rollback test above
    a, b = await r.twin(), await r.twin()

    async def hook(body: dict[str, Any]) -> int:
        if len(r.events) > 1:
            return 204
        status, out = await r.complete(b)  # B replaces A's object meanwhile
        assert status == 200, out
        return 500

    r.hook = hook
    status, out = await r.complete(a)
    assert (status, code(out)) == (502, "WEBHOOK_FAILED"), out
    message = out["error"]["message"]
    assert "nothing was rolled back" in message and "another upload's" in message, message
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "s3proxy.presign"]
    assert not [line for line in lines if line.startswith("presign.rolled_back")], lines
    assert await r.nonce_at(b["key"]) is not None
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])


async def test_a_record_write_and_abort_failing_logs_the_abort_owed(
    rig: RigFactory, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """reprobe12b nit (t81): the record write failed, the abort too (handed to the
    janitor), and the log said ``action=aborted``. Now ``action=abort_owed``; the janitor
    aborts it."""
    caplog.set_level("INFO", logger="s3proxy.presign")
    r = await rig()
    _fast_janitor(r)
    failing = {("PutObject:record", 1), ("AbortMultipartUpload", 1)}
    r.rule = lambda op, n: Fault(status=500) if (op, n) in failing else None
    status, out = await call(r.proxy, "/sign/multipart", pdf(1000), {})
    assert status == 502, out
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "s3proxy.presign"]
    assert [line for line in lines if "record_failed" in line and "action=abort_owed" in line]
    await eventually(
        lambda: open_uploads_async(s3, bucket), until=lambda ups: not ups, within=5, what="abort"
    )


# --- reprobe12b F5: one record's S3 failure does not end the sweep ---------------------


async def test_the_record_sweep_goes_on_past_a_failure_and_counts_it(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """reprobe12b F5: one ListParts refused ended the record sweep (and with it serve's
    pass, and ``s3proxy cleanup``'s report). Now it is logged and counted, and the other
    records are swept."""
    r = await rig()
    sink = r.proxy.app[STATE].require_sink()
    live = await r.twin()
    old = presign_record.Record("plain/old", "u-old", "n", time.time() - 999, time.time() - 500)
    await asyncio.to_thread(
        s3.put_object, Bucket=bucket, Key=presign_record.record_key("plain/old", "u-old"),
        Body=presign_record.encode(old),
    )  # fmt: skip
    r.rule = lambda op, n: Fault(status=500) if op == "ListParts" else None
    swept = await presign_record.sweep(sink, time.time(), 100)
    assert (swept.kept, swept.marked, swept.removed, swept.failed) == (0, 0, 1, 1)
    r.rule = lambda op, n: None
    assert await r.record(live) is not None
    status, out = await call(r.proxy, "/sign/multipart/abort", live, {})
    assert status == 200, out


async def test_the_claim_sweep_goes_on_past_a_failure(
    rig: RigFactory, s3: Any, bucket: str
) -> None:
    """The claim sweep ended the same way on one claim's GET refused (and the record sweep
    after it with it). Now the others are swept; the failed one is left to the next."""
    r = await rig()
    sink = r.proxy.app[STATE].require_sink()
    names = [presign_claim.PREFIX + name for name in ("a", "b")]
    for name in names:
        body = json.dumps({"owner": "o", "until": time.time() - 300}).encode()
        await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=name, Body=body)
    r.rule = lambda op, n: Fault(status=500) if (op, n) == ("GetObject:claim", 1) else None
    assert await presign_claim.sweep(sink, time.time(), 1.0) == 1
    r.rule = lambda op, n: None
    assert await presign_claim.sweep(sink, time.time(), 1.0) == 1
    assert not [k for k in await asyncio.to_thread(_all_keys, s3, bucket) if k in names]


@pytest.mark.parametrize("template", [SHARED, "uploads/{uuid}/{filename}"], ids=["shared", "uuid"])
async def test_an_abort_of_a_completed_upload_is_not_answered_aborted(
    rig: RigFactory, s3: Any, bucket: str, template: str
) -> None:
    """reprobe13a N1: S3 answers an abort of a completed upload NoSuchUpload, which counts
    as aborted: the client got 200 "aborted": true while the object stayed stored. Now 403
    UPLOAD_COMPLETE (as a tus DELETE of a finished upload); the object stays; an abort of
    an upload that was aborted already is still 200."""
    r = await rig(key_template=template)
    a = await r.twin()
    status, out = await r.complete(a)
    assert status == 200, out
    status, out = await call(r.proxy, "/sign/multipart/abort", a, {})
    assert (status, code(out)) == (403, "UPLOAD_COMPLETE"), out
    assert a["key"] in out["error"]["message"]
    assert not await _absent(r, a["key"])
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=a["key"])
    b = await r.twin()
    for _ in range(2):  # open, then already gone
        status, out = await call(r.proxy, "/sign/multipart/abort", b, {})
        assert status == 200 and out["aborted"] is True, out


async def test_a_delete_owed_at_shutdown_names_the_objects_nonce(
    rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """reprobe13a N2: a presigned upload's delete still owed at shutdown was logged
    ``cleanup.abandoned what=delete key=...`` with no nonce on a shared key, where /upload's
    lines carry it: an operator could not tell the failed upload's object from one that
    replaced it."""
    r = await rig()
    a = await r.twin(2000)  # signed 2000, sent 1000: the size delete is owed
    r.rule = lambda op, n: Fault(status=500) if op == "DeleteObject" else None
    status, out = await r.complete(a)
    assert (status, code(out)) == (400, "INVALID_REQUEST"), out
    record = await r.record(a)
    assert record is not None
    with caplog.at_level("INFO"):
        await r.proxy.app[STATE].janitor.close()
    lines = [rec.getMessage() for rec in caplog.records if "size_mismatch" in rec.getMessage()]
    assert any(f"nonce={record.nonce}" in line for line in lines), lines


@pytest.mark.parametrize("no_overwrite", [False, True], ids=["overwrite", "no-overwrite"])
async def test_a_complete_whose_object_another_stands_over_is_409_and_untold(
    rig: RigFactory, s3: Any, bucket: str, no_overwrite: bool
) -> None:
    """reprobe20b: two presigned completes of one shared key both answered 200 on moto
    (it checks If-None-Match apart from storing), the loser answered from its HeadObject
    with the winner's object and ETag, and the webhook heard of that object twice. Here
    A's check after its Complete is held while B's complete stores the key over A's
    (no-overwrite: moto's condition let it, as in the race); A's HeadObject then finds
    B's nonce: 409 KEY_EXISTS, not announced. B's 200 stands, with its bytes."""
    r = await rig(no_overwrite=no_overwrite, s3_read_timeout=5.0)  # A's check is held
    a, b = await r.twin(), await r.twin(body=b"y" * 1000)
    b_parts = [{"part_number": 1, "etag": hashlib.md5(b"y" * 1000).hexdigest()}]
    release = asyncio.Event()
    seen = {"a_completed": False}

    def rule(op: str, n: int) -> Fault | None:
        if op == "CompleteMultipartUpload" and n == 1:
            seen["a_completed"] = True
            if no_overwrite:  # B's Complete is let past the condition as moto's race does
                return None
        if op == "HeadObject" and seen["a_completed"] and not release.is_set():
            release_b = Fault(until=release)
            seen["a_completed"] = False  # hold only A's check
            return release_b
        return None

    r.rule = rule
    a_done = asyncio.create_task(r.complete(a, parts=PARTS))

    def a_check_held() -> bool:
        calls = r.faulty.calls
        return (
            "CompleteMultipartUpload" in calls
            and "HeadObject" in calls[calls.index("CompleteMultipartUpload") :]
        )

    await eventually(a_check_held, within=10, what="A's check held")
    if no_overwrite:  # the race: B's Complete stored the key as if it were free
        await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=a["key"])
    status, out = await r.complete(b, parts=b_parts)
    assert status == 200, out
    release.set()
    status, out = await a_done
    assert (status, code(out)) == (409, "KEY_EXISTS"), out
    assert "this upload's bytes are not stored" in out["error"]["message"]
    body = (await asyncio.to_thread(s3.get_object, Bucket=bucket, Key=b["key"]))["Body"].read()
    assert body == b"y" * 1000
    assert r.completed() == [b["key"]], r.events  # B's alone
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=b["key"])
