"""CORS for browser uploads from other origins (``--cors-origin``).

Answers preflights itself and marks real responses; no cookies are involved
(credentials travel as Bearer tokens), so Allow-Credentials is never sent.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

ALLOW_HEADERS = "Authorization, Content-Type, X-Request-ID, X-Upload-Token"
ALLOW_METHODS = "GET, POST, OPTIONS"
MAX_AGE = "600"
# What scripts on the page may read: the request id, and what downloads need.
EXPOSE_HEADERS = "X-Request-ID, ETag, Content-Range, Content-Disposition, Accept-Ranges"


def cors_middleware(origins: tuple[str, ...]) -> Middleware:
    allow_any = "*" in origins

    def allowed(origin: str | None) -> bool:
        return origin is not None and (allow_any or origin in origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        preflight = (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        )
        resp: web.StreamResponse
        if preflight:
            if not allowed(origin):
                return web.Response(status=403, text="origin not allowed")
            resp = web.Response(status=204)
            resp.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ALLOW_METHODS
            resp.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ALLOW_HEADERS
            resp.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = MAX_AGE
        else:
            resp = await handler(request)
        if allowed(origin):
            assert origin is not None
            resp.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*" if allow_any else origin
            resp.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS
            resp.headers.add(hdrs.VARY, "Origin")
        return resp

    return middleware
