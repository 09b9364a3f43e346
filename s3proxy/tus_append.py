"""What one tus PATCH reads and adds: its body as the pipeline's chunk source, under the
client's timeouts and the bytes left of the upload, and its staging (the staged bytes read
back, the tail written as a segment) with the state it commits, whole or partial."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from s3proxy.body import Chunk
from s3proxy.checksums import Algorithm, CrcValue
from s3proxy.errors import CLIENT_TIMEOUT, FILE_TOO_LARGE, REQUEST_TOO_LARGE, ProxyError
from s3proxy.form import Arrival, ClientWatch, TransportFlow, next_chunk
from s3proxy.janitor import Kind, run_cleanup
from s3proxy.pipeline import FileUpload, Staged
from s3proxy.state import AppState
from s3proxy.tus_state import Part, Segment, TusState, TusStore, part_length

log = logging.getLogger("s3proxy.tus")


def past_length(left: int) -> str:
    return f"the PATCH goes past Upload-Length (or the upload's limit): {left} bytes were left"


class BodySource:
    """A PATCH body as a ``ChunkSource``: every read under the request's ClientWatch (idle
    timeout, minimum rate, the bytes left of Upload-Length); pausing stops the socket."""

    def __init__(self, request: web.Request, watch: ClientWatch, left: int) -> None:
        self._left = left
        self._content = request.content
        self._watch = watch
        self._flow = TransportFlow(request)
        self._paused = False

    async def read(self, size: int) -> bytes:
        """The body's next chunk as received (``form.next_chunk``), b"" at its end; it
        may bring more than ``size``, which the upload machine keeps for the next part,
        as with a form's file part."""
        self._flow.expect(size)
        try:
            return await self._watch.read(lambda: next_chunk(self._content))
        except ProxyError as err:
            if err.kind is not REQUEST_TOO_LARGE:
                raise
            # The watch's limit is the bytes left of Upload-Length (or of the upload's
            # limit): going past it is the file's fault, as README's table says.
            raise ProxyError(FILE_TOO_LARGE, past_length(self._left)) from None

    def pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._flow.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._flow.resume_reading()

    def expire(self, message: str) -> None:
        self._watch.expire(CLIENT_TIMEOUT, message)

    def arrival(self) -> Arrival | None:
        return self._flow.arrival()


class Appended:
    """What one PATCH adds: the pipeline's ``Staging`` (staged bytes read back, the tail
    written as a segment), and the state it commits."""

    def __init__(
        self,
        store: TusStore,
        current: TusState,
        stored_length: int | None,
        confirm: Callable[[], Awaitable[None]],
    ) -> None:
        self.store = store
        self.confirm = confirm  # the PATCH's lease, renewed (or 423) before the object write
        self.current = current  # as stored, with the length this PATCH works to
        self.stored_length = stored_length  # the length as stored (a failed PATCH keeps it)
        self.file: FileUpload | None = None
        self.segment: Segment | None = None
        self.segment_sent = False  # its segment write was made (it may have failed)
        self.segment_late = False  # an attempt of that write may still land (S3 unanswered)
        self.tail_start: int | None = None

    async def load(self) -> Staged:
        """The staged bytes, checked against their CRCs (``TusStore.load``)."""
        checksum = self.current.checksum
        algorithm = None if checksum is None else Algorithm(checksum)
        chunks, crc = await self.store.load(self.current.segments, algorithm)
        return Staged(chunks, crc)

    async def stage(
        self, number: int, start: int, chunks: list[Chunk], size: int, crc: CrcValue | None
    ) -> None:
        self.tail_start = start
        if not size:
            return
        if crc is not None and crc.algorithm.value != self.current.checksum:
            crc = None  # not the upload's algorithm (an instance set otherwise): not recorded
        self.segment_sent = True
        self.segment, written = await self.store.put_segment(start, chunks, size, crc)
        self.segment_late = written.may_land_late

    async def before_store(self) -> None:
        """The object is stored only while this PATCH holds the upload: an instance frozen
        past its lease, the upload taken over (or terminated) meanwhile, stored its file
        over the other PATCH's and told the webhook twice (reprobe19b F1)."""
        await self.confirm()

    def segment_may_land_late(self) -> bool:
        """Its segment write had an attempt S3 did not answer, or failed (an attempt of
        it may still land, after the upload ended: ``tus_ending.segment_recheck``)."""
        return self.segment_late or (self.segment_sent and self.segment is None)

    def _new_parts(self) -> list[Part]:
        assert self.file is not None
        known = {p.number for p in self.current.parts}
        plan = self.store.upload.plan
        length = self.current.length
        return [
            Part(n, etag, part_length(plan, n, length), None if crc is None else crc.b64())
            for n, (etag, crc) in self.file.acknowledged().items()
            if n not in known
        ]

    def next_state(self) -> TusState:
        """The state after this PATCH (its lock released)."""
        assert self.file is not None and self.tail_start is not None
        new_parts = self._new_parts()
        # A part sent by this PATCH took the staged segments in front of it.
        kept = [] if new_parts else list(self.current.segments)
        tail = [self.segment] if self.segment is not None else []
        return dataclasses.replace(
            self.current,
            offset=self.current.offset + self.file.size,
            upload_id=self.file.upload_id,
            content_type=self.file.content_type,
            parts=[*self.current.parts, *new_parts],
            segments=[*kept, *tail],
            lock=None,
        )

    def upload_id(self) -> str | None:
        """The multipart upload this PATCH continued or made, if any."""
        return self.current.upload_id if self.file is None else self.file.upload_id

    def dropped(self) -> list[Segment]:
        return list(self.current.segments) if self._new_parts() else []

    def partial_state(self) -> TusState | None:
        """The state that keeps what a failed PATCH got S3 to acknowledge: its whole parts
        (none: None). The upload then stands at the end of its last whole part: never at
        the file's end (the file's short last part is not kept: the upload would look
        complete and is not), never past it."""
        if self.file is None:
            return None
        plan = self.store.upload.plan
        new_parts = [p for p in self._new_parts() if p.size == plan.size(p.number)]
        if not new_parts:
            return None
        parts = [*self.current.parts, *new_parts]
        numbers = [p.number for p in parts]
        if numbers != list(range(1, len(parts) + 1)):
            return None  # a gap (a part still failing before a later one landed)
        length = self.current.length
        if length is not None and sum(p.size for p in parts) >= length:
            parts.pop()  # the file's last part, full by chance: the next PATCH resends it
            if len(parts) == len(self.current.parts):
                return None
        return dataclasses.replace(
            self.current,
            offset=sum(p.size for p in parts),
            length=self.stored_length,
            upload_id=self.file.upload_id,
            content_type=self.file.content_type,
            parts=parts,
            segments=[],
            lock=None,
        )

    async def abort_unnamed(self, state: AppState) -> None:
        """A multipart upload this PATCH made but never committed: no state names it, so
        abort it now (a killed instance leaves it to the orphan sweep)."""
        file = self.file
        if file is None or not file.created_here or file.upload_id is None:
            return
        key, upload_id = self.store.upload.key, file.upload_id

        async def abort() -> None:
            # "Never committed" as this PATCH saw it: a commit answered late or with an
            # error may have landed all the same, and then the state names this upload.
            # Unless the state says otherwise now, it stays (an upload no state names is
            # the orphan sweep's); aborting it would leave the upload unable to finish.
            found = await self.store.read()
            if found is not None and found[0].upload_id == upload_id:
                log.info("upload.kept key=%s upload_id=%s reason=committed", key, upload_id)
                return
            log.info("upload.aborted key=%s upload_id=%s reason=uncommitted", key, upload_id)
            await self.store.bucket.abort(key, upload_id)

        what = f"abort key={key} upload_id={upload_id}"
        await run_cleanup(abort, what, state.janitor, kind=Kind.UPLOAD)
