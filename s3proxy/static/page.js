// The upload page: plain JS, no build step, nothing fetched from other hosts but S3 itself.
//
// Through the proxy: one POST upload (multipart/form-data) per file, so each file has its
// own progress and its own result; the proxy answers with key, size, type and sha256.
// Direct to S3: POST sign gives a presigned PUT (or, for large files, a presigned
// multipart upload); the bytes go from the browser to S3 and the proxy never sees them.
//
// Resumable (tus 1.0.0 at tus/, with tus-js-client, vendored as static/tus.min.js): chosen
// for every file, or, through the proxy, taken by itself for files over RESUMABLE_OVER. The
// upload URL is kept in localStorage (tus-js-client's fingerprint of name, type, size and
// modification time), so after a dropped connection the upload retries from the server's
// offset, and after a reload or a failure choosing the same file again continues it.
//
// XMLHttpRequest, not fetch, for every request that carries a file: fetch has no
// upload progress events. URLs are relative so the page also works under a path prefix.
"use strict";

(() => {
  const MiB = 1024 * 1024;
  // crypto.subtle.digest takes the whole file in memory: above this we do not hash.
  const HASH_LIMIT = 256 * MiB;
  const FILES_AT_ONCE = 3; // files uploading at the same time (browsers allow 6 per host)
  const PARTS_AT_ONCE = 3; // parts of one direct multipart upload in flight
  const SIGN_BATCH = 20; // part URLs asked for per POST sign/multipart/parts
  // Through the proxy, files over this go resumable (tus) by themselves: a dropped
  // connection costs seconds of a small file, minutes of a large one.
  const RESUMABLE_OVER = 64 * MiB;
  // Waits before each retry of a resumable upload whose connection failed (tus-js-client
  // asks the server for its offset each time and goes on from there): about a minute.
  const TUS_RETRY_DELAYS = [0, 1000, 3000, 5000, 10000, 20000, 20000];

  // Bytes per PATCH of a resumable upload. A PATCH cut by the network keeps the whole parts
  // S3 acknowledged, but one whose proxy was killed keeps nothing: that loses at most one
  // chunk, about a tenth of the file, 8 to 64 MiB, a multiple of 8 MiB (the proxy's default
  // part size, so a PATCH's end leaves no short part to stage).
  function tusChunkSize(size) {
    const step = 8 * MiB;
    return Math.min(64 * MiB, Math.max(step, Math.ceil(size / 10 / step) * step));
  }
  // Headers a page may not set on an XMLHttpRequest (the browser sets them itself).
  const FORBIDDEN = new Set(["host", "content-length", "connection", "expect", "accept-encoding"]);

  const $ = (selector, root = document) => root.querySelector(selector);
  const list = $("#file-list");
  const rowTemplate = $("#file-row");
  const tokenInput = $("#token");
  const overall = $(".overall");
  const overallBar = $("#overall-progress");
  const overallStatus = $("#overall-status");
  const clearButton = $("#clear");
  const dropzone = $("#dropzone");
  const fileInput = $("#files");

  const rows = [];
  const queue = [];
  let running = 0;

  const token = new URLSearchParams(location.search).get("token");
  if (token) tokenInput.value = token;

  class UploadError extends Error {
    constructor(code, message, status = 0) {
      super(message);
      this.code = code;
      this.status = status;
    }
  }

  function formatSize(n) {
    if (n < 1024) return `${n} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let value = n / 1024;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
  }

  function authHeaders() {
    const value = tokenInput.value.trim();
    return value ? { Authorization: `Bearer ${value}` } : {};
  }

  function chosenMode() {
    return $('input[name="mode"]:checked').value;
  }

  const tusClient = window.tus && window.tus.isSupported ? window.tus : null;

  // How one file travels: "proxy", "direct", or "tus" (chosen, or taken by a large file).
  function modeFor(file, mode) {
    if (mode === "proxy" && tusClient && file.size > RESUMABLE_OVER) return "tus";
    return mode;
  }

  const MODE_LABELS = {
    proxy: "through the proxy",
    direct: "direct to S3",
    tus: "through the proxy, resumable",
  };

  // An error from a response body: the proxy's JSON, S3's XML, or whatever came.
  function errorFrom(status, contentType, text) {
    if (contentType.includes("json")) {
      try {
        const body = JSON.parse(text);
        if (body && body.error && body.error.code) {
          return new UploadError(body.error.code, body.error.message || "", status);
        }
      } catch (_) {
        // fall through to the plain-text message
      }
    }
    if (contentType.includes("xml") || text.startsWith("<?xml")) {
      const doc = new DOMParser().parseFromString(text, "application/xml");
      const code = doc.querySelector("Error > Code");
      if (code) {
        const message = doc.querySelector("Error > Message");
        return new UploadError(code.textContent, message ? message.textContent : "", status);
      }
    }
    const message = text.trim().slice(0, 300) || `the server answered ${status}`;
    return new UploadError(`HTTP_${status}`, message, status);
  }

  function xhrError(xhr) {
    return errorFrom(xhr.status, xhr.getResponseHeader("Content-Type") || "", xhr.responseText || "");
  }

  // One request with upload progress; resolves with the finished XMLHttpRequest.
  function send({ method, url, headers = {}, body = null, onProgress = null }) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open(method, url);
      for (const [name, value] of Object.entries(headers)) {
        if (!FORBIDDEN.has(name.toLowerCase())) xhr.setRequestHeader(name, value);
      }
      if (onProgress) {
        xhr.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : 0));
      }
      xhr.addEventListener("load", () => resolve(xhr));
      xhr.addEventListener("error", () =>
        reject(
          new UploadError(
            "NETWORK_ERROR",
            `the connection to ${new URL(url, document.baseURI).origin} failed before an answer ` +
              "(unreachable, cut off, or refused by its CORS rules)",
          ),
        ),
      );
      xhr.addEventListener("abort", () => reject(new UploadError("ABORTED", "the upload was cancelled")));
      xhr.send(body);
    });
  }

  // A small JSON call to the proxy (sign endpoints): no body worth a progress bar.
  async function postJSON(url, payload) {
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(payload),
      });
    } catch (_) {
      throw new UploadError("NETWORK_ERROR", "the proxy could not be reached");
    }
    const text = await response.text();
    if (!response.ok) throw errorFrom(response.status, response.headers.get("Content-Type") || "", text);
    return JSON.parse(text);
  }

  class Row {
    constructor(file, mode, chosen = mode) {
      this.file = file;
      this.mode = mode;
      this.chosen = chosen; // the mode picked on the page (a large file may go tus instead)
      this.loaded = 0;
      this.state = "queued";
      this.el = rowTemplate.content.firstElementChild.cloneNode(true);
      this.bar = $('[data-testid="file-progress"]', this.el);
      this.status = $('[data-testid="file-status"]', this.el);
      $('[data-testid="file-name"]', this.el).textContent = file.name;
      $('[data-testid="file-mode"]', this.el).textContent = MODE_LABELS[mode];
      $('[data-testid="file-size"]', this.el).textContent = formatSize(file.size);
      this.bar.max = Math.max(file.size, 1);
      this.bar.setAttribute("aria-label", `Upload progress of ${file.name}`);
    }

    get finished() {
      return this.state === "done" || this.state === "error";
    }

    get total() {
      return Math.max(this.file.size, 1);
    }

    set(state, text) {
      this.state = state;
      this.el.dataset.state = state;
      this.status.textContent = text;
      updateOverall();
    }

    progress(loaded) {
      this.loaded = Math.min(loaded, this.file.size);
      this.bar.value = this.loaded;
      const percent = this.file.size ? Math.floor((100 * this.loaded) / this.file.size) : 100;
      const resumed = this.resumedAt ? `, resumed at ${formatSize(this.resumedAt)}` : "";
      const text =
        this.loaded >= this.file.size
          ? "Sent; waiting for the store to confirm…"
          : `Uploading: ${percent} % (${formatSize(this.loaded)} of ${formatSize(this.file.size)}${resumed})`;
      this.set("uploading", text);
    }

    done({ key, size, type, sha256, note }) {
      this.loaded = this.file.size;
      this.bar.value = this.total;
      const result = $('[data-testid="file-result"]', this.el);
      $('[data-testid="result-key"]', result).textContent = key;
      $('[data-testid="result-size"]', result).textContent = `${size} bytes (${formatSize(size)})`;
      $('[data-testid="result-type"]', result).textContent = type || "—";
      $('[data-testid="result-sha256"]', result).textContent = sha256;
      if (note) {
        const small = document.createElement("small");
        small.textContent = ` ${note}`;
        $('[data-testid="result-sha256"]', result).after(small);
      }
      result.hidden = false;
      const how = { direct: " (direct)", tus: this.resumedAt ? " (resumed)" : " (resumable)" };
      this.set("done", `Stored in S3${how[this.mode] || ""}`);
    }

    fail(error) {
      const code = error instanceof UploadError ? error.code : "PAGE_ERROR";
      const box = $('[data-testid="result-error"]', this.el);
      box.replaceChildren();
      const codeEl = document.createElement("code");
      codeEl.textContent = code;
      box.append(codeEl, `: ${error.message || "unknown error"}`);
      if (this.mode === "tus" && error.resumable) {
        box.append(" — choose the same file again to continue where it stopped.");
      }
      box.hidden = false;
      this.bar.value = this.total; // counted as finished in the overall bar
      this.loaded = this.file.size;
      this.set("error", error.status ? `Failed (HTTP ${error.status})` : "Failed");
    }
  }

  function updateOverall() {
    const total = rows.reduce((sum, r) => sum + r.total, 0);
    const loaded = rows.reduce((sum, r) => sum + (r.finished ? r.total : Math.min(r.loaded, r.total)), 0);
    overallBar.max = Math.max(total, 1);
    overallBar.value = loaded;
    const stored = rows.filter((r) => r.state === "done").length;
    const failed = rows.filter((r) => r.state === "error").length;
    const busy = rows.length - stored - failed;
    overall.classList.toggle("done", rows.length > 0 && busy === 0 && failed === 0);
    overall.classList.toggle("failed", failed > 0);
    overall.dataset.state = rows.length === 0 ? "empty" : busy ? "busy" : failed ? "failed" : "done";
    clearButton.disabled = stored + failed === 0;
    if (rows.length === 0) {
      overallStatus.textContent = "No files yet.";
    } else if (busy) {
      const sizes = `${formatSize(Math.min(loaded, total))} of ${formatSize(total)}`;
      overallStatus.textContent = `${stored} of ${rows.length} stored, ${failed} failed; ${sizes} sent`;
    } else if (failed) {
      overallStatus.textContent = `${stored} of ${rows.length} stored, ${failed} failed.`;
    } else {
      overallStatus.textContent = `All ${rows.length} ${rows.length === 1 ? "file" : "files"} stored.`;
    }
  }

  // Through the proxy: one multipart/form-data POST per file.
  async function viaProxy(row) {
    const form = new FormData();
    form.append("file", row.file, row.file.name);
    const xhr = await send({
      method: "POST",
      url: "upload",
      headers: authHeaders(),
      body: form,
      // The body is the file plus a few hundred bytes of multipart framing.
      onProgress: (loaded, total) => row.progress(total ? Math.floor((loaded / total) * row.file.size) : 0),
    });
    if (xhr.status !== 201) throw xhrError(xhr);
    const stored = JSON.parse(xhr.responseText).files[0];
    row.done({ key: stored.key, size: stored.size, type: stored.content_type, sha256: stored.sha256 });
  }

  async function sha256Hex(file) {
    if (!(window.crypto && crypto.subtle)) {
      return { sha256: "not computed", note: "(the page is not on HTTPS or localhost)" };
    }
    if (file.size > HASH_LIMIT) {
      return { sha256: "not computed", note: `(files over ${formatSize(HASH_LIMIT)} are not hashed in the browser)` };
    }
    const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
    const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
    return { sha256: hex, note: "(computed in this browser)" };
  }

  function contentType(file) {
    return file.type || "application/octet-stream";
  }

  // Direct to S3 with one presigned PUT (or a presigned POST form, if that is what came).
  async function directSingle(row, signed) {
    let xhr;
    if (signed.fields) {
      const form = new FormData();
      for (const [name, value] of Object.entries(signed.fields)) form.append(name, value);
      form.append("file", row.file, row.file.name);
      xhr = await send({
        method: "POST",
        url: signed.url,
        body: form,
        onProgress: (loaded, total) => row.progress(total ? Math.floor((loaded / total) * row.file.size) : 0),
      });
    } else {
      xhr = await send({
        method: signed.method || "PUT",
        url: signed.url,
        headers: signed.headers || {},
        body: row.file,
        onProgress: (loaded) => row.progress(loaded),
      });
    }
    if (xhr.status < 200 || xhr.status >= 300) throw xhrError(xhr);
  }

  // Direct to S3 as a presigned multipart upload: parts PUT from slices of the file.
  async function directMultipart(row, started) {
    const file = row.file;
    const { key, upload_id: uploadId, part_size: partSize } = started;
    const partCount = started.part_count || Math.max(1, Math.ceil(file.size / partSize));
    const sent = new Map(); // part number -> bytes sent so far
    const etags = [];
    const report = () => row.progress([...sent.values()].reduce((a, b) => a + b, 0));
    try {
      for (let first = 1; first <= partCount; first += SIGN_BATCH) {
        const numbers = [];
        for (let n = first; n < first + SIGN_BATCH && n <= partCount; n += 1) numbers.push(n);
        const { parts } = await postJSON("sign/multipart/parts", { key, upload_id: uploadId, part_numbers: numbers });
        const pending = [...parts];
        const worker = async () => {
          for (let part = pending.shift(); part; part = pending.shift()) {
            const n = part.part_number;
            const slice = file.slice((n - 1) * partSize, Math.min(n * partSize, file.size));
            const xhr = await send({
              method: "PUT",
              url: part.url,
              headers: part.headers || {},
              body: slice,
              onProgress: (loaded) => {
                sent.set(n, loaded);
                report();
              },
            });
            if (xhr.status < 200 || xhr.status >= 300) throw xhrError(xhr);
            const etag = xhr.getResponseHeader("ETag");
            if (!etag) {
              throw new UploadError(
                "NO_ETAG",
                "S3 stored a part but did not show its ETag to this page (the bucket's CORS rules must expose ETag)",
              );
            }
            sent.set(n, slice.size);
            report();
            etags.push({ part_number: n, etag });
          }
        };
        await Promise.all(Array.from({ length: Math.min(PARTS_AT_ONCE, parts.length) }, worker));
      }
      etags.sort((a, b) => a.part_number - b.part_number);
      return await postJSON("sign/multipart/complete", { key, upload_id: uploadId, parts: etags });
    } catch (error) {
      // Every multipart upload ends in complete or abort; the abort is best effort here.
      await postJSON("sign/multipart/abort", { key, upload_id: uploadId }).catch(() => {});
      throw error;
    }
  }

  async function direct(row) {
    const file = row.file;
    const request = { filename: file.name, content_type: contentType(file), size: file.size, method: "put" };
    const signed = await postJSON("sign", request);
    let stored = { key: signed.key, size: file.size, content_type: contentType(file) };
    if (signed.multipart) {
      // Above --presign-multipart-threshold: start a multipart upload, PUT its parts.
      stored = await directMultipart(row, await postJSON("sign/multipart", request));
    } else {
      await directSingle(row, signed);
    }
    row.set("uploading", "Stored; computing the SHA-256 in this browser…");
    const { sha256, note } = await sha256Hex(file);
    row.done({ key: stored.key, size: stored.size, type: stored.content_type, sha256, note });
  }

  // A tus-js-client error as an UploadError: the server's JSON error when it answered.
  function tusError(error) {
    const response = error && error.originalResponse;
    if (response && response.getStatus()) {
      const status = response.getStatus();
      const failed = errorFrom(status, response.getHeader("Content-Type") || "", response.getBody() || "");
      // Refusals of the request itself (auth, type, size) do not get better by resuming.
      failed.resumable = status === 409 || status === 423 || status >= 500;
      failed.creating = error.originalRequest && error.originalRequest.getMethod() === "POST";
      return failed;
    }
    const failed = new UploadError(
      "NETWORK_ERROR",
      "the connection to the proxy failed and did not come back within a minute of retries",
    );
    failed.resumable = true;
    return failed;
  }

  // The key a finished tus upload is stored at: the proxy's S3Proxy-Key header where it
  // sends one (percent-encoded UTF-8, so the header stays ASCII: decode it), else the
  // upload URL's own statement (its signed part before the "." is base64url JSON naming
  // the key, s3proxy/tus_url.py).
  function tusKey(response, url) {
    const header = response && response.getHeader("S3Proxy-Key");
    try {
      if (header) return decodeURIComponent(header);
      const token = url.slice(url.lastIndexOf("/") + 1).split(".")[0];
      const b64 = token.replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)), (c) => c.charCodeAt(0));
      return JSON.parse(new TextDecoder().decode(bytes)).key || "";
    } catch (_) {
      return "";
    }
  }

  // Resumable, through the proxy: tus-js-client against tus/, resuming a stored upload URL.
  function resumable(row) {
    const file = row.file;
    return new Promise((resolve, reject) => {
      const upload = new tusClient.Upload(file, {
        endpoint: new URL("tus/", document.baseURI).href,
        metadata: { filename: file.name, filetype: contentType(file) },
        headers: authHeaders(),
        chunkSize: tusChunkSize(file.size),
        retryDelays: TUS_RETRY_DELAYS,
        removeFingerprintOnSuccess: true, // the same file chosen later is a new upload
        onProgress: (sent) => row.progress(sent),
        onAfterResponse: (request, response) => {
          // HEAD is how it learns where a stored upload stands: shown as "resumed at"
          if (request.getMethod() === "HEAD" && response.getStatus() === 200) {
            row.resumedAt = Number(response.getHeader("Upload-Offset")) || 0;
          }
        },
        onSuccess: ({ lastResponse }) => resolve(tusKey(lastResponse, upload.url)),
        onError: (error) => reject(tusError(error)),
      });
      upload
        .findPreviousUploads()
        .then((previous) => {
          if (previous.length) {
            // the newest stored URL for this file: tus-js-client asks the server its offset
            // (and starts a new upload if the server no longer knows it)
            previous.sort((a, b) => Date.parse(b.creationTime) - Date.parse(a.creationTime));
            upload.resumeFromPreviousUpload(previous[0]);
            row.set("uploading", "Resuming an earlier upload of this file…");
          }
          upload.start();
        })
        .catch((error) => reject(tusError(error)));
    });
  }

  async function viaTus(row) {
    let key;
    try {
      key = await resumable(row);
    } catch (error) {
      // A proxy without tus/ (404 on the creation POST): a file that only went resumable
      // for its size goes as an ordinary upload instead.
      if (error.status === 404 && error.creating && row.chosen === "proxy") {
        row.mode = "proxy";
        $('[data-testid="file-mode"]', row.el).textContent = MODE_LABELS.proxy;
        return viaProxy(row);
      }
      throw error;
    }
    row.set("uploading", "Stored; computing the SHA-256 in this browser…");
    const { sha256, note } = await sha256Hex(row.file);
    row.done({ key, size: row.file.size, type: contentType(row.file), sha256, note });
  }

  const PATHS = { proxy: viaProxy, direct, tus: viaTus };

  async function run(row) {
    row.set("uploading", "Starting…");
    try {
      await PATHS[row.mode](row);
    } catch (error) {
      if (!(error instanceof UploadError)) console.error(error);
      row.fail(error);
    }
  }

  function pump() {
    while (running < FILES_AT_ONCE && queue.length) {
      const row = queue.shift();
      running += 1;
      run(row).finally(() => {
        running -= 1;
        pump();
      });
    }
  }

  function add(files) {
    const mode = chosenMode();
    for (const file of files) {
      const row = new Row(file, modeFor(file, mode), mode);
      rows.push(row);
      list.append(row.el);
      queue.push(row);
    }
    updateOverall();
    pump();
  }

  fileInput.addEventListener("change", () => {
    add(Array.from(fileInput.files));
    fileInput.value = ""; // so the same file can be chosen again
  });

  for (const type of ["dragenter", "dragover"]) {
    dropzone.addEventListener(type, (e) => {
      e.preventDefault();
      if (e.dataTransfer) e.dataTransfer.dropEffect = "copy";
      dropzone.classList.add("over");
    });
  }
  dropzone.addEventListener("dragleave", (e) => {
    if (!dropzone.contains(e.relatedTarget)) dropzone.classList.remove("over");
  });
  dropzone.addEventListener("drop", (e) => {
    e.preventDefault();
    dropzone.classList.remove("over");
    if (e.dataTransfer) add(Array.from(e.dataTransfer.files));
  });
  // A file dropped next to the zone must not make the browser navigate away to it.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());

  clearButton.addEventListener("click", () => {
    for (let i = rows.length - 1; i >= 0; i -= 1) {
      if (rows[i].finished) {
        rows[i].el.remove();
        rows.splice(i, 1);
      }
    }
    updateOverall();
  });

  window.addEventListener("beforeunload", (e) => {
    if (running || queue.length) e.preventDefault();
  });

  document.documentElement.dataset.ready = "true";
  updateOverall();
})();
