// The bench's tus client: tus-js-client in Node.js uploading generated bodies, nothing read
// from disk. One job per process, as JSON on stdin:
//   {"url": ".../tus/", "count": 16, "size": N, "seed": 1, "offsets": [...],
//    "chunk_size": null | bytes, "headers": {...}, "limit_s": 600}
// and one JSON line on stdout: {"uploads": [{"ok", "latency", "size", "url", "headers",
// "error"}, ...]}, "headers" being the final response's (the server may name the key there).
//
// The body is bench/body.py's, byte for byte: 1 MiB windows of a shake256 pool at offsets
// the harness computes (blake2b with an 8-byte digest, which Node's crypto lacks). A custom
// fileReader hands tus-js-client each chunk as a Readable with a known size, so a PATCH
// streams and nothing is buffered whole, even with chunkSize Infinity (one PATCH per file:
// tus-js-client's own StreamSource would buffer a whole chunk in memory).
import crypto from 'node:crypto';
import { Readable } from 'node:stream';
import * as tus from 'tus-js-client';

const BLOCK = 1 << 20;
const POOL = 16 << 20;

function pool(seed) {
  const h = crypto.createHash('shake256', { outputLength: POOL + BLOCK });
  h.update(`s3proxy-bench:${seed}`);
  return h.digest();
}

// Bytes [start, end) of the body as a stream of pool slices (no copies).
function bodyRange(buf, offsets, start, end) {
  let pos = start;
  const stream = new Readable({
    read() {
      if (pos >= end) {
        this.push(null);
        return;
      }
      const index = Math.floor(pos / BLOCK);
      const within = pos - index * BLOCK;
      const n = Math.min(BLOCK - within, end - pos);
      const off = offsets[index] + within;
      pos += n;
      this.push(buf.subarray(off, off + n));
    },
  });
  stream.size = end - start;
  return stream;
}

class GeneratedSource {
  constructor(buf, offsets, size) {
    this.buf = buf;
    this.offsets = offsets;
    this.size = size;
  }

  slice(start, end) {
    const stop = Math.min(end, this.size);
    return Promise.resolve({ value: bodyRange(this.buf, this.offsets, start, stop), done: stop >= this.size });
  }

  close() {}
}

function uploadOne(job, buf, i) {
  const t0 = performance.now();
  const name = `bench-${job.size}-${i}.bin`;
  return new Promise((resolve) => {
    const finish = (fields) => resolve({ latency: (performance.now() - t0) / 1000, size: job.size, name, ...fields });
    const upload = new tus.Upload({ generated: i }, {
      endpoint: job.url,
      chunkSize: job.chunk_size == null ? Infinity : job.chunk_size,
      uploadSize: job.size,
      metadata: { filename: name, filetype: 'application/octet-stream' },
      headers: job.headers || {},
      // retryDelays: tus-js-client's default, [0, 1000, 3000, 5000] ms, as its users get
      storeFingerprintForResuming: false,
      fileReader: { openFile: () => Promise.resolve(new GeneratedSource(buf, job.offsets, job.size)) },
      fingerprint: () => Promise.resolve(null),
      onSuccess: (payload) => {
        const res = payload && payload.lastResponse;
        const headers = {};
        for (const h of job.report_headers || []) {
          const v = res && res.getHeader(h);
          if (v) headers[h] = v;
        }
        finish({ ok: true, url: upload.url, headers, error: '' });
      },
      onError: (err) => finish({ ok: false, url: upload.url, headers: {}, error: String(err).slice(0, 300) }),
    });
    upload.start();
  });
}

async function main() {
  let text = '';
  for await (const chunk of process.stdin) text += chunk;
  const job = JSON.parse(text);
  const buf = pool(job.seed);
  const timer = setTimeout(() => {
    process.stdout.write(`${JSON.stringify({ error: 'timed out' })}\n`);
    process.exit(1);
  }, job.limit_s * 1000);
  const uploads = await Promise.all(Array.from({ length: job.count }, (_, i) => uploadOne(job, buf, i)));
  clearTimeout(timer);
  process.stdout.write(`${JSON.stringify({ uploads })}\n`);
}

main();
