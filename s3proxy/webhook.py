"""Tell the application what was stored: a signed JSON POST, retried with backoff.

What a receiver sees (one delivery, possibly over several attempts)::

    POST <url>
    Content-Type: application/json
    X-Request-ID: <the proxy request's id>
    X-S3Proxy-Delivery: <uuid4, the same on every attempt: an idempotency key>
    X-S3Proxy-Attempt: <1, 2, ...>
    X-S3Proxy-Timestamp: <unix seconds when this attempt was signed>
    X-S3Proxy-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

The signature covers the timestamp so a captured request cannot be replayed
later: receivers should recompute it over the raw body bytes, compare in constant
time, and reject timestamps more than a few minutes from their clock (``verify``
does all three). Each attempt is signed afresh, so a late retry still passes that
check; receivers deduplicate on ``X-S3Proxy-Delivery``. Without a secret the two
signature headers are left out.

A 2xx answer ends the delivery. Connection errors, timeouts, 408, 429 and 5xx are
retried after ``backoff`` seconds, doubling each time, with jitter, capped at
``MAX_DELAY`` (a ``Retry-After`` on the answer replaces the computed delay, under
the same cap). Any other answer (3xx, 4xx) means the receiver will not take this
event, so retrying is pointless: ``WebhookError`` at once.

Events (the body is UTF-8 JSON; text that is not Unicode, such as a lone surrogate
from an undecodable filename byte, is sent as U+FFFD, so encoding never fails)::

    {"event": "upload.completed", "request_id", "time", "files": [...], "fields": {...}}
    {"event": "upload.rolled_back", "request_id", "time", "keys": [...], "reason": "..."}

``upload.rolled_back`` follows an ``upload.completed`` delivery that the proxy then
undid: the receiver may have got the event even though its answer never came back
in time (or the request failed or the proxy shut down while delivering), and the
files it names have been deleted. It has the same ``request_id``, lists the
deleted keys, and is sent once, best effort (a receiver that is down misses it;
``verify`` and the headers work as for any event).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from s3proxy.http_dates import parse_http_date
from s3proxy.s3_parts import read_capped

log = logging.getLogger("s3proxy.webhook")

MAX_DELAY = 30.0  # seconds: the longest wait between attempts, Retry-After included
SIGNATURE_PREFIX = "sha256="
DEFAULT_TOLERANCE = 300  # seconds a receiver should accept between timestamp and its clock
# The most of a receiver's answer body read. Only the status counts, so the body is read
# just to reuse the connection; an answer longer than this (a proxy's error page, a
# misbehaving receiver: one of 1.5 GB took the proxy from 98 MB to 3 GB) is not read on,
# its connection is closed instead. 64 KiB holds any acknowledgement; aiohttp's reader
# buffers at most twice that before it pauses the socket, so a delivery holds ~200 KiB.
ANSWER_LIMIT = 64 * 1024
# Request Timeout and Too Many Requests say "try again"; 5xx is the receiver's trouble.
_RETRY_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class WebhookConfig:
    url: str  # where to POST each event
    secret: bytes | None  # HMAC key for X-S3Proxy-Signature; None sends no signature
    timeout: float = 10.0  # seconds one attempt may take, connect to the end of the answer
    max_attempts: int = 5  # attempts per event, the first included
    backoff: float = 0.5  # seconds before the first retry; doubles, with jitter, to MAX_DELAY

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL must be http(s): {self.url!r}")
        if self.timeout <= 0:
            raise ValueError("webhook timeout must be positive")
        if self.max_attempts < 1:
            raise ValueError("webhook max_attempts must be at least 1")
        if self.backoff < 0:
            raise ValueError("webhook backoff must not be negative")


class WebhookError(Exception):
    """The event was not delivered; ``reason`` says why, in a few words."""

    def __init__(self, reason: str, attempts: int, status: int | None = None) -> None:
        super().__init__(f"webhook not delivered after {attempts} attempt(s): {reason}")
        self.reason = reason
        self.attempts = attempts
        self.status = status  # the last HTTP status, if there was an answer


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=`` + hex HMAC-SHA256 over ``b"<timestamp>." + body``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def verify(
    secret: bytes,
    timestamp: str,
    signature: str,
    body: bytes,
    now: float | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> bool:
    """Check a delivery's headers against its raw body, as a receiver should.

    False for a malformed or stale (or far-future) timestamp, or a signature that
    does not match; the comparison is constant-time.
    """
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        return False
    ts = int(timestamp)
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    expected = sign(secret, ts, body).encode()
    return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The event as UTF-8 JSON; cannot fail for any mapping with string keys.

    Lone surrogates (what ``surrogateescape`` makes of bytes that are not UTF-8) become
    U+FFFD, and values JSON has no type for become their ``str``.
    """
    text = json.dumps(dict(event), separators=(",", ":"), ensure_ascii=False, default=str)
    # UTF-16 with surrogatepass pairs up valid surrogate pairs and keeps lone ones,
    # which the strict decode then replaces; the rest of the text is unchanged.
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text.encode("utf-8")


def retry_delay(backoff: float, attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based).

    Exponential with "equal jitter": between half and all of ``backoff * 2**(n-1)``,
    so retries from many proxies spread out yet never come back at once.
    """
    ceiling = min(MAX_DELAY, backoff * 2.0 ** (attempt - 1))
    return ceiling / 2 + ceiling / 2 * rand()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (RFC 9110 §10.2.3: delta-seconds or an HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 12:
        return float(value)
    when = parse_http_date(value)
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True)
class _Failure:
    reason: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None


class Webhook:
    """Delivers events to one URL over the app's shared client session."""

    def __init__(self, config: WebhookConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session

    async def deliver(
        self, event: Mapping[str, Any], request_id: str, max_attempts: int | None = None
    ) -> None:
        """POST ``event`` as JSON until a 2xx answer; raise WebhookError when giving up
        (after ``max_attempts``, by default the configured number)."""
        body = encode_event(event)
        delivery = str(uuid.uuid4())
        cfg = self.config
        attempts = cfg.max_attempts if max_attempts is None else max(1, max_attempts)
        for attempt in range(1, attempts + 1):
            failure = await self._attempt(body, request_id, delivery, attempt)
            if failure is None:
                log.info(
                    "webhook.delivered request_id=%s delivery=%s attempts=%d",
                    request_id,
                    delivery,
                    attempt,
                )
                return
            if not failure.retryable or attempt == attempts:
                raise WebhookError(failure.reason, attempt, failure.status)
            if failure.retry_after is not None:
                delay = min(MAX_DELAY, failure.retry_after)
            else:
                delay = retry_delay(cfg.backoff, attempt)
            log.warning(
                "webhook.retry request_id=%s delivery=%s attempt=%d reason=%r delay=%.2f",
                request_id,
                delivery,
                attempt,
                failure.reason,
                delay,
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(
        self, body: bytes, request_id: str, delivery: str, attempt: int
    ) -> _Failure | None:
        headers = {
            "Content-Type": "application/json",
            "X-Request-ID": request_id,
            "X-S3Proxy-Delivery": delivery,
            "X-S3Proxy-Attempt": str(attempt),
        }
        if self.config.secret is not None:
            # Signed per attempt, so a retry minutes later is not stale to the receiver.
            timestamp = int(time.time())
            headers["X-S3Proxy-Timestamp"] = str(timestamp)
            headers["X-S3Proxy-Signature"] = sign(self.config.secret, timestamp, body)
        try:
            async with self.session.post(
                self.config.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                # A redirected POST may turn into a GET elsewhere; a moved receiver
                # is a configuration error to report, not to follow.
                allow_redirects=False,
            ) as resp:
                # Read a short answer (inside the timeout) so the connection can be
                # reused; drop the connection rather than read a long one to its end.
                await read_capped(resp.content, ANSWER_LIMIT)
                if not resp.content.at_eof():
                    resp.close()
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except aiohttp.InvalidURL as exc:
            return _Failure(f"invalid URL ({exc})", retryable=False)
        except TimeoutError:
            return _Failure(f"timed out after {self.config.timeout:g}s", retryable=True)
        except aiohttp.ClientError as exc:
            return _Failure(f"cannot reach the receiver ({type(exc).__name__})", retryable=True)
        if 200 <= status < 300:
            return None
        retryable = status in _RETRY_STATUS or status >= 500
        return _Failure(f"HTTP {status}", retryable, status, retry_after if retryable else None)
