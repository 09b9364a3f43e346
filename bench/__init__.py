"""Benchmark harness for s3proxy and the comparison designs it is measured against.

Run ``python -m bench --help``. Nothing in here is imported by the ``s3proxy`` package.
"""
