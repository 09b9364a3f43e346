"""The ``s3proxy`` command: ``serve`` (flags with S3PROXY_* defaults), logging, run the app."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from s3proxy import __version__
from s3proxy import log as logsetup
from s3proxy.settings import Settings, SettingsError
from s3proxy.sink import client_options

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

    token = sub.add_parser(
        "token",
        help="issue a signed upload token",
        description="Print an upload token signed with the first secret of S3PROXY_TOKEN_SECRET "
        "(or --token-secret-file). A browser sends it as Authorization: Bearer, "
        "X-Upload-Token or ?token=.",
    )
    token.add_argument("--prefix", required=True, help="key prefix the uploads go under (ends /)")
    token.add_argument("--ttl", default="15m", help="how long the token is valid [default 15m]")
    token.add_argument("--max-size", help="most bytes of file data per request (e.g. 100MiB)")
    token.add_argument("--type", action="append", default=[], help="allowed type (repeatable)")
    token.add_argument("--max-files", type=int, help="most files per request")
    token.add_argument("--subject", help="who the token is for (appears in logs)")
    token.add_argument("--token-secret-file", help="file of secrets; the first signs")

    cleanup = sub.add_parser(
        "cleanup",
        help="abort multipart uploads a crash left behind",
        description="List multipart uploads under the key template's prefix older than "
        "--older-than, and abort them with --execute (default: dry run). Takes the same "
        "S3 settings as serve.",
    )
    cleanup.add_argument("--older-than", default="24h", help="age threshold [default 24h]")
    cleanup.add_argument("--prefix", help="key prefix to sweep [default: the template's]")
    cleanup.add_argument("--execute", action="store_true", help="abort (default: dry run)")
    Settings.add_arguments(cleanup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "token":
            return issue_token(args)
        settings = Settings.load(vars(args), os.environ)
        if args.command == "cleanup":
            logsetup.setup(settings.log_level, settings.log_format)
            return asyncio.run(run_cleanup(settings, args))
    except (SettingsError, ValueError, OSError) as exc:
        print(f"s3proxy: error: {exc}", file=sys.stderr)
        return 2
    logsetup.setup(settings.log_level, settings.log_format)
    return serve(settings, argv)


def issue_token(args: argparse.Namespace) -> int:
    from s3proxy.settings import parse_duration, parse_size, read_secrets
    from s3proxy.tokens import issue

    inline = [v for v in os.environ.get("S3PROXY_TOKEN_SECRET", "").split(",") if v.strip()]
    path = args.token_secret_file or os.environ.get("S3PROXY_TOKEN_SECRET_FILE")
    secrets = read_secrets(inline, Path(path) if path else None)
    if not secrets:
        raise SettingsError("set S3PROXY_TOKEN_SECRET or --token-secret-file to sign tokens")
    token = issue(
        secrets[0].encode(),
        prefix=args.prefix,
        ttl=int(parse_duration(args.ttl)),
        max_size=parse_size(args.max_size) if args.max_size else None,
        types=args.type,
        max_files=args.max_files,
        subject=args.subject,
    )
    print(token)
    return 0


async def run_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    """One sweep with the serve settings' S3 client (the embedded store must be running)."""
    from datetime import timedelta

    from s3proxy.cleanup import sweep
    from s3proxy.keys import template_prefix
    from s3proxy.settings import parse_duration
    from s3proxy.sink import open_client

    opts = client_options(settings)
    async with open_client(opts) as client:
        result = await sweep(
            client,
            settings.bucket_name,
            template_prefix(settings.key_template) if args.prefix is None else args.prefix,
            timedelta(seconds=parse_duration(args.older_than)),
            dry_run=not args.execute,
        )
    verb = "aborted" if args.execute else "would abort (dry run; --execute to abort)"
    print(f"{len(result.found)} orphaned uploads found; {verb} {len(result.found)}")
    for orphan in result.found:
        print(f"  {orphan.initiated.isoformat()}  {orphan.key}  {orphan.upload_id}")
    for orphan, error in result.errors:
        print(f"  failed: {orphan.key}: {error}", file=sys.stderr)
    return 1 if result.errors else 0


def serve(settings: Settings, argv: Sequence[str]) -> int:
    from s3proxy.server import serve as run
    from s3proxy.server import supervise

    try:
        if settings.workers > 1:
            return asyncio.run(supervise(settings, argv))
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
