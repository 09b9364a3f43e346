"""What the app shares between requests, typed as one ``web.AppKey``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from s3proxy.auth import Authenticator, load_keys
from s3proxy.budget import MemoryBudget
from s3proxy.form import FormLimits
from s3proxy.janitor import CLEANUP_TIMEOUT, Janitor
from s3proxy.metrics import Metrics
from s3proxy.pipeline import PipelineConfig
from s3proxy.protocol import Connections
from s3proxy.settings import Settings
from s3proxy.sink import Presigner, S3Sink
from s3proxy.webhook import Webhook


@dataclass
class AppState:
    settings: Settings
    budget: MemoryBudget
    pipeline: PipelineConfig
    form_limits: FormLimits
    presigner: Presigner  # SigV4 URLs for the endpoint browsers reach
    metrics: Metrics = field(default_factory=Metrics)
    auth: Authenticator = field(default_factory=Authenticator)
    janitor: Janitor = field(default_factory=Janitor)
    sink: S3Sink | None = None  # set once the S3 client is open
    webhook: Webhook | None = None  # set when a webhook URL is configured
    connections: Connections = field(default_factory=lambda: Connections(1024, 10.0))
    draining: bool = False
    uploads: set[asyncio.Task[Any]] = field(default_factory=set)  # handlers storing files
    stopped: set[asyncio.Task[Any]] = field(default_factory=set)  # ...that drain cancelled

    @classmethod
    def from_settings(cls, settings: Settings) -> AppState:
        return cls(
            settings=settings,
            presigner=Presigner(settings),
            auth=Authenticator(
                api_keys=load_keys(settings.api_keys()),
                token_secrets=load_keys(settings.token_secrets()),
            ),
            budget=MemoryBudget(settings.memory_budget),
            connections=Connections(settings.max_connections, settings.header_timeout),
            pipeline=PipelineConfig(
                part_size=settings.part_size,
                parts_in_flight=settings.parts_in_flight,
                max_file_size=settings.max_file_size,
                chunk_size=settings.read_buffer,
                allow_types=settings.allow_type,
                acl=settings.acl,
                storage_class=settings.storage_class,
                sse=settings.sse,
                sse_kms_key_id=settings.sse_kms_key_id,
            ),
            form_limits=FormLimits(
                max_files=settings.max_files,
                max_fields=settings.max_fields,
                max_field_size=settings.max_field_size,
                max_request_size=settings.max_request_size,
                chunk_size=settings.read_buffer,
                idle_timeout=settings.client_timeout,
            ),
        )

    @property
    def cleanup_wait(self) -> float:
        """Seconds a cancelled upload may need to clean up: an abort and a delete for the
        file in progress, the deletes of the others (at once), one webhook notice."""
        return 3 * CLEANUP_TIMEOUT + self.settings.webhook_timeout

    def require_sink(self) -> S3Sink:
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
