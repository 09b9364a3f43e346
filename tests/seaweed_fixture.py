"""pytest plugin: a real SeaweedFS (``weed mini``) for the whole test session.

Load it with ``pytest_plugins = ["tests.seaweed_fixture"]``. The fixture is sync on
purpose: it drives the store on a private event loop in the main thread, so it works
beside pytest-asyncio's function-scoped loops. Not a helper thread: Linux sends the
child's parent-death signal when the thread that spawned it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from operator import not_
from pathlib import Path
from typing import Any

import pytest

from s3proxy.embedded import EmbeddedConfig, EmbeddedStore
from s3proxy.s3_aiobotocore import AioObjectStore, ClientOptions, open_store
from s3proxy.s3_parts import PartSender
from tests.polling import eventually_sync


def s3_client_kwargs(store: EmbeddedStore) -> dict[str, Any]:
    """Keyword arguments for ``boto3.client("s3", **kw)`` or aiobotocore's create_client."""
    return {
        "endpoint_url": store.endpoint_url,
        "aws_access_key_id": store.access_key,
        "aws_secret_access_key": store.secret_key,
        "region_name": store.region,
    }


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


# How long weed may take to exit on a SIGTERM it alone handles (the kernel's parent-death
# signal, once its proxy was SIGKILLed): its filer waits up to 10 s for open gRPC streams
# (weed.log in a CI-like run: "Filer stopped 11.2s"). A proxy's own stop SIGKILLs weed
# after 10 s, so waits after one need no more than the default.
WEED_SIGTERM_EXIT = 20.0


def wait_no_weed(pid: int | None, data_dir: Path, within: float = 10.0) -> None:
    """Fail unless weed ``pid`` and anything run on ``data_dir`` are gone ``within`` s."""

    def leftovers() -> list[int]:
        alive = [p for p in [pid] if p is not None and process_alive(p)]
        return sorted(set(alive + processes_mentioning(str(data_dir))))

    eventually_sync(leftovers, until=not_, within=within, what=f"weed pids on {data_dir} gone")


@contextlib.contextmanager
def running_store(config: EmbeddedConfig, timeout: float = 60.0) -> Iterator[EmbeddedStore]:
    """Start a store, yield it, stop it and check that weed is gone; from sync code."""
    loop = asyncio.new_event_loop()
    store = EmbeddedStore(config)
    try:
        loop.run_until_complete(store.start(timeout))
        pid = store.pid
        try:
            yield store
        finally:
            loop.run_until_complete(store.stop())
            wait_no_weed(pid, store.data_dir, within=1.0)
    finally:
        loop.close()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStore]:
    """One SeaweedFS on free loopback ports, bucket ``uploads``, generated keys."""
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    with running_store(EmbeddedConfig(data_dir=data_dir, s3_port=0)) as store:
        yield store


@pytest.fixture
async def weed_store(seaweedfs: EmbeddedStore) -> AsyncIterator[AioObjectStore]:
    """The aiobotocore store on the session's SeaweedFS (which checks signatures), its
    lean sender in use, one attempt per call."""
    opts = ClientOptions(
        endpoint_url=seaweedfs.endpoint_url,
        region=seaweedfs.region,
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
        max_attempts=1,
    )
    async with open_store(opts, seaweedfs.bucket) as store:
        assert isinstance(store._part_sender(), PartSender)
        yield store
