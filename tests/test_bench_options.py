"""Where ``python -m bench`` writes: never into the committed bench/results/ unless asked."""

from __future__ import annotations

import argparse
import base64
import subprocess
from pathlib import Path

import pytest

from bench import body, clients, designs
from bench.__main__ import options, parse_cell
from bench.backends import Backend
from bench.options import CellSpec

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@pytest.mark.parametrize(
    "argv",
    [[], ["--smoke"], ["--quick"], ["--matrix", "readme"], ["--matrix", "full", "--reps", "2"]],
)
def test_a_default_run_writes_outside_the_committed_results(argv: list[str]) -> None:
    out = options(argv)[0].out
    assert not out.resolve().is_relative_to(RESULTS)
    # ignored by git, so a run leaves `git status` as it was
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "-q", str(out / "latest.json")]
    )
    assert ignored.returncode == 0, f"{out} is not ignored by git"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--matrix", "readme", "--update-readme"], RESULTS),
        (["--update-readme", "--out", "/tmp/x"], Path("/tmp/x")),
        (["--smoke", "--out", "bench/results/issue-x"], Path("bench/results/issue-x")),
    ],
)
def test_committed_results_are_written_only_when_asked(argv: list[str], expected: Path) -> None:
    assert options(argv)[0].out == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256MiB:4", CellSpec(256 << 20, 4)),
        ("100KiB:16x1000", CellSpec(100 << 10, 16, 1000)),
        ("1GiB:1:junk", CellSpec(1 << 30, 1, 0, "junk")),
        ("1MiB:2x10:junk", CellSpec(1 << 20, 2, 10, "junk")),
    ],
)
def test_cells_are_given_as_specs(text: str, expected: CellSpec) -> None:
    assert parse_cell(text) == expected
    assert options(["--cells", text])[0].specs == [expected]


@pytest.mark.parametrize("text", ["1GiB", "1GiB:0", "1GiB:x", "1GiB:1:zeros", "1GiB:2x-1"])
def test_a_bad_cell_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_cell(text)


def test_small_files_is_a_thousand_uploads_of_100_kib_sixteen_at_a_time() -> None:
    [spec] = options(["--small-files"])[0].specs
    assert (spec.size, spec.concurrency, spec.uploads) == (100 * 1024, 16, 1000)
    specs = options(["--cells", "1GiB:1", "--small-files"])[0].specs
    assert [s.size for s in specs] == [1 << 30, 100 * 1024]


def test_the_readme_matrix_ends_with_the_junk_and_small_file_cells() -> None:
    specs = options(["--matrix", "readme"])[0].specs
    assert specs[:2] == [CellSpec(64 << 20, 1), CellSpec(64 << 20, 4)]
    assert len(specs) == 11
    assert specs[-2:] == [CellSpec(256 << 20, 1, 0, "junk"), CellSpec(100 << 10, 16, 1000)]
    # given cells or a grid of its own replace the whole matrix, extras too
    assert options(["--matrix", "readme", "--cells", "1GiB:1"])[0].specs == [CellSpec(1 << 30, 1)]
    assert options(["--matrix", "readme", "--sizes", "1MiB"])[0].specs == []


def test_the_floor_runs_in_every_named_matrix_but_the_smoke_one() -> None:
    assert "floor" not in options(["--smoke"])[0].designs  # CI's: kept within its time
    for argv in ([], ["--quick"], ["--matrix", "readme"]):
        assert "floor" in options(argv)[0].designs


def test_an_a_b_of_s3proxy_flags_runs_s3proxy_twice() -> None:
    opts = options(
        ["--s3proxy-args", "--event-loop asyncio", "--s3proxy-b-args", "--event-loop uvloop"]
    )[0]
    b = Backend("moto", "http://127.0.0.1:1", "b", "k", "s", None, True, _never)
    a_argv = designs.argv("s3proxy", 1, b, opts, {})
    b_argv = designs.argv(designs.S3PROXY_B, 1, b, opts, {})
    assert a_argv[-2:] == ["--event-loop", "asyncio"]
    assert b_argv[-2:] == ["--event-loop", "uvloop"]
    assert a_argv[:-2] == b_argv[:-2]


async def _never() -> None:
    raise AssertionError


@pytest.mark.parametrize(
    ("text", "kind", "chunk"),
    [
        ("curl", "curl", None),
        (" aiohttp ", "aiohttp", None),
        ("tus", "tus", None),
        ("tus:50MiB", "tus:50MiB", 50 << 20),
        ("tus:52428800", "tus:50MiB", 50 << 20),
        ("tus:100KiB", "tus:102400", 100 << 10),
        ("tus:1000", "tus:1000", 1000),
    ],
)
def test_client_kinds_parse_and_normalize(text: str, kind: str, chunk: int | None) -> None:
    assert clients.parse_client(text) == kind
    assert clients.tus_chunk(kind) == chunk
    assert designs.protocol(kind) == ("tus" if kind.startswith("tus") else "form")


@pytest.mark.parametrize("text", ["tus:0", "tus:abc", "tus:", "curl:5MiB", "wget", "TUS"])
def test_bad_client_kinds_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        clients.parse_client(text)
    with pytest.raises(SystemExit):
        options(["--clients", f"curl,{text}"])


def test_the_tus_matrix_is_issue_13s() -> None:
    opts = options(["--matrix", "tus"])[0]
    assert opts.cells == [(1 << 30, 1), (256 << 20, 16)]
    assert opts.designs == ["s3proxy", "tus-node"]
    assert opts.clients == ["curl", "tus", "tus:50MiB"]
    # duplicates given twice, in two spellings, count once
    assert options(["--matrix", "tus", "--clients", "tus:50MiB,tus:52428800"])[0].clients == [
        "tus:50MiB"
    ]


def test_the_form_matrices_leave_tus_node_out() -> None:
    for argv in ([], ["--quick"], ["--matrix", "readme"]):
        assert "tus-node" not in options(argv)[0].designs


@pytest.mark.parametrize(
    ("names", "kinds", "expected", "skipped"),
    [
        (
            ["s3proxy", "tus-node"],
            ["curl", "tus", "tus:50MiB"],
            [
                ("s3proxy", "curl"),
                ("s3proxy", "tus"),
                ("s3proxy", "tus:50MiB"),
                ("tus-node", "tus"),
                ("tus-node", "tus:50MiB"),
            ],
            [],
        ),
        (
            ["direct", "multer-s3", "tus-node"],
            ["curl"],
            [("direct", "builtin"), ("multer-s3", "curl")],
            ["tus-node"],
        ),
        (["naive-memory"], ["tus"], [], ["naive-memory"]),
    ],
)
def test_designs_pair_with_the_clients_that_speak_their_protocol(
    names: list[str], kinds: list[str], expected: list[tuple[str, str]], skipped: list[str]
) -> None:
    got, notes = designs.pairs(names, kinds)
    assert got == expected
    assert [n.split()[0] for n in notes] == skipped


@pytest.mark.parametrize(
    ("names", "kinds", "expected"),
    [
        (["s3proxy", "direct"], ["curl"], []),
        (["s3proxy"], ["curl", "tus"], ["tus"]),
        (["multer-s3", "tus-node"], ["curl"], ["multer-s3", "tus"]),
        (["tus-node"], ["tus", "tus:5MiB"], ["tus"]),
    ],
)
def test_only_the_node_packages_a_run_uses_are_installed(
    names: list[str], kinds: list[str], expected: list[str]
) -> None:
    assert designs.node_packages(names, kinds) == expected


def test_a_tus_uploads_key_comes_from_the_servers_header_or_the_designs_rule() -> None:
    url = "http://127.0.0.1:1/tus/0f3a9c"
    assert clients.tus_key("s3proxy", url, {"S3Proxy-Key": "uploads/a/b.bin"}) == "uploads/a/b.bin"
    assert clients.tus_key("tus-node", url, {}) == "0f3a9c"  # @tus/s3-store: the upload id
    assert clients.tus_key("s3proxy", url, {}) is None  # no guessing: reported as a failure
    # s3proxy's upload URL: base64url JSON naming the key, "." and its signature
    token = base64.urlsafe_b64encode(b'{"id":"x","key":"up/\xc3\xa9t\xc3\xa9.bin"}')
    signed = f"http://127.0.0.1:1/tus/{token.decode().rstrip('=')}.c2lnbmF0dXJl"
    assert clients.tus_key("s3proxy", signed, {}) == "up/été.bin"
    assert clients.tus_key("s3proxy", signed + "x.y", {}) is None  # not one token
    assert clients.tus_key("s3proxy", "http://127.0.0.1:1/tus/!!.x", {}) is None
    quoted = {"S3Proxy-Key": "up/%C3%A9t%C3%A9.bin"}
    assert clients.tus_key("s3proxy", signed, quoted) == "up/été.bin"
    reply = {
        "uploads": [
            {"ok": True, "latency": 1.5, "url": url, "headers": {}},
            {"ok": False, "latency": 0.2, "url": None, "error": "Error: tus: 413"},
        ]
    }
    ok, failed = clients.tus_results("tus-node", 7, reply)
    assert (ok.ok, ok.size, ok.keys, ok.latency) == (True, 7, ["0f3a9c"], 1.5)
    assert (failed.ok, failed.size, failed.error) == (False, 0, "tus: Error: tus: 413")
    (missing,) = clients.tus_results("s3proxy", 7, {"uploads": [reply["uploads"][0]]})
    assert not missing.ok and "no key" in missing.error


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 5])
def test_the_offsets_given_to_the_node_client_rebuild_the_body(size: int) -> None:
    pool = body._pool(1)
    offsets = body.offsets(1, size)
    assert len(offsets) == -(-size // body.BLOCK)
    rebuilt = b"".join(
        pool[off : off + min(body.BLOCK, size - i * body.BLOCK)] for i, off in enumerate(offsets)
    )
    assert rebuilt == b"".join(body.chunks(1, size))


def test_a_before_and_after_runs_s3proxy_b_from_another_revision() -> None:
    opts = options(["--s3proxy-b-rev", "0000bb0", "--s3proxy-args", "--checksum off"])[0]
    assert opts.s3proxy_b_rev == "0000bb0" and opts.s3proxy_b_args is None
    b = Backend("moto", "http://127.0.0.1:1", "b", "k", "s", None, True, _never)
    # the same flags (--s3proxy-args holds for both unless --s3proxy-b-args is given)
    a_argv = designs.argv("s3proxy", 1, b, opts, {})
    assert a_argv[-2:] == ["--checksum", "off"]
    assert designs.argv(designs.S3PROXY_B, 1, b, opts, {}) == a_argv
