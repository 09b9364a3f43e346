"""Test helpers around a real S3 endpoint on loopback: start moto, inspect buckets.

boto3 is synchronous. In an ``async def`` test the event loop also serves the proxy
under test (``proxy_factory``), so a boto3 call made on it stalls the proxy for as long
as S3 takes to answer. Async tests use the ``*_async`` helpers below, or
``await asyncio.to_thread(s3.call, ...)``, which run the call in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.polling import eventually_sync

CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
BOTO_CONFIG = Config(
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
    s3={"addressing_style": "path"},
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    """moto's S3 in server mode, in its own process (it spools data to temp files)."""

    port: int
    proc: subprocess.Popen[bytes]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, log_path: Path) -> MotoServer:
        port = free_port()
        moto = Path(sys.executable).with_name("moto_server")
        with open(log_path, "wb") as log:  # the child keeps its own copy of the fd
            proc = subprocess.Popen(
                [str(moto), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def answering() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {log_path.read_text()[-2000:]}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                return True

        try:
            eventually_sync(answering, within=30, what="moto_server to answer", ignoring=(OSError,))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return cls(port, proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def s3_client(endpoint_url: str, **creds: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        config=BOTO_CONFIG,
        **(creds or CREDS),
    )


def open_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return list(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def all_keys(s3: Any, bucket: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


async def open_uploads_async(s3: Any, bucket: str) -> list[dict[str, Any]]:
    """``open_uploads`` in a worker thread, for async tests."""
    return await asyncio.to_thread(open_uploads, s3, bucket)


async def all_keys_async(s3: Any, bucket: str) -> list[str]:
    """``all_keys`` in a worker thread, for async tests."""
    return await asyncio.to_thread(all_keys, s3, bucket)


def get_object(s3: Any, bucket: str, key: str) -> tuple[dict[str, Any], bytes]:
    """GetObject's response, and its body read to the end."""
    obj: dict[str, Any] = s3.get_object(Bucket=bucket, Key=key)
    with obj["Body"] as body:
        return obj, body.read()


async def get_object_async(s3: Any, bucket: str, key: str) -> tuple[dict[str, Any], bytes]:
    """``get_object`` in a worker thread (reading the body blocks too), for async tests."""
    return await asyncio.to_thread(get_object, s3, bucket, key)


async def read_object_async(s3: Any, bucket: str, key: str) -> bytes:
    """The object's bytes, read in a worker thread, for async tests."""
    return (await get_object_async(s3, bucket, key))[1]


async def head_object_async(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    """HeadObject in a worker thread, for async tests."""
    head: dict[str, Any] = await asyncio.to_thread(s3.head_object, Bucket=bucket, Key=key)
    return head


def empty_bucket(s3: Any, bucket: str) -> None:
    for up in open_uploads(s3, bucket):
        s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    for key in all_keys(s3, bucket):
        s3.delete_object(Bucket=bucket, Key=key)


def fake_aws_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return env


# How long ``ProxyProcess.stop`` waits for a stopped proxy before it kills it: the drain
# delay (auto: 6 s at most), the default 30 s grace, the 3 s cleanup deadline after it
# and room to spare. A kill at 30 s, the grace alone, cut a drain that had waited out its
# grace for an upload before it aborted that upload's multipart upload: left open.
STOP_WITHIN = 45.0


@dataclass
class ProxyProcess:
    """``python -m s3proxy serve`` as a separate process, as a user runs it."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        timeout: float = 90.0,
        port: int | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> ProxyProcess:
        """Start it and wait for /healthz. On a port picked here, a start that lost the
        port to another test between ``free_port()`` and the proxy's bind (a fresh-clone
        CI run: "cannot listen on ...: Address already in use") is tried again on another."""
        for _ in range(2 if port is None else 0):
            try:
                return cls._start(args, env, log_path, timeout, free_port(), preexec_fn)
            except RuntimeError as failed:
                if "Address already in use" not in str(failed):
                    raise
        return cls._start(args, env, log_path, timeout, port or free_port(), preexec_fn)

    @classmethod
    def _start(
        cls,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        timeout: float,
        port: int,
        preexec_fn: Callable[[], None] | None,
    ) -> ProxyProcess:
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "s3proxy",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=preexec_fn,
            )

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {proc.returncode}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return True

        try:
            eventually_sync(
                listening, within=timeout, what="the proxy to answer /healthz", ignoring=(OSError,)
            )
        except (AssertionError, RuntimeError) as failed:
            proc.kill()
            proc.wait()
            raise RuntimeError(
                f"proxy did not start ({failed}):\n{log_path.read_text()[-3000:]}"
            ) from None
        return cls(proc, port, log_path)

    def stop(self, timeout: float = STOP_WITHIN) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_proxy(moto: MotoServer, bucket: str, log_dir: Path, *extra: str) -> ProxyProcess:
    """A real ``s3proxy serve`` process on moto (5 MiB parts), logging into ``log_dir``."""
    return ProxyProcess.start(
        ["--endpoint-url", moto.endpoint_url, "--bucket", bucket, "--part-size", "5MiB", *extra],
        fake_aws_env(),
        log_dir / "proxy.log",
    )


async def exit_code(proxy: ProxyProcess, within: float = 30) -> int:
    """The process's exit status, waited for in a thread (the event loop stays free)."""
    code: int = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, within)
    return code
