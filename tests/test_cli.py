"""The CLI as an operator meets it: one-line errors, true exit codes, honest counts, help.

Exit codes (README, "Exit codes"): 0 done; 1 a runtime failure (the store unreachable, a
port taken, some aborts failed); 2 a usage or settings error (bad flag, missing or short
secret, no credentials). Every test runs ``python -m s3proxy`` as a separate process and
checks that stderr is one line with no traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3proxy import presign_record
from s3proxy.presign_claim import PREFIX as PRESIGN_PREFIX
from tests.faults import Fault, FaultyS3
from tests.s3util import (
    MotoServer,
    all_keys,
    fake_aws_env,
    free_port,
    open_uploads,
    open_uploads_async,
)

SECRET = "s" * 32


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or fake_aws_env(),
        cwd=cwd,
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The error line, after checking it is the only line of stderr and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("s3proxy: error: "), proc.stderr
    return lines[0]


def no_credentials_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in fake_aws_env().items() if not k.startswith("AWS_")}
    env.update(
        HOME=str(home),
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",  # no 169.254.169.254 probe
    )
    return env


# --- cleanup -----------------------------------------------------------------------


def closed_port() -> int:
    return free_port()  # bound and closed again: nothing listens there


def test_cleanup_unreachable_store_is_one_line_exit_1() -> None:
    proc = cli(
        "cleanup",
        "--endpoint-url",
        f"http://127.0.0.1:{closed_port()}",
        "--bucket",
        "b",
        "--s3-max-attempts",
        "1",
    )
    line = one_line_error(proc)
    assert proc.returncode == 1
    assert "cannot reach S3" in line
    assert proc.stdout == ""


def test_cleanup_without_credentials_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = cli(
        "cleanup",
        "--endpoint-url",
        f"http://127.0.0.1:{closed_port()}",
        "--bucket",
        "b",
        "--s3-max-attempts",
        "1",
        env=no_credentials_env(tmp_path),
    )
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "credentials" in line and "AWS_ACCESS_KEY_ID" in line


def test_cleanup_embedded_without_its_keys_names_the_data_dir(tmp_path: Path) -> None:
    # No --endpoint-url: the embedded store's keys are read from the data dir, which is
    # relative to where serve ran. From elsewhere this must say so, not ask AWS.
    proc = cli("cleanup", env=no_credentials_env(tmp_path), cwd=tmp_path)
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert str(tmp_path / "s3proxy-data" / "credentials.json") in line
    assert "--data-dir" in line


def test_cleanup_embedded_store_not_running_is_exit_1(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "credentials.json").write_text('{"access_key": "a", "secret_key": "b"}')
    port = closed_port()
    proc = cli(
        "cleanup",
        "--data-dir",
        str(data),
        "--embedded-s3-port",
        str(port),
        "--s3-max-attempts",
        "1",
        env=no_credentials_env(tmp_path),
    )
    line = one_line_error(proc)
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in line and "running" in line


@pytest.fixture
def three_orphans(s3: Any, bucket: str) -> Iterator[None]:
    for key in ("uploads/a/1.bin", "uploads/b/2.bin", "uploads/c/3.bin"):
        s3.create_multipart_upload(Bucket=bucket, Key=key)
    yield
    for up in open_uploads(s3, bucket):
        s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])


async def test_cleanup_counts_only_the_aborts_that_succeeded(
    moto: MotoServer, bucket: str, three_orphans: None, s3: Any
) -> None:
    # The second abort is refused (403 AccessDenied, not retried): 3 found, 2 aborted,
    # 1 failed, exit 1.
    def rule(op: str, n: int) -> Fault | None:
        if op == "AbortMultipartUpload" and n == 2:
            return Fault(status=403, code="AccessDenied")
        return None

    async with FaultyS3(moto.endpoint_url, rule) as faulty:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "s3proxy",
            "cleanup",
            "--endpoint-url",
            faulty.endpoint_url,
            "--bucket",
            bucket,
            "--older-than",
            "1h",
            "--execute",
            "--log-level",
            "error",
            env=fake_aws_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out_b, err_b = await asyncio.wait_for(proc.communicate(), 60)
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 1, err
    assert "3 orphaned uploads found; aborted 2, failed 1" in out, out
    assert "Traceback" not in err
    failed = [line for line in err.splitlines() if "failed" in line]
    assert len(failed) == 1 and "AccessDenied" in failed[0], err
    assert len(await open_uploads_async(s3, bucket)) == 1


def test_cleanup_help_lists_only_the_flags_it_uses() -> None:
    out = cli("cleanup", "--help").stdout
    for flag in (
        "--older-than",
        "--prefix",
        "--execute",
        "--endpoint-url",
        "--region",
        "--bucket",
        "--key-template",
        "--data-dir",
        "--embedded-s3-port",
        "--s3-max-attempts",
        "--log-level",
        "--log-format",
        "--part-size",  # the limits the activity rule derives its threshold from
    ):
        assert flag in out, flag
    for flag in ("--memory-budget", "--webhook-url", "--api-key", "--workers"):
        assert flag not in out, flag
    # cleanup never starts a store: unset, it talks to the one serve runs (outside test)
    flat = " ".join(out.split())
    assert "start the embedded" not in flat
    assert "unset: the embedded store `s3proxy serve` runs with the same --data-dir" in flat


def test_cleanup_ignores_serve_only_environment(moto: MotoServer, bucket: str) -> None:
    # A serve-only setting in the environment (here one serve would refuse) is not
    # cleanup's business.
    env = {**fake_aws_env(), "S3PROXY_HOST": "0.0.0.0", "S3PROXY_TOKEN_SECRET": "short"}
    proc = cli("cleanup", "--endpoint-url", moto.endpoint_url, "--bucket", bucket, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "0 orphaned uploads found" in proc.stdout


def test_cleanup_sweeps_serves_scope_from_its_environment(
    moto: MotoServer, bucket: str, s3: Any
) -> None:
    """Regression (config probe): cleanup ignored S3PROXY_CLEANUP_OLDER_THAN and
    S3PROXY_CLEANUP_PREFIX, so with serve's env file it swept another scope than serve
    (by activity, under the template's prefix: the token prefixes were missed)."""
    for key in ("tok/1/a.bin", "uploads/2/b.bin"):
        s3.create_multipart_upload(Bucket=bucket, Key=key)  # moto dates them 2010
    env = {
        **fake_aws_env(),
        "S3PROXY_CLEANUP_PREFIX": "tok/",
        "S3PROXY_CLEANUP_OLDER_THAN": "1m",
    }
    try:
        proc = cli("cleanup", "--endpoint-url", moto.endpoint_url, "--bucket", bucket, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "over 60s old" in proc.stdout and "1 orphaned uploads found" in proc.stdout
        assert "tok/1/a.bin" in proc.stdout and "uploads/2/b.bin" not in proc.stdout
        flags = ("--prefix", "uploads/", "--older-than", "2m")  # its own flags still win
        proc = cli(
            "cleanup", "--endpoint-url", moto.endpoint_url, "--bucket", bucket, *flags, env=env
        )
        assert "over 120s old" in proc.stdout and "uploads/2/b.bin" in proc.stdout
    finally:
        for up in open_uploads(s3, bucket):
            s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])


def test_cleanup_lists_and_removes_lapsed_presign_claims(
    moto: MotoServer, bucket: str, s3: Any
) -> None:
    """reprobe9a F7: the CLI neither listed nor deleted a presigned complete's claim that
    had lapsed 5 minutes before (serve's sweep did). Now a dry run counts it and
    --execute removes it; a live claim stays."""
    lapsed, live = PRESIGN_PREFIX + "lapsed", PRESIGN_PREFIX + "live"
    for key, until in ((lapsed, time.time() - 300), (live, time.time() + 300)):
        body = json.dumps({"owner": "o", "until": until}).encode()
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    flags = ("--endpoint-url", moto.endpoint_url, "--bucket", bucket)
    try:
        proc = cli("cleanup", *flags, "--cleanup-clock-skew", "1s")
        assert proc.returncode == 0, proc.stderr
        assert "presigned-complete claims: 1 lapsed, would remove 1" in proc.stdout
        assert {lapsed, live} <= set(all_keys(s3, bucket))
        proc = cli("cleanup", *flags, "--cleanup-clock-skew", "1s", "--execute")
        assert proc.returncode == 0, proc.stderr
        assert "presigned-complete claims: 1 lapsed, removed 1" in proc.stdout
        keys = all_keys(s3, bucket)
        assert live in keys and lapsed not in keys
    finally:
        for key in (lapsed, live):
            s3.delete_object(Bucket=bucket, Key=key)


def test_cleanup_marks_and_removes_presigned_upload_records(
    moto: MotoServer, bucket: str, s3: Any
) -> None:
    """reprobe11a: a presigned upload's record on a shared key (``presign_record``) is
    swept as serve's sweep does: marked once its upload is gone, removed after the
    retention. A dry run lists what it would do; --execute does it."""
    fresh = presign_record.Record("plain/a", "gone-a", "n", time.time())
    old = presign_record.Record("plain/b", "gone-b", "n", 0.0, gone_since=1.0)
    for record in (fresh, old):
        key = presign_record.record_key(record.key, record.upload_id)
        s3.put_object(Bucket=bucket, Key=key, Body=presign_record.encode(record))
    flags = ("--endpoint-url", moto.endpoint_url, "--bucket", bucket)
    proc = cli("cleanup", *flags)
    assert proc.returncode == 0, proc.stderr
    assert "presigned-upload records: 0 kept; would mark 1 gone, would remove 1" in proc.stdout
    assert len(all_keys(s3, bucket)) == 2
    proc = cli("cleanup", *flags, "--execute")
    assert proc.returncode == 0, proc.stderr
    assert "presigned-upload records: 0 kept; marked 1 gone, removed 1" in proc.stdout
    [left] = all_keys(s3, bucket)
    marked = presign_record.parse(s3.get_object(Bucket=bucket, Key=left)["Body"].read())
    assert marked is not None and marked.upload_id == "gone-a" and marked.gone_since
    s3.delete_object(Bucket=bucket, Key=left)


def test_cleanup_keeps_records_for_serves_presign_expiry(
    moto: MotoServer, bucket: str, s3: Any
) -> None:
    """reprobe12b F3: cleanup took no --presign-expiry (flag refused, S3PROXY_PRESIGN_EXPIRY
    ignored), so it removed a record marked gone 50 minutes before, with 15 minutes' URLs'
    retention, while serve (7d) kept it for a retried complete: that complete, well within
    its URLs' life, then got 404 for its stored object. Now both are read, as serve's."""
    gone = presign_record.Record("plain/a", "gone-a", "n", 0.0, gone_since=time.time() - 3000)
    key = presign_record.record_key(gone.key, gone.upload_id)
    s3.put_object(Bucket=bucket, Key=key, Body=presign_record.encode(gone))
    flags = ("--endpoint-url", moto.endpoint_url, "--bucket", bucket)
    try:
        env = {**fake_aws_env(), "S3PROXY_PRESIGN_EXPIRY": "7d"}
        for extra, environ in (((), env), (("--presign-expiry", "7d"), None)):
            proc = cli("cleanup", *flags, *extra, "--execute", env=environ)
            assert proc.returncode == 0, proc.stderr
            assert "presigned-upload records" not in proc.stdout, proc.stdout  # 1 kept
            assert key in all_keys(s3, bucket)
        proc = cli("cleanup", *flags)  # serve's default, 15 minutes: past it
        assert "would remove 1" in proc.stdout, proc.stdout
    finally:
        s3.delete_object(Bucket=bucket, Key=key)


def test_cleanup_reads_every_setting_its_sweeps_retention_depends_on() -> None:
    """What ``cleanup`` does not read is serve's default there, not serve's value: every
    setting the record retention and the claim's lease read must be one it reads."""
    import dataclasses

    from s3proxy import presign_claim
    from s3proxy.cli import CLEANUP_SETTINGS
    from s3proxy.settings import Settings

    base = Settings()
    for f in dataclasses.fields(Settings):
        value = getattr(base, f.name)
        if f.name in CLEANUP_SETTINGS or isinstance(value, bool):
            continue
        if not isinstance(value, int | float):
            continue
        other = dataclasses.replace(base)
        object.__setattr__(other, f.name, value * 2 + 7)
        assert presign_record.retention(other) == presign_record.retention(base), f.name
        assert presign_claim.lease(other) == presign_claim.lease(base), f.name


def test_cleanup_finds_the_embedded_store_on_the_port_it_recorded(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """Regression (config probe): after S3PROXY_EMBEDDED_S3_PORT=... make serve, a plain
    `s3proxy cleanup` tried 8333, though the store recorded its port in ports.json."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "credentials.json").write_text('{"access_key": "testing", "secret_key": "testing"}')
    port = int(moto.endpoint_url.rsplit(":", 1)[1])
    (data / "ports.json").write_text(f'{{"s3.port": {port}}}')
    args = ("cleanup", "--data-dir", str(data), "--bucket", bucket, "--s3-max-attempts", "1")
    proc = cli(*args, env=no_credentials_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "0 orphaned uploads found" in proc.stdout
    closed = closed_port()  # a port given is the one tried
    proc = cli(*args, "--embedded-s3-port", str(closed), env=no_credentials_env(tmp_path))
    assert proc.returncode == 1 and f"127.0.0.1:{closed}" in one_line_error(proc)


@pytest.mark.parametrize("value", ["70000", "-5", "true", "99999999999999999999999", '"x"'])
def test_cleanup_with_an_odd_recorded_port_says_so(tmp_path: Path, value: str) -> None:
    """Regression (reprobe7 F8): ports.json {"s3.port": 70000} (or -5, true, a huge number)
    gave "S3 ListObjectsV2 failed: EndpointResolutionError", true was read as port 1. With
    the recorded port asked for (S3PROXY_EMBEDDED_S3_PORT=0, as serve was told), an unusable
    one is now a one-line error naming the file, after a warning naming the entry."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "credentials.json").write_text('{"access_key": "testing", "secret_key": "testing"}')
    (data / "ports.json").write_text(f'{{"s3.port": {value}}}')
    env = {**no_credentials_env(tmp_path), "S3PROXY_EMBEDDED_S3_PORT": "0"}
    proc = cli("cleanup", "--data-dir", str(data), "--bucket", "bkt", env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "EndpointResolution" not in proc.stderr
    warning, error = proc.stderr.strip().splitlines()
    assert "embedded.port_ignored" in warning and "name=s3.port" in warning
    assert error == (
        f"s3proxy: error: embedded S3 store: no S3 port recorded in {data / 'ports.json'}; "
        "give the port the store listens on (--embedded-s3-port)"
    )


def test_an_unknown_variable_is_warned_of(moto: MotoServer, bucket: str) -> None:
    """A typo (S3PROXY_MEMORY_BUGDET) is a WARNING at start naming it, not an error."""
    env = {**fake_aws_env(), "S3PROXY_MEMORY_BUGDET": "1GiB"}
    proc = cli("cleanup", "--endpoint-url", moto.endpoint_url, "--bucket", bucket, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "settings.unknown_variables names=S3PROXY_MEMORY_BUGDET" in proc.stderr
    assert "WARNING" in proc.stderr


# --- help --------------------------------------------------------------------------


def test_help_metavars_say_what_a_value_is() -> None:
    out = " ".join(cli("serve", "--help").stdout.split())
    for expected in (
        "--insecure-no-auth BOOL",
        "--cleanup-older-than DURATION",
        "--page BOOL",
        "--max-file-size SIZE",
        "--client-timeout DURATION",
        "--endpoint-url URL",
        "--webhook-url URL",
        "--data-dir PATH",
        "--token-secret-file PATH",
        "--port PORT",
        "--max-files N",
    ):
        assert expected in out, expected
    for wrong in (" AUTH", " THAN", " PAGE ", " TIMEOUT", " FILE "):
        assert wrong not in out, wrong


# --- token and secrets ---------------------------------------------------------------


def test_token_with_a_short_secret_is_refused() -> None:
    proc = cli("token", "--prefix", "p/", env={**fake_aws_env(), "S3PROXY_TOKEN_SECRET": "abc"})
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "S3PROXY_TOKEN_SECRET" in line and "32 bytes" in line
    assert "abc" not in line  # never echo a secret


def test_serve_with_a_short_secret_is_refused(tmp_path: Path) -> None:
    env = {**fake_aws_env(), "S3PROXY_TOKEN_SECRET": f"{SECRET},abc"}
    proc = cli("serve", "--endpoint-url", "http://127.0.0.1:9", "--bucket", "b", env=env)
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "S3PROXY_TOKEN_SECRET" in line and "32 bytes" in line

    secrets = tmp_path / "secrets"
    secrets.write_text(f"# rotation\n{SECRET}\nshort\n")
    proc = cli(
        "serve",
        "--endpoint-url",
        "http://127.0.0.1:9",
        "--bucket",
        "b",
        "--token-secret-file",
        str(secrets),
    )
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "--token-secret-file" in line and f"{secrets} line 3" in line


def test_token_secret_file_missing_or_unreadable_is_one_line(tmp_path: Path) -> None:
    proc = cli("token", "--prefix", "p/", "--token-secret-file", str(tmp_path / "nope"))
    line = one_line_error(proc)
    assert proc.returncode == 2 and "--token-secret-file" in line and "nope" in line
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" * 20)
    proc = cli("token", "--prefix", "p/", "--token-secret-file", str(binary))
    line = one_line_error(proc)
    assert proc.returncode == 2 and "--token-secret-file" in line


@pytest.mark.parametrize("joined", [" ", "\n", ", "])
def test_token_reads_the_secrets_as_serve_does(joined: str) -> None:
    """Regression (config probe): with S3PROXY_TOKEN_SECRET="A B" serve split on spaces
    too (two secrets) and token on commas only (one secret "A B"): every token it
    issued was 401 "bad signature" at the proxy."""
    from s3proxy.settings import Settings
    from s3proxy.tokens import verify

    env = {**fake_aws_env(), "S3PROXY_TOKEN_SECRET": "a" * 32 + joined + "b" * 32}
    proc = cli("token", "--prefix", "p/", env=env)
    assert proc.returncode == 0, proc.stderr
    served = Settings.load({}, env).token_secrets()
    assert served == ("a" * 32, "b" * 32)
    verify(proc.stdout.strip(), [s.encode() for s in served])
    verify(proc.stdout.strip(), [b"a" * 32])  # the first signs


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("a" * 32 + "  # current", "a comment"),  # serve refuses it; token signed with it
        (" , ", "holds no key"),
    ],
)
def test_token_refuses_what_serve_refuses(value: str, named: str) -> None:
    proc = cli("token", "--prefix", "p/", env={**fake_aws_env(), "S3PROXY_TOKEN_SECRET": value})
    assert proc.returncode == 2 and named in one_line_error(proc)


def test_token_and_serve_read_a_secret_file_as_the_environment(tmp_path: Path) -> None:
    """Regression (reprobe7 F7): a secret file saved with a BOM signed with "<BOM>aaa...",
    and "aaa...  # first" with the comment: serve given the same secret in
    S3PROXY_TOKEN_SECRET refused every such token (401). Now the BOM is dropped and the
    comment refused by both commands, naming the file and line."""
    from s3proxy.settings import Settings
    from s3proxy.tokens import verify

    secrets = tmp_path / "secrets"
    secrets.write_bytes(b"\xef\xbb\xbf" + b"a" * 32 + b"\r\n" + b"b" * 32 + b"\r\n")
    proc = cli("token", "--prefix", "p/", "--token-secret-file", str(secrets))
    assert proc.returncode == 0, proc.stderr
    served = Settings.load({"token_secret_file": str(secrets)}, {}).token_secrets()
    assert served == ("a" * 32, "b" * 32)
    verify(proc.stdout.strip(), [b"a" * 32])  # as serve with S3PROXY_TOKEN_SECRET=aaa...
    secrets.write_text("a" * 32 + "  # first\n")
    proc = cli("token", "--prefix", "p/", "--token-secret-file", str(secrets))
    line = one_line_error(proc)
    assert proc.returncode == 2 and f"{secrets} line 1: a comment" in line
    proc = cli(
        "serve",
        "--endpoint-url",
        "http://127.0.0.1:9",
        "--bucket",
        "b",
        "--token-secret-file",
        str(secrets),
    )
    assert proc.returncode == 2 and f"{secrets} line 1: a comment" in one_line_error(proc)


def test_serve_with_an_unreadable_key_file_is_a_settings_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_bytes(b"\xff\xfe\n")
    proc = cli(
        "serve",
        "--endpoint-url",
        "http://127.0.0.1:9",
        "--bucket",
        "b",
        "--api-key-file",
        str(keys),
    )
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "--api-key-file" in line and "cannot listen" not in line


# --- serve startup -------------------------------------------------------------------


def test_port_taken_is_one_line_and_never_ready() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli(
            "serve", "--port", str(port), "--endpoint-url", "http://127.0.0.1:9", "--bucket", "b"
        )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("s3proxy: error")]
    assert errors == [f"s3proxy: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert "Traceback" not in proc.stderr
    assert "proxy.ready" not in proc.stderr and "try: curl" not in proc.stderr


def test_embedded_port_taken_names_the_flag(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli(
            "serve",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "data"),
            "--embedded-s3-port",
            str(port),
        )
    line = one_line_error(proc)
    assert proc.returncode == 1
    assert f"port {port}" in line and "--embedded-s3-port" in line
    assert "s3_port" not in line


def test_bad_embedded_credentials_file_is_not_a_listen_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "credentials.json").mkdir(parents=True)  # a directory where the keys should be
    proc = cli(
        "serve",
        "--port",
        str(free_port()),
        "--data-dir",
        str(data),
        "--embedded-s3-port",
        str(free_port()),
    )
    line = one_line_error(proc)
    assert proc.returncode == 1
    assert "cannot listen" not in line
    assert str(data / "credentials.json") in line


@pytest.mark.parametrize(
    ("env", "hint"),
    [
        ({}, "try: curl -F file=@"),
        ({"S3PROXY_API_KEY": "k" * 32}, 'try: curl -H "Authorization: Bearer $KEY" -F file=@'),
    ],
)
def test_ready_hint_matches_auth(tmp_path: Path, env: dict[str, str], hint: str) -> None:
    from tests.s3util import ProxyProcess

    log = tmp_path / "serve.log"
    proxy = ProxyProcess.start(
        ["--endpoint-url", "http://127.0.0.1:9", "--bucket", "b"], {**fake_aws_env(), **env}, log
    )
    try:
        text = log.read_text()
    finally:
        assert proxy.stop() == 0
    assert "proxy.ready" in text and hint in text, text


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["serve", "--sse", "foo"], "--sse"),
        (["serve", "--part-size", "-5MiB"], "--part-size"),
        (["serve", "--port"], "--port"),
        (["serve", "--bogus"], "--bogus"),
        (["cleanup", "--older-than"], "--older-than"),
        (["cleanup", "--older-than", "0"], "--older-than must be at least 1m"),
        ([], "command"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], named: str) -> None:
    """argparse printed the whole usage (43 lines for serve) and 's3proxy serve: error:';
    README's exit table says one line, 's3proxy: error: ...', status 2."""
    proc = cli(*args)
    assert proc.returncode == 2
    assert named in one_line_error(proc)


# --- settings refused at start (reprobe21c) ------------------------------------------


@pytest.mark.parametrize("command", ["serve", "cleanup"])
@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        # 0 was taken for 60 (`(x or 60) < 60`): the sweep aborted live uploads
        ([], {"S3PROXY_CLEANUP_OLDER_THAN": "0"}, "--cleanup-older-than must be at least 1m"),
        # the orphan threshold (attempts x timeouts) overflowed timedelta: serve's sweep
        # died (a traceback at exit), cleanup printed a traceback
        (["--s3-max-attempts", "1000000000000"], {}, "--s3-max-attempts must be 1-100"),
        (
            ["--s3-max-attempts", "100", "--s3-read-timeout", "3650d"],
            {},
            "one S3 call comes to 365000d",
        ),
        ([], {"S3PROXY_S3_READ_TIMEOUT": "400d"}, "record retention comes to"),
    ],
)
def test_a_setting_that_would_fail_later_is_refused_at_start(
    command: str, flags: list[str], env: dict[str, str], named: str
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"  # never reached: refused first
    common = ["--endpoint-url", endpoint, "--bucket", "b", "--s3-connect-timeout", "1"]
    proc = cli(command, *common, *flags, env={**fake_aws_env(), **env})
    assert named in one_line_error(proc)
    assert proc.returncode == 2


@pytest.mark.parametrize("value", ["0", "59s", "0.5"])
def test_cleanup_older_than_flag_and_variable_are_held_to_one_minute(value: str) -> None:
    """The flag over the variable, as serve's precedence; each checked the same way."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    common = ["cleanup", "--endpoint-url", endpoint, "--bucket", "b", "--s3-max-attempts", "1"]
    proc = cli(*common, "--older-than", value)
    assert proc.returncode == 2
    assert "--older-than must be at least 1m" in one_line_error(proc)
    proc = cli(*common, env={**fake_aws_env(), "S3PROXY_CLEANUP_OLDER_THAN": value})
    assert proc.returncode == 2
    # a flag of 1h over a variable of 0: the flag is taken (S3 is then not reached: 1)
    proc = cli(
        *common, "--older-than", "1h", env={**fake_aws_env(), "S3PROXY_CLEANUP_OLDER_THAN": value}
    )
    assert proc.returncode == 1 and "cannot reach S3" in one_line_error(proc)


def test_serve_with_an_invalid_embedded_bucket_is_a_settings_error(tmp_path: Path) -> None:
    """Regression (reprobe21c): serve --bucket Bad_Bucket without --endpoint-url exited 1,
    as the store failed to start; README's exit table puts an invalid value under 2."""
    proc = cli("serve", "--bucket", "Bad_Bucket", "--data-dir", str(tmp_path / "d"))
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "--bucket: 'Bad_Bucket' is not a valid S3 bucket name" in line
    assert not (tmp_path / "d").exists()  # refused before the store was touched


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-size", "0"], "--max-size must be at least 1 byte, got '0'"),
        (["--max-size", "lots"], "--max-size: not a size: 'lots'"),
        (["--ttl", "0.5"], "--ttl must be at least 1s, got '0.5'"),
        (["--ttl", "0"], "--ttl must be at least 1s, got '0'"),
        (["--ttl", "soon"], "--ttl: not a duration: 'soon'"),
        (["--max-files", "0"], "--max-files must be at least 1, got 0"),
    ],
)
def test_token_names_the_flag_whose_value_is_refused(flags: list[str], named: str) -> None:
    """Regression (reprobe21c): --max-size 0 said "max_size must be a positive integer or
    None" (tokens.issue's argument), --ttl 0.5 said "got 0" (after rounding)."""
    env = {**fake_aws_env(), "S3PROXY_TOKEN_SECRET": SECRET}
    proc = cli("token", "--prefix", "p/", *flags, env=env)
    assert proc.returncode == 2
    assert named in one_line_error(proc)


def test_serve_port_that_is_no_number_says_so() -> None:
    """Regression (reprobe21c): "invalid literal for int() with base 10: 'abc'"."""
    proc = cli("serve", "--port", "abc", "--endpoint-url", "http://127.0.0.1:9", "--bucket", "b")
    assert proc.returncode == 2
    assert "--port: not a whole number: 'abc'" in one_line_error(proc)
