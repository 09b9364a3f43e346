"""``s3proxy.sigv4`` against botocore's ``S3SigV4Auth``: every header the same, byte for
byte, on a generated table of the requests the lean calls send (keys encoded as
``s3_parts`` encodes them, part and upload queries, metadata and checksum headers, with
and without a session token, endpoints with and without a port, path and virtual-host
style); anything it does not sign the simple way is left to botocore (None)."""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth, _host_from_url
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from s3proxy.s3_aiobotocore import ClientOptions, open_store
from s3proxy.s3_parts import PartSender, part_url
from s3proxy.sigv4 import SigningKeys, canonical_query, derive_key, host_header, sign

UNSIGNED = Config(s3={"payload_signing_enabled": False})  # the lean path's client config
STAMP = "%Y%m%dT%H%M%SZ"


def botocore_signed(
    method: str,
    url: str,
    headers: Mapping[str, str],
    access_key: str,
    secret_key: str,
    token: str | None,
    region: str,
) -> dict[str, str]:
    """What ``PartSender._signed`` sent before ``sigv4``: botocore's add_auth, now."""
    request = AWSRequest(method, url, headers=dict(headers))
    request.context["client_config"] = UNSIGNED
    S3SigV4Auth(Credentials(access_key, secret_key, token), "s3", region).add_auth(request)
    return dict(request.headers.items())


def botocore_at(
    method: str,
    url: str,
    headers: Mapping[str, str],
    credentials: Credentials,
    region: str,
    timestamp: str,
) -> dict[str, str]:
    """botocore's signature at a given time: add_auth's steps with its timestamp fixed
    (anchored to add_auth by ``test_the_fixed_time_oracle_is_add_auth``)."""
    request = AWSRequest(method, url, headers=dict(headers))
    request.context["client_config"] = UNSIGNED
    request.context["timestamp"] = timestamp
    auth = S3SigV4Auth(credentials, "s3", region)
    auth._modify_request_before_signing(request)
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    auth._inject_signature_to_request(request, signature)
    return dict(request.headers.items())


def ours(
    method: str,
    url: str,
    headers: Mapping[str, str],
    access_key: str,
    secret_key: str,
    token: str | None,
    region: str,
    now: datetime,
    keys: SigningKeys | None = None,
) -> dict[str, str] | None:
    return sign(
        method,
        url,
        headers,
        access_key=access_key,
        secret_key=secret_key,
        token=token,
        region=region,
        now=now,
        keys=keys or SigningKeys(),
    )


def at(signed: Mapping[str, str]) -> datetime:
    return datetime.strptime(signed["X-Amz-Date"], STAMP).replace(tzinfo=UTC)


# --- a generated table of the lean calls' requests --------------------------------------

BASES = [
    "http://127.0.0.1:8333/bucket/",  # SeaweedFS, path style, a port
    "http://localhost/bucket/",  # the default port, left out
    "http://LocalHost:80/b/",  # the default port given, and an upper-case host
    "https://s3.eu-west-1.amazonaws.com/my.bucket/",  # path style
    "https://my-bucket.s3.eu-west-1.amazonaws.com/",  # virtual-host style
    "https://my-bucket.s3.amazonaws.com:443/",
    "https://minio.example:9000/data/",
    "http://[::1]:9000/bucket/",  # IPv6
    "http://[fe80::1%25eth0]:9000/bucket/",  # IPv6 with a zone
    "https://user:pw@store.example:8443/b/",  # userinfo: never signed
]
KEY_CHARS = string.ascii_letters + string.digits + " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + "éü文件✓"
REGIONS = ["us-east-1", "eu-central-1", "garage", "auto"]
HEADER_SETS: list[dict[str, str]] = [
    {},
    {"Content-Type": "application/octet-stream"},
    {
        "Content-Type": "text/plain;  charset=utf-8",
        "Content-Disposition": 'attachment; filename="a  b.txt"',
    },
    {"x-amz-checksum-crc64nvme": "AAAAAAAAAAA=", "Expect": "100-continue"},
    {"x-amz-checksum-sha256": "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg="},
    {"x-amz-meta-owner": "ann", "x-amz-meta-note": "=?UTF-8?B?w6l0w6k=?=", "If-None-Match": "*"},
    {"X-Amz-Meta-Mixed": "  leading and trailing  ", "x-amz-storage-class": "STANDARD_IA"},
    {"x-amz-acl": "private", "x-amz-server-side-encryption": "aws:kms", "User-Agent": "s3proxy"},
    {"Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==", "x-amz-tagging": "a=b&c=d%20e"},
    {"If-Match": '"9b2cf535f27731c974343645a3985328"', "Content-Type": ""},
]


# method, url, headers, access key, secret key, token, region
Case = tuple[str, str, dict[str, str], str, str, str | None, str]


def generated(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    for _ in range(n):
        key = "".join(rng.choice(KEY_CHARS) for _ in range(rng.randint(1, 40)))
        url = rng.choice(BASES) + quote(key, safe="/~")  # as s3_parts._object_url
        query = rng.randrange(6)
        upload_id = "".join(rng.choice(string.ascii_letters + "+/=-_.~ ") for _ in range(30))
        if query == 1:
            url = part_url(url, upload_id, rng.randint(1, 10000))
        elif query == 2:
            url += "?uploads"
        elif query == 3:
            url += f"?uploadId={quote(upload_id, safe='-_.~')}"
        elif query == 4:
            url += "?tagging"
        elif query == 5:  # names out of order: the signer sorts them
            url += f"?uploadId={quote(upload_id, safe='-_.~')}&partNumber={rng.randint(1, 99)}"
        headers = {**rng.choice(HEADER_SETS), "Content-Length": str(rng.randrange(10**10))}
        token = rng.choice([None, "", "FwoGZXIvYXdzEJr//////////wEaDM+token/" + str(rng.random())])
        secret = "".join(rng.choice(string.ascii_letters + string.digits + "+/") for _ in range(40))
        cases.append(
            (
                rng.choice(["PUT", "POST", "put"]),
                url,
                headers,
                "AKIA" + "".join(rng.choice(string.ascii_uppercase) for _ in range(16)),
                secret,
                token,
                rng.choice(REGIONS),
            )
        )
    return cases


@pytest.mark.parametrize("case", generated(400, seed=15))
def test_every_header_is_botocores(case: Case) -> None:
    theirs = botocore_signed(*case)
    mine = ours(*case, now=at(theirs))
    assert mine == theirs
    assert list(mine) == list(theirs)  # and in botocore's order


def test_the_fixed_time_oracle_is_add_auth() -> None:
    for case in generated(50, seed=16):
        theirs = botocore_signed(*case)
        method, url, headers, access_key, secret_key, token, region = case
        credentials = Credentials(access_key, secret_key, token)
        fixed = botocore_at(method, url, headers, credentials, region, theirs["X-Amz-Date"])
        assert fixed == theirs


@pytest.mark.parametrize(
    "now",
    [
        datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC),
        datetime(2025, 1, 1, 0, 0, 0, tzinfo=UTC),
        datetime(2031, 12, 31, 12, 30, 7, tzinfo=UTC),
    ],
)
def test_other_days_sign_as_botocore(now: datetime) -> None:
    keys = SigningKeys()
    for case in generated(30, seed=now.day):
        method, url, headers, access_key, secret_key, token, region = case
        credentials = Credentials(access_key, secret_key, token)
        theirs = botocore_at(method, url, headers, credentials, region, now.strftime(STAMP))
        assert ours(*case, now=now, keys=keys) == theirs


def test_the_signing_key_is_derived_once_a_day() -> None:
    keys = SigningKeys()
    case = generated(1, seed=1)[0]
    day = datetime(2025, 6, 1, 10, 0, 0, tzinfo=UTC)
    for seconds in range(0, 3600, 60):
        ours(*case, now=day + timedelta(seconds=seconds), keys=keys)
    assert keys.derived == 1
    ours(*case, now=day + timedelta(days=1), keys=keys)
    assert keys.derived == 2
    method, url, headers, access_key, secret_key, token, region = case
    ours(method, url, headers, access_key, secret_key + "x", token, region, day, keys=keys)
    assert keys.derived == 3  # new credentials: a new key, not the cached one


def test_derive_key_is_sigv4s() -> None:
    # AWS's published example (General Reference, "Examples of how to derive a signing key")
    key = derive_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


@pytest.mark.parametrize("base", BASES)
def test_host_is_botocores(base: str) -> None:
    scheme, _, rest = base.partition("://")
    assert host_header(scheme, rest.split("/", 1)[0]) == _host_from_url(base)


@pytest.mark.parametrize(
    ("query", "canonical"),
    [
        ("", ""),
        ("uploads", "uploads="),
        ("uploadId=a%2Bb&partNumber=7", "partNumber=7&uploadId=a%2Bb"),
        ("b=2&a=2&a=1", "a=1&a=2&b=2"),
    ],
)
def test_canonical_query_sorts_without_reencoding(query: str, canonical: str) -> None:
    assert canonical_query(query) == canonical


# --- left to botocore -------------------------------------------------------------------

NOW = datetime(2025, 6, 1, tzinfo=UTC)
URL = "http://127.0.0.1:8333/bucket/key"


@pytest.mark.parametrize(
    ("url", "headers", "token"),
    [
        (URL, {"x-amz-meta-note": "été"}, None),  # non-ASCII value
        (URL, {"x-amz-meta-é": "a"}, None),  # non-ASCII name
        (URL, {"x-amz-meta-note": "a\tb"}, None),  # a tab botocore would trim
        (URL, {"x-amz-meta-note": "a\r\n b"}, None),
        (URL, {"Date": "Sun, 01 Jun 2025 00:00:00 GMT"}, None),  # botocore rewrites it
        (URL, {"Host": "elsewhere"}, None),  # botocore signs the given host
        (URL, {"X-Amz-Date": "20250601T000000Z"}, None),
        (URL, {"x-amz-content-sha256": "UNSIGNED-PAYLOAD"}, None),
        (URL, {"Authorization": "x"}, None),
        (URL, {"Content-Type": "a", "content-type": "b"}, None),  # one name twice
        (URL, {" x-amz-meta-a": "b"}, None),
        (URL, {"": "b"}, None),
        ("http://127.0.0.1:8333/bucket/é", {}, None),  # a path that is not encoded
        (URL, {}, "tok\nen"),
    ],
)
def test_what_is_not_simple_is_left_to_botocore(
    url: str, headers: dict[str, str], token: str | None
) -> None:
    assert ours("PUT", url, headers, "AK", "SK", token, "us-east-1", NOW) is None


# --- PartSender._signed: fresh credentials, ours or botocore's ----------------------------


async def test_signed_uses_the_clients_credentials_and_falls_back_to_botocore(
    moto: Any, bucket: str
) -> None:
    opts = ClientOptions(endpoint_url=moto.endpoint_url, region="eu-central-1")
    async with open_store(opts, bucket) as store:
        sender = store._part_sender()
        assert isinstance(sender, PartSender)
        credentials = await store._client._request_signer._credentials.get_frozen_credentials()
        url = part_url(f"{moto.endpoint_url}/{bucket}/a%20b", "id+1", 3)
        for method, headers in [
            ("PUT", {"x-amz-checksum-crc32": "AAAAAA=="}),  # ours
            ("POST", {"x-amz-meta-note": "été"}),  # botocore's
        ]:
            signed = await sender._signed(method, url, 5, headers)
            stamp = signed["X-Amz-Date"]
            want = {**headers, "Content-Length": "5"}
            theirs = botocore_at(method, url, want, credentials, "eu-central-1", stamp)
            assert signed == theirs
            assert signed["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
        assert sender._keys.derived == 1  # the first was ours, the second botocore's
