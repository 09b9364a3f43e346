"""Pure: a tus upload URL is a signed capability that carries everything but the progress.

Any instance must serve any request of any upload, with no local state and no sticky
sessions, so the URL itself says which upload it is and what it may become: the S3 key
(already chosen by the key policy at creation), the file's length, the expiry, the part
plan (parts must keep their sizes whatever settings a later instance runs with), the
file name and declared type (for sniffing and Content-Disposition), and the limits of the
credential that created it (an upload token's types). HEAD, PATCH and DELETE then need
only the URL: upload tokens are short-lived, tus clients resume hours later. The
progress (offset, parts, staged bytes) lives in S3 (``s3proxy.tus_state``).

Format, like ``s3proxy.tokens`` (base64url without padding)::

    /tus/ b64url(json) "." b64url(HMAC-SHA256(url_key, "tus1." + b64url(json)))

``url_key`` is derived from a secret every instance shares (``url_keys``): each
configured upload-token secret, else a random key kept in the bucket itself
(``tus_keys``, which does the I/O; not the S3 secret key: instances with their own
credentials, an instance role's rotating ones, do not share it), so a URL made on one
instance verifies on every other, and after a restart. The derivation separates the
uses: an upload token never verifies as a URL, nor the other way round. A URL is a
bearer capability for one upload until it expires: whoever holds it may append to, read
the progress of, or terminate that upload only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from s3proxy.parts import PartPlan

RESERVED_PREFIX = ".s3proxy/tus/"  # every state object of every tus upload is under it
MAX_URL_TOKEN = 6000  # characters: a key (1024 bytes) and a filename fit several times
_CONTEXT = b"s3proxy tus upload url v1"
_SIGNED = "tus1."
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class UrlError(Exception):
    """An upload URL that names no upload: tampered, foreign, or expired."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


@dataclass(frozen=True)
class TusUpload:
    """One resumable upload as its URL describes it."""

    id: str  # random; names the upload's state prefix
    key: str
    length: int | None  # None: deferred (Upload-Defer-Length), declared by a later PATCH
    expires: int  # unix seconds
    part_size: int
    growing: bool
    filename: str
    declared_type: str | None = None
    types: tuple[str, ...] = ()  # an upload token's allowlist ((): no narrower than the proxy's)
    limit: int = 0  # the most bytes the file may have (a deferred length is checked on it)

    @property
    def plan(self) -> PartPlan:
        return PartPlan(self.part_size, self.growing)

    @property
    def prefix(self) -> str:
        """Where the upload's state object and staged bytes live."""
        return f"{RESERVED_PREFIX}{self.id}/"


def new_id(expires: int, key: str) -> str:
    """``<expires>-<key hash>-<random>``: the sweep reads the expiry and which key's
    multipart upload is live from a listing alone, without reading each state."""
    return f"{expires:011d}-{key_hash(key)}-{secrets.token_hex(8)}"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def parse_id(upload_id: str) -> tuple[int, str] | None:
    """(expires, key hash) of a state prefix's id, None if it is not one of ours."""
    parts = upload_id.split("-")
    if len(parts) != 3 or not parts[0].isdigit() or len(parts[1]) != 32:
        return None
    return int(parts[0]), parts[1]


def url_keys(secrets_: Sequence[bytes]) -> tuple[bytes, ...]:
    """The URL signing keys from the shared secrets (the first signs, all verify)."""
    return tuple(hmac.new(s, _CONTEXT, hashlib.sha256).digest() for s in secrets_ if s)


def issue(upload: TusUpload, key: bytes) -> str:
    data = asdict(upload)
    data["types"] = list(upload.types)
    body = _b64(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())
    return body + "." + _b64(_mac(key, body))


def verify(token: str, keys: Sequence[bytes], now: float) -> TusUpload:
    """The upload a URL token names; UrlError if no key signed it or it expired."""
    if not keys:
        raise UrlError("no key to verify upload URLs")
    if len(token) > MAX_URL_TOKEN or token.count(".") != 1:
        raise UrlError("malformed upload URL")
    body, sig_text = token.split(".")
    if not _B64URL.fullmatch(body) or not _B64URL.fullmatch(sig_text):
        raise UrlError("malformed upload URL")
    sig = _unb64(sig_text)
    if not any([hmac.compare_digest(_mac(k, body), sig) for k in keys]):
        raise UrlError("unknown upload URL")
    try:
        data: dict[str, Any] = json.loads(_unb64(body))
        upload = TusUpload(**{**data, "types": tuple(data["types"])})
    except (ValueError, TypeError, KeyError):
        raise UrlError("malformed upload URL") from None
    if now > upload.expires:
        raise UrlError("the upload expired", expired=True)
    return upload


def _mac(key: bytes, body: str) -> bytes:
    return hmac.new(key, (_SIGNED + body).encode("ascii"), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise UrlError("malformed upload URL") from None
