"""Pure: the tus 1.0.0 protocol's headers, read and written (https://tus.io/protocols/resumable-upload).

No I/O: the handlers in ``s3proxy.tus`` call these with header values and get numbers,
dicts or a ``ProxyError`` with the status the protocol names for that fault.

- ``Tus-Resumable`` must be ``1.0.0`` on every request but OPTIONS (412 otherwise,
  with ``Tus-Version`` in the answer).
- ``Upload-Offset``/``Upload-Length`` are non-negative decimal integers ("MUST be a
  non-negative integer"): no sign, no spaces, no exponent; anything else is a 400.
- ``Upload-Metadata`` is comma-separated ``key base64value`` pairs; keys are ASCII,
  unique, without spaces or commas; a key may stand alone (no value).
- ``Upload-Checksum`` is ``<algorithm> <base64 digest>`` (checksum extension); the
  algorithms here are the ones hashlib has and ``Tus-Checksum-Algorithm`` lists; the
  base64 is read as every client digest is (``checksums.decode_base64``: padding optional).
  Any other digest header on a request with a body is refused, never ignored.
- ``S3Proxy-Key`` (ours) names the stored object percent-encoded (``key_header``).
- A header of an extension not served (``UNSERVED``: concatenation, challenge, a checksum
  sent as a trailer) is refused on every request (400 UNSUPPORTED_EXTENSION), never
  ignored: ignored, each would change what is stored or who may continue it. Clients do
  not all read ``Tus-Extension`` first (tus-js-client's ``parallelUploads`` does not).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
from collections.abc import Iterable
from urllib.parse import quote

from s3proxy.checksums import DigestError, decode_base64
from s3proxy.digests import Declared, Digest, refuse_unchecked
from s3proxy.errors import (
    INVALID_DIGEST,
    INVALID_REQUEST,
    METHOD_NOT_ALLOWED,
    UNSUPPORTED_EXTENSION,
    UNSUPPORTED_VERSION,
    ProxyError,
)

VERSION = "1.0.0"
# On every answer under /tus/, errors included: the version, and not kept by caches (tus
# requires no-store on HEAD; a cached 404 or 423 would mislead too).
ANSWER_HEADERS = {"Tus-Resumable": VERSION, "Cache-Control": "no-store"}
# What this server supports, in the order OPTIONS lists them.
EXTENSIONS = (
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "termination",
    "expiration",
    "checksum",
)
CHECKSUM_ALGORITHMS = ("sha1", "sha256", "md5")
OFFSET_STREAM = "application/offset+octet-stream"
_DIGITS = re.compile(r"[0-9]{1,19}")  # 19 digits: below 2**63, as tusd's int64
_KEY = re.compile(r"[!-+\--~]+")  # printable ASCII without space and comma
MAX_METADATA = 4096  # bytes of Upload-Metadata accepted (a filename and a type need ~300)


def key_header(key: str) -> str:
    """An object key as a header value: its UTF-8 percent-encoded (RFC 3986 section 2.1),
    all but ``/`` and the unreserved characters, ``%`` itself as ``%25``. Header values
    are ASCII (RFC 9110 section 5.5): raw UTF-8 reaches a browser's XHR as Latin-1
    mojibake, and a literal ``%`` would be misread by the client's decodeURIComponent."""
    return quote(key, safe="/")


# The protocol's own headers: each names one value, so two of one are refused (400), as
# /upload refuses two Content-MD5, rather than the first silently winning.
SINGLE = (
    "Tus-Resumable",
    "Upload-Length",
    "Upload-Offset",
    "Upload-Checksum",
    "Upload-Metadata",
    "Upload-Defer-Length",
)
_SINGLE = {name.lower() for name in SINGLE}


def check_single(names: Iterable[str]) -> None:
    """400 if one of the tus headers appears twice among a request's header ``names``."""
    seen: set[str] = set()
    for name in names:
        low = name.lower()
        if low in _SINGLE and low in seen:
            raise ProxyError(INVALID_REQUEST, f"{name} appears more than once")
        seen.add(low)


# The request headers of tus extensions this server does not serve, with the extension
# (tus 1.0.0 "Concatenation"; "Challenge" of the protocol's next revision).
UNSERVED = {
    "upload-concat": "concatenation",  # partial uploads, concatenated by a final one
    "upload-secret": "challenge",  # only the secret's holder may continue the upload
    "upload-challenge": "challenge",
}
_HINTS = {
    "concatenation": "; send the file as one upload (tus-js-client: parallelUploads: 1)",
    "checksum-trailer": "; send Upload-Checksum as a header",
}


def check_extensions(headers: Iterable[tuple[str, str]]) -> None:
    """400 UNSUPPORTED_EXTENSION if a request's ``headers`` (name, value) rely on an
    extension this server does not announce: its header would otherwise be ignored."""
    for name, value in headers:
        low = name.lower()
        extension = UNSERVED.get(low)
        if extension is None and low == "trailer":
            # checksum-trailer: the digest would come after the body, where it is not read.
            named = {t.strip().lower() for t in value.split(",")}
            extension = "checksum-trailer" if "upload-checksum" in named else None
        if extension is not None:
            raise ProxyError(
                UNSUPPORTED_EXTENSION,
                f"{name}: the tus {extension} extension is not supported here "
                f"(OPTIONS lists the extensions in Tus-Extension){_HINTS.get(extension, '')}",
            )


def check_creation(offset: str | None, override: str | None) -> None:
    """What a creation's headers refuse beyond lengths and metadata: an ``Upload-Offset``
    other than 0 (its body is the file's start; 400), and ``X-HTTP-Method-Override``
    naming another method (tus: the server MUST use it as the method; 405 on this URL)."""
    if offset is not None and parse_count("Upload-Offset", offset) != 0:
        raise ProxyError(INVALID_REQUEST, "a creation's Upload-Offset must be 0 (or absent)")
    if override is not None and override.strip().upper() != "POST":
        raise ProxyError(
            METHOD_NOT_ALLOWED,
            f"X-HTTP-Method-Override: {override.strip()!r} on the creation URL; "
            "send PATCH, HEAD and DELETE to the upload URL",
        )


def check_version(value: str | None) -> None:
    """412 unless the client speaks tus 1.0.0."""
    if value != VERSION:
        raise ProxyError(
            UNSUPPORTED_VERSION,
            f"Tus-Resumable must be {VERSION}, got {value!r}" if value else "Tus-Resumable missing",
        )


def parse_count(name: str, value: str | None) -> int:
    """A non-negative integer header; 400 INVALID_REQUEST if missing or malformed."""
    if value is None:
        raise ProxyError(INVALID_REQUEST, f"{name} is required")
    if not _DIGITS.fullmatch(value):
        raise ProxyError(INVALID_REQUEST, f"{name} must be a non-negative integer")
    return int(value)


def parse_metadata(value: str | None) -> dict[str, str]:
    """``Upload-Metadata`` as text; values that are not UTF-8 are refused (400), as are
    repeated keys and bad base64."""
    if not value:
        return {}
    if len(value) > MAX_METADATA:
        raise ProxyError(INVALID_REQUEST, f"Upload-Metadata over {MAX_METADATA} bytes")
    out: dict[str, str] = {}
    for pair in value.split(","):
        fields = pair.strip().split(" ")
        if len(fields) > 2 or not _KEY.fullmatch(fields[0]):
            raise ProxyError(INVALID_REQUEST, "Upload-Metadata: expected 'key base64value' pairs")
        key = fields[0]
        if key in out:
            raise ProxyError(INVALID_REQUEST, f"Upload-Metadata: key {key!r} repeated")
        raw = b""
        if len(fields) == 2:
            try:
                raw = base64.b64decode(fields[1], validate=True)
            except (binascii.Error, ValueError):
                raise ProxyError(
                    INVALID_REQUEST, f"Upload-Metadata: the value of {key!r} is not base64"
                ) from None
        try:
            out[key] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyError(
                INVALID_REQUEST, f"Upload-Metadata: the value of {key!r} is not UTF-8"
            ) from None
    return out


def parse_checksum(value: str | None) -> Declared | None:
    """``Upload-Checksum`` as the digest to check the PATCH's bytes against; None if absent.
    An algorithm not supported or a digest of the wrong size is a 400 (tus: "Bad Request")."""
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    algorithm = algorithm.lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise ProxyError(
            INVALID_DIGEST,
            f"Upload-Checksum algorithm {algorithm!r} is not supported; "
            f"use one of {', '.join(CHECKSUM_ALGORITHMS)}",
        )
    try:
        digest = decode_base64(encoded.strip(), "Upload-Checksum: the digest")
    except DigestError as exc:
        raise ProxyError(INVALID_DIGEST, str(exc)) from None
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise ProxyError(INVALID_DIGEST, f"Upload-Checksum: not a {algorithm} digest")
    return Declared((Digest(algorithm, digest, f"Upload-Checksum {algorithm}"),))


def refuse_other_digests(headers: Iterable[str]) -> None:
    """400 INVALID_DIGEST for a digest header on a request with a body other than
    ``Upload-Checksum`` (Content-Digest, Repr-Digest, Content-MD5, Digest, x-amz-checksum-*):
    the proxy checks only that one here, and a client sending another would believe its
    bytes were checked."""
    try:
        refuse_unchecked(headers, frozenset(), "send the PATCH's digest in Upload-Checksum")
    except DigestError as exc:
        raise ProxyError(INVALID_DIGEST, str(exc)) from None


def http_date(unix: float) -> str:
    """``Upload-Expires``'s format (RFC 9110 IMF-fixdate)."""
    return email.utils.formatdate(unix, usegmt=True)


def options_headers(max_size: int) -> dict[str, str]:
    """What OPTIONS announces."""
    return {
        "Tus-Resumable": VERSION,
        "Tus-Version": VERSION,
        "Tus-Extension": ",".join(EXTENSIONS),
        "Tus-Max-Size": str(max_size),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
    }
