"""How many bytes of chunk extensions a chunked request body carries (sans-IO).

llhttp, aiohttp's parser, skips a chunk's extensions (``1f;name=value``) without a limit
and aiohttp registers no callback for them: they are neither data nor a header, so no
limit of the proxy saw them (measured: 50 MB of extension on one chunk passed a 1 MiB
--max-request-size, 201). RFC 9112 section 7.1.1: a server ought to limit their total
length and answer 4xx past it. ``ChunkExtensions`` follows a body's chunk framing only
as far as it needs to count them: the parser still decides what is valid framing; on
anything it does not expect, this stops counting and leaves the refusal to the parser.
"""

from __future__ import annotations

import re
import sys

# Chunk extensions a request may carry in all, as Node.js allows (its fix for
# CVE-2024-22019): none of the proxy's clients sends any.
MAX_CHUNK_EXTENSIONS = 16 * 1024
# A chunked body's trailer section in all, its blank line included, as a request head
# (protocol.MAX_HEAD_SIZE): llhttp's parser holds its fields until the section ends, and
# 126 fields of 8 KiB stalled before that held ~2 MiB a connection (100: +207 MiB).
MAX_TRAILERS = 32 * 1024

_HEX = re.compile(rb"[0-9A-Fa-f]*")
_MAX_SIZE_DIGITS = 16  # llhttp refuses a chunk size over 64 bits
# The framing every client sends, taken a chunk per step rather than a byte per step
# (measured: 1 MiB of 1-byte chunks took 0.41 s byte by byte; peeked at for 40 silent
# waiters in one budget check, that stalled the event loop 2.3 s): a size line without
# extensions, and a chunk's data end followed by the next one's size line.
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?![0-9A-Fa-f])([^\r\n]*)\r?\n")
_NEXT_SIZE_LINE = re.compile(rb"\r?\n([0-9A-Fa-f]{1,16})(?![0-9A-Fa-f])([^\r\n]*)\r?\n")
_CRS = re.compile(rb"\r*")
_BLANK_LINE = re.compile(rb"\r*\n")  # a trailer section's end, at a line's start
_LINE_THEN_BLANK = re.compile(rb"\n\r*\n")  # ... after a line
# No bound on the size lines one ``follow`` walks.
ALL_LINES = sys.maxsize

_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)
# The phases a walk can be in, named for s3proxy.chunked, whose decoder hands its state on
# as a walk (``ChunkExtensions.resumed``).
SIZE, DATA, DATA_END, TRAILERS, DONE = _SIZE, _DATA, _DATA_END, _TRAILERS, _DONE


class ChunkExtensions:
    """Fed a chunked body's bytes as they come (the body's first byte first; what follows
    the body may come too), counts the bytes of its chunk-size lines after the size.

    Python work is per chunk-size line (``follow`` counts them), never per byte: data,
    extensions and trailers are skipped in C (find, regular expressions)."""

    __slots__ = (
        "_digits",
        "_in_size",
        "_left",
        "_line",
        "_partial",
        "_state",
        "data",
        "total",
        "trailed",
        "trailers",
    )

    def __init__(self) -> None:
        self.total = 0  # extension bytes so far
        self.data = 0  # chunk data bytes so far (what a parser that read them passed on)
        self._state = _SIZE
        self._digits = b""  # the size's hex digits so far, leading zeros dropped
        self._in_size = True  # still in the size's digits on this line
        self._left = 0  # data bytes of this chunk still due
        self._line = 0  # bytes of this trailer line so far
        self._partial = False  # bytes of a size line were taken, not its end
        self.trailed = False  # a trailer field came (the trailer section is not empty)
        self.trailers = 0  # bytes of the trailer section so far

    @classmethod
    def resumed(cls, phase: int, left: int = 0, total: int = 0) -> ChunkExtensions:
        """A walk at a line's start in ``phase`` (``left`` data bytes still due in DATA),
        ``total`` extension bytes counted: where a decoder that walked the same bytes is."""
        walk = cls()
        walk._state, walk._left, walk.total = phase, left, total
        return walk

    @property
    def phase(self) -> int:
        return self._state

    @property
    def at_size_line(self) -> bool:
        """At a chunk-size line's first byte (no byte of it taken yet)."""
        return self._state == _SIZE and not self._partial

    @property
    def left(self) -> int:
        """Data bytes of this chunk still due (DATA)."""
        return self._left

    @property
    def done(self) -> bool:
        """The body ended, or its framing is one the parser will refuse."""
        return self._state == _DONE

    def feed(self, data: bytes) -> int:
        """Take the next bytes; the extension bytes counted in all so far."""
        self.follow(data)
        return self.total

    def follow(self, data: bytes, start: int = 0, lines: int = ALL_LINES) -> tuple[int, int]:
        """Take ``data`` from ``start`` on, but no more than ``lines`` chunk-size lines:
        (where it stopped, the size lines it walked). It stops at the data's end, at
        the body's end (``done``), or before a size line past ``lines``; ``follow``
        again from there goes on as if it had not stopped."""
        pos, end, walked = start, len(data), 0
        while pos < end:
            state = self._state
            if state == _DATA:
                step = min(self._left, end - pos)
                self._left -= step
                self.data += step
                pos += step
                if self._left == 0:
                    self._state = _DATA_END
            elif state == _DATA_END:
                # chunk after chunk while each comes whole: a regular expression per chunk
                while walked < lines:
                    found = _NEXT_SIZE_LINE.match(data, pos)
                    if found is None:
                        break
                    walked += 1
                    self.total += len(found.group(2))
                    size = int(found.group(1), 16)
                    pos = found.end()
                    if size == 0 or pos + size > end:
                        self._chunk(size)
                        break
                    pos += size
                    self.data += size
                if self._state != _DATA_END:
                    continue
                pos = _CRS.match(data, pos).end()  # type: ignore[union-attr]  # matches always
                if pos == end:
                    break
                self._state = _SIZE if data[pos] == 0x0A else _DONE  # else: data past its size
                pos += 1
            elif state == _SIZE:
                if walked >= lines:
                    break
                walked += 1
                if self._in_size and not self._digits:
                    found = _SIZE_LINE.match(data, pos)
                    if found is not None:
                        pos = found.end()
                        self.total += len(found.group(2))
                        self._chunk(int(found.group(1), 16))
                        continue
                pos = self._size_line(data, pos)
            elif state == _TRAILERS:  # their end, and their bytes (MAX_TRAILERS)
                start, pos = pos, self._trailers(data, pos)
                self.trailers += pos - start
            else:
                break
        return pos, walked

    def _chunk(self, size: int) -> None:
        """A size line ended, giving ``size``."""
        if size == 0:
            self._state, self._line = _TRAILERS, 0
        else:
            self._state, self._left = _DATA, size

    def _size_line(self, raw: bytes, pos: int) -> int:
        """Read a chunk-size line's bytes from ``pos``; where reading stopped."""
        newline = raw.find(b"\n", pos)
        stop = len(raw) if newline < 0 else newline
        segment = raw[pos:stop]
        if self._in_size:
            digits = _HEX.match(segment)
            assert digits is not None  # matches the empty string at worst
            self._digits = (self._digits + digits.group()).lstrip(b"0")
            if len(self._digits) > _MAX_SIZE_DIGITS:
                self._state = _DONE
                return stop
            if digits.end() < len(segment):
                self._in_size = False
            segment = segment[digits.end() :]
        self.total += len(segment) - segment.count(b"\r")
        self._partial = newline < 0
        if newline < 0:
            return stop
        size = int(self._digits or b"0", 16)
        self._digits, self._in_size = b"", True
        self._chunk(size)
        return newline + 1

    def _trailers(self, raw: bytes, pos: int) -> int:
        """Read trailer lines from ``pos`` up to the blank line that ends them (CRs do
        not count: a line of CRs is blank); where reading stopped."""
        end = len(raw)
        if self._line == 0:
            blank = _BLANK_LINE.match(raw, pos)
            if blank is not None:
                self._state = _DONE
                return blank.end()
        crs = _CRS.match(raw, pos)
        if crs is not None and crs.end() < end:  # (CRs alone may begin the blank line)
            self.trailed = True
        found = _LINE_THEN_BLANK.search(raw, pos)
        if found is not None:
            self._state = _DONE
            return found.end()
        last = raw.rfind(b"\n", pos)
        if last < 0:
            self._line += (end - pos) - raw.count(b"\r", pos, end)
        else:
            self._line = (end - last - 1) - raw.count(b"\r", last + 1, end)
        return end
