"""``python -m bench load``: load-test a running deployment; ``run_load`` for tests.

Clients are aiohttp sessions streaming generated multipart bodies (``bench.genbody``): nothing
is read from disk, and each file's sha256 is computed as it is sent. Two ways to load:

- closed loop (default): ``concurrency`` workers, each sending upload after upload, so the
  offered load follows the deployment's speed;
- open loop (``rate``): arrivals at a rate (Poisson or fixed gaps) whatever the deployment
  does, at most ``concurrency`` in flight; an arrival over that cap is dropped and counted,
  so an overloaded deployment shows as drops and latency rather than a slower test.

Arrivals stop at ``duration`` or after ``requests`` uploads; uploads in flight then finish
(each attempt within ``timeout``). An upload is retried (``retry``) only when the answer says
nothing was stored and another try may work (``should_retry``). Every upload is recorded
(``bench.load_stats``); with ``verify`` every 201 is checked in S3 (``bench.load_verify``).

The decisions (retry, backoff, what an exception or answer means, arrival gaps, the progress
line) are pure functions; the rest is thin I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp

from bench import load_report, load_verify
from bench.genbody import UploadBody
from bench.load_config import LoadConfig, config_from_argv
from bench.load_stats import LoadResult, RequestRecord, summarize

# 503 codes s3proxy answers before storing anything, where another try (on this or another
# instance) may succeed: README's error table ("retry on another instance", "retry shortly").
RETRYABLE_503 = frozenset({"SHUTTING_DOWN", "OVERLOADED", "UPSTREAM_UNAVAILABLE"})
CONNECTION_REFUSED = "CONNECTION_REFUSED"
TIMEOUT = "TIMEOUT"
SEND_FAILED = "SEND_FAILED"  # the connection broke while the body was being sent
BAD_REPLY = "BAD_REPLY"  # a 201 that does not name exactly one file of our size and sha256
BACKOFF_BASE_S = 0.2  # first retry after 0.1-0.2 s, doubling
BACKOFF_MAX_S = 5.0  # and never longer, Retry-After included (a load test has a clock)
PROGRESS_TTY_S = 1.0  # how often the live line is redrawn on a terminal
PROGRESS_LOG_S = 10.0  # how often a progress line is printed when stderr is a file or pipe


def should_retry(
    status: int, code: str, body_started: bool, retries_done: int, max_retries: int
) -> bool:
    """Whether to send the upload again: only when nothing can have been stored.

    - 503 SHUTTING_DOWN/OVERLOADED/UPSTREAM_UNAVAILABLE: s3proxy answers them with
      everything it started aborted;
    - a refused connection never carried a byte;
    - SEND_FAILED, the connection broke while the body was still being sent: a body that
      did not arrive whole is never stored (s3proxy aborts what an incomplete request
      started), and this is how a client sees a refusal the server sent before reading the
      body and then closed on (s3proxy's OVERLOADED does, measured: about half the clients
      over --max-connections get a broken pipe instead of the 503).

    Anything else (a 5xx, a failure after the whole body went out, a timeout) may have been
    stored, or may fail again the same way: it is reported, not retried.
    """
    if retries_done >= max_retries:
        return False
    if status == 503 and code in RETRYABLE_503:
        return True
    if status == 0 and code == SEND_FAILED:
        return True
    return status == 0 and code == CONNECTION_REFUSED and not body_started


def backoff_s(retries_done: int, retry_after: float | None, jitter: float) -> float:
    """Seconds before retry ``retries_done + 1``; ``jitter`` in [0, 1) spreads the clients.

    Exponential with half jitter; a server's Retry-After wins if longer; capped either way.
    """
    base = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0**retries_done) * (0.5 + jitter / 2)
    if retry_after is not None:
        base = max(base, retry_after)
    return min(BACKOFF_MAX_S, base)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` delta-seconds (RFC 9110 section 10.2.3); an HTTP-date is ignored."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def transport_code(exc: BaseException) -> str:
    """A stable code for a failure with no HTTP answer (status 0 in the records)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return (
            CONNECTION_REFUSED
            if isinstance(exc.os_error, ConnectionRefusedError)
            else ("CONNECT_ERROR")
        )
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return TIMEOUT
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "DISCONNECTED"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "PAYLOAD_ERROR"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "CONNECTION_RESET"
    if isinstance(exc, aiohttp.ClientOSError | OSError):
        return "OS_ERROR"
    return type(exc).__name__.upper()


def failure_code(exc: BaseException, body_started: bool, body_finished: bool) -> str:
    """The code of a failure with no answer: ``transport_code``, except that any failure
    but a timeout while the body was being sent is SEND_FAILED (what the server did with a
    body it got part of is known: nothing)."""
    code = transport_code(exc)
    if body_started and not body_finished and code != TIMEOUT:
        return SEND_FAILED
    return code


def parse_reply(status: int, text: str, size: int, sha256: str) -> tuple[str, str, str]:
    """``(code, key, error)`` from an answer; code "" only for a 201 that stored our bytes.

    A 201 must name one file of ``size`` bytes whose sha256 (when reported) is the one we
    computed; an error answer's code is the JSON ``error.code`` s3proxy sends.
    """
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = None
    if status != 201:
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return err["code"], "", str(err.get("message", ""))[:300]
        return f"HTTP_{status}", "", text[:300]
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or len(files) != 1 or not isinstance(files[0], dict):
        return BAD_REPLY, "", f"expected one file in the answer: {text[:300]}"
    f = files[0]
    key = f.get("key")
    if not isinstance(key, str) or not key:
        return BAD_REPLY, "", f"no key in the answer: {text[:300]}"
    if f.get("size") != size:
        return BAD_REPLY, key, f"answer says size {f.get('size')}, sent {size}"
    if not sha256 or f.get("sha256", sha256) != sha256:
        return BAD_REPLY, key, f"answer says sha256 {f.get('sha256')}, sent {sha256 or '?'}"
    return "", key, ""


def arrival_gaps(rate: float, arrivals: str, rng: random.Random) -> Iterator[float]:
    """Seconds between open-loop arrivals: exponential (Poisson arrivals) or fixed."""
    while True:
        yield rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate


def progress_line(
    elapsed: float, done: int, in_flight: int, mbps: float, errors: int, dropped: int
) -> str:
    """The live line: ``0:42 done 318 in flight 8 71.3 MB/s errors 0``."""
    el = int(elapsed)
    line = (
        f"{el // 60}:{el % 60:02d} done {done} in flight {in_flight}"
        f" {mbps:6.1f} MB/s errors {errors}"
    )
    return line + (f" dropped {dropped}" if dropped else "")


class _Run:
    """The state of one load test while it runs."""

    def __init__(
        self, cfg: LoadConfig, session: aiohttp.ClientSession, origin: float | None = None
    ) -> None:
        self.cfg = cfg
        self.session = session
        self.url = cfg.url
        self.t0 = time.monotonic() if origin is None else origin
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.run_id = f"{random.Random(cfg.seed).getrandbits(32):08x}{int(time.time()) % 10**6}"
        self.sizes = random.Random(f"sizes:{cfg.seed}")
        self.jitter = random.Random(f"jitter:{cfg.seed}")
        self.records: list[RequestRecord] = []
        self.issued = 0
        self.in_flight = 0
        self.dropped = 0
        self.done = 0
        self.errors = 0
        self.sent_bytes = 0
        self.stop = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def next_upload(self) -> tuple[int, int] | None:
        """The next upload's (number, size), or None once arrivals are over."""
        cfg = self.cfg
        if self.stop.is_set() or (cfg.requests is not None and self.issued >= cfg.requests):
            return None
        if cfg.duration is not None and self.now() >= cfg.duration:
            return None
        n = self.issued
        self.issued += 1
        sizes = [s for s, _ in cfg.mix]
        weights = [w for _, w in cfg.mix]
        return n, self.sizes.choices(sizes, weights)[0]

    def _sent(self, n: int) -> None:
        self.sent_bytes += n

    def _headers(self, body: UploadBody, request_id: str) -> dict[str, str]:
        headers = {"Content-Type": body.content_type, "X-Request-ID": request_id}
        if not self.cfg.chunked:
            headers["Content-Length"] = str(body.content_length)
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        if self.cfg.token:
            headers["X-Upload-Token"] = self.cfg.token
        return headers

    async def _attempt(
        self, body: UploadBody, request_id: str
    ) -> tuple[int, str, str, str, float | None]:
        """One POST: ``(status, code, key, error, retry_after)``; status 0 if no answer."""
        body.started = body.finished = False
        stream = body.stream(self._sent)
        try:
            async with self.session.post(
                self.url,
                data=stream,
                headers=self._headers(body, request_id),
                chunked=True if self.cfg.chunked else None,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            ) as resp:
                text = (await resp.read()).decode(errors="replace")
                code, key, error = parse_reply(resp.status, text, body.size, body.sha256)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                return resp.status, code, key, error, retry_after
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            code = failure_code(exc, body.started, body.finished)
            return 0, code, "", f"{type(exc).__name__}: {exc}"[:300], None
        finally:
            with contextlib.suppress(RuntimeError):  # still running inside aiohttp's writer
                await stream.aclose()

    async def upload(self, n: int, size: int) -> None:
        """One upload, with its retries, recorded."""
        self.in_flight += 1
        record = RequestRecord(n=n, size=size, start=self.now())
        self.records.append(record)
        body = UploadBody(self.cfg.seed, n, size)
        try:
            while True:
                rid = f"load-{self.run_id}-{n}-{record.retries}"
                status, code, key, error, retry_after = await self._attempt(body, rid)
                record.status, record.code, record.key, record.error = status, code, key, error
                record.request_id = rid
                if not should_retry(status, code, body.started, record.retries, self.cfg.retry):
                    break
                record.retried_on.append(record.error_key)
                record.retries += 1
                pause = backoff_s(record.retries - 1, retry_after, self.jitter.random())
                await asyncio.sleep(pause)
            record.sha256 = body.sha256
        finally:
            record.end = self.now()
            self.in_flight -= 1
            self.done += 1
            self.errors += not record.ok

    async def closed_loop(self) -> None:
        async def worker() -> None:
            while (job := self.next_upload()) is not None:
                await self.upload(*job)

        await asyncio.gather(*(worker() for _ in range(self.cfg.concurrency)))

    async def open_loop(self) -> None:
        assert self.cfg.rate is not None
        rng = random.Random(f"arrivals:{self.cfg.seed}")
        tasks: set[asyncio.Task[None]] = set()
        due = 0.0
        for gap in arrival_gaps(self.cfg.rate, self.cfg.arrivals, rng):
            due += gap
            if self.cfg.duration is not None and due >= self.cfg.duration:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0.0, due - self.now()))
            if self.stop.is_set():
                break
            if len(tasks) >= self.cfg.concurrency:
                self.dropped += 1
                continue
            job = self.next_upload()
            if job is None:
                break
            task = asyncio.create_task(self.upload(*job))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)

    async def show_progress(self) -> None:
        """The live line on stderr: redrawn on a terminal, a line now and then otherwise."""
        tty = sys.stderr.isatty()
        every = PROGRESS_TTY_S if tty else PROGRESS_LOG_S
        last_t, last_b = self.now(), self.sent_bytes
        while True:
            await asyncio.sleep(every)
            t, b = self.now(), self.sent_bytes
            mbps = (b - last_b) / max(t - last_t, 1e-9) / 1e6
            line = progress_line(t, self.done, self.in_flight, mbps, self.errors, self.dropped)
            last_t, last_b = t, b
            sys.stderr.write(f"\r{line:<78}" if tty else line + "\n")
            sys.stderr.flush()


async def run_load(
    cfg: LoadConfig, stop: asyncio.Event | None = None, origin: float | None = None
) -> LoadResult:
    """Run one load test to its end; setting ``stop`` ends arrivals early (in-flight finish).

    Record times count from ``origin`` (a ``time.monotonic()`` value; default: the call), so
    a test that does things during the run can tell which uploads were in flight at each.

    Verifies (and cleans up) in S3 when the config says so, and writes load.json and
    load.png into ``cfg.out`` when given. Awaitable from a test's event loop, beside an
    in-process proxy.
    """
    cpu0 = time.process_time()
    connector = aiohttp.TCPConnector(limit=cfg.concurrency, force_close=not cfg.keepalive)
    async with aiohttp.ClientSession(connector=connector) as session:
        run = _Run(cfg, session, origin)
        if stop is not None:
            run.stop = stop
        progress = asyncio.create_task(run.show_progress()) if cfg.progress else None
        try:
            await (run.open_loop() if cfg.rate is not None else run.closed_loop())
        finally:
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress
                if sys.stderr.isatty():
                    sys.stderr.write("\r" + " " * 78 + "\r")
    cpu = time.process_time() - cpu0
    deleted = 0
    if cfg.verify:
        assert cfg.s3_endpoint and cfg.bucket
        await load_verify.verify(run.records, cfg.s3_endpoint, cfg.bucket, cfg.region)
        if cfg.cleanup:
            deleted = await load_verify.cleanup(
                run.records, cfg.s3_endpoint, cfg.bucket, cfg.region
            )
    result = summarize(cfg.to_json(), run.started_at, run.records, run.dropped, deleted, cpu)
    if cfg.out is not None:
        load_report.write(result, cfg.out)
    return result


async def _until_signalled(cfg: LoadConfig) -> LoadResult:
    """The first SIGINT/SIGTERM ends arrivals (the report still comes); the second cancels."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            task.cancel()
        else:
            stop.set()
            print("\nstopping: uploads in flight finish (signal again to abandon)", file=sys.stderr)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return await run_load(cfg, stop)


def main(argv: list[str] | None = None) -> int:
    """The CLI: exit 0 when every upload succeeded (and, with --verify, every 201 checked out)."""
    cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    try:
        result = asyncio.run(_until_signalled(cfg))
    except asyncio.CancelledError:
        print("interrupted: no report", file=sys.stderr)
        return 130
    print(load_report.summary_text(result))
    if cfg.out is not None:
        print(f"\nwrote {cfg.out / load_report.JSON_NAME} and {cfg.out / load_report.PNG_NAME}")
    return 0 if result.clean and result.records else 1


if __name__ == "__main__":
    sys.exit(main())
