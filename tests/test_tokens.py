"""Signed upload tokens: round trip, every way a token can be wrong, key rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from s3proxy.tokens import MAX_TOKEN_LENGTH, TokenError, UploadGrant, issue, verify

SECRET = b"k" * 32
OLD_SECRET = b"o" * 32
NOW = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(payload: Any, secret: bytes = SECRET) -> str:
    """A correctly signed token around any payload, to test field checks past the MAC."""
    body = b64(json.dumps(payload).encode() if not isinstance(payload, bytes) else payload)
    return body + "." + b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())


def good_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "v": 1,
        "exp": int(NOW) + 60,
        "prefix": "users/42/",
        "nonce": "abc",
        "types": [],
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not _DROP}


_DROP = object()


def reason(token: str, **kwargs: Any) -> str:
    kwargs.setdefault("now", NOW)
    with pytest.raises(TokenError) as info:
        verify(token, [SECRET], **kwargs)
    return info.value.reason


def test_round_trip() -> None:
    token = issue(
        SECRET,
        prefix="users/42/",
        ttl=300,
        max_size=10_000_000,
        types=["image/*", "Application/PDF"],
        max_files=3,
        subject="user:42 «ü»",
        now=NOW,
    )
    assert verify(token, [SECRET], now=NOW) == UploadGrant(
        prefix="users/42/",
        max_size=10_000_000,
        types=("image/*", "application/pdf"),
        max_files=3,
        subject="user:42 «ü»",
        expires=int(NOW) + 300,
    )


def test_minimal_round_trip_and_payload_shape() -> None:
    token = issue(SECRET, prefix="p/", ttl=60, now=NOW)
    grant = verify(token, [SECRET], now=NOW)
    assert grant == UploadGrant("p/", None, (), None, None, int(NOW) + 60)
    body = token.split(".")[0]
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert payload.keys() == {"v", "exp", "prefix", "nonce", "types"}
    assert "=" not in token


def test_tokens_are_unique() -> None:
    tokens = {issue(SECRET, prefix="p/", ttl=60, now=NOW) for _ in range(100)}
    assert len(tokens) == 100


def test_forge_helper_matches_the_scheme() -> None:
    """The test's own implementation of the documented scheme is accepted."""
    assert verify(forge(good_payload()), [SECRET], now=NOW).prefix == "users/42/"


def test_explicit_nulls_for_optional_fields() -> None:
    token = forge(good_payload(max_size=None, max_files=None, sub=None))
    assert verify(token, [SECRET], now=NOW).max_size is None


def test_key_rotation() -> None:
    old = issue(OLD_SECRET, prefix="p/", ttl=60, now=NOW)
    new = issue(SECRET, prefix="p/", ttl=60, now=NOW)
    for token in (old, new):
        assert verify(token, [SECRET, OLD_SECRET], now=NOW).prefix == "p/"
    assert reason(old) == "bad signature"  # once the old secret is retired


def _tamper_payload(token: str) -> str:
    body, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["prefix"] = "admin/"
    return b64(json.dumps(payload).encode()) + "." + sig


def _tamper_sig(token: str) -> str:
    body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "="))
    raw[0] ^= 1
    return body + "." + b64(bytes(raw))


@pytest.mark.parametrize(
    ("mangle", "expected"),
    [
        (_tamper_payload, "bad signature"),
        (_tamper_sig, "bad signature"),
        (lambda t: t[:-1], "malformed token"),  # truncated signature
        (lambda t: t[:-4], "malformed token"),
        (lambda t: t.split(".")[0], "malformed token"),  # no signature
        (lambda t: t.split(".")[0] + ".", "malformed token"),
        (lambda t: "." + t.split(".")[1], "malformed token"),
        (lambda t: t + ".x", "malformed token"),
        (lambda t: t + "=", "malformed token"),  # padding is not part of the scheme
        (lambda t: t.replace(".", ". "), "malformed token"),
        (lambda t: t + "\n", "malformed token"),
        (lambda t: "", "malformed token"),
        (lambda t: ".", "malformed token"),
        (lambda t: "garbage", "malformed token"),
        (lambda t: "Bearer " + t, "malformed token"),
        (lambda t: "é.é", "malformed token"),
        (lambda t: "a" * (MAX_TOKEN_LENGTH + 1), "malformed token"),
        (lambda t: issue(b"wrong" * 8, prefix="p/", ttl=60, now=NOW), "bad signature"),
        (lambda t: forge(good_payload(), secret=b"wrong"), "bad signature"),
    ],
)
def test_broken_tokens(mangle: Any, expected: str) -> None:
    token = issue(SECRET, prefix="p/", ttl=60, now=NOW)
    assert reason(mangle(token)) == expected


def test_every_single_character_flip_fails() -> None:
    """Property: no one-character change of a valid token is still valid.

    Catches non-canonical base64 (the last character of a 32-byte MAC has two
    unused bits, so a lenient decoder accepts 4 spellings of the same MAC).
    """
    token = issue(SECRET, prefix="users/42/", ttl=60, max_size=5, types=["image/*"], now=NOW)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00é"
    for i, original in enumerate(token):
        for ch in alphabet:
            if ch == original:
                continue
            flipped = token[:i] + ch + token[i + 1 :]
            with pytest.raises(TokenError):
                verify(flipped, [SECRET, OLD_SECRET], now=NOW)


def test_expiry_and_leeway() -> None:
    token = issue(SECRET, prefix="p/", ttl=60, now=NOW)
    exp = int(NOW) + 60
    assert verify(token, [SECRET], now=exp).expires == exp
    assert verify(token, [SECRET], now=exp + 30).expires == exp  # within the default leeway
    with pytest.raises(TokenError) as info:
        verify(token, [SECRET], now=exp + 30.5)
    assert info.value.expired and info.value.reason == "token expired"
    assert verify(token, [SECRET], now=exp + 100, leeway=100).expires == exp
    with pytest.raises(TokenError) as info:
        verify(token, [SECRET], now=exp + 1, leeway=0)
    assert info.value.expired


def test_other_errors_are_not_expired() -> None:
    with pytest.raises(TokenError) as info:
        verify("garbage", [SECRET])
    assert not info.value.expired


def test_expired_token_with_broken_field_is_reported_as_broken() -> None:
    token = forge(good_payload(exp=0, max_size=-1))
    with pytest.raises(TokenError) as info:
        verify(token, [SECRET], now=NOW)
    assert not info.value.expired and info.value.reason == "bad field: max_size"


def test_default_now_is_the_clock() -> None:
    token = issue(SECRET, prefix="p/", ttl=60)
    assert verify(token, [SECRET]).prefix == "p/"
    assert reason(forge(good_payload(exp=1)), now=None) == "token expired"


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "/",
        "users",  # no trailing slash
        "/users/",
        "users//",
        "a//b/",
        "../",
        "users/../admin/",
        "users/..",
        "./users/",
        "users/./",
        "users\\42/",
        "users/\x00/",
        "users/\n/",
        "users/\x7f/",
        "users/\x85/",  # C1 control (NEL)
        "users/\u202e/",  # right-to-left override
        "users/\u200b/",  # zero-width space
        "users/\ud800/",  # lone surrogate
        "a" * 1023 + "/",  # at S3's key limit leaves no room for a file name
        42,
        None,
        ["users/"],
    ],
)
def test_bad_prefix(prefix: Any) -> None:
    assert reason(forge(good_payload(prefix=prefix))) == "bad field: prefix"
    if isinstance(prefix, str):
        with pytest.raises(ValueError, match="prefix"):
            issue(SECRET, prefix=prefix, ttl=60, now=NOW)


@pytest.mark.parametrize(
    "prefix", ["users/", "users/42/", "a.b/c..d/", "..x/", "ü/日本/", "uploads/2026/03/"]
)
def test_good_prefix(prefix: str) -> None:
    token = issue(SECRET, prefix=prefix, ttl=60, now=NOW)
    assert verify(token, [SECRET], now=NOW).prefix == prefix


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"v": 2}, "unknown token version"),
        ({"v": "1"}, "unknown token version"),
        ({"v": 1.0}, "unknown token version"),
        ({"v": True}, "unknown token version"),
        ({"v": _DROP}, "unknown token version"),
        ({"exp": "1800000060"}, "bad field: exp"),
        ({"exp": 1800000060.0}, "bad field: exp"),
        ({"exp": True}, "bad field: exp"),
        ({"exp": None}, "bad field: exp"),
        ({"exp": _DROP}, "missing field: exp"),
        ({"prefix": _DROP}, "missing field: prefix"),
        ({"nonce": _DROP}, "missing field: nonce"),
        ({"nonce": ""}, "bad field: nonce"),
        ({"nonce": 7}, "bad field: nonce"),
        ({"types": _DROP}, "missing field: types"),
        ({"types": None}, "bad field: types"),
        ({"types": "image/png"}, "bad field: types"),
        ({"types": [1]}, "bad field: types"),
        ({"types": ["image"]}, "bad field: types"),
        ({"types": ["*/*"]}, "bad field: types"),
        ({"types": ["image/[pj]ng"]}, "bad field: types"),
        ({"types": ["image/png\n"]}, "bad field: types"),
        ({"max_size": 0}, "bad field: max_size"),
        ({"max_size": -1}, "bad field: max_size"),
        ({"max_size": 1.5}, "bad field: max_size"),
        ({"max_size": "10"}, "bad field: max_size"),
        ({"max_size": False}, "bad field: max_size"),
        ({"max_files": 0}, "bad field: max_files"),
        ({"max_files": [1]}, "bad field: max_files"),
        ({"sub": 42}, "bad field: sub"),
        ({"sub": "a\nforged.log line=1"}, "bad field: sub"),
        ({"admin": True}, "unknown field: admin"),
    ],
)
def test_field_errors(changes: dict[str, Any], expected: str) -> None:
    assert reason(forge(good_payload(**changes))) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"[]", "malformed payload"),
        (b"null", "malformed payload"),
        (b'"v"', "malformed payload"),
        (b"{", "malformed payload"),
        (b"\xff\xfe", "malformed payload"),
        (b'{"v": NaN}', "malformed payload: NaN"),
        (b'{"v": 1, "v": 1}', "malformed payload: repeated field"),
        (b'{"exp": 1e999}', "unknown token version"),
        (b"[" * 100_000, "malformed token"),  # too long before anything is parsed
        (b"[" * 1200 + b"]" * 1200, "malformed payload"),  # deep nesting
    ],
)
def test_malformed_payloads(raw: bytes, expected: str) -> None:
    assert reason(forge(raw)) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": 0},
        {"ttl": -5},
        {"ttl": 1.5},
        {"max_size": 0},
        {"max_files": -1},
        {"types": "image/png"},
        {"types": ["image"]},
        {"subject": "two\nlines"},
    ],
)
def test_issue_refuses_what_verify_would_refuse(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"prefix": "p/", "ttl": 60, **kwargs}
    with pytest.raises(ValueError):
        issue(SECRET, **args)


def test_secrets_must_be_configured() -> None:
    token = issue(SECRET, prefix="p/", ttl=60)
    with pytest.raises(ValueError):
        verify(token, [])
    with pytest.raises(ValueError):
        verify(token, [SECRET, b""])
    with pytest.raises(ValueError):
        issue(b"", prefix="p/", ttl=60)


def test_issue_takes_the_secret_as_the_environment_holds_it() -> None:
    """Regression (config probe): README's `tokens.issue(secret, ...)` with the str a
    backend has from S3PROXY_TOKEN_SECRET raised TypeError (bytes only)."""
    token = issue(SECRET.decode(), prefix="users/42/", ttl=60, now=NOW)
    assert verify(token, [SECRET], now=NOW).prefix == "users/42/"
    assert verify(issue("é" * 16, prefix="p/", ttl=60, now=NOW), ["é".encode() * 16], now=NOW)


@pytest.mark.parametrize("prefix", [".s3proxy/", ".s3proxy/tus/", ".s3proxy/x/y/"])
def test_issue_refuses_a_prefix_no_endpoint_would_take(prefix: str) -> None:
    """Regression (config probe): `s3proxy token --prefix .s3proxy/` exited 0 with a
    token every endpoint then refused (400: the proxy's own namespace)."""
    with pytest.raises(ValueError, match="proxy's own"):
        issue(SECRET, prefix=prefix, ttl=60)
    assert issue(SECRET, prefix=".s3proxy-not/", ttl=60)  # only the namespace itself
