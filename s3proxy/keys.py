"""Pure: object keys from the template, filename sanitizing, Content-Disposition.

The client's filename is untrusted: it must never add path segments to a key
(so a key never escapes the template's prefix), never carry control characters
into a header, and never be so long that the key passes S3's 1024-byte limit.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
import unicodedata
import uuid
from urllib.parse import quote

MAX_KEY_BYTES = 1024  # S3 object key limit, in UTF-8 bytes
MAX_FILENAME_BYTES = 200
DEFAULT_FILENAME = "upload"

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")
_SPACES = re.compile(r"\s+")


def sanitize_filename(name: str | None) -> str:
    """Make a client filename safe as one key segment and as a header value.

    Keeps the last path component (browsers on Windows send ``C:\\x\\a.pdf``),
    NFC-normalizes, drops control characters and separators, refuses ``.``/``..``,
    and caps the UTF-8 length while keeping the extension.
    """
    if not name:
        return DEFAULT_FILENAME
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name)[-1]
    name = _UNSAFE.sub("", name)
    # Unicode format characters (bidi overrides, zero-width) can disguise extensions.
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cf", "Cc", "Cs", "Co"))
    name = _SPACES.sub(" ", name).strip(" .")
    if not name or name in (".", ".."):
        return DEFAULT_FILENAME
    if len(name.encode()) > MAX_FILENAME_BYTES:
        stem, ext = posixpath.splitext(name)
        if len(ext.encode()) > 16:
            stem, ext = name, ""
        budget = MAX_FILENAME_BYTES - len(ext.encode())
        stem = stem.encode()[:budget].decode("utf-8", "ignore").rstrip(" .")
        name = (stem or DEFAULT_FILENAME) + ext
    return name


def template_prefix(template: str) -> str:
    """The literal part of the template before the first field: every key starts with it."""
    return template.split("{", 1)[0]


def make_key(
    template: str,
    filename: str,
    field: str = "file",
    now: dt.datetime | None = None,
    upload_id: str | None = None,
) -> str:
    """Fill the template; ``filename`` and ``field`` are sanitized to one segment each."""
    now = now or dt.datetime.now(dt.UTC)
    key = template.format(
        yyyy=f"{now.year:04d}",
        mm=f"{now.month:02d}",
        dd=f"{now.day:02d}",
        uuid=upload_id or uuid.uuid4().hex,
        filename=sanitize_filename(filename),
        field=sanitize_filename(field),
    )
    key = posixpath.normpath(key)
    prefix = template_prefix(template)
    if not key.startswith(prefix.rstrip("/")) or key.startswith(("/", "../")) or key == "..":
        raise ValueError("key escapes the configured prefix")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError("key longer than S3's 1024-byte limit")
    return key


def under_prefix(prefix: str, key: str) -> str:
    """Put a key under an upload token's prefix (already validated as clean)."""
    full = prefix + key
    if len(full.encode()) > MAX_KEY_BYTES:
        raise ValueError("key longer than S3's 1024-byte limit")
    return full


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback and an RFC 5987 ``filename*`` (RFC 6266)."""
    safe = sanitize_filename(filename)
    ascii_name = (
        unicodedata.normalize("NFKD", safe).encode("ascii", "ignore").decode().replace('"', "")
    )
    ascii_name = ascii_name.replace("\\", "").strip() or DEFAULT_FILENAME
    if ascii_name == safe:
        return f'attachment; filename="{ascii_name}"'
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(safe, safe='')}"
