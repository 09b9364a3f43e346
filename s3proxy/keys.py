"""Pure: object keys from the template, which keys a caller may use, Content-Disposition.

The client's filename is untrusted: it must never add path segments to a key
(so a key never escapes the template's prefix), never carry control characters
into a header, and never be so long that the key passes S3's 1024-byte limit.

Key policy: the one rule for every route (``POST /upload``, ``/sign``, ``GET
/files``, resumable uploads) lives in ``KeyPolicy``, built from the key template
and the caller's upload grant, if any:

- A new key is ``grant prefix + the template's key``; anonymous and API-key
  callers have no grant prefix.
- A caller may read, complete or abort exactly the keys it could have been
  given: keys under ``grant prefix + the template's literal prefix``, well
  formed as this proxy makes them. That is the narrowest consistent rule: every
  key ``new_key`` makes passes ``check`` (tested), and a token holder cannot
  reach objects the backend keeps beside its uploads under the grant prefix
  (``users/42/avatar.png`` when uploads land in ``users/42/uploads/...``); the
  grant prefix alone would let a bearer token read those.
- Well formed: non-empty, no empty, ``.`` or ``..`` segment (so no leading,
  trailing or double ``/``), no backslash, no control or format character and
  no lone surrogate, at most ``MAX_KEY_BYTES`` in UTF-8. A path normalizer, a
  log line or an S3-compatible store can read none of them differently, and the
  proxy never makes one (``sanitize_filename`` drops what it would refuse), so
  refusing them can never hide an object the proxy stored. Nor is a key under
  ``RESERVED_NAMESPACE`` (``.s3proxy/``): the proxy's own state, with a template
  that has no literal prefix otherwise inside every caller's reach.

Write policy (``WritePolicy``, from the template and ``--no-overwrite``): with
``{uuid}`` in the template every key is new, so a write needs no condition and
what a failed write may have stored is the upload's own to delete. Without it
two uploads can get the same key: then every write carries ``If-None-Match: *``
(the first wins, the other gets 409 KEY_EXISTS); or, with ``--no-overwrite false``, the
last write wins. Either way a failed upload deletes only an object that carries its own
nonce (written with every object at a shared key), never another upload's.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
import string
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

MAX_KEY_BYTES = 1024  # S3 object key limit, in UTF-8 bytes
# The proxy's own objects (tus state and staged bytes: ``tus_url.RESERVED_PREFIX``) live
# under it; no caller may be given, read, complete or abort a key there.
RESERVED_NAMESPACE = ".s3proxy/"
# x-amz-meta-s3proxy-upload: a per-upload nonce, written when keys may be shared, so a
# failed upload can tell its own object from another upload's at the same key.
NONCE_META = "s3proxy-upload"
NONCE_BYTES = len(NONCE_META) + 32  # of S3's 2 KB metadata budget (a uuid4 in hex)
MAX_FILENAME_BYTES = 200
DEFAULT_FILENAME = "upload"

# Dropped from a filename: control, format, lone surrogate, private use.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})
# Unicode categories refused in a client-supplied key: Cc control (C0, DEL, C1), Cf
# format (bidi overrides, zero-width: they disguise a key), Cs a lone surrogate (JSON
# and aiohttp's surrogateescape can hand one over; it has no UTF-8 form to send), and
# what a filename never keeps either: Zl/Zp line and paragraph separators (made spaces)
# and Co private use (dropped), so no key the proxy made holds one (reprobe20b: U+2028
# was passed on to S3).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
# Sample field values that make a key of the template without changing its shape.
_SAMPLE_FIELDS = {
    "yyyy": "2000",
    "mm": "01",
    "dd": "01",
    "uuid": "0" * 32,
    "filename": DEFAULT_FILENAME,
    "field": "file",
}


def sanitize_filename(name: str | None) -> str:
    """Make a client filename safe as one key segment and as a header value. Pure.

    The rules, in order (README "Uploads" lists them; everything else is kept as sent,
    so ``.env``, ``ends.``, ``a  b.pdf`` and ``a\\u00a0b.txt`` stay what they are):

    1. Whitespace other than Unicode spaces (Zs) becomes an ASCII space: tab, CR, LF and
       the other whitespace controls, U+2028/U+2029 (Zl, Zp), so a line break in a name
       never reaches a header or a log line.
    2. Other control characters (Cc), format characters (Cf: bidi overrides, zero-width;
       they disguise an extension), lone surrogates and private-use characters dropped.
    3. NFC; only the last path component (``/`` and ``\\`` both separate: browsers on
       Windows send ``C:\\x\\a.pdf``).
    4. Leading and trailing whitespace (any, Zs too) trimmed: a header value would lose it.
    5. Empty, or only dots (``.``, ``..``, ``...``): ``upload``; no key segment is ever
       ``.`` or ``..``.
    6. At most ``MAX_FILENAME_BYTES`` of UTF-8, cut from the stem so the extension stays.
    """
    if not name:
        return DEFAULT_FILENAME
    # NFC after the drops: a dropped character between a letter and its accent
    # (``e\u202e\u0301``) would otherwise leave the pair uncomposed.
    name = unicodedata.normalize("NFC", "".join(_clean_char(c) for c in name))
    name = re.split(r"[/\\]", name)[-1].strip()
    if not name.strip("."):
        return DEFAULT_FILENAME
    if len(name.encode()) > MAX_FILENAME_BYTES:
        stem, ext = posixpath.splitext(name)
        if len(ext.encode()) > 16:
            stem, ext = name, ""
        budget = MAX_FILENAME_BYTES - len(ext.encode())
        stem = stem.encode()[:budget].decode("utf-8", "ignore").rstrip()
        name = (stem if stem.strip(".") else DEFAULT_FILENAME) + ext
    return name


def _clean_char(c: str) -> str:
    """One character of a filename: itself, a space (rule 1) or nothing (rule 2)."""
    category = unicodedata.category(c)
    if c.isspace() and category != "Zs":
        return " "
    if category in _DROPPED_CATEGORIES:
        return ""
    return c


#: The fields a template may hold, each used plainly: ``{uuid}``, never ``{uuid:.1}``,
#: ``{uuid!r}``, ``{uuid.hex}`` or ``{uuid[0]}``. A format spec, conversion or attribute
#: or index access can cut or change a field (``{uuid:.1}`` leaves 16 keys, and
#: --no-overwrite, which follows ``{uuid}``, off), so none is taken.
FIELDS = frozenset(_SAMPLE_FIELDS)


def _fields(template: str) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pieces of a template, as ``str.format`` reads
    it (``{{`` is a literal brace, not a field); ValueError if it is broken."""
    return [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]


def field_problem(template: str) -> str | None:
    """Why a field of ``template`` is not one of ``FIELDS`` used plainly, or None. Pure.

    Refusing beats judging the rendered value: no spec, conversion or access can then
    make a field other than what ``make_key`` fills in, so the ``{uuid}`` that
    ``unique_keys`` sees is the whole uuid in every key.
    """
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"broken field: {exc}"
    for _, name, spec, conversion in pieces:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "")
        shown += (f":{spec}" if spec else "") + "}"
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base in FIELDS and (base != name or spec or conversion):
            return (
                f"field {shown} must be used plainly, as {{{base}}} "
                "(no format spec, conversion, attribute or index: they can cut or change it)"
            )
        if name not in FIELDS:
            known = " ".join("{" + f + "}" for f in _SAMPLE_FIELDS)
            return f"unknown field {shown} (fields: {known})"
    return None


def template_prefix(template: str) -> str:
    """The literal part of the template before the first field: every key starts with it."""
    prefix = ""
    for literal, name in _fields(template):
        prefix += literal
        if name is not None:
            break
    return prefix


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


class KeyRefused(ValueError):
    """A client-supplied key the caller may not use.

    ``too_long`` marks the one refusal that is about S3 rather than the caller (a
    key S3 cannot hold, 400); every other is a key the caller may not touch (403).
    """

    def __init__(self, reason: str, *, too_long: bool = False) -> None:
        super().__init__(reason)
        self.too_long = too_long


class HasPrefix(Protocol):
    """An upload grant, as far as keys go (``tokens.UploadGrant``)."""

    @property
    def prefix(self) -> str: ...


def malformed(key: str) -> str | None:
    """Why ``key`` is not a key this proxy could make, or None (see the module docstring)."""
    if not key:
        return "the key must not be empty"
    if "\\" in key or any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in key):
        return (
            "the key must not hold backslashes, control, format, private-use or line "
            "separator characters"
        )
    if any(seg in ("", ".", "..") for seg in key.split("/")):
        return "the key must not hold empty, . or .. segments"
    if key.startswith(RESERVED_NAMESPACE):
        return f"keys under {RESERVED_NAMESPACE} are the proxy's own (resumable upload state)"
    return None


def template_problem(template: str) -> str | None:
    """Why keys made from ``template`` would not be keys the proxy lets their maker use.

    The template is filled with plain sample values and checked as a client key:
    a literal ``//``, ``./`` or ``../`` (which ``make_key``'s normalizing would
    silently rewrite, moving keys out from under the template's prefix), a
    leading ``/``, a backslash or a control character is a problem.
    """
    if (problem := field_problem(template)) is not None:
        return problem
    sample = template.format(**_SAMPLE_FIELDS)
    if all(name is None for _, name in _fields(template)):
        return "has no field, so every upload would get the same key"
    return malformed(sample)


def unique_keys(template: str) -> bool:
    """Does every upload get a key of its own (a fresh, whole ``{uuid}`` in it; ``{{uuid}}``
    is the literal text, and ``{uuid:.1}`` is not whole: ``field_problem`` refuses it)?"""
    return any(
        name == "uuid" and not spec and not conversion
        for _, name, spec, conversion in string.Formatter().parse(template)
    )


@dataclass(frozen=True)
class WritePolicy:
    """How the upload pipeline writes a key and what it may delete when it fails.

    The default is the one for a ``{uuid}`` template: no condition, and the key is the
    upload's own (see the module docstring and ``write_policy``).
    """

    # Send If-None-Match: * on PutObject and CompleteMultipartUpload: a key that exists
    # is refused (409 KEY_EXISTS) and the object carries the upload's nonce.
    if_none_match: bool = False
    # Every key is new ({uuid}): an object at it after a failed write is this upload's.
    unique_keys: bool = True

    @property
    def cleanup(self) -> str:
        """What a failed upload does to an object a write of its may have stored:
        ``delete`` it, or, where keys are shared, delete it only if it carries our ``nonce``
        (checked with HeadObject, then deleted with If-Match on its ETag). With
        ``--no-overwrite false`` it used to be kept, since it may be someone else's: a
        client told its upload failed found it stored."""
        return "delete" if self.unique_keys else "nonce"


UNIQUE_KEYS = WritePolicy()  # a {uuid} template's: no condition, the key is the upload's own


def write_policy(template: str, no_overwrite: bool | None) -> WritePolicy:
    """``--no-overwrite`` (None: unset) with ``--key-template`` as a WritePolicy.

    Unset means on for a template without ``{uuid}`` and off with one: a uuid key is
    already unique (122 random bits), so the condition would protect nothing and would
    only tie every upload to a store that implements conditional writes (S3 answered
    NotImplemented before 2024-08, and some S3-compatible stores still do).
    """
    unique = unique_keys(template)
    return WritePolicy(
        if_none_match=not unique if no_overwrite is None else no_overwrite, unique_keys=unique
    )


def owned_by(metadata: Mapping[str, str], nonce: str) -> bool:
    """Is the object whose metadata this is the one written by the upload with ``nonce``?"""
    return metadata.get(NONCE_META) == nonce


@dataclass(frozen=True)
class KeyPolicy:
    """Which keys one caller gets and may use (the rule is in the module docstring)."""

    template: str  # --key-template
    grant_prefix: str = ""  # an upload token's prefix; "" for anonymous and API-key callers

    def __post_init__(self) -> None:
        # tokens.py rule 6 guarantees it; refused here too, so no caller can build a
        # policy where the grant "users/4" reaches "users/42/".
        if self.grant_prefix and not self.grant_prefix.endswith("/"):
            raise ValueError(f"grant prefix {self.grant_prefix!r} must end with /")

    @classmethod
    def for_grant(cls, template: str, grant: HasPrefix | None) -> KeyPolicy:
        return cls(template, "" if grant is None else grant.prefix)

    @property
    def prefix(self) -> str:
        """Every key this caller gets, and every key it may use, starts with this."""
        return self.grant_prefix + template_prefix(self.template)

    def new_key(
        self,
        filename: str,
        field: str = "file",
        *,
        now: dt.datetime | None = None,
        upload_id: str | None = None,
    ) -> str:
        """The key for a new upload; ValueError if the template cannot make a usable one."""
        key = self.grant_prefix + make_key(self.template, filename, field, now, upload_id)
        self.check(key)  # a key the caller could not then read is never handed out
        return key

    def check(self, key: str) -> None:
        """May this caller read, complete or abort ``key``? KeyRefused if not."""
        problem = malformed(key)
        if problem is not None:
            raise KeyRefused(problem)
        if not key.startswith(self.prefix) or key == self.prefix:
            raise KeyRefused(f"keys you may use start with {self.prefix!r}")
        if len(key.encode()) > MAX_KEY_BYTES:  # lone surrogates were refused above
            raise KeyRefused("the key is longer than S3's 1024-byte limit", too_long=True)


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback and an RFC 5987 ``filename*`` (RFC 6266).

    The fallback is the name with its accents dropped (NFKD) and what has no ASCII form
    left out; when nothing of the stem is left (``日本語.txt``) it is ``upload`` plus
    the extension, never ``.txt``: a client that reads only the fallback would save a
    hidden file."""
    safe = sanitize_filename(filename)
    ascii_name = (
        unicodedata.normalize("NFKD", safe).encode("ascii", "ignore").decode().replace('"', "")
    )
    ascii_name = ascii_name.replace("\\", "").strip()
    if ascii_name.startswith(".") and not safe.startswith("."):
        ascii_name = DEFAULT_FILENAME + ascii_name  # the stem had no ASCII form
    if not ascii_name.strip("."):
        ascii_name = DEFAULT_FILENAME
    if ascii_name == safe:
        return f'attachment; filename="{ascii_name}"'
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(safe, safe='')}"
