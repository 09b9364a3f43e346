"""What the app shares between requests, typed as one ``web.AppKey``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from s3proxy.auth import Authenticator, load_keys
from s3proxy.budget import MemoryBudget
from s3proxy.config import Config
from s3proxy.errors import UPSTREAM_UNAVAILABLE, ProxyError
from s3proxy.form import FormLimits
from s3proxy.janitor import CLEANUP_TIMEOUT, Janitor
from s3proxy.metrics import Metrics
from s3proxy.pipeline import PipelineConfig
from s3proxy.protocol import Connections
from s3proxy.s3 import ObjectStore
from s3proxy.settings import Settings
from s3proxy.webhook import Webhook

if TYPE_CHECKING:
    from s3proxy.embedded import EmbeddedStore


@dataclass
class AppState:
    settings: Settings
    config: Config  # what the settings mean for each module, mapped once
    budget: MemoryBudget
    metrics: Metrics = field(default_factory=Metrics)
    auth: Authenticator = field(default_factory=Authenticator)
    janitor: Janitor = field(default_factory=Janitor)
    sink: ObjectStore | None = None  # the bucket; set once the S3 client is open
    webhook: Webhook | None = None  # set when a webhook URL is configured
    store: EmbeddedStore | None = None  # the embedded store this process runs, if any
    connections: Connections = field(default_factory=lambda: Connections(1024, 10.0))
    draining: bool = False
    uploads: set[asyncio.Task[Any]] = field(default_factory=set)  # handlers storing files
    stopped: set[asyncio.Task[Any]] = field(default_factory=set)  # ...that drain cancelled

    @classmethod
    def from_settings(cls, settings: Settings) -> AppState:
        return cls(
            settings=settings,
            config=Config.from_settings(settings),
            auth=Authenticator(
                api_keys=load_keys(settings.api_keys()),
                token_secrets=load_keys(settings.token_secrets()),
            ),
            budget=MemoryBudget(settings.memory_budget),
            connections=Connections(settings.max_connections, settings.header_timeout),
        )

    @property
    def pipeline(self) -> PipelineConfig:
        return self.config.pipeline

    @property
    def form_limits(self) -> FormLimits:
        return self.config.form

    @property
    def cleanup_wait(self) -> float:
        """Seconds a cancelled upload may need to clean up: an abort and a delete for the
        file in progress, the deletes of the others (at once), one webhook notice."""
        return 3 * CLEANUP_TIMEOUT + self.settings.webhook_timeout

    def check_store(self) -> None:
        """Raise UPSTREAM_UNAVAILABLE while the embedded store this process runs is down
        or restarting: known at once, where an S3 call would wait out its retries."""
        if self.store is not None and not self.store.up:
            raise ProxyError(
                UPSTREAM_UNAVAILABLE, "the embedded S3 store is down; it is being restarted"
            )

    def require_sink(self) -> ObjectStore:
        if self.sink is None:
            raise RuntimeError("the S3 client is not open yet")
        return self.sink

    @contextlib.contextmanager
    def track(self, task: asyncio.Task[Any] | None) -> Iterator[None]:
        """Remember an upload handler's own task (``asyncio.current_task()``, which
        aiohttp runs per request, not the connection's ``request.task``) so shutdown
        can wait for it, then cancel it."""
        if task is not None:
            self.uploads.add(task)
        try:
            yield
        finally:
            if task is not None:
                self.uploads.discard(task)
                self.stopped.discard(task)

    def stop(self, task: asyncio.Task[Any]) -> None:
        """Cancel an upload for shutdown; its handler then answers 503 SHUTTING_DOWN."""
        self.stopped.add(task)
        task.cancel()

    def stopped_by_shutdown(self, task: asyncio.Task[Any]) -> bool:
        """Was this cancellation drain's alone? If so, take it back (``uncancel``) so the
        handler can still answer; a cancellation from anyone else stays."""
        if task not in self.stopped:
            return False
        self.stopped.discard(task)
        return task.uncancel() == 0


STATE = web.AppKey("state", AppState)
