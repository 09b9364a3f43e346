"""The client can say what it sent: Content-Digest / Content-MD5 on a file part (issue #12).

Pure tables for s3proxy.digests and the part-header reading, then the whole path through
POST /upload against moto (the proxy does the checking, so moto is enough): a right
declaration stores the file, a wrong one is a 400 with nothing stored and no multipart
upload left open (the ``bucket`` fixture checks that), a malformed one a 400 before any
byte is stored. curl's own ``-F 'file=@f;headers="..."'`` is checked with the real binary.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from s3proxy.digests import (
    PART_DIGEST_HEADERS,
    Declared,
    Digest,
    DigestCheck,
    DigestError,
    mismatched,
    read_declared,
    refuse_unchecked,
    verify_declared,
)
from s3proxy.errors import DIGEST_MISMATCH, INVALID_DIGEST, ProxyError
from s3proxy.form import read_part_head
from tests import bodies

MiB = 1024**2
DATA = b"the bytes the client sent"
SHA256 = hashlib.sha256(DATA).digest()
SHA512 = hashlib.sha512(DATA).digest()
MD5 = hashlib.md5(DATA).digest()
SHA1 = hashlib.sha1(DATA).digest()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def sf(raw: bytes) -> str:
    return f":{b64(raw)}:"


# --- pure: reading a declaration ------------------------------------------------------

CD256 = Digest("sha256", SHA256, "Content-Digest sha-256")
CD512 = Digest("sha512", SHA512, "Content-Digest sha-512")
CMD5 = Digest("md5", MD5, "Content-MD5")


def declared(*digests: Digest) -> Declared:
    return Declared(digests)


@pytest.mark.parametrize(
    ("digest_lines", "md5_lines", "repr_lines", "expected"),
    [
        ([], [], [], declared()),
        ([f"sha-256={sf(SHA256)}"], [], [], declared(CD256)),
        ([f"sha-512={sf(SHA512)}"], [], [], declared(CD512)),
        ([f"sha-256={sf(SHA256)}, sha-512={sf(SHA512)}"], [], [], declared(CD256, CD512)),
        # Two field lines are one list (RFC 9110 section 5.3).
        ([f"sha-256={sf(SHA256)}", f"sha-512={sf(SHA512)}"], [], [], declared(CD256, CD512)),
        ([], [b64(MD5)], [], declared(CMD5)),
        ([f"sha-256={sf(SHA256)}"], [b64(MD5)], [], declared(CD256, CMD5)),
        # RFC 9530's deprecated md5 and sha are checked: hashlib has them.
        (
            [f"md5={sf(MD5)}, sha={sf(SHA1)}"],
            [],
            [],
            declared(
                Digest("md5", MD5, "Content-Digest md5"), Digest("sha1", SHA1, "Content-Digest sha")
            ),
        ),
        # Beside one it checks, an algorithm it cannot is skipped (RFC 9530 section 2).
        (
            [f"md5={sf(MD5)}, unixsum=:AAAA:"],
            [],
            [],
            declared(Digest("md5", MD5, "Content-Digest md5")),
        ),
        # Repr-Digest of a part (no content coding) is the same digest, checked alike.
        (
            [],
            [],
            [f"sha-256={sf(SHA256)}"],
            declared(Digest("sha256", SHA256, "Repr-Digest sha-256")),
        ),
        # One algorithm from two headers: both kept, both checked.
        (
            [f"md5={sf(MD5)}"],
            [b64(MD5)],
            [],
            declared(Digest("md5", MD5, "Content-Digest md5"), CMD5),
        ),
    ],
)
def test_read_declared(
    digest_lines: list[str], md5_lines: list[str], repr_lines: list[str], expected: Declared
) -> None:
    assert read_declared(digest_lines, md5_lines, repr_lines) == expected


@pytest.mark.parametrize(
    ("digest_lines", "md5_lines", "says"),
    [
        (["sha-256=abc"], [], "byte sequence"),
        ([f"sha-256={sf(SHA512)}"], [], "64 bytes, not 32"),
        (["sha-256=:not base64!:"], [], "malformed"),
        ([f"sha-256={b64(SHA256)}"], [], "malformed"),  # the colons left off
        ([], ["!!!"], "not base64"),
        ([], [b64(SHA256)], "32 bytes"),
        ([], [b64(MD5), b64(MD5)], "two Content-MD5"),
        # Nothing it could check: refused, not a silent pass.
        (["unixsum=:AAAA:, crc32c=:AAAAAA==:"], [], "names only unixsum, crc32c"),
        # reprobe7 F6: one algorithm twice kept only the last (a wrong one went unchecked),
        # on one line or two; an empty line declared nothing and passed.
        ([f"sha-256={sf(bytes(32))}, sha-256={sf(SHA256)}"], [], "names sha-256 twice"),
        ([f"sha-256={sf(bytes(32))}", f"sha-256={sf(SHA256)}"], [], "names sha-256 twice"),
        ([""], [], "Content-Digest is empty"),
        ([" "], [], "Content-Digest is empty"),
    ],
)
def test_read_declared_refuses_what_it_cannot_read(
    digest_lines: list[str], md5_lines: list[str], says: str
) -> None:
    with pytest.raises(DigestError, match=says):
        read_declared(digest_lines, md5_lines)


def test_repr_digest_errors_name_repr_digest() -> None:
    with pytest.raises(DigestError, match=r"^Repr-Digest is malformed"):
        read_declared([], [], ["sha-256=:abc"])
    with pytest.raises(DigestError, match=r"^Repr-Digest sha-256 is 64 bytes"):
        read_declared([], [], [f"sha-256={sf(SHA512)}"])
    with pytest.raises(DigestError, match=r"^Repr-Digest names md5 twice"):
        read_declared([], [], [f"md5={sf(MD5)}", f"md5={sf(MD5)}"])
    with pytest.raises(DigestError, match=r"^Repr-Digest is empty"):
        read_declared([], [], [""])


@pytest.mark.parametrize(
    ("declared_", "computed", "wrong"),
    [
        (declared(), {}, []),
        (declared(CD256), {"sha256": SHA256}, []),
        (declared(CD256), {"sha256": MD5 * 2}, [CD256]),
        (declared(CD256, CD512, CMD5), {"sha256": SHA256, "sha512": SHA512, "md5": MD5}, []),
        (
            declared(CD256, CD512, CMD5),
            {"sha256": SHA256, "sha512": SHA512, "md5": b""},
            [CMD5],
        ),
        # Declared but never computed: a mismatch, never a silent pass.
        (declared(CD512), {"sha256": SHA256}, [CD512]),
        # The same algorithm twice: the wrong one is found whichever header comes first.
        (
            declared(Digest("sha256", bytes(32), "Repr-Digest sha-256"), CD256),
            {"sha256": SHA256},
            [Digest("sha256", bytes(32), "Repr-Digest sha-256")],
        ),
    ],
)
def test_mismatched(declared_: Declared, computed: dict[str, bytes], wrong: list[Digest]) -> None:
    assert mismatched(declared_, computed) == wrong


def test_check_hashes_only_what_the_pipeline_does_not() -> None:
    check = DigestCheck(declared(CD256))
    check.update(DATA)
    assert check.computed(SHA256) == {"sha256": SHA256}  # no second sha-256 pass
    check = DigestCheck(declared(CD256, CD512, CMD5))
    for i in range(0, len(DATA), 7):
        check.update(DATA[i : i + 7])
    assert check.computed(SHA256) == {"sha256": SHA256, "sha512": SHA512, "md5": MD5}
    verify_declared(check, SHA256, "f.txt")


def test_verify_names_the_header_and_both_values() -> None:
    check = DigestCheck(declared(CMD5))
    check.update(b"other bytes")
    with pytest.raises(ProxyError) as caught:
        verify_declared(check, SHA256, "f.txt")
    assert caught.value.kind is DIGEST_MISMATCH
    message = caught.value.message
    assert "Content-MD5" in message and b64(MD5) in message
    assert b64(hashlib.md5(b"other bytes").digest()) in message
    verify_declared(None, b"", "f.txt")  # nothing declared: nothing to check


OTHER = b"other bytes"


@pytest.mark.parametrize(
    ("digest", "names", "shown"),
    [
        # The header the client sent, each value in that header's own form.
        (CD256, "its Content-Digest sha-256 ", sf),
        (CD512, "its Content-Digest sha-512 ", sf),
        (CMD5, "its Content-MD5 ", b64),
        (Digest("md5", MD5, "Content-Digest md5"), "its Content-Digest md5 ", sf),
        (Digest("sha1", SHA1, "Content-Digest sha"), "its Content-Digest sha ", sf),
        (Digest("sha256", SHA256, "Repr-Digest sha-256"), "its Repr-Digest sha-256 ", sf),
        (Digest("sha256", SHA256, "Upload-Checksum sha256"), "its Upload-Checksum sha256 ", b64),
        (Digest("md5", MD5, "Upload-Checksum md5"), "its Upload-Checksum md5 ", b64),
        (Digest("sha1", SHA1, "Upload-Checksum sha1"), "its Upload-Checksum sha1 ", b64),
    ],
)
def test_a_mismatch_names_the_header_the_client_sent(
    digest: Digest, names: str, shown: Callable[[bytes], str]
) -> None:
    check = DigestCheck(declared(digest))
    check.update(OTHER)
    with pytest.raises(ProxyError) as caught:
        verify_declared(check, hashlib.sha256(OTHER).digest(), "f.txt")
    message = caught.value.message
    assert names in message
    received = hashlib.new(digest.name, OTHER).digest()
    assert f"declared {shown(digest.value)}, received {shown(received)}" in message


@pytest.mark.parametrize(
    ("names", "checked", "refused"),
    [
        (["Content-Type", "Content-Disposition"], frozenset(), None),
        (["Want-Content-Digest", "Want-Repr-Digest"], frozenset(), None),  # asks, declares nothing
        (["Content-Digest"], PART_DIGEST_HEADERS, None),
        (["repr-digest", "Content-MD5"], PART_DIGEST_HEADERS, None),
        (["Digest"], PART_DIGEST_HEADERS, "Digest"),  # RFC 3230, obsoleted by RFC 9530
        (["x-amz-checksum-sha256"], PART_DIGEST_HEADERS, "x-amz-checksum-sha256"),
        (["X-Amz-Checksum-CRC32"], PART_DIGEST_HEADERS, "X-Amz-Checksum-CRC32"),
        (["x-amz-checksum-crc64nvme"], PART_DIGEST_HEADERS, "x-amz-checksum-crc64nvme"),
        (["Content-Digest"], frozenset(), "Content-Digest"),
        (["Content-MD5"], frozenset(), "Content-MD5"),
        (["Repr-Digest"], frozenset(), "Repr-Digest"),
    ],
)
def test_refuse_unchecked(names: list[str], checked: frozenset[str], refused: str | None) -> None:
    if refused is None:
        refuse_unchecked(names, checked, "hint")
        return
    with pytest.raises(DigestError, match=rf"^{refused} is not checked here; hint$"):
        refuse_unchecked(names, checked, "hint")


# --- part headers ---------------------------------------------------------------------


def part_headers(*extra: tuple[str, str], filename: bool = True) -> CIMultiDictProxy[str]:
    disp = 'form-data; name="file"' + ('; filename="f.txt"' if filename else "")
    return CIMultiDictProxy(CIMultiDict([("Content-Disposition", disp), *extra]))


def test_a_file_part_carries_its_declaration() -> None:
    head = read_part_head(
        part_headers(("Content-Digest", f"sha-512={sf(SHA512)}"), ("content-md5", b64(MD5)))
    )
    assert head.declared == declared(CD512, CMD5)


def test_a_malformed_declaration_is_invalid_digest() -> None:
    with pytest.raises(ProxyError) as caught:
        read_part_head(part_headers(("Content-Digest", "sha-256=:abc")))
    assert caught.value.kind is INVALID_DIGEST
    assert "'file'" in caught.value.message and "sha-256=:<base64>:" in caught.value.message


@pytest.mark.parametrize(
    "header",
    [
        ("Digest", f"SHA-256={b64(SHA256)}"),
        ("x-amz-checksum-sha256", b64(SHA256)),
        ("x-amz-checksum-crc32", "AAAAAA=="),
    ],
)
def test_a_digest_header_not_checked_is_refused(header: tuple[str, str]) -> None:
    with pytest.raises(ProxyError) as caught:
        read_part_head(part_headers(header))
    assert caught.value.kind is INVALID_DIGEST
    message = caught.value.message
    assert f"{header[0]} is not checked" in message and "Content-Digest" in message


def test_a_field_part_digest_is_refused() -> None:
    # A field is not a file: its digest is not checked, so it is not taken either.
    with pytest.raises(ProxyError) as caught:
        read_part_head(part_headers(("Content-Digest", "nonsense"), filename=False))
    assert caught.value.kind is INVALID_DIGEST
    assert read_part_head(part_headers(filename=False)).declared == Declared()


# --- through POST /upload (moto) ------------------------------------------------------


def digest_lines(data: bytes, kind: str, *, wrong: bool = False) -> list[bytes]:
    """The part header lines declaring ``data``'s digest (of other bytes when ``wrong``)."""
    if wrong:
        data = data[:-1] + bytes([data[-1] ^ 1])
    if kind == "sha-256":
        return [b"Content-Digest: sha-256=" + sf(hashlib.sha256(data).digest()).encode()]
    if kind == "sha-512":
        return [b"Content-Digest: sha-512=" + sf(hashlib.sha512(data).digest()).encode()]
    if kind == "both":
        return [
            b"Content-Digest: sha-256=" + sf(hashlib.sha256(data).digest()).encode(),
            b"Content-Digest: sha-512=" + sf(hashlib.sha512(data).digest()).encode(),
        ]
    assert kind == "md5"
    return [b"Content-MD5: " + b64(hashlib.md5(data).digest()).encode()]


def file_part(data: bytes, *lines: bytes, filename: bytes = b"f.pdf") -> bytes:
    disposition = b'form-data; name="file"; filename="' + filename + b'"'
    return bodies.raw_part(disposition, data, *lines)


async def post(proxy: Any, *parts: bytes) -> Any:
    raw = bodies.raw_body(*parts)
    return await proxy.post(
        "/upload", data=bodies.chunked(raw, 256 * 1024), headers=bodies.headers()
    )


# A 1-byte file, a file of exactly one part (one PutObject), a file of three parts.
SIZES = {"1-byte": 1, "one-part": 5 * MiB, "multipart": 12 * MiB + 123}


@pytest.mark.parametrize(
    ("size", "kind"),
    [
        ("1-byte", "sha-256"),
        ("1-byte", "sha-512"),
        ("1-byte", "both"),
        ("1-byte", "md5"),
        ("one-part", "sha-256"),
        ("one-part", "md5"),
        ("multipart", "sha-256"),
        ("multipart", "both"),
        ("multipart", "md5"),
    ],
)
async def test_right_declaration_is_stored(
    proxy: Any, s3: Any, bucket: str, size: str, kind: str
) -> None:
    data = bodies.pdf(SIZES[size]) if SIZES[size] > 1 else b"x"
    resp = await post(proxy, file_part(data, *digest_lines(data, kind)))
    assert resp.status == 201, await resp.text()
    [stored] = (await resp.json())["files"]
    assert stored["sha256"] == hashlib.sha256(data).hexdigest()
    assert s3.get_object(Bucket=bucket, Key=stored["key"])["Body"].read() == data


@pytest.mark.parametrize(
    ("size", "kind"),
    [
        ("1-byte", "sha-256"),
        ("1-byte", "md5"),
        ("one-part", "sha-512"),
        ("multipart", "sha-256"),
        ("multipart", "md5"),
        ("multipart", "both"),
    ],
)
async def test_wrong_declaration_stores_nothing(
    proxy: Any, s3: Any, bucket: str, keys_in: Any, size: str, kind: str
) -> None:
    data = bodies.pdf(SIZES[size]) if SIZES[size] > 1 else b"x"
    resp = await post(proxy, file_part(data, *digest_lines(data, kind, wrong=True)))
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "DIGEST_MISMATCH"
    assert "f.pdf" in error["message"]
    assert keys_in(bucket) == []  # and the bucket fixture: no multipart upload left open


async def test_a_wrong_second_file_takes_the_first_with_it(
    proxy: Any, bucket: str, keys_in: Any
) -> None:
    first, second = bodies.pdf(6 * MiB), bodies.pdf(1000)
    resp = await post(
        proxy,
        file_part(first, *digest_lines(first, "sha-256"), filename=b"a.pdf"),
        file_part(second, *digest_lines(second, "md5", wrong=True), filename=b"b.pdf"),
    )
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] == "DIGEST_MISMATCH"
    assert keys_in(bucket) == []


@pytest.mark.parametrize(
    "line",
    [
        b"Content-Digest: sha-256=:abc",
        b"Content-Digest: sha-256=" + sf(SHA512).encode(),
        b"Content-MD5: 123",
    ],
)
async def test_malformed_declaration_is_refused_before_any_byte_is_stored(
    proxy: Any, bucket: str, keys_in: Any, line: bytes
) -> None:
    data = bodies.pdf(12 * MiB)
    resp = await post(proxy, file_part(data, line))
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] == "INVALID_DIGEST"
    assert keys_in(bucket) == []


async def test_an_algorithm_we_cannot_check_is_skipped_only_beside_one_we_can(
    proxy: Any, bucket: str, keys_in: Any
) -> None:
    data = b"hello"
    alone = b"Content-Digest: crc32c=:AAAAAA==:"
    resp = await post(proxy, file_part(data, alone))
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "INVALID_DIGEST" and "names only crc32c" in error["message"]
    beside = alone + b", sha-256=" + sf(hashlib.sha256(data).digest()).encode()
    resp = await post(proxy, file_part(data, beside))
    assert resp.status == 201, await resp.text()


def other_lines(data: bytes, kind: str) -> list[bytes]:
    """Part header lines declaring ``data``'s digest in a header other than Content-Digest
    sha-256/sha-512 and Content-MD5 (probe finding 4: each was ignored, a wrong one a 201)."""
    if kind == "repr-sha-256":
        return [b"Repr-Digest: sha-256=" + sf(hashlib.sha256(data).digest()).encode()]
    if kind == "cd-md5":
        return [b"Content-Digest: md5=" + sf(hashlib.md5(data).digest()).encode()]
    assert kind == "cd-sha"
    return [b"Content-Digest: sha=" + sf(hashlib.sha1(data).digest()).encode()]


SHOWN = {"repr-sha-256": "Repr-Digest sha-256", "cd-md5": "Content-Digest md5"}
SHOWN["cd-sha"] = "Content-Digest sha"


@pytest.mark.parametrize("kind", ["repr-sha-256", "cd-md5", "cd-sha"])
@pytest.mark.parametrize("size", ["1-byte", "multipart"])
async def test_repr_digest_and_deprecated_algorithms_are_checked(
    proxy: Any, s3: Any, bucket: str, keys_in: Any, size: str, kind: str
) -> None:
    data = bodies.pdf(SIZES[size]) if SIZES[size] > 1 else b"x"
    wrong = data[:-1] + bytes([data[-1] ^ 1])
    resp = await post(proxy, file_part(data, *other_lines(wrong, kind)))
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "DIGEST_MISMATCH"
    assert f"its {SHOWN[kind]} " in error["message"]
    assert keys_in(bucket) == []
    resp = await post(proxy, file_part(data, *other_lines(data, kind)))
    assert resp.status == 201, await resp.text()
    [stored] = (await resp.json())["files"]
    assert s3.get_object(Bucket=bucket, Key=stored["key"])["Body"].read() == data


@pytest.mark.parametrize(
    "line",
    [
        b"Digest: SHA-256=" + b64(bytes(32)).encode(),
        b"x-amz-checksum-sha256: " + b64(bytes(32)).encode(),
        b"x-amz-checksum-crc32: AAAAAA==",
    ],
)
async def test_a_part_digest_header_not_checked_is_refused(
    proxy: Any, bucket: str, keys_in: Any, line: bytes
) -> None:
    resp = await post(proxy, file_part(bodies.pdf(12 * MiB), line))
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "INVALID_DIGEST"
    assert line.split(b":")[0].decode() + " is not checked" in error["message"]
    assert keys_in(bucket) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Content-Digest", "sha-256=" + sf(bytes(32))),
        ("Content-Digest", "garbage"),
        ("Content-MD5", b64(bytes(16))),
        ("Repr-Digest", "sha-256=" + sf(bytes(32))),
        ("Digest", "SHA-256=" + b64(bytes(32))),
        ("x-amz-checksum-sha256", b64(bytes(32))),
    ],
)
async def test_a_digest_of_the_whole_request_is_refused(
    proxy: Any, bucket: str, keys_in: Any, name: str, value: str
) -> None:
    raw = bodies.raw_body(file_part(b"hello"))
    resp = await proxy.post("/upload", data=raw, headers={**bodies.headers(), name: value})
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "INVALID_DIGEST"
    assert f"{name} is not checked" in error["message"] and "part's headers" in error["message"]
    assert keys_in(bucket) == []


WRONG_CD = b"Content-Digest: sha-256=" + sf(bytes(32)).encode()


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        ([WRONG_CD + b", sha-256=" + sf(hashlib.sha256(b"hello").digest()).encode()], "twice"),
        (
            [
                WRONG_CD,
                b"Content-Digest: sha-256=" + sf(hashlib.sha256(b"hello").digest()).encode(),
            ],
            "twice",
        ),
        (
            [
                b"Repr-Digest: sha-256=" + sf(bytes(32)).encode(),
                b"Repr-Digest: sha-256=" + sf(hashlib.sha256(b"hello").digest()).encode(),
            ],
            "Repr-Digest names sha-256 twice",
        ),
        ([b"Content-Digest: "], "Content-Digest is empty"),
        ([b"Repr-Digest:"], "Repr-Digest is empty"),
    ],
)
async def test_a_part_digest_that_would_pass_unchecked_is_refused(
    proxy: Any, bucket: str, keys_in: Any, lines: list[bytes], says: str
) -> None:
    """Regression (reprobe7 F6): a wrong sha-256 then a right one, on one line or two, was
    stored (201): RFC 8941 keeps the last duplicate key. An empty Content-Digest on a part
    was a 201 too, while on the request it was a 400."""
    resp = await post(proxy, file_part(b"hello", *lines))
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "INVALID_DIGEST" and says in error["message"]
    assert keys_in(bucket) == []


SIGN_BODY: dict[str, Any] = {"filename": "f.pdf", "size": 5, "content_type": "application/pdf"}
# Every route that takes a JSON body to sign for
SIGN_ROUTES = [
    "/sign",
    "/sign/multipart",
    "/sign/multipart/parts",
    "/sign/multipart/complete",
    "/sign/multipart/abort",
]


@pytest.mark.parametrize("path", SIGN_ROUTES)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Content-MD5", b64(bytes(16))),
        ("Content-Digest", "sha-256=" + sf(bytes(32))),
        ("Repr-Digest", "sha-256=" + sf(bytes(32))),
        ("Digest", "SHA-256=" + b64(bytes(32))),
        ("x-amz-checksum-sha256", b64(bytes(32))),
    ],
)
async def test_a_digest_on_a_sign_request_is_refused(
    proxy: Any, bucket: str, keys_in: Any, path: str, name: str, value: str
) -> None:
    """Regression (reprobe7 F6): a wrong Content-MD5 or Content-Digest on /sign's JSON body
    answered 200, ignored; the file itself never passes through the proxy."""
    resp = await proxy.post(path, json=SIGN_BODY, headers={name: value})
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "INVALID_DIGEST"
    assert f"{name} is not checked" in error["message"] and '"sha256"' in error["message"]
    assert keys_in(bucket) == []


async def test_a_sign_request_that_only_asks_for_a_digest_is_served(proxy: Any) -> None:
    # Want-* asks for a digest and declares none (RFC 9530 section 4): nothing to refuse.
    resp = await proxy.post("/sign", json=SIGN_BODY, headers={"Want-Content-Digest": "sha-256=1"})
    assert resp.status == 200, await resp.text()


# --- curl itself ----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("wrong", [False, True])
async def test_curl_sends_the_part_header(
    proxy: Any, s3: Any, bucket: str, keys_in: Any, tmp_path: Path, wrong: bool
) -> None:
    data = bodies.pdf(100_000)
    path = tmp_path / "deck.pdf"
    path.write_bytes(data)
    declared = hashlib.sha256(data + b"!" if wrong else data).digest()
    url = f"http://127.0.0.1:{proxy.port}/upload"
    form = f'file=@{path};headers="Content-Digest: sha-256={sf(declared)}"'
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-w", "\n%{http_code}", "-F", form, url, stdout=subprocess.PIPE
    )
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0
    body, _, status = stdout.decode().rpartition("\n")
    if wrong:
        assert status == "400" and json.loads(body)["error"]["code"] == "DIGEST_MISMATCH"
        assert keys_in(bucket) == []
    else:
        assert status == "201", body
        [stored] = json.loads(body)["files"]
        assert s3.get_object(Bucket=bucket, Key=stored["key"])["Body"].read() == data
