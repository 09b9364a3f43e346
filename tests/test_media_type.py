"""handlers.media_type: the upload's Content-Type check, as aiohttp would decide it."""

from __future__ import annotations

import pytest
from aiohttp.helpers import parse_content_type

from s3proxy.handlers import media_type

HEADERS = [
    "multipart/form-data; boundary=------------------------abcdef",
    "Multipart/Form-Data; boundary=x",
    '  multipart/form-data ;boundary="a;b"',
    "multipart/form-data",
    "multipart/mixed; boundary=x",
    "application/json",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
]


@pytest.mark.parametrize("header", HEADERS)
def test_media_type_agrees_with_aiohttp(header: str) -> None:
    """Same verdict on multipart/form-data as aiohttp's email-parser based check."""
    expected = parse_content_type(header)[0] == "multipart/form-data"
    assert (media_type(header) == "multipart/form-data") is expected


def test_media_type_refuses_missing_and_odd_headers() -> None:
    assert media_type("") == ""
    assert media_type("multipart") != "multipart/form-data"
    assert media_type("multipart/form-data-x; boundary=y") != "multipart/form-data"
