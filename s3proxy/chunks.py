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

# Chunk extensions a request may carry in all, as Node.js allows (its fix for
# CVE-2024-22019): none of the proxy's clients sends any.
MAX_CHUNK_EXTENSIONS = 16 * 1024

_HEX = re.compile(rb"[0-9A-Fa-f]*")
_MAX_SIZE_DIGITS = 16  # llhttp refuses a chunk size over 64 bits

_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)


class ChunkExtensions:
    """Fed a chunked body's bytes as they come (the body's first byte first; what follows
    the body may come too), counts the bytes of its chunk-size lines after the size."""

    __slots__ = ("_digits", "_in_size", "_left", "_line", "_state", "total")

    def __init__(self) -> None:
        self.total = 0  # extension bytes so far
        self._state = _SIZE
        self._digits = b""  # the size's hex digits so far, leading zeros dropped
        self._in_size = True  # still in the size's digits on this line
        self._left = 0  # data bytes of this chunk still due
        self._line = 0  # bytes of this trailer line so far

    @property
    def done(self) -> bool:
        """The body ended, or its framing is one the parser will refuse."""
        return self._state == _DONE

    def feed(self, data: bytes) -> int:
        """Take the next bytes; the extension bytes counted in all so far."""
        view = data
        pos, end = 0, len(view)
        while pos < end and self._state != _DONE:
            if self._state == _SIZE:
                pos = self._size_line(view, pos)
            elif self._state == _DATA:
                step = min(self._left, end - pos)
                self._left -= step
                pos += step
                if self._left == 0:
                    self._state = _DATA_END
            elif self._state == _DATA_END:
                byte = view[pos]
                pos += 1
                if byte == 0x0A:
                    self._state = _SIZE
                elif byte != 0x0D:
                    self._state = _DONE  # data longer than its size: the parser refuses
            else:  # _TRAILERS: the parser limits them; only their end matters here
                byte = view[pos]
                pos += 1
                if byte == 0x0A:
                    if self._line == 0:
                        self._state = _DONE
                    self._line = 0
                elif byte != 0x0D:
                    self._line += 1
        return self.total

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
        if newline < 0:
            return stop
        size = int(self._digits or b"0", 16)
        self._digits, self._in_size = b"", True
        if size == 0:
            self._state, self._line = _TRAILERS, 0
        else:
            self._state, self._left = _DATA, size
        return newline + 1
