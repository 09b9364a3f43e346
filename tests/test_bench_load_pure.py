"""The load generator's pure parts, as tables: parsing, bodies, retry, statistics, verdicts."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import shlex
from typing import Any

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader

from bench import genbody, load, load_config, load_report, load_stats, load_verify
from bench.load_config import LoadConfig
from bench.load_stats import RequestRecord

MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1MiB", MiB),
        ("1 mib", MiB),
        ("20M", 20 * MiB),
        ("200MiB", 200 * MiB),
        ("1.5KiB", 1536),
        ("100KB", 100_000),
        ("1GB", 10**9),
        ("1GiB", 1 << 30),
        ("0", 0),
        ("4096", 4096),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert load_config.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "1TiB", "-1MiB", "1 MiB 2", "one"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        load_config.parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("5min", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("2.5s", 2.5),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert load_config.parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "s", "5x", "0s", "5m later", "-5s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        load_config.parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5", 5.0), ("5/s", 5.0), ("300/m", 5.0), ("0.5/s", 0.5), ("3600/h", 1.0), ("2 / s", 2.0)],
)
def test_parse_rate(text: str, expected: float) -> None:
    assert load_config.parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "/s", "5/d", "0/s", "fast"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        load_config.parse_rate(text)


@pytest.mark.parametrize(
    ("sizes", "mix", "expected"),
    [
        ("1MiB", None, ((MiB, 1.0),)),
        ("1MiB,20MiB,200MiB", "70,25,5", ((MiB, 0.7), (20 * MiB, 0.25), (200 * MiB, 0.05))),
        ("1MiB,2MiB", "7,3", ((MiB, 0.7), (2 * MiB, 0.3))),
        ("1MiB,2MiB", None, ((MiB, 0.5), (2 * MiB, 0.5))),
        ("1MiB,2MiB", "1,0", ((MiB, 1.0), (2 * MiB, 0.0))),
        (" 1MiB , 2MiB ", " 1 , 1 ", ((MiB, 0.5), (2 * MiB, 0.5))),
        ("1MiB,2MiB", "", ((MiB, 0.5), (2 * MiB, 0.5))),
    ],
)
def test_parse_mix(sizes: str, mix: str | None, expected: tuple[tuple[int, float], ...]) -> None:
    got = load_config.parse_mix(sizes, mix)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize(
    ("sizes", "mix", "match"),
    [
        ("", None, "no sizes"),
        ("1MiB,2MiB", "70", "2 sizes but 1 weights"),
        ("1MiB", "70,30", "1 sizes but 2 weights"),
        ("1MiB,2MiB", "0,0", "positive sum"),
        ("1MiB,2MiB", "-1,2", "positive sum"),
        ("1MiB,2MiB", "a,b", "not a list of weights"),
        ("1MiB,2MiB", "nan,1", "positive sum"),
        ("1XB", None, "not a size"),
    ],
)
def test_parse_mix_refuses(sizes: str, mix: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config.parse_mix(sizes, mix)


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("http://lb:8080", "http://lb:8080/upload"),
        ("http://lb:8080/", "http://lb:8080/upload"),
        ("https://up.example.com", "https://up.example.com/upload"),
        ("http://127.0.0.1:9000/upload", "http://127.0.0.1:9000/upload"),
        ("http://gw/s3proxy/upload", "http://gw/s3proxy/upload"),
    ],
)
def test_upload_url(target: str, url: str) -> None:
    assert load_config.upload_url(target) == url


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"target": "lb:8080"}, "http"),
        ({"concurrency": 0}, "concurrency"),
        ({"duration": None}, "duration or a number"),
        ({"requests": 0}, "requests"),
        ({"rate": 0.0}, "rate"),
        ({"arrivals": "bursty"}, "arrivals"),
        ({"retry": -1}, "retry"),
        ({"verify": True}, "--s3-endpoint"),
        ({"cleanup": True}, "--cleanup needs --verify"),
        ({"mix": ()}, "mix"),
    ],
)
def test_config_refuses(overrides: dict[str, Any], match: str) -> None:
    base: dict[str, Any] = {"target": "http://127.0.0.1:8080"}
    with pytest.raises(ValueError, match=match):
        LoadConfig(**{**base, **overrides})


def test_config_json_masks_credentials() -> None:
    cfg = LoadConfig(target="http://x:1", api_key="secret-key", token="a.b")
    text = str(cfg.to_json())
    assert "secret-key" not in text and "a.b" not in text
    assert cfg.to_json()["api_key"] == "***"


def test_cli_flags_make_the_config() -> None:
    cfg = load_config.config_from_argv(
        shlex.split(
            "--target http://lb:8080 --concurrency 8 --duration 5m --sizes 1MiB,20MiB,200MiB"
            " --mix 70,25,5 --retry 2 --timeout 2m --rate 10/s --arrivals fixed --chunked --quiet"
        )
    )
    assert cfg.url == "http://lb:8080/upload"
    assert (cfg.concurrency, cfg.duration, cfg.retry, cfg.timeout) == (8, 300.0, 2, 120.0)
    assert [s for s, _ in cfg.mix] == [MiB, 20 * MiB, 200 * MiB]
    assert (cfg.rate, cfg.arrivals, cfg.chunked, cfg.progress) == (10.0, "fixed", True, False)
    # --requests alone runs until they are done; neither: 30 s
    only_n = load_config.config_from_argv(["--target", "http://x:1", "--requests", "5"])
    assert (only_n.duration, only_n.requests) == (None, 5)
    assert load_config.config_from_argv(["--target", "http://x:1"]).duration == 30.0


def test_cli_refuses_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        load_config.config_from_argv(["--target", "http://x:1", "--sizes", "1MiB", "--mix", "1,2"])
    assert e.value.code == 2
    assert "1 sizes but 2 weights" in capsys.readouterr().err


# --- bodies ---------------------------------------------------------------------------------


async def _parse_multipart(body: genbody.UploadBody, data: bytes) -> list[tuple[str, str, bytes]]:
    """Parse ``data`` with aiohttp's own MultipartReader, as s3proxy's form reader does."""
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), 2**30, loop=loop)  # no pausing: all fed at once
    stream.feed_data(data)
    stream.feed_eof()
    reader = aiohttp.MultipartReader({"Content-Type": body.content_type}, stream)
    parts = []
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        parts.append((part.name or "", part.filename or "", bytes(await part.read())))
    return parts


async def _collect(body: genbody.UploadBody) -> bytes:
    return b"".join([bytes(c) async for c in body.stream()])


@pytest.mark.parametrize(
    "size", [0, 1, 1000, genbody.WINDOW - 1, genbody.WINDOW, genbody.WINDOW + 1, 3 * MiB + 7]
)
async def test_body_is_multipart_aiohttp_parses_with_the_right_sha256(size: int) -> None:
    body = genbody.UploadBody(seed=7, upload=3, size=size)
    sent: list[int] = []
    data = b"".join([bytes(c) async for c in body.stream(sent.append)])
    assert len(data) == body.content_length
    assert sum(sent) == size
    parts = await _parse_multipart(body, data)
    assert len(parts) == 1
    name, filename, content = parts[0]
    assert (name, filename, len(content)) == ("file", "load-3.bin", size)
    assert body.sha256 == hashlib.sha256(content).hexdigest()
    assert body.sha256 == genbody.file_sha256(7, 3, size)
    assert body.started and body.finished


async def test_bodies_differ_per_upload_and_repeat_per_attempt() -> None:
    size = 2 * MiB + 5
    a1 = await _collect(genbody.UploadBody(1, 1, size))
    a2 = await _collect(genbody.UploadBody(1, 1, size))
    b = await _collect(genbody.UploadBody(1, 2, size))
    other_seed = await _collect(genbody.UploadBody(2, 1, size))
    assert a1 == a2
    content = {genbody.file_sha256(1, n, size) for n in range(20)}
    assert len(content) == 20
    assert a1[-size - 100 :] != b[-size - 100 :]
    assert genbody.file_sha256(1, 1, size) != genbody.file_sha256(2, 1, size)
    assert len(other_seed) == len(a1)


def test_body_bytes_are_incompressible() -> None:
    import zlib

    sample = b"".join(bytes(c) for c in genbody.file_chunks(1, 0, 4 * MiB))
    assert len(zlib.compress(sample, 1)) > 0.99 * len(sample)


def test_boundary_is_a_valid_multipart_boundary() -> None:
    b = genbody.boundary(123, 456)
    assert len(b) <= 70 and b.isascii() and b != genbody.boundary(123, 457)


# --- retry, answers, transport failures ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "started", "done", "max_retries", "retry"),
    [
        (503, "SHUTTING_DOWN", True, 0, 2, True),
        (503, "OVERLOADED", False, 1, 2, True),
        (503, "UPSTREAM_UNAVAILABLE", True, 0, 1, True),
        (503, "OVERLOADED", True, 2, 2, False),  # retries used up
        (503, "OVERLOADED", True, 0, 0, False),  # --retry 0
        (0, "CONNECTION_REFUSED", False, 0, 1, True),
        (0, "CONNECTION_REFUSED", True, 0, 1, False),  # body bytes went out: maybe stored
        (0, "SEND_FAILED", True, 0, 1, True),  # the body never arrived whole
        (0, "SEND_FAILED", True, 1, 1, False),
        (0, "DISCONNECTED", True, 0, 3, False),  # after the whole body: maybe stored
        (0, "TIMEOUT", False, 0, 3, False),
        (0, "CONNECTION_RESET", True, 0, 3, False),
        (502, "UPSTREAM_ERROR", True, 0, 3, False),
        (504, "UPSTREAM_TIMEOUT", True, 0, 3, False),
        (503, "HTTP_503", True, 0, 3, False),  # a 503 from someone else: no promise
        (500, "INTERNAL", True, 0, 3, False),
        (413, "FILE_TOO_LARGE", True, 0, 3, False),
        (201, "", True, 0, 3, False),
    ],
)
def test_should_retry(
    status: int, code: str, started: bool, done: int, max_retries: int, retry: bool
) -> None:
    assert load.should_retry(status, code, started, done, max_retries) is retry


@pytest.mark.parametrize(
    ("done", "retry_after", "jitter", "expected"),
    [
        (0, None, 0.0, 0.1),
        (0, None, 0.999999, 0.2),
        (1, None, 0.0, 0.2),
        (3, None, 0.0, 0.8),
        (10, None, 0.999999, load.BACKOFF_MAX_S),
        (0, 2.0, 0.0, 2.0),  # Retry-After longer than the backoff wins
        (3, 0.0, 0.0, 0.8),  # and a shorter one does not
        (0, 120.0, 0.0, load.BACKOFF_MAX_S),  # capped
    ],
)
def test_backoff(done: int, retry_after: float | None, jitter: float, expected: float) -> None:
    assert load.backoff_s(done, retry_after, jitter) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("3", 3.0),
        (" 10 ", 10.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("-1", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert load.parse_retry_after(value) == expected


def _connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    key: Any = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, os_error)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (_connector_error(ConnectionRefusedError(111, "refused")), "CONNECTION_REFUSED"),
        (_connector_error(OSError(113, "no route")), "CONNECT_ERROR"),
        (TimeoutError(), "TIMEOUT"),
        (aiohttp.ServerTimeoutError("read"), "TIMEOUT"),
        (aiohttp.ServerDisconnectedError(), "DISCONNECTED"),
        (aiohttp.ClientPayloadError("cut"), "PAYLOAD_ERROR"),
        (ConnectionResetError(104, "reset"), "CONNECTION_RESET"),
        (aiohttp.ClientOSError(32, "Can not write request body"), "OS_ERROR"),
        (aiohttp.ClientConnectionError("Failed to send bytes"), "CLIENTCONNECTIONERROR"),
    ],
)
def test_transport_code(exc: BaseException, code: str) -> None:
    assert load.transport_code(exc) == code


@pytest.mark.parametrize(
    ("exc", "started", "finished", "code"),
    [
        (
            _connector_error(ConnectionRefusedError(111, "refused")),
            False,
            False,
            "CONNECTION_REFUSED",
        ),
        (aiohttp.ClientOSError(None, "Can not write request body"), True, False, "SEND_FAILED"),
        (aiohttp.ServerDisconnectedError(), True, False, "SEND_FAILED"),
        (ConnectionResetError(104, "reset"), True, False, "SEND_FAILED"),
        (TimeoutError(), True, False, "TIMEOUT"),  # a slow server: not retried
        (aiohttp.ServerDisconnectedError(), True, True, "DISCONNECTED"),  # the body was all sent
        (aiohttp.ClientOSError(104, "reset"), False, False, "OS_ERROR"),
    ],
)
def test_failure_code(exc: BaseException, started: bool, finished: bool, code: str) -> None:
    assert load.failure_code(exc, started, finished) == code


SHA = "ab" * 32


@pytest.mark.parametrize(
    ("status", "text", "expected"),
    [
        (201, f'{{"files": [{{"key": "u/k", "size": 5, "sha256": "{SHA}"}}]}}', ("", "u/k", "")),
        (201, '{"files": [{"key": "u/k", "size": 5}]}', ("", "u/k", "")),  # no sha256 reported
        (201, '{"files": [{"key": "u/k", "size": 4}]}', ("BAD_REPLY", "u/k", "size 4")),
        (
            201,
            f'{{"files": [{{"key": "u/k", "size": 5, "sha256": "{"cd" * 32}"}}]}}',
            ("BAD_REPLY", "u/k", "sha256"),
        ),
        (201, '{"files": []}', ("BAD_REPLY", "", "one file")),
        (
            201,
            '{"files": [{"key": "a", "size": 5}, {"key": "b", "size": 5}]}',
            ("BAD_REPLY", "", "one file"),
        ),
        (201, '{"files": [{"size": 5}]}', ("BAD_REPLY", "", "no key")),
        (201, "not json", ("BAD_REPLY", "", "one file")),
        (503, '{"error": {"code": "OVERLOADED", "message": "busy"}}', ("OVERLOADED", "", "busy")),
        (413, '{"error": {"code": "FILE_TOO_LARGE", "message": "m"}}', ("FILE_TOO_LARGE", "", "m")),
        (502, "<html>Bad Gateway</html>", ("HTTP_502", "", "Bad Gateway")),
        (503, '{"error": "x"}', ("HTTP_503", "", "")),
    ],
)
def test_parse_reply(status: int, text: str, expected: tuple[str, str, str]) -> None:
    code, key, error = load.parse_reply(status, text, 5, SHA)
    assert (code, key) == expected[:2]
    assert expected[2] in error


def test_a_201_before_the_body_was_hashed_is_not_ok() -> None:
    assert load.parse_reply(201, '{"files": [{"key": "k", "size": 5}]}', 5, "")[0] == "BAD_REPLY"


def test_arrival_gaps() -> None:
    fixed = load.arrival_gaps(4.0, "fixed", random.Random(1))
    assert [next(fixed) for _ in range(3)] == [0.25, 0.25, 0.25]
    poisson = load.arrival_gaps(4.0, "poisson", random.Random(1))
    gaps = [next(poisson) for _ in range(20000)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.03)
    assert min(gaps) < 0.01 < 0.75 < max(gaps)  # exponential: bursts and lulls


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ((42.9, 318, 8, 71.26, 0, 0), "0:42 done 318 in flight 8   71.3 MB/s errors 0"),
        ((3725, 5, 0, 0.0, 2, 7), "62:05 done 5 in flight 0    0.0 MB/s errors 2 dropped 7"),
    ],
)
def test_progress_line(args: tuple[float, int, int, float, int, int], line: str) -> None:
    assert load.progress_line(*args) == line


# --- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([4.0, 1.0, 3.0, 2.0], 25, 1.75),
        ([5.0], 99, 5.0),
        (list(map(float, range(1, 101))), 95, 95.05),
        (list(map(float, range(1, 101))), 99, 99.01),
        (list(map(float, range(101))), 50, 50.0),
    ],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert load_stats.percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(load_stats.percentile([], 50))
    with pytest.raises(ValueError):
        load_stats.percentile([1.0], 101)


def _rec(
    n: int, start: float, end: float, size: int = MiB, status: int = 201, **kw: Any
) -> RequestRecord:
    return RequestRecord(n=n, size=size, start=start, end=end, status=status, **kw)


@pytest.mark.parametrize(
    ("records", "series"),
    [
        ([], []),
        ([_rec(0, 0.0, 1.0, 10**6)], [1.0]),
        ([_rec(0, 0.0, 2.0, 4 * 10**6)], [2.0, 2.0]),  # spread over its duration
        ([_rec(0, 0.5, 1.5, 2 * 10**6)], [1.0, 1.0]),
        ([_rec(0, 0.0, 1.0, 10**6), _rec(1, 0.0, 1.0, 10**6)], [2.0]),
        (
            [_rec(0, 0.0, 1.0, 10**6), _rec(1, 0.0, 3.0, 10**6, status=503, code="OVERLOADED")],
            [1.0],
        ),
        ([_rec(0, 2.0, 2.0, 10**6)], [0.0, 1.0]),  # zero length, on a boundary: the last second
        ([_rec(0, 1.5, 1.5, 10**6)], [0.0, 1.0]),
    ],
)
def test_throughput_series(records: list[RequestRecord], series: list[float]) -> None:
    assert load_stats.throughput_series(records) == pytest.approx(series)


def test_summarize_counts() -> None:
    recs = [
        _rec(0, 0.0, 1.0, verify="ok"),
        _rec(1, 0.0, 2.0, retries=2, retried_on=["503 OVERLOADED", "0 SEND_FAILED"], verify="ok"),
        _rec(2, 0.5, 3.0, verify="lost"),
        _rec(3, 1.0, 4.0, verify="partial"),
        _rec(4, 1.0, 2.0, verify="mismatch"),
        _rec(5, 1.0, 1.5, status=503, code="OVERLOADED", retries=1, retried_on=["503 OVERLOADED"]),
        _rec(6, 1.0, 1.1, status=503, code="OVERLOADED"),
        _rec(7, 2.0, 3.0, status=0, code="CONNECTION_REFUSED"),
        _rec(8, 2.0, 3.0, status=201, code="BAD_REPLY"),
        _rec(9, 2.0, 3.0, status=502, code=""),
    ]
    r = load_stats.summarize({"verify": True}, "t", recs, dropped=3)
    assert (r.ok, r.failed, r.retries, r.retried_ok, r.dropped) == (5, 5, 3, 1, 3)
    assert r.errors == {
        "503 OVERLOADED": 2,
        "0 CONNECTION_REFUSED": 1,
        "201 BAD_REPLY": 1,
        "502 HTTP_502": 1,
    }
    assert r.retries_by == {"503 OVERLOADED": 2, "0 SEND_FAILED": 1}
    assert (r.verified, r.lost, r.partial, r.mismatched, r.verify_errors) == (2, 1, 1, 1, 0)
    assert r.wall_s == 4.0
    assert r.bytes_ok == 5 * MiB
    assert r.throughput_mbps == pytest.approx(5 * MiB / 1e6 / 4, abs=1e-3)
    assert r.latency_s["p50"] == pytest.approx(2.0)  # of 1, 1, 2, 2.5, 3: the 201s only
    assert r.latency_s["max"] == pytest.approx(3.0)
    assert not r.clean
    assert [x.n for x in r.records] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_summarize_nothing() -> None:
    r = load_stats.summarize({}, "t", [])
    assert (r.ok, r.failed, r.wall_s, r.throughput_mbps) == (0, 0, 0.0, 0.0)
    assert r.latency_s == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    assert r.by_size == {}


def test_latency_per_size_and_the_summary_text() -> None:
    recs = [_rec(i, 0.0, 0.1 * (i + 1), size=MiB) for i in range(10)]
    recs += [_rec(10 + i, 0.0, 10.0 + i, size=200 * MiB) for i in range(3)]
    recs.append(_rec(20, 0.0, 1.0, size=200 * MiB, status=503, code="OVERLOADED"))
    r = load_stats.summarize({"verify": False}, "t", recs, dropped=2, client_cpu_s=1.5)
    assert r.by_size[str(MiB)]["count"] == 10
    assert r.by_size[str(MiB)]["p50"] == pytest.approx(0.55)
    assert r.by_size[str(200 * MiB)] == {
        "count": 3,
        "p50": 11.0,
        "p95": pytest.approx(11.9),
        "p99": pytest.approx(11.98),
        "max": 12.0,
    }
    text = load_report.summary_text(r)
    assert "14 (13 ok, 1 failed)" in text
    assert "dropped" in text and "503 OVERLOADED: 1" in text
    assert "1 MiB" in text and "200 MiB" in text
    assert "verified" not in text  # not asked for


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (MiB, "1 MiB"),
        (200 * MiB, "200 MiB"),
        (1 << 30, "1 GiB"),
        (64 << 10, "64 KiB"),
        (1536, "1.5 KiB"),
        (1000, "1000 B"),
        (0, "0 B"),
    ],
)
def test_size_label(n: int, text: str) -> None:
    assert load_report._size(n) == text


# --- verification verdicts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "stored", "verdict"),
    [
        (100, SHA, "ok"),
        (100, SHA.upper(), "ok"),
        (None, None, "lost"),
        (99, SHA, "partial"),
        (0, None, "partial"),
        (100, None, "mismatch"),  # nothing stored to compare with
        (100, "", "mismatch"),
        (100, "cd" * 32, "mismatch"),
    ],
)
def test_classify(size: int | None, stored: str | None, verdict: str) -> None:
    assert load_verify.classify(100, SHA, size, stored) == verdict
