"""Keys from the template, hostile filenames, Content-Disposition encoding."""

from __future__ import annotations

import datetime as dt

import pytest

from s3proxy.keys import (
    DEFAULT_FILENAME,
    KeyPolicy,
    content_disposition,
    field_problem,
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
        ("a\x00b\x7f\x9fc.pdf", "abc.pdf"),  # controls dropped
        ("a\r\nb\tc.pdf", "a  b c.pdf"),  # whitespace controls are spaces, not collapsed
        ("a\u2028b\u2029c\x85d.txt", "a b c d.txt"),  # Zl, Zp, NEL
        ("evil\u202etxt.exe", "eviltxt.exe"),
        ("a\u200bb\ufeff.txt", "ab.txt"),  # zero-width, BOM
        ("\ue000a.txt", "a.txt"),  # private use
        ("  spaced   out .pdf ", "spaced   out .pdf"),  # runs of spaces kept, ends trimmed
        ("\u00a0\u3000a.txt\u00a0", "a.txt"),  # ends trimmed, Zs too
        ("a\u00a0b.txt", "a\u00a0b.txt"),  # no-break space kept
        ("日本\u3000語.txt", "日本\u3000語.txt"),  # ideographic space kept
        ("cafe\u0301.pdf", "caf\u00e9.pdf"),  # NFC
        ("cafe\u202e\u0301.pdf", "caf\u00e9.pdf"),  # NFC after the drop
        (".env", ".env"),
        (".gitignore", ".gitignore"),
        ("dir/.hidden", ".hidden"),
        ("ends.", "ends."),
        (". a .", ". a ."),
        ("dir/", DEFAULT_FILENAME),
        ("...", DEFAULT_FILENAME),
        (" .. ", DEFAULT_FILENAME),
        ("a/\u200b..", DEFAULT_FILENAME),
        (".\u202e.", DEFAULT_FILENAME),
    ],
)
def test_sanitize_filename(raw: str | None, clean: str) -> None:
    assert sanitize_filename(raw) == clean


@pytest.mark.parametrize(
    ("name", "capped"),
    [
        ("." + "x" * 300, "." + "x" * 199),  # a dotfile: all stem
        ("." * 250 + "pdf", DEFAULT_FILENAME),  # the cut leaves only dots
        ("a" * 195 + "    " + "b.txt", "a" * 195 + ".txt"),
    ],
)
def test_long_filename_cut(name: str, capped: str) -> None:
    assert sanitize_filename(name) == capped


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
        (
            "日本.pdf",
            "attachment; filename=\"upload.pdf\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.pdf",
        ),
        (
            "日本語 ファイル.txt",
            'attachment; filename="upload.txt"; '
            "filename*=UTF-8''%E6%97%A5%E6%9C%AC%E8%AA%9E%20%E3%83%95%E3%82%A1%E3%82%A4%E3%83%AB.txt",
        ),
        (
            "日本.tar.gz",
            "attachment; filename=\"upload.tar.gz\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.tar.gz",
        ),
        ("日本", "attachment; filename=\"upload\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC"),
        (".env", 'attachment; filename=".env"'),
        (".日本", "attachment; filename=\"upload\"; filename*=UTF-8''.%E6%97%A5%E6%9C%AC"),
        ("a\u00a0b.txt", "attachment; filename=\"a b.txt\"; filename*=UTF-8''a%C2%A0b.txt"),
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
        "cafe\u202e\u0301.pdf",
        ".env",
        "ends.",
        "a\r\n\u3000b.",
        "." * 250 + ".pdf",
        " . ",
    ],
)
def test_sanitize_is_idempotent(raw: str) -> None:
    """form.py hands over the sanitized name; make_key and content_disposition sanitize again."""
    once = sanitize_filename(raw)
    assert sanitize_filename(once) == once
    assert make_key(TEMPLATE, once, now=NOW, upload_id="u").rsplit("/", 1)[-1] == once


@pytest.mark.parametrize(
    "template",
    [
        "uploads/{yyyy}/{mm}/{uuid}/{filename}",
        "{filename}",
        "d/{uuid}-{filename}",
        "{field}/{uuid}/{filename}",
    ],
)
@pytest.mark.parametrize(
    "name",
    [".", "..", "...", " .. ", ".env", "..\\..\\x", "../..", "a/..", "\u2028..\u2029", ".\u200b."],
)
def test_dot_names_never_make_dot_segments(template: str, name: str) -> None:
    """Leading dots are kept now (``.env``), so no name may still become a ``.``/``..``
    segment (which make_key's normpath would fold away, moving the key up a level)."""
    key = KeyPolicy(template).new_key(name, name, now=NOW, upload_id="u")
    assert not any(seg in ("", ".", "..") for seg in key.split("/")), key
    assert key.startswith(template_prefix(template)), key


def test_escaped_braces_are_literal_text_not_fields() -> None:
    """``{{uuid}}`` is the text {uuid}: keys from it are not unique (it counted as a
    {uuid} field, so --no-overwrite stayed off and uploads replaced each other)."""
    assert not unique_keys("esc/{{uuid}}/{filename}")
    assert unique_keys("esc/{{x}}/{uuid}/{filename}")
    assert template_prefix("a{{b}}/{uuid}/{filename}") == "a{b}/"
    assert template_problem("only/{{uuid}}") is not None


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        # found by the config probe: each was accepted at start
        ("k/{uuid:.1}/{filename}", "{uuid:.1} must be used plainly"),  # 16 keys, no 409
        ("k/{uuid:>40}/{filename}", "{uuid:>40} must be used plainly"),
        ("a/{uuid}/{filename!r}", "{filename!r} must be used plainly"),
        ("a/{uuid}/{filename:.3}", "{filename:.3} must be used plainly"),
        ("k/{uuid.__class__}/{filename}", "{uuid.__class__} must be used plainly"),
        ("k/{uuid.upper}/{filename}", "{uuid.upper} must be used plainly"),
        ("k/{uuid.hex}/{filename}", "{uuid.hex} must be used plainly"),  # was a traceback
        ("k/{uuid[0]}/{filename}", "{uuid[0]} must be used plainly"),
        ("k/{yyyy!s}/{uuid}", "{yyyy!s} must be used plainly"),
        ("k/{}/{uuid}", "unknown field {}"),
        ("k/{0}/{uuid}", "unknown field {0}"),
        ("k/{nope.x}/{uuid}", "unknown field {nope.x}"),
        ("k/{uuid/{filename}", "broken field"),
        ("k/{yyyy}/{mm}/{dd}/{uuid}/{field}/{filename}", None),
        ("k/{{uuid:.1}}/{uuid}", None),  # literal text
    ],
)
def test_a_template_uses_every_field_plainly(template: str, problem: str | None) -> None:
    """A format spec, conversion or attribute access can cut or change a field: with
    ``{uuid:.1}`` 20 uploads got 16 keys, each told 201, while ``unique_keys`` said every
    key was new (so --no-overwrite stayed off). Refused, so no field is other than filled."""
    found = field_problem(template)
    if problem is None:
        assert found is None and template_problem(template) is None
    else:
        assert found is not None and problem in found and "\n" not in found
        assert template_problem(template) == found


def test_unique_keys_needs_the_whole_uuid() -> None:
    assert unique_keys("k/{uuid}/{filename}")
    for cut in ("k/{uuid:.1}/{filename}", "k/{uuid!r}/{filename}", "k/{uuid:>40}"):
        assert not unique_keys(cut)
