"""``python -m bench.part_trailer``: can the store take a part sent while it fills?

Sending each part as its bytes arrive (instead of holding it whole first) needs what S3
offers for that: ``aws-chunked`` with ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``, the part's
CRC in a trailer after its bytes (its size is known: every part but the last is
``--part-size``). It also needs a cut part request (the file ended short) to leave
nothing behind. This asks the store, for a CRC64NVME FULL_OBJECT multipart upload:

- a part sent aws-chunked with the right CRC trailer, then with a wrong one;
- the same with the CRC in a header, and with no part CRC at all (does Complete still
  verify the whole-object CRC?);
- a part request cut after 1 of its 5 MiB, plain and aws-chunked: is any part listed?

With no ``--endpoint-url``, a SeaweedFS (``weed mini``) is started in a temporary
directory. Whether the design pays is ``python -m bench.hold_cost``'s question.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import botocore.session
from awscrt import checksums
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from s3proxy.embedded import EmbeddedConfig, EmbeddedStore

MiB = 2**20
TRAILER = "x-amz-checksum-crc64nvme"


def crc_b64(data: bytes, previous: int = 0) -> str:
    return base64.b64encode(checksums.crc64nvme(data, previous).to_bytes(8, "big")).decode()


def aws_chunked(data: bytes, trailer: str, piece: int = 256 * 1024) -> bytes:
    """``data`` framed as aws-chunked: hex-length chunks, then the trailer line."""
    framed = bytearray()
    for at in range(0, len(data), piece):
        chunk = data[at : at + piece]
        framed += b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    return bytes(framed + b"0\r\n" + trailer.encode() + b"\r\n\r\n")


class Store:
    """Signed raw requests and a botocore client against one bucket."""

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str) -> None:
        self.endpoint, self.bucket = endpoint, bucket
        self.creds = Credentials(access_key, secret_key)
        self.client: Any = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
        )

    def signed(self, url: str, headers: Mapping[str, str], trailer: bool) -> dict[str, str]:
        request = AWSRequest(method="PUT", url=url, headers=dict(headers), data=b"")
        if trailer:  # botocore then signs STREAMING-UNSIGNED-PAYLOAD-TRAILER
            request.context["checksum"] = {
                "request_algorithm": {"in": "trailer", "algorithm": "crc64nvme", "name": TRAILER}
            }
        else:
            request.headers["X-Amz-Content-SHA256"] = "UNSIGNED-PAYLOAD"
        S3SigV4Auth(self.creds, "s3", "us-east-1").add_auth(request)
        return dict(request.headers.items())

    def put_part(
        self, key: str, upload_id: str, number: int, data: bytes, how: str, wrong: bool
    ) -> tuple[int, str | None]:
        """UploadPart ``how`` = trailer | header | none; the status and the ETag."""
        crc = crc_b64(data + b"x" if wrong else data)
        body, headers = data, {"Content-Length": str(len(data))}
        if how == "trailer":
            body = aws_chunked(data, f"{TRAILER}:{crc}")
            headers = {
                "Content-Encoding": "aws-chunked",
                "X-Amz-Trailer": TRAILER,
                "X-Amz-Decoded-Content-Length": str(len(data)),
                "Content-Length": str(len(body)),
            }
        elif how == "header":
            headers[TRAILER] = crc
        url = f"{self.endpoint}/{self.bucket}/{key}?partNumber={number}&uploadId={upload_id}"
        return self._send(url, self.signed(url, headers, how == "trailer"), body)

    def _send(self, url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, str | None]:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
        try:
            conn.request("PUT", f"{parts.path}?{parts.query}", body=body, headers=dict(headers))
            answer = conn.getresponse()
            answer.read()
            return answer.status, answer.getheader("ETag")
        finally:
            conn.close()

    def create(self, key: str) -> str:
        made = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC64NVME", ChecksumType="FULL_OBJECT"
        )
        return str(made["UploadId"])

    def upload(self, how: str, wrong_part: bool = False, wrong_whole: bool = False) -> str:
        """One two-part upload; what the store answered, in a few words."""
        key = f"part-trailer/{how}-{wrong_part}-{wrong_whole}"
        upload_id = self.create(key)
        first, last = os.urandom(5 * MiB), os.urandom(1000)
        parts = []
        for number, data in ((1, first), (2, last)):
            status, etag = self.put_part(
                key, upload_id, number, data, how, wrong_part and number == 1
            )
            if status != 200:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                return f"part {number} refused {status}"
            parts.append({"PartNumber": number, "ETag": etag})
        whole = crc_b64(b"not it") if wrong_whole else crc_b64(last, checksums.crc64nvme(first))
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                ChecksumCRC64NVME=whole,
                ChecksumType="FULL_OBJECT",
            )
        except self.client.exceptions.ClientError as exc:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            return f"Complete refused {exc.response['Error']['Code']}"
        stored = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        self.client.delete_object(Bucket=self.bucket, Key=key)
        return "stored, bytes equal" if stored == first + last else "STORED BYTES DIFFER"

    def cut(self, how: str) -> str:
        """A 5 MiB part request closed after 1 MiB: the parts the store then lists."""
        key = f"part-trailer/cut-{how}"
        upload_id = self.create(key)
        url = f"{self.endpoint}/{self.bucket}/{key}?partNumber=1&uploadId={upload_id}"
        headers = {"Content-Length": str(5 * MiB)}
        if how == "trailer":
            headers = {
                "Content-Encoding": "aws-chunked",
                "X-Amz-Trailer": TRAILER,
                "X-Amz-Decoded-Content-Length": str(5 * MiB),
                "Content-Length": str(5 * MiB + 1000),
            }
        signed = self.signed(url, headers, how == "trailer")
        parts = urlsplit(url)
        head = f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in signed.items()) + "\r\n"
        data = os.urandom(MiB)
        with socket.create_connection((parts.hostname or "", parts.port or 80)) as sock:
            sock.sendall(head.encode())
            sock.sendall(b"%x\r\n" % len(data) + data + b"\r\n" if how == "trailer" else data)
            time.sleep(0.5)
        time.sleep(2)
        listed = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id)
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        return f"parts listed: {[(p['PartNumber'], p['Size']) for p in listed.get('Parts', [])]}"


def report(store: Store) -> None:
    for how in ("trailer", "header", "none"):
        print(f"part CRC {how:<7}  right: {store.upload(how)}")
        print(f"part CRC {how:<7}  wrong part CRC: {store.upload(how, wrong_part=True)}")
        print(f"part CRC {how:<7}  wrong whole CRC: {store.upload(how, wrong_whole=True)}")
    for how in ("plain", "trailer"):
        print(f"cut after 1 of 5 MiB, {how}: {store.cut(how)}")


async def _embedded() -> None:
    with tempfile.TemporaryDirectory(prefix="part-trailer-") as tmp:
        embedded = EmbeddedStore(EmbeddedConfig(data_dir=Path(tmp), s3_port=0))
        await embedded.start()
        try:
            store = Store(
                embedded.endpoint_url, embedded.bucket, embedded.access_key, embedded.secret_key
            )
            await asyncio.to_thread(report, store)
        finally:
            await embedded.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--endpoint-url", help="an S3 endpoint (default: a SeaweedFS started here)")
    p.add_argument("--bucket", default="uploads")
    p.add_argument("--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID", "test"))
    p.add_argument("--secret-key", default=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"))
    args = p.parse_args()
    if args.endpoint_url:
        report(Store(args.endpoint_url, args.bucket, args.access_key, args.secret_key))
    else:
        asyncio.run(_embedded())


if __name__ == "__main__":
    main()
