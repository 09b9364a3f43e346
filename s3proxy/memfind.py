"""Find a multipart delimiter in a large chunk with the C library's ``memmem``.

``bytes.find`` is right and linear, but on a 256 KiB socket read and a curl boundary
(a 50-byte delimiter) CPython 3.11 runs its two-way search at about 0.085 CPU s/GiB;
glibc's ``memmem`` (a shift table on byte pairs, falling back to two-way on hard
input) does the same in about 0.043 (random bytes; ``python -m bench.parser_cost``).
Every byte of every upload is searched once, so this is 2-3% of s3proxy's CPU per GiB.

``find`` answers what ``haystack.find(needle)`` answers, always (a ``bytearray`` too:
only ``bytes`` go to ``memmem``): it is used only
where ``memmem`` is there and gave ``bytes.find``'s answers on a self-check at import
(else ``bytes.find`` stands in), and only for haystacks of ``MIN_HAYSTACK`` bytes or
more (a call through ctypes costs about 1 µs). The haystack's address comes from
ctypes itself (a ``c_char_p`` made from ``bytes`` points into it, no copy).

Worst cases stay linear: on runs of dashes and CRLFs, or a delimiter repeated short of
its last byte, ``memmem`` measured 0.1-0.32 CPU s/GiB against ``bytes.find``'s
0.06-0.18, both within the 3x bound of issue 15.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Final

__all__ = ["MIN_HAYSTACK", "find"]

# Below this, bytes.find is cheaper than a call through ctypes.
MIN_HAYSTACK: Final = 4096

_Memmem = Callable[[ctypes.c_char_p, int, bytes, int], int | None]
_Find = Callable[[bytes | bytearray, bytes], int]


def _load() -> _Memmem | None:
    """libc's memmem, typed for ctypes; None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        memmem = ctypes.CDLL(name).memmem
    except (OSError, AttributeError, TypeError):
        return None
    memmem.restype = ctypes.c_void_p
    memmem.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    return memmem


def _with(memmem: _Memmem) -> _Find:
    cast, c_char_p, c_void_p = ctypes.cast, ctypes.c_char_p, ctypes.c_void_p

    def find(haystack: bytes | bytearray, needle: bytes) -> int:
        if len(haystack) < MIN_HAYSTACK or not needle or type(haystack) is not bytes:
            return haystack.find(needle)  # (ctypes takes a pointer into bytes only)
        at = c_char_p(haystack)  # points at the bytes' own buffer
        hit = memmem(at, len(haystack), needle, len(needle))
        if hit is None:
            return -1
        base = cast(at, c_void_p).value
        assert base is not None
        return hit - base

    return find


def _plain(haystack: bytes | bytearray, needle: bytes) -> int:
    return haystack.find(needle)


def _checked(memmem: _Memmem | None) -> _Find:
    """``memmem``'s find if it answers as ``bytes.find`` does on a few cases, else
    ``bytes.find`` itself."""
    if memmem is None:
        return _plain
    find = _with(memmem)
    hay = bytes(range(256)) * 64 + b"\r\n--end"
    cases = (hay[5000:5050], hay[:40], hay[-7:], b"\r\n--nothere", hay[100:101])
    if all(find(hay, n) == hay.find(n) for n in cases):
        return find
    return _plain


find: Final = _checked(_load())
