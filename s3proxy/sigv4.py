"""SigV4 for the lean S3 calls (``s3proxy.s3_parts``): the headers botocore's
``S3SigV4Auth`` adds, byte for byte, for a small fraction of its CPU.

Hand-written because botocore's signer is the largest cost left in a lean call that is
not the bytes': an ``AWSRequest`` whose headers are an ``email.message``
(``HTTPHeaders``), the canonical headers built twice (once more for the Authorization
header), four HMACs to derive the signing key on every call. py-spy put
``PartSender._signed`` at ~5% of the proxy's CPU in a 1 GiB upload. Measured alone
(``python -m bench.sign_cost``, ``time.process_time`` over 2,000 signatures, best of 5,
on the 2-core dev machine): botocore's ~120-135 µs per signature, this one ~17-20 µs.
The signing key is cached per (secret key, date, region, service) (``SigningKeys``), so
a request costs its canonical request, one sha256 and one HMAC.

Only the simple request is signed here, the one the lean calls send: a method, a URL
whose path and query are already encoded as botocore would encode them (``s3_parts``
builds them so), a few ASCII headers, ``UNSIGNED-PAYLOAD``. ``sign`` returns None for
anything else (a header botocore would treat specially, a non-ASCII or control
character anywhere), and the caller signs with botocore: correctness first.
``tests/test_sigv4.py`` checks every header against botocore's on generated requests.

What botocore does, read from ``botocore/auth.py`` (``SigV4Auth``, ``S3SigV4Auth``):
- the path is signed as it is in the URL (S3 does not normalize it);
- the query string is split on ``&`` and ``=``, sorted as (name, value) pairs and
  joined again, without re-encoding;
- every header but a short list (``SIGNED_HEADERS_BLACKLIST``) is signed, its name
  lowercased and its value trimmed with runs of whitespace made one space; ``host``
  comes from the URL (lowercase, without userinfo, the port only when it is not the
  scheme's default, an IPv6 literal in brackets);
- ``X-Amz-Date``, ``X-Amz-Security-Token`` (when the credentials have a token) and
  ``X-Amz-Content-SHA256`` are added, in that order, before signing, and
  ``Authorization`` last.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import urlsplit

from botocore.compat import IPV6_ADDRZ_RE

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
# botocore.auth.SIGNED_HEADERS_BLACKLIST: sent, never signed.
UNSIGNED_HEADERS = frozenset(
    {
        "baggage",
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "traceparent",
        "tracestate",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
    }
)
# Headers botocore's signer replaces or reads specially (a Date header turns into an
# RFC 1123 date instead of X-Amz-Date; a Host header is signed instead of the URL's):
# a request carrying one is botocore's to sign.
SIGNER_HEADERS = frozenset(
    {"authorization", "date", "host", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
)
DEFAULT_PORTS = {"http": 80, "https": 443}


def _plain(text: str) -> bool:
    """ASCII and printable: botocore's whitespace trimming and header storage are then
    plain string operations (no unicode spaces, no folded lines, no encoded words)."""
    return text.isascii() and text.isprintable()


def derive_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """SigV4's signing key (kSigning) for one day, region and service."""
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


class SigningKeys:
    """Signing keys by (secret key, date, region, service): derived once a day, not
    four HMACs per request. Holds a few entries (one client has one secret at a time;
    refreshed credentials bring a new one)."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._keys: dict[tuple[str, str, str, str], bytes] = {}
        self.derived = 0  # keys derived so far (for tests)

    def get(self, secret_key: str, date: str, region: str, service: str) -> bytes:
        entry = (secret_key, date, region, service)
        key = self._keys.get(entry)
        if key is None:
            if len(self._keys) >= self._size:
                self._keys.clear()
            key = self._keys[entry] = derive_key(secret_key, date, region, service)
            self.derived += 1
        return key


@functools.lru_cache(maxsize=64)
def host_header(scheme: str, netloc: str) -> str:
    """The host botocore signs for a URL's scheme and netloc (``auth._host_from_url``)."""
    parts = urlsplit(f"{scheme}://{netloc}/")
    host = parts.hostname or ""
    if IPV6_ADDRZ_RE.match(f"[{host}]"):
        host = f"[{host}]"
    port = parts.port
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return host


def _timestamp(now: datetime) -> str:
    """``now`` as SigV4's ``%Y%m%dT%H%M%SZ`` (strftime costs several times this)."""
    return (
        f"{now.year:04d}{now.month:02d}{now.day:02d}"
        f"T{now.hour:02d}{now.minute:02d}{now.second:02d}Z"
    )


def canonical_query(query: str) -> str:
    """botocore's canonical query string from a URL's (already encoded) query."""
    if not query:
        return ""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&"))
    return "&".join([f"{name}={value}" for name, value in pairs])


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    *,
    access_key: str,
    secret_key: str,
    token: str | None,
    region: str,
    now: datetime,
    keys: SigningKeys,
    service: str = "s3",
) -> dict[str, str] | None:
    """The headers to send: ``headers`` and the signature's, as ``S3SigV4Auth`` with
    UNSIGNED-PAYLOAD would make them at ``now`` (UTC). None where botocore must sign.

    Pure (the key cache aside)."""
    if not (_plain(url) and _plain(access_key) and _plain(region)) or (token and not _plain(token)):
        return None
    timestamp = _timestamp(now)
    added = {"X-Amz-Date": timestamp}
    if token:
        added["X-Amz-Security-Token"] = token
    added["X-Amz-Content-SHA256"] = UNSIGNED_PAYLOAD
    signed: dict[str, str] = {}
    for name, value in headers.items():
        lname = name.lower()
        if (
            lname in SIGNER_HEADERS
            or lname in signed
            or not (_plain(name) and _plain(value))
            or not name
            or name != name.strip()
        ):
            return None
        if lname not in UNSIGNED_HEADERS:
            signed[lname] = " ".join(value.split())
    for name, value in added.items():
        signed[name.lower()] = " ".join(value.split())
    parts = urlsplit(url)
    signed["host"] = host_header(parts.scheme, parts.netloc)
    names = sorted(signed)
    signed_names = ";".join(names)
    canonical = "\n".join(
        (
            method.upper(),
            parts.path,
            canonical_query(parts.query),
            "".join(f"{n}:{signed[n]}\n" for n in names),
            signed_names,
            UNSIGNED_PAYLOAD,
        )
    )
    date = timestamp[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"
    key = keys.get(secret_key, date, region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {
        **headers,
        **added,
        "Authorization": (
            f"{ALGORITHM} Credential={access_key}/{scope}, "
            f"SignedHeaders={signed_names}, Signature={signature}"
        ),
    }
