"""s3proxy: stream multipart/form-data uploads into S3 multipart uploads.

Nothing touches disk, memory is bounded by one process-wide budget, and every
failure aborts what it started.
"""

__version__ = "0.1.0"
