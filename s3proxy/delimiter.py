"""Pure: find a multipart part's end in its chunks as they arrive, without joining them.

A part's body ends at the first ``CRLF--boundary`` (RFC 2046 section 5.1.1, the
delimiter). ``DelimiterScan`` is fed the stream's chunks in order and returns the
part's bytes with as few copies as the search allows:

- a chunk that holds no delimiter and whose last ``len(delimiter) - 1`` bytes hold no
  ``\\r`` is handed on whole, the same ``bytes`` object (no copy: the common case);
- where a chunk ends in what may be the start of a delimiter (a suffix that is a
  prefix of it, so it starts with ``\\r``), only that tail is held back, and the next
  chunk settles it by looking at ``tail + its first len(delimiter) - 1 bytes`` (a few
  dozen bytes); the bytes before the tail are a slice (one copy of the chunk). How
  rare: on random data 1 chunk in 255 (it ends in a ``\\r``, 1/256, or in a longer
  prefix, 1/65,536 and less; measured 0.39%); on bench/body.py's junk (CRLF runs,
  near-boundaries, dash runs) 44% of chunks cut at random points (measured; checked in
  ``tests/test_delimiter.py``): one slice copy each, fewer than aiohttp's two copies of
  every chunk;
- the delimiter's first byte may lie in the held tail and the rest in the next chunk
  (or the next few, when chunks are tiny): found all the same;
- when the delimiter is found, the bytes before it are the part's last bytes (a slice),
  and what follows the delimiter's CRLF (``--boundary`` and the rest of the body) is
  returned to be pushed back onto the stream (one copy per part).

Like aiohttp's ``BodyPartReader._read_chunk_from_stream``, the scan starts with the CRLF
that ended the part's headers held as if it were the body's first bytes: a body that
starts with ``--boundary`` is an empty part. Those two bytes are never emitted. What
follows a delimiter (``--`` for the last one, else CRLF) is not checked here: the
multipart reader reads that line next, as it does after aiohttp's own reads.
"""

from __future__ import annotations

from s3proxy.memfind import find

CRLF = b"\r\n"


class DelimiterScan:
    """One part's body: ``feed`` it chunks until it says where the part ended."""

    def __init__(self, delimiter: bytes) -> None:
        if len(delimiter) < 3 or not delimiter.startswith(CRLF):
            raise ValueError(f"a multipart delimiter is CRLF, then more: {delimiter!r}")
        self.delimiter = delimiter
        self.found = False
        # A possible start of the delimiter at the end of what was fed, held back. Its
        # first ``_virtual`` bytes are the header's CRLF, not the part's (only at first).
        self._held = CRLF
        self._virtual = len(CRLF)

    @property
    def held(self) -> bytes:
        """The part's bytes held back, not yet emitted (fewer than the delimiter's)."""
        return self._held[self._virtual :]

    def feed(self, chunk: bytes) -> tuple[list[bytes], bytes | None]:
        """The part's bytes this chunk settles (in order, none empty), and once the
        delimiter is found, the bytes after its CRLF (``--boundary...``), else None."""
        if self.found:
            raise RuntimeError("the part already ended")
        if not chunk:
            return [], None
        d = self.delimiter
        n = len(d)
        out: list[bytes] = []
        virtual = 0  # of ``chunk``'s first bytes, those that are not the part's
        held = self._held
        if held:
            k = len(held)
            probe = held + chunk[: n - 1]  # every delimiter that starts in ``held``
            at = probe.find(d)
            if 0 <= at < k:
                self._end(held[self._virtual : at], out)
                rest = held[at + 2 :] + chunk if at + 2 < k else chunk[at + 2 - k :]
                return out, rest
            if len(chunk) < n - 1:
                # A tiny chunk: a delimiter may still start in ``held``. Scan the two as
                # one (fewer than 2 delimiters' bytes: a small copy).
                chunk, virtual = probe, self._virtual
            elif k > self._virtual:
                out.append(held[self._virtual :])  # no delimiter starts in it: the part's
            self._held, self._virtual = b"", 0
        at = find(chunk, d)  # libc's memmem: half bytes.find's CPU (s3proxy.memfind)
        if at >= 0:
            self._end(chunk[virtual:at], out)
            return out, chunk[at + 2 :]
        cut = _tail_start(chunk, d)
        if cut == len(chunk) and not virtual:
            out.append(chunk)  # the common case: the chunk itself, not a copy
        elif cut > virtual:
            out.append(chunk[virtual:cut])
        self._held, self._virtual = chunk[cut:], max(0, virtual - cut)
        return out, None

    def _end(self, last: bytes, out: list[bytes]) -> None:
        self.found = True
        self._held, self._virtual = b"", 0
        if last:
            out.append(last)


def _tail_start(chunk: bytes, d: bytes) -> int:
    """Where the longest suffix of ``chunk`` that is a proper prefix of ``d`` starts
    (``len(chunk)`` if none). Such a suffix starts with ``d``'s first byte, a CR."""
    first = d[:1]
    at = chunk.find(first, max(0, len(chunk) - (len(d) - 1)))
    while at >= 0:
        if d.startswith(chunk[at:]):
            return at
        at = chunk.find(first, at + 1)
    return len(chunk)
