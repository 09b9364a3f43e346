"""Pure: a form part's Content-Disposition, read the way real clients write it.

aiohttp's parser is wrong for real clients: it splits filenames on ``;`` and treats
every ``\\`` as an escape, so ``Invoice; March; 2026.pdf`` and ``C:\\Users\\me\\a.pdf``
come out broken. What clients really send (captured, see tests/test_disposition.py):

- Chromium, Firefox, Node fetch (undici), curl >= 7.81, requests (urllib3 2): WHATWG
  form encoding. The value is UTF-8 in double quotes; ``"``, CR and LF are written
  ``%22``, ``%0D``, ``%0A``; everything else is raw, backslashes and ``;`` included.
- httpx and urllib3 1.x: the same, but a backslash is doubled.
- aiohttp ``FormData``: the filename percent-encoded as a whole (RFC 7578 section 4.2,
  ``Pr%C3%A4sentation.pptx``); a field name as an RFC 5322 quoted-string (``\\"``,
  ``\\\\``, ``\\ ``), or as ``name*=utf-8''...`` when it is not ASCII.
- curl < 7.81: ``\\"`` and ``\\\\`` escapes.

The rules, in order:

1. Header bytes are our input (aiohttp decodes them as UTF-8 with surrogateescape;
   :func:`header_bytes` undoes that losslessly).
2. Split into parameters quote-aware: ``;`` inside double quotes is data. Inside quotes
   a backslash escapes only ``"``, ``\\``, space and tab (the characters some client
   escapes); before anything else it is a literal backslash (a Windows path). A value
   whose quotes do not close under that rule (a browser's ``"dir\\"``) is read again
   with every backslash literal. Parameter names are case-insensitive; a parameter
   given twice is refused.
   If that reading finds no filename but the all-literal one does (``name="dir\\";
   filename="a.txt"`` from a WHATWG client), the literal one is taken: a part that
   names a file must never be read as a field.
3. ``filename*`` / ``name*`` (RFC 8187, and RFC 2231 continuations ``filename*0*``...)
   win over ``filename`` / ``name`` when they decode (charset UTF-8 or ISO-8859-1) to a
   non-empty value; an empty one (``filename*=UTF-8''``) leaves the plain parameter.
   One that does not (another charset, a bad escape, a missing piece) and has no plain
   ``filename`` beside it is read best-effort (UTF-8, else windows-1252): still a file.
4. A plain value is percent-decoded only when it holds at least one ``%``, every ``%``
   starts a ``%XX`` escape, and the decoded bytes are valid UTF-8 (so ``100%.pdf`` and
   ``a%2.txt`` stay as they are; a literal ``%41`` in a name cannot be told apart and
   becomes ``A``).
5. Bytes that are not valid UTF-8 are read as windows-1252, as WHATWG's decoder does for
   legacy pages: ``caf\\xe9.txt`` is ``café.txt``. So no surrogate ever leaves here.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote_from_bytes, unquote_to_bytes

from s3proxy.errors import quoted

# The bytes a quoted-string backslash escapes; any other backslash is data.
_ESCAPABLE = frozenset(b'"\\ \t')
_PERCENT_ESCAPES = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_EXT_VALUE = re.compile(rb"^([A-Za-z0-9!#$&+^_`{}~-]*)'[A-Za-z0-9-]*'(.*)$", re.DOTALL)
_CONTINUATION = re.compile(r"^(.+)\*([0-9]+)(\*?)$")
_CHARSETS = {"utf-8": "utf-8", "iso-8859-1": "latin-1"}


def _windows_1252_table() -> list[str]:
    # WHATWG's windows-1252 maps the five bytes Python's cp1252 leaves undefined to C1.
    table = []
    for byte in range(256):
        try:
            table.append(bytes([byte]).decode("cp1252"))
        except UnicodeDecodeError:
            table.append(chr(byte))
    return table


_WINDOWS_1252 = _windows_1252_table()


@dataclass(frozen=True)
class FormDisposition:
    """A form part's identity: ``filename`` is None for a plain field, "" if sent empty."""

    type: str
    name: str | None
    filename: str | None


def header_bytes(value: str) -> bytes:
    """The bytes the client sent, from a header value aiohttp decoded with surrogateescape."""
    return value.encode("utf-8", "surrogateescape")


def decode_text(raw: bytes) -> str:
    """UTF-8 if the bytes are valid UTF-8, else windows-1252: never a surrogate."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(_WINDOWS_1252[b] for b in raw)


def decode_plain(raw: bytes) -> str:
    """A plain parameter value: percent-decoded when that is unambiguous (rule 4)."""
    if b"%" in raw and not _PERCENT_ESCAPES.search(raw):
        try:
            return unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            pass
    return decode_text(raw)


def decode_ext(raw: bytes) -> str | None:
    """An RFC 8187 ``charset'lang'value``; None if it cannot be decoded faithfully."""
    m = _EXT_VALUE.match(raw)
    if m is None or _PERCENT_ESCAPES.search(m.group(2)):
        return None
    charset = _CHARSETS.get(m.group(1).decode("ascii").lower())
    if charset is None:
        return None
    try:
        return unquote_to_bytes(m.group(2)).decode(charset)
    except UnicodeDecodeError:
        return None


def split_params(raw: bytes, escapes: bool = True) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The disposition type and its ``(lowercased name, raw value)`` parameters.

    Raises ValueError on an unterminated quoted string.
    """
    end = len(raw)
    i = raw.find(b";")
    i = end if i < 0 else i
    dtype = raw[:i].strip(b" \t")
    params: list[tuple[str, bytes]] = []
    while i < end:
        i += 1  # past the ";"
        while i < end and raw[i] in b" \t;":
            i += 1
        if i >= end:
            break
        eq, semi = raw.find(b"=", i), raw.find(b";", i)
        if eq < 0 or (0 <= semi < eq):  # a parameter without a value: ignored
            i = end if semi < 0 else semi
            continue
        name = raw[i:eq].strip(b" \t").decode("latin-1").lower()
        i = eq + 1
        while i < end and raw[i] in b" \t":
            i += 1
        if i < end and raw[i] == 0x22:  # '"'
            value = bytearray()
            i += 1
            while True:
                if i >= end:
                    raise ValueError("a quoted parameter has no closing quote")
                c = raw[i]
                if c == 0x22:
                    i += 1
                    break
                if escapes and c == 0x5C and i + 1 < end and raw[i + 1] in _ESCAPABLE:
                    i += 1
                    c = raw[i]
                value.append(c)
                i += 1
            params.append((name, bytes(value)))
            semi = raw.find(b";", i)  # anything between the closing quote and ";" is junk
            i = end if semi < 0 else semi
        else:
            semi = raw.find(b";", i)
            stop = end if semi < 0 else semi
            params.append((name, raw[i:stop].strip(b" \t")))
            i = stop
    return dtype, params


def _blank(text: str) -> bool:
    """Nothing a name could be made of: empty, or only spaces, controls and format
    characters (``filename*=UTF-8''%20``, ``%00``, a zero-width space), which the
    filename's sanitizing drops to nothing. Such a ``key*`` must not hide a plain
    ``key="a.pdf"``."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def _gather(params: list[tuple[str, bytes]], key: str) -> str | None:
    """The value of ``key``: ``key*`` (or its continuations) if it decodes, else ``key``."""
    found = dict(params)
    if f"{key}*" in found:
        ext = decode_ext(found[f"{key}*"])
        if ext is not None and not _blank(ext):
            return ext
    pieces: dict[int, tuple[bool, bytes]] = {}
    for name, value in params:
        m = _CONTINUATION.match(name)
        if m and m.group(1) == key:
            pieces[int(m.group(2))] = (bool(m.group(3)), value)
    if pieces and sorted(pieces) == list(range(len(pieces))):
        ordered = [pieces[n] for n in range(len(pieces))]
        text: str | None
        if ordered[0][0]:  # RFC 2231: the first segment carries the charset
            text = decode_ext(
                b"".join(v if star else quote_from_bytes(v).encode() for star, v in ordered)
            )
        else:
            text = decode_text(b"".join(unquote_to_bytes(v) if star else v for star, v in ordered))
        if text is not None and not _blank(text):
            return text
    if key in found:
        return decode_plain(found[key])
    if f"{key}*" in found:
        return _best_effort(found[f"{key}*"])
    if pieces:
        return "".join(_best_effort(pieces[n][1]) for n in sorted(pieces))
    return None


def _literal_if_it_names_a_file(
    raw: bytes, dtype: bytes, params: list[tuple[str, bytes]]
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Both readings of a ``\\"`` parse; take the one with every backslash literal if
    only it finds a filename. WHATWG clients (browsers, Node, curl, requests) never
    escape, so ``name="dir\\"; filename="a.txt"`` is a field name ending in a backslash
    and a file; read with escapes it was one field, and the file was lost behind a 201.
    """
    try:
        literal = split_params(raw, escapes=False)
    except ValueError:
        return dtype, params
    if _names_a_file(literal[1]) and not _names_a_file(params):
        return literal
    return dtype, params


def _names_a_file(params: list[tuple[str, bytes]]) -> bool:
    return any(n == "filename" or n.startswith("filename*") for n, _ in params)


def _best_effort(raw: bytes) -> str:
    """An extended value that does not decode faithfully, read as well as it can be.

    A part that names a file is a file whatever its name's charset: read as a field,
    its bytes were dropped (or stored as metadata) behind a 201. The name is only a
    hint (sanitized before use), so UTF-8, else windows-1252, of what is there.
    """
    m = _EXT_VALUE.match(raw)
    value = raw if m is None else m.group(2)
    return decode_text(value if _PERCENT_ESCAPES.search(value) else unquote_to_bytes(value))


def parse_form_disposition(raw: bytes) -> FormDisposition:
    """Read a part's Content-Disposition value; raise ValueError with a client-facing reason."""
    try:
        dtype, params = split_params(raw)
    except ValueError:
        dtype, params = split_params(raw, escapes=False)  # a browser's trailing backslash
    else:
        if b'\\"' in raw:
            dtype, params = _literal_if_it_names_a_file(raw, dtype, params)
    names = [n for n, _ in params]
    for n in set(names):
        if names.count(n) > 1:
            raise ValueError(f"the parameter {quoted(n)} is given twice")
    return FormDisposition(
        type=decode_text(dtype).lower(),
        name=_gather(params, "name"),
        filename=_gather(params, "filename"),
    )
