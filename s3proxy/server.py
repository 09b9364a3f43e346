"""Run the app: listen, wait for SIGTERM/SIGINT, drain, clean up.

Not ``web.run_app``: on shutdown aiohttp marks every connection closing and then
discards the bytes that arrive on it, so an upload in flight could never finish
in its grace period. Here the proxy first drains (``/readyz`` and new uploads
answer 503 while running uploads get ``--shutdown-timeout`` to finish, then are
cancelled, which aborts them), and only then lets aiohttp close connections.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from s3proxy.app import create_app, drain
from s3proxy.settings import Settings
from s3proxy.state import STATE

log = logging.getLogger("s3proxy.server")

ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = web.AppRunner(
        app, handle_signals=False, access_log_format=ACCESS_LOG_FORMAT, shutdown_timeout=5.0
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()  # opens the S3 client; starts the embedded store if any
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        await stop.wait()
        log.info("proxy.stopping signal received")
        await drain(app[STATE])
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("proxy.stopped")
