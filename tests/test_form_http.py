"""Part headers as real clients write them, through the proxy: the key's last segment,
the response's filename and the stored Content-Disposition agree; client faults are 4xx."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from s3proxy.form import ClientWatch
from s3proxy.keys import content_disposition
from s3proxy.parts import GATHER_BELOW, PartSlicer
from s3proxy.protocol import ProxyRequestHandler
from tests import bodies
from tests.bodies import raw_body, raw_part
from tests.s3util import all_keys_async, get_object_async, head_object_async, read_object_async

TEXT = b"hello, world\n"


async def post(proxy: Any, raw: bytes) -> tuple[int, dict[str, Any]]:
    resp = await proxy.post("/upload", data=io.BytesIO(raw), headers=bodies.headers())
    assert resp.content_type == "application/json", await resp.text()
    return resp.status, await resp.json()


def no_surrogates(out: dict[str, Any]) -> None:
    json.dumps(out, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot be encoded


async def assert_stored_as(out: dict[str, Any], s3: Any, bucket: str, filename: str) -> None:
    """Response, key and stored Content-Disposition all carry the same final name."""
    no_surrogates(out)
    [f] = out["files"]
    assert f["filename"] == filename, f
    assert f["key"].rsplit("/", 1)[-1] == filename, f
    head = await head_object_async(s3, bucket, f["key"])
    assert head["ContentDisposition"] == content_disposition(filename)


# What clients really write (captured from curl 7.88, requests 2.34/urllib3 2, aiohttp 3.14
# FormData, Node 20 fetch; Chromium and Firefox follow the WHATWG rules like Node).
CLIENTS = [
    pytest.param(b'"Invoice; March; 2026.pdf"', "Invoice; March; 2026.pdf", id="curl-semicolons"),
    pytest.param(b'"a;b;c.txt"', "a;b;c.txt", id="node-semicolons"),
    pytest.param(b'"Invoice%3B%20March%3B%202026.pdf"', "Invoice; March; 2026.pdf", id="aiohttp-;"),
    pytest.param(b'"C:\\Users\\me\\report.pdf"', "report.pdf", id="curl-windows-path"),
    pytest.param(b'"dir\\report.pdf"', "report.pdf", id="requests-backslash"),
    pytest.param(b'"C:\\\\Users\\\\me\\\\report.pdf"', "report.pdf", id="httpx-doubled-backslash"),
    pytest.param(b'"C%3A%5CUsers%5Cme%5Creport.pdf"', "report.pdf", id="aiohttp-windows-path"),
    pytest.param(b'"Pr%C3%A4sentation.pptx"', "Pr\u00e4sentation.pptx", id="aiohttp-utf8"),
    pytest.param('"Pr\u00e4sentation.pptx"'.encode(), "Pr\u00e4sentation.pptx", id="raw-utf8"),
    pytest.param(b'"a%22b.txt"', 'a"b.txt', id="whatwg-quote"),
    pytest.param(b'"100%.pdf"', "100%.pdf", id="literal-percent"),
    pytest.param(b'"a%2.txt"', "a%2.txt", id="broken-escape"),
    pytest.param(b'"100%25.pdf"', "100%.pdf", id="aiohttp-percent"),
    pytest.param(b'"/home/me/x.pdf"', "x.pdf", id="absolute-path"),
    pytest.param(b'"caf\xe9.txt"', "caf\u00e9.txt", id="latin1-byte"),
    pytest.param(b'"\x80 price.txt"', "\u20ac price.txt", id="windows-1252-byte"),
    pytest.param(
        b"\"euro.txt\"; filename*=UTF-8''%E2%82%AC.txt", "\u20ac.txt", id="filename-star-wins"
    ),
    pytest.param(b"\"a.pdf\"; filename*=UTF-8''", "a.pdf", id="empty-filename-star"),
    pytest.param(b'"back\\%22slash"', '"slash', id="curl-backslash-quote"),
    pytest.param(b"report.pdf", "report.pdf", id="unquoted-token"),
    # Kept as sent (they were stripped or collapsed: env, a b.pdf, ends).
    pytest.param(b'".env"', ".env", id="dotfile"),
    pytest.param(b'".gitignore"', ".gitignore", id="dotfile-gitignore"),
    pytest.param(b'"a  b.pdf"', "a  b.pdf", id="double-space"),
    pytest.param(b'"ends."', "ends.", id="trailing-dot"),
    pytest.param('"a\u00a0b.txt"'.encode(), "a\u00a0b.txt", id="no-break-space"),
    pytest.param('"日本\u3000語.txt"'.encode(), "日本\u3000語.txt", id="ideographic-space"),
    pytest.param(b'"a%0D%0Ab.txt"', "a  b.txt", id="whatwg-crlf-spaces"),
    pytest.param(b'" padded.txt "', "padded.txt", id="trimmed"),
    pytest.param(b'"..."', "upload", id="only-dots"),
]


@pytest.mark.parametrize(("filename", "stored"), CLIENTS)
async def test_filenames_as_clients_send_them(
    proxy: Any, s3: Any, bucket: str, filename: bytes, stored: str
) -> None:
    raw = raw_body(raw_part(b'form-data; name="file"; filename=' + filename, TEXT))
    status, out = await post(proxy, raw)
    assert status == 201, out
    await assert_stored_as(out, s3, bucket, stored)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        pytest.param(b'"caf\xe9"', "caf\u00e9", id="latin1-byte"),
        pytest.param(b'"fi\\ le\\"x"', 'fi le"x', id="aiohttp-quoted-string"),
        pytest.param(b"\"x\"; name*=UTF-8''caf%C3%A9", "caf\u00e9", id="name-star"),
        pytest.param(b'"a;b;c"', "a;b;c", id="semicolons"),
    ],
)
async def test_field_names_are_decoded(
    proxy: Any, s3: Any, bucket: str, name: bytes, want: str
) -> None:
    raw = raw_body(
        raw_part(b'form-data; name="file"; filename="a.txt"', TEXT),
        raw_part(b"form-data; name=" + name, b"v"),
    )
    status, out = await post(proxy, raw)
    assert status == 201, out
    no_surrogates(out)
    assert out["fields"] == {want: "v"}


@pytest.mark.parametrize(
    "disposition",
    [
        pytest.param(
            b"form-data; name=\"report\"; filename*=windows-1252''caf%E9.txt", id="cp1252"
        ),
        pytest.param(b"form-data; name=\"report\"; filename*=UTF-8''100%.csv", id="bad-escape"),
        pytest.param(b"form-data; name=\"report\"; filename*=UTF-8''%E9t%E9.csv", id="not-utf8"),
        pytest.param(b'form-data; name="report"; filename*0="rep"; filename*2="ort.csv"', id="gap"),
        pytest.param(b'form-data; name="attachments\\"; filename="two.txt"', id="name-backslash"),
    ],
)
async def test_a_part_that_names_a_file_is_never_read_as_a_field(
    proxy: Any, s3: Any, bucket: str, disposition: bytes
) -> None:
    """Was 201 with only the second file stored: the first one's bytes came back as a
    field (and went on the second file as x-amz-meta metadata)."""
    secret = b"secret,salary\r\nbob,100"
    raw = raw_body(
        raw_part(disposition, secret),
        raw_part(b'form-data; name="file"; filename="b.txt"', TEXT),
    )
    status, out = await post(proxy, raw)
    assert status == 201, out
    no_surrogates(out)
    assert out["fields"] == {}
    first, second = out["files"]
    assert (first["size"], second["filename"]) == (len(secret), "b.txt")
    assert (await get_object_async(s3, bucket, first["key"]))[1] == secret
    assert set((await head_object_async(s3, bucket, second["key"]))["Metadata"]) == {"sha256"}


async def test_file_field_name_is_decoded(proxy: Any, s3: Any, bucket: str) -> None:
    raw = raw_body(raw_part(b'form-data; name="f\xe9"; filename="a.txt"', TEXT))
    status, out = await post(proxy, raw)
    assert status == 201, out
    no_surrogates(out)
    assert out["files"][0]["field"] == "f\u00e9"


async def test_declared_type_not_ascii_is_ignored(proxy: Any, s3: Any, bucket: str) -> None:
    raw = raw_body(
        raw_part(
            b'form-data; name="file"; filename="a.bin"',
            bodies.opaque(100),
            b"Content-Type: appl\xe9cation/x-thing",
        )
    )
    status, out = await post(proxy, raw)
    assert status == 201, out
    no_surrogates(out)
    assert out["files"][0]["content_type"] == "application/octet-stream"


async def test_empty_filename_with_content_is_a_file(proxy: Any, s3: Any, bucket: str) -> None:
    raw = raw_body(raw_part(b'form-data; name="file"; filename=""', TEXT))
    status, out = await post(proxy, raw)
    assert status == 201, out
    await assert_stored_as(out, s3, bucket, "upload")


async def test_empty_file_inputs_do_not_count_as_files(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory(max_files=2)
    empty = raw_part(
        b'form-data; name="attachment"; filename=""', b"", b"Content-Type: application/octet-stream"
    )
    raw = raw_body(*[empty] * 25, raw_part(b'form-data; name="file"; filename="a.txt"', TEXT))
    status, out = await post(proxy, raw)
    assert status == 201, out
    assert [f["field"] for f in out["files"]] == ["file"]
    text = await (await proxy.get("/metrics")).text()
    assert "s3proxy_uploads_started_total 1.0" in text


@pytest.mark.parametrize("encoding", [b"base64", b"quoted-printable", b"x-gzip"])
async def test_content_transfer_encoding_is_refused(
    proxy: Any, s3: Any, bucket: str, encoding: bytes
) -> None:
    raw = raw_body(
        raw_part(
            b'form-data; name="file"; filename="a.txt"',
            b"aGVsbG8=",
            b"Content-Transfer-Encoding: " + encoding,
        )
    )
    status, out = await post(proxy, raw)
    assert status == 400, out
    assert out["error"]["code"] == "MALFORMED_MULTIPART"
    assert "Content-Transfer-Encoding" in out["error"]["message"]


@pytest.mark.parametrize("encoding", [b"binary", b"8bit", b"7BIT"])
async def test_identity_transfer_encodings_are_accepted(
    proxy: Any, s3: Any, bucket: str, encoding: bytes
) -> None:
    raw = raw_body(
        raw_part(
            b'form-data; name="file"; filename="a.txt"',
            TEXT,
            b"Content-Transfer-Encoding: " + encoding,
        )
    )
    status, out = await post(proxy, raw)
    assert status == 201, out


@pytest.mark.parametrize(
    ("part", "words"),
    [
        pytest.param(
            raw_part(b'form-data; name="file";\r\n filename="a.txt"', TEXT), "folded", id="obs-fold"
        ),
        pytest.param(
            raw_part(b'form-data; name="file"; filename="' + b"a" * 9000 + b'.txt"', TEXT),
            "longer than",
            id="header-line-over-8k",
        ),
        pytest.param(raw_part(b'form-data; filename="a.txt"', TEXT), "no name", id="no-name"),
        pytest.param(
            raw_part(b'form-data; name="file"; filename="a.txt', TEXT),
            "quote",
            id="unterminated-quote",
        ),
        pytest.param(
            raw_part(b'form-data; name="a"; name="b"; filename="a.txt"', TEXT),
            "twice",
            id="repeated-parameter",
        ),
        pytest.param(
            b"--" + bodies.BOUNDARY.encode() + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n",
            "no Content-Disposition",
            id="no-disposition",
        ),
    ],
)
async def test_bad_part_headers_are_400(
    proxy: Any, s3: Any, bucket: str, part: bytes, words: str
) -> None:
    status, out = await post(proxy, raw_body(part))
    assert status == 400, out
    assert out["error"]["code"] == "MALFORMED_MULTIPART"
    assert words in out["error"]["message"], out


@pytest.mark.parametrize("length", [8188, 8189, 8190])
async def test_the_part_header_line_limit_is_told_as_it_is(
    proxy: Any, s3: Any, bucket: str, length: int
) -> None:
    """aiohttp counts a part header line's CRLF: 8188 bytes pass, and 8189 or 8190 were
    refused as "longer than 8190 bytes" (probe reprobe8 F4). The message now says how
    the line is counted."""
    line = b"X-L: " + b"a" * (length - 5)
    status, out = await post(
        proxy, raw_body(raw_part(b'form-data; name="file"; filename="a.txt"', TEXT, line))
    )
    if length <= 8188:
        assert status == 201, out
        return
    assert status == 400, out
    assert out["error"]["code"] == "MALFORMED_MULTIPART"
    assert (
        "8190 bytes with its line end (at most 8188 bytes and a CRLF)" in (out["error"]["message"])
    ), out


# --- timeouts and limits while reading the preamble and part headers ------------------------


async def read_response(reader: asyncio.StreamReader, within: float) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, await asyncio.wait_for(reader.readexactly(length), within)


async def test_slow_preamble_and_headers_are_not_a_timeout(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """--client-timeout is an idle timeout: a client that keeps sending is never cut off."""
    proxy = await proxy_factory(client_timeout=0.6)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(bodies.chunked_request_head())
    part = raw_part(b'form-data; name="file"; filename="slow.txt"', TEXT)
    head, _, rest = part.partition(b"\r\n\r\n")
    slow = [b"preamble line %d\r\n" % i for i in range(6)] + [
        head[i : i + 8] for i in range(0, 48, 8)
    ]
    for piece in slow:  # 12 x 0.2 s: well over the timeout in total, never idle that long
        writer.write(bodies.chunk_frame(piece))
        await writer.drain()
        await asyncio.sleep(0.2)
    tail = head[48:] + b"\r\n\r\n" + rest + b"--" + bodies.BOUNDARY.encode() + b"--\r\n"
    writer.write(bodies.chunk_frame(tail) + bodies.chunk_frame(b""))
    await writer.drain()
    status, payload = await read_response(reader, 10)
    writer.close()
    assert status == 201, payload
    assert json.loads(payload)["files"][0]["filename"] == "slow.txt"


async def test_idle_client_in_part_headers_gets_408(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    proxy = await proxy_factory(client_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(bodies.chunked_request_head())
    writer.write(bodies.chunk_frame(b"--" + bodies.BOUNDARY.encode() + b"\r\nContent-Disp"))
    await writer.drain()
    status, payload = await read_response(reader, 5)
    writer.close()
    assert status == 408 and b"CLIENT_TIMEOUT" in payload


async def test_oversized_preamble_is_refused_while_it_arrives(
    proxy_factory: Any, s3: Any, bucket: str
) -> None:
    """--max-request-size holds while the preamble is read, not after it (a limit below
    the preamble's own, 64 KiB)."""
    proxy = await proxy_factory(max_request_size=16 * 1024, client_timeout=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(bodies.chunked_request_head())
    line = b"x" * 1000 + b"\r\n"
    try:
        for _ in range(3 * 64):  # 3 MiB of preamble, no boundary, and the body never ends
            writer.write(bodies.chunk_frame(line * 16))
        await writer.drain()
    except ConnectionError:
        pass  # the proxy may answer and close before it has read everything
    status, payload = await read_response(reader, 5)
    writer.close()
    assert status == 413 and b"REQUEST_TOO_LARGE" in payload


@pytest.mark.parametrize(
    ("preamble", "expected"),
    [
        (b"This is a multi-part message in MIME format.\r\n", 201),
        (b"x" * 1000 + b"\r\n" * 31_000, 201),  # just under 64 KiB
        (b"\r\n" * 40_000, 400),  # 80,000 bytes: refused, not read line by line to its end
    ],
)
async def test_a_preamble_is_bounded(
    proxy_factory: Any, s3: Any, bucket: str, preamble: bytes, expected: int
) -> None:
    """A preamble is read a line at a time (aiohttp's readline): 10 MiB of empty lines
    cost 11 s of CPU and stalled the event loop for seconds (/healthz 1.7 s p50)."""
    proxy = await proxy_factory()
    raw = raw_body(raw_part(b'form-data; name="file"; filename="a.txt"', TEXT), preamble=preamble)
    status, out = await post(proxy, raw)
    assert status == expected, out
    if expected == 400:
        assert out["error"]["code"] == "MALFORMED_MULTIPART"
        assert "64 KiB" in out["error"]["message"]
        assert await all_keys_async(s3, bucket) == []


async def test_unused_file_inputs_count_as_fields(proxy_factory: Any, s3: Any, bucket: str) -> None:
    """A browser's unused file input (filename="", no bytes) is skipped, but counted: 100,000
    of them cost 8 s of CPU while no limit counted them."""
    proxy = await proxy_factory(max_fields=5)
    unused = raw_part(b'form-data; name="extra"; filename=""', b"")
    field = raw_part(b'form-data; name="title"', b"Q3")
    real = raw_part(b'form-data; name="file"; filename="a.txt"', TEXT)
    status, out = await post(proxy, raw_body(field, *[unused] * 4, real))
    assert status == 201 and [f["filename"] for f in out["files"]] == ["a.txt"], out
    status, out = await post(proxy, raw_body(field, *[unused] * 5, real))
    assert (status, out["error"]["code"]) == (413, "TOO_MANY_FIELDS"), out
    assert "unused file inputs" in out["error"]["message"]


async def test_oversized_part_headers_are_refused(proxy_factory: Any, s3: Any, bucket: str) -> None:
    proxy = await proxy_factory(max_request_size=64 * 1024)
    many = [b"X-Pad-%d: %s" % (i, b"y" * 1000) for i in range(100)]
    raw = raw_body(raw_part(b'form-data; name="file"; filename="a.txt"', TEXT, *many))
    resp = await proxy.post("/upload", data=bodies.chunked(raw, 4096), headers=bodies.headers())
    assert resp.status in (400, 413), await resp.text()


# --- curl itself ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize(
    ("filename", "stored"),
    [
        ("Invoice; March; 2026.pdf", "Invoice; March; 2026.pdf"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ('say "hi".txt', 'say "hi".txt'),
        ("Pr\u00e4sentation.pptx", "Pr\u00e4sentation.pptx"),
    ],
)
async def test_curl_filenames(
    proxy: Any, s3: Any, bucket: str, tmp_path: Path, filename: str, stored: str
) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(TEXT)
    # curl -F: inside a double-quoted filename, \ escapes " and \ (curl's own syntax).
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    url = f"http://127.0.0.1:{proxy.port}/upload"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-F", f'file=@{path};filename="{quoted}"', url, stdout=subprocess.PIPE
    )
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0
    await assert_stored_as(json.loads(stdout), s3, bucket, stored)


@pytest.mark.parametrize(
    "ctype",
    [
        'multipart/form-data; boundary=""',
        "multipart/form-data; boundary=",
        "multipart/form-data",
        "multipart/form-data; boundary=" + "b" * 71,
        # RFC 2046 bchars: no trailing space, no quote, backslash, ; or non-ASCII
        'multipart/form-data; boundary="abc "',
        'multipart/form-data; boundary="a\\"b"',
        'multipart/form-data; boundary="a\\b"',
        'multipart/form-data; boundary="a;b"',
        "multipart/form-data; boundary=a@b",
        "multipart/form-data; boundary=caf\u00e9",
        'multipart/form-data; boundary="abc',
        # read otherwise by aiohttp (it strips spaces, splits on every ;)
        'multipart/form-data; boundary=" abc"',
        'multipart/form-data; charset="x;boundary=zzz"; boundary=abc',
        # given twice: the first won (a parser-differential risk)
        "multipart/form-data; boundary=abc; boundary=zzz",
        "multipart/form-data; boundary=abc; BOUNDARY=abc",
    ],
)
@pytest.mark.parametrize("expect", [False, True])
async def test_a_bad_boundary_is_refused_before_the_body(
    proxy: Any, s3: Any, bucket: str, ctype: str, expect: bool
) -> None:
    """RFC 2046 section 5.1.1: a boundary is 1 to 70 characters. An empty one was taken,
    its delimiter a bare ``--``, and the file stored (201). With Expect: 100-continue the
    refusal comes before the body is sent."""
    body = (
        b'--\r\nContent-Disposition: form-data; name="f"; filename="a.txt"\r\n\r\nhello\r\n----\r\n'
    )
    headers = {"Content-Type": ctype}
    if expect:
        headers["Expect"] = "100-continue"
    resp = await proxy.post("/upload", data=body, headers=headers)
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] == "MALFORMED_MULTIPART"
    assert await all_keys_async(s3, bucket) == []


@pytest.mark.parametrize(
    ("params", "read_as"),
    [
        ('boundary="abc "', "abc"),
        ('boundary=" abc"', "abc"),
        ("boundary=abc; boundary=zzz", "abc"),
        ('charset="x;boundary=abc"; boundary=zzz', "abc"),
        ('boundary="a\\"b"', 'a\\"b'),
    ],
)
async def test_a_boundary_read_two_ways_is_refused_before_the_body(
    proxy: Any, s3: Any, bucket: str, params: str, read_as: str
) -> None:
    """The body is valid for the boundary aiohttp's reader takes from the header; the
    client meant another (or the header is ambiguous). It was stored (201); now the
    header alone is refused, and nothing is stored."""
    part = raw_part(b'form-data; name="file"; filename="a.txt"', TEXT)
    raw = raw_body(part).replace(bodies.BOUNDARY.encode(), read_as.encode())
    resp = await proxy.post(
        "/upload", data=io.BytesIO(raw), headers={"Content-Type": "multipart/form-data; " + params}
    )
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "MALFORMED_MULTIPART"
    assert "boundary" in error["message"] and "body" not in error["message"], error
    assert await all_keys_async(s3, bucket) == []


@pytest.mark.parametrize(
    ("params", "boundary"),
    [
        ('boundary="\'()+_,-./:=?"', "'()+_,-./:=?"),
        ('boundary="a b  c"', "a b  c"),
        ("boundary=" + "b" * 70, "b" * 70),
        ("BOUNDARY=abc", "abc"),
        ("Boundary = abc ; charset=utf-8", "abc"),
        ('charset="utf-8";boundary="abc"', "abc"),
    ],
)
async def test_boundaries_rfc_2046_allows_are_taken(
    proxy: Any, s3: Any, bucket: str, params: str, boundary: str
) -> None:
    part = raw_part(b'form-data; name="file"; filename="a.txt"', TEXT)
    raw = raw_body(part).replace(bodies.BOUNDARY.encode(), boundary.encode())
    resp = await proxy.post(
        "/upload",
        data=io.BytesIO(raw),
        headers={"Content-Type": "multipart/form-data; " + params},
    )
    assert resp.status == 201, await resp.text()


def two_headers(*lines: bytes) -> bytes:
    return raw_body(raw_part(b'form-data; name="file"; filename="a.txt"', TEXT, *lines))


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        pytest.param(
            two_headers(b"Content-Transfer-Encoding: binary", b"Content-Transfer-Encoding: base64"),
            "two Content-Transfer-Encoding headers",
            id="two-transfer-encodings",
        ),
        pytest.param(
            two_headers(b"Content-Type: text/plain", b"Content-Type: application/pdf"),
            "repeats a header",
            id="two-content-types",
        ),
        pytest.param(two_headers(b": foo"), "not 'Name: value'", id="empty-header-name"),
        pytest.param(two_headers(b"no colon here"), "not 'Name: value'", id="no-colon"),
        pytest.param(two_headers(b"X-A: a\x00b"), "not 'Name: value'", id="nul-in-value"),
        pytest.param(
            two_headers(*[b"X-H%d: v" % i for i in range(128)]),  # 129 with the disposition
            "a part has more than 128 header lines",
            id="too-many-headers",
        ),
        pytest.param(
            raw_body(
                raw_part(
                    b'form-data; name="file"; filename="a.bin"',
                    b"data\r\n--" + bodies.BOUNDARY.encode() + b"SECRET\x87\x0fG_bytes",
                )
            ),
            "must not",
            id="boundary-in-file-data",
        ),
        pytest.param(
            raw_body(
                raw_part(
                    b'form-data; name="note"',
                    b"v\r\n--" + bodies.BOUNDARY.encode() + b"SECRET",
                ),
                raw_part(b'form-data; name="file"; filename="a.bin"', TEXT),
            ),
            "must not",
            id="boundary-in-field-value",
        ),
        pytest.param(
            raw_part(b'form-data; name="file"; filename="a.bin"', TEXT)
            + b"--"
            + bodies.BOUNDARY.encode()
            + b"SECRET",
            "must not",
            id="junk-after-the-last-delimiter",
        ),
    ],
)
async def test_malformed_parts_are_told_in_our_words(
    proxy: Any, s3: Any, bucket: str, raw: bytes, words: str
) -> None:
    """400 MALFORMED_MULTIPART with a short message of ours: no newline, none of the
    client's bytes (aiohttp's text echoed a header, or up to 20 bytes of the file)."""
    status, out = await post(proxy, raw)
    assert status == 400, out
    assert out["error"]["code"] == "MALFORMED_MULTIPART"
    message = out["error"]["message"]
    assert words in message, message
    assert "\n" not in message and "b'" not in message and "SECRET" not in message, message
    assert "400, message" not in message and "Invalid" not in message, message
    assert await all_keys_async(s3, bucket) == []


async def test_a_part_may_have_128_header_lines(proxy: Any) -> None:
    """The limit the refusal names (README): a request head's."""
    status, out = await post(proxy, two_headers(*[b"X-H%d: v" % i for i in range(127)]))
    assert status == 201, out


async def test_a_file_in_tiny_http_chunks_is_read_per_socket_read(
    proxy: Any, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunked body in 1-byte HTTP chunks (reprobe10b N2: ~20 us each, 20,000 CPU s per
    GiB of file, the event loop held 17 s, 66 bytes of memory per byte of a part): the
    reads from the client, and aiohttp's calls back into the connection, are per socket
    read, not per HTTP chunk; the part holds a few chunks, not one per byte."""
    reads = socket_reads = empty_calls = 0
    held: list[int] = []
    watch_read, data_received = ClientWatch.read, ProxyRequestHandler.data_received
    take = PartSlicer.take

    async def counted_read(self: ClientWatch, read: Any) -> Any:
        nonlocal reads
        reads += 1
        return await watch_read(self, read)

    def counted_data(self: ProxyRequestHandler, data: bytes) -> None:
        nonlocal socket_reads, empty_calls
        if data:
            socket_reads += 1
        else:
            empty_calls += 1
        data_received(self, data)

    def counted_take(self: PartSlicer) -> tuple[int, list[bytes | memoryview]]:
        number, chunks = take(self)
        held.append(len(chunks))
        return number, chunks

    monkeypatch.setattr(ClientWatch, "read", counted_read)
    monkeypatch.setattr(ProxyRequestHandler, "data_received", counted_data)
    monkeypatch.setattr(PartSlicer, "take", counted_take)
    data = bodies.opaque(64 * 1024, seed=5)
    part = raw_part(b'form-data; name="file"; filename="tiny.bin"', data)
    body = raw_body(part)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(bodies.chunked_request_head())
    writer.write(b"".join(bodies.chunk_frame(body[i : i + 1]) for i in range(len(body))))
    writer.write(bodies.chunk_frame(b""))
    await writer.drain()
    status, answer = await read_response(reader, 30)
    writer.close()
    assert status == 201, answer
    [stored] = json.loads(answer)["files"]
    assert await read_object_async(s3, bucket, stored["key"]) == data
    assert socket_reads < 200  # ~400 KB on the wire
    assert reads <= 4 * socket_reads + 20, (reads, socket_reads)  # was 1 per HTTP chunk
    # (a resume after a pause of aiohttp's parses again: a few)
    assert empty_calls <= 2 * socket_reads + 10, (empty_calls, socket_reads)  # was 1 per chunk
    # chunks of at least GATHER_BELOW bytes (under 1% of overhead): was 65,536 of 1 byte
    assert held and max(held) <= len(data) // GATHER_BELOW + 2, held
