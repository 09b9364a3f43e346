"""The benchmark harness still runs end to end (``python -m bench --smoke``), so it cannot rot.

It starts moto, s3proxy and the comparison designs as real processes, uploads tiny bodies
with curl and aiohttp clients, and checks every stored object's size and sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DESIGNS = {"s3proxy", "direct", "naive-tempfile", "naive-memory"}


def _tracked_changes() -> str:
    """``git status`` of the tracked files a run could write: the results and the README."""
    where = ["bench/results", "bench/README.md"]
    return subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", *where],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def run_bench(
    argv: list[str], out: Path, needs: tuple[str, ...] = ("curl",), timeout: int = 220
) -> str:
    """Run ``python -m bench ARGV --out OUT`` as a user would (no AWS_ or S3PROXY_
    variables of ours); its stderr, once it exited 0. Skips without the tools it needs."""
    if missing := [tool for tool in needs if shutil.which(tool) is None]:
        pytest.skip(f"{', '.join(missing)} not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *argv, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_bench_smoke(tmp_path: Path) -> None:
    before = _tracked_changes()
    run_bench(["--smoke"], tmp_path)
    result = json.loads((tmp_path / "latest.json").read_text())
    cells = result["cells"]
    assert {c["design"] for c in cells} == DESIGNS, result["meta"]["notes"]
    for c in cells:
        where = f"{c['design']}/{c['client']} {c['size']} x{c['concurrency']}"
        assert c["failures"] == 0, (where, c["errors"])
        assert c["verified"] == c["uploads"] > 0, where
        assert c["stray_objects"] == 0, where
        assert c["open_multipart_uploads"] == 0, where
        assert c["throughput_mbps"] > 0, where
        assert c["peak_rss_bytes"] > 0, where
    clients = {c["client"] for c in cells if c["design"] == "s3proxy"}
    assert clients == {"curl", "aiohttp"}
    assert (tmp_path / "latest.md").exists()
    assert _tracked_changes() == before, "the run changed files git tracks"


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_the_floor_small_files_and_junk_cells_run(tmp_path: Path) -> None:
    """The floor design, a cell of several uploads per client and a junk file, on moto
    (the smoke matrix leaves them out to stay within its time)."""
    argv = [
        *("--backend", "moto", "--designs", "s3proxy,direct,floor"),
        *("--cells", "6MiB:1,6MiB:1:junk,100KiB:2x6", "--clients", "curl,aiohttp"),
        *("--part-size", "5MiB", "--memory-budget", "32MiB"),
    ]
    run_bench(argv, tmp_path)
    result = json.loads((tmp_path / "latest.json").read_text())
    cells_seen = {
        (c["design"], c["client"], c["size"], c["body"], c["uploads"]) for c in result["cells"]
    }
    for design, clients in (
        ("s3proxy", ("curl", "aiohttp")),
        ("floor", ("curl", "aiohttp")),
        ("direct", ("builtin",)),
    ):
        for client in clients:
            assert (design, client, 6 << 20, "junk", 1) in cells_seen
            assert (design, client, 100 << 10, "random", 6) in cells_seen
    for c in result["cells"]:
        assert c["failures"] == 0 and c["verified"] == c["uploads"], c
        assert c["design"] == "floor" or c["cpu_vs_floor"] is not None, c
    assert "CPU/floor" in (tmp_path / "latest.md").read_text()


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_the_embedded_store_gets_its_space_back_after_every_cell(tmp_path: Path) -> None:
    """On the embedded SeaweedFS the bytes a cell deleted are reclaimed before the next
    cell (weed keeps them until its own sweep: a run of ~60 GiB filled the store)."""
    argv = [
        *("--backend", "seaweedfs", "--designs", "s3proxy,direct", "--cells", "6MiB:1,6MiB:2"),
        *("--part-size", "5MiB", "--memory-budget", "32MiB"),
    ]
    stderr = run_bench(argv, tmp_path)
    cells = json.loads((tmp_path / "latest.json").read_text())["cells"]
    assert len(cells) == 4 and all(c["verified"] == c["uploads"] for c in cells), cells
    assert stderr.count("store space reclaimed in") == 4, stderr[-3000:]
    assert "reclaiming the store's deleted space failed" not in stderr


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_bench_tus_smoke(tmp_path: Path) -> None:
    """The resumable designs: s3proxy over tus and @tus/server + @tus/s3-store, driven by
    tus-js-client in one PATCH and in 5 MiB PATCHes, beside s3proxy's /upload with curl."""
    argv = ["--matrix", "tus-smoke", "--concurrency", "1"]
    run_bench(argv, tmp_path, needs=("node", "npm", "curl"), timeout=280)
    result = json.loads((tmp_path / "latest.json").read_text())
    cells = {(c["design"], c["client"]): c for c in result["cells"]}
    assert set(cells) == {
        ("s3proxy", "curl"),
        ("s3proxy", "tus"),
        ("s3proxy", "tus:5MiB"),
        ("tus-node", "tus"),
        ("tus-node", "tus:5MiB"),
    }, result["meta"]["notes"]
    for (design, client), c in cells.items():
        where = f"{design}/{client}"
        assert c["failures"] == 0, (where, c["errors"])
        assert c["verified"] == c["uploads"] == 1, where  # size and sha256 read back
        assert c["open_multipart_uploads"] == 0, where
        assert c["throughput_mbps"] > 0, where
        if design == "s3proxy":
            # nothing left beside the object, nothing written to disk
            assert c["stray_objects"] == 0, where
            assert c["disk_write_bytes"] == c["peak_tmp_bytes"] == 0, where
        else:
            # @tus/s3-store keeps a .info object per upload, and spools parts to os.tmpdir()
            assert c["stray_objects"] == 1, where
            assert c["disk_write_bytes"] + c["peak_tmp_bytes"] > 0, where
    assert {r["other"] for r in result["ratios"]} == {"s3proxy-curl", "tus-node"}
