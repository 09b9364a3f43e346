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
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from s3proxy.digests import (
    Declared,
    DigestCheck,
    DigestError,
    mismatched,
    read_declared,
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


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def sf(raw: bytes) -> str:
    return f":{b64(raw)}:"


# --- pure: reading a declaration ------------------------------------------------------


@pytest.mark.parametrize(
    ("digest_lines", "md5_lines", "expected"),
    [
        ([], [], Declared()),
        ([f"sha-256={sf(SHA256)}"], [], Declared(sha256=SHA256)),
        ([f"sha-512={sf(SHA512)}"], [], Declared(sha512=SHA512)),
        ([f"sha-256={sf(SHA256)}, sha-512={sf(SHA512)}"], [], Declared(SHA256, SHA512)),
        # Two field lines are one list (RFC 9110 section 5.3).
        ([f"sha-256={sf(SHA256)}", f"sha-512={sf(SHA512)}"], [], Declared(SHA256, SHA512)),
        ([], [b64(MD5)], Declared(md5=MD5)),
        ([f"sha-256={sf(SHA256)}"], [b64(MD5)], Declared(sha256=SHA256, md5=MD5)),
        # Algorithms we cannot verify are skipped (RFC 9530 section 2): nothing declared.
        ([f"md5={sf(MD5)}, unixsum=:AAAA:"], [], Declared()),
    ],
)
def test_read_declared(digest_lines: list[str], md5_lines: list[str], expected: Declared) -> None:
    assert read_declared(digest_lines, md5_lines) == expected


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
    ],
)
def test_read_declared_refuses_what_it_cannot_read(
    digest_lines: list[str], md5_lines: list[str], says: str
) -> None:
    with pytest.raises(DigestError, match=says):
        read_declared(digest_lines, md5_lines)


@pytest.mark.parametrize(
    ("declared", "computed", "wrong"),
    [
        (Declared(), {}, []),
        (Declared(sha256=SHA256), {"sha256": SHA256}, []),
        (Declared(sha256=SHA256), {"sha256": MD5 * 2}, ["sha256"]),
        (Declared(SHA256, SHA512, MD5), {"sha256": SHA256, "sha512": SHA512, "md5": MD5}, []),
        (Declared(SHA256, SHA512, MD5), {"sha256": SHA256, "sha512": SHA512, "md5": b""}, ["md5"]),
        # Declared but never computed: a mismatch, never a silent pass.
        (Declared(sha512=SHA512), {"sha256": SHA256}, ["sha512"]),
    ],
)
def test_mismatched(declared: Declared, computed: dict[str, bytes], wrong: list[str]) -> None:
    assert mismatched(declared, computed) == wrong


def test_check_hashes_only_what_the_pipeline_does_not() -> None:
    check = DigestCheck(Declared(sha256=SHA256))
    check.update(DATA)
    assert check.computed(SHA256) == {"sha256": SHA256}  # no second sha-256 pass
    check = DigestCheck(Declared(SHA256, SHA512, MD5))
    for i in range(0, len(DATA), 7):
        check.update(DATA[i : i + 7])
    assert check.computed(SHA256) == {"sha256": SHA256, "sha512": SHA512, "md5": MD5}
    verify_declared(check, SHA256, "f.txt")


def test_verify_names_the_header_and_both_values() -> None:
    check = DigestCheck(Declared(md5=MD5))
    check.update(b"other bytes")
    with pytest.raises(ProxyError) as caught:
        verify_declared(check, SHA256, "f.txt")
    assert caught.value.kind is DIGEST_MISMATCH
    message = caught.value.message
    assert "Content-MD5" in message and b64(MD5) in message
    assert b64(hashlib.md5(b"other bytes").digest()) in message
    verify_declared(None, b"", "f.txt")  # nothing declared: nothing to check


# --- part headers ---------------------------------------------------------------------


def part_headers(*extra: tuple[str, str], filename: bool = True) -> CIMultiDictProxy[str]:
    disp = 'form-data; name="file"' + ('; filename="f.txt"' if filename else "")
    return CIMultiDictProxy(CIMultiDict([("Content-Disposition", disp), *extra]))


def test_a_file_part_carries_its_declaration() -> None:
    head = read_part_head(
        part_headers(("Content-Digest", f"sha-512={sf(SHA512)}"), ("content-md5", b64(MD5)))
    )
    assert head.declared == Declared(sha512=SHA512, md5=MD5)


def test_a_malformed_declaration_is_invalid_digest() -> None:
    with pytest.raises(ProxyError) as caught:
        read_part_head(part_headers(("Content-Digest", "sha-256=:abc")))
    assert caught.value.kind is INVALID_DIGEST
    assert "'file'" in caught.value.message and "sha-256=:<base64>:" in caught.value.message


def test_a_field_part_digest_is_ignored() -> None:
    head = read_part_head(part_headers(("Content-Digest", "nonsense"), filename=False))
    assert head.declared == Declared()


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


async def test_an_algorithm_we_cannot_check_is_ignored(proxy: Any, bucket: str) -> None:
    data = b"hello"
    resp = await post(proxy, file_part(data, b"Content-Digest: crc32c=:AAAAAA==:"))
    assert resp.status == 201, await resp.text()


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
