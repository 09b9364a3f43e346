"""The ``s3proxy`` command: ``serve`` (flags with S3PROXY_* defaults), logging, run the app."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from s3proxy import __version__
from s3proxy import log as logsetup
from s3proxy.settings import Settings, SettingsError

log = logging.getLogger("s3proxy.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3proxy",
        description="Stream multipart/form-data uploads into S3, "
        "with bounded memory and no temp files.",
    )
    parser.add_argument("--version", action="version", version=f"s3proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the upload proxy",
        description="Run the upload proxy. Every flag can also be set with its S3PROXY_* "
        "environment variable; S3 credentials come from the standard AWS chain.",
    )
    Settings.add_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(vars(args), os.environ)
    except SettingsError as exc:
        print(f"s3proxy: error: {exc}", file=sys.stderr)
        return 2
    logsetup.setup(settings.log_level, settings.log_format)
    return serve(settings)


def serve(settings: Settings) -> int:
    from s3proxy.server import serve as run

    try:
        asyncio.run(run(settings))
    except OSError as exc:
        print(
            f"s3proxy: error: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        if type(exc).__name__ == "EmbeddedStoreError":
            print(f"s3proxy: error: {exc}", file=sys.stderr)
            return 1
        raise
    return 0
