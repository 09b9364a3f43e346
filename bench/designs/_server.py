"""What the naive comparison servers share: flags, the S3 client, /healthz, the JSON reply.

Each naive design only supplies how it turns a request into (filename, parts); the upload
itself goes through the same ``multipart_upload`` as the direct design.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from bench import s3util

S3 = web.AppKey("s3", Any)
ARGS = web.AppKey("args", argparse.Namespace)

# (request, args) -> list of (field, filename, parts) after the design has done its buffering
Receive = Callable[
    [web.Request, argparse.Namespace], Awaitable[list[tuple[str, str, AsyncIterator[bytes]]]]
]


def parse_args(description: str) -> argparse.Namespace:
    p = s3util.design_flags(description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    return p.parse_args()


def run(design: str, receive: Receive, description: str) -> None:
    """Serve POST /upload and GET /healthz until SIGTERM."""
    args = parse_args(description)

    async def s3_ctx(app: web.Application) -> AsyncIterator[None]:
        async with s3util.client(
            args.endpoint_url,
            args.region,
            sign_payload=args.sign_payload,
        ) as s3:
            app[S3] = s3
            yield

    async def upload(request: web.Request) -> web.Response:
        files = []
        for name, filename, parts in await receive(request, args):
            key = f"bench/{design}/{uuid.uuid4().hex}/{filename}"
            size = await s3util.multipart_upload(
                request.app[S3], args.bucket, key, parts, args.parts_in_flight
            )
            files.append({"field": name, "filename": filename, "key": key, "size": size})
        return web.json_response({"files": files, "fields": {}}, status=201)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    # aiohttp refuses bodies over 1 MiB by default; the tutorials raise the limit like this.
    app = web.Application(client_max_size=1 << 40)
    app[ARGS] = args
    app.cleanup_ctx.append(s3_ctx)
    app.router.add_post("/upload", upload)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
