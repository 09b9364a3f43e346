"""The one key rule (keys.KeyPolicy): which keys each kind of caller gets and may use.

Tables of client-supplied keys, allowed and refused, for every kind of credential,
and the invariant that ties the two halves together: every key a policy makes is
one it lets its maker read, complete and abort.
"""

from __future__ import annotations

import datetime as dt

import pytest

from s3proxy.auth import Principal
from s3proxy.keys import (
    MAX_KEY_BYTES,
    RESERVED_NAMESPACE,
    KeyPolicy,
    KeyRefused,
    template_problem,
)
from s3proxy.tokens import UploadGrant
from s3proxy.tus_url import RESERVED_PREFIX

TEMPLATE = "uploads/{yyyy}/{mm}/{uuid}/{filename}"
NOW = dt.datetime(2026, 3, 7, tzinfo=dt.UTC)


def grant(prefix: str) -> UploadGrant:
    return UploadGrant(prefix, None, (), None, None, 0)


ANONYMOUS = KeyPolicy.for_grant(TEMPLATE, Principal("anonymous").grant)
API_KEY = KeyPolicy.for_grant(TEMPLATE, Principal("api_key").grant)
TOKEN = KeyPolicy.for_grant(TEMPLATE, Principal("token", grant("users/42/")).grant)
# A template whose literal prefix ends inside a segment: "in-" is not a folder.
DASHED = KeyPolicy("in-{uuid}/{filename}")
DASHED_TOKEN = KeyPolicy("in-{uuid}/{filename}", "users/42/")
# A template with no literal prefix: the bucket (anonymous) or the grant prefix (token).
BARE = KeyPolicy("{uuid}/{filename}")
BARE_TOKEN = KeyPolicy("{uuid}/{filename}", "users/42/")
# Templates without {uuid} (issue #12, --no-overwrite): two uploads can share a key.
SHARED = KeyPolicy("docs/{filename}")
SHARED_TOKEN = KeyPolicy("docs/{filename}", "users/42/")
SHARED_BARE = KeyPolicy("{filename}")
SHARED_DATED = KeyPolicy("{field}/{yyyy}-{mm}-{dd}.bin", "users/42/")

OK, FORBIDDEN, TOO_LONG = "ok", "forbidden", "too long"


@pytest.mark.parametrize(
    ("policy", "prefix"),
    [
        (ANONYMOUS, "uploads/"),
        (API_KEY, "uploads/"),
        (TOKEN, "users/42/uploads/"),
        (DASHED, "in-"),
        (DASHED_TOKEN, "users/42/in-"),
        (BARE, ""),
        (BARE_TOKEN, "users/42/"),
    ],
)
def test_prefix_is_grant_prefix_then_template_prefix(policy: KeyPolicy, prefix: str) -> None:
    assert policy.prefix == prefix


@pytest.mark.parametrize(
    ("policy", "key", "outcome"),
    [
        # anonymous and API-key callers: the template's prefix, nothing else
        (ANONYMOUS, "uploads/2026/03/u1/a.pdf", OK),
        (API_KEY, "uploads/2026/03/u1/a.pdf", OK),
        (API_KEY, "uploads/é/ü ber%.txt", OK),
        (API_KEY, "users/42/uploads/2026/03/u1/a.pdf", FORBIDDEN),  # a token's key is not
        (API_KEY, "uploadsX/a", FORBIDDEN),
        (API_KEY, "other/a", FORBIDDEN),
        (API_KEY, "uploads", FORBIDDEN),
        (API_KEY, "uploads/", FORBIDDEN),  # the prefix itself (and an empty segment)
        (API_KEY, "", FORBIDDEN),
        (API_KEY, "uploads/../secret", FORBIDDEN),
        (API_KEY, "uploads/./a", FORBIDDEN),
        (API_KEY, "uploads/a/..", FORBIDDEN),
        (API_KEY, "uploads//a", FORBIDDEN),
        (API_KEY, "/uploads/a", FORBIDDEN),
        (API_KEY, "uploads/a/", FORBIDDEN),
        (API_KEY, "uploads\\..\\secret", FORBIDDEN),
        (API_KEY, "uploads/a\x00b", FORBIDDEN),
        (API_KEY, "uploads/a\nb", FORBIDDEN),
        (API_KEY, "uploads/a\x85b", FORBIDDEN),  # C1 (NEL)
        (API_KEY, "uploads/evil\u202etxt.exe", FORBIDDEN),  # bidi override
        (API_KEY, "uploads/a\u200bb", FORBIDDEN),  # zero-width space
        (API_KEY, "uploads/\ud800", FORBIDDEN),  # a lone surrogate
        (API_KEY, "uploads/" + "a" * (MAX_KEY_BYTES - 8), OK),
        (API_KEY, "uploads/" + "a" * (MAX_KEY_BYTES - 7), TOO_LONG),
        (API_KEY, "uploads/" + "é" * 509, TOO_LONG),  # 1026 bytes, 517 characters
        # an upload token: under its prefix AND the template's, not the grant prefix alone
        (TOKEN, "users/42/uploads/2026/03/u1/a.pdf", OK),
        (TOKEN, "users/42/a.txt", FORBIDDEN),  # beside its uploads: the backend's, not its
        (TOKEN, "users/42/uploads/", FORBIDDEN),
        (TOKEN, "users/42/uploads", FORBIDDEN),
        (TOKEN, "users/420/uploads/a", FORBIDDEN),
        (TOKEN, "users/43/uploads/a", FORBIDDEN),
        (TOKEN, "uploads/2026/03/u1/a.pdf", FORBIDDEN),  # what API keys make
        (TOKEN, "users/42/uploads/../../43/uploads/a", FORBIDDEN),
        (TOKEN, "users/42/uploads//a", FORBIDDEN),
        # a template prefix that ends without "/"
        (DASHED, "in-0123/a.pdf", OK),
        (DASHED, "in-", FORBIDDEN),
        (DASHED, "inX/a.pdf", FORBIDDEN),
        (DASHED, "in/a.pdf", FORBIDDEN),
        (DASHED_TOKEN, "users/42/in-0123/a.pdf", OK),
        (DASHED_TOKEN, "users/42/in-", FORBIDDEN),
        (DASHED_TOKEN, "users/42/other", FORBIDDEN),
        (DASHED_TOKEN, "in-0123/a.pdf", FORBIDDEN),
        # no template prefix: any well-formed key, or any under the grant prefix
        (BARE, "anything/at/all", OK),
        (BARE, "x", OK),
        (BARE, "", FORBIDDEN),
        (BARE, "../uploads/a", FORBIDDEN),
        # the proxy's own objects (tus state), in reach of a template with no literal prefix
        (BARE, ".s3proxy/tus/0123/state", FORBIDDEN),
        (BARE, ".s3proxy/x", FORBIDDEN),
        (BARE, ".s3proxyless/x", OK),
        (BARE_TOKEN, "users/42/.s3proxy/tus/a", OK),  # not the bucket's reserved namespace
        (BARE_TOKEN, "users/42/0123/a.pdf", OK),
        (BARE_TOKEN, "users/42/", FORBIDDEN),
        (BARE_TOKEN, "users/42", FORBIDDEN),
        (BARE_TOKEN, "users/420/a", FORBIDDEN),
    ],
)
def test_check(policy: KeyPolicy, key: str, outcome: str) -> None:
    if outcome == OK:
        policy.check(key)
        return
    with pytest.raises(KeyRefused) as err:
        policy.check(key)
    assert err.value.too_long is (outcome == TOO_LONG)


def test_grant_prefix_must_be_a_folder() -> None:
    """tokens.py never verifies one without a trailing "/"; a policy refuses it too."""
    with pytest.raises(ValueError, match="must end with /"):
        KeyPolicy(TEMPLATE, "users/4")
    with pytest.raises(ValueError, match="must end with /"):
        KeyPolicy.for_grant(TEMPLATE, grant("users/4"))


@pytest.mark.parametrize(
    "policy",
    [
        ANONYMOUS,
        TOKEN,
        DASHED,
        DASHED_TOKEN,
        BARE,
        BARE_TOKEN,
        SHARED,
        SHARED_TOKEN,
        SHARED_BARE,
        SHARED_DATED,
    ],
)
@pytest.mark.parametrize(
    "filename",
    [
        "a.pdf",
        "../../etc/passwd",
        "C:\\Users\\me\\report.pdf",
        "..",
        "",
        "a\x00b\r\nc.pdf",
        "evil\u202etxt.exe",
        "\ud800.pdf",
        "é" * 300 + ".pdf",
        "uploads/",
    ],
)
def test_every_new_key_passes_check(policy: KeyPolicy, filename: str) -> None:
    """What a caller is given it may read, complete and abort: the two halves agree."""
    key = policy.new_key(filename, "file", now=NOW, upload_id="u1")
    assert key.startswith(policy.prefix) and key != policy.prefix
    policy.check(key)


def test_new_key_is_grant_prefix_then_template_key() -> None:
    assert TOKEN.new_key("a.pdf", now=NOW, upload_id="u1") == "users/42/uploads/2026/03/u1/a.pdf"
    assert API_KEY.new_key("a.pdf", now=NOW, upload_id="u1") == "uploads/2026/03/u1/a.pdf"
    assert KeyPolicy("in/{field}/{uuid}-{filename}").new_key("a.pdf", "doc", upload_id="id") == (
        "in/doc/id-a.pdf"
    )


@pytest.mark.parametrize(
    ("policy", "filename", "key"),
    [
        (SHARED, "a.pdf", "docs/a.pdf"),
        (SHARED, "../../a.pdf", "docs/a.pdf"),  # the same key however the name is dressed
        (SHARED_TOKEN, "a.pdf", "users/42/docs/a.pdf"),
        (SHARED_BARE, "", "upload"),
        (SHARED_DATED, "x", "users/42/file/2026-03-07.bin"),
    ],
)
def test_templates_without_uuid_give_every_upload_of_a_name_one_key(
    policy: KeyPolicy, filename: str, key: str
) -> None:
    assert policy.new_key(filename, now=NOW) == policy.new_key(filename, now=NOW) == key
    policy.check(key)


def test_new_key_too_long_under_a_grant_prefix() -> None:
    """The template's key fits S3's limit; with a long grant prefix in front it does not."""
    long_grant = KeyPolicy(TEMPLATE, "p" * 900 + "/")
    with pytest.raises(ValueError, match="1024-byte"):
        long_grant.new_key("é" * 90 + ".pdf", upload_id="u1")


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        (TEMPLATE, None),
        ("{uuid}/{filename}", None),
        ("in-{uuid}-{filename}", None),
        ("a/{field}/{yyyy}-{mm}-{dd}/{uuid}-{filename}", None),
        ("uploads//{uuid}/{filename}", "empty"),  # make_key would write "uploads/..."
        ("./uploads/{uuid}/{filename}", "empty, . or .."),
        ("uploads/../{uuid}/{filename}", "empty, . or .."),
        ("uploads/{uuid}/../{filename}", "empty, . or .."),  # would drop the uuid
        ("uploads/{uuid}/{filename}/", "empty"),
        ("up\\loads/{uuid}", "backslash"),
        ("up\x01/{uuid}", "control"),
        ("uploads/{nope}", "unknown field {nope}"),
        ("docs/{filename}", None),  # no {uuid}: allowed, under --no-overwrite
        ("{filename}", None),
        ("daily/{yyyy}-{mm}-{dd}.bin", None),
        ("docs/fixed.bin", "no field"),  # every upload the same key, equal to the prefix
        (".s3proxy/{uuid}/{filename}", "the proxy's own"),
    ],
)
def test_template_problem(template: str, problem: str | None) -> None:
    found = template_problem(template)
    if problem is None:
        assert found is None
        policy = KeyPolicy(template, "users/42/")
        policy.check(policy.new_key("a.pdf"))
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize("template", ["uploads//{uuid}/{filename}", "./uploads/{uuid}/{filename}"])
def test_a_template_whose_keys_escape_its_prefix_makes_none(template: str) -> None:
    """make_key normalizes "uploads//x" to "uploads/x", outside the literal prefix
    "uploads//": such a key is refused when made, not handed out unreadable."""
    with pytest.raises(ValueError):
        KeyPolicy(template).new_key("a.pdf")


def test_a_key_made_from_a_field_name_is_never_in_the_reserved_namespace() -> None:
    """With ``{field}/...`` or ``{filename}/...`` and no literal prefix, a field or file
    named ``.s3proxy`` must not put an upload among the tus state objects. Sanitizing keeps
    leading dots (``.env`` is a name people use), so new_key refuses the key instead (a
    400 on every route: INVALID_FIELD, or INVALID_REQUEST for /sign)."""
    with pytest.raises(KeyRefused, match="proxy's own"):
        KeyPolicy("{field}/{uuid}/{filename}").new_key("state", ".s3proxy")
    with pytest.raises(KeyRefused, match="proxy's own"):
        KeyPolicy("{filename}/{uuid}").new_key(".s3proxy", "file")
    assert KeyPolicy("{field}/{uuid}/{filename}").new_key(".env", ".x").startswith(".x/")


def test_the_reserved_namespace_holds_the_tus_state() -> None:
    assert RESERVED_PREFIX.startswith(RESERVED_NAMESPACE)
