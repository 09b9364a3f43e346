// Comparison design: the Node.js recipe most tutorials teach, express + multer + multer-s3
// with their defaults (multer-s3 streams each file through @aws-sdk/lib-storage's Upload:
// 5 MiB parts, 4 in flight, SDK default checksums). Only what a local S3 store needs is set:
// endpoint, path-style addressing, region and credentials from the environment.
'use strict';
const express = require('express');
const multer = require('multer');
const multerS3 = require('multer-s3');
const { S3Client } = require('@aws-sdk/client-s3');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const s3 = new S3Client({
  endpoint: arg('endpoint-url'),
  region: arg('region', 'us-east-1'),
  forcePathStyle: true,
});

const upload = multer({
  storage: multerS3({
    s3,
    bucket: arg('bucket'),
    key: (req, file, cb) => cb(null, `bench/multer-s3/${Date.now()}-${Math.random().toString(16).slice(2)}/${file.originalname}`),
  }),
});

const app = express();
app.get('/healthz', (req, res) => res.send('ok'));
app.post('/upload', upload.any(), (req, res) => {
  res.status(201).json({
    files: (req.files || []).map((f) => ({
      field: f.fieldname, filename: f.originalname, key: f.key, size: f.size, etag: f.etag,
    })),
    fields: req.body,
  });
});
app.use((err, req, res, next) => {
  res.status(500).json({ error: { code: 'upload_failed', message: String(err && err.message) } });
});

const server = app.listen(Number(arg('port')), arg('host', '127.0.0.1'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
