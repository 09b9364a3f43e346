// Comparison design: tus's own Node.js server, @tus/server with @tus/s3-store, with their
// defaults (s3-store cuts every PATCH into parts it writes to os.tmpdir() before uploading
// them, up to 60 parts in flight, an in-memory locker, SDK default checksums). Only what
// a local S3 store needs is set (endpoint, path-style, region, credentials from the
// environment), and the part size, which every design of the bench is given alike.
import http from 'node:http';
import { Server } from '@tus/server';
import { S3Store } from '@tus/s3-store';

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const tus = new Server({
  path: '/tus',
  datastore: new S3Store({
    partSize: Number(arg('part-size', 8 * 1024 * 1024)),
    s3ClientConfig: {
      bucket: arg('bucket'),
      endpoint: arg('endpoint-url'),
      region: arg('region', 'us-east-1'),
      forcePathStyle: true,
    },
  }),
});

const server = http.createServer((req, res) => {
  if (req.url === '/healthz') {
    res.end('ok');
    return;
  }
  tus.handle(req, res);
});
server.listen(Number(arg('port')), arg('host', '127.0.0.1'));
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
