"""One request's journey: walk the form, store each file, all or nothing.

Files are stored one after another in the order they arrive (the body is one
stream). If anything fails, the file in progress is aborted by its pipeline and
the files already stored by this request are deleted, so a failed request
leaves nothing behind; the deletes run to their end even if the request is
cancelled (again) meanwhile.

Form fields that arrive before a file are stored as that file's ``x-amz-meta-*``
metadata (S3 fixes metadata when an upload is created); a field sent after it is
not. Each stored file reports under ``metadata`` exactly the fields stored with
it (as sent, before encoding; a repeated field joined with commas, as stored),
and ``fields`` returns every field of the request. S3 metadata names are
case-insensitive, so ``Foo`` and ``foo`` before one file are refused (400
INVALID_FIELD) rather than one silently replacing the other.

The field values a request holds count against the memory budget: at its first
non-empty field the request takes an allowance of ``max_fields_size`` bytes (no
more than the body's length) as a side reservation, which s3proxy.form keeps its
fields within (413 over it), and gives it back when the request ends. One
allowance, taken whole while the request holds nothing else, so a request never
waits for budget while holding field bytes it might need more of (no deadlock);
the side cap keeps the largest part room. Only the first field's bytes (at most
``--max-field-size``) are read before the allowance is granted.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from s3proxy import keys
from s3proxy.budget import MemoryBudget, Reservation
from s3proxy.digests import DigestCheck
from s3proxy.errors import (
    INVALID_FIELD,
    KEY_EXISTS,
    METADATA_TOO_LARGE,
    NO_FILE,
    ProxyError,
    quoted,
)
from s3proxy.form import Field, FilePart
from s3proxy.janitor import Cleanup, Janitor, Kind, recheck_late, run_cleanups
from s3proxy.metrics import Metrics
from s3proxy.parts import largest_part
from s3proxy.pipeline import (
    FileSpec,
    FileUpload,
    PipelineConfig,
    StoredFile,
    abort_reason,
    delete_own,
)
from s3proxy.s3 import ObjectSink, PreconditionFailed
from s3proxy.tokens import UploadGrant

log = logging.getLogger("s3proxy.uploads")

# S3 user metadata: keys and values together at most 2 KB
# (https://docs.aws.amazon.com/AmazonS3/latest/userguide/UsingMetadata.html).
MAX_METADATA_BYTES = 2048
RESERVED_METADATA = {"sha256", keys.NONCE_META}
# Names the proxy writes and reads back as proof (a tus upload's id, a --no-overwrite
# nonce, a presigned upload's signed size): a client's field under this prefix could pass
# another upload's object off as its own, so every such name is the proxy's.
PROXY_METADATA_PREFIX = "s3proxy-"


def reserved_metadata_name(lower: str) -> bool:
    return lower in RESERVED_METADATA or lower.startswith(PROXY_METADATA_PREFIX)


# A field name stored as metadata: HTTP token characters (RFC 9110 section 5.6.2) that
# every store keeps, leading ``_``, ``.``, ``-`` included (``_token``, ``_charset_``).
# Not others, nor percent-encoded: moto (5.2.5) silently drops an ``x-amz-meta-`` name
# outside this set (``post%5btitle%5d``, ``a%20b``), which SeaweedFS stores; a name
# some store loses behind a 201 is refused instead.
_METADATA_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class UploadResult:
    files: list[StoredFile] = field(default_factory=list)
    fields: dict[str, str | list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"files": [f.to_json() for f in self.files], "fields": self.fields}


def encode_metadata_value(value: str) -> str:
    """S3 metadata travels in HTTP headers: what a header would not carry as it is goes
    RFC 2047-encoded, as S3 does for non-ASCII text. That is also text with spaces around
    it (header values are trimmed in transit), the empty value (some stores drop an
    empty header) and text a reader would take for an encoded word
    (``=?UTF-8?B?aGk=?=`` would read back as "hi")."""
    plain = value.isascii() and value.isprintable() and value == value.strip()
    if plain and value and "=?" not in value:
        return value
    return "=?UTF-8?B?" + base64.b64encode(value.encode()).decode() + "?="


def stored_fields(fields: dict[str, str | list[str]]) -> dict[str, str]:
    """The fields as stored with a file, before encoding: repeated values joined."""
    return {k: v if isinstance(v, str) else ",".join(v) for k, v in fields.items()}


def unstorable_name(name: str) -> str:
    """Why a field sent before a file cannot be stored with it, and the way out."""
    return (
        f"field {quoted(name)} comes before a file, so it would be stored as the file's S3 "
        "metadata, whose names may hold only ASCII letters, digits, '_', '.' and '-'; "
        'rename it, or send it after the last file (it is then returned under "fields" only)'
    )


def field_metadata(
    fields: dict[str, str | list[str]],
    unstorable: Callable[[str], str] = unstorable_name,
    noun: str = "field",
    own: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Fields as S3 metadata, or a clear error when they cannot be stored faithfully;
    ``unstorable`` and ``noun`` word the errors in the caller's protocol (a tus upload's
    metadata has keys, not fields). ``own`` is metadata the proxy adds itself (names
    under ``s3proxy-``): counted against S3's limit, and in the result."""
    meta: dict[str, str] = {}
    names: dict[str, str] = {}  # lowercased -> as sent
    for name, joined in stored_fields(fields).items():
        if not _METADATA_NAME.fullmatch(name):
            raise ProxyError(INVALID_FIELD, unstorable(name))
        lower = name.lower()
        if reserved_metadata_name(lower):
            raise ProxyError(INVALID_FIELD, f"{noun} name {quoted(name)} is reserved")
        if lower in names:
            raise ProxyError(
                INVALID_FIELD,
                f"{noun}s {quoted(names[lower])} and {quoted(name)} differ only in case; S3 "
                "metadata names are case-insensitive, so they cannot both be stored",
            )
        names[lower] = name
        meta[lower] = encode_metadata_value(joined)
    meta.update(own or {})
    # What the proxy adds: the sha256, and the nonce of a --no-overwrite write.
    size = sum(len(k) + len(v) for k, v in meta.items()) + len("sha256") + 64 + keys.NONCE_BYTES
    if size > MAX_METADATA_BYTES:
        raise ProxyError(
            METADATA_TOO_LARGE,
            f"the {noun}s take {size} bytes as S3 metadata; S3 allows {MAX_METADATA_BYTES}",
        )
    return meta


def same_key(files: list[StoredFile], key: str) -> int | None:
    """The number (from 1) of the request's stored file at ``key``, if any. Pure. Two files
    of one request can get one key where keys are shared (no ``{uuid}``): the second then
    replaced the first (``--no-overwrite false``: a 201 listed both, the first's bytes
    gone) or was refused as if another upload held the key (reprobe12a F4)."""
    return next((i for i, f in enumerate(files, 1) if f.key == key), None)


def _same_key_message(earlier: int, filename: str, key: str) -> str:
    return (
        f"file {filename!r} would be stored at {key!r}, where this request's file {earlier} "
        "is: keys are shared here (the key template has no {uuid}); send each file under a "
        "name of its own, or in a request of its own"
    )


class RequestUpload:
    """Stores every file of one multipart/form-data request."""

    def __init__(
        self,
        sink: ObjectSink,
        budget: MemoryBudget,
        cfg: PipelineConfig,
        key_template: str,
        size_hint: int | None,
        metrics: Metrics | None = None,
        grant: UploadGrant | None = None,
        janitor: Janitor | None = None,
    ) -> None:
        self.janitor = janitor
        self.sink = sink
        self.budget = budget
        self.cfg = cfg
        self.key_template = key_template
        self.size_hint = size_hint  # no file is longer than this (the body's length), if known
        self.result = UploadResult()
        self.metrics = metrics or Metrics()
        self.grant = grant
        self.key_policy = keys.KeyPolicy.for_grant(key_template, grant)
        self.started = time.monotonic()
        self._fields: Reservation | None = None  # the allowance for field values
        # a write of a file rolled back may still land (``FileUpload.may_land_late``)
        self.may_land_late = False
        self.rollback_done = False  # every delete of its rollback landed
        self.not_ours: set[str] = set()  # keys a rollback found holding another's object

    async def run(self, parts: AsyncIterator[Field | FilePart]) -> UploadResult:
        try:
            async for part in parts:
                if isinstance(part, Field):
                    await self._hold_fields(part)
                    self._add_field(part)
                else:
                    stored = await self._store(part)
                    if stored is not None:
                        self.result.files.append(stored)
            if not self.result.files:
                raise ProxyError(NO_FILE, "the request has no file part (send one with a filename)")
        except BaseException as exc:
            await self.rollback(abort_reason(exc))
            raise
        finally:
            if self._fields is not None:
                self._fields.release()
                self._fields = None
        return self.result

    def fields_allowance(self) -> tuple[int, int]:
        """(allowance, side cap): a request's field bytes and the most all requests'
        field bytes may hold, leaving the largest part room (no deadlock, budget.py)."""
        cfg = self.cfg
        side_cap = max(0, self.budget.limit - largest_part(cfg.part_size, cfg.max_file_size))
        allowance = cfg.max_fields_size
        if self.size_hint is not None:
            allowance = min(allowance, self.size_hint)
        return min(allowance, side_cap), side_cap

    async def _hold_fields(self, part: Field) -> None:
        """Take the request's field allowance from the budget at its first field."""
        if self._fields is not None or part.size == 0:
            return
        allowance, side_cap = self.fields_allowance()
        if allowance > 0:
            self._fields = await self.budget.acquire_side(allowance, side_cap, self.started)

    def _add_field(self, part: Field) -> None:
        current = self.result.fields.get(part.name)
        if current is None:
            self.result.fields[part.name] = part.value
        elif isinstance(current, list):
            current.append(part.value)
        else:
            self.result.fields[part.name] = [current, part.value]

    async def _store(self, part: FilePart) -> StoredFile | None:
        try:
            key = self.key_policy.new_key(part.filename, part.field)
        except ValueError as exc:
            raise ProxyError(INVALID_FIELD, f"cannot make an object key: {exc}") from None
        if (earlier := same_key(self.result.files, key)) is not None:
            raise ProxyError(KEY_EXISTS, _same_key_message(earlier, part.filename, key))
        spec = FileSpec(
            field=part.field,
            filename=part.filename,
            key=key,
            declared_type=part.declared_type,
            metadata=field_metadata(self.result.fields),
            fields=stored_fields(self.result.fields),
            size_hint=self.size_hint,
            digests=DigestCheck(part.declared) if part.declared else None,
        )
        source = spec.digests.wrap(part.source) if spec.digests else part.source
        upload = FileUpload(spec, self.sink, self.budget, self._file_config(), self.janitor)
        m = self.metrics
        m.uploads_started.inc()
        m.uploads_in_flight.inc()
        try:
            stored = await upload.run(source)
        except BaseException as exc:
            m.uploads_aborted.labels(abort_reason(exc)).inc()
            self.may_land_late = self.may_land_late or upload.may_land_late
            raise
        finally:
            m.uploads_in_flight.dec()
            m.bytes_received.inc(upload.size)
        if stored is not None:
            # Counted completed only by ``settle``, once the request keeps it: a later
            # file or the webhook may still roll it back.
            log.info(
                "upload.completed key=%s size=%d parts=%d content_type=%s",
                stored.key,
                stored.size,
                stored.parts,
                stored.content_type,
            )
        return stored

    def _file_config(self) -> PipelineConfig:
        """The proxy's limits, narrowed by the upload token if there is one."""
        if self.grant is None:
            return self.cfg
        return dataclasses.replace(
            self.cfg,
            grant_types=self.grant.types,
            token_limit=self.grant.max_size,
            token_used=sum(f.size for f in self.result.files),
        )

    def settle(self) -> None:
        """The request succeeded (its 201 is built): its files are kept, so count them
        completed now. Until then a stored file may still be rolled back, and it then
        counts as aborted, never as both: every file started ends in one of the two."""
        self._count_completed(self.result.files)

    def _count_completed(self, files: list[StoredFile]) -> None:
        m = self.metrics
        m.uploads_completed.inc(len(files))
        m.bytes_stored.inc(sum(f.size for f in files))

    async def rollback(self, reason: str) -> list[str]:
        """Delete what this request already stored (the failing file aborted itself);
        return the keys. Every delete runs, at once, even if the request is cancelled
        meanwhile (that cancellation is re-raised afterwards); a failed one goes to the
        janitor. Each deleted file counts as aborted for ``reason`` (the code that
        failed the request: WEBHOOK_FAILED, the failing file's, ...)."""
        files, self.result.files = self.result.files, []
        cleanup = self.cfg.writes.cleanup
        if files:
            self.metrics.uploads_aborted.labels(reason).inc(len(files))
        for f in files:
            log.info("upload.rolled_back key=%s reason=%s", f.key, reason)
        # Where keys are shared, the ETag tells this request's object (to delete it by hand).
        calls = [
            (
                self._deleter(f, cleanup),
                f"rollback key={f.key}" + (f" etag={f.etag}" if cleanup == "nonce" else ""),
                Kind.OBJECT,
            )
            for f in files
        ]
        try:
            self.rollback_done = await run_cleanups(calls, self.janitor)
        finally:  # (also when cancelled meanwhile: the deletes ran to their end)
            for f in files:
                if f.may_land_late:  # stored by a write an attempt of which may still land
                    self.may_land_late = True
                    log.info("upload.late_write_possible key=%s action=recheck", f.key)
                    recheck_late(
                        self.janitor,
                        self._rechecker(f, cleanup, reason),
                        f"rollback key={f.key}"
                        + (f" nonce={f.nonce}" if cleanup == "nonce" and f.nonce else ""),
                        self.cfg.late_write_window,
                    )
        return [f.key for f in files]

    def _deleter(self, stored: StoredFile, cleanup: str) -> Callable[[], Awaitable[None]]:
        """A shared key is deleted only while it is still the object this request wrote:
        under --no-overwrite nothing replaces it, so its ETag tells it; with overwrites
        allowed a later upload of the same bytes has the same ETag, so its nonce does. A
        key found holding another upload's object is noted (``not_ours``)."""
        if cleanup == "nonce" and not self.cfg.writes.if_none_match and stored.nonce:
            return self._own_deleter(stored, stored.nonce, "rollback")
        if_match = f'"{stored.etag}"' if cleanup == "nonce" else None

        async def delete() -> None:
            try:
                await self.sink.delete(stored.key, if_match=if_match)
            except PreconditionFailed:
                if if_match is None:
                    raise
                # deleted by someone, and stored again by another upload since
                self.not_ours.add(stored.key)
                log.info("upload.not_deleted key=%s reason=rollback owner=changed", stored.key)

        return delete

    def _own_deleter(self, stored: StoredFile, nonce: str, reason: str) -> Cleanup:
        async def delete() -> None:
            if not await delete_own(self.sink, stored.key, nonce, reason):
                self.not_ours.add(stored.key)

        return delete

    def _rechecker(
        self, stored: StoredFile, cleanup: str, reason: str
    ) -> Callable[[], Awaitable[None]]:
        """The rollback's delete made again later: a shared key's object only if it still
        carries this request's nonce (a later upload of the same bytes has the same ETag)."""
        nonce = stored.nonce
        if cleanup == "nonce" and nonce is not None:
            return self._own_deleter(stored, nonce, reason)
        return self._deleter(stored, cleanup)

    def rolled_back_keys(self, keys: list[str]) -> list[str]:
        """Of a rolled-back request's ``keys``, those its ``upload.rolled_back`` names: not
        one found holding another upload's object (reprobe12a F1: the receiver, told to
        forget the key, forgot a file another client was answered 201 for)."""
        return [k for k in keys if k not in self.not_ours]
