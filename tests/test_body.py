"""ChunkedBody: the file-like view botocore sees, and the bytes aiohttp sends."""

from __future__ import annotations

import io

import pytest

from s3proxy.body import ChunkedBody, ChunkedBodyPayload

CHUNKS: list[bytes | memoryview] = [b"abc", memoryview(b"defgh")[1:], b"", b"ij"]
DATA = b"abcefghij"


def test_length_and_truthiness() -> None:
    assert len(ChunkedBody(CHUNKS)) == len(DATA)
    assert not ChunkedBody([])


@pytest.mark.parametrize("size", [1, 2, 3, 4, 100, -1])
def test_read_in_pieces(size: int) -> None:
    body = ChunkedBody(CHUNKS)
    out = b""
    while piece := body.read(size):
        out += piece
    assert out == DATA


async def test_body_shares_the_callers_list() -> None:
    """No copy of the chunk list: emptying it (the part's memory back to the budget)
    frees the chunks even where a cancelled request still holds its body."""
    chunks: list[bytes | memoryview] = [b"abc", b"de"]
    body = ChunkedBody(chunks)
    chunks.clear()
    assert body.chunks == []
    w = Writer()
    await ChunkedBodyPayload(body).write_with_length(w, None)  # type: ignore[arg-type]
    assert w.data == b""


def test_seek_tell() -> None:
    body = ChunkedBody(CHUNKS)
    assert body.seek(0, io.SEEK_END) == len(DATA)
    body.seek(4)
    assert body.read(3) == DATA[4:7]
    assert body.tell() == 7
    body.seek(-2, io.SEEK_CUR)
    assert body.read() == DATA[5:]


class Writer:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, chunk: bytes | memoryview) -> None:
        self.data += chunk


@pytest.mark.parametrize("limit", [None, 0, 4, 100])
async def test_payload_writes_the_bytes(limit: int | None) -> None:
    w = Writer()
    await ChunkedBodyPayload(ChunkedBody(CHUNKS)).write_with_length(w, limit)  # type: ignore[arg-type]
    assert bytes(w.data) == (DATA if limit is None else DATA[:limit])
