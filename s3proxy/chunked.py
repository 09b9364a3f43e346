"""A chunked request body decoded past aiohttp's HTTP parser (sans-IO).

aiohttp's C parser hands every HTTP chunk on as a bytes object of its own, through a
Python callback and a ``StreamReader.feed_data`` each (~1.5 us per chunk): 1-byte chunks
cost ~1,956 CPU s per GiB of file, 100-byte ones ~26. ``ChunkedDecoder`` takes a socket
read and returns the data it holds as one object: a slice of the read where it is all
one chunk's data (no copy when it is the whole read), else the chunks' spans joined. Its
Python work is a regular-expression match per chunk-size line, never per byte, and
for a run of equal small chunks one match and a strided slice per byte of a chunk.

It refuses what llhttp, as aiohttp configures it for requests (strict: no lenient flags),
refuses in chunked framing, found by feeding both the same bytes
(tests/test_chunked.py runs its tables against both):

- a chunk size that is empty, not hex, or over 64 bits (leading zeros do not count);
- anything after the size but extensions: ``;name``, ``;name=token``, ``;name="quoted"``
  (llhttp's grammar, also its quirks: ``;=v`` and ``;;x`` pass, ``;`` before CR and
  ``x=a"b"`` followed by more do not), and past ``MAX_CHUNK_EXTENSIONS`` in all (ours);
- a line end that is not CRLF, after a size line, after chunk data, or in trailers;
- trailer fields that are not ``token ":" OWS value`` (obs-fold, a space before the
  colon, control characters), a Transfer-Encoding or Content-Length among them, a name
  or name and value over ``max_field_size``, more than ``max_headers`` with the head's,
  or a singleton (Host, Content-Type ...) a second time. aiohttp checks the last two on
  a field only once the next one begins, so never on the last trailer: nor does this.

Trailer fields are read and dropped, ``Connection`` too (RFC 9110 section 6.5.1: a
connection's control is no trailer's; the request after a body read by aiohttp's parser
is read by a new parser, which ignores it too, so both paths agree). Bytes after the body
are the next request's, read by a new parser: aiohttp's own carried the last trailer
field, never checked, into the next request's headers.
"""

from __future__ import annotations

import functools
import re

from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import SINGLETON_HEADERS

from s3proxy.chunks import (
    DATA,
    DATA_END,
    DONE,
    MAX_CHUNK_EXTENSIONS,
    MAX_TRAILERS,
    SIZE,
    TRAILERS,
    ChunkExtensions,
)
from s3proxy.errors import FramingLimit

# RFC 9110 section 5.6.2 token, as llhttp's TOKEN table (strict).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# A quoted string's text and quoted pairs, as llhttp takes them: no CTL but HTAB, no DEL.
_QDTEXT = rb"[\t !#-\[\]-~\x80-\xff]"
_QPAIR = rb"\\[\t -~\x80-\xff]"
_QUOTED = rb'"(?:' + _QDTEXT + rb"|" + _QPAIR + rb')*"'
# One extension: ``;`` not followed by SP or CR, a (possibly empty) name, then an
# optional ``=`` with a token, a quoted string, or a token then a quoted string.
_EXT = rb";(?![\r ])" + _TOKEN + rb"*(?:=" + _TOKEN + rb"*(?:" + _QUOTED + rb")?)?"
_EXTS = rb"((?:" + _EXT + rb")*)"
# A whole size line; and, fused with the CRLF that ends the chunk before it, the common
# case of a size without leading zeros (one match per chunk).
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)" + _EXTS + rb"\r\n")
_NEXT_SIZE_LINE = re.compile(rb"\r\n([0-9A-Fa-f]{1,16})(?![0-9A-Fa-f])" + _EXTS + rb"\r\n")
# The beginning of a size line that may still become valid (no LF came yet).
_EXT_BEGUN = (
    rb";(?:(?![\r ])"
    + _TOKEN
    + rb"*(?:="
    + _TOKEN
    + rb'*(?:"(?:'
    + _QDTEXT
    + rb"|"
    + _QPAIR
    + rb")*\\?)?)?)?"
)
_SIZE_BEGUN = re.compile(rb"(?:[0-9A-Fa-f]+(?:" + _EXT + rb")*(?:" + _EXT_BEGUN + rb"|\r)?)?")
_LEADING_ZEROS = re.compile(rb"0+(?=[0-9A-Fa-f])")
_MAX_SIZE_DIGITS = 16  # llhttp: "Chunk size overflow" past 64 bits
# A trailer field line: llhttp skips the whitespace before the value, not after it.
_FIELD_VALUE = rb"[\t !-~\x80-\xff]"
_TRAILER = re.compile(rb"(" + _TOKEN + rb"+):[\t ]*(" + _FIELD_VALUE + rb"*)\r\n")
_TRAILER_BEGUN = re.compile(
    rb"(" + _TOKEN + rb"*)|(" + _TOKEN + rb"+):([\t ]*)(" + _FIELD_VALUE + rb"*\r?)"
)
_REFUSED_TRAILERS = frozenset({b"transfer-encoding", b"content-length"})
# aiohttp's defaults, which s3proxy.protocol passes on as its own.
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128


class ChunkedDecoder:
    """Fed a chunked body's bytes as they come (its first byte first), gives its data.

    ``feed`` returns the data pieces of one read and, once the body ended in it, the
    bytes after the end (else None); it raises an ``HttpProcessingError`` for framing
    llhttp refuses. Bytes of a line not complete yet are kept (``_carry``, bounded:
    leading zeros and whitespace before a trailer's value are dropped from it)."""

    __slots__ = (
        "_carry",
        "_fields",
        "_left",
        "_max_field_size",
        "_max_headers",
        "_pending",
        "_seen",
        "_state",
        "_trailers",
        "total",
    )

    def __init__(
        self,
        *,
        fields: int = 0,
        singletons: frozenset[str] = frozenset(),
        max_field_size: int = MAX_FIELD_SIZE,
        max_headers: int = MAX_HEADERS,
        phase: int = SIZE,
        left: int = 0,
        total: int = 0,
    ) -> None:
        """``fields``: the head's header lines, ``singletons``: the head's names (lower
        case) of those that may appear once, ``phase``/``left``/``total``: where a walk
        of the body so far is (at a line's start, or in a chunk's data)."""
        self._state = phase
        self._left = left  # data bytes of this chunk still due
        self.total = total  # chunk extension bytes so far
        self._carry = b""  # the bytes of a line not complete yet
        self._fields = fields
        self._seen = set(singletons)
        self._max_field_size = max_field_size
        self._max_headers = max_headers
        self._pending: bytes | None = None  # the last trailer's name, not yet checked
        self._trailers = 0  # bytes of the trailer lines complete so far (MAX_TRAILERS)

    @property
    def done(self) -> bool:
        return self._state == DONE

    def walk(self) -> ChunkExtensions:
        """The framing walked so far as a ``ChunkExtensions`` (for body_end.TailWalk)."""
        walk = ChunkExtensions.resumed(self._state, self._left, self.total)
        if self._carry:
            walk.follow(self._carry)  # (it counts the carried line's extensions too)
        return walk

    def feed(self, data: bytes) -> tuple[list[memoryview], bytes | None]:
        """The data in ``data`` (slices of it, or of it after the kept bytes), and what
        follows the body's end when it ended here."""
        if self._carry:
            data, self._carry = self._carry + data, b""
        view = memoryview(data)
        out: list[memoryview] = []
        pos, end = 0, len(data)
        state = self._state
        while pos < end:
            if state == DATA:
                stop = min(pos + self._left, end)
                out.append(view[pos:stop])
                self._left -= stop - pos
                pos = stop
                if self._left == 0:
                    state = DATA_END
            elif state == DATA_END:
                # Chunk after chunk while each comes whole: one match per chunk, and a
                # run of equal small chunks (1-byte ones, say) in one match and a
                # strided slice per byte of a chunk (``_run``).
                total, last = self.total, None
                while True:
                    found = _PLAIN_NEXT(data, pos)
                    if found is not None:
                        digits = found.group(1)
                    else:
                        found = _NEXT_SIZE_LINE.match(data, pos)
                        if found is None:
                            break
                        digits = None
                        total += found.end(2) - found.start(2)
                    size = int(found.group(1), 16)
                    pos = found.end()
                    if size == 0:
                        state = TRAILERS
                        break
                    stop = pos + size
                    if stop > end:
                        out.append(view[pos:])
                        self._left, state, pos = stop - end, DATA, end
                        break
                    out.append(view[pos:stop])
                    pos = stop
                    if digits is not None and digits == last and size <= RUN_MAX:
                        pos = _run(data, pos, digits, size, out)
                    last = digits
                self.total = total
                if total > MAX_CHUNK_EXTENSIONS:
                    raise over_extensions()
                if state != DATA_END or pos == end:
                    continue
                crlf = data[pos : pos + 2]
                if crlf == b"\r\n":
                    pos += 2
                    state = SIZE
                elif crlf == b"\r":
                    self._carry, pos = crlf, end
                else:
                    raise BadHttpMessage(
                        "Expected LF after chunk data"
                        if crlf[:1] == b"\r"
                        else "Missing expected CR after chunk data"
                    )
            elif state == SIZE:
                pos, state = self._size_line(data, pos)
            elif state == TRAILERS:
                pos, state = self._trailer(data, pos)
                if self._trailers + len(self._carry) > MAX_TRAILERS:
                    raise over_trailers()
            else:
                break
        self._state = state
        if state == DONE:
            return out, data[pos:]
        return out, None

    def _size_line(self, data: bytes, pos: int) -> tuple[int, int]:
        """A size line from ``pos``: where it ended, and the phase after it."""
        found = _SIZE_LINE.match(data, pos)
        if found is None:
            return self._size_begun(data, pos), SIZE
        digits = found.group(1)
        if len(digits) > _MAX_SIZE_DIGITS and len(digits.lstrip(b"0")) > _MAX_SIZE_DIGITS:
            raise BadHttpMessage("Chunk size overflow")
        self.total += found.end(2) - found.start(2)
        if self.total > MAX_CHUNK_EXTENSIONS:
            raise over_extensions()
        size = int(digits, 16)
        if size == 0:
            return found.end(), TRAILERS
        self._left = size
        return found.end(), DATA

    def _size_begun(self, data: bytes, pos: int) -> int:
        """A size line from ``pos`` not complete in ``data``: kept if it may still be
        valid (refused as llhttp refuses it on its first bad byte); where it ended."""
        carry = data[pos:]
        zeros = _LEADING_ZEROS.match(carry)
        if zeros is not None:
            carry = carry[zeros.end() :]
        digits = len(_HEX_RUN.match(carry).group())  # type: ignore[union-attr]  # always
        if digits > _MAX_SIZE_DIGITS:
            raise BadHttpMessage("Chunk size overflow")
        if _SIZE_BEGUN.fullmatch(carry) is None:
            raise BadHttpMessage(
                "Invalid character in chunk extensions or line end"
                if digits
                else "Invalid character in chunk size"
            )
        if self.total + len(carry) - digits - carry.endswith(b"\r") > MAX_CHUNK_EXTENSIONS:
            raise over_extensions()
        self._carry = carry
        return len(data)

    def _trailer(self, data: bytes, pos: int) -> tuple[int, int]:
        """A trailer line, or the blank line that ends them, from ``pos``: where it
        ended, and the phase after it."""
        end_line = data[pos : pos + 2]
        if end_line == b"\r\n":
            self._trailers += 2
            return pos + 2, DONE
        if end_line == b"\r":
            self._carry = end_line
            return len(data), TRAILERS
        if end_line[:1] == b"\r":
            raise BadHttpMessage("Expected LF after headers")
        # A field begins: aiohttp checks the one before it now (its count and name).
        pending, self._pending = self._pending, None
        if pending is not None:
            self._fields += 1
            if self._fields > self._max_headers:
                raise BadHttpMessage("Too many headers received")
            text = pending.decode()
            if text in SINGLETON_HEADERS:
                if text in self._seen:
                    raise BadHttpMessage(f"Duplicate '{text}' header found.")
                self._seen.add(text)
        found = _TRAILER.match(data, pos)
        if found is None:
            begun = _TRAILER_BEGUN.fullmatch(data, pos)
            if begun is None:
                raise BadHttpMessage("Invalid header token or value in trailers")
            name = begun.group(1) if begun.group(1) is not None else begun.group(2)
            value = begun.group(4) or b""
            self._check_size(name, value.rstrip(b"\r"))
            # the whitespace before a value is skipped, not counted: not kept either
            self._carry = data[pos:] if begun.group(2) is None else name + b":" + value
            self._trailers += len(data) - pos - len(self._carry)  # what was skipped counts
            return len(data), TRAILERS
        name, value = found.group(1), found.group(2)
        self._check_size(name, value)
        lower = name.lower()
        if lower in _REFUSED_TRAILERS:
            raise BadHttpMessage(f"{name.decode()} in chunked trailers")
        self._pending = lower
        self._trailers += found.end() - pos
        return found.end(), TRAILERS

    def _check_size(self, name: bytes, value: bytes) -> None:
        if len(name) > self._max_field_size or len(name) + len(value) > self._max_field_size:
            raise LineTooLong(b"a trailer field", self._max_field_size)


_HEX_RUN = re.compile(rb"[0-9A-Fa-f]*")
# The next chunk's size line without extensions, after the CRLF that ends the last one.
_PLAIN_NEXT = re.compile(rb"\r\n([0-9A-Fa-f]{1,16})\r\n").match
# Chunks of at most this many bytes, one after another of the same size line, are taken
# as a run (``_run``).
# Measured, decoder alone, CPU s per GiB: 1-byte chunks 1,362 one by one, 37 as runs;
# 7-byte 144 and 17; 32-byte 40 and 14; past ~50 bytes a strided copy per byte of a
# chunk costs more than a slice per chunk (100-byte: 8 one by one, 18 as runs).
RUN_MAX = 32


@functools.cache
def _run_pattern(width: int, size: int) -> re.Pattern[bytes]:
    """A run's pattern for size lines of ``width`` hex digits and chunks of ``size``
    bytes: at most 16 x ``RUN_MAX`` of them, all kept. The lines of a run must be spelt
    alike (the strided slices take that period): a backreference, not the spelling, ties
    them, for a client chooses spellings (leading zeros, case). Keyed by spelling, 32 of
    them filled a capped cache and every later upload of tiny chunks went chunk by chunk
    (reprobe12c F2); with a least-recently-used cache, pairs of chunks cycling through
    ~500 spellings missed it every time (reprobe13b N3: ~1,150 CPU s/GiB decoder alone)."""
    return re.compile(
        rb"\r\n([0-9A-Fa-f]{%d})\r\n[\s\S]{%d}(?:\r\n\1\r\n[\s\S]{%d})*" % (width, size, size)
    )


def _run(data: bytes, pos: int, digits: bytes, size: int, out: list[memoryview]) -> int:
    """Take the whole chunks of ``size`` bytes with size line ``digits`` that follow
    ``pos`` (where a chunk's data ended) in ``data``: their data joined onto ``out``;
    where they end. One match finds the run, a slice with a step per byte of a chunk
    takes its data (1-byte chunks: ~43,000 in a 256 KiB read, each a Python step and
    an object before, ~1.6 us)."""
    found = _run_pattern(len(digits), size).match(data, pos)
    if found is None or found.group(1) != digits:
        return pos
    run = memoryview(data)[pos : found.end()]
    period = len(digits) + 4 + size
    first = len(digits) + 4
    if size == 1:
        out.append(memoryview(run[first::period].tobytes()))
    else:
        taken = bytearray(len(run) // period * size)
        for i in range(size):
            taken[i::size] = run[first + i :: period]
        out.append(memoryview(taken))
    return found.end()


def over_extensions() -> HttpProcessingError:
    return FramingLimit(
        f"the request body's chunk extensions are over {MAX_CHUNK_EXTENSIONS} bytes "
        "(RFC 9112 section 7.1.1): send chunks without extensions"
    )


def over_trailers() -> HttpProcessingError:
    return FramingLimit(
        f"the request body's trailer section is over {MAX_TRAILERS // 1024} KiB in all"
    )


def joined(pieces: list[memoryview]) -> bytes:
    """``pieces`` as one bytes object: a read itself when the one piece is all of it,
    a copy of the one piece, or the pieces' join."""
    if len(pieces) == 1:
        piece = pieces[0]
        whole = piece.obj
        if isinstance(whole, bytes) and len(piece) == len(whole):
            return whole
        return piece.tobytes()
    return b"".join(pieces)
