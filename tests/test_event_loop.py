"""``--event-loop``: the setting parses, and the proxy serves (and drains) under each loop."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import uvloop

from s3proxy.server import loop_factory, settle_heap
from s3proxy.settings import Settings, SettingsError
from tests.bodies import MiB
from tests.s3util import MotoServer, read_object_async, start_proxy


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ({}, {}, Settings.event_loop),
        ({"event_loop": "UVLOOP"}, {}, "uvloop"),
        ({}, {"S3PROXY_EVENT_LOOP": "asyncio"}, "asyncio"),
        ({"event_loop": "auto"}, {"S3PROXY_EVENT_LOOP": "asyncio"}, "auto"),  # the flag wins
    ],
)
def test_the_setting_parses(args: dict[str, str], env: dict[str, str], expected: str) -> None:
    assert Settings.load(args, env).event_loop == expected


def test_an_unknown_loop_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="--event-loop must be one of auto, asyncio, uvloop"):
        Settings.load({"event_loop": "trio"})


@pytest.mark.parametrize(
    ("choice", "loop_type"),
    [("asyncio", asyncio.SelectorEventLoop), ("uvloop", uvloop.Loop), ("auto", uvloop.Loop)],
)
def test_the_choice_makes_its_loop(choice: str, loop_type: type) -> None:
    loop = loop_factory(choice)()
    try:
        assert isinstance(loop, loop_type)
    finally:
        loop.close()


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
async def test_the_proxy_serves_and_drains_under_each_loop(
    choice: str, moto: MotoServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    proxy = start_proxy(moto, bucket, tmp_path, "--event-loop", choice)
    try:
        data = os.urandom(6 * MiB + 3)  # two parts
        boundary = "loop-test-boundary"
        raw = (
            (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        req = urllib.request.Request(
            f"{proxy.url}/upload",
            data=raw,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        reply = await asyncio.to_thread(urllib.request.urlopen, req, timeout=30)
        assert reply.status == 201
        key = json.loads(reply.read())["files"][0]["key"]
        assert await read_object_async(s3, bucket, key) == data
    finally:
        code = await asyncio.to_thread(proxy.stop)
    assert code == 0  # SIGTERM drained and exited under this loop too
    log = proxy.log_path.read_text()
    expected = "uvloop.Loop" if choice == "uvloop" else "asyncio.unix_events._UnixSelectorEventLoop"
    assert f"proxy.event_loop loop={expected}" in log, log[-2000:]


def test_settle_heap_freezes_what_start_up_made() -> None:
    """What exists at start is out of the collector's sight (a full collection during the
    first upload cost 0.15 CPU s with botocore's model in the young generations)."""
    made_at_start = [{"n": i} for i in range(1000)]
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(made_at_start)
    finally:
        gc.unfreeze()
