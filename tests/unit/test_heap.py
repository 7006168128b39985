"""atlasd.heap: settling freezes what survives; a frozen cycle waits for the full settle."""

from __future__ import annotations

import gc
import platform
import ssl
import weakref
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from atlasd.heap import PAUSES, GcPauses, Heap, _malloc_trim, export_pauses, release_tls


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()
    gc.collect()


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    holder.append(a)
    return ref


holder: list[_Node] = []


def test_settle_freezes_the_survivors_and_the_next_collections_skip_them() -> None:
    now = [0.0]
    heap = Heap(full_seconds=100.0, clock=lambda: now[0])
    ref = _cycle()
    heap.settle("test")
    assert gc.get_freeze_count() > 0
    # Frozen, then dead: an ordinary collection does not walk it ...
    holder.clear()
    gc.collect()
    assert ref() is not None
    # ... a settle before full_seconds does not either ...
    now[0] = 50.0
    heap.settle("test")
    assert ref() is not None
    # ... the full settle does.
    now[0] = 100.0
    heap.settle("test")
    assert ref() is None
    assert heap.settles == 3


def test_an_unfrozen_cycle_is_collected_by_the_settle() -> None:
    heap = Heap(full_seconds=100.0, clock=lambda: 0.0)
    heap.settle("first")
    ref = _cycle()
    holder.clear()
    heap.settle("second")  # not full: collects only what is not frozen
    assert ref() is None


def test_pauses_are_timed_by_generation_and_exported() -> None:
    pauses = GcPauses(buckets=(0.5, 10.0))
    registry = CollectorRegistry()
    registry.register(pauses)
    pauses.install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.uninstall()

    def count(gen: int, cause: str = "allocation") -> float | None:
        return registry.get_sample_value(
            "atlasd_gc_pause_seconds_count", {"generation": str(gen), "cause": cause}
        )

    timed = count(2)
    assert timed is not None and timed >= 1.0
    assert (count(0) or 0.0) >= 1.0
    gc.collect(2)
    assert count(2) == timed  # not timed once uninstalled
    assert (
        registry.get_sample_value(
            "atlasd_gc_pause_seconds_bucket",
            {"generation": "2", "cause": "allocation", "le": "+Inf"},
        )
        == timed
    )
    longest = registry.get_sample_value(
        "atlasd_gc_pause_max_seconds", {"generation": "2", "cause": "allocation"}
    )
    assert longest is not None and 0.0 < longest == pauses.longest(2)
    assert count(2, "settle") == 0.0


def test_the_c_allocator_is_trimmed_where_it_is_glibc() -> None:
    trim = _malloc_trim()
    if platform.libc_ver()[0] == "glibc":
        assert trim is not None
        assert trim() in (0, 1)  # 1: memory was released
    else:  # musl and others have no malloc_trim: settles do without it
        assert trim is None


def test_a_settle_s_own_collection_is_told_apart() -> None:
    registry = CollectorRegistry()
    assert export_pauses(registry) is PAUSES
    try:

        def count(cause: str) -> float | None:
            return registry.get_sample_value(
                "atlasd_gc_pause_seconds_count", {"generation": "2", "cause": cause}
            )

        settles, others = count("settle"), count("allocation")
        Heap(clock=lambda: 0.0).settle("test")
        assert count("settle") == (settles or 0.0) + 1
        assert count("allocation") == others
        assert PAUSES.longest(2, "settle") > 0.0
    finally:
        PAUSES.uninstall()


def _automatic_full_collections() -> int:
    """How many full collections allocating (and keeping) 200,000 lists triggers."""
    gc.freeze()
    gc.collect()  # the unfrozen heap is now nearly empty: the next ones are due soon
    before = gc.get_stats()[2]["collections"]
    kept = [[i] for i in range(200_000)]
    after = gc.get_stats()[2]["collections"]
    del kept
    return after - before


def test_take_over_leaves_full_collections_to_the_settles() -> None:
    heap = Heap(clock=lambda: 0.0)
    thresholds = gc.get_threshold()
    assert _automatic_full_collections() > 0  # as CPython schedules them
    heap.take_over()
    try:
        assert _automatic_full_collections() == 0
        settled = gc.get_stats()[2]["collections"]
        heap.settle("test")
        assert gc.get_stats()[2]["collections"] == settled + 1
    finally:
        heap.release()
    assert gc.get_threshold() == thresholds
    assert _automatic_full_collections() > 0


def test_a_closed_tls_stream_is_freed_once_released() -> None:
    """trio's SSLStream holds itself (its handshake); released, dropping it frees it without
    the cycle collector (which a settle's frozen objects only meet hourly)."""
    ctx = ssl.create_default_context()

    def dropped(release: bool) -> bool:
        left, _ = trio.testing.memory_stream_pair()
        stream = trio.SSLStream(left, ctx, server_hostname="atlasd.test")
        alive = weakref.ref(stream)
        if release:
            release_tls(stream)
        del stream
        return alive() is None

    gc.disable()
    try:
        assert not dropped(release=False)  # the cycle this is about
        assert dropped(release=True)
    finally:
        gc.enable()
        gc.collect()
