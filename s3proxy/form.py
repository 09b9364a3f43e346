"""aiohttp's multipart reader behind a small iterator of fields and files, with the limits.

Framing is aiohttp's (boundaries, header lines, ``BodyPartReader.read_chunk`` for
fields), but for a file part's body: its chunks are scanned for the part's end where
they lie (s3proxy.delimiter) and handed on without a copy (see ``PartSource``). What a
part's headers mean is ours: its Content-Disposition is read by s3proxy.disposition
(aiohttp's parser splits filenames on ``;`` and eats backslashes), so a field name or
filename that leaves this module never holds a surrogate, and a file's ``filename`` is
already the sanitized name the key and Content-Disposition use.

Decisions about part headers (each a 400 MALFORMED_MULTIPART with a clear message):
folded header lines (obs-fold) and lines over 8190 bytes with their CRLF (aiohttp's
limit) are refused;
``Content-Transfer-Encoding`` other than 7bit/8bit/binary is refused (RFC 7578
section 4.7; storing it still encoded would be silent corruption); a part without a
Content-Disposition, without a name, or with a type other than form-data is refused, and
so is one with Content-Disposition, Content-Transfer-Encoding or Content-Type twice
(which one counts would depend on the parser). Messages are ours: aiohttp's echo the
client's bytes (a header line, up to 20 bytes of a file after a boundary).
A file part's ``Content-Digest`` (RFC 9530) and ``Content-MD5`` (RFC 1864) are read into
its ``declared`` digests (s3proxy.digests); one that cannot be read is a 400
INVALID_DIGEST before any of the file is stored. On a field part they are ignored.
An empty filename with content is a file named ``upload``; an empty filename without
content (an unused browser file input) is skipped before it counts as a file.

Every read from the client runs under one ClientWatch per request: an idle timeout
that each received byte re-arms, and the request size limit checked while the read
is still waiting (a huge preamble is cut off as it arrives). Failures become the
errors a client can be told about: malformed, too large, too slow, or gone.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import sys
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Protocol, TypeVar

from aiohttp import BodyPartReader, MultipartReader, StreamReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import (
    BadHttpMessage,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.http_parser import HeadersParser
from multidict import CIMultiDictProxy

from s3proxy.body_end import (
    PEEK_LIMIT,
    PENDING,
    Looked,
    Looks,
    TailWalk,
    chunked_ended,
    length_ended,
    peek,
)
from s3proxy.chunks import ChunkExtensions
from s3proxy.delimiter import DelimiterScan
from s3proxy.digests import (
    PART_DIGEST_HEADERS,
    Declared,
    DigestError,
    read_declared,
    refuse_unchecked,
)
from s3proxy.disposition import header_bytes, parse_form_disposition, split_params
from s3proxy.errors import (
    CLIENT_DISCONNECTED,
    CLIENT_TIMEOUT,
    FIELD_TOO_LARGE,
    INVALID_DIGEST,
    INVALID_FIELD,
    MALFORMED_MULTIPART,
    REQUEST_TOO_LARGE,
    TOO_MANY_FIELDS,
    TOO_MANY_FILES,
    ErrorKind,
    ProxyError,
    quoted,
)
from s3proxy.keys import sanitize_filename
from s3proxy.limits import RateMeter
from s3proxy.protocol import unread_bytes

T = TypeVar("T")

MAX_EMPTY_READS = 4  # read_chunk returns b"" a few times at a truncated end before it raises
# The defaults of --min-upload-rate and --min-rate-window (s3proxy.settings says why).
DEFAULT_MIN_RATE = 32 * 1024
DEFAULT_RATE_WINDOW = 30.0
DEFAULT_MAX_FIELDS_SIZE = 256 * 1024
# Field values are read in small steps: aiohttp holds up to two reads of a part in its
# window until it sees the part's end, and that window is outside the budget.
FIELD_READ = 16 * 1024


@dataclass(frozen=True)
class FormLimits:
    max_files: int
    max_fields: int
    max_field_size: int
    max_request_size: int
    chunk_size: int
    idle_timeout: float = 60.0  # seconds without a byte from the client
    min_rate: float = DEFAULT_MIN_RATE  # bytes/s over rate_window of client time (408 below)
    rate_window: float = DEFAULT_RATE_WINDOW
    max_fields_size: int = DEFAULT_MAX_FIELDS_SIZE  # all field values of a request (413 over)


@dataclass(frozen=True)
class Field:
    name: str
    value: str
    size: int = 0  # bytes of the value as received (counted against the memory budget)


@dataclass(frozen=True)
class Arrival:
    """What a request's client has sent, as seen while its upload waits for memory
    (the proxy does not read the socket then, so it piles up in the kernel)."""

    received: int  # body bytes that reached the proxy: read, or waiting in the kernel
    unread: int  # of those, not read by the request yet (kernel and aiohttp buffers)
    ended: bool | None  # the whole body is here (True), bytes are still owed, unknown
    blocked: bool | None = None  # the receive window is closed: the client waits on us
    # Where ``ended`` is unknown but can be found by looking at the bytes the kernel
    # holds (a chunked body's end may be among them): look. It copies them, so only for
    # a client about to be judged (the answer: ended or not; None: still unknown;
    # body_end.PENDING: the pass's ``Looks`` ran out first, asked again it goes on).
    look: Callable[[Looks], Looked] | None = None


# struct tcp_info (linux/tcp.h): tcpi_rcv_wnd, the receive window last advertised, is
# the u32 at this offset (Linux 6.2 and later; older kernels return a shorter struct).
_TCPI_RCV_WND = 232


def window_closed(sock: Any) -> bool | None:
    """Has the kernel closed ``sock``'s receive window (a zero window advertised: the
    peer may send nothing more until the proxy reads)? None when it cannot tell.

    A client held back by the budget fills the kernel buffer and its window closes; one
    that sent a burst and trickles leaves it open. The bytes held are no sign of this:
    measured on loopback, a fast 12 MiB client held back had 95 KB in the kernel, a
    client that sent 100 KB and then 1 B/s 34 KB (window 93 KB), one that sent 200 KB
    and then 1 B/s 130 KB (window closed: indistinguishable while it waits).
    """
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, ValueError, AttributeError):
        return None
    if len(raw) < _TCPI_RCV_WND + 4:
        return None
    return int.from_bytes(raw[_TCPI_RCV_WND : _TCPI_RCV_WND + 4], sys.byteorder) == 0


class ChunkSource(Protocol):
    """A file's bytes as they arrive: ``read`` returns about ``size`` bytes, b"" at its end.

    A read may bring more than ``size``, up to one chunk as the socket brought it (a file
    part's PartSource never cuts one: a cut copies); readers take the overflow as the
    next bytes.

    ``pause``/``resume`` stop and restart reading the socket while the reader waits for
    memory, so a waiting upload does not fill socket buffers outside the budget.
    """

    async def read(self, size: int) -> bytes: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def expire(self, message: str) -> None:
        """End the pending (or next) read with CLIENT_TIMEOUT ``message``: an eviction."""
        ...

    def arrival(self) -> Arrival | None:
        """What the client has sent so far; None when it cannot tell."""
        ...


class TransportFlow:
    """Stops and restarts reading one request's socket while its upload waits for memory.

    aiohttp pauses the same transport when its own buffer passes the high-water mark;
    resuming is left to aiohttp whenever it still holds such a pause of its own, so the
    two never undo each other.
    """

    def __init__(self, request: web.BaseRequest) -> None:
        self._protocol = request.protocol
        self._transport = request.transport
        self._content = request.content
        self._length = request.content_length
        # Content-Length counts the body's bytes as sent only without a coding on it
        headers = request.headers
        self._coded_length: int | None = None  # ... with one: the connection counts them
        if hdrs.TRANSFER_ENCODING in headers or hdrs.CONTENT_ENCODING in headers:
            if hdrs.TRANSFER_ENCODING not in headers:
                self._coded_length = self._length
            self._length = None
        # The last look at the kernel's bytes: (bytes read, kernel's, what it told).
        self._looked: tuple[int, int, bool | None] | None = None
        # ... and the walk over them, gone on with by the next look (bytes read: a new one).
        self._tail_walk: tuple[int, TailWalk] | None = None
        # ... and, while that walk is pending, the bytes it walks (bytes read, kernel's,
        # the tail): the next pass goes on over them without copying them again.
        self._tail: tuple[int, int, bytes] | None = None
        # s3proxy's protocol hands the rest of a Content-Length body to the request's
        # StreamReader past the HTTP parser, which copies every chunk.
        bypass = getattr(self._protocol, "bypass_parser", None)
        if bypass is not None:
            bypass(request)

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def expect(self, size: int) -> None:
        """The upload waits for ``size`` bytes: the next socket read may take that much."""
        expect = getattr(self._protocol, "expect", None)  # s3proxy's protocol only
        if expect is not None:
            expect(size)

    def arrival(self) -> Arrival | None:
        """The body's bytes read so far plus those the kernel holds unread (FIONREAD),
        and whether that is the whole body (s3proxy.body_end): known from its length as
        sent, or once aiohttp saw its end; a chunked one's from the framing read so far,
        and if its end may be in the kernel, by a ``look`` there. A coded or chunked body
        counts its bytes as sent (the connection's count), a plain one as read."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return None
        sock = transport.get_extra_info("socket")
        kernel = unread_bytes(sock)
        content = self._content
        read = content.total_bytes
        seen = None
        if self._length is None:
            body_seen = getattr(self._protocol, "body_seen", None)  # s3proxy's protocol only
            seen = None if body_seen is None else body_seen(content)
        if seen is not None:
            read = seen[0]
        ended: bool | None = None
        look: Callable[[Looks], Looked] | None = None
        if content.is_eof():
            ended = True
        elif self._length is not None:
            ended = length_ended(read + kernel, self._length)
        elif seen is not None and seen[1] is not None:
            framing = seen[1]
            ended = chunked_ended(framing, kernel)
            if ended is None:
                look = functools.partial(self._look, sock, read, kernel, framing)
        elif seen is not None and self._coded_length is not None:
            ended = length_ended(read + kernel, self._coded_length)
        blocked = window_closed(sock)
        # (a request with no body has aiohttp's EmptyStreamReader: nothing buffered)
        buffered = getattr(content, "_size", 0)
        return Arrival(read + kernel, buffered + kernel, ended, blocked, look)

    def _look(
        self, sock: Any, read: int, kernel: int, framing: ChunkExtensions, looks: Looks
    ) -> Looked:
        """Is a chunked body's end among the ``kernel``'s unread bytes? Looked at once
        while nothing more comes (the answer kept for the same counts), only up to
        ``PEEK_LIMIT`` of them (past it, unknown), and walked as far as ``looks`` lets
        it (``body_end.TailWalk``: the next look goes on from there, over the same
        copy of the bytes while none came: a pending walk copied its whole tail, up to
        a MiB, every pass)."""
        looked = self._looked
        if looked is not None and looked[:2] == (read, kernel):
            return looked[2]
        ended: Looked = None
        if kernel <= PEEK_LIMIT:
            if looks.allow() == 0:
                return PENDING  # this pass has walked all it may: no copy of the bytes
            kept = self._tail
            tail = kept[2] if kept is not None and kept[:2] == (read, kernel) else None
            if tail is None:
                tail = peek(sock, kernel)
            walk = self._tail_walk
            if walk is None or walk[0] != read:  # bytes read since: a new tail
                walk = self._tail_walk = (read, TailWalk(framing))
            if tail is not None:
                ended = walk[1].go(kernel, tail, looks)
        # Kept only while its walk is pending (at most TAIL_LINES lines: a few passes).
        self._tail = (read, kernel, tail) if ended is PENDING and tail is not None else None
        if ended is not PENDING:
            self._looked = (read, kernel, ended)
        return ended

    def resume_reading(self) -> None:
        held = getattr(self._protocol, "_reading_paused", False) or getattr(
            self._protocol, "_buffer_paused", False
        )
        if self._transport is not None and not self._transport.is_closing() and not held:
            self._transport.resume_reading()


@dataclass(frozen=True)
class FilePart:
    """One file part; ``source`` must be read to its end before the next part is asked for."""

    field: str
    filename: str
    declared_type: str | None
    source: ChunkSource
    declared: Declared = dc_field(default_factory=Declared)  # the digests its part headers declared


def client_error(exc: Exception) -> ProxyError | None:
    """What aiohttp's reader raised as MALFORMED_MULTIPART, CLIENT_TIMEOUT or
    CLIENT_DISCONNECTED; None for a ProxyError or anything else (raised as it is).

    A function, not a context manager: it runs only on a failure, and a generator-based
    ``with`` around every read cost ~2% of an upload's event-loop time."""
    if isinstance(exc, ProxyError):
        return None
    if isinstance(exc, TimeoutError):
        return ProxyError(CLIENT_TIMEOUT, "the client sent nothing for too long")
    if isinstance(exc, ConnectionError | PayloadEncodingError):
        return ProxyError(
            CLIENT_DISCONNECTED, "the client closed the connection before the body was complete"
        )
    if isinstance(exc, LineTooLong):
        # aiohttp counts the line end: a limit of 8190 takes 8188 bytes and a CRLF.
        limit = exc.args[1]
        return ProxyError(
            MALFORMED_MULTIPART,
            f"a line in the multipart head (preamble or part header) is longer than "
            f"{limit} bytes with its line end (at most {limit - 2} bytes and a CRLF)",
        )
    if isinstance(exc, InvalidHeader) and exc.hdr[:1] in (" ", "\t"):
        return ProxyError(
            MALFORMED_MULTIPART,
            "a part header is folded over several lines (obs-fold, RFC 9112 section 5.2); "
            "send each header on one line",
        )
    if isinstance(exc, HttpProcessingError):
        return ProxyError(MALFORMED_MULTIPART, _part_head_problem(exc))
    if isinstance(exc, ValueError | AssertionError | LookupError | RuntimeError):
        # aiohttp's text repeats the client's bytes (a boundary line, a header): not sent on
        return ProxyError(MALFORMED_MULTIPART, "the multipart body is malformed")
    return None


# aiohttp's HeadersParser messages for a part's header block (pinned in
# tests/test_aiohttp_contract.py, as protocol.py pins the request's).
_TOO_MANY_PART_HEADERS = "Too many headers received"
# What a part's digest header that is not checked is told to send instead.
_DIGEST_HINT = (
    "declare a file's digest in its part's Content-Digest or Repr-Digest (sha-256, sha-512, "
    "md5, sha) or Content-MD5"
)
#: The most header lines one part may have: a request head's limit (aiohttp's default
#: for both). Browsers send two or three.
MAX_PART_HEADERS = 128
#: The most bytes of one part's header block, its lines and their CRLFs: aiohttp holds
#: the lines until the blank line that ends them, outside the memory budget, and 128 of
#: 8 KiB stalled there held ~1 MiB a connection (reprobe21a: 200 such connections, +200
#: MiB). A browser's is under 1 KiB; a long filename in both filename and filename* ~4 KiB.
MAX_PART_HEAD = 16 * 1024
_DUPLICATE_PART_HEADER = "Duplicate '"


class FormReader(MultipartReader):
    """aiohttp's reader with a part's header block bounded in all (``MAX_PART_HEAD``)."""

    async def _read_headers(self) -> CIMultiDictProxy[str]:
        """aiohttp's ``_read_headers`` (3.14), counting the block's bytes as they come."""
        lines = []
        size = 0
        while True:
            chunk = await self._content.readline(max_line_length=self._max_field_size)
            size += len(chunk)
            if size > MAX_PART_HEAD:
                raise ProxyError(
                    MALFORMED_MULTIPART,
                    f"a part's header block is over {MAX_PART_HEAD // 1024} KiB in all",
                )
            chunk = chunk.rstrip(b"\r\n")
            lines.append(chunk)
            if not chunk:
                break
            if len(lines) > self._max_headers:
                raise BadHttpMessage("Too many headers received")
        headers, _ = HeadersParser(max_field_size=self._max_field_size).parse_headers(lines)
        return headers


def _part_head_problem(exc: HttpProcessingError) -> str:
    """What is wrong with a part's header block, in our words: aiohttp's messages carry
    the client's bytes (``Invalid HTTP header: b''``) and a newline."""
    text = exc.message if isinstance(exc.message, str) else ""
    if isinstance(exc, InvalidHeader):
        return (
            "a part header line is not 'Name: value' (an empty or invalid name, no colon, "
            "or a control character)"
        )
    if text.startswith(_TOO_MANY_PART_HEADERS):
        return f"a part has more than {MAX_PART_HEADERS} header lines"
    if text.startswith(_DUPLICATE_PART_HEADER):
        return "a part repeats a header that may appear once (such as Content-Type)"
    return "a part's header block is malformed"


class ClientWatch:
    """One request's reads from the client: idle timeout, minimum rate, size limit.

    Every read from the client runs under :meth:`read`. It fails with CLIENT_TIMEOUT
    once no byte has arrived for ``idle_timeout`` seconds (every byte re-arms it, in
    the preamble, part headers or data), or once a full ``rate_window`` of client
    time has carried less than ``min_rate`` bytes per second (s3proxy.limits: the
    first window is grace; only time spent inside reads counts, so waits for memory
    or S3 are never held against the client). It fails with REQUEST_TOO_LARGE as
    soon as the body passes ``max_request_size``, even in the middle of one long read
    such as a huge preamble. It watches the body's byte count on a timer: every
    ``MIN_TICK`` seconds while bytes flow, backing off while the client is silent, so
    an idle connection costs about one wakeup a second. :meth:`expire` ends the
    pending (or next) read at once with a given error: the budget's eviction.
    """

    MIN_TICK = 0.05
    MAX_TICK = 1.0

    def __init__(
        self,
        body_bytes: Callable[[], int],
        idle_timeout: float,
        max_request_size: int,
        min_rate: float = DEFAULT_MIN_RATE,
        rate_window: float = DEFAULT_RATE_WINDOW,
    ) -> None:
        self._body_bytes = body_bytes
        self._idle = idle_timeout
        self._max = max_request_size
        self.min_rate = min_rate
        self._max_tick = max(self.MIN_TICK, min(self.MAX_TICK, idle_timeout / 4, rate_window / 4))
        self._client_time = 0.0  # seconds spent inside reads so far
        self._meter = RateMeter(rate_window, 0.0, body_bytes())
        self._expired: ProxyError | None = None
        # The pending read (reads run one at a time): its task, when it began, the client
        # time before it, and what the ticker has seen of it.
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._verdict: ProxyError | None = None
        self._began = self._base = self._last = 0.0
        self._seen = 0
        self._interval = self.MIN_TICK
        # One timer chain for the whole request, not one per read (a GiB is 4,096 reads
        # of 256 KiB): it runs while a read is pending and stops at its first tick after.
        self._ticker: asyncio.TimerHandle | None = None

    def check_size(self) -> None:
        if self._body_bytes() > self._max:
            raise ProxyError(REQUEST_TOO_LARGE, f"request body over the limit of {self._max} bytes")

    def expire(self, kind: ErrorKind, message: str) -> None:
        """End the pending read now (or the next one at its start) with this error."""
        if self._expired is None:
            self._expired = ProxyError(kind, message)
        if self._task is not None:
            self._judge(self._expired)

    def _too_slow(self) -> ProxyError:
        window = self._meter.window
        return ProxyError(
            CLIENT_TIMEOUT,
            f"the client sent under the minimum of {self.min_rate:.0f} bytes/s over {window:g} s",
        )

    def _judge(self, err: ProxyError) -> None:
        """End the pending read with ``err``: cancel its task (``read`` turns it into err)."""
        if self._task is not None and self._verdict is None:
            self._verdict = err
            self._task.cancel()

    def _tick(self) -> None:
        self._ticker = None
        if self._task is None or self._verdict is not None:
            return  # no read pending: the next one starts the chain again
        loop = asyncio.get_running_loop()
        now, received = loop.time(), self._body_bytes()
        clock = self._base + (now - self._began)
        self._meter.add(clock, received)
        if received > self._max:
            return self._judge(
                ProxyError(REQUEST_TOO_LARGE, f"request body over the limit of {self._max} bytes")
            )
        if received != self._seen:
            self._seen, self._last, self._interval = received, now, self.MIN_TICK
        elif now - self._last >= self._idle - 0.001:  # the loop may run a timer a hair early
            return self._judge(ProxyError(CLIENT_TIMEOUT, "the client sent nothing for too long"))
        else:
            self._interval = min(self._interval * 2, self._max_tick)
        if self._meter.too_slow(clock, self.min_rate):
            return self._judge(self._too_slow())
        self._ticker = loop.call_at(min(now + self._interval, self._last + self._idle), self._tick)

    async def read(self, read: Callable[[], Awaitable[T]]) -> T:
        """Run one read from the client under the idle timeout, the rate and the size limit.

        Reads of one watch run one at a time (one request's body is read in order)."""
        if self._expired is not None:
            raise self._expired
        self.check_size()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None and self._task is None, "one read at a time"
        now = loop.time()
        # Each read starts its own idle clock: time between reads is not the client's.
        self._began, self._base, self._last = now, self._client_time, now
        self._seen = self._body_bytes()
        self._task, self._cancelling, self._verdict = task, task.cancelling(), None
        first = min(now + self.MIN_TICK, now + self._idle)
        if self._ticker is None or self._ticker.when() > first:
            if self._ticker is not None:
                self._ticker.cancel()
            self._interval = self.MIN_TICK
            self._ticker = loop.call_at(first, self._tick)
        try:
            result = await read()
        except asyncio.CancelledError:
            # our own cancel (not the task's owner's): the verdict instead
            if self._verdict is not None and task.uncancel() <= self._cancelling:
                verdict, self._verdict = self._verdict, None
                try:
                    raise verdict from None
                finally:
                    del verdict  # see below
            raise
        except Exception as exc:
            mapped = client_error(exc)
            if mapped is None:
                raise
            try:
                raise mapped from exc
            finally:
                # Neither a local of this frame nor kept by ``self``: the error's
                # traceback keeps this frame, and such a reference cycle would hold the
                # request's frames, with what they hold, until the cyclic GC runs (see
                # budget.Reservation).
                del mapped
        finally:
            self._task = None
            self._client_time = self._base + (loop.time() - self._began)
            self._meter.add(self._client_time, self._body_bytes())
        self.check_size()
        return result


async def next_part(reader: MultipartReader) -> MultipartReader | BodyPartReader | None:
    """``MultipartReader.next`` without its ``_charset_`` sniffing.

    aiohttp's ``next`` runs its own Content-Disposition parser on the first part to
    look for a ``_charset_`` field; on a filename like ``a;b;c.txt`` that parser warns
    (a RuntimeWarning per request, an error under ``-W error``). Field values here are
    UTF-8 only, so a ``_charset_`` field is just a field. The steps are aiohttp's own.
    """
    if reader.at_eof():
        return None
    await reader._maybe_release_last_part()
    if reader._at_bof:
        await _read_preamble(reader)
        reader._at_bof = False
    else:
        await _read_boundary(reader)
    if reader.at_eof():
        return None
    part = await reader.fetch_next_part()
    reader._last_part = part
    return part


async def _read_boundary(reader: MultipartReader) -> None:
    """aiohttp's ``_read_boundary`` (the delimiter line after a part), its ValueError told
    in our words: its text echoes the line, up to 20 bytes of the client's file."""
    try:
        await reader._read_boundary()
    except ValueError:
        raise ProxyError(
            MALFORMED_MULTIPART,
            "the line after a part is not a boundary delimiter: the body ended early, or "
            "the boundary occurs in a part's data (it must not: RFC 2046 section 5.1.1)",
        ) from None


#: The most bytes before a form's first boundary (RFC 2046's preamble). Browsers and
#: curl send none, mail-style clients a line; read a line at a time, as aiohttp does, a
#: megabyte of empty lines costs a second of CPU, so a longer one is refused.
MAX_PREAMBLE = 64 * 1024


async def _read_preamble(reader: MultipartReader) -> None:
    """aiohttp's ``_read_until_first_boundary``, with the preamble bounded."""
    seen = 0
    while True:
        line = await reader._readline()
        if line == b"":
            raise ProxyError(MALFORMED_MULTIPART, "the body has no multipart boundary")
        stripped = line.rstrip()
        if stripped == reader._boundary:
            return
        if stripped == reader._boundary + b"--":
            reader._at_eof = True
            return
        seen += len(line)
        if seen > MAX_PREAMBLE:
            raise ProxyError(
                MALFORMED_MULTIPART,
                f"no multipart boundary in the body's first {MAX_PREAMBLE // 1024} KiB",
            )


# RFC 2046 section 5.1.1: boundary := 0*69<bchars> bcharsnospace, bchars being
# bcharsnospace / " ", bcharsnospace := DIGIT / ALPHA / "'()+_,-./:=?".
MAX_BOUNDARY = 70
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def request_boundary(content_type: str) -> str:
    """The request's multipart boundary; ProxyError(MALFORMED_MULTIPART) if there is not
    exactly one that RFC 2046 allows and aiohttp reads the same way. Pure.

    Checked from the header alone, before a body byte is read. The parameters are read
    quote-aware (s3proxy.disposition.split_params); aiohttp's reader takes the boundary
    from ``parse_mimetype``, which splits on every ``;`` and strips spaces and quotes
    from the value, so a boundary it would read otherwise (one beginning with a space,
    a ``;`` in another quoted parameter) is refused too: the delimiter the client
    writes and the one the reader looks for are always the same. The client's boundary
    is never echoed.
    """
    try:
        _, params = split_params(header_bytes(content_type))
    except ValueError:
        raise ProxyError(
            MALFORMED_MULTIPART, "the Content-Type header has a quoted parameter with no end"
        ) from None
    found = [value for name, value in params if name == "boundary"]
    if len(found) > 1:
        raise ProxyError(
            MALFORMED_MULTIPART, "the Content-Type header gives the multipart boundary twice"
        )
    raw = found[0] if found else b""
    if not 1 <= len(raw) <= MAX_BOUNDARY:
        # aiohttp's reader refuses a missing or long one, not an empty one: its delimiter
        # would be a bare "--", and a file was stored from it.
        raise ProxyError(
            MALFORMED_MULTIPART,
            f"the multipart boundary must be 1 to {MAX_BOUNDARY} characters (RFC 2046 "
            f"section 5.1.1), got {len(raw)}",
        )
    if not _BOUNDARY.fullmatch(raw):
        why = (
            "must not end with a space"
            if _BOUNDARY.fullmatch(raw.rstrip(b" "))
            else "may hold only ASCII letters, digits, spaces and '()+_,-./:=?"
        )
        raise ProxyError(
            MALFORMED_MULTIPART, f"the multipart boundary {why} (RFC 2046 section 5.1.1)"
        )
    boundary = raw.decode("ascii")
    if parse_mimetype(content_type).parameters.getall("boundary", []) != [boundary]:
        raise ProxyError(
            MALFORMED_MULTIPART,
            "the multipart boundary cannot be read unambiguously: it begins with a space, "
            "or another parameter holds a quoted ';'",
        )
    return boundary


# RFC 7578 section 4.7: Content-Transfer-Encoding is deprecated in form-data; these
# three mean "the bytes as they are", anything else would be stored still encoded.
IDENTITY_TRANSFER_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
_MEDIA_TYPE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*;.*)?$")


# A part's headers that mean one thing each: given twice, which one counts would depend
# on the reader (aiohttp's .get takes the first, another parser the last), so a body
# could be read one way here and another way by a scanner or log in front of us.
SINGLE_PART_HEADERS = (
    hdrs.CONTENT_DISPOSITION,
    hdrs.CONTENT_TRANSFER_ENCODING,
    hdrs.CONTENT_TYPE,
)


def _one(headers: CIMultiDictProxy[str], name: str) -> str | None:
    """The one value of a part header in SINGLE_PART_HEADERS; MALFORMED_MULTIPART if twice."""
    found = headers.getall(name, [])
    if len(found) > 1:
        raise ProxyError(MALFORMED_MULTIPART, f"a part has two {name} headers")
    return found[0] if found else None


@dataclass(frozen=True)
class PartHead:
    """What a part's headers say: its field name, its raw filename (None for a field)."""

    name: str
    filename: str | None
    declared_type: str | None
    declared: Declared = dc_field(default_factory=Declared)  # Content-Digest, Content-MD5


def read_part_head(headers: CIMultiDictProxy[str]) -> PartHead:
    """A part's identity from its headers, decoded by s3proxy.disposition's rules.

    Raises ProxyError(MALFORMED_MULTIPART) for what no client should send: no
    Content-Disposition header, two of any SINGLE_PART_HEADERS, a type other than
    form-data, no name, a transfer encoding. A declared Content-Type that is not a plain
    ASCII media type is ignored.
    """
    found = _one(headers, hdrs.CONTENT_DISPOSITION)
    if found is None:
        raise ProxyError(MALFORMED_MULTIPART, "a part has no Content-Disposition header")
    try:
        disp = parse_form_disposition(header_bytes(found))
    except ValueError as exc:
        raise ProxyError(MALFORMED_MULTIPART, f"a part's Content-Disposition: {exc}") from None
    if disp.type != "form-data":
        raise ProxyError(
            MALFORMED_MULTIPART,
            f"a part's Content-Disposition is {quoted(disp.type)}, not form-data (RFC 7578 section "
            "4.2)",
        )
    if disp.name is None:
        raise ProxyError(MALFORMED_MULTIPART, "a part has no name in its Content-Disposition")
    encoding = _one(headers, hdrs.CONTENT_TRANSFER_ENCODING)
    if encoding is not None and encoding.strip().lower() not in IDENTITY_TRANSFER_ENCODINGS:
        raise ProxyError(
            MALFORMED_MULTIPART,
            f"part {quoted(disp.name)} has a Content-Transfer-Encoding other than 7bit, 8bit "
            "or binary: not supported (RFC 7578 section 4.7); send the bytes as they are",
        )
    declared = _one(headers, hdrs.CONTENT_TYPE)
    if declared is not None and not (declared.isascii() and _MEDIA_TYPE.match(declared)):
        declared = None
    digests = Declared()
    try:
        if disp.filename is None:
            # A field's value is not a file: no digest of it is checked.
            refuse_unchecked(headers, frozenset(), _DIGEST_HINT)
        else:
            refuse_unchecked(headers, PART_DIGEST_HEADERS, _DIGEST_HINT)
            digests = read_declared(
                headers.getall("Content-Digest", []),
                headers.getall(hdrs.CONTENT_MD5, []),
                headers.getall("Repr-Digest", []),
            )
    except DigestError as exc:
        raise ProxyError(INVALID_DIGEST, f"part {quoted(disp.name)}: {exc}") from None
    return PartHead(disp.name, disp.filename, declared, digests)


async def iter_form(
    reader: MultipartReader,
    limits: FormLimits,
    body_bytes: Callable[[], int],
    flow: TransportFlow | None = None,
) -> AsyncIterator[Field | FilePart]:
    """Yield the form's parts in order; raise ProxyError on any limit or parse failure.

    ``body_bytes`` says how many bytes of the request body have been received so
    far: it re-arms the idle timeout and cuts a request off as soon as it passes the
    request limit, whatever is being read (preamble, part headers or data).

    A file part's ``filename`` is final: sanitized as the key and Content-Disposition
    will use it (``upload`` when the client sent none). A part with an empty filename
    and no content (a browser's unused file input) is skipped: it is not a file.
    """
    files = fields = fields_size = 0
    watch = ClientWatch(
        body_bytes,
        limits.idle_timeout,
        limits.max_request_size,
        limits.min_rate,
        limits.rate_window,
    )
    while True:
        part = await watch.read(lambda: next_part(reader))
        if part is None:
            return
        if not isinstance(part, BodyPartReader):
            raise ProxyError(MALFORMED_MULTIPART, "nested multipart parts are not supported")
        head = read_part_head(part.headers)
        if head.filename is not None:
            source: ChunkSource = PartSource(part, watch, flow, whole_chunks=True)
            if not head.filename:
                first = await source.read(limits.chunk_size)
                if not first:  # a browser's unused file input: skipped, counted as a field
                    fields += 1
                    if fields > limits.max_fields:
                        raise ProxyError(
                            TOO_MANY_FIELDS,
                            f"more than {limits.max_fields} form fields (unused file inputs "
                            "count as fields)",
                        )
                    continue
                source = Replay(first, source)
            files += 1
            if files > limits.max_files:
                raise ProxyError(
                    TOO_MANY_FILES, f"more than {limits.max_files} files in one request"
                )
            filename = sanitize_filename(head.filename)
            yield FilePart(head.name, filename, head.declared_type, source, head.declared)
            if not part.at_eof():
                raise RuntimeError("file part was not read to its end")
        else:
            fields += 1
            if fields > limits.max_fields:
                raise ProxyError(TOO_MANY_FIELDS, f"more than {limits.max_fields} form fields")
            room = limits.max_fields_size - fields_size
            value = await _read_field(part, head.name, limits, watch, room)
            fields_size += value.size
            yield Field(head.name, value.text, value.size)


# A body's pieces under this size are joined with the small ones buffered behind them
# (``next_chunk``): a chunked body in 1-byte HTTP chunks cost ~20 us of reading, delimiter
# scan, hashing and part bookkeeping per chunk (20,000 CPU s per GiB of file, the event
# loop held 17 s by one upload), now per socket read. Bigger pieces go on as they are:
# a Content-Length body's 256 KiB socket reads and big HTTP chunks gain no copy.
SMALL_PIECE = 16 * 1024
# ... up to this many bytes, or pieces, at once (a 256 KiB socket read of 1-byte chunks
# is ~43,000 of them: each call stays ~2 ms, and yields to the loop after a join).
JOIN_BYTES = 256 * 1024
JOIN_PIECES = 4096


def small_run(pieces: Sequence[bytes], offset: int, room: int) -> int:
    """How many bytes of ``pieces`` (the first one read up to ``offset``) to join: the
    leading run of pieces under SMALL_PIECE, whole, up to ``room`` bytes and JOIN_PIECES
    pieces. Pure."""
    total = 0
    for i, piece in enumerate(pieces):
        size = len(piece) - (offset if i == 0 else 0)
        if size >= SMALL_PIECE or total + size > room or i >= JOIN_PIECES:
            break
        total += size
    return total


async def next_chunk(content: StreamReader) -> bytes:
    """The body's next bytes as the socket brought them; b"" only at the body's end.

    ``readchunk`` hands over the first buffered piece as it is (``readany`` and
    ``read(n)`` join all that is buffered: a copy); its b"" at a chunked body's HTTP
    chunk end is not the end. A small piece comes joined with the small ones buffered
    behind it (``small_run``; the parser passes on each HTTP chunk as a piece of its
    own), and then the task yields: a long run of buffered pieces never holds the loop.
    """
    while True:
        chunk, _ = await content.readchunk()
        if chunk or content.at_eof():
            break
    if not chunk or len(chunk) >= SMALL_PIECE or not content._buffer:
        return chunk  # (the end: an EmptyStreamReader has no buffer)
    size = small_run(content._buffer, content._buffer_offset, JOIN_BYTES - len(chunk))
    if size == 0:
        return chunk
    joined = chunk + content.read_nowait(size)
    await asyncio.sleep(0)
    return joined


class PartSource:
    """One part's bytes; ends only once the part's closing boundary was seen.

    A file part's bytes (``whole_chunks``; a part without a Content-Length or a
    Content-Transfer-Encoding, which is every form-data file part a browser or curl
    sends) are read by ``_read_whole_chunk``: each chunk as aiohttp's StreamReader
    received it, scanned for the part's end in place (s3proxy.delimiter). aiohttp's
    ``read_chunk`` copies every chunk on its way (its window of the previous and this
    read), and again when more than one is buffered (the join a ``read(n)`` makes);
    these bytes go on to sha256, the CRC and S3 as they are. A read may bring more than
    ``size`` (a whole chunk: one socket read, 256 KiB with asyncio, for a Content-Length
    body; what one HTTP chunk has buffered for a chunked one): splitting it would copy
    it, and the upload machine takes the overflow as the next part's first bytes. Other
    parts, and field values, keep aiohttp's ``read_chunk``.
    """

    # aiohttp needs room for a boundary in every read of a part without a length.
    MIN_READ = 256

    def __init__(
        self,
        part: BodyPartReader,
        watch: ClientWatch,
        flow: TransportFlow | None = None,
        whole_chunks: bool = False,
    ) -> None:
        self._part = part
        self._watch = watch
        self._flow = flow
        self._paused = False
        self._scan: DelimiterScan | None = None
        self._ready: deque[bytes] = deque()  # bytes the scan settled, not yet handed on
        if whole_chunks and _plain_part(part):
            self._scan = DelimiterScan(b"\r\n" + part._boundary)

    def pause(self) -> None:
        if self._flow is not None and not self._paused:
            self._paused = True
            self._flow.pause_reading()

    def resume(self) -> None:
        if self._flow is not None and self._paused:
            self._paused = False
            self._flow.resume_reading()

    def expire(self, message: str) -> None:
        self._watch.expire(CLIENT_TIMEOUT, message)

    def arrival(self) -> Arrival | None:
        return None if self._flow is None else self._flow.arrival()

    async def read(self, size: int) -> bytes:
        if self._scan is not None:
            if self._ready:
                return self._ready.popleft()
            if self._flow is not None:
                self._flow.expect(size)
            return await self._watch.read(self._read_whole_chunk)
        size = max(size, self.MIN_READ)
        for _ in range(MAX_EMPTY_READS + 1):
            chunk = await self._watch.read(lambda: self._part.read_chunk(size))
            if chunk or self._part.at_eof():
                return chunk
        raise ProxyError(MALFORMED_MULTIPART, "the body ended inside a file part")

    async def _read_whole_chunk(self) -> bytes:
        """The part's next bytes, b"" once its delimiter was seen.

        Leaves the part and the stream as aiohttp's ``read_chunk`` does at a part's
        end: the delimiter's CRLF consumed (the rest of the body pushed back, starting
        at ``--boundary``, for ``next_part`` to read), the part at its end. The body's
        end before the delimiter is MALFORMED_MULTIPART at once (aiohttp hands back
        empty reads a few times first, hence MAX_EMPTY_READS on the other path).
        """
        scan, part = self._scan, self._part
        assert scan is not None
        content = part._content
        while not part._at_eof:
            chunk = await next_chunk(content)
            if not chunk:
                raise ProxyError(MALFORMED_MULTIPART, "the body ended inside a file part")
            pieces, rest = scan.feed(chunk)
            if rest is not None:
                with warnings.catch_warnings():  # deprecated, and what aiohttp itself does
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    content.unread_data(rest)
                part._at_eof = True
            if pieces:
                self._ready.extend(pieces[1:])
                return pieces[0]
        return b""


def _plain_part(part: BodyPartReader) -> bool:
    """True if the part's bytes are its body as sent, up to its delimiter: no
    Content-Length (aiohttp ignores it on form-data parts, RFC 7578 section 4.8), no
    Content-Transfer-Encoding, and nothing read of it yet."""
    return (
        part._length is None
        and hdrs.CONTENT_TRANSFER_ENCODING not in part.headers
        and part._prev_chunk is None
        and not part._at_eof
    )


class Replay:
    """A source whose first bytes were read ahead: they come first, then the rest."""

    def __init__(self, first: bytes, rest: ChunkSource) -> None:
        self._first = first
        self._rest = rest

    def pause(self) -> None:
        self._rest.pause()

    def resume(self) -> None:
        self._rest.resume()

    def expire(self, message: str) -> None:
        self._rest.expire(message)

    def arrival(self) -> Arrival | None:
        return self._rest.arrival()

    async def read(self, size: int) -> bytes:
        if self._first:  # whole, as a PartSource read may bring more than asked
            chunk, self._first = self._first, b""
            return chunk
        return await self._rest.read(size)


@dataclass(frozen=True)
class _Value:
    text: str
    size: int  # bytes as received


async def _read_field(
    part: BodyPartReader, name: str, limits: FormLimits, watch: ClientWatch, room: int
) -> _Value:
    """A field's value, cut off as soon as it passes its own limit or the request's
    ``room`` left for field values (both are checked on every chunk, as it arrives)."""
    data = bytearray()
    source = PartSource(part, watch)
    while chunk := await source.read(min(FIELD_READ, max(room, 0) + 1)):
        data += chunk
        if len(data) > limits.max_field_size:
            raise ProxyError(
                FIELD_TOO_LARGE,
                f"field {quoted(name)} over the limit of {limits.max_field_size} bytes",
            )
        if len(data) > room:
            raise ProxyError(
                FIELD_TOO_LARGE,
                f"form field values over the limit of {limits.max_fields_size} bytes "
                f"per request (at field {quoted(name)})",
            )
    try:
        return _Value(data.decode("utf-8"), len(data))
    except UnicodeDecodeError:
        raise ProxyError(INVALID_FIELD, f"field {quoted(name)} is not UTF-8 text") from None
