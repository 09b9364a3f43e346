"""CORS for browser uploads and downloads from other origins (``--cors-origin``).

Preflights are answered by a middleware; every other response is marked in the
app's ``on_response_prepare`` signal, which aiohttp fires just before the headers go
out, so a streamed download (prepared by its handler, long before a middleware gets
the response back) carries them too. No cookies are involved (credentials travel as
Bearer tokens), so Allow-Credentials is never sent.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from s3proxy.errors import ORIGIN_NOT_ALLOWED, ProxyError, error_response

# Every request header the proxy reads that is not CORS-safelisted (Fetch standard,
# "CORS-safelisted request-header"): without it in the preflight's answer the browser
# never sends the request.
ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Request-ID, X-Upload-Token, "
    # downloads: ranges and conditional requests (s3proxy.downloads)
    "Range, If-None-Match, If-Match, If-Modified-Since, If-Unmodified-Since, If-Range, "
    # a gzip- or deflate-coded body (s3proxy.codings)
    "Content-Encoding, "
    # tus 1.0.0 with the extensions tus_protocol.EXTENSIONS lists (no concatenation)
    "Tus-Resumable, Upload-Length, Upload-Offset, Upload-Metadata, Upload-Checksum, "
    "Upload-Defer-Length, X-HTTP-Method-Override"
)
ALLOW_METHODS = "GET, HEAD, POST, PATCH, DELETE, OPTIONS"
MAX_AGE = "600"
# What scripts on the page may read, beyond the safelisted response headers (Content-Type,
# Content-Length, Last-Modified, Cache-Control...): every header the README tells a
# client to read.
EXPOSE_HEADERS = (
    "X-Request-ID, Retry-After, "
    # downloads
    "ETag, Content-Range, Content-Disposition, Accept-Ranges, Repr-Digest, "
    # what tus clients read (tus-js-client: Location, Upload-Offset; the rest for progress)
    "Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm, "
    "Upload-Offset, Upload-Length, Upload-Defer-Length, Upload-Expires, Location, "
    # the stored object of a finished tus upload
    "S3Proxy-Key, S3Proxy-Sha256"
)


class Cors:
    """The allowed origins, the preflight middleware and the response marker."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.origins = origins
        self.allow_any = "*" in origins

    def allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.allow_any or origin in self.origins)

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        ):
            return await handler(request)
        if not self.allowed(request.headers.get(hdrs.ORIGIN)):
            return error_response(
                ProxyError(ORIGIN_NOT_ALLOWED, "this origin may not call the proxy")
            )
        resp = web.Response(status=204)
        resp.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ALLOW_METHODS
        resp.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ALLOW_HEADERS
        resp.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = MAX_AGE
        return resp

    def add_headers(self, origin: str | None, response: web.StreamResponse) -> None:
        """The CORS headers of a response to a request from ``origin``: the one place
        that decides them (the app's responses, and the protocol layer's errors)."""
        if not self.allow_any:
            # The answer depends on Origin: caches must keep one per origin.
            response.headers.add(hdrs.VARY, "Origin")
        if self.allowed(origin):
            assert origin is not None
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*" if self.allow_any else origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS

    async def mark(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: the CORS headers of an allowed origin's response."""
        self.add_headers(request.headers.get(hdrs.ORIGIN), response)
