"""The deployment guide shows the configurations that are tested.

docs/deploy.md quotes every file under docs/deploy/ whole, and those files are what
tests/test_scale_out.py runs (HAProxy, nginx); the systemd unit is checked by
``systemd-analyze verify``; the IAM policy is valid JSON naming only actions the proxy's
S3 calls need; the README links the guide.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from s3proxy.keys import template_prefix
from s3proxy.settings import Settings
from s3proxy.tus_url import RESERVED_PREFIX

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "deploy.md"
DEPLOY = REPO / "docs" / "deploy"


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", markdown, flags=re.DOTALL)


@pytest.mark.parametrize(
    "name",
    ["haproxy.cfg", "nginx-s3proxy.conf", "s3proxy.service", "s3proxy.env", "iam-policy.json"],
)
def test_the_guide_quotes_each_config_file_whole(name: str) -> None:
    text = (DEPLOY / name).read_text()
    assert text in code_blocks(GUIDE.read_text()), f"docs/deploy.md does not quote {name} whole"


def test_the_readme_links_the_guide() -> None:
    assert "(docs/deploy.md)" in (REPO / "README.md").read_text()


def systemd_environment(text: str) -> dict[str, str]:
    """An EnvironmentFile as systemd reads it: comments only on lines of their own, the
    rest of a line after ``=`` is the value (a ``#`` in it included)."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            name, value = line.split("=", 1)
            env[name.strip()] = value.strip()
    return env


def test_the_env_file_starts_the_proxy_as_systemd_reads_it() -> None:
    """Regression: two lines ended in a comment, which systemd keeps in the value:
    S3PROXY_DRAIN_DELAY='6   # explicit: ...' stopped the service from starting."""
    env = systemd_environment((DEPLOY / "s3proxy.env").read_text())
    assert env["S3PROXY_API_KEY"] == "..."
    env["S3PROXY_API_KEY"] = "0123456789abcdef" * 3
    settings = Settings.load(environ=env)
    assert settings.api_keys() == ("0123456789abcdef" * 3,)
    assert settings.drain_delay == 6 and settings.shutdown_timeout == 30
    assert settings.bucket == "my-uploads" and settings.host == "0.0.0.0"


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd's own check: unknown keys, bad values, a missing binary all complain."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit is checked where it is)")
    unit = (DEPLOY / "s3proxy.service").read_text()
    assert "ExecStart=/opt/s3proxy/.venv/bin/s3proxy serve" in unit
    # only the install path differs: the unit points at this venv's s3proxy
    here = Path(sys.executable).with_name("s3proxy")
    path = tmp_path / "s3proxy.service"
    path.write_text(unit.replace("/opt/s3proxy/.venv/bin/s3proxy", str(here)))
    done = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    # and it gives the drain its time: TimeoutStopSec >= drain delay + shutdown timeout
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert stop >= 6 + 30


def test_the_iam_policy_covers_the_keys_the_proxy_writes() -> None:
    """Regression: the objects' resource was the key template's prefix only, so every
    POST /tus/ (its state under .s3proxy/tus/) was refused AccessDenied by S3."""
    policy = json.loads((DEPLOY / "iam-policy.json").read_text())
    [objects] = [st for st in policy["Statement"] if "s3:PutObject" in st["Action"]]
    resources = objects["Resource"]
    resources = [resources] if isinstance(resources, str) else resources
    covered = [r.removeprefix("arn:aws:s3:::my-uploads/").removesuffix("*") for r in resources]
    for key in (template_prefix(Settings().key_template) + "x", RESERVED_PREFIX + "id/state"):
        assert any(key.startswith(prefix) for prefix in covered), key


def test_the_iam_policy_names_what_the_proxy_calls() -> None:
    """Every S3 operation s3proxy/s3_aiobotocore.py makes is allowed by an action listed,
    and no action is listed that none of them needs."""
    policy = json.loads((DEPLOY / "iam-policy.json").read_text())
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    source = (REPO / "s3proxy" / "s3_aiobotocore.py").read_text()
    # the client's S3 operations (not ``meta`` or private attributes such as its signer)
    calls = set(re.findall(r"_client\.([a-z][a-z_0-9]*)", source)) - {"meta"}
    # presigned URLs are requests made with the proxy's credentials too
    calls |= set(re.findall(r'_sign\(\s*"([a-z_]+)"', source))
    calls |= set(re.findall(r'"([a-z_]+)" if head else "([a-z_]+)"', source)[0])
    if "generate_presigned_post" in source:
        calls.add("put_object")
    # the IAM action that allows each API call (AWS's "Actions, resources and condition
    # keys for Amazon S3"; HeadBucket is allowed by s3:ListBucket, HeadObject by
    # s3:GetObject, the multipart calls but ListParts by s3:PutObject)
    needs = {
        "put_object": "s3:PutObject",
        "create_multipart_upload": "s3:PutObject",
        "upload_part": "s3:PutObject",
        "complete_multipart_upload": "s3:PutObject",
        "abort_multipart_upload": "s3:AbortMultipartUpload",
        "put_object_tagging": "s3:PutObjectTagging",
        "get_object_tagging": "s3:GetObjectTagging",
        "delete_object_tagging": "s3:DeleteObjectTagging",
        "delete_object": "s3:DeleteObject",
        "head_bucket": "s3:ListBucket",
        "list_parts": "s3:ListMultipartUploadParts",
        "list_objects_v2": "s3:ListBucket",
        "list_multipart_uploads": "s3:ListBucketMultipartUploads",
        "head_object": "s3:GetObject",
        "get_object": "s3:GetObject",
    }
    assert calls - set(needs) == set(), f"s3proxy calls S3 in a way the test does not map: {calls}"
    assert {needs[c] for c in calls} == actions
