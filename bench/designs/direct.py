"""Comparison design: the same bytes straight to S3 with aiobotocore multipart, no proxy.

This is the ceiling a proxy can approach: same part size, same parts in flight, no HTTP hop
in between. It runs as its own process so its CPU and memory are measured like a server's.
Protocol on stdin/stdout, one JSON object per line: it prints ``{"ready": true}``, then for
each job ``{"count", "concurrency", "size", "seed", "prefix", "body"}`` (``count``
uploads, ``concurrency`` at a time) it answers ``{"uploads": [...]}``; EOF ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from bench import body, s3util


async def _one(s3: Any, args: argparse.Namespace, job: dict[str, Any], i: int) -> dict[str, Any]:
    key = f"{job['prefix']}{i}.bin"
    t0 = time.perf_counter()
    try:
        parts: AsyncIterator[bytes] = s3util.rechunk(
            body.chunks(job["seed"], job["size"], job.get("body", "random")), args.part_size
        )
        size = await s3util.multipart_upload(s3, args.bucket, key, parts, args.parts_in_flight)
        return {"ok": True, "key": key, "size": size, "latency": time.perf_counter() - t0}
    except Exception as e:
        return {
            "ok": False,
            "key": key,
            "size": 0,
            "latency": time.perf_counter() - t0,
            "error": f"{type(e).__name__}: {e}",
        }


async def _job(s3: Any, args: argparse.Namespace, job: dict[str, Any]) -> list[dict[str, Any]]:
    """``count`` uploads, ``concurrency`` at a time (all at once by default)."""
    slots = asyncio.Semaphore(job.get("concurrency") or job["count"])

    async def one(i: int) -> dict[str, Any]:
        async with slots:
            return await _one(s3, args, job, i)

    return list(await asyncio.gather(*(one(i) for i in range(job["count"]))))


async def _warm_up(s3: Any, bucket: str) -> None:
    """Make the calls once so botocore's lazy setup is not charged to the cell.

    The harness gives each server the same treatment with one upload before measuring.
    """
    key = "bench/direct/warm-up"
    r = await s3.create_multipart_upload(Bucket=bucket, Key=key)
    await s3.upload_part(Bucket=bucket, Key=key, UploadId=r["UploadId"], PartNumber=1, Body=b"x")
    await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=r["UploadId"])


async def main() -> None:
    args = s3util.design_flags(__doc__).parse_args()
    loop = asyncio.get_running_loop()
    async with s3util.client(
        args.endpoint_url,
        args.region,
        sign_payload=args.sign_payload,
    ) as s3:
        await _warm_up(s3, args.bucket)
        print(json.dumps({"ready": True}), flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            uploads = await _job(s3, args, json.loads(line))
            print(json.dumps({"uploads": uploads}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
