"""``python -m bench.sign_cost``: CPU per SigV4 signature, botocore's against ``s3proxy.sigv4``.

Two measures. The signature alone: ``--signatures`` signatures of a lean UploadPart and of a
lean PutObject request, as ``PartSender._signed`` made them with botocore (an ``AWSRequest``
and ``S3SigV4Auth.add_auth``) and as it makes them now. And, with ``--parts N``, whole
UploadParts through ``PartSender`` to a moto server started on loopback (its own process, so
this process's CPU is the sender's only), signed by botocore (``sigv4.sign`` made to decline)
and by ours, alternately. CPU time is ``time.process_time``; the best of ``--repeat`` runs is
kept, since other load on a shared machine only ever adds time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from s3proxy import sigv4
from s3proxy.s3_parts import part_url

CREDENTIALS = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
CONFIG = Config(s3={"payload_signing_enabled": False})
BASE = "http://127.0.0.1:8333/bucket/uploads/2025/report%20final.pdf"
REQUESTS: dict[str, tuple[str, dict[str, str]]] = {
    "UploadPart": (
        part_url(BASE, "2~Zt8mF0xq3Xh+y/Vb5rKcU1oAsT", 17),
        {"x-amz-checksum-crc64nvme": "u3Z0Qh5Rz9E=", "Content-Length": "8388608"},
    ),
    "PutObject": (
        BASE,
        {
            "Content-Type": "application/pdf",
            "Content-Disposition": 'attachment; filename="report final.pdf"',
            "x-amz-meta-owner": "ann",
            "x-amz-checksum-crc64nvme": "u3Z0Qh5Rz9E=",
            "Content-Length": "102400",
        },
    ),
}


def botocore_sign(url: str, headers: Mapping[str, str]) -> dict[str, str]:
    request = AWSRequest("PUT", url, headers=dict(headers))
    request.context["client_config"] = CONFIG
    S3SigV4Auth(CREDENTIALS, "s3", "us-east-1").add_auth(request)
    return dict(request.headers.items())


def ours_sign(keys: sigv4.SigningKeys) -> Callable[[str, Mapping[str, str]], dict[str, str]]:
    def signed(url: str, headers: Mapping[str, str]) -> dict[str, str]:
        out = sigv4.sign(
            "PUT",
            url,
            headers,
            access_key=CREDENTIALS.access_key,
            secret_key=CREDENTIALS.secret_key,
            token=CREDENTIALS.token,
            region="us-east-1",
            now=datetime.now(UTC),
            keys=keys,
        )
        assert out is not None
        return out

    return signed


def per_signature(sign: Callable[[str, Mapping[str, str]], Any], request: str, n: int) -> float:
    """CPU µs per signature of ``request``, over ``n`` signatures."""
    url, headers = REQUESTS[request]
    t0 = time.process_time()
    for _ in range(n):
        sign(url, headers)
    return (time.process_time() - t0) / n * 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def botocore_signs() -> Iterator[None]:
    """``sigv4.sign`` declines every request: ``PartSender`` signs with botocore, as before."""
    sign = sigv4.sign
    sigv4.sign = lambda *args, **kwargs: None
    try:
        yield
    finally:
        sigv4.sign = sign


async def per_upload_part(endpoint: str, parts: int, repeat: int) -> dict[str, float]:
    """CPU ms per UploadPart (1 KiB parts: the call's cost, not the bytes'), best of runs."""
    from s3proxy.s3 import ObjectOptions
    from s3proxy.s3_aiobotocore import ClientOptions, open_store

    opts = ClientOptions(endpoint_url=endpoint, region="us-east-1", access_key="a", secret_key="b")
    best = {"botocore": float("inf"), "sigv4": float("inf")}
    async with open_store(opts, "bench") as store:
        await store._client.create_bucket(Bucket="bench")
        upload_id = await store.create("k.bin", ObjectOptions("application/octet-stream"))
        try:
            for _ in range(repeat):
                for name in best:
                    with botocore_signs() if name == "botocore" else contextlib.nullcontext():
                        t0 = time.process_time()
                        for number in range(1, parts + 1):
                            await store.upload_part("k.bin", upload_id, number, [b"x" * 1024])
                        cpu = (time.process_time() - t0) / parts * 1e3
                    best[name] = min(best[name], cpu)
        finally:
            await store.abort("k.bin", upload_id)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sign_cost", description=__doc__)
    parser.add_argument("--signatures", type=int, default=2000, help="per run (2000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; best is kept (5)")
    parser.add_argument("--parts", type=int, default=0, help="UploadParts per run to moto (0)")
    args = parser.parse_args(argv)
    keys = sigv4.SigningKeys()
    for name, (url, headers) in REQUESTS.items():
        assert ours_sign(keys)(url, headers)["Authorization"]  # and warm the key cache
        theirs = min(
            per_signature(botocore_sign, name, args.signatures) for _ in range(args.repeat)
        )
        mine = min(
            per_signature(ours_sign(keys), name, args.signatures) for _ in range(args.repeat)
        )
        print(f"{name}: botocore {theirs:.1f} µs, sigv4 {mine:.1f} µs per signature")
    if args.parts:
        with moto_server() as endpoint:
            best = asyncio.run(per_upload_part(endpoint, args.parts, args.repeat))
        print(
            f"UploadPart through PartSender ({args.parts} x 1 KiB to moto): "
            f"botocore-signed {best['botocore']:.2f} ms, sigv4-signed {best['sigv4']:.2f} ms CPU"
        )


if __name__ == "__main__":
    main()
