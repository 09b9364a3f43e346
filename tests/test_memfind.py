"""s3proxy.memfind: libc's memmem answers exactly what bytes.find answers."""

from __future__ import annotations

import random

import pytest

from s3proxy import memfind
from s3proxy.memfind import MIN_HAYSTACK, find

DELIMITER = b"\r\n--------------------------a1b2c3d4e5f6a7b8c9d0e1"


def test_memmem_is_used_here() -> None:
    """On this machine (glibc) the fast path is taken, or the gain is silently gone."""
    assert find is not memfind._plain


def _cases() -> list[tuple[bytes, bytes]]:
    rng = random.Random(15)
    noise = rng.randbytes(1 << 18)
    d = DELIMITER
    near = (d[:-1] + b"x") * ((1 << 18) // len(d))
    return [
        (noise, d),  # absent
        (noise, noise[123_456:123_506]),  # present once, mid-chunk
        (noise, noise[:50]),  # at 0
        (noise, noise[-50:]),  # at the very end
        (noise + d, d),
        (d + noise + d, d),  # the first of two
        (near, d),  # near misses back to back, absent
        (near + d + near, d),
        (b"-" * (1 << 18), d),
        (b"\r\n" * (1 << 17) + d, d),
        (b"\r\n" * (1 << 17), b"\r\n--"),
        (noise[: MIN_HAYSTACK - 1] + d, d),  # small: bytes.find's path
        (noise[:MIN_HAYSTACK], noise[MIN_HAYSTACK - 3 :]),
        (noise, b""),
        (b"", d),
        (d[:-1], d),  # shorter than the needle
    ]


@pytest.mark.parametrize("hay, needle", _cases())
def test_find_is_bytes_find(hay: bytes, needle: bytes) -> None:
    assert find(hay, needle) == hay.find(needle)


def test_find_agrees_on_random_cuts() -> None:
    """Delimiters cut into random chunks at random places, as socket reads cut them."""
    rng = random.Random(7)
    body = b"".join(rng.randbytes(rng.randrange(1, 70_000)) + DELIMITER for _ in range(40))
    at = 0
    while at < len(body):
        size = rng.randrange(1, 300_000)
        chunk = body[at : at + size]
        for needle in (DELIMITER, DELIMITER[:7], DELIMITER[-9:]):
            assert find(chunk, needle) == chunk.find(needle)
        at += size


def test_no_memmem_means_bytes_find() -> None:
    assert memfind._checked(None) is memfind._plain


def test_a_memmem_that_answers_wrong_is_not_used() -> None:
    """The self-check at import: a libc whose memmem disagrees is left alone."""

    def never_found(at: object, n: int, needle: bytes, m: int) -> int | None:
        return None

    assert memfind._checked(never_found) is memfind._plain


def test_a_bytearray_haystack_is_answered_too() -> None:
    """ctypes points into ``bytes`` only: a bytearray (a future caller's) gets
    bytearray.find's answer, not a TypeError."""
    hay = random.Random(3).randbytes(1 << 16) + DELIMITER
    assert find(bytearray(hay), DELIMITER) == hay.find(DELIMITER)
