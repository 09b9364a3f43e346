"""What the app shares between requests, typed as one ``web.AppKey``.

Also the store check ``/readyz`` answers from (``StoreCheck``): a load balancer's check
must never wait on S3 calls that retry, or it marks the instance down by its own
timeout rather than by the answer (S3-FACTS "Many instances").
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from s3proxy.auth import Authenticator, load_keys
from s3proxy.budget import MemoryBudget
from s3proxy.config import Config
from s3proxy.download_limits import DownloadSlots
from s3proxy.errors import UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE, ProxyError
from s3proxy.form import FormLimits
from s3proxy.janitor import Janitor
from s3proxy.log import REQUEST_ID
from s3proxy.metrics import Metrics
from s3proxy.pipeline import PipelineConfig
from s3proxy.protocol import Connections
from s3proxy.s3 import ObjectStore
from s3proxy.settings import Settings
from s3proxy.webhook import Webhook

if TYPE_CHECKING:
    from s3proxy.embedded import EmbeddedStore

log = logging.getLogger("s3proxy.state")

# --drain-delay auto, once something has asked /readyz: HAProxy's default check
# (inter 2s, fall 3) marks a server down after 3 failed checks, up to 6 s after the
# first 503. Kubernetes users add a preStop sleep of about 5 s for the same reason.
AUTO_DRAIN_DELAY = 6.0
# A cached store check older than this many intervals (plus the timeout) is not
# trusted: the checker itself is stuck (a blocked loop) or gone.
STALE_INTERVALS = 3
# A store check that does not keep the timeout it is given (``AppState.check_s3`` gives
# it on, to say what cut it) is cut this share of the timeout later.
CHECK_BACKSTOP = 0.5
# The checks pause this many seconds after the last /readyz (or the start), since
# nobody routes by the answer then: each check is a HeadBucket through botocore, about
# 7 ms of CPU, and a proxy nobody probes spent 0.7% of a core on them (measured idle:
# 0.22 CPU s per 30 s with the checks, 0.08 without). A load balancer asks every few
# seconds, so under one they never pause; the next /readyz after a pause waits for a
# fresh check (at most the timeout).
IDLE_AFTER = 30.0


def drain_delay(setting: float | None, readyz_asked: bool) -> float:
    """Seconds to keep serving with /readyz at 503 before closing the listener: the
    setting, or for ``auto`` (None) ``AUTO_DRAIN_DELAY`` if anything has asked /readyz
    (something routes by it and must see the 503), else 0 (nobody is told by waiting)."""
    if setting is not None:
        return setting
    return AUTO_DRAIN_DELAY if readyz_asked else 0.0


def check_paused(now: float, last_asked: float, idle_after: float) -> bool:
    """Whether the background checks should pause: nothing asked for ``idle_after``
    seconds (``last_asked``: loop time of the last /readyz, or of the start)."""
    return now - last_asked > idle_after


def store_verdict(
    last: ProxyError | None, checked_at: float | None, now: float, stale_after: float
) -> ProxyError | None:
    """What /readyz says of the store: the last check's error (None: ready), unless
    there has been none yet or it is older than ``stale_after`` seconds."""
    if checked_at is None:
        return ProxyError(UPSTREAM_UNAVAILABLE, "the store has not been checked yet")
    if now - checked_at > stale_after:
        return ProxyError(
            UPSTREAM_UNAVAILABLE, f"the last store check finished {now - checked_at:.1f}s ago"
        )
    return last


class StoreCheck:
    """The store checked every ``interval`` seconds by one background task, each check
    cut at ``timeout``; ``verdict()`` answers from the last result at once (only the
    first after a start waits, for at most the timeout, when the last result is stale).
    The task pauses ``idle_after`` seconds after the last ``verdict()`` (see
    ``IDLE_AFTER``); ``start`` runs it again. Logs when readiness changes."""

    def __init__(self, interval: float, timeout: float, idle_after: float = IDLE_AFTER) -> None:
        self.interval = interval
        self.timeout = timeout
        self.idle_after = idle_after
        self.last: ProxyError | None = None
        self.checked_at: float | None = None  # loop time the last check finished
        self.checks = 0
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()  # a check finished since the last start
        self._asked_at = 0.0  # loop time of the last verdict() or start()
        self._stopping = False

    @property
    def stale_after(self) -> float:
        return STALE_INTERVALS * self.interval + self.timeout

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, check: Callable[[], Awaitable[None]]) -> None:
        """Run the checks (once; again after ``stop`` or a pause)."""
        if not self.running:
            self._stopping = False
            self._asked_at = asyncio.get_running_loop().time()
            self._first = asyncio.Event()
            # In no request's context: the /readyz that starts it would own its log lines.
            self._task = asyncio.create_task(
                self._run(check), name="readiness", context=contextvars.Context()
            )

    async def stop(self) -> None:
        """End the checks; returns within the timeout (plus a second) whatever the check
        does. A cancellation can be lost inside a library (Python 3.11's ``wait_for``
        returns the result of a future that finished just as it was cancelled), and a
        shutdown that waited on it would never end: measured, a SIGTERMed instance
        that stayed up past --shutdown-timeout with its listener closed."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True  # a lost cancellation still ends the loop
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=self.timeout + 1.0)
        if not done:
            log.warning("readiness.stop_timeout the store check did not stop; left behind")
        elif not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("readiness.check_failed error=%r", exc)

    async def once(self, check: Callable[[], Awaitable[None]]) -> ProxyError | None:
        """One check, as an error (None: ready); never raises but a cancellation."""
        try:
            # not wait_for: see stop(). The check is given the timeout itself (to say what
            # cut it); this one, a little later, is for a check that does not keep it.
            async with asyncio.timeout(self.timeout * (1 + CHECK_BACKSTOP)):
                await check()
        except TimeoutError:
            return ProxyError(
                UPSTREAM_TIMEOUT, f"the store did not answer its check within {self.timeout:g}s"
            )
        except ProxyError as err:
            return err
        except Exception as exc:  # not open yet (RuntimeError), anything unforeseen
            return ProxyError(UPSTREAM_UNAVAILABLE, f"the store check failed: {exc}")
        return None

    async def _run(self, check: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            began = loop.time()
            err = await self.once(check)
            self._record(err, loop.time())
            if check_paused(loop.time(), self._asked_at, self.idle_after):
                log.debug("readiness.paused idle=%.0fs", loop.time() - self._asked_at)
                return
            await asyncio.sleep(max(0.0, began + self.interval - loop.time()))

    def _record(self, err: ProxyError | None, now: float) -> None:
        was = self.last if self.checks else None
        if err is not None and (was is None or was.kind is not err.kind):
            log.warning("readiness.not_ready code=%s reason=%s", err.kind.code, err.message)
        elif err is None and was is not None:
            log.info("readiness.ready after=%s", was.kind.code)
        self.last, self.checked_at = err, now
        self.checks += 1
        self._first.set()

    async def verdict(self) -> ProxyError | None:
        """The store's readiness now, from the last check (after a pause, a fresh one)."""
        loop = asyncio.get_running_loop()
        self._asked_at = loop.time()
        stale = self.checked_at is None or loop.time() - self.checked_at > self.stale_after
        if stale and self._task is not None and not self._first.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), self.timeout)
        return store_verdict(self.last, self.checked_at, loop.time(), self.stale_after)


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
    draining: bool = False  # drain() began: the listener is closed, new uploads get 503
    # SIGTERM seen: /readyz answers 503 and every response says Connection: close, but
    # requests are still served until the drain delay ends (``begin_stopping``).
    stopping: bool = False
    readyz_asked: bool = False  # anything asked /readyz (for --drain-delay auto)
    store_check: StoreCheck = field(default_factory=lambda: StoreCheck(1.0, 1.0))
    # handlers storing files, each with the request it reads its body from where known
    # (the drain's lines say how that connection reads)
    uploads: dict[asyncio.Task[Any], web.BaseRequest | None] = field(default_factory=dict)
    # streamed downloads at once, below the S3 pool's size (s3proxy.download_limits)
    downloads: DownloadSlots = field(default_factory=lambda: DownloadSlots(48))
    stopped: set[asyncio.Task[Any]] = field(default_factory=set)  # ...that drain cancelled
    # every request handler in progress (its own task): what drain cancels at its deadline
    requests: set[asyncio.Task[Any]] = field(default_factory=set)

    @classmethod
    def from_settings(cls, settings: Settings) -> AppState:
        config = Config.from_settings(settings)
        return cls(
            settings=settings,
            config=config,
            auth=Authenticator(
                api_keys=load_keys(settings.api_keys()),
                token_secrets=load_keys(settings.token_secrets()),
            ),
            budget=MemoryBudget(settings.memory_budget),
            connections=Connections(
                settings.max_connections, settings.header_timeout, settings.read_buffer
            ),
            store_check=StoreCheck(settings.readiness_interval, settings.readiness_timeout),
            downloads=DownloadSlots(config.downloads.slots, config.downloads.slot_wait),
        )

    @property
    def pipeline(self) -> PipelineConfig:
        return self.config.pipeline

    @property
    def form_limits(self) -> FormLimits:
        return self.config.form

    def check_store(self) -> None:
        """Raise UPSTREAM_UNAVAILABLE while the embedded store this process runs is down
        or restarting: known at once, where an S3 call would wait out its retries."""
        if self.store is not None and not self.store.up:
            raise ProxyError(
                UPSTREAM_UNAVAILABLE, "the embedded S3 store is down; it is being restarted"
            )

    async def check_s3(self) -> None:
        """The store check /readyz answers from: the embedded store is up and the bucket
        answers HeadBucket."""
        self.check_store()
        await self.require_sink().check(within=self.store_check.timeout)

    def begin_stopping(self) -> None:
        """SIGTERM: /readyz says 503 and responses say ``Connection: close`` (so no
        kept-alive connection is reused when the listener closes); uploads are still
        accepted until drain."""
        self.stopping = True
        self.connections.draining = True

    @property
    def drain_delay(self) -> float:
        return drain_delay(self.settings.drain_delay, self.readyz_asked)

    def require_sink(self) -> ObjectStore:
        if self.sink is None:
            raise RuntimeError("the S3 client is not open yet")
        return self.sink

    @contextlib.contextmanager
    def track(
        self, task: asyncio.Task[Any] | None, request: web.BaseRequest | None = None
    ) -> Iterator[None]:
        """Remember an upload handler's own task (``asyncio.current_task()``, which
        aiohttp runs per request, not the connection's ``request.task``) so shutdown
        can wait for it, then cancel it. Within a request already tracked (a tus creation
        appending its body) it does nothing: the outer one ends the tracking."""
        if task is None or task in self.uploads:
            yield
            return
        task.set_name(f"upload rid={REQUEST_ID.get()}")  # for the drain's lines
        self.uploads[task] = request
        try:
            yield
        finally:
            self.uploads.pop(task, None)
            self.stopped.discard(task)

    def stop(self, task: asyncio.Task[Any]) -> None:
        """Cancel a request for shutdown: an upload's handler then answers 503
        SHUTTING_DOWN; any other is cut short (``app.request_middleware`` logs it)."""
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
