"""Content-type sniffing with libmagic and its fallbacks; the allowlist."""

from __future__ import annotations

import io
import random
import zipfile

import pytest

from s3proxy.sniff import Sniffed, allowed, sniff
from tests import bodies


def ooxml(kind: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr(f"{kind}/document.xml", "<x/>")
    return buf.getvalue()


def plain_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    return buf.getvalue()


BLOB = random.Random(1).randbytes(4096)  # libmagic: application/octet-stream
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00"
    + b"\x00" * 64
)
OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 2048

PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"


@pytest.mark.parametrize(
    ("head", "filename", "declared", "want", "confident"),
    [
        (b"%PDF-1.7\n" + b"x" * 100, "a.pdf", None, "application/pdf", True),
        (b"%PDF-1.7\n" + b"x" * 100, "renamed.txt", "text/plain", "application/pdf", True),
        (PNG, "p.png", None, "image/png", True),
        (ooxml("ppt"), "deck.pptx", None, PPTX, True),
        (plain_zip(), "deck.pptx", None, PPTX, True),
        (plain_zip(), "archive.zip", None, "application/zip", True),
        (OLE, "old.ppt", None, "application/vnd.ms-powerpoint", True),
        (BLOB, "blob", "application/x-custom", "application/x-custom", False),
        (BLOB, "blob.pdf", None, "application/pdf", False),
        (BLOB, "blob", None, "application/octet-stream", False),
        (b"", "empty.txt", "text/plain", "text/plain", False),
        (b"a,b,c\n1,2,3\n", "t.csv", None, "text/csv", True),
    ],
)
def test_sniff(
    head: bytes, filename: str, declared: str | None, want: str, confident: bool
) -> None:
    got = sniff(head, filename, declared)
    assert (got.content_type, got.confident) == (want, confident)


def test_declared_type_cannot_pass_the_allowlist() -> None:
    got = sniff(BLOB, "x.pdf", "application/pdf")
    assert got.content_type == "application/pdf"
    assert not got.allowed_by(("application/pdf",))
    assert got.allowed_by(("application/pdf", "application/octet-stream"))
    # a refusal names what the allowlist saw, not the declared type
    assert got.described == "unidentified (application/octet-stream)"
    assert Sniffed("image/png", confident=True).described == "image/png"


@pytest.mark.parametrize(
    ("ctype", "allowlist", "ok"),
    [
        ("application/pdf", (), True),
        ("application/pdf", ("application/pdf",), True),
        ("image/png", ("image/*",), True),
        ("image/png", ("application/pdf",), False),
        ("application/pdfx", ("application/pdf",), False),
    ],
)
def test_allowed(ctype: str, allowlist: tuple[str, ...], ok: bool) -> None:
    assert allowed(ctype, allowlist) is ok


def test_the_tests_opaque_bytes_are_unknown_to_libmagic() -> None:
    # tests/bodies.opaque stands for "a file nobody can identify" in tests that check the
    # stored type; os.urandom did not (1.1% of 100-byte draws have a known magic).
    for size in (100, 4096, 1 << 20):
        found = sniff(bodies.opaque(size), "a.bin", None)
        assert found == Sniffed("application/octet-stream", False), size


@pytest.mark.parametrize("name", ["data.csv", "notes.md", "notes.txt"])
def test_text_refined_by_its_name_passes_a_text_plain_allowlist(name: str) -> None:
    """--allow-type text/plain refused a .csv or .md of plain text (415 'text/csv'): the
    bytes are text/plain, and the name only refines what is stored."""
    got = sniff(b"a,b,c\n1,2,3\n", name, None)
    assert got.allowed_by(("text/plain",))
    assert got.allowed_by((got.content_type,))
    assert not got.allowed_by(("application/pdf",))
