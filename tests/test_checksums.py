"""Pure tests of s3proxy.checksums: CRC check values, S3's wire encoding, combining part CRCs
into a full-object CRC, and the Content-Digest / Content-MD5 parsers.

The CRCs are checked against an independent bitwise implementation written here from the
catalogued parameters, and awscrt's combine against a GF(2) one (zlib's x^n mod P method),
so a mistake in either library or in our use of it shows up as a disagreement.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import random
import re

import pytest
from botocore.httpchecksum import CrtCrc32cChecksum, CrtCrc64NvmeChecksum

from s3proxy.checksums import (
    CHECKSUM_MODES,
    Algorithm,
    Crc,
    CrcValue,
    DigestError,
    decode_b64,
    full_object,
    parse_content_digest,
    parse_content_md5,
    resolve_mode,
)

# Reflected polynomials and widths from the CRC catalogue (reveng): CRC-64/NVME is poly
# 0xad93d23594c93659 (reflected 0x9a6c9329ac4bc9b5), CRC-32C (iSCSI, RFC 3720) is poly
# 0x1edc6f41 (reflected 0x82f63b78); both init and xorout all ones, refin/refout true.
REFERENCE = {
    Algorithm.CRC64NVME: (0x9A6C9329AC4BC9B5, 64),
    Algorithm.CRC32C: (0x82F63B78, 32),
}
# The catalogue's check values: the CRC of b"123456789".
CHECK = {Algorithm.CRC64NVME: 0xAE8B14860A799888, Algorithm.CRC32C: 0xE3069283}


def reference_crc(algorithm: Algorithm, data: bytes) -> int:
    """Bit by bit, straight from the definition: slow, obviously right."""
    poly, width = REFERENCE[algorithm]
    mask = (1 << width) - 1
    crc = mask
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
    return crc ^ mask


def _multmodp(algorithm: Algorithm, a: int, b: int) -> int:
    """a * b mod P in the reflected bit order (zlib crc32.c multmodp)."""
    poly, width = REFERENCE[algorithm]
    m = 1 << (width - 1)
    p = 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1


def reference_combine(algorithm: Algorithm, crc1: int, crc2: int, len2: int) -> int:
    """crc(A + B) = crc(A) * x^(8 len(B)) mod P xor crc(B) (zlib crc32_combine)."""
    _, width = REFERENCE[algorithm]
    power = 1 << (width - 2)  # x^1, reflected
    factor = 1 << (width - 1)  # x^0, reflected
    n = 8 * len2
    while n:
        if n & 1:
            factor = _multmodp(algorithm, power, factor)
        power = _multmodp(algorithm, power, power)
        n >>= 1
    return _multmodp(algorithm, factor, crc1) ^ crc2


ALGORITHMS = list(Algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_check_value_of_123456789(algorithm: Algorithm) -> None:
    crc = Crc(algorithm)
    crc.update(b"123456789")
    assert crc.result() == CrcValue(algorithm, CHECK[algorithm], 9)
    assert reference_crc(algorithm, b"123456789") == CHECK[algorithm]


@pytest.mark.parametrize(
    ("algorithm", "data", "b64"),
    [
        (Algorithm.CRC64NVME, b"", "AAAAAAAAAAA="),
        (Algorithm.CRC64NVME, b"123456789", "rosUhgp5mIg="),
        (Algorithm.CRC32C, b"", "AAAAAA=="),
        (Algorithm.CRC32C, b"123456789", "4waSgw=="),
    ],
)
def test_wire_encoding_is_big_endian_base64(algorithm: Algorithm, data: bytes, b64: str) -> None:
    crc = Crc(algorithm)
    crc.update(data)
    assert crc.b64() == b64
    assert crc.digest() == base64.b64decode(b64)
    assert len(crc.digest()) == algorithm.width
    assert decode_b64(algorithm, b64) == crc.result().value


@pytest.mark.parametrize(
    ("algorithm", "botocore_cls"),
    [(Algorithm.CRC64NVME, CrtCrc64NvmeChecksum), (Algorithm.CRC32C, CrtCrc32cChecksum)],
)
def test_same_header_value_as_botocore(algorithm: Algorithm, botocore_cls: type) -> None:
    """What botocore would send in x-amz-checksum-* for the same bytes."""
    data = random.Random(1).randbytes(300_001)
    ours = Crc(algorithm)
    ours.update(data)
    theirs = botocore_cls()
    theirs.update(data)
    assert ours.b64() == theirs.b64digest()


def test_names_s3_uses() -> None:
    assert Algorithm.CRC64NVME.header == "x-amz-checksum-crc64nvme"
    assert Algorithm.CRC64NVME.param == "ChecksumCRC64NVME"
    assert Algorithm.CRC32C.header == "x-amz-checksum-crc32c"
    assert Algorithm.CRC32C.param == "ChecksumCRC32C"
    assert Algorithm.CRC64NVME.value == "CRC64NVME"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("seed", range(5))
def test_streaming_matches_reference_for_any_chunking(algorithm: Algorithm, seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(0, 3000))
    crc = Crc(algorithm)
    pos = 0
    while pos < len(data):
        step = rng.randrange(0, 700)  # empty chunks too
        crc.update(data[pos : pos + step])
        pos += step
    assert crc.result() == CrcValue(algorithm, reference_crc(algorithm, data), len(data))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_update_takes_any_bytes_like(algorithm: Algorithm) -> None:
    """aiohttp hands over bytes; a pipeline slicing a buffer may hand over memoryviews."""
    crc = Crc(algorithm)
    # Crc.update is typed ``bytes``; what it takes, this test shows (type ignores until then)
    crc.update(memoryview(b"1234"))
    crc.update(bytearray(b"56789"))
    assert crc.result().value == CHECK[algorithm]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("seed", range(10))
def test_full_object_from_random_splits_equals_whole(algorithm: Algorithm, seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(0, 200_000))
    cuts = sorted(rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(0, 8)))
    bounds = [0, *cuts, len(data)]
    parts = []
    for start, end in itertools.pairwise(bounds):
        crc = Crc(algorithm)
        crc.update(data[start:end])
        parts.append(crc.result())
    whole = Crc(algorithm)
    whole.update(data)
    assert full_object(parts, algorithm) == whole.result()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_full_object_of_no_parts_is_the_empty_crc(algorithm: Algorithm) -> None:
    assert full_object([], algorithm) == Crc(algorithm).result() == CrcValue(algorithm, 0, 0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "len2",
    [0, 1, 7, 8 * 2**20, 5 * 2**30, 5 * 2**30 + 3, 10_000 * 5 * 2**30, 2**64 - 1],
)
def test_combine_matches_gf2_reference_for_lengths_too_long_to_hash(
    algorithm: Algorithm, len2: int
) -> None:
    """Parts up to 5 GiB, objects to 48.8 TiB (S3 multipart limits): no test can hash those,
    so the combine is checked against the independent x^n mod P computation."""
    rng = random.Random(len2)
    _, width = REFERENCE[algorithm]
    crc1, crc2 = rng.getrandbits(width), rng.getrandbits(width)
    if len2 == 0:
        crc2 = 0  # the only CRC of no bytes (awscrt then ignores crc2, zlib xors it in)
    combined = CrcValue(algorithm, crc1, 0).then(CrcValue(algorithm, crc2, len2))
    assert combined == CrcValue(algorithm, reference_combine(algorithm, crc1, crc2, len2), len2)


def test_gf2_reference_agrees_with_data() -> None:
    """The reference combine itself, against CRCs of real bytes."""
    rng = random.Random(7)
    for algorithm in ALGORITHMS:
        a, b = rng.randbytes(123), rng.randbytes(456)
        got = reference_combine(
            algorithm, reference_crc(algorithm, a), reference_crc(algorithm, b), len(b)
        )
        assert got == reference_crc(algorithm, a + b)


def test_combine_refuses_mixed_algorithms_and_overlong_objects() -> None:
    with pytest.raises(ValueError, match="cannot combine"):
        CrcValue(Algorithm.CRC64NVME, 1, 1).then(CrcValue(Algorithm.CRC32C, 1, 1))
    with pytest.raises(ValueError, match="exceeds"):
        CrcValue(Algorithm.CRC64NVME, 1, 2).then(CrcValue(Algorithm.CRC64NVME, 1, 2**64 - 1))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("auto", Algorithm.CRC64NVME),
        ("crc64nvme", Algorithm.CRC64NVME),
        ("CRC64NVME", Algorithm.CRC64NVME),
        ("crc32c", Algorithm.CRC32C),
        (" off ", None),
        ("off", None),
    ],
)
def test_resolve_mode(mode: str, expected: Algorithm | None) -> None:
    assert resolve_mode(mode) is expected


@pytest.mark.parametrize("mode", ["", "crc32", "sha256", "none", "crc64"])
def test_resolve_mode_refuses_others(mode: str) -> None:
    with pytest.raises(ValueError, match="auto, crc64nvme, crc32c, off"):
        resolve_mode(mode)
    assert mode.lower() not in CHECKSUM_MODES


@pytest.mark.parametrize(
    ("algorithm", "text", "why"),
    [
        (Algorithm.CRC64NVME, "4waSgw==", "holds 4 bytes"),  # a CRC32C's value
        (Algorithm.CRC32C, "rosUhgp5mIg=", "holds 8 bytes"),
        (Algorithm.CRC64NVME, "rosUhgp5mIg=-3", "not base64"),  # a COMPOSITE value
        (Algorithm.CRC64NVME, "", "holds 0 bytes"),
        (Algorithm.CRC32C, "4wa Sgw==", "not base64"),
    ],
)
def test_decode_b64_refuses_what_is_not_a_crc(algorithm: Algorithm, text: str, why: str) -> None:
    with pytest.raises(DigestError, match=why):
        decode_b64(algorithm, text)


# --- Content-Digest (RFC 9530) -------------------------------------------------------------

BODY = b'{"hello": "world"}'
SHA256 = hashlib.sha256(BODY).digest()
SHA512 = hashlib.sha512(BODY).digest()
# RFC 9530 section 2's example value for this body.
SHA256_B64 = "X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="
SHA512_B64 = base64.b64encode(SHA512).decode()
MD5_B64 = base64.b64encode(hashlib.md5(BODY).digest()).decode()
MD5 = hashlib.md5(BODY).digest()


def test_rfc9530_example_value() -> None:
    assert base64.b64decode(SHA256_B64) == SHA256


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (f"sha-256=:{SHA256_B64}:", {"sha-256": SHA256}),
        (f"sha-512=:{SHA512_B64}:", {"sha-512": SHA512}),
        (f"sha-256=:{SHA256_B64}:, sha-512=:{SHA512_B64}:", {"sha-256": SHA256, "sha-512": SHA512}),
        (f"sha-512=:{SHA512_B64}:,sha-256=:{SHA256_B64}:", {"sha-256": SHA256, "sha-512": SHA512}),
        (
            f"  sha-256=:{SHA256_B64}:\t,\tsha-512=:{SHA512_B64}:  ",
            {"sha-256": SHA256, "sha-512": SHA512},
        ),
        # padding may be left off (RFC 8941 4.2.7)
        (f"sha-256=:{SHA256_B64.rstrip('=')}:", {"sha-256": SHA256}),
        # the deprecated md5 and sha are read (hashlib has them; a client sending one
        # believes it is checked); others and unknown keys beside them are skipped (RFC 9530
        # section 2)
        (f"md5=:{MD5_B64}:, sha-256=:{SHA256_B64}:", {"md5": MD5, "sha-256": SHA256}),
        (f"unixsum=30637, sha-256=:{SHA256_B64}:", {"sha-256": SHA256}),
        ("md5=:" + MD5_B64 + ":", {"md5": MD5}),
        (
            'blake3=:AAAA:, x-custom="a \\"q\\" b";p=1, flag, l=(1 2.5 tok);q, n=-3, '
            f"sha-256=:{SHA256_B64}:",
            {"sha-256": SHA256},
        ),
        # parameters on a member are read and dropped
        (f"sha-256=:{SHA256_B64}:;note=1", {"sha-256": SHA256}),
        # an algorithm not checked may repeat: it is skipped either way
        (f"crc32c=:AAAAAA==:, crc32c=:AAAAAA==:, sha-256=:{SHA256_B64}:", {"sha-256": SHA256}),
    ],
)
def test_content_digest_parses(field: str, expected: dict[str, bytes]) -> None:
    assert parse_content_digest(field) == expected


@pytest.mark.parametrize(
    ("field", "why"),
    [
        (f"SHA-256=:{SHA256_B64}:", "lowercase key"),
        ("sha-256=abc", "must be a byte sequence"),  # a token, not :...:
        (f"sha-256={SHA256_B64}", "character 52: expected ','"),  # '=' ends the token
        (f'sha-256="{SHA256_B64}"', "must be a byte sequence"),
        ("sha-256=?1", "must be a byte sequence"),
        ("sha-256", "must be a byte sequence"),  # a bare key is Boolean true
        ("sha-256=(:AAAA:)", "must be a byte sequence"),
        (f"sha-256=:{SHA256_B64}", "no closing ':'"),
        ("sha-256=:not base64!:", "character 9: a byte sequence holds base64 only"),
        ("sha-256=:A=A=:", "base64 only"),
        (f"sha-256=:{MD5_B64}:", "sha-256 is 16 bytes, not 32"),
        (f"sha-512=:{SHA256_B64}:", "sha-512 is 32 bytes, not 64"),
        (f"sha-256=:{SHA256_B64}:,", "a ',' ends the field"),
        (f", sha-256=:{SHA256_B64}:", "lowercase key"),
        (f"sha-256=:{SHA256_B64}: sha-512=:{SHA512_B64}:", "expected ',' between members"),
        ("sha-256=", "expected a value"),
        ('x="unterminated', "no closing quote"),
        ('x="bad \\n escape"', "may be escaped"),
        ("x=?2", "boolean is ?0 or ?1"),
        ("x=(1 2", "expected ' ' or ')'"),
        ("x=1;", "expected a parameter key"),
        ("x=-", "expected a number"),
        ("x=\u00e9", "expected a value"),
        ('x="caf\u00e9"', "printable ASCII"),
    ],
)
def test_content_digest_malformed(field: str, why: str) -> None:
    with pytest.raises(DigestError, match=re.escape(why)) as err:
        parse_content_digest(field)
    assert str(err.value).startswith("Content-Digest ")
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("field", ["unixsum=30637", "crc32c=:AAAAAA==:, adler=:AAAAAA==:"])
def test_content_digest_of_nothing_checkable_is_refused(field: str) -> None:
    """Ignored, the client would believe its bytes were checked (probe finding 4)."""
    with pytest.raises(DigestError, match=r"names only .* which the proxy does not check"):
        parse_content_digest(field)


ZERO_B64 = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    "field",
    [
        f"sha-256=:{ZERO_B64}:, sha-256=:{SHA256_B64}:",
        f"sha-256=:{SHA256_B64}:, sha-256=:{ZERO_B64}:",
        f"sha-256=:{SHA256_B64}:, sha-256=:{SHA256_B64}:",  # the same value: still ambiguous
        f"sha-256=:{SHA256_B64}:, md5=:{MD5_B64}:, sha-256=:{ZERO_B64}:",
        f"sha-256=:{ZERO_B64}:, sha-256=abc",  # the last not even a digest
    ],
)
def test_content_digest_naming_an_algorithm_twice_is_refused(field: str) -> None:
    """Regression (reprobe7 F6): RFC 8941 keeps the last duplicate key, so a wrong sha-256
    followed by a right one was stored unchecked (201)."""
    with pytest.raises(DigestError, match=r"^Content-Digest names sha-256 twice"):
        parse_content_digest(field)


@pytest.mark.parametrize("field", ["", "   "])
def test_an_empty_content_digest_is_refused(field: str) -> None:
    """Regression (reprobe7 F6): an empty field declared nothing and was a silent pass (201
    on a part, while the same header on the request was a 400)."""
    with pytest.raises(DigestError, match=r"^Repr-Digest is empty; declare a digest"):
        parse_content_digest(field, "Repr-Digest")


def test_content_digest_error_names_the_position() -> None:
    with pytest.raises(DigestError, match="at character 15: expected a lowercase key"):
        parse_content_digest("sha-256=:AA:, Bad=1")


# --- Content-MD5 (RFC 1864) ----------------------------------------------------------------


@pytest.mark.parametrize("field", [MD5_B64, f" {MD5_B64}\t", MD5_B64.rstrip("=")])
def test_content_md5_parses(field: str) -> None:
    assert parse_content_md5(field) == MD5


@pytest.mark.parametrize(
    ("field", "why"),
    [
        ("", "is 0 bytes"),
        (SHA256_B64, "is 32 bytes"),
        (MD5.hex(), "is 24 bytes"),  # hex is valid base64 of the wrong size
        ("XUFAKrxLKna5cZ2REBfFkg=!", "not base64"),
        ("XUFA KrxLKna5cZ2REBfFkg==", "not base64"),
    ],
)
def test_content_md5_malformed(field: str, why: str) -> None:
    with pytest.raises(DigestError, match=why):
        parse_content_md5(field)
