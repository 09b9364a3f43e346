"""Part-size arithmetic and slicing: pure, table-driven, no event loop."""

from __future__ import annotations

import pytest

from s3proxy.parts import (
    GATHER_BELOW,
    GATHER_SIZE,
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    GiB,
    MiB,
    PartPlan,
    PartSlicer,
    largest_part,
    plan_parts,
)

TiB = 1024 * GiB


@pytest.mark.parametrize(
    ("base", "bound", "max_file", "want_base", "growing"),
    [
        (8 * MiB, None, 5 * GiB, 8 * MiB, False),  # 5 GiB fits in 640 parts
        (8 * MiB, 100, 5 * GiB, 8 * MiB, False),  # tiny known file
        (5 * MiB, None, 48 * GiB, 5 * MiB, False),  # 48 GiB < 5 MiB x 10,000
        (5 * MiB, None, 100 * GiB, 5 * MiB, True),  # unknown length: grows
        (5 * MiB, 100 * GiB, 5 * TiB, 11 * MiB, False),  # known: one equal size, MiB-rounded
        (8 * MiB, 5 * TiB, 5 * TiB, 525 * MiB, False),
        (8 * MiB, None, 5 * TiB, 8 * MiB, True),
        (64 * MiB, 10 * GiB, 5 * TiB, 64 * MiB, False),  # configured size wins when bigger
    ],
)
def test_plan_parts(
    base: int, bound: int | None, max_file: int, want_base: int, growing: bool
) -> None:
    plan = plan_parts(base, bound, max_file)
    assert (plan.base, plan.growing) == (want_base, growing)
    reach = min(bound or max_file, max_file)
    assert plan.capacity() >= reach, "the plan must reach the bound within 10,000 parts"


@pytest.mark.parametrize(
    ("number", "size"),
    [
        (1, 8 * MiB),
        (1000, 8 * MiB),
        (1001, 16 * MiB),
        (2001, 32 * MiB),
        (9001, 4 * GiB),
        (10_000, 4 * GiB),
    ],
)
def test_growth_schedule(number: int, size: int) -> None:
    assert PartPlan(8 * MiB, growing=True).size(number) == size


def test_growing_plan_reaches_s3_object_limit_within_part_cap() -> None:
    for base in (MIN_PART_SIZE, 8 * MiB, 16 * MiB):
        plan = plan_parts(base, None, MAX_OBJECT_SIZE)
        assert plan.growing
        assert plan.capacity() >= MAX_OBJECT_SIZE
        assert all(plan.size(n) <= MAX_PART_SIZE for n in range(1, MAX_PARTS + 1, 250))
        assert all(plan.size(n) >= MIN_PART_SIZE for n in range(1, MAX_PARTS + 1, 250))


@pytest.mark.parametrize(("number"), [0, MAX_PARTS + 1])
def test_part_number_out_of_range(number: int) -> None:
    with pytest.raises(ValueError):
        PartPlan(8 * MiB, growing=False).size(number)


@pytest.mark.parametrize(
    ("total", "parts"),
    [(0, 1), (1, 1), (8 * MiB, 1), (8 * MiB + 1, 2), (8000 * MiB, 1000), (8000 * MiB + 1, 1001)],
)
def test_parts_for(total: int, parts: int) -> None:
    assert PartPlan(8 * MiB, growing=True).parts_for(total) == parts


@pytest.mark.parametrize(
    ("base", "max_file", "largest"),
    [(8 * MiB, 5 * GiB, 8 * MiB), (8 * MiB, 100 * GiB, 64 * MiB), (5 * MiB, 1 * TiB, 640 * MiB)],
)
def test_largest_part(base: int, max_file: int, largest: int) -> None:
    assert largest_part(base, max_file) == largest


def test_invalid_base() -> None:
    with pytest.raises(ValueError):
        plan_parts(MIN_PART_SIZE - 1, None, GiB)


def slice_all(
    plan: PartPlan, chunks: list[bytes], limit: int | None = None
) -> list[tuple[int, bytes]]:
    slicer = PartSlicer(plan, limit)
    out = []
    for chunk in chunks:
        rest = slicer.feed(chunk)
        while slicer.full:
            out.append(slicer.take())
            rest = slicer.feed(rest)
        assert not rest
    out.append(slicer.take())
    return [(n, b"".join(chunks)) for n, chunks in out]


@pytest.mark.parametrize(
    ("base", "chunk"),
    [
        # Every chunk size really reaches the slicer: small parts for small chunks,
        # so a 1-byte feed stays quick; S3-sized parts for chunks around a part.
        (1000, 1),
        (1000, 7),
        (1000, 999),
        (1000, 1000),
        (1000, 1001),
        (1000, 4096),
        (5 * MiB, 5 * MiB),
        (5 * MiB, 7 * MiB),
        (5 * MiB, 11 * MiB + 3),
    ],
)
def test_slicer_cuts_exact_parts(base: int, chunk: int) -> None:
    size = 2 * base + base // 2 + 4  # two full parts and a short third
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    assert len(chunks) > 1 or chunk >= len(data)
    parts = slice_all(PartPlan(base, growing=False), chunks)
    assert [n for n, _ in parts] == [1, 2, 3]
    assert [len(p) for _, p in parts[:2]] == [base, base]
    assert 0 < len(parts[2][1]) < base
    assert b"".join(p for _, p in parts) == data


def test_slicer_does_not_copy_whole_chunks() -> None:
    chunk = b"y" * MiB
    slicer = PartSlicer(PartPlan(5 * MiB, growing=False))
    for _ in range(5):
        assert not slicer.feed(chunk)
    _, chunks = slicer.take()
    assert all(c is chunk for c in chunks)


def test_slicer_gathers_small_chunks() -> None:
    """A part fed 1-byte chunks holds a few gathered chunks, not one object per byte
    (~66 bytes of memory per byte of a part, reprobe10b N2); a big chunk between them
    is still kept as it is, in order."""
    big = b"B" * GATHER_BELOW
    data = bytes(range(256)) * 1024
    slicer = PartSlicer(PartPlan(5 * MiB, growing=False))
    for i in range(len(data)):
        slicer.feed(data[i : i + 1])
        if i == 1000:
            slicer.feed(big)
    _, chunks = slicer.take()
    assert b"".join(chunks) == data[:1001] + big + data[1001:]
    assert any(c is big for c in chunks)
    assert len(chunks) <= 2 + len(data) // GATHER_SIZE + 1
    assert all(isinstance(c, bytes) for c in chunks)


def test_slicer_boundary_ends_with_empty_part() -> None:
    data = b"x" * (10 * MiB)
    parts = slice_all(PartPlan(5 * MiB, growing=False), [data])
    assert [len(p) for _, p in parts] == [5 * MiB, 5 * MiB, 0]


@pytest.mark.parametrize(
    ("limit", "allocations"), [(None, [5 * MiB]), (100, [100]), (6 * MiB, [5 * MiB, 1 * MiB])]
)
def test_slicer_allocation_respects_known_limit(limit: int | None, allocations: list[int]) -> None:
    slicer = PartSlicer(PartPlan(5 * MiB, growing=False), limit)
    seen = [slicer.allocation()]
    if limit and limit > 5 * MiB:
        slicer.feed(b"x" * (5 * MiB))
        slicer.take()
        seen.append(slicer.allocation())
    assert seen == allocations


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bound", [MAX_PARTS * MAX_PART_SIZE + 1, 51 * TiB, 1024 * TiB])
@pytest.mark.parametrize("known", [False, True])
def test_a_bound_no_plan_reaches_is_refused_not_searched_forever(bound: int, known: bool) -> None:
    """Regression (integrity probe): `serve --max-file-size 51TiB` spun at 100% CPU at
    start: a growing plan's parts stop at 5 GiB, so its capacity never reached the bound."""
    with pytest.raises(ValueError, match="parts of at most 5 GiB"):
        plan_parts(5 * MiB, bound if known else None, bound)
    with pytest.raises(ValueError):
        largest_part(5 * MiB, bound)
    plan = plan_parts(5 * MiB, None, MAX_PARTS * MAX_PART_SIZE)  # the most any plan holds
    assert plan.capacity() >= MAX_PARTS * MAX_PART_SIZE
