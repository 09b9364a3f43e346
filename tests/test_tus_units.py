"""The pure parts of tus: headers (tus_protocol), the signed upload URL (tus_url), the
state document and its lock rule (tus_state), the URL key object (tus_keys). Tables, no
event loop."""

from __future__ import annotations

import base64
import hashlib
import urllib.parse

import pytest

from s3proxy import tus_keys, tus_protocol, tus_url
from s3proxy.checksums import parse_content_md5
from s3proxy.digests import Declared, Digest
from s3proxy.errors import ProxyError
from s3proxy.parts import PartPlan
from s3proxy.tus_state import Lock, Part, Segment, TusState, part_length, part_start
from s3proxy.tus_url import TusUpload, UrlError

MiB = 1024**2

KEY = tus_url.url_keys([b"k" * 32])[0]
OTHER = tus_url.url_keys([b"o" * 32])[0]
UPLOAD = TusUpload(
    id=tus_url.new_id(2_000_000_000, "uploads/x/deck.pdf"),
    key="uploads/x/deck.pdf",
    length=123,
    expires=2_000_000_000,
    part_size=5 * 1024**2,
    growing=False,
    filename="deck.pdf",
    declared_type="application/pdf",
    types=("application/pdf",),
)


@pytest.mark.parametrize(
    ("value", "code"),
    [(None, "UNSUPPORTED_VERSION"), ("0.2.2", "UNSUPPORTED_VERSION"), ("1.0.0", None)],
)
def test_version(value: str | None, code: str | None) -> None:
    if code is None:
        tus_protocol.check_version(value)
        return
    with pytest.raises(ProxyError) as err:
        tus_protocol.check_version(value)
    assert err.value.kind.code == code and err.value.kind.status == 412


@pytest.mark.parametrize("value", [None, "", "-1", "+1", "1.5", "1e3", " 1", "0x10", "9" * 20])
def test_counts_must_be_plain_non_negative_integers(value: str | None) -> None:
    with pytest.raises(ProxyError) as err:
        tus_protocol.parse_count("Upload-Offset", value)
    assert err.value.kind.status == 400


def test_counts() -> None:
    assert tus_protocol.parse_count("Upload-Length", "0") == 0
    assert tus_protocol.parse_count("Upload-Length", "5368709120") == 5 * 1024**3


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_metadata() -> None:
    header = (
        f"filename {b64('Präsentation 2026.pdf')},filetype {b64('application/pdf')},is_confidential"
    )
    assert tus_protocol.parse_metadata(header) == {
        "filename": "Präsentation 2026.pdf",
        "filetype": "application/pdf",
        "is_confidential": "",
    }
    assert tus_protocol.parse_metadata(None) == {}


@pytest.mark.parametrize(
    "header",
    [
        "a b c",  # three fields
        f"a {b64('x')},a {b64('y')}",  # repeated key
        "a !!!",  # not base64
        "a /w==",  # not UTF-8 (0xff)
        "k\u00e9y eA==",  # a non-ASCII key
    ],
)
def test_bad_metadata_is_a_400(header: str) -> None:
    with pytest.raises(ProxyError) as err:
        tus_protocol.parse_metadata(header)
    assert err.value.kind.status == 400


def test_checksum() -> None:
    digest = hashlib.sha1(b"abc").digest()
    declared = tus_protocol.parse_checksum(f"sha1 {base64.b64encode(digest).decode()}")
    assert declared == Declared((Digest("sha1", digest, "Upload-Checksum sha1"),))
    assert tus_protocol.parse_checksum(None) is None
    for bad in ("crc32 AAAAAA==", "sha256 AAAA", "sha1 not-base64", "sha1"):
        with pytest.raises(ProxyError) as err:
            tus_protocol.parse_checksum(bad)
        assert err.value.kind.code == "INVALID_DIGEST", bad


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5"])
def test_checksum_names_its_own_header(algorithm: str) -> None:
    """A 460 names what the client sent (probe: sha256 said "Content-Digest sha-256")."""
    digest = hashlib.new(algorithm, b"abc").digest()
    declared = tus_protocol.parse_checksum(f"{algorithm} {base64.b64encode(digest).decode()}")
    assert declared is not None
    [found] = declared.digests
    assert found.header == f"Upload-Checksum {algorithm}"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5"])
def test_checksum_base64_is_read_as_content_md5_is(algorithm: str) -> None:
    """Unpadded base64 is taken by Content-MD5 and so by Upload-Checksum (one reader)."""
    digest = hashlib.new(algorithm, b"abc").digest()
    bare = base64.b64encode(digest).decode().rstrip("=")
    assert bare != base64.b64encode(digest).decode()  # each of these digests is padded
    assert parse_content_md5(base64.b64encode(hashlib.md5(b"abc").digest()).decode().rstrip("="))
    declared = tus_protocol.parse_checksum(f"{algorithm} {bare}")
    assert declared is not None and declared.digests[0].value == digest
    for bad in (f"{algorithm} {bare}=!", f"{algorithm} {bare.replace('/', '_')}_-"):
        with pytest.raises(ProxyError, match="not base64"):
            tus_protocol.parse_checksum(bad)


@pytest.mark.parametrize(
    "name", ["Content-Digest", "Repr-Digest", "Content-MD5", "Digest", "x-amz-checksum-sha256"]
)
def test_other_digest_headers_are_refused(name: str) -> None:
    with pytest.raises(ProxyError) as err:
        tus_protocol.refuse_other_digests(["Upload-Offset", name])
    assert err.value.kind.code == "INVALID_DIGEST"
    assert f"{name} is not checked" in err.value.message and "Upload-Checksum" in err.value.message
    tus_protocol.refuse_other_digests(["Upload-Offset", "Upload-Checksum", "Content-Type"])


@pytest.mark.parametrize(
    ("key", "header"),
    [
        ("u/a-b_c.d~e/f.txt", "u/a-b_c.d~e/f.txt"),  # unreserved and "/" as they are
        ("u/日本.txt", "u/%E6%97%A5%E6%9C%AC.txt"),
        ("u/50%.txt", "u/50%25.txt"),
        ("u/a%41b.txt", "u/a%2541b.txt"),  # not read back as "aAb.txt"
        ("u/a b+c;d,e'(f)?#.txt", "u/a%20b%2Bc%3Bd%2Ce%27%28f%29%3F%23.txt"),
    ],
)
def test_the_key_header_is_ascii_percent_encoded(key: str, header: str) -> None:
    value = tus_protocol.key_header(key)
    assert value == header and value.isascii()
    assert urllib.parse.unquote(value) == key


def test_url_round_trip_and_tampering() -> None:
    token = tus_url.issue(UPLOAD, KEY)
    assert tus_url.verify(token, [OTHER, KEY], now=1_900_000_000) == UPLOAD
    with pytest.raises(UrlError):
        tus_url.verify(token, [OTHER], now=1_900_000_000)  # another deployment's key
    body, sig = token.split(".")
    forged = base64.urlsafe_b64encode(
        base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).replace(b"123", b"999")
    )
    with pytest.raises(UrlError):
        tus_url.verify(forged.decode().rstrip("=") + "." + sig, [KEY], now=1_900_000_000)
    for junk in ("", ".", "a.b", "a.b.c", "\u00e9." + sig, "x" * 7000):
        with pytest.raises(UrlError):
            tus_url.verify(junk, [KEY], now=1_900_000_000)
    with pytest.raises(UrlError) as expired:
        tus_url.verify(token, [KEY], now=2_000_000_001)
    assert expired.value.expired


def test_url_keys_are_not_token_secrets() -> None:
    """A URL is never signed with a token secret itself: an upload token's MAC cannot
    stand in for a URL's."""
    assert tus_url.url_keys([b"k" * 32]) != (b"k" * 32,)


def test_ids_carry_the_expiry_and_the_key_hash() -> None:
    parsed = tus_url.parse_id(UPLOAD.id)
    assert parsed == (2_000_000_000, tus_url.key_hash(UPLOAD.key))
    assert tus_url.parse_id("probe-123") is None


def test_the_url_key_object_is_no_upload_id() -> None:
    """The sweeps walk the reserved prefix by upload id: the key object is none."""
    name = tus_keys.KEY_OBJECT.removeprefix(tus_url.RESERVED_PREFIX)
    assert tus_keys.KEY_OBJECT.startswith(tus_url.RESERVED_PREFIX) and "/" not in name
    assert tus_url.parse_id(name) is None


def test_a_new_key_object_holds_one_random_key() -> None:
    first, second = tus_keys.new_key_object(), tus_keys.new_key_object()
    keys = tus_keys.decode(first)
    assert len(keys) == 1 and len(keys[0]) == tus_keys.KEY_BYTES
    assert keys != tus_keys.decode(second)
    assert tus_keys.decode(tus_keys.encode([b"a" * 32, b"b" * 40])) == (b"a" * 32, b"b" * 40)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"keys": ["' + base64.urlsafe_b64encode(b"k" * 32) + b'"]}',  # no format
        b'{"format": 2, "keys": ["' + base64.urlsafe_b64encode(b"k" * 32) + b'"]}',
        b'{"format": 1}',
        b'{"format": 1, "keys": []}',
        b'{"format": 1, "keys": ["' + base64.urlsafe_b64encode(b"k" * 31) + b'"]}',  # short
        b'{"format": 1, "keys": ["not*base64"]}',
    ],
)
def test_an_unreadable_key_object_is_refused(raw: bytes) -> None:
    with pytest.raises(tus_keys.KeyObjectError):
        tus_keys.decode(raw)
    assert UPLOAD.prefix == f".s3proxy/tus/{UPLOAD.id}/"


def test_state_round_trip_and_lock_rule() -> None:
    state = TusState(
        offset=5 * 1024**2 + 10,
        key="uploads/x",
        upload_id="u-1",
        content_type="application/pdf",
        checksum="CRC64NVME",
        parts=[Part(1, '"e1"', 5 * 1024**2, "AAAAAAAAAAA=")],
        segments=[Segment(".s3proxy/tus/x/seg/1", 5 * 1024**2, 10)],
        lock=Lock("me", 100.0),
    )
    again = TusState.from_bytes(state.to_bytes())
    assert again == state
    assert again.staged == 10
    assert again.crcs()[1].length == 5 * 1024**2
    assert again.locked(now=100.0, skew=0) and again.locked(now=105.0, skew=5)
    assert not again.locked(now=105.1, skew=5)
    assert not TusState().locked(now=0, skew=0)
    with pytest.raises(ProxyError):
        TusState.from_bytes(b"{}")


@pytest.mark.parametrize(
    ("plan", "number", "length", "expected"),
    [
        (PartPlan(5 * MiB, False), 1, 7 * MiB, 5 * MiB),
        (PartPlan(5 * MiB, False), 2, 7 * MiB, 2 * MiB),  # the short last part: its bytes
        (PartPlan(5 * MiB, False), 2, 10 * MiB, 5 * MiB),
        (PartPlan(5 * MiB, False), 2, None, 5 * MiB),  # deferred: parts are whole
        (PartPlan(5 * MiB, True), 1001, 5 * MiB * 1000 + 3, 3),  # past the first tier
        (PartPlan(5 * MiB, True), 1002, 5 * MiB * 1000 + 10 * MiB + 1, 1),
    ],
)
def test_a_part_counts_the_bytes_it_holds(
    plan: PartPlan, number: int, length: int | None, expected: int
) -> None:
    assert part_length(plan, number, length) == expected


def test_part_start_follows_the_growing_plan() -> None:
    plan = PartPlan(5 * MiB, True)
    for n in (1, 2, 999, 1000, 1001, 2500, 10_000):
        assert part_start(plan, n) == sum(plan.size(k) for k in range(1, n))
