"""The sha256 tag of a multipart object on a shared key, kept on the object it describes.

S3 takes no condition on PutObjectTagging: the tag an upload writes after its Complete
lands on whatever object the key holds when S3 carries it out. On a shared key (a
``--key-template`` without ``{uuid}``) that can be another upload's object: one that
replaced ours while our tag was on its way (``--no-overwrite false``), or one stored
after our failed upload deleted its own, our tag's answer having been lost (it lands
late). A re-probe found B's bytes tagged with A's hash 6 of 6, a 0.5 s delay enough.

So such an upload looks at its key after its tag: at once, and again when an attempt
of its tag went unanswered and may still land (``janitor.late_delays``; only then, so
no look outlives its upload by minutes as a rule). Its own object gets its tag back if
another's replaced it; another's object carrying our hash loses it. That object's hash
is not ours to know, so a missing tag, never a wrong one. The look pairs the tags with
the object they were read from (the same ETag before and after) and acts only then.
A repair is a tag write too, with no condition: the key may change between the look
and the write's landing (reprobe20a: a restored tag landed on an object stored in
that moment, with one PutObject, which never looks). So a look that wrote looks again,
until one finds nothing to do, and one whose write went unanswered is made again later.
"""

from __future__ import annotations

import enum
import logging

from s3proxy import keys
from s3proxy.s3 import NoSuchKey, ObjectHead, ObjectSink

log = logging.getLogger("s3proxy.upload")

SHA256_TAG = "sha256"


class TagFix(enum.Enum):
    KEEP = "keep"
    RETAG = "retag"  # our object, without our hash: put it back
    UNTAG = "untag"  # another's object, with our hash: remove it


def tag_fix(owned: bool, same_bytes: bool, found: str | None, digest: str) -> TagFix:
    """What to do about the ``sha256`` tag ``found`` on the key's object: ``owned`` (it
    carries our nonce), ``same_bytes`` (its ETag is ours: another upload of the very
    bytes, whose hash is ours too). Pure."""
    if owned:
        return TagFix.KEEP if found == digest else TagFix.RETAG
    if found == digest and not same_bytes:
        return TagFix.UNTAG
    return TagFix.KEEP


def _unquoted(etag: str | None) -> str | None:
    return None if etag is None else etag.strip('"')


# Looks one check makes at most while each finds something to repair (the key changing
# under every one of them); then it is made again later.
MAX_LOOKS = 4


async def check_tag(sink: ObjectSink, key: str, nonce: str, etag: str, digest: str) -> bool:
    """Look at ``key`` and repair its tag (``tag_fix``), again after each repair, until a
    look finds nothing to do. True: look again later (a write of its went unanswered and
    may still land, or the looks ran out). Safe to repeat."""
    late = False
    for _ in range(MAX_LOOKS):
        fix, unanswered = await _look(sink, key, nonce, etag, digest)
        late = late or unanswered > 0
        if fix is TagFix.KEEP:
            return late
    return True


async def _look(
    sink: ObjectSink, key: str, nonce: str, etag: str, digest: str
) -> tuple[TagFix | None, int]:
    """One look and its repair: what was done (None: nothing, the key changed under the
    look, look again), and its write's unanswered attempts."""
    try:
        before = await sink.head(key)
        found = (await sink.tags(key)).get(SHA256_TAG)
        after: ObjectHead = await sink.head(key)
    except NoSuchKey:
        return TagFix.KEEP, 0  # nothing there to carry a tag
    if _unquoted(before.etag) != _unquoted(after.etag):
        log.info("upload.tag_unchecked key=%s nonce=%s reason=replaced", key, nonce)
        return None, 0  # the tags may be either object's
    owned = keys.owned_by(after.metadata, nonce)
    fix = tag_fix(owned, _unquoted(after.etag) == _unquoted(etag), found, digest)
    unanswered = 0
    if fix is TagFix.RETAG:
        unanswered = await sink.tag(key, {SHA256_TAG: digest})
        log.warning("upload.tag_restored key=%s nonce=%s found=%s", key, nonce, found)
    elif fix is TagFix.UNTAG:
        unanswered = await sink.untag(key)
        log.warning("upload.tag_removed key=%s nonce=%s owner=other", key, nonce)
    return fix, unanswered
