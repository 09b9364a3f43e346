"""Content-Disposition of form parts as real clients write them: one table, no event loop."""

from __future__ import annotations

import pytest

from s3proxy.disposition import (
    FormDisposition,
    decode_plain,
    decode_text,
    header_bytes,
    parse_form_disposition,
)


def fd(name: str | None, filename: str | None = None) -> FormDisposition:
    return FormDisposition("form-data", name, filename)


# Lines marked "captured" were recorded from the client itself (curl 7.88, requests 2.34 with
# urllib3 2.8, aiohttp 3.14 FormData, Node 20 fetch); the others follow the client's source
# (WHATWG HTML "multipart/form-data encoding algorithm" for Chromium and Firefox, httpx's
# _HTML5_FORM_ENCODING_REPLACEMENTS, curl < 7.81's backslash escapes).
TABLE = [
    # ; inside quotes is data (captured: curl, requests, Node)
    (
        b'form-data; name="file"; filename="Invoice; March; 2026.pdf"',
        fd("file", "Invoice; March; 2026.pdf"),
    ),
    (b'form-data; name="file"; filename="a;b;c.txt"', fd("file", "a;b;c.txt")),
    (b'form-data; name="file"; filename="one;.txt"', fd("file", "one;.txt")),
    # aiohttp FormData percent-encodes the whole filename and quotes names RFC 5322 style
    (
        b'form-data; name="fi\\ le\\"x"; filename="Invoice%3B%20March%3B%202026.pdf"',
        fd('fi le"x', "Invoice; March; 2026.pdf"),
    ),
    (b'form-data; name="f"; filename="Pr%C3%A4sentation.pptx"', fd("f", "Pr\u00e4sentation.pptx")),
    (b'form-data; name="f"; filename="100%25.pdf"', fd("f", "100%.pdf")),
    (
        b'form-data; name="f"; filename="C%3A%5CUsers%5Cme%5Creport.pdf"',
        fd("f", "C:\\Users\\me\\report.pdf"),
    ),
    (b"form-data; name*=utf-8''caf%C3%A9", fd("caf\u00e9")),
    # Windows paths: raw backslashes (captured: curl, requests, Node), doubled (httpx)
    (
        b'form-data; name="f"; filename="C:\\Users\\me\\report.pdf"',
        fd("f", "C:\\Users\\me\\report.pdf"),
    ),
    (b'form-data; name="f"; filename="dir\\report.pdf"', fd("f", "dir\\report.pdf")),
    (
        b'form-data; name="f"; filename="C:\\\\Users\\\\me\\\\report.pdf"',
        fd("f", "C:\\Users\\me\\report.pdf"),
    ),
    # WHATWG: " CR LF percent-encoded (captured: curl, requests, Node); raw UTF-8 otherwise
    (b'form-data; name="f"; filename="a%22b.txt"', fd("f", 'a"b.txt')),
    (b'form-data; name="f"; filename="nl%0Ax.txt"', fd("f", "nl\nx.txt")),
    (b'form-data; name="f"; filename="back\\%22slash"', fd("f", 'back\\"slash')),
    (
        'form-data; name="f"; filename="Pr\u00e4sentation.pptx"'.encode(),
        fd("f", "Pr\u00e4sentation.pptx"),
    ),
    # curl < 7.81 escaped " and \ with a backslash
    (b'form-data; name="f"; filename="say \\"hi\\".txt"', fd("f", 'say "hi".txt')),
    # a browser on Linux sending a file named with a trailing backslash
    (b'form-data; name="f"; filename="dir\\"', fd("f", "dir\\")),
    # a literal % that is not an escape stays; a non-UTF-8 escape is not decoded
    (b'form-data; name="f"; filename="100%.pdf"', fd("f", "100%.pdf")),
    (b'form-data; name="f"; filename="a%2.txt"', fd("f", "a%2.txt")),
    (b'form-data; name="f"; filename="caf%E9.txt"', fd("f", "caf%E9.txt")),
    (b'form-data; name="f"; filename="50% of %41.txt"', fd("f", "50% of %41.txt")),
    # raw bytes that are not UTF-8: windows-1252, as WHATWG decodes legacy text
    (b'form-data; name="f"; filename="caf\xe9.txt"', fd("f", "caf\u00e9.txt")),
    (b'form-data; name="f\xe9"; filename="\x80\x81.txt"', fd("f\u00e9", "\u20ac\x81.txt")),
    # RFC 8187 filename* wins when it decodes; RFC 2231 continuations
    (
        b'form-data; name="f"; filename="euro.txt"; filename*=UTF-8\'\'%E2%82%AC.txt',
        fd("f", "\u20ac.txt"),
    ),
    (
        b'form-data; name="f"; filename*=utf-8\'en\'%E2%82%AC.txt; filename="euro.txt"',
        fd("f", "\u20ac.txt"),
    ),
    (b"form-data; name=\"f\"; filename*=iso-8859-1''caf%E9.txt", fd("f", "caf\u00e9.txt")),
    (b'form-data; name="f"; filename="x.txt"; filename*=koi8-r\'\'%C1.txt', fd("f", "x.txt")),
    (b'form-data; name="f"; filename="x.txt"; filename*=UTF-8\'\'%FF.txt', fd("f", "x.txt")),
    (
        b'form-data; name="f"; filename*0*=UTF-8\'\'%E2%82%AC; filename*1=" a.txt"',
        fd("f", "\u20ac a.txt"),
    ),
    (b'form-data; name="f"; filename*0="long "; filename*1="name.txt"', fd("f", "long name.txt")),
    # an ext value (or continuation) that decodes to "" does not hide the plain one
    (b'form-data; name="f"; filename="a.pdf"; filename*=UTF-8\'\'', fd("f", "a.pdf")),
    (b'form-data; name="f"; filename*=UTF-8\'\'; filename="a.pdf"', fd("f", "a.pdf")),
    (b'form-data; name="f"; filename="a.pdf"; filename*=UTF-8\'en\'', fd("f", "a.pdf")),
    (b'form-data; name="f"; filename="a.pdf"; filename*0*=UTF-8\'\'', fd("f", "a.pdf")),
    (b'form-data; name="f"; filename="a.pdf"; filename*0=""', fd("f", "a.pdf")),
    # nor one that decodes to only spaces, controls or format characters (the re-probe)
    (b'form-data; name="f"; filename="a.pdf"; filename*=UTF-8\'\'%20', fd("f", "a.pdf")),
    (b'form-data; name="f"; filename="a.pdf"; filename*=UTF-8\'\'%00', fd("f", "a.pdf")),
    (b'form-data; name="f"; filename="a.pdf"; filename*=UTF-8\'\'%E2%80%8B', fd("f", "a.pdf")),
    (b'form-data; name="f"; filename="a.pdf"; filename*=UTF-8\'\'%E3%80%80%09', fd("f", "a.pdf")),
    (b'form-data; name="f"; filename="a.pdf"; filename*0*=UTF-8\'\'%20', fd("f", "a.pdf")),
    (b"form-data; name=\"f\"; filename*=UTF-8''", fd("f", "")),  # alone: an empty name
    (b"form-data; name=\"title\"; name*=UTF-8''", fd("title")),
    (b'form-data; name="t"; name*0*=UTF-8\'\'; filename="a"', fd("t", "a")),
    # a filename* that does not decode faithfully still names a file (was: a field, the
    # file dropped behind a 201): best-effort UTF-8, else windows-1252
    (b"form-data; name=\"r\"; filename*=windows-1252''caf%E9.txt", fd("r", "caf\u00e9.txt")),
    (b"form-data; name=\"r\"; filename*=UTF-8''100%.csv", fd("r", "100%.csv")),
    (b"form-data; name=\"r\"; filename*=UTF-8''%E9t%E9.csv", fd("r", "\u00e9t\u00e9.csv")),
    (b'form-data; name="r"; filename*=nonsense', fd("r", "nonsense")),
    (b'form-data; name="r"; filename*0="rep"; filename*2="ort.csv"', fd("r", "report.csv")),
    (b'form-data; name="r"; filename*1="ort.csv"', fd("r", "ort.csv")),
    # a field name ending in a backslash (captured: Node fetch, curl 7.88): a file follows
    (b'form-data; name="attachments\\"; filename="two.txt"', fd("attachments\\", "two.txt")),
    (b'form-data; name="a\\"; filename="b\\"', fd("a\\", "b\\")),
    # syntax variations
    (b"form-data; name=file; filename=report.pdf", fd("file", "report.pdf")),
    (b'Form-Data ; NAME = "f" ;FileName="a.txt" ;', fd("f", "a.txt")),
    (b'form-data; name="f"; filename=""', fd("f", "")),
    (b'form-data; name="f"', fd("f")),
    (b'form-data; filename="a.txt"', fd(None, "a.txt")),
    (b'form-data; name=""', fd("")),
    (b'form-data; name="f"; flag; filename="a.txt"', fd("f", "a.txt")),
]


@pytest.mark.parametrize(("raw", "want"), TABLE)
def test_parse_form_disposition(raw: bytes, want: FormDisposition) -> None:
    got = parse_form_disposition(raw)
    assert got == want
    for text in (got.name or "", got.filename or ""):
        text.encode("utf-8")  # no lone surrogate


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'form-data; name="f"; filename="a.txt', "closing quote"),
        (b'form-data; name="a"; name="b"', "twice"),
        (b'form-data; name="f"; FILENAME="a"; filename="b"', "twice"),
    ],
)
def test_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_form_disposition(raw)


def test_attachment_type_is_reported() -> None:
    assert parse_form_disposition(b'attachment; filename="a"').type == "attachment"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"plain", "plain"),
        (b"a%20b", "a b"),
        (b"%", "%"),
        (b"%zz", "%zz"),
        (b"%e2%82%ac", "\u20ac"),
        (b"%ED%A0%80", "%ED%A0%80"),  # an encoded surrogate is not UTF-8
        (b"\xed\xa0\x80", "\u00ed\u00a0\u20ac"),
    ],
)
def test_decode_plain(raw: bytes, text: str) -> None:
    assert decode_plain(raw) == text


def test_header_bytes_round_trips_aiohttp_decoding() -> None:
    raw = bytes(range(0x20, 0x100))
    assert header_bytes(raw.decode("utf-8", "surrogateescape")) == raw
    assert decode_text(raw).encode("utf-8")
