"""What a load test records and what it adds up to: pure functions over request records.

``RequestRecord`` is one upload as the client saw it (times relative to the run's start);
``LoadResult`` is the run: every record plus the counts a test asserts on (ok, failed by
status and code, retried-then-ok, lost and partial objects) and the figures a person reads
(throughput, p50/p95/p99). ``summarize`` makes a ``LoadResult`` from records; nothing here
does I/O, so it is tested with tables.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Outcomes of --verify for one 201 (bench.load_verify.classify).
VERIFIED = "ok"
LOST = "lost"  # no object under the key the 201 named
PARTIAL = "partial"  # an object, of another size
MISMATCH = "mismatch"  # the right size, but no sha256 stored or another one
VERIFY_ERROR = "error"  # the check itself failed (S3 unreachable, access denied)


@dataclass
class RequestRecord:
    """One upload: first attempt's start to last attempt's end, in seconds from the run's start."""

    n: int  # upload number (its body and size follow from it and the seed)
    size: int  # file bytes
    start: float
    end: float = 0.0
    status: int = 0  # HTTP status of the last attempt; 0: no answer (see ``code``)
    code: str = ""  # the error code from the JSON answer, or the transport failure's
    key: str = ""  # the key a 201 named
    sha256: str = ""  # of the bytes sent (set once the whole body was generated)
    retries: int = 0  # attempts after the first
    retried_on: list[str] = field(default_factory=list)  # why: each retried answer's error_key
    error: str = ""  # a short message for a failure
    request_id: str = ""  # X-Request-ID sent with the last attempt (in the proxy's log)
    verify: str = ""  # outcome of --verify: ok, lost, partial, mismatch, error; "" unchecked

    @property
    def ok(self) -> bool:
        return self.status == 201 and not self.code

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def error_key(self) -> str:
        """How failures are grouped: ``503 OVERLOADED``, ``0 CONNECTION_REFUSED``."""
        return f"{self.status} {self.code or 'HTTP_' + str(self.status)}"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default); NaN if empty."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile out of range: {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def throughput_series(records: Sequence[RequestRecord], bin_s: float = 1.0) -> list[float]:
    """MB/s (10^6 bytes) of successful uploads per ``bin_s`` from the start.

    Each upload's bytes are spread evenly over its own duration, so a 200 MiB upload shows
    as the rate it was sent at, not as one spike at its end.
    """
    done = [r for r in records if r.ok]
    if not done:
        return []
    bins = [0.0] * max(1, math.ceil(max(r.end for r in done) / bin_s))
    for r in done:
        span = max(r.end - r.start, 1e-9)
        # the last bin ends at the last end: an end on its boundary belongs to it
        last = min(int(r.end // bin_s), len(bins) - 1)
        first = min(int(r.start // bin_s), last)
        for b in range(first, last + 1):
            overlap = min(r.end, (b + 1) * bin_s) - max(r.start, b * bin_s)
            bins[b] += r.size * max(overlap, 0.0) / span
        if r.end <= r.start:  # zero-length: all in its bin
            bins[first] += r.size
    return [b / bin_s / 1e6 for b in bins]


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def latency_summary(latencies: Sequence[float]) -> dict[str, float | None]:
    """count, p50, p95, p99 and max of some latencies (None where there are none)."""
    return {
        "count": len(latencies),
        "p50": _round(percentile(latencies, 50)),
        "p95": _round(percentile(latencies, 95)),
        "p99": _round(percentile(latencies, 99)),
        "max": _round(max(latencies, default=math.nan)),
    }


@dataclass
class LoadResult:
    """A finished load test: the counts, the figures, and every request."""

    config: dict[str, Any]
    started_at: str  # ISO 8601, UTC
    wall_s: float  # first request's start to the last one's end
    records: list[RequestRecord]
    dropped: int = 0  # open loop: arrivals not sent because the in-flight cap was reached
    ok: int = 0  # 201 with a well-formed answer for our bytes
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "status CODE" -> count
    retries: int = 0  # attempts after the first, over all uploads
    retried_ok: int = 0  # uploads that succeeded after at least one retry
    retries_by: dict[str, int] = field(default_factory=dict)  # "status CODE" -> retries
    bytes_ok: int = 0
    throughput_mbps: float = 0.0  # bytes_ok / 10^6 / wall_s
    uploads_per_s: float = 0.0  # ok / wall_s
    latency_s: dict[str, float | None] = field(default_factory=dict)  # p50/p95/p99/max of ok
    # the same per file size ("1048576" -> {"count", "p50", ...}): a mix of 1 MiB and
    # 200 MiB files has one p99 that describes neither
    by_size: dict[str, dict[str, float | None]] = field(default_factory=dict)
    client_cpu_s: float = 0.0  # CPU time of the process that ran the load (it competes too)
    verified: int = 0  # 201s whose object has the right size and sha256
    lost: int = 0  # 201s with no object
    partial: int = 0  # 201s whose object has another size
    mismatched: int = 0  # right size, wrong or no sha256
    verify_errors: int = 0
    deleted: int = 0  # objects removed by --cleanup

    @property
    def clean(self) -> bool:
        """No failed upload, and (if verified) no 201 without exactly its bytes in S3."""
        return not (self.failed or self.lost or self.partial or self.mismatched) and not (
            self.verify_errors
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["records"] = [asdict(r) for r in self.records]
        return d


def summarize(
    config: dict[str, Any],
    started_at: str,
    records: Sequence[RequestRecord],
    dropped: int = 0,
    deleted: int = 0,
    client_cpu_s: float = 0.0,
) -> LoadResult:
    """Add the records up. Latency percentiles are of successful uploads only."""
    recs = sorted(records, key=lambda r: (r.start, r.n))
    ok = [r for r in recs if r.ok]
    wall = max((r.end for r in recs), default=0.0) - min((r.start for r in recs), default=0.0)
    latencies = [r.latency for r in ok]
    verdicts = Counter(r.verify for r in ok)
    bytes_ok = sum(r.size for r in ok)
    return LoadResult(
        config=config,
        started_at=started_at,
        wall_s=round(wall, 6),
        records=recs,
        dropped=dropped,
        ok=len(ok),
        failed=len(recs) - len(ok),
        errors=dict(Counter(r.error_key for r in recs if not r.ok).most_common()),
        retries=sum(r.retries for r in recs),
        retried_ok=sum(1 for r in ok if r.retries),
        retries_by=dict(Counter(k for r in recs for k in r.retried_on).most_common()),
        bytes_ok=bytes_ok,
        throughput_mbps=round(bytes_ok / 1e6 / wall, 3) if wall > 0 else 0.0,
        uploads_per_s=round(len(ok) / wall, 3) if wall > 0 else 0.0,
        latency_s=latency_summary(latencies),
        by_size={
            str(size): latency_summary([r.latency for r in ok if r.size == size])
            for size in sorted({r.size for r in recs})
        },
        client_cpu_s=round(client_cpu_s, 3),
        verified=verdicts[VERIFIED],
        lost=verdicts[LOST],
        partial=verdicts[PARTIAL],
        mismatched=verdicts[MISMATCH],
        verify_errors=verdicts[VERIFY_ERROR],
        deleted=deleted,
    )
