"""``python -m bench.checksum_cost``: CPU seconds per GiB of each checksum the proxy could run.

The integrity feature (issue #12) adds one checksum pass over every byte the proxy relays, on
top of the sha256 it already computes; the budget for the added pass is 0.15 CPU s/GiB. This
measures, on this machine, each candidate as the pipeline would run it: a running value updated
chunk by chunk (256 KiB chunks, as ``read_chunk`` hands them over, and 64 KiB), over data that is
already in memory. CPU time is ``time.process_time`` (this process only), so other load on a
shared machine inflates the figures little; the best of ``--repeat`` runs is reported, since
interference only ever adds time.

It also measures what a full-object checksum costs at Complete: combining part CRCs
(``crc(A+B)`` from ``crc(A)``, ``crc(B)``, ``len(B)``), per call and per GiB at 8 MiB parts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# The proxy's sha256 and the sha256 SigV4 computes over a signed payload; sha1/md5 are the
# other per-part checksums S3 accepts (md5 as Content-MD5), sha512 what RFC 9530 clients send.
HASHLIB = ("sha256", "sha1", "md5", "sha512")

Update = Callable[[bytes], None]


@dataclass(frozen=True)
class Candidate:
    """A checksum as the pipeline would run it: fresh state, then one update per chunk."""

    name: str
    package: str
    start: Callable[[], Update]


def _running(fn: Callable[[bytes, int], int]) -> Callable[[], Update]:
    """A running CRC from a ``fn(data, previous) -> int`` function, as awscrt and zlib offer."""

    def start() -> Update:
        value = 0

        def update(chunk: bytes) -> None:
            nonlocal value
            value = fn(chunk, value)

        return update

    return start


def _hashlib(name: str) -> Callable[[], Update]:
    def start() -> Update:
        return hashlib.new(name).update

    return start


def candidates() -> list[Candidate]:
    """Every checksum importable here; a missing optional package is skipped, not an error."""
    found = [Candidate("crc32", f"zlib {zlib.ZLIB_RUNTIME_VERSION}", _running(zlib.crc32))]
    try:
        import awscrt
        from awscrt import checksums
    except ImportError:
        pass
    else:
        version = f"awscrt {awscrt.__version__}"
        found += [
            Candidate("crc64nvme", version, _running(checksums.crc64nvme)),
            Candidate("crc32c", version, _running(checksums.crc32c)),
            Candidate("crc32", version, _running(checksums.crc32)),
        ]
    try:
        import google_crc32c
    except ImportError:
        pass
    else:
        impl = getattr(google_crc32c, "implementation", "?")
        found.append(
            Candidate(
                "crc32c",
                f"google-crc32c ({impl})",
                _running(lambda chunk, crc: google_crc32c.extend(crc, chunk)),
            )
        )
    found += [Candidate(name, "hashlib", _hashlib(name)) for name in HASHLIB]
    return found


def sliced(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into ``size``-byte ``bytes`` objects, as aiohttp's ``read_chunk`` hands them
    over (bytes, not memoryviews: google-crc32c accepts only read-only bytes)."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def cpu_s_per_gib(candidate: Candidate, pieces: list[bytes], total: int, repeat: int) -> float:
    """Best-of-``repeat`` CPU seconds to checksum ``total`` bytes of ``pieces``, per GiB."""
    per_pass = sum(len(p) for p in pieces)
    passes = max(1, total // per_pass)
    best = float("inf")
    for _ in range(repeat):
        update = candidate.start()
        t0 = time.process_time()
        for _ in range(passes):
            for piece in pieces:
                update(piece)
        best = min(best, time.process_time() - t0)
    return best * GIB / (passes * per_pass)


def _with_sha256(candidate: Candidate) -> Candidate:
    """``candidate`` run after a sha256 update on the same chunk, as the pipeline would run it."""

    def start() -> Update:
        sha = hashlib.sha256().update
        crc = candidate.start()

        def update(chunk: bytes) -> None:
            sha(chunk)
            crc(chunk)

        return update

    return Candidate(f"sha256+{candidate.name}", candidate.package, start)


def marginal_cost(
    candidate: Candidate, pieces: list[bytes], total: int, repeat: int
) -> tuple[float, float]:
    """(sha256 alone, sha256 then ``candidate``) CPU s/GiB, measured in alternation.

    The difference is what the added checksum costs in the pipeline, where each chunk has just
    been hashed and is still in cache; alternating keeps slow spells on a shared machine from
    landing on one side only.
    """
    alone = Candidate("sha256", "hashlib", _hashlib("sha256"))
    both = _with_sha256(candidate)
    base, added = float("inf"), float("inf")
    for _ in range(repeat):
        base = min(base, cpu_s_per_gib(alone, pieces, total, 1))
        added = min(added, cpu_s_per_gib(both, pieces, total, 1))
    return base, added


def combine_cost(calls: int) -> list[tuple[str, float]]:
    """Microseconds per combine call, for each library that has one."""
    try:
        from awscrt import checksums
    except ImportError:
        return []
    out = []
    # A 5 GiB part is the largest S3 allows (S3 multipart limits); lengths matter for the
    # x^(8n) mod P step, so time one realistic and one maximal length.
    for name, fn in (
        ("crc64nvme", checksums.combine_crc64nvme),
        ("crc32c", checksums.combine_crc32c),
        ("crc32", checksums.combine_crc32),
    ):
        for length in (8 * MIB, 5 * GIB):
            t0 = time.process_time()
            for i in range(calls):
                fn(i, i + 1, length)
            out.append(
                (f"{name} len2={length // MIB} MiB", (time.process_time() - t0) / calls * 1e6)
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.checksum_cost", description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="bytes per run, in MiB (256)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; best is kept (3)")
    parser.add_argument(
        "--chunks", default="256,64", help="chunk sizes in KiB, comma-separated (256,64)"
    )
    args = parser.parse_args(argv)
    total = args.mib * MIB
    sizes = [int(s) * KIB for s in args.chunks.split(",")]
    # 64 MiB of random bytes: larger than any cache, so every pass reads memory as a relay would.
    data = os.urandom(64 * MIB)

    print(f"# checksum CPU cost on {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"python {platform.python_version()}, {args.mib} MiB per run, best of {args.repeat}\n")
    header = "| algorithm | package | " + " | ".join(f"{s // KIB} KiB chunks" for s in sizes)
    print(header + " |")
    print("| --- | --- |" + " ---: |" * len(sizes))
    cut = {s: sliced(data, s) for s in sizes}
    for cand in candidates():
        cells = [cpu_s_per_gib(cand, cut[s], total, args.repeat) for s in sizes]
        print(f"| {cand.name} | {cand.package} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    print("\nCPU s/GiB (lower is better), each chunk read from memory (64 MiB of data)\n")

    size = sizes[0]
    print(
        f"| added to sha256 ({size // KIB} KiB chunks) | package | sha256 | sha256 + it | added |"
    )
    print("| --- | --- | ---: | ---: | ---: |")
    for cand in candidates():
        if cand.package == "hashlib":
            continue
        base, both = marginal_cost(cand, cut[size], total, args.repeat)
        print(f"| {cand.name} | {cand.package} | {base:.3f} | {both:.3f} | {both - base:.3f} |")
    print("\nCPU s/GiB; 'added' is what the checksum costs next to the sha256 the proxy runs\n")

    print("| combine | us/call | s/GiB at 8 MiB parts |")
    print("| --- | ---: | ---: |")
    for label, us in combine_cost(20_000):
        print(f"| {label} | {us:.2f} | {us * 1e-6 * (GIB // (8 * MIB)):.2e} |")


if __name__ == "__main__":
    main()
