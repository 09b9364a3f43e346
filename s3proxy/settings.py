"""The one frozen settings object, loaded from CLI flags and ``S3PROXY_*`` variables.

Every field carries its help text; the CLI flags (``--part-size``) and environment
variables (``S3PROXY_PART_SIZE``) are derived from the field names, so the three can
never drift apart. Precedence: flag, then environment, then the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3proxy import checksums, keys, limits, parts

log = logging.getLogger("s3proxy.settings")

ENV_PREFIX = "S3PROXY_"

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class SettingsError(ValueError):
    """A missing or invalid setting; the message is one line meant for a human."""


def parse_size(text: str) -> int:
    """Parse ``1048576``, ``10MiB``, ``1.5GiB`` or ``5MB`` into bytes."""
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes or a unit such as 10MiB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


#: botocore's check of a region name (botocore.utils.validate_region_name: a host label),
#: but not empty (which it lets through, and the signer then refuses on every call).
_REGION_RE = re.compile(r"(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)")
#: S3's bucket naming rules (general purpose buckets): 3-63 of a-z 0-9 . -, a letter or
#: digit at each end, no "..". Checked for the embedded store only (weed mini just logs a
#: bad -bucket); another S3 may hold older names (us-east-1's legacy capitals) and says so.
_BUCKET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def bucket_name_problem(name: str) -> str | None:
    """Why ``name`` is no valid S3 bucket name (None: it is one). Pure."""
    if not _BUCKET_NAME_RE.fullmatch(name) or ".." in name:
        return (
            f"{name!r} is not a valid S3 bucket name "
            "(3-63 characters: lower-case letters, digits, dots and hyphens)"
        )
    return None


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


#: The most attempts of one S3 call --s3-max-attempts takes. botocore sets no cap, but an
#: S3 call can then last attempts x the timeouts (and the orphan threshold twice that):
#: past a hundred it is a typo, not a retry policy (botocore's standard mode makes 3).
MAX_S3_ATTEMPTS = 100

#: The longest duration any setting takes: past it, dates and timers overflow (a tus
#: URL's expiry past the year 9999, the sweep's timedelta) and no wait is meant.
MAX_DURATION = 3650 * 86400.0


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``24h`` or ``7d``, at most 3650d."""
    m = _DURATION_RE.match(str(text).lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use seconds or 90s, 15m, 24h, 7d)")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than the longest duration taken, 3650d")
    return seconds


def format_duration(seconds: float) -> str:
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def _parse_auto_duration(text: str) -> float | None:
    """``auto`` (None: derived) or a duration."""
    return None if str(text).strip().lower() == "auto" else parse_duration(text)


def _show_auto_duration(seconds: float | None) -> str:
    return "auto" if seconds is None else format_duration(seconds)


def _shown_default(default: Any, show: Callable[[Any], str] | None) -> str:
    """A default as --help and README's table write it: ``auto`` for derived ones,
    ``unset``, booleans as they are typed (``true``)."""
    if show is _show_auto_duration:
        return show(default)
    if default is None or default == ():
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    return show(default) if show else str(default)


def _parse_opt_duration(text: str) -> float | None:
    """Empty (None: unset) or a duration."""
    return parse_duration(text) if str(text).strip() else None


def parse_count(text: str) -> int:
    """A whole number such as ``8080`` or ``5`` (int()'s own message, "invalid literal for
    int() with base 10", named no flag's wants)."""
    try:
        return int(str(text).strip())
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None


def _parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _opt_str(text: str) -> str | None:
    return text or None


# --event-loop: s3proxy.server.loop_factory turns the choice into a loop.
EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def _choice(value: str, choices: Sequence[str], source: str) -> str:
    """``value`` as its choice is spelled, matched in any case (``--sse aes256`` is
    ``AES256``, ``--download-mode REDIRECT`` is ``redirect``), for every choice setting."""
    for choice in choices:
        if value.strip().lower() == choice.lower():
            return choice
    raise SettingsError(f"{source} must be one of {', '.join(choices)}, got {value!r}")


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _unset_by_default(f: dataclasses.Field[Any]) -> bool:
    """Whether --help and README show the field's default as ``unset`` or ``auto``: an
    empty value of such a setting means that default (README "Configuration"), decided
    by what is shown so the two cannot disagree (S3PROXY_CHECKSUM= was refused, its
    default the string "auto", not None)."""
    return _shown_default(_default(f), f.metadata["show"]) in ("unset", "auto")


def _setting(
    default: Any,
    help: str,
    parse: Callable[[str], Any] = str,
    *,
    repeat: bool = False,
    choices: Sequence[str] | None = None,
    show: Callable[[Any], str] | None = None,
    secret: bool = False,
    metavar: str | None = None,
    split: str = r"[,\s]+",
) -> Any:
    meta = {
        "split": split,  # a repeatable setting's variable: what separates its values
        "help": help,
        "parse": parse,
        "repeat": repeat,
        "choices": choices,
        "show": show,
        "metavar": metavar,
    }
    if repeat:
        return field(default_factory=lambda: tuple(default), metadata=meta, repr=not secret)
    return field(default=default, metadata=meta, repr=not secret)


def _path(text: str) -> Path:
    """A path with ``~`` expanded, as a shell would: an env file or a quoted flag leaves
    it, and the store used $HOME/x while the start log named <cwd>/~/x."""
    return Path(text).expanduser()


def _opt_path(text: str) -> Path | None:
    return _path(text) if text else None


#: `` # ...`` after a value: a comment an env file kept (systemd does not strip it), which
#: would else be read as part of the value, or as more API keys of a repeatable setting;
#: after a key in a key file, it is refused alike (``_secret_lines``).
_TRAILING_COMMENT = re.compile(r"\s#")


def read_secrets(values: Sequence[str], path: Path | None) -> tuple[str, ...]:
    """Secrets given inline plus those in a file (one per line, # comments)."""
    found = [v.strip() for v in values if v.strip()]
    if path is not None:
        found += [line for _, line in _secret_lines(path)]
    return tuple(found)


#: A UTF-8 byte order mark, as a str.
BOM = "\ufeff"


def _secret_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, secret) for each secret in a file; ValueError naming the file (and
    line) if it is unreadable or a line is ambiguous.

    Read as an ``S3PROXY_*`` value is, so a key means the same from either: a UTF-8 BOM an
    editor wrote at the start is dropped (kept, the first key matched no client's), and a
    key followed by `` #`` is refused as the variable is (kept whole, ``key1 # old``
    matched neither ``key1`` nor anything a client sent; dropped, a key holding `` #`` would
    be cut short without a word). Lines starting with ``#`` are comments. A BOM anywhere
    else is refused: an editor's artefact, never part of a key.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is no key's
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    found: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if _TRAILING_COMMENT.search(line):
            raise ValueError(
                f"{path} line {n}: a comment (' #') follows the key; put comments on "
                "lines of their own (a key cannot hold ' #')"
            )
        if BOM in line:
            # Only the file's first is dropped: a second (saved twice with one, or two
            # files joined) is no key's either, and kept, the key matched nothing.
            raise ValueError(
                f"{path} line {n}: a byte order mark (U+FEFF) inside the key, as files "
                "joined or saved twice with one leave; remove it"
            )
        found.append((n, line))
    return found


def bearer_problem(key: str) -> str | None:
    """What in ``key`` a client cannot send as ``Authorization: Bearer <key>`` (None:
    nothing), named without the key. Whitespace is no part of a Bearer token (RFC 6750);
    a control character cannot be in a header;
    other than ASCII reaches the proxy as different bytes from client to client (browsers
    refuse it, Python's http.client sends latin-1, curl the terminal's UTF-8). Visible
    ASCII is left: RFC 6750's b64token (letters, digits, ``-._~+/``, then ``=``) is
    narrower, but the proxy compares whatever follows ``Bearer``."""
    for c in key:
        if c in " \t":
            return "a space or tab"
        if c == BOM:
            return "a byte order mark (U+FEFF)"
        if not c.isascii():
            return f"a non-ASCII character (U+{ord(c):04X})"
        if not c.isprintable():
            return f"a control character (U+{ord(c):04X})"
    return None


def _secrets_found(
    inline: Sequence[str], path: Path | None, inline_name: str, noun: str, file_flag: str
) -> list[tuple[str, str, str]]:
    """Every key or secret given, as (setting, where in it, value), for a check to name
    where a bad one came from; an unreadable file is a SettingsError."""
    found = [(inline_name, f"{noun} {i}", v.strip()) for i, v in enumerate(inline, 1)]
    if path is not None:
        try:
            lines = _secret_lines(path)
        except ValueError as exc:
            raise SettingsError(f"{file_flag}: {exc}") from None
        found += [(file_flag, f"{path} line {n}", v) for n, v in lines]
    return found


def check_api_keys(inline: Sequence[str], path: Path | None, *, inline_name: str) -> None:
    """Raise SettingsError naming the setting (and file line) if an API key cannot be
    sent as a Bearer token (``bearer_problem``) or its file is unreadable. Such a key was
    taken silently and matched no request. The key itself is never part of the message."""
    for name, where, value in _secrets_found(inline, path, inline_name, "key", "--api-key-file"):
        problem = bearer_problem(value)
        if problem is not None:
            raise SettingsError(
                f"{name}: {where}: {problem} in the key, which no client can send in "
                "'Authorization: Bearer <key>'; use letters, digits and -._~+/= "
                "(make one with: openssl rand -hex 32)"
            )


#: Settings whose value is a URL the proxy sends to or signs for.
URL_SETTINGS = ("endpoint_url", "presign_endpoint_url", "webhook_url")

#: Settings whose value is a credential: given but empty, the proxy would run open.
CREDENTIAL_SETTINGS = ("api_key", "api_key_file", "token_secret", "token_secret_file")


def _no_credential(names: str) -> str:
    """The one-line refusal of a credential setting that is given but holds none."""
    return (
        f"{names} is given but holds no key (blank, or a file of only comments): the proxy "
        "would run without authentication; give a key, or leave the setting unset"
    )


#: HMAC-SHA256 keys shorter than the hash output (32 bytes) weaken it, and a short
#: secret is guessable offline from one token (RFC 2104, section 3).
MIN_TOKEN_SECRET_BYTES = 32


def check_token_secrets(inline: Sequence[str], path: Path | None, *, inline_name: str) -> None:
    """Raise SettingsError naming the setting if a token secret is short or unreadable.

    ``inline_name`` says where the inline secrets came from (the flag or the variable).
    The secret itself is never part of the message.
    """
    found = _secrets_found(inline, path, inline_name, "secret", "--token-secret-file")
    for name, where, value in found:
        size = len(value.encode())
        if value and size < MIN_TOKEN_SECRET_BYTES:
            raise SettingsError(
                f"{name}: {where} is {size} bytes; token secrets must be at least "
                f"{MIN_TOKEN_SECRET_BYTES} bytes (make one with: openssl rand -hex 32)"
            )


_METAVARS: dict[Callable[[str], Any], str] = {
    parse_size: "SIZE",
    parse_duration: "DURATION",
    _parse_bool: "BOOL",
    _opt_path: "PATH",
    _path: "PATH",
}


def _metavar(f: dataclasses.Field[Any]) -> str:
    """What a flag's value is, for --help: SIZE, DURATION, BOOL, URL, PATH, N, ..."""
    meta = f.metadata
    if meta["metavar"]:
        return str(meta["metavar"])
    if meta["parse"] in _METAVARS:
        return _METAVARS[meta["parse"]]
    if f.name.endswith("_port") or f.name == "port":
        return "PORT"
    if meta["parse"] is parse_count:
        return "N"
    if f.name.endswith("_url"):
        return "URL"
    return f.name.rsplit("_", 1)[-1].upper()  # host, region, bucket, origin, secret, ...


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:9100`` or ``[::1]:9100`` as (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r} (e.g. 127.0.0.1:9100)")
    return host, int(port)


def url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets (RFC 3986, 3.2.2)."""
    return f"[{host}]" if ":" in host else host


def worker_listen(text: str, index: int) -> str:
    """Worker ``index``'s own ``--metrics-listen``: the port plus its index. One shared
    (SO_REUSEPORT) port would answer each scrape from a random worker: counters that
    jump back and forth, and no way to reach a given worker's gauges."""
    host, port = parse_listen(text)
    return f"{url_host(host)}:{port + index}"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``S3PROXY_*`` variables that name no setting (a typo such as
    ``S3PROXY_MEMORY_BUGDET`` is otherwise ignored without a word). Pure."""
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    return sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known)


@dataclass(frozen=True)
class Settings:
    """Everything the proxy can be told. Defaults are what production wants."""

    # network
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8080, "port to listen on", parse_count)
    # who may upload
    api_key: tuple[str, ...] = _setting(
        (),
        "API key accepted as Authorization: Bearer "
        "(repeatable; prefer the env var, comma-separated)",
        repeat=True,
        secret=True,
        # commas only: a key with a space in it is refused whole (bearer_problem), never
        # taken as several keys, one as short as "2" (reprobe9b F1)
        split=r"\s*,\s*",
    )
    api_key_file: Path | None = _setting(  # noqa: RUF009 - Path is immutable
        None, "file of API keys, one per line", _opt_path, show=str
    )
    token_secret: tuple[str, ...] = _setting(
        (),
        "HMAC secret for signed upload tokens (repeatable for rotation; prefer the env var)",
        repeat=True,
        secret=True,
    )
    token_secret_file: Path | None = _setting(  # noqa: RUF009 - Path is immutable
        None, "file of token secrets, one per line (the first issues tokens)", _opt_path, show=str
    )
    insecure_no_auth: bool = _setting(
        False, "allow unauthenticated uploads on a non-loopback address", _parse_bool
    )
    cors_origin: tuple[str, ...] = _setting(
        (), "origin allowed to upload from a browser (repeatable; * for any)", repeat=True
    )
    # S3 backend
    endpoint_url: str | None = _setting(
        None,
        "S3 endpoint URL (e.g. https://s3.eu-west-1.amazonaws.com, http://minio:9000); "
        "unset: start the embedded SeaweedFS store",
        _opt_str,
    )
    region: str = _setting("us-east-1", "S3 region used for signing")
    bucket: str | None = _setting(
        None,
        "bucket to store uploads in (required with --endpoint-url; embedded: uploads)",
        _opt_str,
    )
    # streaming
    part_size: int = _setting(
        8 * 1024**2,
        "S3 multipart part size (at least 5MiB; grows for large files to stay within 10,000 parts)",
        parse_size,
        show=format_size,
    )
    parts_in_flight: int = _setting(
        2, "parts of one file uploading to S3 while the next is read from the client", parse_count
    )
    memory_budget: int = _setting(
        256 * 1024**2,
        "process-wide bytes of part buffers; when spent, clients are not read (TCP backpressure)",
        parse_size,
        show=format_size,
    )
    read_buffer: int = _setting(
        256 * 1024,
        "most bytes one socket read takes while an upload waits for them to fill a part "
        "(and the read chunk size); other reads take 256KiB (1MiB: less CPU, more memory)",
        parse_size,
        show=format_size,
    )
    client_timeout: float = _setting(
        60.0,
        "seconds a client may send no bytes before its upload is aborted (408), or accept "
        "no bytes of a streamed download before it is cut off",
        parse_duration,
        show=format_duration,
    )
    # limits
    max_file_size: int = _setting(
        5 * 1024**3, "largest file accepted", parse_size, show=format_size
    )
    max_files: int = _setting(20, "most files accepted in one request", parse_count)
    max_fields: int = _setting(
        100,
        "most non-file form fields accepted in one request (unused file inputs count as fields)",
        parse_count,
    )
    max_field_size: int = _setting(
        64 * 1024, "largest non-file form field value", parse_size, show=format_size
    )
    max_request_size: int = _setting(
        10 * 1024**3, "largest request body", parse_size, show=format_size
    )
    # objects
    key_template: str = _setting(
        "uploads/{yyyy}/{mm}/{uuid}/{filename}",
        "object key template; fields, used plainly: {yyyy} {mm} {dd} {uuid} {filename} {field}; "
        "without {uuid} two uploads can get one key (see --no-overwrite)",
    )
    allow_type: tuple[str, ...] = _setting(
        (),
        "allowed content type (repeatable; wildcards like image/*); none: allow all",
        repeat=True,
    )
    acl: str | None = _setting(None, "canned ACL for stored objects (e.g. private)", _opt_str)
    storage_class: str | None = _setting(
        None, "storage class for stored objects (e.g. STANDARD_IA)", _opt_str
    )
    sse: str | None = _setting(
        None, "server-side encryption (AES256 or aws:kms)", _opt_str, choices=("AES256", "aws:kms")
    )
    sse_kms_key_id: str | None = _setting(
        None, "KMS key id with --sse aws:kms", _opt_str, metavar="KEY_ID"
    )
    # S3 client
    s3_connect_timeout: float = _setting(
        10.0, "seconds to connect to S3", parse_duration, show=format_duration
    )
    s3_read_timeout: float = _setting(
        120.0,
        "seconds to wait for an S3 socket read, and for a whole S3 answer once the request is sent",
        parse_duration,
        show=format_duration,
    )
    s3_max_attempts: int = _setting(
        5,
        "attempts per S3 call, 1-100 (transient errors retried with backoff; more is a "
        "mistake: a call could then take attempts x the timeouts)",
        parse_count,
    )
    s3_max_connections: int = _setting(
        64,
        "S3 connection pool size, at least 2; streamed downloads take at most three quarters "
        "of it (the rest, at least one, is kept for short calls such as /readyz's)",
        parse_count,
    )
    sign_payload: bool = _setting(
        False,
        "sha256-sign each part's payload (costs a hash pass; off sends UNSIGNED-PAYLOAD)",
        _parse_bool,
    )
    request_checksum: str = _setting(
        "when_required",
        "botocore request checksums (when_supported adds CRC32 to every part)",
        choices=("when_required", "when_supported"),
    )
    # direct-to-S3 uploads and downloads
    presign_expiry: float = _setting(
        900.0, "how long presigned URLs stay valid", parse_duration, show=format_duration
    )
    presign_endpoint_url: str | None = _setting(
        None,
        "S3 endpoint as browsers reach it, for presigned URLs (default: --endpoint-url)",
        _opt_str,
    )
    presign_multipart_threshold: int = _setting(
        100 * 1024**2,
        "files above this size are signed as a multipart upload (at most 5GiB)",
        parse_size,
        show=format_size,
    )
    download_mode: str = _setting(
        "stream",
        "GET /files/{key}: stream through the proxy, or redirect to a presigned URL",
        choices=("stream", "redirect"),
    )
    page: bool = _setting(True, "serve the upload page at GET /", _parse_bool)
    # completion webhook
    webhook_url: str | None = _setting(
        None, "POST a JSON description of each completed request here", _opt_str
    )
    webhook_secret: str | None = _setting(
        None,
        "HMAC-SHA256 key for the webhook's X-S3Proxy-Signature (prefer the env var)",
        _opt_str,
        secret=True,
    )
    webhook_timeout: float = _setting(
        10.0, "seconds one webhook attempt may take", parse_duration, show=format_duration
    )
    webhook_attempts: int = _setting(
        5, "webhook attempts, with backoff, before giving up", parse_count
    )
    webhook_failure: str = _setting(
        "rollback",
        "when the webhook keeps failing: rollback (delete the files, answer 502) "
        "or keep (keep the files, log, answer 201)",
        choices=("rollback", "keep"),
    )
    # embedded store
    data_dir: Path = _setting(  # noqa: RUF009 - Path is immutable
        Path("s3proxy-data"), "embedded store: where its data lives", _path, show=str
    )
    embedded_s3_port: int = _setting(8333, "embedded store: S3 port", parse_count)
    # operations
    workers: int = _setting(
        1,
        "worker processes sharing the port (SO_REUSEPORT), each with its own budget",
        parse_count,
    )
    reuse_port: bool = _setting(
        False,
        "bind with SO_REUSEPORT (set for workers; lets several processes share the port)",
        _parse_bool,
    )
    cleanup_interval: float | None = _setting(
        None,
        "sweep for orphaned multipart uploads (a crash's) about this often, with jitter; "
        "unset or auto: a quarter of the orphan threshold (--cleanup-older-than); 0: never",
        _parse_auto_duration,
        show=_show_auto_duration,
        metavar="DURATION",
    )
    cleanup_older_than: float | None = _setting(
        None,
        "judge orphans by age alone: abort multipart uploads initiated longer ago than this, "
        "even live ones (unset: abort uploads with no new part for twice the longest gap a "
        "live upload leaves between parts, derived from the limits, plus the clock skew)",
        _parse_opt_duration,
        show=format_duration,
        metavar="DURATION",
    )
    cleanup_prefix: tuple[str, ...] = _setting(
        (),
        "key prefix to sweep (repeatable; '' for the whole bucket, e.g. with upload tokens; "
        "the variable is comma-separated, spaces belong to a prefix); none: the key template's",
        repeat=True,
        metavar="PREFIX",
        split=r"\s*,\s*",  # a key prefix may hold spaces ("my uploads/")
    )
    cleanup_clock_skew: float = _setting(
        60.0,
        "how far the clocks of instances and of the store may disagree; added to the "
        "orphan threshold",
        parse_duration,
        show=format_duration,
    )
    shutdown_timeout: float = _setting(
        30.0,
        "seconds in-flight uploads get to finish on shutdown before they are aborted",
        parse_duration,
        show=format_duration,
    )
    log_level: str = _setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = _setting("text", "log format", choices=("text", "json"))
    # embedded store supervision (weed is restarted whenever it exits, never given up on)
    embedded_restart_delay: float = _setting(
        0.5,
        "embedded store: seconds before restarting weed after it exits; doubles per exit "
        "in a row, back to this after a minute up",
        parse_duration,
        show=format_duration,
    )
    embedded_restart_max_delay: float = _setting(
        30.0, "embedded store: longest wait between restarts", parse_duration, show=format_duration
    )
    # connections (README "Limits and timeouts")
    header_timeout: float = _setting(
        10.0,
        "seconds a request head may take, from connection open or its first byte (slowloris), "
        "also when that byte comes in the same read as the request before it",
        parse_duration,
        show=format_duration,
    )
    keepalive_timeout: float = _setting(
        15.0,
        "seconds an idle keep-alive connection stays open (set above a load balancer's idle "
        "timeout when it keeps connections open)",
        parse_duration,
        show=format_duration,
    )
    max_connections: int = _setting(
        1024,
        "open client connections; past it only /healthz and /readyz are served (a few "
        "more), the rest get 503 OVERLOADED; lowered to fit RLIMIT_NOFILE",
        parse_count,
    )
    metrics_listen: str | None = _setting(
        None,
        "HOST:PORT of a second listener serving /metrics, /healthz and a detailed /readyz "
        "without auth (e.g. 127.0.0.1:9100)",
        _opt_str,
        metavar="HOST:PORT",
    )
    # fair memory and slow clients (issue #11)
    min_upload_rate: int = _setting(
        32 * 1024,
        "slowest a request body may arrive, in bytes/s over --min-rate-window (408 below it); "
        "a client filling a part below it while others wait for memory is cut off at once",
        parse_size,
        show=format_size,
        metavar="BYTES_PER_S",
    )
    min_rate_window: float = _setting(
        30.0,
        "seconds of client time the upload and download rates are averaged over (the first "
        "window is grace)",
        parse_duration,
        show=format_duration,
    )
    min_download_rate: int = _setting(
        32 * 1024,
        "slowest a client may accept a streamed download, in bytes/s over --min-rate-window "
        "(cut off below it: it holds an S3 connection)",
        parse_size,
        show=format_size,
        metavar="BYTES_PER_S",
    )
    max_fields_size: int = _setting(
        256 * 1024,
        "most bytes of non-file form field values in one request, counted in the memory "
        "budget (413 over it)",
        parse_size,
        show=format_size,
    )
    max_sign_body: int = _setting(
        64 * 1024,
        "largest JSON body of a POST /sign* request (413 over it)",
        parse_size,
        show=format_size,
    )
    # nothing overwritten (issue #12)
    no_overwrite: bool | None = _setting(
        None,
        "refuse to replace an object: writes carry If-None-Match: *, a key that exists "
        "is 409 KEY_EXISTS; unset: on for a --key-template without {uuid} (a uuid key is "
        "already new); false with such a template: the last upload wins",
        _parse_bool,
    )
    # integrity (issue #12; README "Integrity")
    checksum: str = _setting(
        "auto",
        "checksum every part and object S3 must verify (auto: crc64nvme); off sends none, "
        "for stores that refuse them",
        choices=checksums.CHECKSUM_MODES,
    )
    # rolling restarts and readiness (issue #14; README "Operating it")
    drain_delay: float | None = _setting(
        None,
        "on SIGTERM, seconds /readyz answers 503 while new requests are still served, before "
        "the listener closes (new connections refused); set it to at least the load "
        "balancer's check interval x fall count; auto: 6s (HAProxy's inter 2s x fall 3) "
        "once anything has asked /readyz, else 0",
        _parse_auto_duration,
        show=_show_auto_duration,
        metavar="DURATION",
    )
    readiness_interval: float = _setting(
        1.0,
        "seconds between the background store checks (HeadBucket) /readyz answers from",
        parse_duration,
        show=format_duration,
    )
    readiness_timeout: float = _setting(
        1.0,
        "seconds one background store check may take before /readyz says 503 UPSTREAM_TIMEOUT",
        parse_duration,
        show=format_duration,
    )
    tus: bool = _setting(True, "serve resumable uploads (tus 1.0.0) at /tus/", _parse_bool)
    tus_expiry: float = _setting(
        86400.0,
        "how long a resumable upload may take from its creation (Upload-Expires); then its "
        "URL stops working and the sweep removes what it stored (at least 60s)",
        parse_duration,
        show=format_duration,
    )
    tus_lock_lease: float = _setting(
        30.0,
        "seconds a resumable upload's PATCH holds its lock without renewing it; a killed "
        "instance's upload can be resumed elsewhere this long (plus --cleanup-clock-skew) "
        "after it died (at least 0.5s)",
        parse_duration,
        show=format_duration,
    )
    # speed (issue #15; README "Benchmarks")
    event_loop: str = _setting(
        "asyncio",
        "event loop: asyncio (the standard library's) or uvloop; auto: uvloop when "
        "installed (measured: no difference in CPU per GiB, see README Benchmarks)",
        choices=EVENT_LOOPS,
    )
    lean_upload_part: bool = _setting(
        True,
        "send UploadPart, PutObject, CreateMultipartUpload, CompleteMultipartUpload and "
        "PutObjectTagging without botocore's per-call work: signed, retried and their errors "
        "shaped as botocore's, ~1.5 ms CPU instead of ~4.5 (README Benchmarks)",
        _parse_bool,
    )

    def __post_init__(self) -> None:
        self.validate()

    def log_warnings(self) -> None:
        """Warn of settings that work but cost something; the server calls it once logging
        is set up (not at construction: a copy is made at start, and a line printed
        before the log's format is set breaks --log-format json)."""
        if self.no_overwrite is False and not keys.unique_keys(self.key_template):
            log.warning(
                "settings.overwrite key_template=%s: uploads to one key replace each other, and "
                "a write whose answer was lost may land after a later upload's and replace it "
                "(--no-overwrite false)",
                self.key_template,
            )

    @property
    def orphan_rule(self) -> tuple[float, bool]:
        """(threshold seconds, judged by activity) of the orphan sweep (s3proxy.cleanup)."""
        if self.cleanup_older_than is not None:
            return self.cleanup_older_than, False
        return limits.orphan_after(self, self.cleanup_clock_skew), True

    @property
    def sweep_every(self) -> float:
        """Seconds between orphan sweeps (0: none)."""
        if self.cleanup_interval is not None:
            return self.cleanup_interval
        return limits.sweep_interval(self.orphan_rule[0])

    @property
    def cleanup_prefixes(self) -> tuple[str, ...]:
        """The key prefixes the sweep covers."""
        return self.cleanup_prefix or (keys.template_prefix(self.key_template),)

    @property
    def embedded(self) -> bool:
        return self.endpoint_url is None

    @property
    def auth_configured(self) -> bool:
        """Whether any credential is really given: an empty key file or a blank key is
        none (the authenticator would accept everyone)."""
        try:
            return bool(self.api_keys() or self.token_secrets())
        except ValueError:  # an unreadable file: validate() names it
            return bool(self.api_key_file or self.token_secret_file)

    def api_keys(self) -> tuple[str, ...]:
        return read_secrets(self.api_key, self.api_key_file)

    def token_secrets(self) -> tuple[str, ...]:
        return read_secrets(self.token_secret, self.token_secret_file)

    @property
    def bucket_name(self) -> str:
        return self.bucket or "uploads"

    def validate(self) -> None:
        """Raise SettingsError for the first invalid combination, in one line."""
        for name in URL_SETTINGS:  # each is used only later, by a request that then fails
            url = getattr(self, name)
            if url is not None and not re.match(r"^https?://[^/]+", url):
                raise SettingsError(
                    f"--{name.replace('_', '-')} must be an http(s) URL, got {url!r}"
                )
        if self.endpoint_url is not None and not self.bucket:
            raise SettingsError("--bucket (S3PROXY_BUCKET) is required with --endpoint-url")
        if not (1 <= self.port <= 65535):
            raise SettingsError(f"--port must be 1-65535, got {self.port}")
        if not (0 <= self.embedded_s3_port <= 65535):  # 0: a free port the store picks
            raise SettingsError(f"--embedded-s3-port must be 0-65535, got {self.embedded_s3_port}")
        if self.part_size < parts.MIN_PART_SIZE or self.part_size > parts.MAX_PART_SIZE:
            raise SettingsError("--part-size must be between 5MiB and 5GiB (S3's part size limits)")
        if not 0 < self.presign_multipart_threshold <= 5 * 1024**3:
            raise SettingsError("--presign-multipart-threshold must be between 1 byte and 5GiB")
        if self.presign_expiry < 1 or self.presign_expiry > 7 * 86400:
            raise SettingsError("--presign-expiry must be between 1s and 7d (SigV4's limit)")
        if self.workers < 1:
            raise SettingsError("--workers must be at least 1")
        if not 1 <= self.s3_max_attempts <= MAX_S3_ATTEMPTS:
            raise SettingsError(
                f"--s3-max-attempts must be 1-{MAX_S3_ATTEMPTS}, got {self.s3_max_attempts}"
            )
        if self.s3_max_connections < 2:  # one for downloads, one kept for everything else
            raise SettingsError(
                "--s3-max-connections must be at least 2: streamed downloads never take the "
                "whole pool, so a stalled one cannot stall /readyz and uploads"
            )
        if not _REGION_RE.fullmatch(self.region):
            raise SettingsError(f"--region {self.region!r} is not a region name like eu-west-1")
        if not str(self.data_dir).strip() or str(self.data_dir) == ".":
            raise SettingsError("--data-dir must name a directory (default ./s3proxy-data)")
        # Compared with None, never `or <default>`: `(x or 60) < 60` let 0 through as 60,
        # and a sweep judging age 0 aborts every live upload.
        if self.cleanup_interval is not None and self.cleanup_interval < 0:
            raise SettingsError("--cleanup-interval must be >= 0 (0: never, or auto)")
        if self.cleanup_older_than is not None and self.cleanup_older_than < 60:
            raise SettingsError(
                "--cleanup-older-than must be at least 1m (it must exceed any upload), "
                f"got {format_duration(self.cleanup_older_than)}"
            )
        if self.cleanup_clock_skew < 0:
            raise SettingsError("--cleanup-clock-skew must be >= 0")
        if self.parts_in_flight < 1:
            raise SettingsError("--parts-in-flight must be at least 1")
        # The file size's own limits first: the part arithmetic below assumes them.
        if self.max_file_size < 1:
            raise SettingsError("--max-file-size must be at least 1")
        if self.max_file_size > parts.MAX_OBJECT_SIZE:
            raise SettingsError(
                f"--max-file-size {format_size(self.max_file_size)} is above S3's object "
                f"size limit ({format_size(parts.MAX_OBJECT_SIZE)})"
            )
        largest = parts.largest_part(self.part_size, self.max_file_size)
        if self.memory_budget < largest:
            raise SettingsError(
                f"--memory-budget {format_size(self.memory_budget)} is smaller than the largest "
                "part "
                f"a {format_size(self.max_file_size)} file needs ({format_size(largest)}); "
                "raise the budget or lower --max-file-size"
            )
        for name in ("client_timeout", "s3_read_timeout", "s3_connect_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"--{name.replace('_', '-')} must be positive")
        if self.read_buffer < 64 * 1024:
            raise SettingsError("--read-buffer must be at least 64KiB")
        for name in (
            "max_files",
            "max_fields",
            "max_field_size",
            "max_request_size",
            "max_file_size",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.min_upload_rate < 1 or self.min_download_rate < 1 or self.min_rate_window <= 0:
            raise SettingsError(
                "--min-upload-rate and --min-download-rate must be at least 1 byte/s and "
                "--min-rate-window positive"
            )
        if self.max_fields_size < 1 or self.max_sign_body < 1024:
            raise SettingsError(
                "--max-fields-size must be at least 1 and --max-sign-body at least 1KiB"
            )
        if self.memory_budget < largest + self.max_fields_size:
            raise SettingsError(
                f"--memory-budget {format_size(self.memory_budget)} leaves no room for form "
                f"fields ({format_size(self.max_fields_size)}, --max-fields-size) next to the "
                f"largest part ({format_size(largest)}); raise the budget or lower the limits"
            )
        if (problem := keys.field_problem(self.key_template)) is not None:
            raise SettingsError(f"--key-template: {problem}")
        if self.key_template.startswith("/"):
            raise SettingsError("--key-template must not start with /")
        if (problem := keys.template_problem(self.key_template)) is not None:
            raise SettingsError(f"--key-template: {problem}")
        for t in self.allow_type:
            if not re.match(r"^[\w.+-]+/([\w.+-]+|\*)$", t):
                raise SettingsError(
                    f"--allow-type {t!r} is not a content type like application/pdf"
                )
        if self.webhook_attempts < 1 or self.webhook_timeout <= 0:
            raise SettingsError(
                "--webhook-attempts must be at least 1 and --webhook-timeout positive"
            )
        check_api_keys(self.api_key, self.api_key_file, inline_name="--api-key (S3PROXY_API_KEY)")
        check_token_secrets(
            self.token_secret,
            self.token_secret_file,
            inline_name="--token-secret (S3PROXY_TOKEN_SECRET)",
        )
        for given, found, names in (
            (self.api_key or self.api_key_file, self.api_keys(), "--api-key / --api-key-file"),
            (
                self.token_secret or self.token_secret_file,
                self.token_secrets(),
                "--token-secret / --token-secret-file",
            ),
        ):
            if given and not found:
                raise SettingsError(_no_credential(names))
        if (
            self.host not in LOOPBACK_HOSTS
            and not self.auth_configured
            and not self.insecure_no_auth
        ):
            raise SettingsError(
                f"refusing to listen on {self.host} without authentication: set "
                "S3PROXY_API_KEY or S3PROXY_TOKEN_SECRET (or their -file flags), "
                "or pass --insecure-no-auth true"
            )
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise SettingsError("--sse-kms-key-id needs --sse aws:kms")
        if not 0 < self.embedded_restart_delay <= self.embedded_restart_max_delay:
            raise SettingsError(
                "--embedded-restart-delay must be positive and at most --embedded-restart-max-delay"
            )
        if self.header_timeout <= 0 or self.keepalive_timeout <= 0:
            raise SettingsError("--header-timeout and --keepalive-timeout must be positive")
        if self.max_connections < 1:
            raise SettingsError("--max-connections must be at least 1")
        if self.metrics_listen is not None:
            try:
                _, metrics_port = parse_listen(self.metrics_listen)
            except ValueError as exc:
                raise SettingsError(f"--metrics-listen: {exc}") from None
            if self.port <= metrics_port + self.workers - 1 and metrics_port <= self.port:
                raise SettingsError(
                    f"--metrics-listen port {metrics_port} (worker i: + i) is --port "
                    f"{self.port}: give the operator endpoints a port of their own"
                )
            if metrics_port + self.workers - 1 > 65535:
                raise SettingsError(
                    "--metrics-listen: worker i listens on its port + i; "
                    f"{metrics_port} + {self.workers - 1} is past 65535"
                )
        if self.embedded and self.embedded_s3_port in self._own_ports():
            raise SettingsError(
                f"--embedded-s3-port {self.embedded_s3_port} is a port the proxy listens on "
                "(--port, --metrics-listen): the embedded store takes it first; give it another"
            )
        if self.drain_delay is not None and self.drain_delay < 0:
            raise SettingsError("--drain-delay must be >= 0 (or auto)")
        if self.readiness_interval <= 0 or self.readiness_timeout <= 0:
            raise SettingsError("--readiness-interval and --readiness-timeout must be positive")
        if self.tus_expiry < 60 or self.tus_lock_lease < 0.5:
            raise SettingsError("--tus-expiry must be at least 60s and --tus-lock-lease 0.5s")
        if self.embedded and (problem := bucket_name_problem(self.bucket_name)) is not None:
            raise SettingsError(f"--bucket: {problem}, which the embedded store needs")
        for what, sources, seconds in self.derived_durations():
            if seconds > MAX_DURATION:
                raise SettingsError(
                    f"{what} comes to {seconds / 86400:.0f}d, past the longest "
                    f"duration taken (3650d): lower {sources}"
                )

    def derived_durations(self) -> list[tuple[str, str, float]]:
        """Every duration computed from several settings, as (what, from which settings,
        seconds). Each is held to MAX_DURATION as a duration setting is: past it, the orphan
        sweep's timedelta overflowed and the sweep died at start (reprobe21c)."""
        # presign_record is above settings; imported here, when a Settings is checked.
        from s3proxy import presign_record

        derived = [
            (
                "one S3 call",
                "--s3-max-attempts, --s3-connect-timeout or --s3-read-timeout",
                limits.s3_call_time(self),
            ),
            (
                "a presigned upload's record retention",
                "--s3-read-timeout, --s3-connect-timeout or --presign-expiry",
                presign_record.retention(self),
            ),
        ]
        if self.cleanup_older_than is None:  # else the threshold is that duration
            derived.append(
                (
                    "the orphan threshold",
                    "--s3-max-attempts, the timeouts, --part-size, --max-file-size or "
                    "--min-upload-rate, or set --cleanup-older-than",
                    self.orphan_rule[0],
                )
            )
        return derived

    def _own_ports(self) -> set[int]:
        """The ports the proxy's listeners take on its host (workers share --port)."""
        ports = {self.port}
        if self.metrics_listen is not None:
            first = parse_listen(self.metrics_listen)[1]
            ports.update(range(first, first + self.workers))
        return ports

    # --- loading -------------------------------------------------------------

    @classmethod
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser,
        only: Collection[str] | None = None,
        helps: Mapping[str, str] | None = None,
    ) -> None:
        """One flag per field (or per field in ``only``); default and env var named.

        ``helps`` replaces a field's help text where another command means it otherwise
        (``cleanup``'s unset --endpoint-url is the running embedded store, not a new one).
        """
        helps = helps or {}
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            meta = f.metadata
            flag = "--" + f.name.replace("_", "-")
            env = ENV_PREFIX + f.name.upper()
            shown = _shown_default(_default(f), meta["show"])
            help_text = f"{helps.get(f.name, meta['help'])} [env {env}; default {shown}]"
            kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": None}
            if meta["repeat"]:
                kwargs["action"] = "append"
            # Choices are checked by load(), after the field's parse, for flag and variable
            # alike (argparse's own check refused --log-level DEBUG, which the env took).
            choices = meta["choices"]
            kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else _metavar(f)
            parser.add_argument(flag, **kwargs)

    @classmethod
    def load(
        cls,
        args: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        only: Collection[str] | None = None,
    ) -> Settings:
        """Build settings from parsed flags (raw strings) over environment over defaults.

        With ``only``, the other fields keep their defaults whatever the environment
        says (a command that uses a few settings is not stopped by the others).
        """
        args = args or {}
        environ = environ or {}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            meta = f.metadata
            raw = args.get(f.name)
            source = "--" + f.name.replace("_", "-")
            if raw is None:
                env = ENV_PREFIX + f.name.upper()
                if env in environ:
                    raw = environ[env]
                    source = env
                    if _TRAILING_COMMENT.search(raw):
                        raise SettingsError(
                            f"{env}: a comment (' #') follows the value: env files "
                            "(systemd's EnvironmentFile, docker's --env-file) keep it as "
                            "part of the value; put comments on lines of their own"
                        )
                    if meta["repeat"]:
                        raw = [p for p in re.split(meta["split"], raw) if p]
                    if not raw and f.name in CREDENTIAL_SETTINGS:
                        # S3PROXY_API_KEY=${KEY} with KEY unset: meant a key, got none
                        raise SettingsError(_no_credential(env))
            if raw is None or (isinstance(raw, str) and not raw.strip() and _unset_by_default(f)):
                continue  # empty: unset, for a setting whose default is unset or auto
            try:
                if meta["repeat"]:
                    values[f.name] = tuple(meta["parse"](r) for r in raw)
                else:
                    values[f.name] = meta["parse"](raw)
            except ValueError as exc:
                raise SettingsError(f"{source}: {exc}") from None
            if meta["choices"]:
                values[f.name] = _choice(values[f.name], meta["choices"], source)
        return cls(**values)
