"""What a client says it sent: the digests declared on a file part, checked before S3 commits.

A file part may carry ``Content-Digest`` or ``Repr-Digest`` (RFC 9530: ``sha-256``,
``sha-512``, and the deprecated ``md5``, ``sha``) or ``Content-MD5`` (RFC 1864) among its part
headers (curl: ``-F 'file=@f;headers="Content-Digest: sha-256=:<b64>:"'``); a tus PATCH
carries ``Upload-Checksum`` (tus_protocol.py). ``read_declared`` turns those headers into a
``Declared`` whose every digest remembers the header that declared it, so a mismatch names
what the client sent (``DigestError`` for what cannot be read: a 400 before any byte is
stored); ``refuse_unchecked`` refuses a digest header where it would not be checked (and
``refuse_body_digests`` on the ``/sign*`` routes);
``DigestCheck`` hashes what the declaration needs beyond the sha-256 the pipeline computes
anyway; ``verify_declared`` compares, just before PutObject and before
CompleteMultipartUpload.

Invariants:

- sha-256 is never hashed twice: the pipeline's own sha256 is the one compared. sha-512 and
  MD5 cost 1.6 and 1.8 CPU s/GiB (docs/integrity-notes.md), so they run only for a file that
  declared them.
- A mismatch is found before the write that would commit the object (PutObject, Complete),
  so the pipeline's usual cleanup (abort, rollback of the request's earlier files) leaves
  nothing stored: "a client told failed finds nothing stored".
- A digest header is either checked or refused, never ignored: ignoring it would tell the
  client its bytes were checked when they were not.
- ``mismatched`` is pure: digests in, the ones that differ out.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from s3proxy.checksums import (
    DIGEST_ALGORITHMS,
    DigestError,
    parse_content_digest,
    parse_content_md5,
)
from s3proxy.errors import DIGEST_MISMATCH, INVALID_DIGEST, ProxyError

if TYPE_CHECKING:
    from s3proxy.form import Arrival, ChunkSource

__all__ = [
    "SIGN_DIGEST_HINT",
    "Declared",
    "Digest",
    "DigestCheck",
    "DigestError",
    "mismatched",
    "read_declared",
    "refuse_body_digests",
    "refuse_unchecked",
    "sf_digest",
    "verify_declared",
]

# Part headers whose digests are read here (RFC 9530, RFC 1864), lowercase.
PART_DIGEST_HEADERS: Final = frozenset({"content-digest", "repr-digest", "content-md5"})

# Headers that declare a digest of a message's bytes (RFC 9530, its predecessor RFC 3230's
# Digest, RFC 1864, S3's additional checksums). Where the proxy does not check one, it refuses
# it: a client that sent it would otherwise believe the bytes were checked.
_DIGEST_HEADER = re.compile(
    r"content-digest|repr-digest|content-md5|digest|x-amz-checksum-(crc[0-9a-z]*|sha[0-9]*)"
)


@dataclass(frozen=True)
class Digest:
    """One digest a client declared, and the header that declared it (for the message)."""

    name: str  # hashlib name: sha256, sha512, md5, sha1
    value: bytes
    header: str  # as the client wrote it: "Content-Digest sha-256", "Upload-Checksum sha1"

    def shown(self, raw: bytes) -> str:
        """``raw`` in this header's own form: a Byte Sequence in Content-Digest and
        Repr-Digest (RFC 9530), bare base64 in Content-MD5 (RFC 1864) and Upload-Checksum."""
        if self.header.startswith(("Content-Digest", "Repr-Digest")):
            return sf_digest(raw)
        return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Declared:
    """The digests one file part (or tus PATCH) declared, in the order read; empty if none.

    One algorithm may be declared twice (Content-Digest and Repr-Digest sha-256, Content-MD5
    and Content-Digest md5): each is checked, so neither can pass unchecked.
    """

    digests: tuple[Digest, ...] = ()

    def names(self) -> set[str]:
        """The hashlib names to compute."""
        return {d.name for d in self.digests}

    def __bool__(self) -> bool:
        return bool(self.digests)


def refuse_unchecked(names: Iterable[str], checked: frozenset[str], hint: str) -> None:
    """DigestError naming the first digest header in ``names`` that is not in ``checked``
    (lowercase): one the proxy would ignore there. ``hint`` says what to send instead."""
    for name in names:
        low = name.lower()
        if low not in checked and _DIGEST_HEADER.fullmatch(low):
            raise DigestError(f"{name} is not checked here; {hint}")


def refuse_body_digests(headers: Iterable[str], hint: str) -> None:
    """ProxyError(INVALID_DIGEST) for a digest header on a request whose body is not
    checked against one (``/upload``'s whole multipart body, a ``/sign*`` JSON body):
    ignored, the client would believe its bytes were checked. ``hint`` says what to
    send instead."""
    try:
        refuse_unchecked(headers, frozenset(), hint)
    except DigestError as exc:
        raise ProxyError(INVALID_DIGEST, str(exc)) from None


#: A ``/sign*`` request's JSON body is not checked, and the file's bytes go to S3 without
#: the proxy; ``/sign`` takes the file's sha-256 in its body, which S3 then checks.
SIGN_DIGEST_HINT = (
    "a /sign request's JSON body is not checked, and the file does not pass through "
    'the proxy; for S3 to check the file, give its "sha256" (hex) in the /sign body'
)


def read_declared(
    content_digest: Sequence[str], content_md5: Sequence[str], repr_digest: Sequence[str] = ()
) -> Declared:
    """The digests in a part's ``Content-Digest``, ``Content-MD5`` and ``Repr-Digest`` lines;
    DigestError if one cannot be read.

    Several ``Content-Digest`` lines are one list (RFC 9110 section 5.3); algorithms we
    cannot verify beside one we can are skipped (RFC 9530 section 2). A part has no content
    coding (form.py refuses a Content-Transfer-Encoding, and RFC 7578 has none), so its
    ``Repr-Digest`` is a digest of the same bytes (RFC 9530 section 3) and is checked alike.
    ``Content-MD5`` is a single value (RFC 1864): two lines are refused rather than one picked.
    """
    found: list[Digest] = []
    for header, lines in (("Content-Digest", content_digest), ("Repr-Digest", repr_digest)):
        if lines:
            for key, value in parse_content_digest(", ".join(lines), header).items():
                found.append(Digest(DIGEST_ALGORITHMS[key][0], value, f"{header} {key}"))
    if len(content_md5) > 1:
        raise DigestError("a part has two Content-MD5 headers")
    if content_md5:
        found.append(Digest("md5", parse_content_md5(content_md5[0]), "Content-MD5"))
    return Declared(tuple(found))


def mismatched(declared: Declared, computed: Mapping[str, bytes]) -> list[Digest]:
    """The declared digests that differ from the computed ones (by hashlib name).

    A declared digest with no computed value counts as differing: never report a match
    that was not checked.
    """
    return [d for d in declared.digests if computed.get(d.name) != d.value]


def sf_digest(raw: bytes) -> str:
    """A digest as an RFC 8941 Byte Sequence, the form of Content-Digest and Repr-Digest."""
    return ":" + base64.b64encode(raw).decode("ascii") + ":"


class DigestCheck:
    """One file's declared digests and the hashes it needs beyond the pipeline's sha256."""

    def __init__(self, declared: Declared) -> None:
        self.declared = declared
        self._hashers = {name: hashlib.new(name) for name in declared.names() if name != "sha256"}

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
    first = wrong[0]
    received = first.shown(computed[first.name]) if first.name in computed else "nothing"
    raise ProxyError(
        DIGEST_MISMATCH,
        f"file {filename!r}: the bytes received do not match its {first.header} "
        f"(declared {first.shown(first.value)}, received {received}); nothing was stored",
    )
