"""Settings from flags, environment and defaults; clear one-line errors."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from s3proxy.cli import build_parser
from s3proxy.settings import (
    CREDENTIAL_SETTINGS,
    Settings,
    SettingsError,
    format_size,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("1048576", 1048576),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("5MB", 5_000_000),
        ("1.5KiB", 1536),
        ("64 kib", 65536),
    ],
)
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "ten", "10XB", "-1", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(8 * 1024**2) == "8MiB"
    assert format_size(1000) == "1000"


def load(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    args = build_parser().parse_args(["serve", *argv])
    return Settings.load(vars(args), env or {})


def test_flags_override_env_override_defaults() -> None:
    s = load(
        [
            "--part-size",
            "16MiB",
            "--bucket",
            "b",
            "--allow-type",
            "application/pdf",
            "--allow-type",
            "image/*",
        ],
        {
            "S3PROXY_PART_SIZE": "32MiB",
            "S3PROXY_PORT": "9000",
            "S3PROXY_ENDPOINT_URL": "http://127.0.0.1:1",
        },
    )
    assert s.part_size == 16 * 1024**2
    assert s.port == 9000
    assert s.endpoint_url == "http://127.0.0.1:1"
    assert s.allow_type == ("application/pdf", "image/*")
    assert s.memory_budget == 256 * 1024**2  # default


def test_env_list() -> None:
    s = load([], {"S3PROXY_ALLOW_TYPE": "application/pdf, image/png"})
    assert s.allow_type == ("application/pdf", "image/png")
    assert s.embedded and s.bucket_name == "uploads"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--endpoint-url", "http://x:1"], {}, "--bucket"),
        (["--part-size", "1MiB"], {}, "--part-size"),
        (["--part-size", "lots"], {}, "--part-size: not a size"),
        ([], {"S3PROXY_PORT": "eighty"}, "S3PROXY_PORT"),
        # reprobe21c: int()'s "invalid literal for int() with base 10" named no want
        (["--port", "http"], {}, "--port: not a whole number: 'http'"),
        ([], {"S3PROXY_WORKERS": "two"}, "S3PROXY_WORKERS: not a whole number"),
        # reprobe21c: "timeouts must be positive" named none of the three
        (["--client-timeout", "0"], {}, "--client-timeout must be positive"),
        (["--s3-read-timeout", "0"], {}, "--s3-read-timeout must be positive"),
        ([], {"S3PROXY_S3_CONNECT_TIMEOUT": "0"}, "--s3-connect-timeout must be positive"),
        (["--memory-budget", "4MiB"], {}, "--memory-budget"),
        (["--key-template", "x/fixed.bin"], {}, "no field"),
        (["--key-template", "x/{uuid}/{nope}"], {}, "unknown"),
        (["--key-template", "a//{uuid}/{filename}"], {}, "segments"),
        # a field cut or changed by a spec, conversion or attribute (the last a traceback)
        (["--key-template", "k/{uuid:.1}/{filename}"], {}, "{uuid:.1} must be used plainly"),
        ([], {"S3PROXY_KEY_TEMPLATE": "k/{uuid.hex}"}, "--key-template: field {uuid.hex}"),
        (["--key-template", "k/{uuid}/{filename!r}"], {}, "{filename!r} must be used plainly"),
        (["--allow-type", "pdf"], {}, "--allow-type"),
        # integrity probe: 51TiB spun forever at start, 6TiB blamed --memory-budget
        (["--max-file-size", "51TiB"], {}, "--max-file-size 51TiB is above S3's object size"),
        (["--max-file-size", "6TiB"], {}, "--max-file-size 6TiB is above S3's object size"),
        (["--max-file-size", "0"], {}, "--max-file-size must be at least 1"),
        (["--endpoint-url", "ftp://x", "--bucket", "b"], {}, "http(s) URL"),
        # config probe: started, then every /sign was 502 "without a usable Invalid endpoint"
        (["--presign-endpoint-url", "notaurl"], {}, "--presign-endpoint-url must be an http(s)"),
        ([], {"S3PROXY_PRESIGN_ENDPOINT_URL": "s3.example.com"}, "--presign-endpoint-url"),
        (["--webhook-url", "example.com/hook"], {}, "--webhook-url must be an http(s) URL"),
        ([], {"S3PROXY_SIGN_PAYLOAD": "maybe"}, "boolean"),
        ([], {"S3PROXY_REQUEST_CHECKSUM": "always"}, "one of"),
        # HMAC secrets: every one at least 32 bytes, named by setting, never echoed
        ([], {"S3PROXY_TOKEN_SECRET": "abc"}, "secret 1 is 3 bytes"),
        ([], {"S3PROXY_TOKEN_SECRET": "s" * 32 + ",abc"}, "S3PROXY_TOKEN_SECRET"),
        (["--token-secret", "s" * 31], {}, "at least 32 bytes"),
        (["--token-secret-file", "/nonexistent/secrets"], {}, "--token-secret-file: cannot read"),
        (["--api-key-file", "/nonexistent/keys"], {}, "--api-key-file: cannot read"),
        # found by a probe of every setting: each started a proxy that failed later
        (["--region", ""], {}, "--region '' is not a region name"),
        (["--region", "bad region"], {}, "not a region name"),
        ([], {"S3PROXY_REGION": ""}, "not a region name"),
        (["--s3-max-connections", "-1"], {}, "--s3-max-connections"),
        (["--s3-max-connections", "0"], {}, "--s3-max-connections"),
        # config probe: one stalled download held the only connection, /readyz 503
        (["--s3-max-connections", "1"], {}, "--s3-max-connections must be at least 2"),
        (["--s3-max-attempts", "0"], {}, "--s3-max-attempts"),
        ([], {"S3PROXY_DATA_DIR": ""}, "--data-dir must name a directory"),
        (["--client-timeout", "99999999999d"], {}, "longest duration"),
        (["--tus-expiry", "3651d"], {}, "--tus-expiry: '3651d' is longer"),
        (["--host", "0.0.0.0", "--api-key", " "], {}, "without authentication"),
        (["--host", "0.0.0.0", "--token-secret", "   "], {}, "without authentication"),
        (["--embedded-s3-port", "70000"], {}, "--embedded-s3-port must be 0-65535"),
        (["--embedded-s3-port", "-1"], {}, "--embedded-s3-port"),
        (["--metrics-listen", "127.0.0.1:8080"], {}, "a port of their own"),
        # config probe: the store took the port (5 s), then "cannot listen" named neither
        (["--port", "8333"], {}, "--embedded-s3-port 8333 is a port the proxy listens on"),
        ([], {"S3PROXY_PORT": "9000", "S3PROXY_EMBEDDED_S3_PORT": "9000"}, "takes it first"),
        (["--metrics-listen", "127.0.0.1:8332", "--workers", "2"], {}, "--embedded-s3-port"),
        (["--metrics-listen", "127.0.0.1:8079", "--workers", "2"], {}, "a port of their own"),
        # a comment an env file kept after the value (systemd does): its words were API keys
        (
            [],
            {"S3PROXY_API_KEY": "abc" * 8 + "   # or a token secret"},
            "S3PROXY_API_KEY: a comment",
        ),
        ([], {"S3PROXY_DRAIN_DELAY": "6  # explicit"}, "on lines of their own"),
        (
            [],
            {"S3PROXY_BUCKET": "b\t#prod", "S3PROXY_ENDPOINT_URL": "http://x:1"},
            "S3PROXY_BUCKET",
        ),
    ],
)
def test_invalid_settings(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        load(argv, env)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert "abc" not in str(err.value)


SECONDS_SETTINGS = [
    f.name for f in dataclasses.fields(Settings) if "float" in str(f.type) and f.init
]


@pytest.mark.parametrize("name", SECONDS_SETTINGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e400"])
def test_no_duration_setting_takes_a_value_that_is_not_a_finite_time(name: str, value: str) -> None:
    """`--client-timeout nan` started a proxy whose client reads never timed out."""
    with pytest.raises(SettingsError) as err:
        load([], {"S3PROXY_" + name.upper(): value})
    assert "S3PROXY_" + name.upper() in str(err.value) or "--" in str(err.value)


def test_every_duration_setting_takes_seconds_and_units() -> None:
    s = load([], {"S3PROXY_" + name.upper(): "90" for name in SECONDS_SETTINGS})
    assert {getattr(s, name) for name in SECONDS_SETTINGS} == {90.0}
    assert load(["--client-timeout", "2m", "--shutdown-timeout", "1.5"]).client_timeout == 120.0


def test_token_secret_file_lines_are_checked(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("# new first\n" + "n" * 32 + "\n\n" + "o" * 32 + "\n")
    s = load(["--token-secret-file", str(secrets)])
    assert s.token_secrets() == ("n" * 32, "o" * 32)
    secrets.write_text("n" * 32 + "\nold\n")
    with pytest.raises(SettingsError, match=rf"--token-secret-file: {secrets} line 2 is 3 bytes"):
        load(["--token-secret-file", str(secrets)])
    secrets.write_bytes(b"\xff" * 40)
    with pytest.raises(SettingsError, match="not UTF-8"):
        load(["--token-secret-file", str(secrets)])


def test_load_only_some_settings_ignores_the_rest_of_the_environment() -> None:
    env = {"S3PROXY_HOST": "0.0.0.0", "S3PROXY_TOKEN_SECRET": "short", "S3PROXY_BUCKET": "bkt"}
    with pytest.raises(SettingsError):
        Settings.load({}, env)
    s = Settings.load({}, env, only=("bucket",))
    assert s.bucket == "bkt" and s.host == "127.0.0.1" and s.token_secret == ()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_cli_help_documents_every_flag_with_default() -> None:
    out = run_cli("serve", "--help").stdout
    flags = """--host --port --endpoint-url --region --bucket --part-size --parts-in-flight
        --memory-budget --max-file-size --max-files --max-request-size --key-template
        --allow-type --acl --storage-class --sse"""
    for flag in flags.split():
        assert flag in out
    assert "S3PROXY_MEMORY_BUDGET" in out and "default 256MiB" in " ".join(out.split())


def test_cli_invalid_setting_is_one_line_not_a_traceback() -> None:
    proc = run_cli("serve", "--endpoint-url", "http://127.0.0.1:1")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr
    assert "--bucket" in proc.stderr


def test_cli_port_in_use_is_one_line() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(
            "serve", "--port", str(port), "--endpoint-url", "http://127.0.0.1:9", "--bucket", "b"
        )
    assert proc.returncode == 1
    assert "cannot listen on 127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_readme_documents_every_setting() -> None:
    import dataclasses
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [
        f.name
        for f in dataclasses.fields(Settings)
        if f"`--{f.name.replace('_', '-')}`" not in readme
    ]
    assert not missing, f"README's configuration table lacks {missing}"


def test_each_worker_gets_its_own_metrics_port() -> None:
    from s3proxy.settings import worker_listen

    assert worker_listen("127.0.0.1:9100", 0) == "127.0.0.1:9100"
    assert worker_listen("127.0.0.1:9100", 3) == "127.0.0.1:9103"
    assert worker_listen("[::1]:9100", 1) == "[::1]:9101"
    with pytest.raises(SettingsError, match="port \\+ i"):
        load(["--metrics-listen", "127.0.0.1:65535", "--workers", "2"])


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_an_empty_key_file_is_no_authentication(tmp_path: Path, text: str) -> None:
    """Regression: an API key file with no key passed the public-address check, and the
    proxy then served everyone without authentication."""
    keys = tmp_path / "keys"
    keys.write_text(text)
    for flag in ("--api-key-file", "--token-secret-file"):
        with pytest.raises(SettingsError, match="without authentication"):
            load(["--host", "0.0.0.0", flag, str(keys)], {})
    keys.write_text("k" * 24 + "\n")
    assert load(["--host", "0.0.0.0", "--api-key-file", str(keys)], {}).api_keys() == ("k" * 24,)


@pytest.mark.parametrize("flag", ["--api-key-file", "--token-secret-file"])
def test_a_key_file_reads_as_the_environment_does(tmp_path: Path, flag: str) -> None:
    """Regression (reprobe7 F7): a file saved with a BOM made the BOM part of the first key
    (only ``Bearer <BOM>key`` matched), and ``key1 # old`` was the key "key1 # old", where
    S3PROXY_API_KEY refuses the same comment. Now the BOM is dropped and the comment is
    refused, naming the file and line; a ``#`` inside a key, or starting a line, is as before."""
    key = "k" * 32
    keys = tmp_path / "keys"
    keys.write_bytes(
        b"\xef\xbb\xbf" + key.encode() + b"\r\n# old one\r\nab#cd" + b"e" * 28 + b"\r\n"
    )
    found = (key, "ab#cd" + "e" * 28)
    read = load([flag, str(keys)])
    assert (read.api_keys() if flag == "--api-key-file" else read.token_secrets()) == found
    for line in (f"{key} # rotated 2024", f"{key}\t#old", f"{key}  #"):
        keys.write_text(f"# fine\n{key}\n{line}\n")
        with pytest.raises(SettingsError) as err:
            load([flag, str(keys)])
        message = str(err.value)
        assert message.startswith(f"{flag}: {keys} line 3: a comment (' #') follows the key")
        assert "\n" not in message and "rotated" not in message and key not in message


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        (b"\xef\xbb\xbf\xef\xbb\xbfkeyC\n", 1, "byte order mark (U+FEFF)"),  # saved twice
        (b"keyD\r\n\xef\xbb\xbfkeyE\n", 2, "byte order mark (U+FEFF)"),  # two files joined
        (b"keyF\nkey H\n", 2, "a space or tab"),
        (b"keyF\nkey\tH\n", 2, "a space or tab"),
        (b"key\x7fI\n", 1, "a control character (U+007F)"),
        ("cl\u00e9-J\n".encode(), 1, "a non-ASCII character (U+00E9)"),
        ("key\u200bK\n".encode(), 1, "a non-ASCII character (U+200B)"),
    ],
)
def test_an_api_key_no_client_can_send_is_refused(
    tmp_path: Path, content: bytes, line: int, words: str
) -> None:
    """Regression (reprobe8 F6): only a BOM at the file's start was dropped; a second one
    (a file saved twice with one, two files joined) stayed in its key, and a key with a
    space was taken too: serve started without a word, and no request ever matched them.
    Now each is refused at start, naming the file and line, never the key."""
    keys = tmp_path / "keys"
    keys.write_bytes(content)
    with pytest.raises(SettingsError) as err:
        load(["--api-key-file", str(keys)])
    message = str(err.value)
    assert message.startswith(f"--api-key-file: {keys} line {line}: "), message
    assert words in message and "\n" not in message
    assert not any(k in message for k in ("keyC", "keyE", "key H", "cl\u00e9", "keyK"))


def test_an_inline_api_key_no_client_can_send_is_refused(tmp_path: Path) -> None:
    for key, words in (("key H", "a space or tab"), ("cl\u00e9", "U+00E9"), ("\ufeffk", "U+FEFF")):
        with pytest.raises(SettingsError) as err:
            load(["--api-key", "good-key", "--api-key", key])
        message = str(err.value)
        assert message.startswith("--api-key (S3PROXY_API_KEY): key 2: "), message
        assert words in message and key.strip() not in message
    with pytest.raises(SettingsError, match="key 1: a byte order mark"):
        load([], {"S3PROXY_API_KEY": "\ufeffk,j"})
    # every visible ASCII character can be sent: kept
    visible = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ",#")
    assert load(["--api-key", visible]).api_keys() == (visible,)


def test_a_key_with_a_space_in_the_variable_is_refused_not_split() -> None:
    """S3PROXY_API_KEY was split at whitespace too, so "goodkey1,SECRETXYZ 2" ran with
    the keys "SECRETXYZ" and "2" (a one-character key: Bearer 2 got 201; reprobe9b F1)
    where --api-key refuses the same key. Keys are split at commas only, spaces around
    them trimmed. (Token secrets are still split at whitespace too: each piece must be
    32 bytes or more, so no short one gets in.)"""
    with pytest.raises(SettingsError, match="key 2: a space or tab"):
        load([], {"S3PROXY_API_KEY": "goodkey1,SECRETXYZ 2"})
    assert load([], {"S3PROXY_API_KEY": " k1 , k2 "}).api_keys() == ("k1", "k2")


def test_a_token_secret_may_hold_any_text_but_a_bom(tmp_path: Path) -> None:
    """Token secrets are never sent by a client: a space or any UTF-8 is theirs to hold
    (README: at least 32 bytes). A BOM inside one is a file's artefact, refused as in an
    API key file: the backend's copy of the secret would not hold it."""
    secrets = tmp_path / "secrets"
    secret = "s" * 16 + " caf\u00e9 " + "s" * 16
    secrets.write_text(secret + "\n")
    assert load(["--token-secret-file", str(secrets)]).token_secrets() == (secret,)
    secrets.write_bytes(b"a" * 40 + b"\n\xef\xbb\xbf" + b"b" * 40 + b"\n")
    with pytest.raises(SettingsError, match=f"--token-secret-file: {secrets} line 2: a byte"):
        load(["--token-secret-file", str(secrets)])


def test_settings_warn_once_when_asked_not_when_made(caplog: pytest.LogCaptureFixture) -> None:
    """A warning printed while the settings were made came before the log's format was
    set (a raw line in --log-format json output), and again for every copy made."""
    argv = ["--key-template", "docs/{filename}", "--no-overwrite", "false"]
    with caplog.at_level(logging.WARNING, logger="s3proxy"):
        settings = load(argv, {})
        dataclasses.replace(settings, max_connections=10)
        assert caplog.records == []
        settings.log_warnings()
    assert [r.getMessage().split()[0] for r in caplog.records] == ["settings.overwrite"]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_credential_setting_that_holds_no_key_is_refused(tmp_path: Path, host: str) -> None:
    """Regression (config probe): an --api-key-file of only a comment, or
    S3PROXY_API_KEY=' , ', on a loopback host ran with no authentication at all (uploads
    with no Authorization 201), while the start log told how to send the key."""
    empty = tmp_path / "keys"
    empty.write_text("# rotated out\n\n")
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--api-key-file", str(empty)], {}, "--api-key / --api-key-file is given"),
        (["--token-secret-file", str(empty)], {}, "--token-secret / --token-secret-file"),
        (["--api-key", " "], {}, "--api-key / --api-key-file"),
        ([], {"S3PROXY_API_KEY": " , "}, "S3PROXY_API_KEY is given"),
        ([], {"S3PROXY_API_KEY": ""}, "S3PROXY_API_KEY is given"),
        ([], {"S3PROXY_TOKEN_SECRET": ""}, "S3PROXY_TOKEN_SECRET is given"),
        ([], {"S3PROXY_API_KEY_FILE": ""}, "S3PROXY_API_KEY_FILE is given"),
    ]
    for argv, env, message in cases:
        with pytest.raises(SettingsError) as err:
            load(["--host", host, *argv], env)
        assert message in str(err.value) and "without authentication" in str(err.value)
    if host == "127.0.0.1":
        assert load(["--host", host], {}).auth_configured is False  # unset: open on loopback


def test_an_outside_store_leaves_the_embedded_port_free() -> None:
    assert load(["--port", "8333", "--endpoint-url", "http://x:1", "--bucket", "b"]).port == 8333


def test_a_choice_is_taken_in_any_case_from_flag_and_variable() -> None:
    """Regression (config probe): --log-level DEBUG was refused by argparse's choices
    while S3PROXY_LOG_LEVEL=DEBUG was taken (the field lowercases): one check now."""
    argv = ["--log-level", "DEBUG", "--log-format", "JSON", "--checksum", "OFF"]
    s = load([*argv, "--event-loop", "UVLOOP"])
    assert (s.log_level, s.log_format, s.checksum, s.event_loop) == (
        "debug",
        "json",
        "off",
        "uvloop",
    )
    with pytest.raises(SettingsError, match="--log-level must be one of debug, info"):
        load(["--log-level", "loud"])


def shown_defaults() -> dict[str, str]:
    """Each serve setting's default as --help (and README's table) shows it."""
    import argparse
    import re

    serve = argparse.ArgumentParser()
    Settings.add_arguments(serve)  # as `s3proxy serve` has them
    found = {}
    for action in serve._actions:
        m = re.search(r"\[env S3PROXY_([A-Z0-9_]+); default (.*)\]$", action.help or "")
        if m:
            found[m.group(1).lower()] = m.group(2)
    return found


UNSET_OR_AUTO = [n for n, shown in shown_defaults().items() if shown in ("unset", "auto")]


@pytest.mark.parametrize("name", UNSET_OR_AUTO)
def test_an_empty_value_of_an_unset_or_auto_setting_is_its_default(name: str) -> None:
    """Regression (config probe): S3PROXY_CLEANUP_INTERVAL= was 'not a duration', and
    S3PROXY_NO_OVERWRITE= 'not a boolean', though both default to unset; reprobe21c:
    S3PROXY_CHECKSUM= was 'must be one of auto, off', its default auto (a string, not
    None). README: an empty value means unset for a setting whose default is unset or
    auto; decided by what --help shows, for every such setting."""
    if name in CREDENTIAL_SETTINGS:  # given but empty is refused (test below)
        return
    f = next(f for f in dataclasses.fields(Settings) if f.name == name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    assert getattr(load([], {"S3PROXY_" + name.upper(): ""}), name) == default
    if not f.metadata["repeat"]:  # a repeatable flag given '' is one value, ''
        assert getattr(load([], {"S3PROXY_" + name.upper(): "  "}), name) == default
        assert getattr(load(["--" + name.replace("_", "-"), ""]), name) == default


def test_the_unset_or_auto_settings_are_the_ones_readme_says() -> None:
    assert {"checksum", "cleanup_interval", "drain_delay", "endpoint_url", "no_overwrite"} <= set(
        UNSET_OR_AUTO
    )
    assert "event_loop" not in UNSET_OR_AUTO  # its default is asyncio (auto is a choice)


CHOICES = [
    (f.name, choice)
    for f in dataclasses.fields(Settings)
    if f.metadata["choices"]
    for choice in f.metadata["choices"]
]


@pytest.mark.parametrize(("name", "choice"), CHOICES)
@pytest.mark.parametrize("spelled", [str.upper, str.lower, str.swapcase])
def test_every_choice_is_taken_in_any_case_from_flag_and_variable(
    name: str, choice: str, spelled: Callable[[str], str]
) -> None:
    """Regression (reprobe21c): README says choices take any case, but only the settings
    whose parser lowercased did (--download-mode REDIRECT, --webhook-failure KEEP,
    --request-checksum WHEN_SUPPORTED and --sse aes256 were refused). One check for
    all, giving the choice as it is spelled (AES256, aws:kms)."""
    extra = ["--sse", "aws:kms"] if name == "sse_kms_key_id" else []
    flag = "--" + name.replace("_", "-")
    assert getattr(load([*extra, flag, spelled(choice)]), name) == choice
    assert getattr(load(extra, {"S3PROXY_" + name.upper(): spelled(choice)}), name) == choice


def test_choice_settings_are_all_tested() -> None:
    names = {name for name, _ in CHOICES}
    assert {"download_mode", "webhook_failure", "request_checksum", "sse", "log_level"} <= names
    with pytest.raises(SettingsError, match=r"--sse must be one of AES256, aws:kms, got 'aes'"):
        load(["--sse", "aes"])


@pytest.mark.parametrize("source", ["flag", "env"])
@pytest.mark.parametrize("value", ["0", "0s", "0m", "59s", "0.5"])
def test_cleanup_older_than_under_a_minute_is_refused(source: str, value: str) -> None:
    """Regression (reprobe21c): `(x or 60) < 60` took 0 for 60, so --cleanup-older-than 0
    (and S3PROXY_CLEANUP_OLDER_THAN=0) started a sweep that aborted live uploads."""
    argv, env = (["--cleanup-older-than", value], {}) if source == "flag" else ([], {})
    if source == "env":
        env = {"S3PROXY_CLEANUP_OLDER_THAN": value}
    with pytest.raises(SettingsError, match="--cleanup-older-than must be at least 1m"):
        load(argv, env)
    assert load(["--cleanup-older-than", "1m"]).orphan_rule == (60.0, False)


@pytest.mark.parametrize(
    ("name", "zero"),
    [
        ("cleanup_interval", 0.0),  # 0: never sweep
        ("drain_delay", 0.0),  # 0: close the listener at once
        ("cleanup_older_than", None),  # refused (above)
    ],
)
def test_zero_of_each_optional_duration_is_held_to_its_own_bound(
    name: str, zero: float | None
) -> None:
    """The settings whose check once read `(x or <default>)`: 0 is checked as 0, never
    as the default; unset stays the default."""
    env = {"S3PROXY_" + name.upper(): "0"}
    if zero is None:
        with pytest.raises(SettingsError, match="--" + name.replace("_", "-")):
            load([], env)
    else:
        assert getattr(load([], env), name) == zero
    assert getattr(load([]), name) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--s3-max-attempts", "1000000000000"], "--s3-max-attempts must be 1-100"),
        (["--s3-max-attempts", "101"], "--s3-max-attempts must be 1-100, got 101"),
        (
            ["--s3-max-attempts", "100", "--s3-read-timeout", "3650d"],
            "one S3 call comes to 365000d, past the longest duration taken (3650d)",
        ),
        (["--s3-read-timeout", "400d"], "a presigned upload's record retention comes to"),
        (
            ["--min-upload-rate", "1", "--part-size", "1GiB", "--memory-budget", "2GiB"],
            "the orphan threshold comes to",
        ),
    ],
)
def test_a_duration_derived_from_several_settings_is_held_to_the_cap(
    argv: list[str], message: str
) -> None:
    """Regression (reprobe21c): --s3-max-attempts 1000000000000 (or 1000000 with
    --s3-read-timeout 3650d) started, and the orphan threshold (attempts x timeouts)
    overflowed timedelta: serve's sweep died, cleanup printed a traceback."""
    with pytest.raises(SettingsError) as err:
        load(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_largest_settings_taken_give_durations_a_timedelta_holds() -> None:
    from datetime import timedelta

    from s3proxy.settings import MAX_DURATION, MAX_S3_ATTEMPTS

    s = load(["--s3-max-attempts", str(MAX_S3_ATTEMPTS), "--s3-read-timeout", "10d"])
    assert all(seconds <= MAX_DURATION for _, _, seconds in s.derived_durations())
    assert timedelta(seconds=s.orphan_rule[0]) > timedelta(0)
    # the orphan threshold is not checked where --cleanup-older-than replaces it
    argv = ["--min-upload-rate", "1", "--part-size", "1GiB", "--memory-budget", "2GiB"]
    assert load([*argv, "--cleanup-older-than", "1h"]).orphan_rule == (3600.0, False)


def test_an_invalid_bucket_for_the_embedded_store_is_a_settings_error() -> None:
    """Regression (reprobe21c): serve --bucket Bad_Bucket with no --endpoint-url failed as
    the store started (exit 1); an invalid value is a settings error (exit 2)."""
    for argv, env in ((["--bucket", "Bad_Bucket"], {}), ([], {"S3PROXY_BUCKET": "a..b"})):
        with pytest.raises(SettingsError, match=r"--bucket: '.*' is not a valid S3 bucket name"):
            load(argv, env)
    # another S3 may hold older names (us-east-1's capitals): it answers for itself
    assert load(["--bucket", "Legacy_Bucket", "--endpoint-url", "http://x:1"]).bucket


@pytest.mark.parametrize(
    ("value", "expected"),
    [(v, True) for v in ("true", "yes", "1", "on", "TRUE", "Yes")]
    + [(v, False) for v in ("false", "no", "0", "off", "FALSE", "Off")],
)
def test_a_boolean_takes_true_false_yes_no_on_off_1_0(value: str, expected: bool) -> None:
    assert load(["--sign-payload", value]).sign_payload is expected
    assert load([], {"S3PROXY_SIGN_PAYLOAD": value}).sign_payload is expected


def test_the_cleanup_prefix_variable_keeps_spaces_and_empty_is_the_template() -> None:
    """Regression (config probe): S3PROXY_CLEANUP_PREFIX="my uploads/" was split on the
    space into "my" and "uploads/", and "my" swept other programs' keys."""
    s = load([], {"S3PROXY_CLEANUP_PREFIX": "my uploads/, tok/"})
    assert s.cleanup_prefixes == ("my uploads/", "tok/")
    empty = load([], {"S3PROXY_CLEANUP_PREFIX": ""})  # unset: never the whole bucket
    assert empty.cleanup_prefixes == ("uploads/",)
    assert load(["--cleanup-prefix", ""]).cleanup_prefixes == ("",)  # the flag can


def test_unknown_variables_are_named() -> None:
    """Regression (config probe): S3PROXY_MEMORY_BUGDET=1GiB was ignored without a word."""
    from s3proxy.settings import unknown_variables

    env = {"S3PROXY_MEMORY_BUGDET": "1GiB", "S3PROXY_PORT": "1", "S3PROXY_": "", "HOME": "/"}
    assert unknown_variables(env) == ["S3PROXY_", "S3PROXY_MEMORY_BUGDET"]
    assert (
        unknown_variables({"S3PROXY_" + f.name.upper(): "" for f in dataclasses.fields(Settings)})
        == []
    )


def test_a_path_setting_expands_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (config probe): --data-dir '~/x' (or S3PROXY_DATA_DIR=~/x from an env
    file): the store used $HOME/x, the start log named <cwd>/~/x."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load(["--data-dir", "~/x"]).data_dir == tmp_path / "x"
    assert load([], {"S3PROXY_DATA_DIR": "~/x"}).data_dir == tmp_path / "x"
    (tmp_path / "keys").write_text("k" * 32 + "\n")
    assert load(["--api-key-file", "~/keys"]).api_keys() == ("k" * 32,)


@pytest.mark.parametrize(("host", "shown"), [("::1", "[::1]"), ("127.0.0.1", "127.0.0.1")])
def test_the_ready_line_writes_an_ipv6_listen_address_in_brackets(
    host: str, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (config probe): --host ::1 logged proxy.ready listen=http://::1:8080,
    not a URL (the try: line had the brackets)."""
    from s3proxy.app import create_app, log_ready

    settings = Settings(host=host, endpoint_url="http://127.0.0.1:9", bucket="b")
    with caplog.at_level(logging.INFO, logger="s3proxy"):
        log_ready(create_app(settings))
    ready = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("proxy.ready"))
    assert f"listen=http://{shown}:8080 " in ready
