"""Files that are hard on a multipart parser are stored byte for byte (issue #15).

A file may hold anything but the delimiter itself: runs of CRLFs, the delimiter short of
its last byte, dash runs. The bench's junk body (bench/body.py) is built of them; here it
and two purer variants go through the proxy against moto, sized so that the near-misses
straddle aiohttp's read chunks and S3 part boundaries, and every stored object must be the
file exactly. (How much CPU they cost is measured by ``python -m bench.parser_cost`` and
the bench's ``:junk`` cells, not asserted here.)
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest

from bench import body, parser_cost
from tests.s3util import read_object_async

MiB = 1 << 20


def test_the_junk_block_is_junk_and_holds_no_delimiter() -> None:
    block = body.junk_block(1)
    assert len(block) == body.BLOCK
    assert body.DELIMITER not in block + block  # not even where the block repeats
    assert block.count(body.DELIMITER[:-1]) > 1000  # near-boundaries
    assert block.count(b"\r\n") > 100_000
    assert b"-" * 64 in block


def _file(kind: str, size: int) -> bytes:
    return b"".join(bytes(c) for c in parser_cost.file_chunks(kind, size))


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        ("junk", 300 * 1024),  # one PutObject
        ("junk", 11 * MiB + 7),  # three parts; the last one short
        ("crlf", 6 * MiB + 1),  # nothing but CRLFs (and one CR at the end)
        ("near", 6 * MiB),  # nothing but the delimiter short of its last byte
    ],
)
async def test_junk_files_are_stored_byte_identical(
    proxy_factory: Any, s3: Any, bucket: str, kind: str, size: int
) -> None:
    proxy = await proxy_factory(read_buffer=64 * 1024)
    data = _file(kind, size)
    assert body.DELIMITER not in data
    raw = body.form_head("junk.bin") + data + body.form_tail()
    ct = f"multipart/form-data; boundary={body.JUNK_BOUNDARY}"
    resp = await proxy.post("/upload", data=io.BytesIO(raw), headers={"Content-Type": ct})
    out = await resp.json()
    assert resp.status == 201, out
    [f] = out["files"]
    assert f["size"] == size
    assert f["sha256"] == hashlib.sha256(data).hexdigest()
    assert await read_object_async(s3, bucket, f["key"]) == data
