"""Where the keys that sign tus upload URLs come from: what every instance really shares.

Any instance must verify a URL any other instance made (and itself after a restart), so
the key must be something they all hold:

- the upload-token secrets (``--token-secret``), when configured: every instance is
  given the same ones, so they are used as they are, with no S3 call;
- otherwise the bucket: a random key kept in one object under the reserved prefix,
  ``KEY_OBJECT``. The first instance that needs it creates it with ``If-None-Match: *``;
  two first instances racing both try, S3 refuses the second write (412), and its
  instance reads the winner's. Every instance reads the same object, so all sign alike.

Not the S3 secret key, as before: with an instance role (AWS's recommended setup) each
host has its own temporary key pair, and it rotates, so a URL died on every other
instance and on its own after a restart; so with per-host IAM users, or per-worker
credentials. It still *verifies* (it comes last: it never signs), so URLs issued by a
version that signed with it keep working where they did until they expire
(``--tus-expiry``); it can be dropped once no such URL can be live.

The bucket's key is loaded on the first tus request that needs it, not at start: the
store may not be reachable then (the proxy starts, and /readyz waits for the store), and
an instance that never serves tus never touches the reserved prefix. One load is in
flight at a time, shared by every request that waits for it (a cancelled request does
not cancel it); a failed load is not kept, so the next request tries again, and the
requests meanwhile get 503 ``UPSTREAM_UNAVAILABLE`` naming what the store answered. Once
loaded, the keys stay for the life of the process.

The object holds a list (the first signs, all verify), so a key can be added later
without a new format. Reading it is as good as writing to the bucket (a forged URL may
name any key): read access to ``.s3proxy/`` belongs only to principals that may write the
bucket anyway, as the S3 secret key did. ``GET /files`` never serves ``.s3proxy/``, and
the sweeps pass it by (its name is not an upload id: ``tus_url.parse_id``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from s3proxy import tus_url
from s3proxy.checksums import Algorithm
from s3proxy.errors import UPSTREAM_ERROR, UPSTREAM_UNAVAILABLE, ProxyError
from s3proxy.s3 import NoSuchKey, ObjectOptions, ObjectStore, PreconditionFailed, read_small
from s3proxy.tus_state import crc_of

log = logging.getLogger("s3proxy.tus")

KEY_OBJECT = tus_url.RESERVED_PREFIX + "url-key"
KEY_OPTIONS = ObjectOptions("application/json")
KEY_BYTES = 32  # as long as HMAC-SHA256's output: more adds nothing
FORMAT = 1
# Attempts at read-or-create: a write refused as conflicting (S3's 409
# ConditionalRequestConflict while the winner's write is still in progress) may find
# nothing to read yet.
ATTEMPTS = 5


class KeyObjectError(ValueError):
    """The key object's bytes are not a key list this version reads."""


def new_key_object() -> bytes:
    """The bytes of a fresh key object: one random key."""
    return encode([secrets.token_bytes(KEY_BYTES)])


def encode(keys: Sequence[bytes]) -> bytes:
    text = [base64.urlsafe_b64encode(k).decode("ascii") for k in keys]
    return json.dumps({"format": FORMAT, "keys": text}, separators=(",", ":")).encode()


def decode(raw: bytes) -> tuple[bytes, ...]:
    """The secrets a key object holds (the first signs); KeyObjectError if unreadable."""
    try:
        data: Any = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise KeyObjectError(f"not a format {FORMAT} key object")
        keys = tuple(base64.urlsafe_b64decode(str(k)) for k in data["keys"])
    except (ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise KeyObjectError(f"unreadable key object: {exc}") from None
    if not keys or any(len(k) < KEY_BYTES for k in keys):
        raise KeyObjectError(f"a key object needs keys of at least {KEY_BYTES} bytes")
    return keys


async def read_or_create(
    bucket: ObjectStore, checksum: Algorithm | None = None
) -> tuple[tuple[bytes, ...], bool]:
    """The bucket's URL secrets, and whether this call created them (written with the
    CRC of its bytes, which S3 verifies, as every object the proxy writes)."""
    for attempt in range(ATTEMPTS):
        raw = await _read(bucket)
        if raw is not None:
            return _decoded(raw), False
        fresh = new_key_object()
        try:
            crc = None if checksum is None else crc_of([fresh], checksum)
            await bucket.put(KEY_OBJECT, [fresh], KEY_OPTIONS, checksum=crc, if_none_match=True)
        except PreconditionFailed:
            # Another instance's (or ours, whose answer was lost and whose retry was
            # refused): read it. A conflict may come before the winner's is readable.
            await asyncio.sleep(0.05 * 2**attempt)
            continue
        return decode(fresh), True
    raise ProxyError(UPSTREAM_ERROR, f"{KEY_OBJECT} was refused as existing but cannot be read")


async def _read(bucket: ObjectStore) -> bytes | None:
    try:
        raw, _ = await read_small(bucket, KEY_OBJECT)
    except NoSuchKey:
        return None
    return raw


def _decoded(raw: bytes) -> tuple[bytes, ...]:
    try:
        return decode(raw)
    except KeyObjectError as exc:
        # Not overwritten: other instances may sign with what it held. An operator's matter.
        raise ProxyError(UPSTREAM_ERROR, f"{KEY_OBJECT}: {exc}") from None


class UrlKeys:
    """The URL keys of one process (``tus_url.url_keys``: the first signs, all verify):
    the token secrets', or the bucket's, loaded once on first use."""

    def __init__(
        self,
        token_secrets: Sequence[str],
        bucket: Callable[[], ObjectStore],
        checksum: Algorithm | None = None,
    ) -> None:
        self._bucket = bucket
        self._checksum = checksum
        self._keys: tuple[bytes, ...] | None = None
        self._loading: asyncio.Task[tuple[bytes, ...]] | None = None
        shared = [s.encode() for s in token_secrets]
        if shared:
            self._keys = tus_url.url_keys(shared)
            log.info("tus.url_key source=token_secrets")
        else:
            log.info("tus.url_key source=bucket object=%s load=on_first_use", KEY_OBJECT)

    @property
    def keys(self) -> tuple[bytes, ...]:
        """The keys, once loaded (for tests and tools; requests ``await get()``)."""
        if self._keys is None:
            raise RuntimeError("the tus URL keys are not loaded yet")
        return self._keys

    async def get(self) -> tuple[bytes, ...]:
        """The keys; loaded (or waited for) if not yet. 503 while they cannot be."""
        if self._keys is not None:
            return self._keys
        task = self._loading
        if task is None:
            # shared by every request waiting for it: its lines belong to none of them
            task = self._loading = asyncio.create_task(
                self._load(), name="tus-url-key", context=contextvars.Context()
            )
            task.add_done_callback(self._loaded)
        try:
            return await asyncio.shield(task)
        except ProxyError as err:
            raise ProxyError(
                UPSTREAM_UNAVAILABLE,
                f"the upload URL key cannot be read from the bucket ({err.kind.code}: "
                f"{err.message}); retry",
            ) from err

    async def _load(self) -> tuple[bytes, ...]:
        bucket = self._bucket()
        try:
            shared, created = await read_or_create(bucket, self._checksum)
        except ProxyError as err:
            log.warning(
                "tus.url_key_failed object=%s error=%s message=%s",
                KEY_OBJECT,
                err.kind.code,
                err.message,
            )
            raise
        # The S3 secret key last (it never signs): URLs an older version signed with it.
        legacy = await bucket.credential_secret()
        keys = tus_url.url_keys([*shared, *([legacy.encode()] if legacy else [])])
        log.info(
            "tus.url_key source=bucket object=%s created=%s also_verifies=%s",
            KEY_OBJECT,
            str(created).lower(),
            "the_S3_secret_key" if legacy else "none",
        )
        self._keys = keys
        return keys

    def _loaded(self, task: asyncio.Task[tuple[bytes, ...]]) -> None:
        """A failed load is forgotten (the next request tries again); its error was
        reported to its waiters, and is retrieved here even if none is left."""
        if self._loading is task:
            self._loading = None
        if not task.cancelled():
            task.exception()

    async def close(self) -> None:
        """Stop a load in flight (the app is stopping)."""
        task = self._loading
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
