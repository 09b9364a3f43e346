"""Keys from the template, hostile filenames, Content-Disposition encoding."""

from __future__ import annotations

import datetime as dt

import pytest

from s3proxy.keys import (
    DEFAULT_FILENAME,
    content_disposition,
    make_key,
    sanitize_filename,
    template_prefix,
    template_problem,
    unique_keys,
)

TEMPLATE = "uploads/{yyyy}/{mm}/{uuid}/{filename}"
NOW = dt.datetime(2026, 3, 7, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("deck.pptx", "deck.pptx"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("..", DEFAULT_FILENAME),
        (".", DEFAULT_FILENAME),
        ("", DEFAULT_FILENAME),
        (None, DEFAULT_FILENAME),
        ("a\x00b\r\nc.pdf", "abc.pdf"),
        ("evil\u202etxt.exe", "eviltxt.exe"),
        ("  spaced   out .pdf ", "spaced out .pdf"),
        ("cafe\u0301.pdf", "caf\u00e9.pdf"),  # NFC
        ("dir/", DEFAULT_FILENAME),
        ("...", DEFAULT_FILENAME),
    ],
)
def test_sanitize_filename(raw: str | None, clean: str) -> None:
    assert sanitize_filename(raw) == clean


def test_long_filename_is_capped_keeping_extension() -> None:
    name = "é" * 300 + ".pdf"
    out = sanitize_filename(name)
    assert out.endswith(".pdf")
    assert len(out.encode()) <= 200
    out.encode().decode()  # still valid UTF-8


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/../../b", "..\\..\\x", "%2e%2e/x"])
def test_keys_never_escape_prefix(name: str) -> None:
    key = make_key(TEMPLATE, name, now=NOW, upload_id="u1")
    assert key.startswith("uploads/2026/03/u1/")
    assert "/../" not in key and not key.endswith("/..")
    assert key.count("/") == 4


def test_template_fields() -> None:
    key = make_key(
        "in/{field}/{yyyy}-{mm}-{dd}/{uuid}-{filename}", "a.pdf", "doc", now=NOW, upload_id="id"
    )
    assert key == "in/doc/2026-03-07/id-a.pdf"
    assert template_prefix(TEMPLATE) == "uploads/"


def test_uuid_makes_keys_unique() -> None:
    assert make_key(TEMPLATE, "a.pdf") != make_key(TEMPLATE, "a.pdf")


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("report.pdf", 'attachment; filename="report.pdf"'),
        (
            "résumé.pdf",
            "attachment; filename=\"resume.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf",
        ),
        ('a"b.pdf', "attachment; filename=\"ab.pdf\"; filename*=UTF-8''a%22b.pdf"),
        ("日本.pdf", "attachment; filename=\".pdf\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.pdf"),
    ],
)
def test_content_disposition(name: str, header: str) -> None:
    assert content_disposition(name) == header
    header.encode("latin-1")  # must be a valid header value


@pytest.mark.parametrize(
    "raw",
    [
        "Invoice; March; 2026.pdf",
        "C:\\Users\\me\\report.pdf",
        'say "hi".txt',
        "\u20ac\x81.txt",
        "caf\u00e9 .",
        " . a .",
        "é" * 300 + ".pdf",
        "x" * 300,
        "a" * 195 + " " + "b.tar.gz.verylongextension",
        "cafe\u0301\u202e.pdf",
    ],
)
def test_sanitize_is_idempotent(raw: str) -> None:
    """form.py hands over the sanitized name; make_key and content_disposition sanitize again."""
    once = sanitize_filename(raw)
    assert sanitize_filename(once) == once
    assert make_key(TEMPLATE, once, now=NOW, upload_id="u").rsplit("/", 1)[-1] == once


def test_escaped_braces_are_literal_text_not_fields() -> None:
    """``{{uuid}}`` is the text {uuid}: keys from it are not unique (it counted as a
    {uuid} field, so --no-overwrite stayed off and uploads replaced each other)."""
    assert not unique_keys("esc/{{uuid}}/{filename}")
    assert unique_keys("esc/{{x}}/{uuid}/{filename}")
    assert template_prefix("a{{b}}/{uuid}/{filename}") == "a{b}/"
    assert template_problem("only/{{uuid}}") is not None
