"""Resumable uploads from the upload page: tus-js-client in a real headless Chromium against
real ``s3proxy serve`` processes on SeaweedFS (``e2e``).

- a file over the page's threshold, chosen "through the proxy", goes through /tus/ by
  itself, in 8 MiB PATCHes, and is stored byte for byte;
- the proxy is killed (``kill -9``) mid-PATCH and another process started on the same port
  and bucket: tus-js-client retries, asks the new process for the offset (which comes from
  S3 alone: the PATCHes committed before the kill, nothing of the killed one) and continues
  from there;
- the page is reloaded mid-upload and the same file chosen again: the first PATCH after the
  reload starts past 0, from the upload URL the page kept in localStorage.

The page sends a file in chunks of about a tenth of it (8 to 64 MiB, page.js
``tusChunkSize``): a killed proxy commits nothing of the PATCH it was serving, so that costs
at most one chunk.

Each ends with the object byte-identical, nothing under the reserved prefix ``.s3proxy/``
and no multipart upload left open.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from s3proxy.embedded import EmbeddedStore
from s3proxy.tus_keys import KEY_OBJECT
from tests.bodies import MiB
from tests.browser import chromium_page, throttle_uploads
from tests.s3util import BOTO_CONFIG, ProxyProcess, free_port
from tests.seaweed_fixture import s3_client_kwargs

API_KEY = "tus-page-test-key-0123456789"
README = Path(__file__).resolve().parent.parent / "README.md"
MAKE_SERVE = "http://127.0.0.1:8080"  # where the README's examples find the proxy
PREFIX = "page-tus/"
RESERVED = ".s3proxy/"
THRESHOLD = 64 * MiB  # page.js RESUMABLE_OVER: bigger files go resumable through the proxy
CHUNK = 8 * MiB  # page.js tusChunkSize for the files here (up to 80 MiB)


@pytest.fixture(scope="module")
def sw(seaweedfs: EmbeddedStore) -> Any:
    return boto3.client("s3", config=BOTO_CONFIG, **s3_client_kwargs(seaweedfs))


@dataclass
class Proxies:
    """``s3proxy serve`` processes on one port and one bucket, one after the other."""

    store: EmbeddedStore
    log_dir: Path
    port: int = field(default_factory=free_port)
    started: list[ProxyProcess] = field(default_factory=list)
    api_key: str | None = API_KEY  # None: no auth, as `make serve` on loopback

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3PROXY_"))}
        env.update(
            AWS_ACCESS_KEY_ID=self.store.access_key,
            AWS_SECRET_ACCESS_KEY=self.store.secret_key,
        )
        if self.api_key:
            env["S3PROXY_API_KEY"] = self.api_key
        env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        return env

    def start(self, *extra: str) -> ProxyProcess:
        args = ["--endpoint-url", self.store.endpoint_url, "--bucket", self.store.bucket]
        args += ["--key-template", PREFIX + "{uuid}/{filename}", "--part-size", "5MiB"]
        # A killed proxy's PATCH holds its upload's lock this long (+ the skew): short here,
        # so that the next process may take the upload over within the page's retries.
        args += ["--tus-lock-lease", "2", "--cleanup-clock-skew", "0", *extra]
        log = self.log_dir / f"proxy-{len(self.started)}.log"
        proxy = ProxyProcess.start(args, self.env(), log, port=self.port)
        self.started.append(proxy)
        return proxy

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """On a failure, print the proxies' logs (pytest shows a failed test's output)."""
        try:
            yield
        except BaseException:
            for p in self.started:
                text = p.log_path.read_text(errors="replace")[-6000:]
                print(f"--- {p.log_path} (end) ---\n{text}")
            raise


@pytest.fixture
def proxies(seaweedfs: EmbeddedStore, sw: Any, tmp_path: Path) -> Iterator[Proxies]:
    """Proxies started by the test; afterwards nothing may be left open or reserved."""
    p = Proxies(seaweedfs, tmp_path)
    try:
        yield p
    finally:
        for proxy in p.started:
            proxy.stop()
    bucket = seaweedfs.bucket
    leftover = [
        u["Key"]
        for prefix in (PREFIX, RESERVED)
        for u in sw.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    ]
    reserved = [
        o["Key"] for o in sw.list_objects_v2(Bucket=bucket, Prefix=RESERVED).get("Contents", [])
    ]
    for obj in sw.list_objects_v2(Bucket=bucket, Prefix=PREFIX).get("Contents", []):
        sw.delete_object(Bucket=bucket, Key=obj["Key"])
    for u in sw.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        sw.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    for key in reserved:
        sw.delete_object(Bucket=bucket, Key=key)
    assert not leftover, f"multipart uploads left open: {leftover}"
    state = [k for k in reserved if k != KEY_OBJECT]  # the URL key stays (tus_keys)
    assert not state, f"state left under {RESERVED}: {state}"


def noise(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Patches:
    """The tus requests the page sent, as the browser saw them, and their answers."""

    seen: list[tuple[str, str, int | None]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    def on_request(self, request: Any) -> None:
        if "/tus/" in request.url:
            offset = request.headers.get("upload-offset")
            self.seen.append((request.method, request.url, None if offset is None else int(offset)))

    def on_response(self, response: Any) -> None:
        if "/tus/" in response.url:
            offset = response.headers.get("upload-offset")
            self.answers.append(f"{response.request.method} {response.status} offset={offset}")

    def on_failed(self, request: Any) -> None:
        if "/tus/" in request.url:
            self.answers.append(f"{request.method} failed: {request.failure}")

    def watch(self, page: Any) -> None:
        page.on("request", self.on_request)
        page.on("response", self.on_response)
        page.on("requestfailed", self.on_failed)

    def __str__(self) -> str:
        return "\n".join(self.answers)

    def offsets(self) -> list[int]:
        return [o for m, _, o in self.seen if m == "PATCH" and o is not None]


def row(page: Any, name: str) -> Any:
    return page.locator('[data-testid="file-row"]', has=page.get_by_text(name, exact=True))


def wait_state(page: Any, name: str, states: tuple[str, ...], timeout: float) -> str:
    r = row(page, name)
    page.wait_for_function(
        """([el, states]) => states.includes(el.dataset.state)""",
        arg=[r.element_handle(), list(states)],
        timeout=timeout * 1000,
    )
    return str(r.get_attribute("data-state"))


def wait_progress(page: Any, name: str, fraction: float, timeout: float = 60.0) -> None:
    """Until the file's bar shows at least ``fraction`` sent."""
    bar = row(page, name).get_by_test_id("file-progress").element_handle()
    page.wait_for_function(
        "([bar, f]) => bar.value / bar.max >= f", arg=[bar, fraction], timeout=timeout * 1000
    )


def shown(page: Any, name: str) -> dict[str, str]:
    r = row(page, name)
    state = r.get_attribute("data-state")
    assert state == "done", r.inner_text()
    return {
        "key": r.get_by_test_id("result-key").inner_text(),
        "size": r.get_by_test_id("result-size").inner_text(),
        "sha256": r.get_by_test_id("result-sha256").inner_text(),
        "mode": r.get_by_test_id("file-mode").inner_text(),
        "status": r.get_by_test_id("file-status").inner_text(),
    }


def check_stored(sw: Any, store: EmbeddedStore, result: dict[str, str], data: bytes) -> None:
    """What the page showed is what S3 holds, an ordinary object under the template."""
    key = result["key"]
    assert key.startswith(PREFIX), result
    body = sw.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    assert len(body) == len(data)
    assert body == data
    assert result["size"].startswith(f"{len(data)} bytes")
    if result["sha256"] not in ("", "—"):
        assert result["sha256"] == hashlib.sha256(data).hexdigest()


def unexpected(console: Any) -> list[str]:
    """The console's unexpected errors, less the connections refused while no proxy ran."""
    return [e for e in console.unexpected() if "net::ERR_" not in e]


def open_page(page: Any, proxy: ProxyProcess) -> None:
    page.goto(f"{proxy.url}/?token={API_KEY}")
    page.wait_for_selector("html[data-ready=true]")


@pytest.mark.e2e
@pytest.mark.timeout(900)  # room for apt-get to install Chromium on a machine without it
def test_a_large_file_through_the_proxy_goes_resumable(
    proxies: Proxies, sw: Any, seaweedfs: EmbeddedStore, tmp_path: Path
) -> None:
    data = noise(THRESHOLD + 3 * MiB + 17, seed=31)
    path = tmp_path / "large.bin"
    path.write_bytes(data)
    small = tmp_path / "small.bin"
    small.write_bytes(noise(2 * MiB, seed=32))
    proxy = proxies.start()
    patches = Patches()
    with proxies.logs_on_failure(), chromium_page() as (page, console):
        patches.watch(page)
        open_page(page, proxy)
        assert page.get_by_test_id("mode-proxy").is_checked()
        page.get_by_test_id("file-input").set_input_files([path, small])
        assert wait_state(page, "large.bin", ("done", "error"), timeout=240) == "done"
        assert wait_state(page, "small.bin", ("done", "error"), timeout=60) == "done"
        large = shown(page, "large.bin")
        assert large["mode"] == "through the proxy, resumable"
        assert shown(page, "small.bin")["mode"] == "through the proxy"  # under the threshold
        # one POST, then PATCHes of 8 MiB, each from where the last one ended (unless one
        # was cut on a busy machine: then a HEAD, and on from where the proxy stood)
        chunks = -(-len(data) // CHUNK)
        methods = [m for m, _, _ in patches.seen]
        assert methods.count("POST") == 1 and set(methods) <= {"POST", "PATCH", "HEAD"}
        if "HEAD" not in methods:
            assert patches.offsets() == [i * CHUNK for i in range(chunks)], str(patches)
        else:
            assert patches.offsets()[0] == 0, str(patches)
        # a finished upload leaves no URL behind to resume
        stored = page.evaluate("() => Object.keys(localStorage).filter(k => k.startsWith('tus::'))")
        assert stored == []
        assert console.unexpected() == []
    check_stored(sw, seaweedfs, large, data)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_the_proxy_killed_mid_upload_and_another_continues(
    proxies: Proxies, sw: Any, seaweedfs: EmbeddedStore, tmp_path: Path
) -> None:
    data = noise(24 * MiB + 5, seed=33)
    path = tmp_path / "dropped.bin"
    path.write_bytes(data)
    proxy = proxies.start()
    patches = Patches()
    with proxies.logs_on_failure(), chromium_page() as (page, console):
        patches.watch(page)
        open_page(page, proxy)
        page.get_by_test_id("mode-tus").check()
        throttle_uploads(page, 4 * MiB)  # ~6 s for the file: time to kill the proxy mid-PATCH
        page.get_by_test_id("file-input").set_input_files(path)
        wait_progress(page, "dropped.bin", 0.5)
        os.kill(proxy.proc.pid, signal.SIGKILL)  # no goodbye: what S3 holds is all there is
        proxy.proc.wait(10)
        time.sleep(1.0)  # the page's connection fails; tus-js-client starts retrying
        proxies.start()  # another process, same port and bucket, nothing shared in memory
        throttle_uploads(page, -1)
        assert wait_state(page, "dropped.bin", ("done", "error"), timeout=180) == "done", row(
            page, "dropped.bin"
        ).inner_text()
        result = shown(page, "dropped.bin")
        assert result["mode"] == "through the proxy, resumable"
        # after the kill: HEAD on the new process, which answered the offset of the PATCHes
        # committed before it (a multiple of the chunk, past 0), and PATCHes went on from it
        heads = [i for i, (m, _, _) in enumerate(patches.seen) if m == "HEAD"]
        assert heads, patches.seen
        after = [o for m, _, o in patches.seen[heads[0] :] if m == "PATCH"]
        assert after and after[0] is not None, patches.seen
        assert 0 < after[0] < len(data) and after[0] % CHUNK == 0, patches.seen
        assert unexpected(console) == []
    check_stored(sw, seaweedfs, result, data)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_reload_mid_upload_then_the_same_file_resumes(
    proxies: Proxies, sw: Any, seaweedfs: EmbeddedStore, tmp_path: Path
) -> None:
    data = noise(20 * MiB + 9, seed=34)
    path = tmp_path / "reloaded.bin"
    path.write_bytes(data)
    proxy = proxies.start()
    patches = Patches()
    with proxies.logs_on_failure(), chromium_page() as (page, console):
        patches.watch(page)
        page.on("dialog", lambda dialog: dialog.accept())  # "leave the page?" on reload
        open_page(page, proxy)
        page.get_by_test_id("mode-tus").check()
        throttle_uploads(page, 4 * MiB)
        page.get_by_test_id("file-input").set_input_files(path)
        wait_progress(page, "reloaded.bin", 0.6)
        page.reload()
        page.wait_for_selector("html[data-ready=true]")
        stored = page.evaluate("() => Object.keys(localStorage).filter(k => k.startsWith('tus::'))")
        assert len(stored) == 1, stored  # the upload URL outlived the page
        before = len(patches.seen)
        throttle_uploads(page, -1)
        page.get_by_test_id("mode-tus").check()
        page.get_by_test_id("file-input").set_input_files(path)  # the same file again
        assert wait_state(page, "reloaded.bin", ("done", "error"), timeout=120) == "done", row(
            page, "reloaded.bin"
        ).inner_text()
        result = shown(page, "reloaded.bin")
        after = patches.seen[before:]
        # no new upload: HEAD on the kept URL, then PATCHes from where the server stood
        assert [m for m, _, _ in after][:2] == ["HEAD", "PATCH"], after
        first = next(o for m, _, o in after if m == "PATCH")
        assert first is not None and 0 < first < len(data), after
        assert "resumed" in result["status"].lower(), result
        assert unexpected(console) == []
    check_stored(sw, seaweedfs, result, data)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_without_tus_a_large_file_goes_through_upload_instead(
    proxies: Proxies, sw: Any, seaweedfs: EmbeddedStore, tmp_path: Path
) -> None:
    """A proxy run with ``--tus false``: a large file the page would send resumably goes as
    an ordinary POST /upload; one the user asked to send resumably fails with the reason."""
    data = noise(THRESHOLD + MiB, seed=35)
    (tmp_path / "large.bin").write_bytes(data)
    (tmp_path / "asked.bin").write_bytes(b"resumable, please\n")
    proxy = proxies.start("--tus", "false")
    patches = Patches()
    with proxies.logs_on_failure(), chromium_page() as (page, console):
        patches.watch(page)
        open_page(page, proxy)
        page.get_by_test_id("file-input").set_input_files(tmp_path / "large.bin")
        assert wait_state(page, "large.bin", ("done", "error"), timeout=240) == "done"
        large = shown(page, "large.bin")
        assert large["mode"] == "through the proxy"  # no longer "resumable"
        assert large["status"] == "Stored in S3"
        assert [m for m, _, _ in patches.seen] == ["POST"], str(patches)  # the creation, 404
        page.get_by_test_id("mode-tus").check()
        page.get_by_test_id("file-input").set_input_files(tmp_path / "asked.bin")
        assert wait_state(page, "asked.bin", ("done", "error"), timeout=60) == "error"
        error = row(page, "asked.bin").get_by_test_id("result-error").inner_text()
        assert error.startswith("NOT_FOUND: "), error
        assert console.unexpected() == []
    check_stored(sw, seaweedfs, large, data)


def readme_snippet() -> str:
    """The README's tus-js-client example, as printed."""
    text = README.read_text()
    section = text[text.index("#### Resumable uploads from your own page (tus-js-client)") :]
    match = re.search(r"```js\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_the_readmes_tus_js_client_example_works_as_printed(
    proxies: Proxies, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    """Run in the console of the upload page, as the README says, against a proxy without
    auth (``make serve`` on loopback); only the address differs from ``make serve``'s."""
    snippet = readme_snippet()
    assert MAKE_SERVE in snippet
    proxies.api_key = None
    proxy = proxies.start()
    with proxies.logs_on_failure(), chromium_page() as (page, console):
        page.goto(proxy.url + "/")
        page.wait_for_selector("html[data-ready=true]")
        code = snippet.replace(MAKE_SERVE, proxy.url)
        url = page.evaluate(f"async () => {{\n{code}\nreturn url;\n}}")
        assert url.startswith(f"{proxy.url}/tus/")
        assert unexpected(console) == []
    stored = sw.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=PREFIX).get("Contents", [])
    assert [o["Key"].rsplit("/", 1)[-1] for o in stored] == ["hello.txt"]
    body = sw.get_object(Bucket=seaweedfs.bucket, Key=stored[0]["Key"])["Body"].read()
    assert body == b"hello, resumable world\n"


# tus-js-client in the page's console: parallel (Upload-Concat) uploads, then one upload.
PARALLEL_JS = """async ([endpoint, parallel]) => {
  const bytes = new Uint8Array(3 * 1024 * 1024 + 5);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + (i >> 10)) & 255;
  const file = new Blob([bytes], { type: "application/octet-stream" });
  return await new Promise((resolve) => {
    const upload = new tus.Upload(file, {
      endpoint,
      parallelUploads: parallel,
      retryDelays: [0, 500],
      metadata: { filename: "par.bin", filetype: "application/octet-stream", note: "kept" },
      onSuccess: () => resolve({ ok: true, url: upload.url }),
      onError: (err) => {
        const res = err.originalResponse;
        const body = res ? res.getBody() : String(err);
        resolve({ ok: false, status: res ? res.getStatus() : 0, body });
      },
    });
    upload.start();
  });
}"""


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_tus_js_client_parallel_uploads_are_refused_and_store_nothing(
    proxies: Proxies, sw: Any, seaweedfs: EmbeddedStore
) -> None:
    """``parallelUploads: 2`` sends ``Upload-Concat: partial`` creations (concatenation is
    not served): refused at once with 400 UNSUPPORTED_EXTENSION, nothing stored (was: two
    half-files stored as objects named ``upload``, then the final POST failed). The same
    file as one upload is stored, with its extra metadata key as S3 metadata."""
    proxies.api_key = None
    proxy = proxies.start()
    bucket = seaweedfs.bucket
    with proxies.logs_on_failure(), chromium_page() as (page, console):
        patches = Patches()
        patches.watch(page)
        page.goto(proxy.url + "/")
        page.wait_for_selector("html[data-ready=true]")
        refused = page.evaluate(PARALLEL_JS, [proxy.url + "/tus/", 2])
        assert refused["ok"] is False and refused["status"] == 400, refused
        assert "UNSUPPORTED_EXTENSION" in refused["body"] and "concatenation" in refused["body"]
        assert [m for m, _, _ in patches.seen] == ["POST", "POST"], str(patches)  # no retry
        assert sw.list_objects_v2(Bucket=bucket, Prefix=PREFIX).get("Contents", []) == []
        stored = page.evaluate(PARALLEL_JS, [proxy.url + "/tus/", 1])
        assert stored["ok"] is True, stored
        assert unexpected(console) == []
    [obj] = sw.list_objects_v2(Bucket=bucket, Prefix=PREFIX)["Contents"]
    assert obj["Key"].endswith("/par.bin") and obj["Size"] == 3 * MiB + 5
    assert sw.head_object(Bucket=bucket, Key=obj["Key"])["Metadata"]["note"] == "kept"
