"""Pure: HTTP-dates (RFC 9110 5.6.7) from clients, stores and webhook receivers.

Every caller treats an invalid date the same way (RFC 9110 13.1.3: ignore it), so
there is one parser, and it says None for anything it cannot turn into a UTC time:
a year or offset of many digits, or one that only overflows when moved to UTC
(``Fri, 31 Dec 9999 23:59:59 -2359``), which the standard library raises on
(OverflowError) in a later step than the parse.
"""

from __future__ import annotations

import datetime as dt
import email.utils


def parse_http_date(value: str | None) -> dt.datetime | None:
    """An aware UTC datetime, or None for a missing or invalid date."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
        if parsed.tzinfo is None:  # "-0000": UTC, by RFC 5322's reading
            return parsed.replace(tzinfo=dt.UTC)
        return parsed.astimezone(dt.UTC)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def format_http_date(value: dt.datetime | None) -> str | None:
    """IMF-fixdate of a store's time, or None (leave the header out) if it has no UTC form."""
    if value is None:
        return None
    try:
        # botocore's tzutc() is not dt.UTC, which format_datetime insists on.
        return email.utils.format_datetime(value.astimezone(dt.UTC), usegmt=True)
    except (OverflowError, ValueError):
        return None
