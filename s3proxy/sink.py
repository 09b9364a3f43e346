"""Former home of the S3 seam, now ``s3proxy.s3`` (the interface) and
``s3proxy.s3_aiobotocore`` (its implementation); these names are kept so that branches
written against them still import. New code imports from those modules."""

from s3proxy.s3 import Body, ObjectOptions, ObjectSink, ObjectStore
from s3proxy.s3_aiobotocore import AioObjectStore as S3Sink

__all__ = ["Body", "ObjectOptions", "ObjectSink", "ObjectStore", "S3Sink"]
