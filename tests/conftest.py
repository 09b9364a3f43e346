"""Fixtures: a real S3 endpoint on loopback (moto server mode), buckets that must be
left clean, and the proxy built with create_app exactly as the CLI builds it."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from s3proxy.app import create_app
from s3proxy.settings import Settings
from tests.s3util import MotoServer, all_keys, empty_bucket, fake_aws_env, open_uploads, s3_client

pytest_plugins = ["tests.seaweed_fixture"]


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real AWS credentials or S3PROXY_* settings leak into a test."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "S3PROXY_")):
            monkeypatch.delenv(name)
    for name, value in fake_aws_env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer.start(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3(moto: MotoServer) -> Any:
    return s3_client(moto.endpoint_url)


@pytest.fixture
def bucket(s3: Any) -> Iterator[str]:
    """A fresh bucket; at teardown no multipart upload may be left open."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    leftover = open_uploads(s3, name)
    empty_bucket(s3, name)
    assert not leftover, f"multipart uploads left open: {leftover}"


def make_settings(endpoint_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "endpoint_url": endpoint_url,
        "part_size": 5 * 1024**2,
        "memory_budget": 64 * 1024**2,
        "max_file_size": 1024**3,
        "s3_max_attempts": 3,
        "s3_read_timeout": 30.0,
        # moto dates every upload in 2010: no background sweep in tests that do not ask
        "cleanup_interval": 0,
        # A teardown's drain waits for a late-write recheck's last look until the shutdown
        # deadline (--shutdown-timeout + 3 s, janitor.shutdown_runs): with the default 30 s,
        # ~15 tests spent 33 s each in teardown. Tests of the drain set their own.
        "shutdown_timeout": 3.0,
    }
    base.update(overrides)
    return Settings(**base)


ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def proxy_factory(
    aiohttp_client: Any, moto: MotoServer, bucket: str
) -> AsyncIterator[ProxyFactory]:
    """Build the app with create_app(settings) and serve it on 127.0.0.1."""

    async def make(endpoint_url: str | None = None, **overrides: Any) -> TestClient[Any, Any]:
        overrides.setdefault("bucket", bucket)
        settings = make_settings(endpoint_url or moto.endpoint_url, **overrides)
        client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
        return client

    yield make


@pytest.fixture
async def proxy(proxy_factory: ProxyFactory) -> TestClient[Any, Any]:
    return await proxy_factory()


@pytest.fixture
def keys_in(s3: Any) -> Callable[[str], list[str]]:
    return lambda b: all_keys(s3, b)
