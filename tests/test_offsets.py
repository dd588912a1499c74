"""The offset tracker's invariant, property-style: never commit past unfinished work, never stall."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamguard.worker.offsets import OffsetTracker


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, list[int], list[int]]:
    start = draw(st.integers(0, 1000))
    n = draw(st.integers(1, 60))
    offsets = sorted(draw(st.sets(st.integers(start, start + 200), min_size=n, max_size=n)))
    order = draw(st.permutations(offsets))
    stop_after = draw(st.integers(0, len(order)))
    return start, offsets, list(order[:stop_after])


@given(schedules())
def test_commit_point_never_passes_unfinished_work(schedule: tuple[int, list[int], list[int]]) -> None:
    _, offsets, finished = schedule
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in offsets:
        tracker.add("p", offset)
    done: set[int] = set()
    for offset in finished:
        assert tracker.done("p", offset)
        done.add(offset)
        point = tracker.commit_points().get("p")
        unfinished = [o for o in offsets if o not in done]
        if unfinished:
            # Everything below the commit point is finished, and the point is the first unfinished offset.
            assert point is None or point == min(unfinished)
            assert all(o in done for o in offsets if point is not None and o < point)
        else:
            assert point == max(offsets) + 1
        if point is not None:
            tracker.mark_committed({"p": point})
    assert tracker.in_flight("p") == len(offsets) - len(done)


@given(schedules())
def test_commit_points_only_advance(schedule: tuple[int, list[int], list[int]]) -> None:
    _, offsets, finished = schedule
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in offsets:
        tracker.add("p", offset)
    last = -1
    for offset in finished:
        tracker.done("p", offset)
        points = tracker.commit_points()
        if "p" in points:
            assert points["p"] > last
            last = points["p"]
            tracker.mark_committed(points)


def test_partitions_are_independent_and_forget_drops_acks() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(5):
        tracker.add("a", offset)
        tracker.add("b", 100 + offset)
    for offset in (0, 1, 3):
        tracker.done("a", offset)
    tracker.done("b", 100)
    assert tracker.commit_points() == {"a": 2, "b": 101}
    tracker.forget({"a"})
    assert not tracker.done("a", 2)
    assert tracker.commit_points() == {"b": 101}
    assert tracker.in_flight() == 4


def test_first_commit_point_is_the_first_offset_before_anything_finishes() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.add("a", 40)
    tracker.add("a", 41)
    assert tracker.commit_points() == {"a": 40}
    tracker.mark_committed({"a": 40})
    assert tracker.commit_points() == {}


@given(schedules())
def test_resume_point_is_the_first_unfinished_offset_even_after_a_commit(schedule: tuple[int, list[int], list[int]]) -> None:
    _, offsets, finished = schedule
    tracker: OffsetTracker[str] = OffsetTracker()
    assert tracker.resume_point("p") is None
    for offset in offsets:
        tracker.add("p", offset)
    for offset in finished:
        tracker.done("p", offset)
    tracker.mark_committed(tracker.commit_points())
    unfinished = [o for o in offsets if o not in finished]
    # Unlike a commit point, it is reported even when it did not advance past the last commit.
    assert tracker.resume_point("p") == (min(unfinished) if unfinished else max(offsets) + 1)
