"""Keep the README true: its error table, its flags and its shell examples.

The README promises that every example works verbatim after ``make serve``; what can be
checked without a running store is checked here (the examples themselves run against the
embedded store in the e2e suite's spirit by hand: see the commit that added this file).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from s3proxy import errors, tus_protocol
from s3proxy.cli import build_parser
from s3proxy.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()
SHELL_BLOCKS = re.findall(r"```sh\n(.*?)```", README, re.S)

# Flags of other programs the README shows: curl, the AWS CLI, the benchmark harness.
OTHER_FLAGS = {
    "--form-string",  # curl
    "--upload-file",  # curl
    "--data-binary",  # curl (the tus walk-through)
    "--recursive",  # aws s3 ls
    "--matrix",  # python -m bench
    "--s3proxy-rev",
    "--s3proxy-b-rev",
    "--update-readme",
    "--quick",
    "--cells",
    "--perf",  # python -m bench.pyspy attach
    "--strict",  # mypy
}
# Codes the table documents that come from outside errors.py's list.
EXTRA_CODES: set[str] = set()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for a in parser._actions for opt in a.option_strings if opt.startswith("--")}


def error_kinds() -> list[errors.ErrorKind]:
    return [v for v in vars(errors).values() if isinstance(v, errors.ErrorKind)]


def table_rows() -> list[tuple[list[int], set[str]]]:
    """(statuses, codes) of each row of the error table."""
    rows = []
    for line in README.splitlines():
        m = re.match(r"^\| (\d{3}(?: / \d{3})*) \| (.*?) \|", line)
        if m:
            codes = set(re.findall(r"`([A-Z_]+)`", m.group(2)))
            rows.append(([int(s) for s in m.group(1).split(" / ")], codes))
    return rows


@pytest.mark.parametrize("kind", error_kinds(), ids=lambda k: k.code)
def test_every_error_code_is_in_the_table_with_its_status(kind: errors.ErrorKind) -> None:
    statuses = [statuses for statuses, codes in table_rows() if kind.code in codes]
    assert statuses, f"README's error table lacks {kind.code}"
    assert any(kind.status in s for s in statuses), f"{kind.code} is {kind.status}"


def test_the_table_lists_no_code_that_does_not_exist() -> None:
    known = {k.code for k in error_kinds()} | EXTRA_CODES
    listed = set().union(*(codes for _, codes in table_rows()))
    assert listed - known == set()


def test_every_flag_the_readme_names_exists() -> None:
    ours = set().union(*(flags_of(p) for p in subcommands().values()))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w*-])", README))
    assert named - ours - OTHER_FLAGS == set()


def test_the_settings_table_has_every_setting() -> None:
    """README says `serve --help` lists the same: the table had lost two settings."""
    rows = set(re.findall(r"^\| `(--[a-z0-9-]+)` \| `S3PROXY_", README, flags=re.MULTILINE))
    settings = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(Settings) if f.init}
    assert settings - rows == set()


def test_commands_in_examples_take_the_flags_shown() -> None:
    parsers = subcommands()
    for block in SHELL_BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"\bs3proxy (serve|token|cleanup)\b(.*)", line)
            if not m:
                continue
            given = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2).split("#")[0]))
            assert given <= flags_of(parsers[m.group(1)]), line


def test_examples_run_the_command_from_the_venv() -> None:
    # `make serve` installs into .venv and does not put it on PATH.
    for block in SHELL_BLOCKS:
        for line in block.splitlines():
            for m in re.finditer(r"(\S*)\bs3proxy (serve|token|cleanup)\b", line):
                assert m.group(1).endswith(".venv/bin/"), line


def test_curl_examples_send_fields_before_files() -> None:
    # Only fields before a file are stored as its metadata.
    for block in SHELL_BLOCKS:
        for command in block.replace("\\\n", " ").splitlines():
            if not command.lstrip().startswith("curl") and " curl " not in command:
                continue
            try:
                words = shlex.split(command.split("$(", 1)[0], comments=True)
            except ValueError:
                continue
            forms = [w2 for w1, w2 in itertools.pairwise(words) if w1 == "-F"]
            seen_file = False
            for form in forms:
                is_file = "=@" in form or "=<" in form
                assert not (seen_file and not is_file), command
                seen_file = seen_file or is_file


def test_presigned_post_fields_are_sent_as_strings() -> None:
    # A field like Content-Disposition holds ';', which curl -F would cut.
    post = [b for b in SHELL_BLOCKS if '\\"method\\": \\"post\\"' in b]
    assert post and all("--form-string" in b for b in post)


def test_sign_example_uses_the_exact_size_and_extracts_the_url() -> None:
    sign = [b for b in SHELL_BLOCKS if "/sign" in b]
    assert sign
    for block in sign:
        assert "stat -c%s" in block and '["url"]' in block


def test_the_settings_table_shows_the_defaults_help_shows() -> None:
    """--help said 'default unset' for auto settings (README: auto) and True/False for
    booleans (README: true/false); both now come from one rule."""
    rows = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| `S3PROXY_\w+` \| `([^`]*)` \|", README, re.M))
    shown = " ".join(subcommands()["serve"].format_help().split())
    for f in dataclasses.fields(Settings):
        if not f.init:
            continue
        flag, env = "--" + f.name.replace("_", "-"), "S3PROXY_" + f.name.upper()
        assert f"[env {env}; default {rows[flag]}]" in shown, flag


# What the tus code answers for a header that is missing, malformed or repeated, asked of
# the pure functions themselves (None: no pure call shows it; not checked here).
_TUS_FAULTS: dict[str, dict[str, Callable[[], object] | None]] = {
    "missing": {
        "Tus-Resumable": lambda: tus_protocol.check_version(None),
        "Upload-Length": lambda: tus_protocol.parse_count("Upload-Length", None),
        "Upload-Offset": lambda: tus_protocol.parse_count("Upload-Offset", None),
    },
    "malformed": {
        "Tus-Resumable": lambda: tus_protocol.check_version("0.2.2"),
        "Upload-Length": lambda: tus_protocol.parse_count("Upload-Length", "-1"),
        "Upload-Offset": lambda: tus_protocol.parse_count("Upload-Offset", "x"),
        "Upload-Metadata": lambda: tus_protocol.parse_metadata("a b c"),
        "Upload-Checksum": lambda: tus_protocol.parse_checksum("sha1 AAAA"),
        "Upload-Defer-Length": None,  # read in tus.py against the request
    },
    "repeated": {
        name: (lambda name=name: tus_protocol.check_single([name, name]))  # type: ignore[misc]
        for name in tus_protocol.SINGLE
    },
}


def _tus_fault_code(fault: str, header: str) -> str | None:
    call = _TUS_FAULTS[fault].get(header)
    if call is None:
        return None
    with pytest.raises(errors.ProxyError) as caught:
        call()
    return caught.value.kind.code


def test_each_tus_header_fault_is_listed_under_the_code_it_gets() -> None:
    """A row's "missing (...)", "malformed (...)" or "repeated (...)" lists only headers
    that get that row's code: the table listed a malformed Upload-Checksum under both
    INVALID_REQUEST and INVALID_DIGEST (it is INVALID_DIGEST), and a missing Tus-Resumable
    under INVALID_REQUEST (it is 412 UNSUPPORTED_VERSION)."""
    row = re.compile(r"^\s*\| \d{3}(?: / \d{3})* \| (.*?) \| (.*) \|$")
    fault = r"(?:missing|malformed|repeated)"
    claim = re.compile(rf"({fault}(?:(?:, | or ){fault})*) \(([^()]*)\)")
    checked = 0
    for line in README.splitlines():
        m = row.match(line)
        if not m:
            continue
        codes = set(re.findall(r"`([A-Z_]+)`", m.group(1)))
        for faults, listed in claim.findall(m.group(2)):
            for said in re.findall(r"missing|malformed|repeated", faults):
                for header in re.findall(r"`([A-Za-z-]+)`", listed):
                    if header not in tus_protocol.SINGLE:
                        continue
                    code = _tus_fault_code(said, header)
                    if code is not None:
                        checked += 1
                        assert code in codes, f"{said} {header} is {code}, listed under {codes}"
    assert checked >= 10


def test_examples_read_only_files_an_earlier_example_made() -> None:
    """Regression (config probe): the tus curl and tuspy examples read deck.pdf and the
    digest example deck.pptx, which the README never makes (the quick start makes
    report.pdf): run verbatim, they failed."""
    blocks = re.findall(r"```(?:sh|python)\n(.*?)```", README, re.S)
    read = re.compile(
        r"(?:@|stat -c%s |-binary |--upload-file |uploader\(\"|head -c \d+ |tail -c \S+ )"
        r"([\w.-]+\.\w+)"
    )
    made: set[str] = set()
    for block in blocks:
        for line in block.splitlines():
            missing = {name for name in read.findall(line) if name not in made}
            assert not missing, f"{missing} read before an example makes them: {line}"
            made.update(re.findall(r">\s*([\w.-]+\.\w+)", line))
