"""Has a request body all arrived? Seen while its upload waits for memory.

While an upload waits for a part's memory the proxy does not read its socket, so its
client's bytes pile up in the kernel (s3proxy.budget: ready uploads first, silent ones
time out). An upload whose body has all arrived is ready: granted memory, it runs to
its end. One whose client went silent with bytes still owed is not, and is timed out.
Which of the two a silent client is must be known, not guessed (fix-fair2: guessing
"maybe done" for every silent chunked or coded body let 12 silent chunked clients
queued ahead of a normal 20 MiB upload delay it 9.1 s, 24 of them 20.8 s, against
0.44 s behind 12 silent Content-Length clients).

- A body with a Content-Length and no Content-Encoding ends at its length (s3proxy.form
  counts it, decoded bytes being bytes as sent).
- A coded body framed by its Content-Length (``Content-Encoding: gzip``) ends at that
  many bytes *as sent*: the connection counts the raw bytes it read of it
  (``protocol.ProxyRequestHandler.body_seen``), plus the kernel's unread ones.
- A chunked body (coded or not) has ended once its last chunk has come: ``0`` (with
  optional extensions) CRLF, trailer fields, CRLF (RFC 9112 section 7.1). The bytes
  the connection read were followed as they came (``chunks.ChunkExtensions``, which
  also holds what aiohttp's parser has not parsed yet: it is fed every byte read), so
  the kernel's unread bytes, peeked at and left there (MSG_PEEK), continue that walk
  exactly: data that looks like a last chunk (``\\r\\n0\\r\\n\\r\\n`` inside a file) is
  skipped as data. A walk the parser will refuse counts as ended too: granted, the
  upload fails at once and frees its memory.

Peeking copies the kernel's unread bytes, so it is bounded (``PEEK_LIMIT``) and done
only for a client about to be judged: waited a whole window, sending below its minimum
rate (s3proxy.pipeline ``wait_state``); the answer is kept while nothing more comes.
Past the bound the end stays unknown and the budget's rule for an unknown end holds
(a silent one counts as ready, as before): such a client sent over a MiB the proxy has
not read, mostly one the proxy holds back (its window closed: ready anyway).
"""

from __future__ import annotations

import copy
import socket
from typing import Any

from s3proxy.chunks import ChunkExtensions

# Most unread bytes one look copies out of the kernel (MSG_PEEK): a MiB per silent
# waiter, once per silence, outside the memory budget.
PEEK_LIMIT = 1024 * 1024


def length_ended(received: int, length: int) -> bool:
    """A body framed by its ``length`` (bytes as sent) has ended: ``received`` of them
    (read, or waiting in the kernel) reach it."""
    return received >= length


def chunked_ended(framing: ChunkExtensions, kernel: int, tail: bytes | None = None) -> bool | None:
    """Has a chunked body ended, given its ``framing`` followed over the bytes read so
    far, the ``kernel``'s count of bytes unread after them, and those bytes (``tail``:
    all of them or their beginning; None when not looked at)? None when that cannot be
    told without looking further."""
    if framing.done:
        return True
    if kernel <= 0:
        return False  # every byte that came was followed, and the end was not among them
    if tail is None:
        return None
    walk = copy.copy(framing)  # the connection's own walk goes on with what it reads
    walk.feed(tail)
    if walk.done:
        return True
    return False if len(tail) >= kernel else None


def peek(sock: Any, size: int) -> bytes | None:
    """Up to ``size`` of the bytes the kernel holds unread for ``sock`` (anything with
    ``fileno()``), left there for the next read; None when it cannot tell.

    asyncio's socket wrapper refuses ``recv`` (deprecated), so the file descriptor is
    wrapped for one call and let go (``detach``: not closed)."""
    try:
        wrapped = socket.socket(fileno=sock.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return wrapped.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    finally:
        wrapped.detach()
