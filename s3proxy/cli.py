"""The ``s3proxy`` command: ``serve``, ``token`` and ``cleanup``.

Every command reports an operator's mistake or an outside failure as one line on
stderr (``s3proxy: error: ...``), never a traceback, and exits with:

* 0: done;
* 1: a runtime failure: cannot listen, the embedded store would not start, S3
  unreachable or refusing, some aborts of a cleanup failed;
* 2: a usage or settings error: a bad flag or value, a missing or short secret,
  no S3 credentials for ``cleanup``;
* 130: interrupted (Ctrl-C) before the command finished.

A bug still shows its traceback: only the failures listed here are caught.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar

from s3proxy import __version__
from s3proxy import log as logsetup
from s3proxy.settings import Settings, SettingsError

if TYPE_CHECKING:
    from s3proxy.embedded import StoreAccess

log = logging.getLogger("s3proxy.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: The settings ``cleanup`` uses; it neither shows nor reads (from S3PROXY_*) the rest.
CLEANUP_SETTINGS = (
    "endpoint_url",
    "region",
    "bucket",
    "key_template",
    "s3_connect_timeout",
    "s3_read_timeout",
    "s3_max_attempts",
    "data_dir",
    "embedded_s3_port",
    "log_level",
    "log_format",
    # serve's limits: the orphan threshold is derived from them (s3proxy.limits)
    "part_size",
    "max_file_size",
    "client_timeout",
    "min_upload_rate",
    "min_rate_window",
    "cleanup_clock_skew",
    # the record sweep's retention (``presign_record.retention``) is serve's: without it
    # cleanup removed records after 15 min + ..., while serve's retries still needed them
    "presign_expiry",
)

#: The settings ``token`` reads, the same way serve does.
TOKEN_SETTINGS = ("token_secret", "token_secret_file")

#: What ``cleanup`` reads from serve's environment but takes as its own flags
#: (--older-than, --prefix): the sweep's scope is serve's unless told otherwise.
CLEANUP_SCOPE = ("cleanup_older_than", "cleanup_prefix")

#: Where ``cleanup`` means a setting otherwise than ``serve``: it never starts a store.
CLEANUP_HELPS = {
    "endpoint_url": "S3 endpoint URL (e.g. https://s3.eu-west-1.amazonaws.com, "
    "http://minio:9000); unset: the embedded store `s3proxy serve` runs with the same "
    "--data-dir (it must be running)",
    "presign_expiry": "serve's --presign-expiry: a presigned upload's record is kept this long "
    "(and the claim's lease, the late checks, the clock skew) after its upload is gone",
}

#: What to add to an EmbeddedStoreError about a setting: the serve flag that sets it.
_EMBEDDED_HINTS = {
    "s3_port": " with --embedded-s3-port (0 picks a free one)",
    "data_dir": " (see --data-dir)",
}


class CommandError(Exception):
    """A one-line failure of a command, with the exit status it warrants."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as README's exit table says: one line, ``s3proxy: error:``,
    exit 2 (argparse prints the whole usage first, 40 lines for serve)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"s3proxy: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="s3proxy",
        description="Stream multipart/form-data uploads into S3, "
        "with bounded memory and no temp files.",
        epilog="Exit status: 0 done, 1 runtime failure, 2 usage or settings error.",
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
    token.add_argument(
        "--prefix", required=True, metavar="PREFIX", help="key prefix the uploads go under (ends /)"
    )
    token.add_argument(
        "--ttl", default="15m", metavar="DURATION", help="how long the token is valid [default 15m]"
    )
    token.add_argument(
        "--max-size", metavar="SIZE", help="most bytes of file data per request (e.g. 100MiB)"
    )
    token.add_argument(
        "--type", action="append", default=[], metavar="TYPE", help="allowed type (repeatable)"
    )
    token.add_argument("--max-files", type=int, metavar="N", help="most files per request")
    token.add_argument("--subject", metavar="NAME", help="who the token is for (appears in logs)")
    token.add_argument(
        "--token-secret-file", metavar="PATH", help="file of secrets; the first signs"
    )

    cleanup = sub.add_parser(
        "cleanup",
        help="abort multipart uploads a crash left behind",
        description="List multipart uploads under the key template's prefix that show no "
        "sign of life (no new part) for longer than a live upload can go without one, "
        "derived from serve's limits (give the same flags or S3PROXY_* variables), and "
        "abort them with --execute (default: dry run). With --older-than, judge by age "
        "alone. Takes serve's S3 settings; with no --endpoint-url it talks to the embedded "
        "store that `s3proxy serve` runs with the same --data-dir. Expired resumable uploads "
        "and lapsed presigned-complete claims go the same way.",
        epilog="Exit status: 0 done, 1 S3 unreachable or some aborts failed, "
        "2 usage or settings error.",
    )
    cleanup.add_argument(
        "--older-than",
        metavar="DURATION",
        help="judge by age alone: abort uploads initiated longer ago than this, even live "
        "ones [env S3PROXY_CLEANUP_OLDER_THAN, as serve; default: by activity, see above]",
    )
    cleanup.add_argument(
        "--prefix",
        action="append",
        metavar="PREFIX",
        help="key prefix to sweep (repeatable; '' for the whole bucket) "
        "[env S3PROXY_CLEANUP_PREFIX, as serve; default: the template's]",
    )
    cleanup.add_argument("--execute", action="store_true", help="abort (default: dry run)")
    Settings.add_arguments(cleanup, only=CLEANUP_SETTINGS, helps=CLEANUP_HELPS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # usage errors: argparse exits 2
    try:
        if args.command == "token":
            return issue_token(args)
        if args.command == "cleanup":
            settings = load_cleanup_settings(args)
            logsetup.setup(settings.log_level, settings.log_format)
            if settings.log_level != "debug":
                # "Found credentials in environment variables." on every run is noise
                # in a command's output (serve logs it once, at start, where it helps).
                logging.getLogger("aiobotocore.credentials").setLevel(logging.WARNING)
            warn_unknown_variables()
            return asyncio.run(run_cleanup(settings, args))
        settings = Settings.load(vars(args), os.environ)
        logsetup.setup(settings.log_level, settings.log_format)
        warn_unknown_variables()
        return serve(settings, argv)
    except SettingsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except CommandError as exc:
        return _fail(str(exc), exc.status)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)


def load_cleanup_settings(args: argparse.Namespace) -> Settings:
    """``cleanup``'s settings: serve's, with --older-than over S3PROXY_CLEANUP_OLDER_THAN,
    checked as serve checks --cleanup-older-than (at least 1m; 0 slipped through as a
    variable and aborted live uploads) and named as the flag given."""
    given = vars(args)
    if args.older_than is not None:
        try:
            Settings.load({"cleanup_older_than": args.older_than}, only=("cleanup_older_than",))
        except SettingsError as exc:
            raise SettingsError(str(exc).replace("--cleanup-older-than", "--older-than")) from None
        given = {**given, "cleanup_older_than": args.older_than}
    return Settings.load(given, os.environ, only=(*CLEANUP_SETTINGS, *CLEANUP_SCOPE))


def warn_unknown_variables() -> None:
    """One WARNING naming the S3PROXY_* variables that set nothing (misspelled?)."""
    from s3proxy.settings import unknown_variables

    unknown = unknown_variables(os.environ)
    if unknown:
        log.warning(
            "settings.unknown_variables names=%s: no setting has these names (misspelled?); "
            "they are ignored",
            ",".join(unknown),
        )


def _fail(message: str, status: int) -> int:
    print(f"s3proxy: error: {message}", file=sys.stderr)
    return status


T = TypeVar("T")


def _flag_value(parse: Callable[[str], T], flag: str, text: str) -> T:
    """``text`` parsed, or a SettingsError naming ``flag`` (the parser's own message
    names no flag)."""
    try:
        return parse(text)
    except ValueError as exc:
        raise SettingsError(f"{flag}: {exc}") from None


def issue_token(args: argparse.Namespace) -> int:
    from s3proxy.settings import parse_duration, parse_size
    from s3proxy.tokens import issue

    # Read as serve reads them (one parser: separators, the ' #' guard, short secrets),
    # so a token this command signs is one serve accepts.
    secrets = Settings.load(
        {"token_secret_file": args.token_secret_file}, os.environ, only=TOKEN_SETTINGS
    ).token_secrets()
    if not secrets:
        raise SettingsError("set S3PROXY_TOKEN_SECRET or --token-secret-file to sign tokens")
    # Each flag checked here, by its name (tokens.issue's messages name its arguments:
    # "max_size must be a positive integer or None", and --ttl 0.5 said "got 0").
    ttl = _flag_value(parse_duration, "--ttl", args.ttl)
    if ttl < 1:
        raise SettingsError(f"--ttl must be at least 1s, got {args.ttl!r}")
    max_size = None
    if args.max_size:  # empty: no limit, as the flag left out
        max_size = _flag_value(parse_size, "--max-size", args.max_size)
        if max_size < 1:
            raise SettingsError(f"--max-size must be at least 1 byte, got {args.max_size!r}")
    if args.max_files is not None and args.max_files < 1:
        raise SettingsError(f"--max-files must be at least 1, got {args.max_files}")
    try:
        token = issue(
            secrets[0].encode(),
            prefix=args.prefix,
            ttl=int(ttl),
            max_size=max_size,
            types=args.type,
            max_files=args.max_files,
            subject=args.subject,
        )
    except ValueError as exc:  # a bad --prefix or --type (tokens.issue checks them)
        raise SettingsError(str(exc)) from None
    print(token)
    return EXIT_OK


async def run_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    """One sweep with serve's S3 settings; with no endpoint, the running embedded store's."""
    from datetime import timedelta

    from s3proxy import presign_claim, presign_record
    from s3proxy.cleanup import Rule, sweep, sweep_tus
    from s3proxy.config import client_options
    from s3proxy.errors import ProxyError
    from s3proxy.s3_aiobotocore import open_store

    threshold, by_activity = settings.orphan_rule  # --older-than is in it
    rule = Rule(timedelta(seconds=threshold), by_activity=by_activity)
    prefixes = args.prefix if args.prefix is not None else list(settings.cleanup_prefixes)
    opts = client_options(settings)
    if settings.embedded:
        # Never the AWS chain's default endpoint: the store serve runs, or an error.
        port_given = args.embedded_s3_port is not None or bool(
            os.environ.get("S3PROXY_EMBEDDED_S3_PORT", "").strip()
        )
        access = _embedded_access(settings, port_given)
        opts = dataclasses.replace(
            opts,
            endpoint_url=access.endpoint_url,
            access_key=access.access_key,
            secret_key=access.secret_key,
        )
    try:
        async with open_store(opts, settings.bucket_name) as bucket:
            tus_uploads = await sweep_tus(
                bucket,
                dry_run=not args.execute,
                now=time.time(),
                skew=settings.cleanup_clock_skew,
            )
            result = await sweep(
                bucket, prefixes, rule, dry_run=not args.execute, keep=tus_uploads.live
            )
            claims = await presign_claim.sweep(
                bucket, time.time(), settings.cleanup_clock_skew, dry_run=not args.execute
            )
            records = await presign_record.sweep(
                bucket, time.time(), presign_record.retention(settings), dry_run=not args.execute
            )
    except ProxyError as exc:
        raise _cleanup_error(exc, settings, opts.endpoint_url) from None

    judged = (
        f"no sign of life for {threshold:.0f}s" if by_activity else f"over {threshold:.0f}s old"
    )
    print(f"orphaned: {judged}; {result.live} live uploads kept")
    if tus_uploads.live or tus_uploads.expired:
        done = "removed" if args.execute else "would remove"
        print(
            f"resumable (tus): {len(tus_uploads.live)} live kept; {len(tus_uploads.expired)} "
            f"expired, {done} {len(tus_uploads.removed if args.execute else tus_uploads.expired)}"
        )
    if claims:
        done = "removed" if args.execute else "would remove"
        print(f"presigned-complete claims: {claims} lapsed, {done} {claims}")
    if records.marked or records.removed or records.failed:
        mark, remove = ("marked", "removed") if args.execute else ("would mark", "would remove")
        failed_records = f"; failed {records.failed} (next sweep)" if records.failed else ""
        print(
            f"presigned-upload records: {records.kept} kept; {mark} {records.marked} gone, "
            f"{remove} {records.removed} past {presign_record.retention(settings):.0f}s"
            f"{failed_records}"
        )
    found, aborted, failed = len(result.found), len(result.aborted), len(result.errors)
    if args.execute:
        print(f"{found} orphaned uploads found; aborted {aborted}, failed {failed}")
    else:
        print(f"{found} orphaned uploads found; would abort {found} (dry run; --execute to abort)")
    for orphan in result.found:
        print(
            f"  initiated {orphan.initiated.isoformat()}  last active "
            f"{orphan.idle_since.isoformat()}  {orphan.key}  {orphan.upload_id}"
        )
    for orphan, error in result.errors:
        print(f"s3proxy: abort failed: {orphan.key} {orphan.upload_id}: {error}", file=sys.stderr)
    return EXIT_FAILURE if result.errors else EXIT_OK


def _embedded_access(settings: Settings, port_given: bool) -> StoreAccess:
    """The running embedded store's endpoint and keys, or a one-line error saying where
    they were sought. Its port is the one it recorded at start (``ports.json``) unless
    --embedded-s3-port is given: serve may have been told another than the default."""
    from s3proxy.embedded import (
        EmbeddedStoreError,
        credentials_path,
        recorded_s3_port,
        store_access,
    )

    port = settings.embedded_s3_port
    if not port_given:
        port = recorded_s3_port(settings.data_dir) or port
    try:
        return store_access(settings.data_dir, port)
    except FileNotFoundError:
        raise SettingsError(
            f"no embedded store keys at {credentials_path(settings.data_dir)}: pass the "
            "--data-dir that `s3proxy serve` uses (S3PROXY_DATA_DIR; it is relative to the "
            "directory serve runs in), or --endpoint-url and --bucket for another S3"
        ) from None
    except EmbeddedStoreError as exc:
        raise CommandError(str(exc)) from None


def _cleanup_error(exc: Exception, settings: Settings, endpoint: str | None) -> CommandError:
    from s3proxy.errors import UPSTREAM_UNAVAILABLE, ProxyError
    from s3proxy.s3 import NoCredentials

    if isinstance(exc, NoCredentials):
        return CommandError(
            "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or another source of the standard AWS chain",
            EXIT_USAGE,
        )
    message = exc.message if isinstance(exc, ProxyError) else str(exc)
    if settings.embedded and isinstance(exc, ProxyError) and exc.kind == UPSTREAM_UNAVAILABLE:
        where = (endpoint or "").removeprefix("http://")
        message += f"; is the embedded store running (`s3proxy serve`, S3 on {where})?"
    return CommandError(message)


def serve(settings: Settings, argv: Sequence[str]) -> int:
    from s3proxy.embedded import EmbeddedStoreError
    from s3proxy.server import ListenError, run_in_loop, supervise
    from s3proxy.server import serve as run

    try:
        if settings.workers > 1:
            return run_in_loop(settings, lambda: supervise(settings, argv))
        run_in_loop(settings, lambda: run(settings))
    except ListenError as exc:
        raise CommandError(str(exc)) from None
    except EmbeddedStoreError as exc:
        raise CommandError(f"{exc}{_EMBEDDED_HINTS.get(exc.setting or '', '')}") from None
    return EXIT_OK
