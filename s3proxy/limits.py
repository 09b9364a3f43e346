"""Pure: how long a live upload can last, and how fast a client is sending.

The proxy cuts off any client that sends its body slower than ``--min-upload-rate``,
measured over a sliding window of ``--min-rate-window`` seconds of *client time*
(time spent waiting on the client's bytes; waits for memory or for S3 are the
proxy's, not the client's, and are not counted). The first window is a grace
period: a slow start (TCP slow start, a phone waking its radio) is not judged.

Why that bounds a request: after the grace, every window of client time carries
at least ``rate * window`` bytes, so ``n`` bytes take at most ``n / rate + window``
seconds of client time (sum the windows). The orphan sweep needs that figure to
tell an upload that is still streaming from one whose instance crashed:
``longest_part_interval`` is the most wall-clock time a live upload goes without
sending a part to S3, ``longest_upload`` the most a whole request can take, and
``orphan_after`` how long an open multipart upload must show no sign of life before
the sweep may take it for a crash's orphan.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from s3proxy import parts


class RateSettings(Protocol):
    """The settings these bounds read (s3proxy.settings.Settings has them all)."""

    @property
    def part_size(self) -> int: ...
    @property
    def max_file_size(self) -> int: ...
    @property
    def max_request_size(self) -> int: ...
    @property
    def min_upload_rate(self) -> int: ...
    @property
    def min_rate_window(self) -> float: ...
    @property
    def client_timeout(self) -> float: ...
    @property
    def s3_read_timeout(self) -> float: ...
    @property
    def s3_connect_timeout(self) -> float: ...
    @property
    def s3_max_attempts(self) -> int: ...


def client_time(size: int, min_rate: float, window: float) -> float:
    """The most client time ``size`` bytes can take at ``min_rate`` after a ``window`` of grace."""
    return size / min_rate + window


def s3_call_time(s: RateSettings) -> float:
    """The most one S3 call can take: every attempt connects and waits its full timeout."""
    return s.s3_max_attempts * (s.s3_connect_timeout + s.s3_read_timeout)


def longest_part_interval(s: RateSettings) -> float:
    """Seconds a live multipart upload can go without an UploadPart reaching S3.

    Filling the largest part from the client (rate and grace), plus one idle timeout
    (a read stalled when the window closes still waits it out), plus the S3 call that
    carries the part. Time waiting for memory is not in it: the budget serves the
    oldest upload first and evicts holders slower than the rate, so a waiting upload
    waits for others' parts, each bounded the same way; a sweep should add a margin.
    """
    largest = parts.largest_part(s.part_size, s.max_file_size)
    fill = client_time(largest, s.min_upload_rate, s.min_rate_window)
    return fill + s.client_timeout + s3_call_time(s)


def longest_upload(s: RateSettings) -> float:
    """Seconds of client time plus S3 calls the largest request can take, end to end.

    The body at the minimum rate (with its grace and one idle timeout), plus the S3
    calls that cannot overlap reading: one Create or Put and one Complete per file.
    As for ``longest_part_interval``, waits for memory are not counted.
    """
    body = client_time(s.max_request_size, s.min_upload_rate, s.min_rate_window)
    return body + s.client_timeout + 2 * s3_call_time(s)


def orphan_after(s: RateSettings, clock_skew: float) -> float:
    """Seconds an open multipart upload shows no sign of life before it counts as orphaned.

    A sign of life is what any instance can see in the bucket: the upload's initiation
    (ListMultipartUploads ``Initiated``) or its newest part (ListParts ``LastModified``).
    A live upload leaves two kinds of gap between them, both within ``2 * L`` where
    ``L = longest_part_interval``:

    * part to part (or initiation to the first part; Create follows the first part's
      fill): one wait for memory, then at most ``L``. The wait is within ``L`` at the head
      of the budget's line: every part holder releases within ``L`` (filling at the rate
      or evicted, then one S3 call), and nobody overtakes the head (s3proxy.budget);
    * the last part to Complete: at most two S3 calls, if the store stamps a part when
      its upload starts (SeaweedFS stamps when it ends); ``2 * s3_call_time <= 2 * L``.

    ``clock_skew`` covers clocks: the sweeping instance compares the store's timestamps
    (whole seconds on SeaweedFS) with its own clock. Every instance must share the
    limits: a sweeper with smaller ones would cut off another's live uploads.
    An upload further back in the budget's line than its head can wait longer; that
    is an overload the memory metrics show (``s3proxy_memory_budget_wait_seconds_total``).
    """
    return 2 * longest_part_interval(s) + clock_skew


def sweep_interval(threshold: float) -> float:
    """Seconds between sweeps by default: a quarter of the threshold, so an orphan goes
    within ``threshold + interval`` of its last sign of life (1.25 x threshold) while a
    sweep, which lists every open upload and the parts of old ones, stays rare."""
    return threshold / 4


class RateMeter:
    """Bytes per second over a sliding window, from (clock, total bytes) samples.

    Pure: the caller supplies the clock (client time for the minimum rate, wall
    time for eviction). Samples older than the window are dropped, so it holds a
    few dozen pairs at most when sampled every 50 ms or more.
    """

    def __init__(self, window: float, start: float = 0.0, total: int = 0) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self.start = start
        self.first = total  # bytes at the start
        self._samples: deque[tuple[float, int]] = deque([(start, total)])

    @property
    def last(self) -> float:
        """The clock of the newest sample (``add`` needs one at least as late)."""
        return self._samples[-1][0]

    def add(self, now: float, total: int) -> None:
        """Record that ``total`` bytes had arrived by ``now`` (never decreasing)."""
        if now < self._samples[-1][0]:
            raise ValueError("the clock went backwards")
        self._samples.append((now, total))
        # Keep the newest sample at or before the window's start: it anchors the rate.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self, now: float) -> float | None:
        """Bytes per second over the last window, or None while less than one window
        has passed since ``start`` (too early to judge)."""
        if now - self.start < self.window:
            return None
        t0, b0 = self._samples[0]
        for t, b in self._samples:  # the newest sample at or before now - window
            if t > now - self.window:
                break
            t0, b0 = t, b
        total = self._samples[-1][1]
        return (total - b0) / max(now - t0, self.window)

    def too_slow(self, now: float, min_rate: float) -> bool:
        """Has a full window passed with fewer than ``min_rate`` bytes per second?"""
        rate = self.rate(now)
        return rate is not None and rate < min_rate
