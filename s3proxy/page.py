"""GET /: the browser upload page, and the few static files it is made of.

The page (``static/index.html``, ``page.js``, ``page.css``) is plain HTML and JS with no
build step and no URL outside the proxy and the S3 endpoint. ``tus.min.js`` is
tus-js-client's browser bundle for the page's resumable uploads through ``/tus/``, vendored
from the npm package (version and MIT licence in ``static/tus-js-client.LICENSE``, which is
not served). The files are read once, when the routes are added, through
importlib.resources (so they also load from a zipped install) and served from memory; only
these names are served, nothing is looked up on disk per request.

The page itself needs no credentials: it holds no data. Auth applies to the calls it
makes (POST /upload, POST /sign...), with the token the user types or the page's
``?token=``.

Content-Security-Policy: scripts and styles only from the proxy itself (no inline code,
so an injected ``<script>`` does not run), and connections only to the proxy and to the
S3 endpoint that presigned URLs point at (the "direct to S3" path PUTs there).
``Referrer-Policy: no-referrer`` keeps a ``?token=`` in the page's URL out of the
Referer header of those requests.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from s3proxy.errors import NOT_FOUND, ProxyError
from s3proxy.settings import Settings
from s3proxy.state import STATE

ASSETS = {
    "page.js": "text/javascript",
    "page.css": "text/css",
    "tus.min.js": "text/javascript",
}
INDEX = "index.html"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """index.html and its assets, read from the installed package."""
    static = importlib.resources.files("s3proxy") / "static"
    files = {INDEX: "text/html", **ASSETS}
    return {name: Asset(static.joinpath(name).read_bytes(), ctype) for name, ctype in files.items()}


def s3_sources(settings: Settings) -> list[str]:
    """CSP sources for the S3 endpoint as browsers reach it (presigned URLs point there).

    Both the endpoint's origin (path-style URLs) and its subdomains (virtual-hosted
    ``bucket.s3.example``). The embedded store listens on 127.0.0.1, on a port that may
    be picked at start.
    """
    endpoint = settings.presign_endpoint_url or settings.endpoint_url
    if endpoint is None:
        port = settings.embedded_s3_port or "*"
        return [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
    url = urlsplit(endpoint)
    netloc = url.netloc.rpartition("@")[2]  # without any user:password@
    if netloc.startswith("["):  # an IPv6 literal has no subdomains
        return [f"{url.scheme}://{netloc}"]
    return [f"{url.scheme}://{netloc}", f"{url.scheme}://*.{netloc}"]


def content_security_policy(settings: Settings) -> str:
    connect = " ".join(["'self'", *s3_sources(settings)])
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {connect}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


ASSETS_KEY = web.AppKey("page_assets", dict[str, Asset])


def _headers(asset: Asset, request: web.Request) -> dict[str, str]:
    settings = request.app[STATE].settings
    return {
        "Content-Type": f"{asset.content_type}; charset=utf-8",
        # Revalidate every time: a new release's page must not mix with old cached JS.
        "Cache-Control": "no-cache",
        "Content-Security-Policy": content_security_policy(settings),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


async def index(request: web.Request) -> web.Response:
    asset = request.app[ASSETS_KEY][INDEX]
    return web.Response(body=asset.body, headers=_headers(asset, request))


async def static(request: web.Request) -> web.Response:
    asset = request.app[ASSETS_KEY].get(request.match_info["name"])
    if asset is None or request.match_info["name"] == INDEX:
        raise ProxyError(NOT_FOUND, "no such file")
    return web.Response(body=asset.body, headers=_headers(asset, request))


def add_routes(app: web.Application) -> None:
    """GET / (the page) and GET /static/{name} (its script and style)."""
    app[ASSETS_KEY] = load_assets()
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
