"""Whether the proxy can take a request body's codings, from its head alone.

aiohttp decodes a ``Content-Encoding`` of gzip or deflate (br and zstd only with optional
packages this install does not have) and frames ``Transfer-Encoding: chunked``. Any other
coding it passes through as if there were none: a body sent as ``Transfer-Encoding: gzip,
chunked``, or with a Content-Encoding it does not decode (``x-gzip``, ``compress``, two
codings, ``gzip`` on one header line and ``identity`` on a later one), would be stored as
its coded bytes and answered 201. Those requests are refused before a body byte is read:
415 for a content coding (RFC 9110 section 15.5.16), 501 for a transfer coding (RFC 9112
section 6.1).
"""

from __future__ import annotations

import functools
import sys
import zlib
from collections.abc import Iterable
from typing import Any

from aiohttp import compression_utils, web
from aiohttp.compression_utils import ZLibDecompressor
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.http_parser import DeflateBuffer
from multidict import CIMultiDictProxy

from s3proxy.errors import (
    DECODED_CODINGS,
    UNSUPPORTED_ENCODING,
    UNSUPPORTED_TRANSFER_CODING,
    ProxyError,
    TooManyMembers,
)

DECODED = DECODED_CODINGS  # what aiohttp decodes here
# What a refused client should do instead (here, and for br/zstd, refused by the parser).
CONTENT_ADVICE = f"send the body as it is, or coded once with {' or '.join(DECODED)}"
SHOWN = 60  # characters of a header value a message quotes


def codings(values: Iterable[str]) -> list[str]:
    """The codings of every line of a coding header, in order, lowercased."""
    return [c.strip().lower() for value in values for c in value.split(",") if c.strip()]


def content_coded(headers: CIMultiDictProxy[str]) -> bool:
    """Is the body content-coded (a Content-Encoding other than identity, on any line)?
    Its Content-Length then counts coded bytes, not the file's."""
    return any(c != "identity" for c in codings(headers.getall("Content-Encoding", ())))


def read_length(request: web.BaseRequest) -> int | None:
    """The most bytes a handler can read of the body: its Content-Length, or None when
    unknown or content-coded. A coded body's Content-Length counts coded bytes and bounds
    nothing it decodes to (100 KB of gzip is 100 MiB of zeros): taken for the file's bound,
    it sized every part's reservation to 1 byte, and parts were filled outside the budget."""
    if content_coded(request.headers):
        return None
    return request.content_length


def check_body_codings(headers: CIMultiDictProxy[str], decoded: bool) -> None:
    """Raise if the body's codings are ones the proxy would not undo.

    ``decoded``: aiohttp decodes this body's Content-Encoding (its own decision, read
    from the request's StreamReader, so the two cannot disagree on which header line
    or spelling counts)."""
    transfer = codings(headers.getall("Transfer-Encoding", ()))
    if transfer and transfer != ["chunked"]:
        raise ProxyError(
            UNSUPPORTED_TRANSFER_CODING,
            f"Transfer-Encoding {', '.join(transfer)[:SHOWN]!r} is not supported: send the "
            "body with a Content-Length, or with Transfer-Encoding: chunked alone",
        )
    content = [c for c in codings(headers.getall("Content-Encoding", ())) if c != "identity"]
    if content and (len(content) > 1 or not decoded):
        raise ProxyError(
            UNSUPPORTED_ENCODING,
            f"Content-Encoding {', '.join(content)[:SHOWN]!r} is not supported: " + CONTENT_ADVICE,
        )


def check_request(request: web.BaseRequest) -> None:
    """``check_body_codings`` for a request with a body (the expect handler calls it
    too: it runs before the middlewares, and refuses before the client sends the body)."""
    if request.body_exists:
        decoded = getattr(request.content, "total_compressed_bytes", None) is not None
        check_body_codings(request.headers, decoded)


@web.middleware
async def refuse_unsupported(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every route: a body whose codings would be stored as they came is refused."""
    check_request(request)
    response: web.StreamResponse = await handler(request)
    return response


# --- A coded body must end where its coding ends ---------------------------------------
#
# aiohttp checks at the body's end that a deflate stream ended (DeflateBuffer.feed_eof),
# but not a gzip one: its decoder starts a fresh member after each one ends, and a gzip
# body cut anywhere (its CRC-32 and ISIZE trailer left off, half its deflate data, a
# stream only sync-flushed) decoded to a prefix that was stored and answered 201. Here
# the end of every zlib-coded body is checked: the decoder holds no member begun and
# not ended. RFC 1952 section 2.2: a gzip body is a series of members, each with its
# trailer, and decodes to their concatenation; bytes after the last member that are
# not a member (trailing garbage, zero padding) are not gzip. A deflate body (the zlib
# format, RFC 9110 section 8.4.1.2) is taken the same way, as aiohttp decodes it.


# --- How many members a coded body may have -------------------------------------------
#
# Each gzip member (or zlib stream) costs a new decoder: measured, an empty gzip member
# (20 bytes) takes 2 us and an empty zlib stream (8 bytes) about as much, 108 and 330 CPU
# s per GiB of such a body, against 2.6 s per GiB decoded for ordinary members. aiohttp
# caps the members one decode call takes (1,024, ``MAX_DECOMPRESS_MEMBERS``), which made a
# valid body of many small members refused or taken by how its bytes were split into
# socket reads (reprobe18a F3: 1,815 members refused 400 in one write, stored in 2 KB
# writes), and bounded nothing per body. Here the rule is the body's own, a rule of its
# bytes alone: at no member's end past the ``FREE_MEMBERS``-th may the members so far
# average under ``MEMBER_BYTES`` coded bytes (decoding then costs at most about 6 CPU s
# per GiB more). Each member's coded bytes are counted exactly as it ends (``Members``);
# counting decoders made, with the bytes of the read in hand, refused exactly 1,024 gzip
# members and took 1,500 of exactly 1 KiB or not by the reads (reprobe18c).
FREE_MEMBERS = 1024
MEMBER_BYTES = 1024


def too_many_members(members: int, coded: int) -> bool:
    """Are ``members`` ended members of ``coded`` bytes in all too many? Pure."""
    return members > FREE_MEMBERS and coded < members * MEMBER_BYTES


def members_message(coding: str) -> str:
    return (
        f"the request body's {coding} data has more than {FREE_MEMBERS} members averaging "
        f"under {MEMBER_BYTES} bytes: send it as fewer, larger members (one is best)"
    )


class Members:
    """One coded body's members so far: how many ended, and their coded bytes.

    Held by the body's decoder (aiohttp's ``ZLibDecompressor``) and by each member's
    ``TrackedInflate``, which counts into it: a plain object, so neither holds the other
    and no reference cycle keeps a body's decoder alive."""

    __slots__ = ("coded", "coding", "ended")

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self.ended = 0
        self.coded = 0  # bytes of the ended members, and of the one being decoded

    def check(self) -> None:
        """Raise ``TooManyMembers`` if the members ended so far break the rule."""
        if too_many_members(self.ended, self.coded):
            raise TooManyMembers(members_message(self.coding))


class TrackedInflate:
    """A zlib decompressobj for one member that counts its coded bytes into the body's
    ``Members``, and remembers whether it was given a byte: a member begun.

    zlib's object does not tell (no total_in): the bytes a call consumed are its input
    less what it left, in ``unconsumed_tail`` while the member goes on, and once it ended
    what the call added to ``unused_data``, the bytes after its end (which grows on each
    call after it; its ``unconsumed_tail`` may then repeat them)."""

    __slots__ = ("_inner", "begun", "members")

    def __init__(self, inner: Any, members: Members) -> None:
        self._inner = inner
        self.members = members
        self.begun = False

    def decompress(self, data: Any, max_length: int = 0) -> bytes:
        inner = self._inner
        if len(data):
            self.begun = True
        ended = inner.eof
        unused = len(inner.unused_data)
        out: bytes = inner.decompress(data, max_length)
        if inner.eof:  # what follows the member's end, whatever the output limit
            self.members.coded += len(data) - (len(inner.unused_data) - unused)
            self.members.ended += not ended
        else:
            self.members.coded += len(data) - len(inner.unconsumed_tail)
        return out

    def flush(self, *args: int) -> bytes:
        out: bytes = self._inner.flush(*args)
        return out

    @property
    def eof(self) -> bool:
        return bool(self._inner.eof)

    @property
    def unused_data(self) -> bytes:
        return bytes(self._inner.unused_data)

    @property
    def unconsumed_tail(self) -> bytes:
        return bytes(self._inner.unconsumed_tail)


def stream_complete(decoder: Any) -> bool:
    """Did the coded bytes a body's decoder (aiohttp's ``ZLibDecompressor``) was given
    end where a member ends? True for a decoder this check does not know (br, zstd)."""
    if not isinstance(decoder, ZLibDecompressor):
        return True
    if decoder._pending_unused_data is not None:
        return False  # coded bytes not yet decoded (the parser drains them before EOF)
    inflate = decoder._decompressor
    if inflate.eof:
        return True
    return isinstance(inflate, TrackedInflate) and not inflate.begun


def end_check_problems() -> list[str]:
    """The aiohttp internals the end check needs that are missing (empty: all there)."""
    problems = []
    if not callable(getattr(DeflateBuffer, "feed_eof", None)):
        problems.append("http_parser.DeflateBuffer.feed_eof")
    if not callable(getattr(ZLibDecompressor, "_new_decompressor", None)):
        problems.append("compression_utils.ZLibDecompressor._new_decompressor")
    if getattr(ZLibDecompressor, "_pending_unused_data", 0) is not None:
        problems.append("compression_utils.ConcatDecompressionHandler._pending_unused_data")
    return problems


def discard(body: Any) -> None:
    """The rest of this request body (a StreamReader) is not wanted: its answer went, and
    aiohttp reads on to the body's end (its lingering close, up to 10 s, or to keep the
    connection). A coded body is then skipped as sent, not inflated: inflating what was
    refused cost up to 10 s of event loop per connection (reprobe17a F3: a 4 MB gzip
    bomb answered 401 at once, then 9.7 s of CPU; four at once made /readyz answer 503).
    Marked on its connection (the reader's protocol; a StreamReader takes no attributes
    of its own): one body at a time per connection."""
    protocol = getattr(body, "_protocol", None)
    if protocol is not None:
        protocol.discarded_body = body


def discarded(body: Any) -> bool:
    return getattr(getattr(body, "_protocol", None), "discarded_body", None) is body


def install_end_check() -> bool:
    """Make aiohttp refuse, at a zlib-coded body's end, a stream that has not ended
    (``ContentEncodingError``, answered 400 ``BAD_HTTP_REQUEST`` like any bytes that are
    not gzip). Process-wide and idempotent: the C parser builds the Python class's
    DeflateBuffer, so one patch of the class covers both parsers. False when aiohttp's
    internals moved (the caller warns; tests/test_aiohttp_contract.py fails)."""
    if getattr(DeflateBuffer.feed_eof, "_s3proxy_checked", False):
        return True
    if end_check_problems():
        return False
    new_decompressor = ZLibDecompressor._new_decompressor
    feed_eof = DeflateBuffer.feed_eof
    feed_data = DeflateBuffer.feed_data

    @functools.wraps(new_decompressor)
    def tracked(self: ZLibDecompressor) -> Any:
        # one per member, and one more (begun or not) after a gzip member ends a read
        members = getattr(self, "_s3proxy_members", None)
        if members is None:
            coding = "gzip" if getattr(self, "_mode", 0) > zlib.MAX_WBITS else "deflate"
            members = self._s3proxy_members = Members(coding)  # type: ignore[attr-defined]
        members.check()
        return TrackedInflate(new_decompressor(self), members)

    @functools.wraps(feed_eof)
    def checked_feed_eof(self: DeflateBuffer) -> None:
        if discarded(self.out):
            self.out.feed_eof()  # nothing was decoded: nothing to check
            return
        if self.size > 0 and not stream_complete(self.decompressor):
            raise ContentEncodingError(self.encoding or "")
        members = getattr(self.decompressor, "_s3proxy_members", None)
        if members is not None:
            try:
                members.check()  # the last member ends with the body: no decoder after it
            except TooManyMembers as exc:
                raise ContentEncodingError(self.encoding or "") from exc
        feed_eof(self)

    @functools.wraps(feed_data)
    def zlib_only_feed_data(self: DeflateBuffer, chunk: bytes, size: int) -> bool:
        if discarded(self.out):
            self.size += size
            return False  # answered already: skipped as sent, not inflated
        # aiohttp takes a deflate body whose first byte is no zlib header (RFC 1950: its
        # low nibble 8) for raw deflate, which has no Adler-32: a changed byte was stored
        # and answered 201 (reprobe17a F4). RFC 9110 section 8.4.1.2: deflate is zlib.
        if (
            self.encoding == "deflate"
            and chunk
            and not getattr(self, "_started_decoding", True)
            and chunk[0] & 0xF != 8
        ):
            raise ContentEncodingError("deflate")
        return feed_data(self, chunk, size)

    # The body's rule (``too_many_members``) replaces aiohttp's per-call one, which made
    # a body's fate hang on its socket reads.
    compression_utils.MAX_DECOMPRESS_MEMBERS = sys.maxsize
    checked_feed_eof._s3proxy_checked = True  # type: ignore[attr-defined]
    ZLibDecompressor._new_decompressor = tracked  # type: ignore[method-assign]
    DeflateBuffer.feed_eof = checked_feed_eof  # type: ignore[method-assign]
    DeflateBuffer.feed_data = zlib_only_feed_data  # type: ignore[method-assign]
    return True
