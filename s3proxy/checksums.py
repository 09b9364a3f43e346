"""Checksums S3 verifies on every byte it stores, and the digests clients may send with a file.

Pure: bytes and numbers in, values out; no I/O, no event loop. The pipeline feeds each chunk
it relays to a running CRC (``Crc.update``), sends ``Crc.b64()`` with each UploadPart or
PutObject as ``x-amz-checksum-<name>`` so S3 refuses a corrupted part (400 BadDigest), and
sends the full-object value at CompleteMultipartUpload (``ChecksumType=FULL_OBJECT``), which
``full_object`` combines from the part values and lengths: no second pass over the data.

Invariants:

- A ``CrcValue`` always carries the length of the bytes it covers: a CRC cannot be combined
  without it, and a full-object value is meaningless without the object's size.
- Values go on the wire as S3 wants them: the CRC as an unsigned big-endian integer of the
  algorithm's width, base64-encoded (the form botocore's ``CrtCrc64NvmeChecksum.digest`` and
  the S3 API reference use).
- The CRCs come from ``awscrt`` (native, hardware-accelerated: PCLMULQDQ / SSE4.2 on x86); its
  ``combine_*`` functions give ``crc(A + B)`` from ``crc(A)``, ``crc(B)`` and ``len(B)``.
  ``python -m bench.checksum_cost`` measures their cost (docs/integrity-notes.md).

Client digests: ``parse_content_digest`` reads RFC 9530 ``Content-Digest`` (a Structured
Field Dictionary, RFC 8941 section 3.2, of algorithm -> Byte Sequence) and keeps the
algorithms we can verify; ``parse_content_md5`` reads RFC 1864 ``Content-MD5``. Both raise
``DigestError`` (a ``ValueError``) with a message fit for a 400 answer.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from awscrt import checksums as _crt

__all__ = [
    "CHECKSUM_MODES",
    "DIGEST_ALGORITHMS",
    "Algorithm",
    "Crc",
    "CrcValue",
    "DigestError",
    "decode_b64",
    "decode_base64",
    "full_object",
    "parse_content_digest",
    "parse_content_md5",
    "resolve_mode",
]


# The largest length a combine accepts: awscrt takes an unsigned 64-bit length. S3's own
# limits are far below it (5 GiB a part, 48.8 TiB an object).
_MAX_LENGTH: Final = 2**64 - 1


class Algorithm(enum.Enum):
    """An S3 additional-checksum algorithm whose full-object value can be combined from parts.

    The value is S3's name for it (``ChecksumAlgorithm=`` in CreateMultipartUpload and
    PutObject). Only CRCs combine, so only CRCs have FULL_OBJECT checksums (S3 user guide,
    "Checking object integrity": full object checksums support CRC-64/NVME, CRC-32, CRC-32C).
    """

    CRC64NVME = "CRC64NVME"
    CRC32C = "CRC32C"

    @property
    def header(self) -> str:
        """The request/response header S3 reads and writes: ``x-amz-checksum-crc64nvme``."""
        return f"x-amz-checksum-{self.value.lower()}"

    @property
    def param(self) -> str:
        """The botocore parameter and response field: ``ChecksumCRC64NVME``."""
        return f"Checksum{self.value}"

    @property
    def width(self) -> int:
        """Bytes in the big-endian digest: 8 for CRC-64, 4 for CRC-32C."""
        return _SPECS[self].width


@dataclass(frozen=True)
class _Spec:
    width: int
    update: Callable[[bytes, int], int]
    combine: Callable[[int, int, int], int]


_SPECS: Final[dict[Algorithm, _Spec]] = {
    Algorithm.CRC64NVME: _Spec(8, _crt.crc64nvme, _crt.combine_crc64nvme),
    Algorithm.CRC32C: _Spec(4, _crt.crc32c, _crt.combine_crc32c),
}

# ``--checksum``: what the operator may choose. "auto" is CRC64NVME: the cheapest here next to
# the proxy's sha256, S3's default for new objects, and verified by the embedded SeaweedFS
# (docs/integrity-notes.md has the figures).
CHECKSUM_MODES: Final = ("auto", "crc64nvme", "crc32c", "off")


def resolve_mode(mode: str) -> Algorithm | None:
    """The algorithm for a ``--checksum`` value, or None for ``off``; ValueError otherwise."""
    choice = mode.strip().lower()
    if choice == "off":
        return None
    if choice == "auto":
        return Algorithm.CRC64NVME
    for algorithm in Algorithm:
        if choice == algorithm.value.lower():
            return algorithm
    raise ValueError(f"checksum must be one of {', '.join(CHECKSUM_MODES)}, not {mode!r}")


@dataclass(frozen=True)
class CrcValue:
    """A finished CRC over ``length`` bytes: what one part or one whole object carries."""

    algorithm: Algorithm
    value: int
    length: int

    def digest(self) -> bytes:
        """The CRC as S3 encodes it before base64: unsigned, big-endian, full width."""
        return self.value.to_bytes(self.algorithm.width, "big")

    def b64(self) -> str:
        """The value of an ``x-amz-checksum-*`` header or ``Checksum*`` parameter."""
        return base64.b64encode(self.digest()).decode("ascii")

    def then(self, other: CrcValue) -> CrcValue:
        """The CRC of this value's bytes followed by ``other``'s, without reading either."""
        if other.algorithm is not self.algorithm:
            raise ValueError(f"cannot combine {self.algorithm.value} with {other.algorithm.value}")
        length = self.length + other.length
        if length > _MAX_LENGTH:
            raise ValueError(f"combined length {length} exceeds 2**64 - 1")
        combine = _SPECS[self.algorithm].combine
        return CrcValue(self.algorithm, int(combine(self.value, other.value, other.length)), length)


def full_object(parts: Iterable[CrcValue], algorithm: Algorithm) -> CrcValue:
    """The FULL_OBJECT checksum of parts in order, combined from their values and lengths.

    No parts gives the CRC of no bytes (0), as for an empty object.
    """
    total = CrcValue(algorithm, 0, 0)
    for part in parts:
        total = total.then(part)
    return total


class Crc:
    """A running CRC, fed chunk by chunk as the bytes stream past.

    One small interface for every checksum the pipeline runs: ``update(chunk)``,
    ``digest() -> bytes``, ``b64() -> str``; ``result()`` also gives the length, for combining.
    """

    __slots__ = ("_length", "_update", "_value", "algorithm")

    def __init__(self, algorithm: Algorithm) -> None:
        self.algorithm = algorithm
        self._update = _SPECS[algorithm].update
        self._value = 0
        self._length = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        # awscrt takes any buffer; its stubs say bytes
        self._value = int(self._update(chunk, self._value))  # type: ignore[arg-type]
        self._length += len(chunk)

    def result(self) -> CrcValue:
        return CrcValue(self.algorithm, self._value, self._length)

    def digest(self) -> bytes:
        return self.result().digest()

    def b64(self) -> str:
        return self.result().b64()


def decode_b64(algorithm: Algorithm, text: str) -> int:
    """The CRC in an ``x-amz-checksum-*`` value S3 returned; DigestError if it is not one.

    A FULL_OBJECT value may come back as ``<b64>`` alone; a COMPOSITE one as ``<b64>-<parts>``,
    which is not a CRC of the object and is refused here.
    """
    raw = decode_base64(text, algorithm.header)
    if len(raw) != algorithm.width:
        raise DigestError(
            f"{algorithm.header} holds {len(raw)} bytes, a {algorithm.value} has {algorithm.width}"
        )
    return int.from_bytes(raw, "big")


class DigestError(ValueError):
    """A client's digest header cannot be read: the message says why, for a 400 answer."""


# RFC 9530 section 5 / the IANA "Hash Algorithms for HTTP Digest Fields" registry, mapped to
# hashlib names and digest sizes: the two "Active" algorithms, and the two "Deprecated" ones
# hashlib computes (md5, sha = SHA-1). A client that sends those believes it is protected, and
# checking costs only the hash of a file that declared it. The other deprecated ones (unixsum,
# unixcksum, adler, crc32c) and unknown keys are ignored beside one checked here (RFC 9530
# section 2 lets a recipient ignore them); a field of nothing but those is refused.
DIGEST_ALGORITHMS: Final[dict[str, tuple[str, int]]] = {
    "sha-256": ("sha256", hashlib.sha256().digest_size),
    "sha-512": ("sha512", hashlib.sha512().digest_size),
    "md5": ("md5", hashlib.md5().digest_size),
    "sha": ("sha1", hashlib.sha1().digest_size),
}

# Content-MD5 is the base64 of a 128-bit MD5 digest (RFC 1864 section 2).
_MD5_SIZE: Final = 16

# RFC 8941 section 3.1.2 (key), 3.3.4 (token), 3.3.5 (byte sequence) character sets.
_KEY_FIRST = re.compile(r"[a-z*]")
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_BASE64 = re.compile(r"[A-Za-z0-9+/=]*")


def parse_content_digest(field: str, header: str = "Content-Digest") -> dict[str, bytes]:
    """The digests in a ``Content-Digest`` (or ``Repr-Digest``: the same syntax, RFC 9530
    section 3) field that we can verify, by RFC 9530 name.

    ``sha-256=:<base64>:, sha-512=:<base64>:`` gives ``{"sha-256": <32 bytes>, "sha-512":
    <64 bytes>}``. Several field lines are joined with ``,`` first (RFC 9110 section 5.3).
    Unknown algorithms beside a known one are skipped but must still be well-formed.
    DigestError if the field is not a Structured Field Dictionary, a known algorithm's value
    is not a Byte Sequence of the right size, or the field declares nothing we can verify:
    it is empty, or names only algorithms we cannot (nothing would be checked, yet the client
    would believe it was). A known algorithm named twice is refused too: RFC 8941 (4.2.2)
    keeps the last value, so ``sha-256=:<wrong>:, sha-256=:<right>:`` would pass with the
    wrong one unchecked, and which one the client meant cannot be told.
    """
    parser = _SfDictionary(field, header)
    members = parser.parse()
    if not members:
        raise DigestError(
            f"{header} is empty; declare a digest like sha-256=:<base64>: (RFC 9530) "
            "or leave the header out"
        )
    for key in parser.repeated:
        if key in DIGEST_ALGORITHMS:
            raise DigestError(
                f"{header} names {key} twice, so one of them would go unchecked; "
                "declare each algorithm once"
            )
    found: dict[str, bytes] = {}
    for key, value in members.items():
        if key not in DIGEST_ALGORITHMS:
            continue
        if not isinstance(value, bytes):
            raise DigestError(f"{header} {key} must be a byte sequence like :<base64>:")
        size = DIGEST_ALGORITHMS[key][1]
        if len(value) != size:
            raise DigestError(f"{header} {key} is {len(value)} bytes, not {size}")
        found[key] = value
    if members and not found:
        raise DigestError(
            f"{header} names only {', '.join(members)}, which the proxy does not check; "
            f"declare one of {', '.join(DIGEST_ALGORITHMS)} (sha-256 costs nothing)"
        )
    return found


def parse_content_md5(field: str) -> bytes:
    """The 16-byte MD5 in a ``Content-MD5`` field (RFC 1864); DigestError if it is not one."""
    raw = decode_base64(field.strip(" \t"), "Content-MD5")
    if len(raw) != _MD5_SIZE:
        raise DigestError(f"Content-MD5 is {len(raw)} bytes, an MD5 digest has {_MD5_SIZE}")
    return raw


def decode_base64(text: str, what: str) -> bytes:
    """Strict base64 (RFC 4648 section 4 alphabet); padding may be left off (RFC 8941 4.2.7).

    The one reader of every digest a client sends in base64 (Content-Digest's byte sequences,
    Content-MD5, tus's Upload-Checksum), so all accept and refuse the same forms."""
    if not _BASE64.fullmatch(text) or "=" in text.rstrip("="):
        raise DigestError(f"{what} is not base64")
    bare = text.rstrip("=")
    try:
        return base64.b64decode(bare + "=" * (-len(bare) % 4), validate=True)
    except binascii.Error:
        raise DigestError(f"{what} is not base64") from None


_Bare = int | float | str | bytes | bool


class _SfDictionary:
    """RFC 8941 section 4.2.2: parse a Dictionary, keeping each member's bare item value.

    Parameters and inner lists are parsed (so a malformed one is an error) and dropped: no
    digest algorithm uses them. Strings, tokens, numbers and booleans are kept as Python
    values so the caller can say "not a byte sequence".
    """

    def __init__(self, text: str, header: str = "Content-Digest") -> None:
        self.text = text
        self.header = header
        self.pos = 0
        # Keys given more than once, in order: the Dictionary keeps only the last value
        # (RFC 8941 4.2.2), which a digest reader must not do silently.
        self.repeated: list[str] = []

    def fail(self, why: str) -> DigestError:
        return DigestError(
            f"{self.header} is malformed at character {self.pos + 1}: {why}"
            " (the form is sha-256=:<base64>:, RFC 9530)"
        )

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip(self, chars: str) -> None:
        while self.peek() and self.peek() in chars:
            self.pos += 1

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        found = pattern.match(self.text, self.pos)
        if not found:
            raise self.fail(f"expected {what}")
        self.pos = found.end()
        return found.group()

    def parse(self) -> dict[str, _Bare | None]:
        """RFC 8941 4.2 (leading/trailing SP) and 4.2.2 (members, OWS, commas)."""
        self.skip(" ")
        members: dict[str, _Bare | None] = {}
        if self.pos == len(self.text):
            return members  # an empty field is an empty dictionary (RFC 8941 4.2.2)
        while True:
            if not _KEY_FIRST.match(self.peek()):
                raise self.fail("expected a lowercase key")
            key = self.match(_KEY, "a key")
            value: _Bare | None = True  # a bare key is Boolean true (RFC 8941 4.2.2)
            if self.peek() == "=":
                self.pos += 1
                value = self.member_value()
            else:
                self.parameters()
            if key in members:
                self.repeated.append(key)
                del members[key]  # the last value, in the last place (RFC 8941 4.2.2)
            members[key] = value
            self.skip(" \t")
            if self.pos == len(self.text):
                return members
            if self.peek() != ",":
                raise self.fail("expected ',' between members")
            self.pos += 1
            self.skip(" \t")
            if self.pos == len(self.text):
                raise self.fail("a ',' ends the field")

    def member_value(self) -> _Bare | None:
        """An Item, or an Inner List (None: no algorithm's value is a list)."""
        if self.peek() == "(":
            self.pos += 1
            while True:
                self.skip(" ")
                if self.peek() == ")":
                    self.pos += 1
                    self.parameters()
                    return None
                self.bare_item()
                self.parameters()
                if self.peek() not in (" ", ")"):
                    raise self.fail("expected ' ' or ')' in an inner list")
        value = self.bare_item()
        self.parameters()
        return value

    def parameters(self) -> None:
        """RFC 8941 4.2.3.2: ``;key`` or ``;key=bare-item``, repeated."""
        while self.peek() == ";":
            self.pos += 1
            self.skip(" ")
            self.match(_KEY, "a parameter key")
            if self.peek() == "=":
                self.pos += 1
                self.bare_item()

    def bare_item(self) -> _Bare:
        """RFC 8941 4.2.3.1: integer/decimal, string, token, byte sequence, boolean."""
        first = self.peek()
        if first == ":":
            end = self.text.find(":", self.pos + 1)
            if end < 0:
                raise self.fail("a byte sequence has no closing ':'")
            try:
                raw = decode_base64(self.text[self.pos + 1 : end], "a byte sequence")
            except DigestError:
                raise self.fail("a byte sequence holds base64 only") from None
            self.pos = end + 1
            return raw
        if first == '"':
            return self.string()
        if first == "?":
            flag = self.text[self.pos + 1 : self.pos + 2]
            if flag not in ("0", "1"):
                raise self.fail("a boolean is ?0 or ?1")
            self.pos += 2
            return flag == "1"
        if first == "-" or first.isdigit():
            number = self.match(_NUMBER, "a number")
            return float(number) if "." in number else int(number)
        if _TOKEN.match(first):
            return self.match(_TOKEN, "a token")
        raise self.fail("expected a value")

    def string(self) -> str:
        """RFC 8941 4.2.5: printable ASCII in quotes, only ``\\"`` and ``\\\\`` escaped."""
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\":
                nxt = self.peek()
                if nxt not in ('"', "\\"):
                    raise self.fail('only \\" and \\\\ may be escaped in a string')
                out.append(nxt)
                self.pos += 1
            elif char == '"':
                return "".join(out)
            elif not " " <= char <= "~":
                raise self.fail("a string holds only printable ASCII")
            else:
                out.append(char)
        raise self.fail("a string has no closing quote")
