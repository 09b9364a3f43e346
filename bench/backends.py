"""The S3 store a run uploads into: the embedded SeaweedFS, moto, or an external endpoint."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import body, procs, s3util
from bench.options import REPO, Options


@dataclass
class Backend:
    kind: str
    endpoint_url: str
    bucket: str
    access_key: str | None
    secret_key: str | None
    pid: int | None
    owned: bool  # ours alone: every object in the bucket is the bench's to check and delete
    stop: Callable[[], Awaitable[None]]
    # Give the store back the bytes of the objects a cell deleted, between cells (the
    # embedded SeaweedFS keeps them until its own sweep, and fills up about 60 GiB in).
    reclaim: Callable[[], Awaitable[None]] | None = None

    def client(self, region: str) -> Any:
        """An S3 client of this store (an async context manager)."""
        return s3util.client(self.endpoint_url, region, self.access_key, self.secret_key)


async def _ensure_bucket(b: Backend, region: str) -> None:
    async with b.client(region) as s3:
        try:
            await s3.head_bucket(Bucket=b.bucket)
        except Exception:
            await s3.create_bucket(Bucket=b.bucket)


async def start_backend(opts: Options, workdir: Path, log_dir: Path) -> Backend:
    """Start (or attach to) the S3 store the run uploads into."""
    if opts.backend == "external":
        if not opts.endpoint_url:
            raise SystemExit("--endpoint-url is needed with an external backend")

        async def nothing() -> None:
            return None

        b = Backend(
            "external",
            opts.endpoint_url,
            opts.bucket,
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
            None,
            False,
            nothing,
        )
    elif opts.backend == "moto":
        port = procs.free_port()
        moto_server = Path(sys.executable).parent / "moto_server"
        argv = [
            str(moto_server) if moto_server.exists() else "moto_server",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ]
        child = procs.Child("moto", argv, None, log_dir)
        await child.start()
        await child.wait_http(f"http://127.0.0.1:{port}/", limit_s=60)
        b = Backend(
            "moto",
            f"http://127.0.0.1:{port}",
            opts.bucket,
            "bench",
            "bench-secret",
            child.pid,
            True,
            lambda: _stopped(child),
        )
    else:
        try:
            from s3proxy.embedded import EmbeddedConfig, EmbeddedStore
        except ImportError as e:
            raise SystemExit(
                f"the embedded SeaweedFS store is not available ({e}); try --backend moto"
            ) from e
        # A free S3 port, not the default 8333: another run (or a `make serve`) may hold it.
        store = EmbeddedStore(
            EmbeddedConfig(
                data_dir=workdir / "seaweedfs", bucket=opts.bucket, s3_port=procs.free_port()
            )
        )
        await store.start(timeout=90)
        b = Backend(
            "seaweedfs",
            store.endpoint_url,
            store.bucket,
            store.access_key,
            store.secret_key,
            store.pid,
            True,
            store.stop,
            store.vacuum,
        )
    await _ensure_bucket(b, opts.region)
    return b


async def _stopped(child: procs.Child) -> None:
    await child.stop()


async def warm_backend(b: Backend, opts: Options) -> None:
    """Write 32 parts straight into the store first, so no design meets it cold.

    A fresh SeaweedFS allocates volumes on its first writes; whichever design ran first
    would pay for that.
    """
    async with b.client(opts.region) as s3:

        async def one(i: int) -> str:
            key = f"bench/warm-up/{i}.bin"
            parts = s3util.rechunk(body.chunks(opts.seed, 8 * opts.part_size), opts.part_size)
            await s3util.multipart_upload(s3, b.bucket, key, parts, opts.parts_in_flight)
            return key

        keys = await asyncio.gather(*(one(i) for i in range(4)))
        await s3util.delete_keys(s3, b.bucket, keys)


def child_env(b: Backend, region: str, src: Path | None = None) -> dict[str, str]:
    """The environment of a design's server: the store's credentials, and nothing of ours.

    ``src`` goes first on PYTHONPATH (the s3proxy snapshot), then the repository.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}
    env.update(
        AWS_ACCESS_KEY_ID=b.access_key or "",
        AWS_SECRET_ACCESS_KEY=b.secret_key or "",
        AWS_REGION=region,
        AWS_DEFAULT_REGION=region,
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(src) if src else None, str(REPO), env.get("PYTHONPATH")])
        ),
    )
    return env
