"""The upload page: GET / and its assets (quick, against moto), and the page itself in a
real headless Chromium against the real proxy process and SeaweedFS (``e2e``).

The browser test uploads through every path, through the proxy (one POST /upload per
file), resumable (tus-js-client against /tus/) and direct to S3 (presigned PUT, and
presigned multipart above the threshold),
reads progress and results off the page, takes screenshots, and checks every stored
object byte for byte with boto3. ``UPDATE_SCREENSHOTS=1`` also writes the final
screenshot to docs/upload-page.png for the README.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib.resources
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import boto3
import pytest

from s3proxy.embedded import EmbeddedStore
from s3proxy.page import content_security_policy, s3_sources
from s3proxy.tus_keys import KEY_OBJECT
from tests.bodies import MiB
from tests.browser import chromium_page, throttle_uploads
from tests.conftest import ProxyFactory, make_settings
from tests.s3util import BOTO_CONFIG, MotoServer, ProxyProcess, fake_aws_env, free_port
from tests.seaweed_fixture import s3_client_kwargs

if TYPE_CHECKING:
    from playwright.sync_api import FilePayload

API_KEY = "page-test-key-0123456789"
PREFIX = "page/"
README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "upload-page.png"

# --- the routes, no browser ------------------------------------------------------


async def test_page_and_assets_are_served(proxy: Any, moto: Any) -> None:
    resp = await proxy.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert f"connect-src 'self' {moto.endpoint_url}" in csp
    html = await resp.text()
    assert 'src="static/page.js"' in html and 'href="static/page.css"' in html
    # Nothing on the page comes from another host.
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    for name, ctype in [("page.js", "text/javascript"), ("page.css", "text/css")]:
        asset = await proxy.get(f"/static/{name}")
        assert asset.status == 200
        assert asset.headers["Content-Type"] == f"{ctype}; charset=utf-8"
        assert "http" not in re.sub(r"//.*|/\*.*?\*/", "", await asset.text())
    missing = await proxy.get("/static/../settings.py")
    assert missing.status == 404
    unknown = await proxy.get("/static/other.js")
    assert unknown.status == 404
    assert (await unknown.json())["error"]["code"] == "NOT_FOUND"
    head = await proxy.head("/")
    assert head.status == 200


async def test_the_vendored_tus_client_is_served_with_its_version_and_licence(proxy: Any) -> None:
    """tus-js-client's browser bundle, for the page's resumable uploads: served like page.js,
    loaded before it, its version the one its licence file names; the licence is not served."""
    html = await (await proxy.get("/")).text()
    assert html.index('src="static/tus.min.js"') < html.index('src="static/page.js"')
    bundle = await proxy.get("/static/tus.min.js")
    assert bundle.status == 200
    assert bundle.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert "script-src 'self'" in bundle.headers["Content-Security-Policy"]
    text = await bundle.text()
    assert text.startswith("/*! tus-js-client 4.3.1, dist/tus.min.js of the npm package")
    assert "sourceMappingURL" not in text  # the map is not shipped: no 404 in devtools
    assert (await proxy.get("/static/tus-js-client.LICENSE")).status == 404


def test_the_vendored_tus_client_ships_with_its_licence() -> None:
    static = importlib.resources.files("s3proxy") / "static"
    licence = static.joinpath("tus-js-client.LICENSE").read_text()
    assert licence.startswith("tus-js-client 4.3.1 (npm: tus-js-client@4.3.1")
    assert "The MIT License (MIT)" in licence


async def test_page_needs_no_credentials_but_uploads_do(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(api_key=API_KEY)
    assert (await proxy.get("/")).status == 200
    assert (await proxy.get("/static/page.js")).status == 200
    form = aiohttp.FormData()
    form.add_field("file", b"x", filename="x.txt")
    refused = await proxy.post("/upload", data=form)
    assert refused.status == 401


async def test_page_can_be_turned_off(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(page=False)
    assert (await proxy.get("/")).status == 404


@pytest.mark.parametrize(
    ("overrides", "sources"),
    [
        (
            {"endpoint_url": "https://s3.eu-west-1.amazonaws.com"},
            ["https://s3.eu-west-1.amazonaws.com", "https://*.s3.eu-west-1.amazonaws.com"],
        ),
        (
            {"endpoint_url": "http://10.0.0.5:9000", "presign_endpoint_url": "https://s3.example"},
            ["https://s3.example", "https://*.s3.example"],
        ),
        ({"endpoint_url": "http://[::1]:8333"}, ["http://[::1]:8333"]),
        (
            {"endpoint_url": None, "embedded_s3_port": 8333},
            ["http://127.0.0.1:8333", "http://localhost:8333"],
        ),
        (
            {"endpoint_url": None, "embedded_s3_port": 0},
            ["http://127.0.0.1:*", "http://localhost:*"],
        ),
    ],
)
def test_csp_allows_the_s3_endpoint_browsers_reach(
    overrides: dict[str, Any], sources: list[str]
) -> None:
    settings = make_settings(**{"bucket": "uploads", **overrides})
    assert s3_sources(settings) == sources
    assert f"connect-src 'self' {' '.join(sources)};" in content_security_policy(settings)


# --- the page in a real browser ------------------------------------------------------


def tiny_pdf() -> bytes:
    """A small, valid one-page PDF (libmagic calls it application/pdf)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def noise(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def sw(seaweedfs: EmbeddedStore) -> Any:
    return boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(seaweedfs))


@pytest.fixture(scope="module")
def page_proxy(
    seaweedfs: EmbeddedStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}
    env.update(
        AWS_ACCESS_KEY_ID=seaweedfs.access_key,
        AWS_SECRET_ACCESS_KEY=seaweedfs.secret_key,
        S3PROXY_API_KEY=API_KEY,
    )
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    args = [
        "--endpoint-url",
        seaweedfs.endpoint_url,
        "--bucket",
        seaweedfs.bucket,
        "--key-template",
        PREFIX + "{uuid}/{filename}",
        "--part-size",
        "5MiB",
        # A 7 MiB file goes direct as a presigned multipart upload, a small one as a PUT.
        "--presign-multipart-threshold",
        "5MiB",
        "--max-file-size",
        "8MiB",
    ]
    log = tmp_path_factory.mktemp("page") / "proxy.log"
    proxy = ProxyProcess.start(args, env, log)
    yield proxy
    assert proxy.stop() == 0


@pytest.fixture
def clean_prefix(sw: Any, seaweedfs: EmbeddedStore) -> Iterator[None]:
    """Nothing left under page/ afterwards; no multipart upload left open by the page."""
    yield
    bucket = seaweedfs.bucket
    uploads = [
        u["Key"] for u in sw.list_multipart_uploads(Bucket=bucket, Prefix=PREFIX).get("Uploads", [])
    ]
    for obj in sw.list_objects_v2(Bucket=bucket, Prefix=PREFIX).get("Contents", []):
        sw.delete_object(Bucket=bucket, Key=obj["Key"])
    assert not uploads, f"multipart uploads left open: {uploads}"


def row(page: Any, name: str) -> Any:
    return page.locator('[data-testid="file-row"]', has=page.get_by_text(name, exact=True))


def wait_finished(page: Any, count: int, timeout: float = 60.0) -> None:
    """Until ``count`` rows are done or failed."""
    page.wait_for_function(
        """count => document.querySelectorAll(
            '[data-testid=file-row][data-state=done], [data-testid=file-row][data-state=error]'
        ).length === count""",
        arg=count,
        timeout=timeout * 1000,
    )


def result_of(page: Any, name: str) -> dict[str, str]:
    r = row(page, name)
    assert r.get_attribute("data-state") == "done", r.inner_text()
    return {
        "key": r.get_by_test_id("result-key").inner_text(),
        "size": r.get_by_test_id("result-size").inner_text(),
        "sha256": r.get_by_test_id("result-sha256").inner_text(),
        "type": r.get_by_test_id("result-type").inner_text(),
        "mode": r.get_by_test_id("file-mode").inner_text(),
    }


@contextlib.contextmanager
def show_log_on_failure(log: Path) -> Iterator[None]:
    """On a failure, print the proxy's log (pytest shows a failed test's output)."""
    try:
        yield
    except BaseException:
        print(f"--- {log} (end) ---\n{log.read_text(errors='replace')[-6000:]}")
        raise


def rows_text(page: Any) -> str:
    """Every row as the page shows it, for assertion messages."""
    return "\n---\n".join(page.get_by_test_id("file-row").all_inner_texts())


def overall(page: Any) -> tuple[float, str]:
    bar = page.get_by_test_id("overall-progress")
    value = float(bar.evaluate("e => e.value / e.max"))
    return value, page.get_by_test_id("overall-status").inner_text()


# Records every value the bars take, so a test sees progress that went by in between.
RECORD_PROGRESS = """() => {
  window.progressSeen = [];
  new MutationObserver(changes => {
    for (const c of changes) {
      const bar = c.target;
      window.progressSeen.push([bar.dataset.testid, bar.value / bar.max]);
    }
  }).observe(document.body, {attributes: true, attributeFilter: ['value'], subtree: true});
}"""


@pytest.mark.e2e
@pytest.mark.timeout(900)  # room for apt-get to install Chromium on a machine without it
def test_upload_page_in_a_real_browser(
    page_proxy: ProxyProcess,
    sw: Any,
    seaweedfs: EmbeddedStore,
    tmp_path: Path,
    clean_prefix: None,
) -> None:
    files = {
        "report.pdf": tiny_pdf(),
        "big.bin": noise(7 * MiB, seed=1),
        "notes.txt": b"direct to S3, one presigned PUT\n" * 100,
        "big-direct.bin": noise(7 * MiB + 123, seed=2),
        "too-big.bin": noise(9 * MiB, seed=3),  # over --max-file-size: /sign refuses it
        "resumable.bin": noise(3 * MiB + 7, seed=4),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    dropped = b"dropped on the page\n"
    files["dropped.txt"] = dropped
    shots = tmp_path / "screenshots"
    shots.mkdir()
    started = time.monotonic()

    with show_log_on_failure(page_proxy.log_path), chromium_page((1000, 900)) as (page, console):
        # The token in the page's URL fills the field; the page sends it as a Bearer token.
        page.goto(f"{page_proxy.url}/?token={API_KEY}")
        page.wait_for_selector("html[data-ready=true]")
        assert page.get_by_label("Upload token or API key", exact=False).input_value() == API_KEY
        assert page.get_by_test_id("mode-proxy").is_checked()
        assert page.get_by_test_id("overall-status").inner_text() == "No files yet."

        # 1. Through the proxy: a PDF and a 7 MiB file (two S3 parts of 5 MiB + 2 MiB).
        page.evaluate(RECORD_PROGRESS)
        throttle_uploads(page, 16 * MiB)  # ~0.5 s for 7 MiB: progress events to see
        page.get_by_test_id("file-input").set_input_files(
            [tmp_path / "report.pdf", tmp_path / "big.bin"]
        )
        page.wait_for_function(
            "() => { const b = document.querySelector('[data-testid=overall-progress]');"
            " return b.value > 0 && b.value < b.max; }",
            timeout=30_000,
        )
        page.screenshot(path=shots / "1-proxy-in-progress.png", full_page=True)
        wait_finished(page, 2)
        throttle_uploads(page, -1)
        seen = page.evaluate("window.progressSeen")
        partial = [v for tid, v in seen if tid == "file-progress" and 0 < v < 1]
        assert partial, f"no partial progress seen on a file's bar: {seen}"
        value, status = overall(page)
        assert value == 1.0
        assert status == "All 2 files stored.", rows_text(page)
        page.screenshot(path=shots / "2-proxy-done.png", full_page=True)

        pdf = result_of(page, "report.pdf")
        assert pdf["type"] == "application/pdf"
        big = result_of(page, "big.bin")
        for name, shown in [("report.pdf", pdf), ("big.bin", big)]:
            data = files[name]
            assert shown["key"].startswith(PREFIX) and shown["key"].endswith("/" + name)
            assert shown["size"].startswith(f"{len(data)} bytes")
            assert shown["sha256"] == hashlib.sha256(data).hexdigest()
            assert shown["mode"] == "through the proxy"

        # 2. Direct to S3: a small file (one presigned PUT), a 7 MiB one (presigned
        # multipart), and one over the size limit, which /sign refuses before any byte.
        page.get_by_test_id("mode-direct").check()
        page.get_by_test_id("file-input").set_input_files(
            [tmp_path / "notes.txt", tmp_path / "big-direct.bin", tmp_path / "too-big.bin"]
        )
        wait_finished(page, 5)
        value, status = overall(page)
        assert value == 1.0
        assert status == "4 of 5 stored, 1 failed.", rows_text(page)
        too_big = row(page, "too-big.bin")
        assert too_big.get_attribute("data-state") == "error"
        assert too_big.get_by_test_id("file-status").inner_text() == "Failed (HTTP 413)"
        assert (
            too_big.get_by_test_id("result-error")
            .inner_text()
            .startswith(f"FILE_TOO_LARGE: file of {9 * MiB} bytes is over the limit")
        )
        assert too_big.get_by_test_id("file-result").is_hidden()
        notes = result_of(page, "notes.txt")
        big_direct = result_of(page, "big-direct.bin")
        for name, shown in [("notes.txt", notes), ("big-direct.bin", big_direct)]:
            data = files[name]
            assert shown["mode"] == "direct to S3"
            assert shown["key"].startswith(PREFIX) and shown["key"].endswith("/" + name)
            assert shown["size"].startswith(f"{len(data)} bytes")
            assert shown["sha256"] == hashlib.sha256(data).hexdigest()

        # 3. Dropped on the drop zone, through the proxy again.
        page.get_by_test_id("mode-proxy").check()
        transfer = page.evaluate_handle(
            """text => {
                const dt = new DataTransfer();
                dt.items.add(new File([text], "dropped.txt", {type: "text/plain"}));
                return dt;
            }""",
            dropped.decode(),
        )
        zone = page.get_by_test_id("dropzone")
        zone.dispatch_event("dragenter", {"dataTransfer": transfer})
        zone.dispatch_event("drop", {"dataTransfer": transfer})
        wait_finished(page, 6)
        dropped_shown = result_of(page, "dropped.txt")
        assert dropped_shown["sha256"] == hashlib.sha256(dropped).hexdigest()
        assert overall(page) == (1.0, "5 of 6 stored, 1 failed.")

        # 4. Resumable through the proxy (tus-js-client against /tus/; tests/test_tus_browser.py
        # drops connections and reloads the page).
        page.get_by_test_id("mode-tus").check()
        page.get_by_test_id("file-input").set_input_files(tmp_path / "resumable.bin")
        wait_finished(page, 7)
        resumable = result_of(page, "resumable.bin")
        assert resumable["mode"] == "through the proxy, resumable"
        assert resumable["sha256"] == hashlib.sha256(files["resumable.bin"]).hexdigest()
        assert overall(page) == (1.0, "6 of 7 stored, 1 failed.")
        page.screenshot(path=shots / "3-both-paths.png", full_page=True)

        # 5. A refused upload shows the proxy's error code and message on its row.
        page.get_by_test_id("mode-proxy").check()
        page.get_by_test_id("token").fill("not-the-key")
        page.get_by_test_id("file-input").set_input_files(
            {"name": "refused.txt", "mimeType": "text/plain", "buffer": b"no"}
        )
        wait_finished(page, 8)
        refused = row(page, "refused.txt")
        assert refused.get_attribute("data-state") == "error"
        error = refused.get_by_test_id("result-error").inner_text()
        assert error.startswith("INVALID_CREDENTIALS: ")
        assert overall(page) == (1.0, "6 of 8 stored, 2 failed.")
        page.screenshot(path=shots / "4-refused.png", full_page=True)
        # The browser noted the 413 and 401 on its console (so the console is watched),
        # and nothing else: no uncaught exception, no CSP refusal.
        assert any("status of 413" in e for e in console.errors), console.errors
        assert console.unexpected() == []

    elapsed = time.monotonic() - started
    if os.environ.get("UPDATE_SCREENSHOTS"):
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        README_SCREENSHOT.write_bytes((shots / "3-both-paths.png").read_bytes())
    print(f"page test: {elapsed:.1f} s in the browser; screenshots in {shots}")

    # What the page showed is what S3 holds.
    results = {
        "report.pdf": pdf,
        "big.bin": big,
        "notes.txt": notes,
        "big-direct.bin": big_direct,
        "dropped.txt": dropped_shown,
        "resumable.bin": resumable,
    }
    for name, result in results.items():
        obj = sw.get_object(Bucket=seaweedfs.bucket, Key=result["key"])
        body = obj["Body"].read()
        assert body == files[name], name
        assert hashlib.sha256(body).hexdigest() == result["sha256"]
    stored = sw.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=PREFIX).get("Contents", [])
    assert sorted(o["Key"] for o in stored) == sorted(r["key"] for r in results.values())
    # the resumable upload left nothing under the proxy's reserved prefix
    reserved = sw.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=".s3proxy/").get("Contents", [])
    assert [o["Key"] for o in reserved if o["Key"] != KEY_OBJECT] == []  # the URL key stays


@pytest.mark.e2e
@pytest.mark.timeout(900)  # room for apt-get to install Chromium on a machine without it
def test_resumable_mode_shows_the_key_stored_for_any_name(
    page_proxy: ProxyProcess, sw: Any, seaweedfs: EmbeddedStore, clean_prefix: None
) -> None:
    """Resumable mode reads the key off the proxy's S3Proxy-Key: non-ASCII, a bare ``%``
    and a ``%XX`` in the name show the key S3 holds (they showed mojibake, "" and
    another object's key while the header carried raw UTF-8)."""
    names = ["日本.txt", "50%.txt", "a%41b.txt"]
    with show_log_on_failure(page_proxy.log_path), chromium_page() as (page, console):
        page.goto(f"{page_proxy.url}/?token={API_KEY}")
        page.wait_for_selector("html[data-ready=true]")
        page.get_by_test_id("mode-tus").check()
        files: list[FilePayload] = [
            {"name": n, "mimeType": "text/plain", "buffer": n.encode()} for n in names
        ]
        page.get_by_test_id("file-input").set_input_files(files)
        wait_finished(page, len(names))
        shown = {n: result_of(page, n) for n in names}
        assert console.unexpected() == []
    stored = sw.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=PREFIX).get("Contents", [])
    assert sorted(r["key"] for r in shown.values()) == sorted(o["Key"] for o in stored)
    for name, result in shown.items():
        assert result["mode"] == "through the proxy, resumable"
        assert result["key"].startswith(PREFIX) and result["key"].endswith("/" + name), result
        body = sw.get_object(Bucket=seaweedfs.bucket, Key=result["key"])["Body"].read()
        assert body == name.encode()


# --- a cross-origin download in a real browser -------------------------------------------


@contextlib.contextmanager
def static_site(root: Path) -> Iterator[str]:
    """A page served from its own origin (another port), as an application's would be."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


FETCH_JS = """async ([url, key, range]) => {
    const headers = {Authorization: "Bearer " + key, "X-Request-ID": "browser-dl-1"};
    if (range) headers.Range = range;
    const r = await fetch(url, {headers});
    const bytes = new Uint8Array(await r.arrayBuffer());
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
    return {
        status: r.status,
        size: bytes.length,
        sha256: Array.from(digest, b => b.toString(16).padStart(2, "0")).join(""),
        requestId: r.headers.get("X-Request-ID"),
        contentRange: r.headers.get("Content-Range"),
    };
}"""


# What the README advertises beyond a plain GET, from another origin: conditional
# downloads (headers that need the preflight's leave) with the headers a page reads, and
# a gzip-coded upload.
CONDITIONAL_JS = """async ([url, key]) => {
    const auth = {Authorization: "Bearer " + key};
    const first = await fetch(url, {headers: auth});
    await first.arrayBuffer();
    const etag = first.headers.get("ETag");
    const lastModified = first.headers.get("Last-Modified");
    const status = async (headers) =>
        (await fetch(url, {headers: {...auth, ...headers}, cache: "no-store"})).status;
    return {
        etag: etag,
        reprDigest: first.headers.get("Repr-Digest"),
        disposition: first.headers.get("Content-Disposition"),
        acceptRanges: first.headers.get("Accept-Ranges"),
        noneMatch: await status({"If-None-Match": etag}),
        match: await status({"If-Match": '"other"'}),
        modifiedSince: await status({"If-Modified-Since": lastModified}),
        unmodifiedSince: await status({"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}),
        ifRange: await status({"If-Range": etag, Range: "bytes=0-9"}),
    };
}"""

GZIP_UPLOAD_JS = r"""async ([proxy, key]) => {
    const boundary = "cors-gzip-boundary";
    const form = `--${boundary}\r\nContent-Disposition: form-data; name="file"; ` +
        `filename="coded.txt"\r\nContent-Type: text/plain\r\n\r\n` +
        `sent gzip-coded from another origin\n\r\n--${boundary}--\r\n`;
    const coded = await new Response(
        new Blob([form]).stream().pipeThrough(new CompressionStream("gzip"))
    ).arrayBuffer();
    const r = await fetch(proxy + "/upload", {
        method: "POST",
        headers: {
            Authorization: "Bearer " + key,
            "Content-Type": "multipart/form-data; boundary=" + boundary,
            "Content-Encoding": "gzip",
        },
        body: coded,
    });
    return {status: r.status, body: await r.json()};
}"""


@pytest.mark.e2e
@pytest.mark.timeout(900)  # room for apt-get to install Chromium on a machine without it
def test_cross_origin_download_in_a_real_browser(
    moto: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """A page on one origin fetches a file through the proxy on another and reads its
    bytes: the streamed 200/206 must carry the CORS headers, or the browser blocks it."""
    data = noise(3 * MiB + 5, seed=18)
    key = "dl/0123abcd/data.bin"
    # its sha256 as a one-PutObject /upload stores it: the download says Repr-Digest
    sha = hashlib.sha256(data).hexdigest()
    s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": sha})
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<!doctype html><title>app</title><p>app")
    with static_site(tmp_path / "site") as site:
        port = free_port()
        env = {**fake_aws_env(), "S3PROXY_API_KEY": API_KEY}
        args = ["--endpoint-url", moto.endpoint_url, "--bucket", bucket]
        args += ["--key-template", "dl/{uuid}/{filename}", "--cors-origin", site]
        proxy = ProxyProcess.start(args, env, tmp_path / "proxy.log", port=port)
        try:
            with show_log_on_failure(proxy.log_path), chromium_page() as (page, console):
                page.goto(site + "/index.html")
                url = f"{proxy.url}/files/{key}"
                whole = page.evaluate(FETCH_JS, [url, API_KEY, None])
                assert whole == {
                    "status": 200,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "requestId": "browser-dl-1",
                    "contentRange": None,
                }
                part = page.evaluate(FETCH_JS, [url, API_KEY, "bytes=100-199"])
                assert part["status"] == 206 and part["size"] == 100
                assert part["sha256"] == hashlib.sha256(data[100:200]).hexdigest()
                assert part["contentRange"] == f"bytes 100-199/{len(data)}"
                # conditional requests pass the preflight; the page reads what it needs
                cond = page.evaluate(CONDITIONAL_JS, [url, API_KEY])
                assert cond["etag"] and cond["reprDigest"].startswith("sha-256=:")
                assert cond["disposition"].startswith("attachment")
                assert cond["acceptRanges"] == "bytes"
                assert (cond["noneMatch"], cond["match"]) == (304, 412)
                assert (cond["modifiedSince"], cond["unmodifiedSince"]) == (304, 412)
                assert cond["ifRange"] == 206
                # and so does a gzip-coded upload
                coded = page.evaluate(GZIP_UPLOAD_JS, [proxy.url, API_KEY])
                assert coded["status"] == 201, coded
                [stored] = coded["body"]["files"]
                got = s3.get_object(Bucket=bucket, Key=stored["key"])["Body"].read()
                assert got == b"sent gzip-coded from another origin\n"
                assert console.unexpected() == []
        finally:
            assert proxy.stop() == 0
