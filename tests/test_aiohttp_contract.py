"""The aiohttp internals s3proxy relies on, pinned the way aiobotocore pins botocore's.

s3proxy uses a few private aiohttp APIs where no public one does the job:

- ``form.next_part`` repeats ``MultipartReader.next`` without its ``_charset_`` sniffing
  (aiohttp's own Content-Disposition parser warns on filenames with several ``;``);
- ``form.PartSource`` reads a file part's body itself (s3proxy.delimiter scans it): it
  takes the part's ``_content``, ``_boundary``, ``_length``, ``_prev_chunk`` and sets
  ``_at_eof`` as ``BodyPartReader.read_chunk``/``_read_chunk_from_stream`` would (their
  semantics are what it matches), reads with ``StreamReader.readchunk`` (one buffered
  chunk as it is, via ``_read_nowait_chunk``), joins the small pieces buffered behind a
  small one with ``read_nowait`` after looking at ``_buffer``/``_buffer_offset``
  (``form.next_chunk``), and pushes back with ``unread_data``;
- ``form.TransportFlow`` reads ``BaseProtocol._reading_paused``/``_buffer_paused`` so its
  own pause never undoes aiohttp's backpressure;
- ``handlers.expect_upload`` calls ``_default_expect_handler`` to send ``100 Continue``;
- ``body.ChunkedBodyPayload`` registers itself in ``payload.PAYLOAD_REGISTRY``;
- ``protocol`` subclasses the connection handler to answer malformed HTTP as JSON
  (it checks its own needs in ``protocol.private_api_problems``), and hands an upload's
  Content-Length body to its StreamReader past the parser (``bypass_parser``): it feeds
  the StreamReader as the parser would (``feed_data``, then ``feed_eof``), builds the next
  parser as ``RequestHandler.__init__`` does, and relies on ``connection_lost`` failing
  the current request's body whatever the parser saw;
- ``codings.install_end_check`` wraps ``DeflateBuffer.feed_eof`` (the C parser builds the
  same Python class) and ``ZLibDecompressor._new_decompressor``, and reads the decoder's
  ``_decompressor`` and ``_pending_unused_data``: a gzip body must end where a member ends
  (aiohttp's decoder starts a fresh member after each, ``decompress_sync``).

``setup.cfg`` bounds aiohttp to the minor version these were read against. When a new
aiohttp changes one of these functions, the digest test fails: read the new source,
check the use in s3proxy still holds, then add the new digest here.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import (
    base_protocol,
    compression_utils,
    http_parser,
    multipart,
    payload,
    streams,
    web_protocol,
    web_urldispatcher,
)

from s3proxy import codings, protocol
from s3proxy.body import ChunkedBody, ChunkedBodyPayload


def digest(obj: Callable[..., Any]) -> str:
    return hashlib.sha1(inspect.getsource(obj).encode()).hexdigest()[:12]


MR = multipart.MultipartReader
RH = web_protocol.RequestHandler
BP = base_protocol.BaseProtocol
BPR = multipart.BodyPartReader
SR = streams.StreamReader
DB = http_parser.DeflateBuffer
ZD = compression_utils.ZLibDecompressor
# name -> (the function, digests of its source as s3proxy was checked against it)
PINNED: dict[str, tuple[Callable[..., Any], set[str]]] = {
    "MultipartReader.next": (MR.next, {"360ab7ce7a0f"}),  # aiohttp 3.14
    "MultipartReader._maybe_release_last_part": (MR._maybe_release_last_part, {"a0e757923bae"}),
    "MultipartReader._read_until_first_boundary": (
        MR._read_until_first_boundary,
        {"1c5f229653b4"},
    ),
    "MultipartReader._read_boundary": (MR._read_boundary, {"6972e2329b9c"}),
    "MultipartReader.fetch_next_part": (MR.fetch_next_part, {"992ff923e23f"}),
    "BodyPartReader.__init__": (BPR.__init__, {"dec8ad0d4785"}),
    "BodyPartReader.read_chunk": (BPR.read_chunk, {"d3aaeddfc1d4"}),
    "BodyPartReader._read_chunk_from_stream": (BPR._read_chunk_from_stream, {"60c1e3062c61"}),
    "StreamReader.readchunk": (SR.readchunk, {"16c0fff5da9c"}),
    "StreamReader._read_nowait_chunk": (SR._read_nowait_chunk, {"ddfcfd34f8d7"}),
    "StreamReader.read_nowait": (SR.read_nowait, {"6f7ad249f76c"}),
    "StreamReader._read_nowait": (SR._read_nowait, {"8f8e7dba19c5"}),
    "StreamReader.unread_data": (SR.unread_data, {"2818ec247aee"}),
    "BaseProtocol.pause_reading": (BP.pause_reading, {"7109d00aefa9"}),
    "BaseProtocol.resume_reading": (BP.resume_reading, {"eccf495f468f"}),
    "_default_expect_handler": (web_urldispatcher._default_expect_handler, {"004ab0e85114"}),
    "RequestHandler.handle_error": (RH.handle_error, {"742397715bc1"}),
    "RequestHandler.finish_response": (RH.finish_response, {"a0e3106db01a"}),
    "RequestHandler.data_received": (RH.data_received, {"8735c9eaea40"}),
    "RequestHandler.__init__": (RH.__init__, {"6a9e373cab28"}),
    "RequestHandler.connection_lost": (RH.connection_lost, {"9daf3cb0a9e8"}),
    "RequestHandler._process_keepalive": (RH._process_keepalive, {"9e0e43e679cf"}),
    "StreamReader.feed_data": (SR.feed_data, {"f038032951f7"}),
    "StreamReader.feed_eof": (SR.feed_eof, {"ee5d63e38ec2"}),
    # wrapped by codings.install_end_check; inspect reads the wrapped source
    "DeflateBuffer.feed_eof": (DB.feed_eof, {"44ef42bdcdda"}),
    "DeflateBuffer.feed_data": (DB.feed_data, {"372e05642d20"}),
    "ZLibDecompressor._new_decompressor": (ZD._new_decompressor, {"55d436b2d0c8"}),
    "ZLibDecompressor.decompress_sync": (ZD.decompress_sync, {"1a804bd091d5"}),
    "ConcatDecompressionHandler._decompress_members": (
        compression_utils.ConcatDecompressionHandler._decompress_members,
        {"fa84bb495776"},
    ),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_relied_on_source_is_unchanged(name: str) -> None:
    obj, known = PINNED[name]
    assert digest(obj) in known, (
        f"aiohttp {aiohttp.__version__} changed {name}: review s3proxy's use of it "
        f"(see this module's docstring), then add {digest(obj)!r} to PINNED"
    )


def test_private_attributes_exist() -> None:
    slots = base_protocol.BaseProtocol.__slots__
    assert "_reading_paused" in slots and "_buffer_paused" in slots
    reader_attrs = inspect.getsource(multipart.MultipartReader.__init__)
    assert "self._at_bof" in reader_attrs and "self._last_part" in reader_attrs
    part_attrs = inspect.getsource(multipart.BodyPartReader.__init__)
    for name in ("_content", "_boundary", "_length", "_prev_chunk", "_at_eof"):
        assert f"self.{name}" in part_attrs, name
    assert "_buffer" in streams.StreamReader.__slots__
    assert "_buffer_offset" in streams.StreamReader.__slots__
    assert "_size" in streams.StreamReader.__slots__  # protocol.drop_unread
    # codings.install_end_check replaces this per-call cap with a per-body rule
    assert "MAX_DECOMPRESS_MEMBERS" in inspect.getsource(
        compression_utils.ConcatDecompressionHandler._decompress_members
    )
    assert protocol.private_api_problems() == []
    assert codings.end_check_problems() == []


@pytest.mark.parametrize("parser", ["c", "python"])
def test_a_gzip_body_cut_short_fails_in_either_parser(parser: str) -> None:
    """The end check reaches the C parser too: it builds http_parser's DeflateBuffer.
    The C parser raises the failure; the Python one sets it on the body's reader."""
    import asyncio
    import gzip
    from unittest import mock

    from s3proxy.errors import undecodable_coding

    assert codings.install_end_check()
    cls = http_parser.HttpRequestParserPy if parser == "python" else http_parser.HttpRequestParserC
    loop = asyncio.new_event_loop()

    def failure(body: bytes) -> BaseException | None:
        head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Encoding: gzip\r\n"
        raw = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        proto = mock.Mock()  # the parser's protocol: only pause/resume reading are called
        p = cls(proto, loop, 2**16, max_line_size=8190, max_field_size=8190)
        try:
            [(_, reader)], _, _ = p.feed_data(raw)
        except Exception as exc:
            return exc
        assert reader.is_eof() or reader.exception() is not None
        return reader.exception()

    try:
        whole = gzip.compress(b"x" * 1000)
        assert failure(whole) is None
        assert failure(whole + whole) is None  # two members
        assert undecodable_coding(failure(whole[:-8])) == "gzip"
        assert undecodable_coding(failure(whole[:-4])) == "gzip"
    finally:
        loop.close()


@pytest.mark.parametrize("parser", ["python", "c"])
def test_a_discarded_coded_body_is_skipped_not_inflated(parser: str) -> None:
    """reprobe17a F3: once a request is answered, aiohttp reads its body on to the end (its
    lingering close, or to keep the connection), and a coded body was inflated all the
    way: a 4 MB gzip bomb answered 401 at once cost 9.7 s of CPU after. A discarded body
    (``codings.discard``, at finish_response) is counted as sent, not decoded, and ends
    without the stream check (it was not decoded to its end)."""
    import asyncio
    import gzip
    from unittest import mock

    assert codings.install_end_check()
    cls = http_parser.HttpRequestParserPy if parser == "python" else http_parser.HttpRequestParserC
    loop = asyncio.new_event_loop()
    try:
        coded = gzip.compress(bytes(4 * 1024 * 1024))
        head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Encoding: gzip\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(coded)
        proto = mock.Mock()  # the parser's protocol: only pause/resume reading are called
        p = cls(proto, loop, 2**16, max_line_size=8190, max_field_size=8190)
        [(_, reader)], _, _ = p.feed_data(head + coded[:100])
        decoded = reader.total_bytes
        codings.discard(reader)
        p.feed_data(coded[100:-20])
        assert reader.total_bytes == decoded  # nothing more inflated
        p.feed_data(coded[-20:])
        assert reader.is_eof() and reader.exception() is None
        assert reader.total_bytes == decoded
    finally:
        loop.close()


def test_chunked_body_payload_is_what_aiohttp_sends() -> None:
    body = ChunkedBody([b"ab", memoryview(b"cd")])
    found = payload.PAYLOAD_REGISTRY.get(body)
    assert isinstance(found, ChunkedBodyPayload)
    assert found.size == 4
