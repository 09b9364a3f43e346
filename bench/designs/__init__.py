"""Comparison designs: what s3proxy is measured against, not part of the package."""
