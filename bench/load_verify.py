"""``--verify``: every upload answered 201 must be in the bucket with exactly its bytes.

s3proxy stores each file's sha256 with it (README, "What is stored with each object"): in
the metadata (``x-amz-meta-sha256``) for files that went up with one PutObject, and as the
object tag ``sha256`` for multipart objects. So one HeadObject (plus GetObjectTagging when
the metadata has none) checks an object's size and hash against what the client generated,
without reading it back. ``classify`` decides; ``verify`` and ``cleanup`` are the thin I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import ClientError

from bench import s3util
from bench.load_stats import LOST, MISMATCH, PARTIAL, VERIFIED, VERIFY_ERROR, RequestRecord

SHA256_META = "sha256"  # x-amz-meta-sha256; botocore returns user metadata without the prefix
SHA256_TAG = "sha256"
DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys (S3 API reference)
CHECKS_IN_FLIGHT = 16


def classify(
    expected_size: int,
    expected_sha256: str,
    size: int | None,
    stored_sha256: str | None,
) -> str:
    """The verdict for one 201: ``size`` None means HeadObject found no object."""
    if size is None:
        return LOST
    if size != expected_size:
        return PARTIAL
    if not stored_sha256 or stored_sha256.lower() != expected_sha256.lower():
        return MISMATCH
    return VERIFIED


def _missing(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


async def _check(s3: Any, bucket: str, record: RequestRecord) -> str:
    try:
        head = await s3.head_object(Bucket=bucket, Key=record.key)
    except ClientError as exc:
        return LOST if _missing(exc) else VERIFY_ERROR
    stored = (head.get("Metadata") or {}).get(SHA256_META)
    if stored is None:
        tags = await s3.get_object_tagging(Bucket=bucket, Key=record.key)
        stored = next((t["Value"] for t in tags.get("TagSet", []) if t["Key"] == SHA256_TAG), None)
    return classify(record.size, record.sha256, int(head["ContentLength"]), stored)


async def verify(records: Sequence[RequestRecord], endpoint: str, bucket: str, region: str) -> None:
    """Set ``verify`` on every successful record (credentials: the AWS chain, e.g. env)."""
    todo = [r for r in records if r.ok]
    slots = asyncio.Semaphore(CHECKS_IN_FLIGHT)
    async with s3util.client(endpoint, region, pool=CHECKS_IN_FLIGHT) as s3:

        async def one(record: RequestRecord) -> None:
            async with slots:
                try:
                    record.verify = await _check(s3, bucket, record)
                except Exception as exc:  # reported per object, never a crash of the report
                    record.verify = VERIFY_ERROR
                    record.error = f"verify: {type(exc).__name__}: {exc}"[:300]

        await asyncio.gather(*(one(r) for r in todo))


async def cleanup(records: Sequence[RequestRecord], endpoint: str, bucket: str, region: str) -> int:
    """Delete the objects that verified; the others stay for a look. Returns how many went."""
    keys = [r.key for r in records if r.verify == VERIFIED]
    deleted = 0
    async with s3util.client(endpoint, region) as s3:
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i : i + DELETE_BATCH]
            resp = await s3.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            deleted += len(batch) - len(resp.get("Errors", []))
    return deleted
