"""Pure: signed upload tokens, so a browser can upload without holding a secret.

The app's backend, which knows who the user is, issues a short-lived token that
fixes what one upload request may do; the proxy only checks the signature and
the limits. No I/O and no state here: the token carries everything.

The scheme (version 1), to implement in any language::

    token   = b64url(payload_json) "." b64url(HMAC-SHA256(secret, b64url(payload_json)))
    b64url  = base64url (RFC 4648 section 5) without "=" padding
    payload = a UTF-8 JSON object with exactly these members:
      v          1 (integer)                                    required
      exp        expiry, integer unix seconds                   required
      prefix     key prefix every stored key starts with        required
      nonce      random string (makes every token unique)       required
      types      allowed content types: "image/png", "image/*"; [] = any   required
      max_size   most bytes of file data in the request         optional integer >= 1
      max_files  most files in the request                      optional integer >= 1
      sub        free-form subject, only for logs               optional string, no controls

Rules a verifier applies, in this order:

1. At most 4096 characters, exactly one ".", both sides non-empty, canonical b64url (no padding, no
   stray bits in the last character: re-encoding the decoded bytes must give the
   same text, otherwise a flipped character could decode to the same signature).
2. The MAC is computed over the first segment's ASCII text as sent, and compared
   in constant time against the MAC under each configured secret (several
   secrets allow key rotation: verify with new and old, issue with the new).
   Nothing in the payload is parsed before the signature holds.
3. ``v`` must be 1; a member the verifier does not know, or a repeated member,
   rejects the token, so a restriction added later can never be silently
   ignored by an old verifier (new restrictions bump ``v``).
4. Integers are JSON integers (not floats, not booleans). Optional members
   are either absent or null.
5. ``now > exp + leeway`` is expired (leeway absorbs clock skew between the
   issuing backend and the proxy; 30 s by default).
6. ``prefix`` is a clean relative key prefix: non-empty, ends with "/", does
   not start with "/", no empty, "." or ".." segment, no backslash, no control
   or format characters (C0, DEL, C1, bidi overrides, lone surrogates), and
   under S3's 1024-byte key limit in UTF-8.
7. ``types`` entries look like ``type/subtype`` or ``type/*`` (ASCII, compared
   lowercase).

A token is a bearer credential until it expires: keep ``ttl`` short (minutes),
send it over TLS only, and use secrets of at least 32 random bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets as _random
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from s3proxy.keys import MAX_KEY_BYTES, RESERVED_NAMESPACE

VERSION = 1
DEFAULT_LEEWAY = 30  # seconds of clock skew tolerated between issuer and proxy
MAX_TOKEN_LENGTH = 4096  # characters; refused before any decoding (a header or form field)
_MAC_BYTES = 32  # HMAC-SHA256

_REQUIRED = frozenset({"v", "exp", "prefix", "nonce", "types"})
_OPTIONAL = frozenset({"max_size", "max_files", "sub"})
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
# The allow-type pattern from settings.py, ASCII only so every implementation agrees.
_TYPE = re.compile(r"[\w.+-]+/([\w.+-]+|\*)", re.ASCII)
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})  # controls, format (bidi, zero-width), surrogates


class TokenError(Exception):
    """A token that grants nothing; ``reason`` is short and safe to show the client."""

    def __init__(self, reason: str, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired

    def __repr__(self) -> str:
        return f"TokenError({self.reason!r}, expired={self.expired})"


@dataclass(frozen=True)
class UploadGrant:
    """What a verified token allows one upload request to do."""

    prefix: str
    max_size: int | None
    types: tuple[str, ...]
    max_files: int | None
    subject: str | None
    expires: int


def issue(
    secret: bytes | str,
    *,
    prefix: str,
    ttl: int,
    max_size: int | None = None,
    types: Sequence[str] = (),
    max_files: int | None = None,
    subject: str | None = None,
    now: float | None = None,
) -> str:
    """A token for one upload request under ``prefix``, valid for ``ttl`` seconds.

    ``secret`` is one of the proxy's S3PROXY_TOKEN_SECRET values, as text (what a backend
    holds) or its UTF-8 bytes (what the proxy signs with). Raises ValueError for
    arguments no verifier would accept, or that give a token every endpoint refuses
    (a prefix under the proxy's own ``.s3proxy/``), so a bad token is caught where it
    is made rather than as a 401 or 400 in the browser.
    """
    if isinstance(secret, str):
        secret = secret.encode()
    if not secret:
        raise ValueError("the secret must not be empty")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    problem = prefix_problem(prefix)
    if not problem and prefix.startswith(RESERVED_NAMESPACE):
        problem = f"keys under {RESERVED_NAMESPACE} are the proxy's own; no upload may use them"
    if problem:
        raise ValueError(f"prefix {prefix!r}: {problem}")
    for name, limit in (("max_size", max_size), ("max_files", max_files)):
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {limit!r}")
    if isinstance(types, str):
        raise ValueError("types must be a sequence of content types, not one string")
    for t in types:
        if not _is_type(t):
            raise ValueError(f"not a content type like image/png or image/*: {t!r}")
    if subject is not None and (not isinstance(subject, str) or _has_bad_chars(subject)):
        raise ValueError("subject must be a string without control characters, or None")

    payload: dict[str, Any] = {
        "v": VERSION,
        "exp": int(time.time() if now is None else now) + ttl,
        "prefix": prefix,
        "nonce": _b64encode(_random.token_bytes(12)),
        "types": [t.lower() for t in types],
    }
    if max_size is not None:
        payload["max_size"] = max_size
    if max_files is not None:
        payload["max_files"] = max_files
    if subject is not None:
        payload["sub"] = subject
    body = _b64encode(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    return body + "." + _b64encode(_mac(secret, body))


def verify(
    token: str,
    secrets: Sequence[bytes],
    now: float | None = None,
    leeway: int = DEFAULT_LEEWAY,
) -> UploadGrant:
    """The grant a token carries, if any of ``secrets`` signed it and it has not expired."""
    if not secrets or not all(secrets):
        raise ValueError("at least one non-empty secret is needed to verify tokens")
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise TokenError("malformed token")
    body, sig_text = token.split(".")
    raw = _b64decode(body)
    sig = _b64decode(sig_text)
    if len(sig) != _MAC_BYTES:
        raise TokenError("malformed token")
    # Check every secret, not just until one matches, so timing says nothing
    # about which secret (or how many) the proxy holds.
    matches = [hmac.compare_digest(_mac(s, body), sig) for s in secrets]
    if not any(matches):
        raise TokenError("bad signature")

    payload = _parse_payload(raw)
    if payload.get("v") != VERSION or not _is_int(payload.get("v")):
        raise TokenError("unknown token version")
    unknown = payload.keys() - _REQUIRED - _OPTIONAL
    if unknown:
        raise TokenError(f"unknown field: {sorted(unknown)[0]}")
    missing = _REQUIRED - payload.keys()
    if missing:
        raise TokenError(f"missing field: {sorted(missing)[0]}")

    exp = payload["exp"]
    if not _is_int(exp):
        raise TokenError("bad field: exp")
    prefix = payload["prefix"]
    if not isinstance(prefix, str) or prefix_problem(prefix):
        raise TokenError("bad field: prefix")
    if not isinstance(payload["nonce"], str) or not payload["nonce"]:
        raise TokenError("bad field: nonce")
    types = payload["types"]
    if not isinstance(types, list) or not all(_is_type(t) for t in types):
        raise TokenError("bad field: types")
    max_size = _optional_positive(payload, "max_size")
    max_files = _optional_positive(payload, "max_files")
    subject = payload.get("sub")
    if subject is not None and (not isinstance(subject, str) or _has_bad_chars(subject)):
        raise TokenError("bad field: sub")

    # Expiry last: an expired token with a broken field is reported as broken,
    # and "expired" is only said of tokens that were otherwise valid.
    if (time.time() if now is None else now) > exp + leeway:
        raise TokenError("token expired", expired=True)
    return UploadGrant(
        prefix=prefix,
        max_size=max_size,
        types=tuple(t.lower() for t in types),
        max_files=max_files,
        subject=subject,
        expires=exp,
    )


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` is not a clean relative key prefix, or None if it is one."""
    if not prefix:
        return "must not be empty"
    if not prefix.endswith("/"):
        return "must end with /"
    if prefix.startswith("/"):
        return "must not start with /"
    if "\\" in prefix:
        return "must not contain a backslash"
    if _has_bad_chars(prefix):
        return "must not contain control or format characters"
    if any(seg in ("", ".", "..") for seg in prefix[:-1].split("/")):
        return "must not contain empty, . or .. segments"
    if len(prefix.encode()) >= MAX_KEY_BYTES:
        return f"must be shorter than S3's {MAX_KEY_BYTES}-byte key limit"
    return None


def _has_bad_chars(text: str) -> bool:
    return any(unicodedata.category(ch) in _BAD_CATEGORIES for ch in text)


def _mac(secret: bytes, body: str) -> bytes:
    return hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict, canonical base64url without padding; TokenError otherwise."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenError("malformed token")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed token") from None
    if _b64encode(data) != text:  # unused low bits set in the last character
        raise TokenError("malformed token")
    return data


def _parse_payload(raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise TokenError("malformed payload: repeated field")
        return obj

    def no_constants(name: str) -> Any:
        raise TokenError(f"malformed payload: {name}")

    try:
        payload = json.loads(
            raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TokenError("malformed payload") from None
    if not isinstance(payload, dict):
        raise TokenError("malformed payload")
    return payload


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_type(value: object) -> bool:
    return isinstance(value, str) and _TYPE.fullmatch(value) is not None


def _optional_positive(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise TokenError(f"bad field: {name}")
    return int(value)
