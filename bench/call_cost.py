"""``python -m bench.call_cost``: the proxy's CPU per S3 call, botocore against the lean sender.

Every multipart upload makes CreateMultipartUpload, CompleteMultipartUpload and
PutObjectTagging (the sha256 tag) besides its parts. This makes ``--calls`` of each, one at
a time, through ``AioObjectStore`` as the pipeline calls it (CRC64NVME declared at Create and
sent at Complete, as with ``--checksum auto``), once with ``--lean-upload-part false``
(botocore) and once with it on (``s3proxy.s3_parts``), and reports ``time.process_time``
per call: this process only, so the store's own CPU (SeaweedFS, a process of its own) is not
counted. The best of ``--repeat`` runs is reported, since interference only ever adds time.

With no ``--endpoint-url``, a SeaweedFS (``weed mini``) is started in a temporary directory.
Each Complete lists one part (S3 needs 5 MiB for every part but the last; 200 uploads of
many parts would write gigabytes): botocore's per-part serialization is not in its figure.

UploadPart is measured too, at 64 KiB and at 8 MiB (``--part-calls`` of each, as 256 KiB
chunks the way the pipeline hands them over, CRC64NVME header on): the small part is the
call's fixed cost, the difference per MiB is what sending the bytes costs this process
(the kernel's copy and loopback TCP, charged to the sender), the fixed cost divided by the
part size is what parts add per GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from s3proxy.checksums import Algorithm, Crc, CrcValue
from s3proxy.embedded import EmbeddedConfig, EmbeddedStore
from s3proxy.s3 import ObjectOptions
from s3proxy.s3_aiobotocore import ClientOptions, open_store

OPTIONS = ObjectOptions(
    "application/pdf", 'attachment; filename="report.pdf"', {"owner": "ann", "field": "x"}
)
WARMUP = 5  # calls before measuring: the first opens connections, finds the bucket's URL
CHUNK = 256 * 1024  # the pipeline's chunks: the socket's reads
PART_SIZES = (64 * 1024, 8 * 1024 * 1024)  # UploadPart: its fixed cost, and a bench part
THREE = ("CreateMultipartUpload", "CompleteMultipartUpload", "PutObjectTagging")


@dataclass(frozen=True)
class Target:
    endpoint_url: str
    bucket: str
    region: str
    access_key: str | None
    secret_key: str | None


def _crc(data: bytes) -> CrcValue:
    c = Crc(Algorithm.CRC64NVME)
    c.update(data)
    return c.result()


async def _timed(calls: list[Callable[[], Awaitable[object]]]) -> float:
    """CPU seconds per call, the calls made one after another."""
    start = time.process_time()
    for call in calls:
        await call()
    return (time.process_time() - start) / len(calls)


async def measure(target: Target, lean: bool, calls: int, part_calls: int = 0) -> dict[str, float]:
    """CPU ms per call of the three calls (and of UploadPart at ``PART_SIZES``, with
    ``part_calls``), through a store with the lean path on or off."""
    opts = ClientOptions(
        endpoint_url=target.endpoint_url,
        region=target.region,
        access_key=target.access_key,
        secret_key=target.secret_key,
        lean_parts=lean,
    )
    run = uuid.uuid4().hex[:8]
    data = b"%PDF-1.4 call cost"
    crc = _crc(data)
    async with open_store(opts, target.bucket) as store:
        keys = [f"call-cost/{run}/{i}.pdf" for i in range(calls + WARMUP)]
        ids: dict[str, str] = {}

        def create(key: str) -> Callable[[], Awaitable[object]]:
            async def call() -> None:
                ids[key] = await store.create(key, OPTIONS, checksum=Algorithm.CRC64NVME)

            return call

        await _timed([create(k) for k in keys[:WARMUP]])
        per_create = await _timed([create(k) for k in keys[WARMUP:]])
        etags = {k: await store.upload_part(k, ids[k], 1, [data], checksum=crc) for k in keys}

        def complete(key: str) -> Callable[[], Awaitable[object]]:
            return lambda: store.complete(key, ids[key], [(1, etags[key])], checksums=[crc])

        await _timed([complete(k) for k in keys[:WARMUP]])
        per_complete = await _timed([complete(k) for k in keys[WARMUP:]])

        def tag(key: str) -> Callable[[], Awaitable[object]]:
            return lambda: store.tag(key, {"sha256": "0" * 64})

        await _timed([tag(k) for k in keys[:WARMUP]])
        per_tag = await _timed([tag(k) for k in keys[WARMUP:]])
        for key in keys:
            await store.delete(key)
        per_part: dict[str, float] = {}
        if part_calls:
            key = f"call-cost/{run}/parts.pdf"
            upload_id = await store.create(key, OPTIONS, checksum=Algorithm.CRC64NVME)
            for size in PART_SIZES:
                part = random.randbytes(size)
                chunks = [part[i : i + CHUNK] for i in range(0, size, CHUNK)]
                part_crc = _crc(part)

                def upload(
                    number: int, chunks: list[bytes] = chunks, crc: CrcValue = part_crc
                ) -> Callable[[], Awaitable[object]]:
                    async def call() -> None:
                        await store.upload_part(key, upload_id, number, chunks, checksum=crc)

                    return call

                await _timed([upload(n + 1) for n in range(WARMUP)])
                cost = await _timed([upload(n + 1) for n in range(part_calls)])
                per_part[f"UploadPart {size // 1024} KiB"] = cost * 1000
            await store.abort(key, upload_id)
    return {
        "CreateMultipartUpload": per_create * 1000,
        "CompleteMultipartUpload": per_complete * 1000,
        "PutObjectTagging": per_tag * 1000,
        **per_part,
    }


@contextlib.asynccontextmanager
async def seaweedfs() -> AsyncIterator[Target]:
    with tempfile.TemporaryDirectory(prefix="call-cost-") as tmp:
        store = EmbeddedStore(EmbeddedConfig(data_dir=Path(tmp), s3_port=0))
        await store.start()
        try:
            yield Target(
                store.endpoint_url, store.bucket, store.region, store.access_key, store.secret_key
            )
        finally:
            await store.stop()


async def main_async(args: argparse.Namespace) -> None:
    if args.endpoint_url:
        given = Target(args.endpoint_url, args.bucket, args.region, None, None)
        target_cm: contextlib.AbstractAsyncContextManager[Target] = contextlib.nullcontext(given)
    else:
        target_cm = seaweedfs()
    async with target_cm as target:
        best: dict[bool, dict[str, float]] = {}
        for _ in range(args.repeat):
            for lean in (False, True):
                got = await measure(target, lean, args.calls, args.part_calls)
                prev = best.get(lean, got)
                best[lean] = {op: min(ms, prev[op]) for op, ms in got.items()}
    print(f"CPU ms per call, best of {args.repeat} x {args.calls} calls ({target.endpoint_url})")
    print(f"{'call':<26} {'botocore':>9} {'lean':>9} {'saved':>9}")
    for op, boto in best[False].items():
        lean_ms = best[True][op]
        print(f"{op:<26} {boto:9.2f} {lean_ms:9.2f} {boto - lean_ms:9.2f}")
    boto_total = sum(best[False][op] for op in THREE)
    lean_total = sum(best[True][op] for op in THREE)
    print(
        f"{'per multipart upload':<26} {boto_total:9.2f} {lean_total:9.2f} "
        f"{boto_total - lean_total:9.2f}"
    )
    if args.part_calls:
        small, big = (f"UploadPart {size // 1024} KiB" for size in PART_SIZES)
        mib = (PART_SIZES[1] - PART_SIZES[0]) / 2**20
        for name, path in (("botocore", best[False]), ("lean", best[True])):
            per_mib = (path[big] - path[small]) / mib
            per_gib = path[small] / PART_SIZES[1] * 2**30 / 1000
            print(
                f"UploadPart, {name}: {path[small]:.2f} ms per call, {per_mib:.3f} ms per MiB "
                f"sent; at 8 MiB parts the calls add {per_gib:.3f} CPU s/GiB"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--calls", type=int, default=200, help="calls of each kind per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per path; the best is reported")
    p.add_argument(
        "--part-calls", type=int, default=20, help="UploadPart calls of each size (0: none)"
    )
    p.add_argument(
        "--endpoint-url", help="an S3 endpoint (credentials from AWS_*); none: SeaweedFS"
    )
    p.add_argument("--bucket", default="uploads")
    p.add_argument("--region", default="us-east-1")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
