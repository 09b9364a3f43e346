"""S3 helpers shared by the harness and the comparison designs.

The comparison designs all upload through ``multipart_upload`` with the same part size and
parts in flight as s3proxy, so what differs between them is only how they hold the body.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

MIN_PART = 5 << 20  # S3: every part but the last is at least 5 MiB


def design_flags(description: str | None) -> argparse.ArgumentParser:
    """The S3 flags every Python design takes (bench.designs.argv passes them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--endpoint-url", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--part-size", type=int, default=8 << 20)
    p.add_argument("--parts-in-flight", type=int, default=2)
    p.add_argument("--sign-payload", action="store_true", help="sha256-sign each part")
    return p


def config(pool: int = 64, sign_payload: bool = False) -> AioConfig:
    """Botocore settings that S3-compatible stores accept (no default CRC checksums).

    ``sign_payload`` is set explicitly, as s3proxy sets it: left unset, botocore sha256-hashes
    every part over plain HTTP (and sends UNSIGNED-PAYLOAD over HTTPS), so on a loopback
    endpoint the comparison designs would pay a hash pass that s3proxy does not.
    """
    return AioConfig(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path", "payload_signing_enabled": sign_payload},
        max_pool_connections=pool,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=300,
    )


def client(
    endpoint_url: str,
    region: str,
    access_key: str | None = None,
    secret_key: str | None = None,
    pool: int = 64,
    sign_payload: bool = False,
) -> Any:
    """An aiobotocore S3 client context manager; no keys: the AWS chain (env vars) decides."""
    return get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config(pool, sign_payload),
    )


async def multipart_upload(
    s3: Any,
    bucket: str,
    key: str,
    parts: AsyncIterator[bytes],
    parts_in_flight: int,
    content_type: str = "application/octet-stream",
) -> int:
    """Upload ``parts`` (each a full part but the last) as one object; returns its size.

    A body that fits in one part goes up with PutObject. Any failure aborts the upload.
    """
    first = await anext(parts, b"")
    second = await anext(parts, None)
    if second is None:
        await s3.put_object(Bucket=bucket, Key=key, Body=bytes(first), ContentType=content_type)
        return len(first)
    created = await s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type)
    upload_id = created["UploadId"]
    slots = asyncio.Semaphore(parts_in_flight)
    tasks: list[asyncio.Task[dict[str, Any]]] = []
    size = 0

    async def send(number: int, body: bytes) -> dict[str, Any]:
        try:
            r = await s3.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
            return {"PartNumber": number, "ETag": r["ETag"]}
        finally:
            slots.release()

    # Hand the first two parts over without keeping them referenced here: a part must be
    # freed as soon as its UploadPart returns, or memory grows by two parts per upload.
    head = [first, second]
    del first, second

    async def all_parts() -> AsyncIterator[bytes]:
        while head:
            yield head.pop(0)
        async for p in parts:
            yield p

    try:
        number = 0
        async for body in all_parts():
            await slots.acquire()
            number += 1
            size += len(body)
            tasks.append(asyncio.create_task(send(number, bytes(body))))
            del body
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        done = await asyncio.gather(*tasks)
        await s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": list(done)}
        )
        return size
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.shield(
                asyncio.wait_for(
                    s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id), 30
                )
            )
        raise


async def rechunk(
    chunks: AsyncIterator[bytes] | Iterable[bytes | memoryview], part_size: int
) -> AsyncIterator[bytes]:
    """Group a stream of chunks into parts of ``part_size`` bytes (the last may be short)."""
    buf = bytearray()

    async def source() -> AsyncIterator[bytes | memoryview]:
        if isinstance(chunks, AsyncIterator):
            async for a in chunks:
                yield a
        else:
            for c in chunks:
                yield c

    async for c in source():
        buf += c
        while len(buf) >= part_size:
            with memoryview(buf) as view:
                part = bytes(view[:part_size])  # one copy, not two
            del buf[:part_size]
            yield part
            del part
    if buf:
        yield bytes(buf)


@dataclass
class Check:
    key: str
    ok: bool
    size: int
    sha256: str
    error: str = ""


async def verify(s3: Any, bucket: str, key: str, size: int, sha256: str) -> Check:
    """Read the object back and compare its size and sha256 to the generated body's."""
    try:
        r = await s3.get_object(Bucket=bucket, Key=key)
        h = hashlib.sha256()
        n = 0
        async with r["Body"] as stream:
            while chunk := await stream.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        got = h.hexdigest()
        ok = n == size and got == sha256
        return Check(key, ok, n, got, "" if ok else f"size {n} sha256 {got[:12]}")
    except Exception as e:
        return Check(key, False, 0, "", f"{type(e).__name__}: {e}")


async def delete_keys(s3: Any, bucket: str, keys: Iterable[str]) -> None:
    keys = list(keys)
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
        batch = [{"Key": k} for k in keys[i : i + 1000]]
        await s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


async def list_keys(s3: Any, bucket: str) -> list[str]:
    out: list[str] = []
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket):
        out.extend(o["Key"] for o in page.get("Contents", []))
    return out


async def abort_open_uploads(s3: Any, bucket: str) -> int:
    """Abort every open multipart upload; returns how many there were (should be 0)."""
    n = 0
    r = await s3.list_multipart_uploads(Bucket=bucket)
    for u in r.get("Uploads", []):
        n += 1
        with contextlib.suppress(Exception):
            await s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    return n
