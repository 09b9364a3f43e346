"""``Expect: 100-continue``: a request its headers already refuse is answered before the
client sends a byte of its body, on every route that takes one (``/upload``, ``/sign*``,
``/tus/``). aiohttp's default handler sends 100 Continue whatever the headers say."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import _default_expect_handler

from s3proxy.errors import EXPECTATION_FAILED, ProxyError, error_response


async def answer(
    request: web.Request,
    check: Callable[[], Awaitable[object]],
    refuse: Callable[[ProxyError], web.Response] = error_response,
) -> web.StreamResponse | None:
    """Run ``check`` (raising what the headers refuse); its refusal is the answer, with the
    connection closed (the client may send the body all the same: it is not read); else
    100 Continue. Runs before the middlewares: the request id is not set yet."""
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        return refuse(ProxyError(EXPECTATION_FAILED, "only Expect: 100-continue is supported"))
    try:
        await check()
    except ProxyError as err:
        resp = refuse(err)
        resp.force_close()
        return resp
    await _default_expect_handler(request)
    return None
