"""What a client says it sent: the digests declared on a file part, checked before S3 commits.

A file part may carry ``Content-Digest`` (RFC 9530: ``sha-256``, ``sha-512``) or
``Content-MD5`` (RFC 1864) among its part headers (curl:
``-F 'file=@f;headers="Content-Digest: sha-256=:<b64>:"'``). ``read_declared`` turns those
headers into a ``Declared`` (``DigestError`` for what cannot be read: a 400 before any byte is
stored); ``DigestCheck`` hashes what the declaration needs beyond the sha-256 the pipeline
computes anyway; ``verify_declared`` compares, just before PutObject and before
CompleteMultipartUpload.

Invariants:

- sha-256 is never hashed twice: the pipeline's own sha256 is the one compared. sha-512 and
  MD5 cost 1.6 and 1.8 CPU s/GiB (docs/integrity-notes.md), so they run only for a file that
  declared them.
- A mismatch is found before the write that would commit the object (PutObject, Complete),
  so the pipeline's usual cleanup (abort, rollback of the request's earlier files) leaves
  nothing stored: "a client told failed finds nothing stored".
- ``mismatched`` is pure: digests in, the names that differ out.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from s3proxy.checksums import DigestError, parse_content_digest, parse_content_md5
from s3proxy.errors import DIGEST_MISMATCH, ProxyError

if TYPE_CHECKING:
    from s3proxy.form import Arrival, ChunkSource

__all__ = [
    "Declared",
    "DigestCheck",
    "DigestError",
    "mismatched",
    "read_declared",
    "sf_digest",
    "verify_declared",
]

# How each declared digest is named to the client (the header and its algorithm key).
_SHOWN = {
    "sha256": "Content-Digest sha-256",
    "sha512": "Content-Digest sha-512",
    "md5": "Content-MD5",
    "sha1": "Upload-Checksum sha1",
}


@dataclass(frozen=True)
class Declared:
    """The digests one file part declared, raw bytes by hashlib name; empty if none."""

    sha256: bytes | None = None
    sha512: bytes | None = None
    md5: bytes | None = None
    sha1: bytes | None = None  # tus's Upload-Checksum only

    def items(self) -> dict[str, bytes]:
        """The declared digests by hashlib name."""
        found = {"sha256": self.sha256, "sha512": self.sha512, "md5": self.md5, "sha1": self.sha1}
        return {name: value for name, value in found.items() if value is not None}

    def __bool__(self) -> bool:
        return bool(self.items())


def read_declared(content_digest: Sequence[str], content_md5: Sequence[str]) -> Declared:
    """The digests in a part's ``Content-Digest`` and ``Content-MD5`` lines; DigestError if
    one cannot be read.

    Several ``Content-Digest`` lines are one list (RFC 9110 section 5.3); algorithms we
    cannot verify are skipped (RFC 9530 section 2). ``Content-MD5`` is a single value
    (RFC 1864): two lines are refused rather than one picked.
    """
    digests = parse_content_digest(", ".join(content_digest)) if content_digest else {}
    if len(content_md5) > 1:
        raise DigestError("a part has two Content-MD5 headers")
    md5 = parse_content_md5(content_md5[0]) if content_md5 else None
    return Declared(digests.get("sha-256"), digests.get("sha-512"), md5)


def mismatched(declared: Declared, computed: Mapping[str, bytes]) -> list[str]:
    """The hashlib names whose declared digest differs from the computed one.

    A declared digest with no computed value counts as differing: never report a match
    that was not checked.
    """
    return [name for name, value in declared.items().items() if computed.get(name) != value]


def sf_digest(raw: bytes) -> str:
    """A digest as an RFC 8941 Byte Sequence, the form of Content-Digest and Repr-Digest."""
    return ":" + base64.b64encode(raw).decode("ascii") + ":"


class DigestCheck:
    """One file's declared digests and the hashes it needs beyond the pipeline's sha256."""

    def __init__(self, declared: Declared) -> None:
        self.declared = declared
        self._hashers = {name: hashlib.new(name) for name in declared.items() if name != "sha256"}

    def update(self, chunk: bytes) -> None:
        for hasher in self._hashers.values():
            hasher.update(chunk)

    def computed(self, sha256: bytes) -> dict[str, bytes]:
        return {"sha256": sha256, **{n: h.digest() for n, h in self._hashers.items()}}

    def wrap(self, source: ChunkSource) -> ChunkSource:
        """``source`` with every chunk it hands over also hashed here; ``source`` itself
        when nothing but sha-256 was declared (the pipeline hashes that)."""
        return _Hashing(source, self) if self._hashers else source


class _Hashing:
    """A ChunkSource that feeds a DigestCheck the bytes it hands over."""

    def __init__(self, source: ChunkSource, check: DigestCheck) -> None:
        self._source = source
        self._check = check

    async def read(self, size: int) -> bytes:
        chunk = await self._source.read(size)
        self._check.update(chunk)
        return chunk

    def pause(self) -> None:
        self._source.pause()

    def resume(self) -> None:
        self._source.resume()

    def expire(self, message: str) -> None:
        self._source.expire(message)

    def arrival(self) -> Arrival | None:
        return self._source.arrival()


def verify_declared(check: DigestCheck | None, sha256: bytes, filename: str) -> None:
    """ProxyError(DIGEST_MISMATCH) if the bytes received are not the ones declared."""
    if check is None:
        return
    computed = check.computed(sha256)
    wrong = mismatched(check.declared, computed)
    if not wrong:
        return
    name = wrong[0]
    # Each value in its header's own form: Content-MD5 is bare base64 (RFC 1864).
    show = (lambda raw: base64.b64encode(raw).decode("ascii")) if name == "md5" else sf_digest
    raise ProxyError(
        DIGEST_MISMATCH,
        f"file {filename!r}: the bytes received do not match its {_SHOWN[name]} "
        f"(declared {show(check.declared.items()[name])}, received {show(computed[name])}); "
        "nothing was stored",
    )
