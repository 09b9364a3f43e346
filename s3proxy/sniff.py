"""Content type from the file's first bytes (libmagic), with the fallbacks it needs.

libmagic is right about what a file *is*, but says ``application/zip`` for OOXML
and ODF documents it cannot see into, ``application/CDFV2`` / ``x-ole-storage`` for
legacy Office files, and ``application/octet-stream`` when it has no idea. Then
the declared type or the extension knows better.

libmagic's cost depends on the bytes, not only on how many: a text file's head goes
through its text tests, some of which scan runs of whitespace again and again (64 KiB
of newlines: 220-250 ms of CPU; of spaces or tabs: 70 ms; ordinary text 1-3 ms, a PDF
0.04 ms). Uploads call ``sniff_upload``: a head libmagic may take for text
(``may_be_text``) is sniffed in a worker thread (ctypes lets go of the GIL), so one
such file no longer holds the event loop, and every other upload on it, for a quarter
of a second; any other head is sniffed at once, as the thread's hop cost a small
upload 0.07-0.5 ms more CPU. Fewer bytes or libmagic's regex limit would cap the cost
but change verdicts (JSON files of 8-64 KiB, C and Python sources), so the bytes it
sees are the same.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import mimetypes
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import magic

SNIFF_BYTES = 64 * 1024  # the most of a file's first bytes libmagic is shown
# Threads that run libmagic for uploads: its worst heads take a quarter of a second.
SNIFF_THREADS = 2
OCTET_STREAM = "application/octet-stream"

_ZIP_TYPES = {"application/zip", "application/x-zip-compressed", "application/x-zip"}
_OLE_TYPES = {"application/cdfv2", "application/x-ole-storage", "application/vnd.ms-office"}
_UNKNOWN = {OCTET_STREAM, "application/x-empty", "inode/x-empty", "application/x-data"}

_EXTRA_TYPES = {
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".ppsx": "application/vnd.openxmlformats-officedocument.presentationml.slideshow",
    ".potx": "application/vnd.openxmlformats-officedocument.presentationml.template",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".ods": "application/vnd.oasis.opendocument.spreadsheet",
    ".odp": "application/vnd.oasis.opendocument.presentation",
    ".doc": "application/msword",
    ".xls": "application/vnd.ms-excel",
    ".ppt": "application/vnd.ms-powerpoint",
    ".pps": "application/vnd.ms-powerpoint",
    ".key": "application/vnd.apple.keynote",
    ".epub": "application/epub+zip",
}
_ZIP_BASED = {"application/epub+zip", "application/java-archive", "application/vnd.apple.keynote"}
_OLE_BASED = {"application/msword", "application/vnd.ms-excel", "application/vnd.ms-powerpoint"}

# A libmagic handle is not safe to share between threads: one per thread.
_local = threading.local()


def _libmagic() -> magic.Magic:
    handle: magic.Magic | None = getattr(_local, "magic", None)
    if handle is None:
        handle = _local.magic = magic.Magic(mime=True)
    return handle


@functools.cache
def _sniff_executor() -> ThreadPoolExecutor:
    """The sniff threads, made on first use (``--workers`` starts its processes anew, so
    none inherits another's)."""
    return ThreadPoolExecutor(SNIFF_THREADS, thread_name_prefix="sniff")


def guess_from_name(filename: str) -> str | None:
    ext = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    return _EXTRA_TYPES.get(ext) or mimetypes.guess_type(filename, strict=False)[0]


@dataclass(frozen=True)
class Sniffed:
    """The type to store, and whether the bytes themselves vouch for it.

    Only a vouched-for type may pass an allowlist: a client cannot get an
    unidentifiable file past ``--allow-type application/pdf`` by declaring it a PDF.
    """

    content_type: str
    confident: bool
    # what libmagic saw when the name refined it (text/plain for a .csv): the bytes
    # vouch for it too, so an allowlist of text/plain takes the CSV
    seen: str | None = None

    @property
    def described(self) -> str:
        """What a refusal says the file is: the type an allowlist was checked against,
        so an unidentified file is never named by the type its client declared."""
        return self.content_type if self.confident else f"unidentified ({OCTET_STREAM})"

    def allowed_by(self, allowlist: tuple[str, ...]) -> bool:
        if self.seen is not None and allowed(self.seen, allowlist):
            return True
        return allowed(self.content_type if self.confident else OCTET_STREAM, allowlist)


# Byte-order marks of UTF-16 and UTF-32: the only text libmagic finds in bytes with a NUL.
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


Piece = bytes | bytearray | memoryview  # what an upload's first bytes come in


def first_bytes(pieces: Iterable[Piece], limit: int = SNIFF_BYTES) -> bytes:
    """The first ``limit`` bytes of ``pieces``, as one copy. Pure."""
    head = bytearray()
    for piece in pieces:
        if len(head) >= limit:
            break
        head += piece[: limit - len(head)]
    return bytes(head)


def _has_nul(piece: Piece, end: int) -> bool:
    if isinstance(piece, bytes | bytearray):
        return piece.find(b"\0", 0, end) >= 0  # no copy
    return b"\0" in bytes(piece[:end])


def may_be_text(pieces: Sequence[Piece]) -> bool:
    """Whether libmagic may take the file whose first bytes are ``pieces`` for text, and
    so run its text tests, the slow ones. Pure. Its encodings (file 5.44,
    ascmagic/encoding.c) are ASCII, UTF-8, UTF-7, ISO-8859, extended ASCII and EBCDIC,
    none with a NUL byte, and UTF-16 and UTF-32 only after a byte-order mark: a NUL in the
    bytes it sees, and no such mark, is binary."""
    if first_bytes(pieces, 4).startswith(_WIDE_BOMS):
        return True
    left = SNIFF_BYTES
    for piece in pieces:
        if left <= 0:
            break
        if _has_nul(piece, left):
            return False
        left -= len(piece)
    return True


async def sniff_upload(pieces: Sequence[Piece], filename: str, declared: str | None) -> Sniffed:
    """``sniff`` of a file whose first bytes are ``pieces`` (an upload's chunks, which the
    budget counts): in a sniff thread when libmagic may take them for text, so that the
    event loop goes on serving meanwhile; else here. Only a running sniff copies the
    first 64 KiB (a queued one holds the chunks, not a copy of them); the chunks must not
    change until it returns (bytes do not)."""
    if not may_be_text(pieces):
        return sniff(first_bytes(pieces), filename, declared)
    head: list[Piece] = []  # the chunks libmagic will see, not the list, which goes on
    size = 0
    for piece in pieces:
        if size >= SNIFF_BYTES:
            break
        head.append(piece)
        size += len(piece)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_sniff_executor(), _sniff_pieces, head, filename, declared)


def _sniff_pieces(pieces: list[Piece], filename: str, declared: str | None) -> Sniffed:
    return sniff(first_bytes(pieces), filename, declared)


def sniff(head: bytes | bytearray | memoryview, filename: str, declared: str | None) -> Sniffed:
    """The content type to store for a file whose first bytes are ``head``."""
    found = OCTET_STREAM
    if len(head):
        found = _libmagic().from_buffer(bytes(head[:SNIFF_BYTES])).lower()
    by_name = guess_from_name(filename)
    declared = (declared or "").split(";")[0].strip().lower() or None
    if (
        found in _ZIP_TYPES
        and by_name
        and (
            by_name.startswith(("application/vnd.openxmlformats", "application/vnd.oasis"))
            or by_name in _ZIP_BASED
        )
    ):
        return Sniffed(by_name, True)
    if found in _OLE_TYPES and by_name in _OLE_BASED:
        return Sniffed(by_name, True)
    if found in _UNKNOWN:
        if declared and declared != OCTET_STREAM:
            return Sniffed(declared, False)
        return Sniffed(by_name or OCTET_STREAM, False)
    if found == "text/plain" and by_name and by_name.startswith("text/"):
        return Sniffed(by_name, True, found)  # csv, markdown, ...: libmagic only sees text
    return Sniffed(found, True)


def allowed(content_type: str, allowlist: tuple[str, ...]) -> bool:
    """True if no allowlist is set or the type matches one entry (``image/*`` wildcards)."""
    if not allowlist:
        return True
    return any(fnmatch.fnmatchcase(content_type, pattern.lower()) for pattern in allowlist)
