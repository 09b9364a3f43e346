"""End to end: the real `s3proxy serve` process, real curl, a real S3 server (SeaweedFS).

These are slower than the moto-backed tests and are marked ``e2e``; CI runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from operator import not_
from pathlib import Path
from typing import Any

import boto3
import pytest

from s3proxy.embedded import EmbeddedStore
from tests import bodies
from tests.bodies import MiB
from tests.polling import eventually_sync
from tests.s3util import BOTO_CONFIG, ProxyProcess, free_port, open_uploads
from tests.seaweed_fixture import processes_mentioning, s3_client_kwargs

pytestmark = pytest.mark.e2e

PREFIXES = ("e2e/", "strict/")


def proxy_env(store: EmbeddedStore) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}
    env.update(AWS_ACCESS_KEY_ID=store.access_key, AWS_SECRET_ACCESS_KEY=store.secret_key)
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return env


@pytest.fixture(scope="module")
def sw(seaweedfs: EmbeddedStore) -> Any:
    return boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(seaweedfs))


def start_proxy(store: EmbeddedStore, tmp: Path, prefix: str, *extra: str) -> ProxyProcess:
    args = [
        "--endpoint-url",
        store.endpoint_url,
        "--bucket",
        store.bucket,
        "--part-size",
        "5MiB",
        "--memory-budget",
        "64MiB",
        "--key-template",
        prefix + "{uuid}/{filename}",
        *extra,
    ]
    return ProxyProcess.start(args, proxy_env(store), tmp / f"{prefix.strip('/')}.log")


@pytest.fixture(scope="module")
def e2e_proxy(
    seaweedfs: EmbeddedStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    proxy = start_proxy(
        seaweedfs, tmp_path_factory.mktemp("e2e"), "e2e/", "--max-file-size", "1100MiB"
    )
    yield proxy
    assert proxy.stop() == 0


@pytest.fixture(scope="module")
def strict_proxy(
    seaweedfs: EmbeddedStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    proxy = start_proxy(
        seaweedfs,
        tmp_path_factory.mktemp("strict"),
        "strict/",
        "--max-file-size",
        "8MiB",
        "--allow-type",
        "application/pdf",
        "--allow-type",
        "text/plain",
    )
    yield proxy
    assert proxy.stop() == 0


def leftovers(sw: Any, bucket: str) -> tuple[list[str], list[str]]:
    uploads = [u["Key"] for u in sw.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    keys = [
        o["Key"]
        for p in PREFIXES
        for o in sw.list_objects_v2(Bucket=bucket, Prefix=p).get("Contents", [])
    ]
    return uploads, keys


@pytest.fixture(autouse=True)
def clean_bucket(sw: Any, seaweedfs: EmbeddedStore) -> Iterator[None]:
    """Each test starts and ends with no object under the test prefixes."""
    yield
    _, keys = leftovers(sw, seaweedfs.bucket)
    for key in keys:
        sw.delete_object(Bucket=seaweedfs.bucket, Key=key)


def assert_nothing_left(sw: Any, bucket: str, within: float = 10.0) -> None:
    eventually_sync(
        lambda: leftovers(sw, bucket),
        until=lambda left: left == ([], []),
        within=within,
        what="nothing left behind on SeaweedFS (uploads, objects)",
    )


def curl(url: str, *forms: str) -> tuple[int, dict[str, Any]]:
    args = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}"]
    for f in forms:
        args += ["-F", f]
    out = subprocess.run(
        [*args, url + "/upload"], capture_output=True, text=True, timeout=600, check=True
    )
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body)


def sha256_of_object(sw: Any, bucket: str, key: str) -> tuple[str, int, dict[str, Any]]:
    obj = sw.get_object(Bucket=bucket, Key=key)
    digest, size = hashlib.sha256(), 0
    for chunk in obj["Body"].iter_chunks(1024 * 1024):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size, obj


def write_file(path: Path, size: int, head: bytes = b"") -> str:
    digest = hashlib.sha256()
    block = bodies.opaque(MiB)  # after ``head``: no chance magic of its own
    with open(path, "wb") as f:
        f.write(head)
        digest.update(head)
        left = size - len(head)
        while left > 0:
            piece = block[: min(left, MiB)]
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


@pytest.mark.parametrize(
    ("size", "name", "head", "ctype"),
    [
        (0, "empty.txt", b"", "text/plain"),
        (20_000, "small.pdf", b"%PDF-1.5\n", "application/pdf"),
        (5 * MiB, "one-part.pdf", b"%PDF-1.5\n", "application/pdf"),
        (17 * MiB + 5, "several.bin", b"", "application/octet-stream"),
    ],
    ids=["empty", "small", "exactly-one-part", "several-parts"],
)
def test_curl_upload_roundtrip(
    e2e_proxy: ProxyProcess,
    sw: Any,
    seaweedfs: EmbeddedStore,
    tmp_path: Path,
    size: int,
    name: str,
    head: bytes,
    ctype: str,
) -> None:
    path = tmp_path / name
    digest = write_file(path, size, head)
    code, out = curl(e2e_proxy.url, "title=Q3 review", f"file=@{path}")
    assert code == 201, out
    [f] = out["files"]
    assert (f["size"], f["sha256"], f["content_type"]) == (size, digest, ctype)
    got, got_size, obj = sha256_of_object(sw, seaweedfs.bucket, f["key"])
    assert (got, got_size) == (digest, size)
    assert obj["ContentType"] == ctype
    assert obj["Metadata"]["title"] == "Q3 review"
    assert obj["ContentDisposition"] == f'attachment; filename="{name}"'
    if size <= 5 * MiB:  # one PutObject: metadata; multipart: a tag
        assert obj["Metadata"]["sha256"] == digest
    else:
        tags = sw.get_object_tagging(Bucket=seaweedfs.bucket, Key=f["key"])["TagSet"]
        assert {"Key": "sha256", "Value": digest} in tags


def test_several_files_in_one_request(
    e2e_proxy: ProxyProcess, sw: Any, seaweedfs: EmbeddedStore, tmp_path: Path
) -> None:
    digests = {}
    forms = []
    for i, size in enumerate((100, 6 * MiB, 11 * MiB)):
        path = tmp_path / f"f{i}.bin"
        digests[path.name] = write_file(path, size)
        forms.append(f"file{i}=@{path}")
    code, out = curl(e2e_proxy.url, *forms)
    assert code == 201, out
    assert len(out["files"]) == 3
    for f in out["files"]:
        got, _, _ = sha256_of_object(sw, seaweedfs.bucket, f["key"])
        assert got == digests[f["filename"]] == f["sha256"]


@pytest.mark.slow
def test_one_gib_curl_upload(e2e_proxy: ProxyProcess, sw: Any, seaweedfs: EmbeddedStore) -> None:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    path = shm / f"s3proxy-e2e-{os.getpid()}.bin"
    try:
        digest = write_file(path, 1024 * MiB)
        t0 = time.monotonic()
        code, out = curl(e2e_proxy.url, f"file=@{path}")
        elapsed = time.monotonic() - t0
    finally:
        path.unlink(missing_ok=True)
    assert code == 201, out
    [f] = out["files"]
    print(f"1 GiB through the proxy into SeaweedFS: {1024 / elapsed:.0f} MiB/s")
    got, size, _ = sha256_of_object(sw, seaweedfs.bucket, f["key"])
    assert (got, size) == (digest, 1024 * MiB) and f["sha256"] == digest


# --- failures leave nothing on SeaweedFS ---------------------------------------------


def test_file_over_limit(
    strict_proxy: ProxyProcess, sw: Any, seaweedfs: EmbeddedStore, tmp_path: Path
) -> None:
    small, big = tmp_path / "ok.pdf", tmp_path / "big.pdf"
    write_file(small, 1000, b"%PDF-1.4\n")
    write_file(big, 12 * MiB, b"%PDF-1.4\n")
    code, out = curl(strict_proxy.url, f"a=@{small}", f"b=@{big}")
    assert code == 413 and out["error"]["code"] == "FILE_TOO_LARGE"
    assert_nothing_left(sw, seaweedfs.bucket)


def test_type_not_allowed(
    strict_proxy: ProxyProcess, sw: Any, seaweedfs: EmbeddedStore, tmp_path: Path
) -> None:
    ok, bad = tmp_path / "ok.pdf", tmp_path / "photo.pdf"
    write_file(ok, 6 * MiB, b"%PDF-1.4\n")
    write_file(
        bad,
        7 * MiB,
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00",
    )
    code, out = curl(strict_proxy.url, f"a=@{ok}", f"b=@{bad};type=application/pdf")
    assert code == 415 and out["error"]["code"] == "TYPE_NOT_ALLOWED", out
    assert_nothing_left(sw, seaweedfs.bucket)


def test_malformed_multipart(e2e_proxy: ProxyProcess, sw: Any, seaweedfs: EmbeddedStore) -> None:
    raw = bodies.body([bodies.file("f", "a.bin", os.urandom(7 * MiB))], close=False)[:-2]
    proc = subprocess.run(
        [
            "curl",
            "-sS",
            "-H",
            f"Content-Type: multipart/form-data; boundary={bodies.BOUNDARY}",
            "--data-binary",
            "@-",
            "-w",
            "\n%{http_code}",
            e2e_proxy.url + "/upload",
        ],
        input=raw,
        capture_output=True,
        timeout=60,
        check=True,
    )
    body, _, code = proc.stdout.decode().rpartition("\n")
    assert int(code) == 400 and json.loads(body)["error"]["code"] == "MALFORMED_MULTIPART"
    assert_nothing_left(sw, seaweedfs.bucket)


def test_client_disconnect_mid_body(
    e2e_proxy: ProxyProcess, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    raw = bodies.body(
        [
            bodies.file("a", "a.pdf", bodies.pdf(3000)),
            bodies.file("b", "b.bin", os.urandom(30 * MiB)),
        ]
    )
    with socket.create_connection(("127.0.0.1", e2e_proxy.port)) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
            b"Content-Type: multipart/form-data; boundary=%s\r\n\r\n"
            % (len(raw), bodies.BOUNDARY.encode())
        )
        sock.sendall(raw[: 16 * MiB])
        eventually_sync(
            lambda: open_uploads(sw, seaweedfs.bucket),
            within=20,
            what="the multipart upload to start",
        )
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )  # RST
    assert_nothing_left(sw, seaweedfs.bucket)


def test_readyz(e2e_proxy: ProxyProcess) -> None:
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", e2e_proxy.url + "/readyz"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.endswith("\n200")


# --- the embedded mode itself --------------------------------------------------------


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}


def test_embedded_mode_start_upload_stop_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    s3_port, port = free_port(), free_port()
    args = ["--data-dir", str(data_dir), "--embedded-s3-port", str(s3_port)]
    t0 = time.monotonic()
    proxy = ProxyProcess.start(args, plain_env(), tmp_path / "first.log", port=port)
    ready = time.monotonic() - t0
    print(f"s3proxy serve (embedded) ready in {ready:.1f} s")
    log = (tmp_path / "first.log").read_text()
    assert f"s3=http://127.0.0.1:{s3_port}" in log and "bucket=uploads" in log
    assert str(data_dir.resolve()) in log and "curl -F file=@" in log
    try:
        src = tmp_path / "report.pdf"
        digest = write_file(src, 7 * MiB, b"%PDF-1.4\n")
        code, out = curl(proxy.url, f"file=@{src}")
        assert code == 201, out
        key = out["files"][0]["key"]
    finally:
        assert proxy.stop() == 0
    eventually_sync(
        lambda: processes_mentioning(str(data_dir)),
        until=not_,
        within=10,
        what="weed gone after the proxy stopped",
    )

    # Fresh ports for the restart: the first ones, free when picked, may have become
    # another test's outgoing connection meanwhile (CI: "cannot listen on ...: Address
    # already in use" once in 4,786). What must survive is the data dir, not the ports.
    s3_port, port = free_port(), free_port()
    args = ["--data-dir", str(data_dir), "--embedded-s3-port", str(s3_port)]
    proxy = ProxyProcess.start(args, plain_env(), tmp_path / "second.log", port=port)
    try:
        creds = json.loads((data_dir / "credentials.json").read_text())
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{s3_port}",
            region_name="us-east-1",
            config=BOTO_CONFIG,
            aws_access_key_id=creds["access_key"],
            aws_secret_access_key=creds["secret_key"],
        )
        got, size, _ = sha256_of_object(client, "uploads", key)
        assert (got, size) == (digest, 7 * MiB)
    finally:
        assert proxy.stop() == 0


def test_embedded_store_killed_with_proxy(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir), "--embedded-s3-port", "0"]
    proxy = ProxyProcess.start(args, plain_env(), tmp_path / "p.log")
    assert processes_mentioning(str(data_dir))
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait()
    eventually_sync(
        lambda: processes_mentioning(str(data_dir)),
        until=not_,
        within=10,
        what="weed gone after its proxy was SIGKILLed",
    )


def test_embedded_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "s3proxy",
                "serve",
                "--port",
                str(free_port()),
                "--data-dir",
                str(tmp_path / "d"),
                "--embedded-s3-port",
                str(taken),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=plain_env(),
        )
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 15
    assert "already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_proxy_on_a_data_dir_in_use_is_one_line_and_touches_nothing(
    tmp_path: Path,
) -> None:
    """Outside test: a second serve on a running proxy's --data-dir rewrote its
    ports.json, s3-identities.json and sockets, then failed after ~1 s with 20 lines
    of weed's log ("leveldb ... resource temporarily unavailable")."""
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir), "--embedded-s3-port", "0"]
    proxy = ProxyProcess.start(args, plain_env(), tmp_path / "first.log")
    try:
        before = {
            name: (data_dir / name).read_bytes() for name in ("ports.json", "s3-identities.json")
        }
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "s3proxy", "serve", "--port", str(free_port()), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=plain_env(),
        )
        took = time.monotonic() - t0
        assert second.returncode == 1, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"s3proxy: error: data dir {data_dir.resolve()} is in use by another s3proxy "
            f"(pid {proxy.proc.pid})"
        ], second.stderr
        for name, content in before.items():
            assert (data_dir / name).read_bytes() == content, name
        assert took < 10, took
        assert urllib.request.urlopen(f"{proxy.url}/readyz", timeout=5).status == 200
    finally:
        assert proxy.stop() == 0
