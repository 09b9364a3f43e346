"""Who may upload: static API keys, signed upload tokens, or nobody-but-loopback.

Checked from the request's headers and query alone, before any body byte is read
(also on the ``Expect: 100-continue`` path), so a rejected client never streams a
byte. Keys are compared in constant time and never logged. A credential is
whatever bytes the client sent: one that is not UTF-8, or not a token's base64url,
matches nothing and is refused 401 like any other wrong one.

- No keys and no token secrets configured: anyone who can reach the proxy may
  upload, which settings only allow on a loopback address (or with
  ``--insecure-no-auth``).
- ``Authorization: Bearer <api key>``: full access within the proxy's limits.
- An upload token (``Authorization: Bearer <token>``, ``X-Upload-Token: <token>`` or
  ``?token=<token>``): access narrowed by the token's grant (key prefix, size,
  types, file count), see ``tokens.py``.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import hdrs, web

from s3proxy.errors import (
    AUTH_REQUIRED,
    INVALID_CREDENTIALS,
    TOKEN_EXPIRED,
    ProxyError,
)
from s3proxy.tokens import TokenError, UploadGrant, verify

TOKEN_HEADER = "X-Upload-Token"
TOKEN_QUERY = "token"


@dataclass(frozen=True)
class Principal:
    """Who is uploading; ``grant`` narrows what a token holder may do."""

    kind: str  # "anonymous" | "api_key" | "token"
    grant: UploadGrant | None = None

    @property
    def subject(self) -> str:
        if self.grant is not None and self.grant.subject:
            return self.grant.subject
        return self.kind


@dataclass(frozen=True)
class Authenticator:
    api_keys: tuple[bytes, ...] = ()
    token_secrets: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.token_secrets)

    def authenticate(self, request: web.Request) -> Principal:
        """The request's principal, or ProxyError 401 before the body is touched."""
        if not self.enabled:
            return Principal("anonymous")
        credential = _credential(request)
        if credential is None:
            raise ProxyError(AUTH_REQUIRED, "send an API key or upload token as a Bearer token")
        if self._is_api_key(credential):
            return Principal("api_key")
        if self.token_secrets and "." in credential:
            try:
                return Principal("token", verify(credential, self.token_secrets))
            except TokenError as exc:
                kind = TOKEN_EXPIRED if exc.expired else INVALID_CREDENTIALS
                raise ProxyError(kind, f"upload token refused: {exc.reason}") from None
        raise ProxyError(INVALID_CREDENTIALS, "the API key or token is not valid")

    def _is_api_key(self, credential: str) -> bool:
        # The bytes as sent: aiohttp decodes header values as UTF-8 with
        # surrogateescape, so a non-UTF-8 byte arrives as a lone surrogate, which a
        # plain .encode() refuses (a 500); escaped back, it simply matches no key.
        given = credential.encode("utf-8", "surrogateescape")
        # Compare with every key, always: the time taken says nothing about which matched.
        matches = [hmac.compare_digest(given, key) for key in self.api_keys]
        return any(matches)


def _credential(request: web.Request) -> str | None:
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    token = request.headers.get(TOKEN_HEADER) or request.query.get(TOKEN_QUERY)
    return token.strip() if token else None


def load_keys(values: Sequence[str]) -> tuple[bytes, ...]:
    return tuple(v.strip().encode() for v in values if v.strip())
