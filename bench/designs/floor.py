"""Comparison design: the floor, the least CPU a proxy that stores a form's file can spend.

What any such proxy must do with every byte: receive it from the client, hash it (s3proxy
reports each file's sha256) and send it to S3. This design does only that, the way the
machine does it cheapest: blocking plain sockets, one thread per connection, ``recv_into``
a reused 256 KiB buffer (s3proxy's ``--read-buffer``), ``hashlib.sha256`` over the same
memory, ``sendall`` of it to S3, no copy in between. Everything s3proxy spends above this
(multipart parsing, part buffering, the event loop, botocore, its CRC) is the overhead a
faster s3proxy could remove; the bench reports every design as a ratio of it.

Why it stores the file and not the raw body: the harness reads every stored object back
and compares it with the generated file, and the store's work stays the same as for the
other designs. The framing is not parsed, only skipped: the file starts after the first
blank line of the body (the part's head) and ends ``len(b"\\r\\n--" + boundary + b"--\\r\\n")``
bytes before the body's Content-Length, which is what curl -F and aiohttp send for a form
with one file part. So it serves only that (a Content-Length, one part), and answers 400
to anything else. No byte of the file is searched.

Why one streaming PutObject (signed headers, ``UNSIGNED-PAYLOAD``, no checksum header) and
not a multipart upload: it is the fewest S3 requests and the fewest bytes of protocol per
file; a multipart upload would add requests, not per-byte work. So the floor holds no part
in memory at all (S3 allows one PutObject up to 5 GB, enough for the bench's sizes).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import socket
import threading
import uuid
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.session import get_session

from bench import s3util

READ = 256 * 1024  # s3proxy's --read-buffer
MAX_HEAD = 64 * 1024  # the request's head, and the file part's head
PUT_LIMIT = 5 * 10**9  # S3: one PutObject stores at most 5 GB
_BOUNDARY = re.compile(rb'boundary="?([^";\r\n]+)"?', re.I)
_FILENAME = re.compile(rb'filename="([^"\r\n]*)"', re.I)
UNSIGNED = Config(s3={"payload_signing_enabled": False})


class Floor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        url = urlsplit(args.endpoint_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.base = args.endpoint_url.rstrip("/")
        self.creds = get_session().get_credentials()
        if self.creds is None:
            raise SystemExit("floor: no S3 credentials (AWS_ACCESS_KEY_ID)")

    def signed_put(self, key: str, length: int) -> tuple[str, dict[str, str]]:
        url = f"{self.base}/{self.args.bucket}/{quote(key)}"
        req = AWSRequest(method="PUT", url=url, headers={"Content-Length": str(length)})
        # SigV4 over the headers only: the payload goes as UNSIGNED-PAYLOAD, as s3proxy's
        req.context["client_config"] = UNSIGNED
        S3SigV4Auth(self.creds.get_frozen_credentials(), "s3", self.args.region).add_auth(req)
        return urlsplit(url).path, {k: str(v) for k, v in req.headers.items()}

    def serve(self) -> None:
        lsock = socket.create_server((self.args.host, self.args.port), backlog=1024)
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=self.connection, args=(conn,), daemon=True).start()

    def connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.request(conn)
            except (OSError, ValueError) as e:
                reply(conn, 400, {"error": {"code": "FLOOR", "message": str(e)}})

    def request(self, conn: socket.socket) -> None:
        buf = bytearray(READ)
        view = memoryview(buf)
        pending = bytearray()
        while b"\r\n\r\n" not in pending:
            if len(pending) > MAX_HEAD or not (n := conn.recv_into(view)):
                return
            pending += view[:n]
        end = pending.index(b"\r\n\r\n") + 4
        line, *lines = pending[: end - 4].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        del pending[:end]
        if line.startswith("GET /healthz"):
            return reply(conn, 200, {"status": "ok"})
        if not line.startswith("POST ") or "content-length" not in headers:
            return reply(conn, 400, {"error": {"message": "POST with a Content-Length only"}})
        length = int(headers["content-length"])
        m = _BOUNDARY.search(headers.get("content-type", "").encode("latin-1"))
        if m is None:
            return reply(conn, 400, {"error": {"message": "no multipart boundary"}})
        tail = b"\r\n--" + m.group(1) + b"--\r\n"
        if headers.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while b"\r\n\r\n" not in pending:  # the file part's head
            if len(pending) > MAX_HEAD or not (n := conn.recv_into(view)):
                raise ValueError("no file part head")
            pending += view[:n]
        part_end = pending.index(b"\r\n\r\n") + 4
        fm = _FILENAME.search(pending[:part_end])
        filename = fm.group(1).decode("utf-8", "replace") if fm and fm.group(1) else "upload"
        del pending[:part_end]
        size = length - part_end - len(tail)
        if not 0 <= size <= PUT_LIMIT:
            raise ValueError(f"file of {size} bytes")
        key = f"bench/floor/{uuid.uuid4().hex}/{filename}"
        sha = self.relay(conn, view, bytes(pending), size, key)
        got = bytes(pending[size:])
        while len(got) < len(tail) and (n := conn.recv_into(view, len(tail) - len(got))):
            got += view[:n]
        if got != tail:
            raise ValueError("the body does not end with the closing boundary")
        file = {"field": "file", "filename": filename, "key": key, "size": size, "sha256": sha}
        reply(conn, 201, {"files": [file], "fields": {}})

    def relay(
        self, conn: socket.socket, view: memoryview, first: bytes, size: int, key: str
    ) -> str:
        """Stream ``size`` bytes (``first`` already received) from the client into S3."""
        path, headers = self.signed_put(key, size)
        s3 = http.client.HTTPConnection(self.host, self.port, timeout=300)
        try:
            s3.putrequest("PUT", path, skip_accept_encoding=True)
            for k, v in headers.items():
                s3.putheader(k, v)
            s3.endheaders()
            digest = hashlib.sha256()
            head = memoryview(first)[:size]
            digest.update(head)
            s3.sock.sendall(head)
            left = size - len(head)
            while left:
                n = conn.recv_into(view, min(READ, left))
                if not n:
                    raise ValueError("the client went away")
                digest.update(view[:n])
                s3.sock.sendall(view[:n])
                left -= n
            r = s3.getresponse()
            answer = r.read()
            if r.status != 200:
                raise ValueError(f"S3 answered {r.status}: {answer[:200]!r}")
            return digest.hexdigest()
        finally:
            s3.close()


def reply(conn: socket.socket, status: int, data: dict[str, object]) -> None:
    body = json.dumps(data).encode()
    reason = {200: "OK", 201: "Created", 400: "Bad Request"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    conn.sendall(head.encode() + body)


def main() -> None:
    p = s3util.design_flags(__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    Floor(p.parse_args()).serve()


if __name__ == "__main__":
    main()
