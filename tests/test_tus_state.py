"""Pure: the tus state record checks itself (a sha256 of its bytes leads it) and must hold
together (offset, parts, segments), so a byte changed on the way back from S3 is refused,
never believed; records written before the check are still read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pytest

from s3proxy.errors import INTERNAL, UPSTREAM_CORRUPTION, ProxyError
from s3proxy.tus_state import (
    COMPLETED,
    FAILED,
    TERMINATED,
    TERMINATING,
    CorruptState,
    Lock,
    Part,
    Segment,
    TusState,
)

MiB = 1024**2
CRC = "AAAAAAAAAAA="  # a CRC64NVME, base64

STATE = TusState(
    offset=5 * MiB + 30,
    key="uploads/x/deck.pdf",
    length=12 * MiB,
    upload_id="u-1",
    content_type="application/pdf",
    checksum="CRC64NVME",
    parts=[Part(1, '"e1"', 5 * MiB, CRC)],
    segments=[
        Segment(".s3proxy/tus/x/seg/a", 5 * MiB, 10, CRC),
        Segment(".s3proxy/tus/x/seg/b", 5 * MiB + 10, 20, "AQIDBAUGBwg="),
    ],
    lock=Lock("me", 100.5),
)


def old_record(state: TusState, **changes: Any) -> bytes:
    """The record as the code before the check wrote it: ``asdict``, segments without CRCs
    (and without the object's metadata, which came after the check)."""
    fields = json.loads(state.to_bytes())
    del fields["check"], fields["segment_crcs"], fields["metadata"], fields["fields"]
    fields.update(changes)
    return json.dumps(fields, separators=(",", ":")).encode()


def test_a_state_round_trips_with_its_segment_crcs() -> None:
    again = TusState.from_bytes(STATE.to_bytes())
    assert again == STATE
    assert [s.crc for s in again.segments] == [CRC, "AQIDBAUGBwg="]
    assert TusState.from_bytes(TusState().to_bytes()) == TusState()


def test_every_flipped_bit_of_a_record_is_refused() -> None:
    raw = STATE.to_bytes()
    for i in range(len(raw)):
        for bit in range(8):
            changed = bytearray(raw)
            changed[i] ^= 1 << bit
            with pytest.raises(CorruptState):
                TusState.from_bytes(bytes(changed))


def test_a_changed_digit_is_refused_with_502() -> None:
    raw = STATE.to_bytes().replace(b'"offset":5242910', b'"offset":5242911')
    with pytest.raises(ProxyError) as err:
        TusState.from_bytes(raw)
    assert err.value.kind is UPSTREAM_CORRUPTION and err.value.kind.status == 502
    assert "sha256" in err.value.message


def test_a_record_of_the_older_code_is_read() -> None:
    """Rolling upgrade: a state swapped by an instance still on the older code."""
    again = TusState.from_bytes(old_record(STATE))
    assert again.offset == STATE.offset
    assert [s.crc for s in again.segments] == [None, None]  # read back unchecked
    older = json.loads(old_record(STATE))
    del older["length"], older["checksum"]  # older still: fields added since
    older["parts"] = [{"number": 1, "etag": '"e1"', "size": 5 * MiB}]
    assert TusState.from_bytes(json.dumps(older).encode()).checksum is None


def test_a_record_of_this_code_is_read_by_the_older_code() -> None:
    """The older code made a Segment of every field of a segment and ignored unknown
    top-level fields: a segment's CRC must not be inside it."""

    @dataclass(frozen=True)
    class OlderSegment:
        key: str
        start: int
        size: int

    fields = json.loads(STATE.to_bytes())
    assert [OlderSegment(**s).size for s in fields["segments"]] == [10, 20]
    assert fields["offset"] == STATE.offset


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (old_record(STATE, offset=5 * MiB + 31), "offset 5242911 is not the 5242910 bytes"),
        (old_record(STATE, offset=0), "offset 0 is not"),
        (b"{}", "not a tus state"),
        (b"[]", "not a JSON object"),
        (b'{"offset": 1', "not JSON"),
        (old_record(STATE)[:-1] + b',"chEck":"x"}', "no check, and fields"),
    ],
    ids=["offset+1", "offset-0", "empty", "array", "cut", "renamed-check"],
)
def test_records_that_are_no_state_are_refused(record: bytes, why: str) -> None:
    with pytest.raises(CorruptState, match=why):
        TusState.from_bytes(record)


def parts(*numbers: int) -> list[Part]:
    return [Part(n, f'"e{n}"', MiB) for n in numbers]


INCONSISTENT = pytest.mark.parametrize(
    ("state", "why"),
    [
        (TusState(offset=1), "offset 1 is not the 0 bytes"),
        (TusState(offset=2 * MiB, upload_id="u", parts=parts(1, 3)), r"parts numbered \[1, 3\]"),
        (TusState(offset=MiB, upload_id="u", parts=parts(2)), r"parts numbered \[2\]"),
        (TusState(offset=MiB, parts=parts(1)), "parts without a multipart upload"),
        (
            TusState(offset=10, segments=[Segment("s", 5, 5)]),
            "a segment starts at 5, not at 0",
        ),
        (
            TusState(offset=15, segments=[Segment("a", 0, 5), Segment("b", 6, 10)]),
            "a segment starts at 6, not at 5",
        ),
        (TusState(offset=0, segments=[Segment("a", 0, 0)]), "an empty segment"),
        (TusState(offset=5, length=4, segments=[Segment("a", 0, 5)]), "past the length 4"),
        (TusState(offset=5, segments=[Segment("a", 0, 5, CRC)]), "CRCs without an algorithm"),
        (
            TusState(offset=5, checksum="CRC64NVME", segments=[Segment("a", 0, 5, "AAAA")]),
            "checksum:",
        ),
        (TusState(checksum="MD5"), "checksum:"),
    ],
)


def sealed(state: TusState) -> bytes:
    """The record of a state ``to_bytes`` would refuse to write, its check intact (as if
    written by a faulty proxy, or changed together with its check)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TusState, "inconsistency", lambda self: None)
        return state.to_bytes()


@INCONSISTENT
def test_an_inconsistent_state_is_refused_on_read(state: TusState, why: str) -> None:
    with pytest.raises(CorruptState, match=why):
        TusState.from_bytes(sealed(state))


@INCONSISTENT
def test_an_inconsistent_state_is_never_written(state: TusState, why: str) -> None:
    with pytest.raises(ProxyError) as err:
        state.to_bytes()
    assert err.value.kind is INTERNAL
    assert "inconsistent" in err.value.message


def test_a_consistent_state_passes() -> None:
    assert STATE.inconsistency() is None
    done = TusState(offset=2 * MiB, length=2 * MiB, upload_id="u", parts=parts(1, 2))
    assert done.inconsistency() is None


def test_the_objects_metadata_round_trips_and_older_records_have_none() -> None:
    """Upload-Metadata kept for the object rides in the state from the creation to the
    PATCH that makes the object; a record of the code before it (checked, but without the
    two maps) is read as an upload without metadata."""
    with_meta = TusState(metadata={"note": "=?UTF-8?B?Wm/Dqw==?="}, fields={"note": "Zoë"})
    assert TusState.from_bytes(with_meta.to_bytes()) == with_meta
    fields = json.loads(STATE.to_bytes())
    del fields["check"], fields["metadata"], fields["fields"]
    rest = json.dumps(fields, separators=(",", ":")).encode()[1:]
    older = b'{"check":"' + hashlib.sha256(rest).hexdigest().encode() + b'",' + rest
    again = TusState.from_bytes(older)
    assert again == STATE and again.metadata == {} and again.fields == {}


@pytest.mark.parametrize("value", [["a"], {"note": 1}, "note"])
def test_metadata_that_is_no_map_of_texts_is_refused(value: Any) -> None:
    fields = json.loads(STATE.to_bytes())
    del fields["check"]
    fields["metadata"] = value
    rest = json.dumps(fields, separators=(",", ":")).encode()[1:]
    record = b'{"check":"' + hashlib.sha256(rest).hexdigest().encode() + b'",' + rest
    with pytest.raises(CorruptState, match="not a tus state"):
        TusState.from_bytes(record)


@pytest.mark.parametrize(
    ("ending", "lock", "ended"),
    [
        (None, None, None),
        (None, Lock("a-patch", 1.0), None),  # a PATCH's lock, live or stale: still going
        (None, Lock(TERMINATING, 1.0), TERMINATED),  # a DELETE's, for good
        (COMPLETED, None, COMPLETED),
        (FAILED, Lock("the-rollback", 1.0), FAILED),  # a rollback marks under its lock
    ],
)
def test_how_an_upload_whose_state_is_left_ended(
    ending: str | None, lock: Lock | None, ended: str | None
) -> None:
    state = TusState(offset=10, length=30, segments=[Segment("s", 0, 10)], lock=lock)
    state.ending = ending
    assert state.ended() == ended
    assert TusState.from_bytes(state.to_bytes()) == state


def test_a_going_uploads_record_names_no_ending() -> None:
    """Without an ending the record is what it was before the mark existed (older
    instances in a rolling upgrade read it alike)."""
    assert b"ending" not in STATE.to_bytes()


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"ending": "paused"}, "an ending 'paused' no proxy writes"),
        ({"ending": COMPLETED, "length": None}, "completed without the object's size"),
    ],
)
def test_an_ending_no_proxy_writes_is_refused(changes: dict[str, Any], why: str) -> None:
    with pytest.raises(ProxyError, match=why):
        TusState(**changes).to_bytes()
