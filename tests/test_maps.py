"""zpar._maps, the one mapping implementation, without a cluster.

``Tasks`` stands in for a client: its submit returns plain
``concurrent.futures.Future`` objects that a test resolves by hand, in any
order, by running the submitted callable here. Timeouts are either zero (the
wait gives up at once) or driven by a fake clock, so nothing sleeps.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import itertools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from zpar._maps import MapOptions, Results, over, plan, submit_all
from zpar._wrappers import Chunk, Wrappers


class Tasks:
    """A fake ``submit(fn, *args) -> Future``; remembers each call, runs it when told."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.submitted: list[tuple[Callable[..., Any], tuple[Any, ...], cf.Future[Any]]] = []
        self.fail_at = fail_at

    def __call__(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        if len(self.submitted) == self.fail_at:
            raise TypeError("cannot pickle this argument")
        fut: cf.Future[Any] = cf.Future()
        self.submitted.append((fn, args, fut))
        return fut

    def future(self, i: int) -> cf.Future[Any]:
        return self.submitted[i][2]

    def run(self, *indices: int) -> None:
        """Run the ``i``-th submitted task here and resolve its future (with its exception if it raises)."""
        for i in indices:
            fn, args, fut = self.submitted[i]
            try:
                fut.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001 - the task's own error, whatever it is, is its result
                fut.set_exception(exc)

    def run_all(self) -> None:
        self.run(*(i for i, (_, _, f) in enumerate(self.submitted) if not f.done()))

    def in_flight(self) -> int:
        return sum(not f.done() for _, _, f in self.submitted)


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def fail_on_negative(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


class Late(Exception):
    """The timeout error a test asks for."""


def results(tasks: Tasks, fn: Callable[..., Any], items: list[Any] | Iterator[Any], chunksize: int | None = None,
            **options: Any) -> Results:
    return Results(tasks, over(fn, (items,), chunksize, Wrappers(None)), MapOptions(**options))


#: multiprocessing's contract, as Pool asks: next() goes on past errors; nothing cancelled.
POOL: dict[str, Any] = {"errors_end": False, "cancel_on_exit": False, "timeout_error": Late}


# ---------------------------------------------------------------------- order


def test_ordered_results_come_in_input_order_whatever_order_the_tasks_finish() -> None:
    tasks = Tasks()
    out = results(tasks, square, list(range(6)))
    tasks.run(5, 3, 1, 4, 2, 0)
    assert list(out) == [0, 1, 4, 9, 16, 25]


def test_unordered_yields_each_result_as_soon_as_its_task_is_done() -> None:
    tasks = Tasks()
    out = results(tasks, square, [1, 2, 3], ordered=False)
    tasks.run(2)
    assert next(out) == 9
    tasks.run(0)
    assert next(out) == 1
    tasks.run(1)
    assert next(out) == 4
    with pytest.raises(StopIteration):
        next(out)


def test_several_iterables_are_zipped_and_the_shortest_ends_the_map() -> None:
    tasks = Tasks()
    out = Results(tasks, over(add, (range(10), range(100, 103)), None, Wrappers(None)), MapOptions())
    tasks.run_all()
    assert list(out) == [100, 102, 104]


def test_an_empty_input_submits_nothing_and_ends_at_once() -> None:
    tasks = Tasks()
    assert list(results(tasks, square, [], window=4)) == [] and not tasks.submitted


# ---------------------------------------------------------------------- window


@pytest.mark.parametrize("ordered", [True, False])
def test_the_window_bounds_tasks_in_flight_and_the_input_is_read_lazily(ordered: bool) -> None:
    tasks, read = Tasks(), [0]

    def numbers() -> Iterator[int]:
        for i in range(10):
            read[0] = i + 1
            yield i

    out = results(tasks, square, numbers(), window=3, ordered=ordered)
    assert len(tasks.submitted) == 3 and read[0] == 3, "the first window goes at once, no further"
    got: list[int] = []
    while len(got) < 10:
        assert tasks.in_flight() <= 3
        tasks.run(len(got))  # the oldest task finishes
        got.append(next(out))
        assert len(tasks.submitted) == min(10, len(got) + 3), "each result taken lets one more task go"
    assert got == [i * i for i in range(10)] and read[0] == 10


def test_without_a_window_every_task_is_submitted_at_once() -> None:
    tasks = Tasks()
    out = results(tasks, square, iter(range(50)))
    assert len(tasks.submitted) == 50
    tasks.run_all()
    assert list(out) == [i * i for i in range(50)]


def test_submit_all_submits_every_task_in_input_order() -> None:
    tasks = Tasks()
    futures = submit_all(tasks, plan(square, range(5), star=False, chunksize=None, wrappers=Wrappers(None)))
    assert futures == [tasks.future(i) for i in range(5)]
    assert [args for _, args, _ in tasks.submitted] == [(i,) for i in range(5)]


# ---------------------------------------------------------------------- leaving early


def test_leaving_the_loop_early_cancels_what_is_still_pending() -> None:
    tasks = Tasks()
    out = results(tasks, square, list(range(5)), window=3)
    tasks.run(0)
    for value in out:
        assert value == 0
        break
    del out  # what a for loop over a temporary does when it ends
    gc.collect()
    assert [tasks.future(i).cancelled() for i in range(1, 4)] == [True] * 3
    assert len(tasks.submitted) == 4, "no more input read after leaving"


def test_close_cancels_the_pending_tasks_and_ends_the_iteration() -> None:
    tasks = Tasks()
    out = results(tasks, square, list(range(4)))
    out.close()
    assert all(tasks.future(i).cancelled() for i in range(4))
    with pytest.raises(StopIteration):
        next(out)


def test_without_cancel_on_exit_tasks_left_behind_keep_running() -> None:
    tasks = Tasks()
    out = results(tasks, square, list(range(3)), window=3, **POOL)
    del out
    gc.collect()
    assert not any(tasks.future(i).cancelled() for i in range(3))


def test_a_submit_that_fails_at_the_start_cancels_what_it_had_submitted() -> None:
    tasks = Tasks(fail_at=2)
    with pytest.raises(TypeError, match="pickle"):
        results(tasks, square, list(range(5)))
    assert [tasks.future(i).cancelled() for i in range(2)] == [True, True]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("ordered", [True, False])
def test_a_task_error_is_raised_in_its_place_then_ends_the_map_and_cancels_the_rest(ordered: bool) -> None:
    tasks = Tasks()
    out = results(tasks, fail_on_negative, [1, -2, 3, 4], ordered=ordered, window=3)
    tasks.run(0)
    assert next(out) == 1
    tasks.run(1)
    with pytest.raises(ValueError, match="negative: -2"):
        next(out)
    assert tasks.future(2).cancelled() and tasks.future(3).cancelled() and len(tasks.submitted) == 4
    with pytest.raises(StopIteration):
        next(out)


def test_without_errors_end_iteration_goes_on_past_a_task_error() -> None:
    tasks = Tasks()
    out = results(tasks, fail_on_negative, [1, -2, 3], **POOL)
    tasks.run_all()
    assert next(out) == 1
    with pytest.raises(ValueError, match="negative: -2"):
        next(out)
    assert list(out) == [3]


class Interruptible(cf.Future[Any]):
    """A future whose wait is interrupted, as KeyboardInterrupt does to a blocked result()."""

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            raise KeyboardInterrupt
        return super().result(timeout)


def test_an_interrupted_wait_takes_nothing() -> None:
    futures = [Interruptible(), Interruptible()]
    queue = list(futures)
    out = Results(lambda fn, *args: queue.pop(0), over(square, ([1, 2],), None, Wrappers(None)), MapOptions(**POOL))
    with pytest.raises(KeyboardInterrupt):
        next(out)
    futures[0].set_result(1)
    assert next(out) == 1


def test_an_interrupted_wait_ends_a_map_with_errors_end_and_cancels_the_task_waited_for() -> None:
    fut = Interruptible()
    out = Results(lambda fn, *args: fut, over(square, ([1],), None, Wrappers(None)), MapOptions())
    with pytest.raises(KeyboardInterrupt):
        next(out)
    assert fut.cancelled()


def test_a_chunksize_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        plan(square, [1], star=False, chunksize=0, wrappers=Wrappers(None))


def test_an_input_that_raises_keeps_the_result_taken_for_the_next_call() -> None:
    def numbers() -> Iterator[int]:
        yield 5
        raise OSError("input went away")

    tasks = Tasks()
    out = results(tasks, square, numbers(), window=1, **POOL)
    tasks.run(0)
    with pytest.raises(OSError, match="input went away"):
        next(out)
    assert list(out) == [25]


def test_an_input_that_raises_ends_a_map_with_errors_end() -> None:
    def numbers() -> Iterator[int]:
        yield 5
        yield 6
        raise OSError("input went away")

    tasks = Tasks()
    out = results(tasks, square, numbers(), window=2)
    tasks.run(0)
    with pytest.raises(OSError, match="input went away"):
        next(out)
    assert tasks.future(1).cancelled()


# ---------------------------------------------------------------------- timeouts


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("ordered", [True, False])
def test_the_deadline_counts_from_the_call_not_from_each_next(ordered: bool) -> None:
    tasks, clock = Tasks(), FakeClock()
    out = results(tasks, square, [1, 2, 3], timeout=30.0, clock=clock, ordered=ordered, timeout_error=Late)
    tasks.run(0)
    clock.now += 20
    assert next(out) == 1
    clock.now += 10  # 30 s since the call: no time left for the next wait, however short the last one was
    with pytest.raises(Late, match="30 s of the map call"):
        next(out)
    assert tasks.future(1).cancelled() and tasks.future(2).cancelled(), "a timeout ends the map"
    with pytest.raises(StopIteration):
        next(out)


def test_a_deadline_timeout_raises_the_builtin_timeout_error_by_default() -> None:
    out = results(Tasks(), square, [1], timeout=0)
    with pytest.raises(TimeoutError):
        next(out)


@pytest.mark.parametrize("ordered", [True, False])
def test_a_next_timeout_raises_the_chosen_error_takes_nothing_and_the_map_goes_on(ordered: bool) -> None:
    tasks = Tasks()
    out = results(tasks, square, [2, 3], ordered=ordered, window=2, **POOL)
    with pytest.raises(Late, match="no result within 0 s"):
        out.next(timeout=0)
    assert not tasks.future(0).cancelled()
    tasks.run(0)
    assert out.next(timeout=0) == 4
    with pytest.raises(Late):
        out.next(timeout=0)
    tasks.run(1)
    assert out.next(timeout=0) == 9
    with pytest.raises(StopIteration):
        out.next(timeout=0)


def test_the_shorter_of_the_next_timeout_and_the_deadline_applies() -> None:
    tasks, clock = Tasks(), FakeClock()
    out = results(tasks, square, [2], timeout=5.0, clock=clock, timeout_error=Late)
    with pytest.raises(Late, match="no result within 0 s"):  # next's own timeout, the deadline still ahead
        out.next(timeout=0)
    assert tasks.future(0).cancelled(), "with errors_end it is the end of the map all the same"


# ---------------------------------------------------------------------- chunks


@pytest.mark.parametrize("ordered", [True, False])
def test_chunks_travel_as_one_chunk_task_each_and_their_results_are_flattened(ordered: bool) -> None:
    tasks = Tasks()
    out = results(tasks, square, list(range(7)), chunksize=3, ordered=ordered)
    assert [args for _, args, _ in tasks.submitted] == [([0, 1, 2],), ([3, 4, 5],), ([6],)]
    assert all(isinstance(fn, Chunk) for fn, _, _ in tasks.submitted)
    tasks.run(2, 0, 1)
    got = list(out)
    assert got == [0, 1, 4, 9, 16, 25, 36] if ordered else sorted(got) == [0, 1, 4, 9, 16, 25, 36]


def test_chunks_of_several_iterables_call_the_function_with_each_tuple() -> None:
    tasks = Tasks()
    out = Results(tasks, over(add, (range(5), range(10, 15)), 2, Wrappers(None)), MapOptions())
    tasks.run_all()
    assert list(out) == [10, 12, 14, 16, 18] and len(tasks.submitted) == 3


def test_a_chunk_of_one_or_less_is_no_chunking_for_the_stdlib_maps_but_a_chunk_for_pool_map() -> None:
    wrappers = Wrappers(None)
    assert over(square, (range(3),), 1, wrappers).task is square
    assert over(square, (range(3),), None, wrappers).task is square
    work = plan(square, range(3), star=False, chunksize=1, wrappers=wrappers)
    assert work.chunked and isinstance(work.task, Chunk) and list(work.calls) == [([0],), ([1],), ([2],)]


def test_a_function_gets_one_chunk_wrapper_per_kind_so_it_is_pickled_once() -> None:
    wrappers = Wrappers(None)
    first = plan(square, range(3), star=False, chunksize=2, wrappers=wrappers).task
    assert plan(square, range(9), star=False, chunksize=5, wrappers=wrappers).task is first
    assert plan(square, [(1,)], star=True, chunksize=5, wrappers=wrappers).task is not first


def test_a_failed_chunk_raises_its_error_in_its_place() -> None:
    tasks = Tasks()
    out = results(tasks, fail_on_negative, [1, 2, -3, 4], chunksize=2)
    tasks.run_all()
    assert list(itertools.islice(out, 2)) == [1, 2]
    with pytest.raises(ValueError, match="negative: -3"):
        next(out)


# ---------------------------------------------------------------------- reading a map in chunks


class Held:
    """A value a test can watch being freed."""

    def __init__(self, n: int) -> None:
        self.n = n


def held(x: int) -> Held:
    return Held(x)


@pytest.mark.parametrize("chunksize", [None, 3])
def test_next_and_a_for_loop_read_one_stream_in_order_losing_nothing(chunksize: int | None) -> None:
    tasks = Tasks()
    out = results(tasks, square, list(range(10)), chunksize=chunksize)
    tasks.run_all()
    got = [next(out)]
    for value in out:  # the rest of the first chunk first
        got.append(value)
        if len(got) == 5:
            break
    got.append(next(out))
    got += list(out)
    assert got == [i * i for i in range(10)]


def test_a_value_left_by_next_in_a_chunk_comes_first_in_a_for_loop() -> None:
    tasks = Tasks()
    out = results(tasks, square, list(range(6)), chunksize=3)
    tasks.run_all()
    assert out.next() == 0  # Pool's way in: the rest of the chunk waits in ``ready``
    assert list(out) == [1, 4, 9, 16, 25]


@pytest.mark.parametrize("chunksize", [None, 3])
def test_a_for_loop_over_a_map_holds_no_value_it_handed_out(chunksize: int | None) -> None:
    tasks = Tasks()
    out = results(tasks, held, list(range(6)), chunksize=chunksize)
    tasks.run_all()
    tasks.submitted.clear()  # the map alone holds the futures now, as a client's map does
    refs = []
    for value in out:
        refs.append(weakref.ref(value))
        del value
        assert refs[-1]() is None, "the map keeps no value once the loop let go of it"
    assert len(refs) == 6


def test_leaving_a_for_loop_over_a_temporary_map_cancels_the_rest_without_a_collection() -> None:
    tasks = Tasks()
    tasks_of = results(tasks, square, list(range(5)), window=3)
    tasks.run(0)
    gc.disable()  # the map must go with the loop, not wait for the cycle collector
    try:
        for value in tasks_of:
            assert value == 0
            break
        del tasks_of, value
        assert [tasks.future(i).cancelled() for i in range(1, 4)] == [True] * 3
    finally:
        gc.enable()


def test_an_error_in_a_for_loop_ends_the_map() -> None:
    tasks = Tasks()
    out = results(tasks, fail_on_negative, [1, -2, 3])
    tasks.run_all()
    seen: list[int] = []
    with pytest.raises(ValueError, match="negative: -2"):
        seen.extend(out)  # a for loop: what came before the error stays
    assert seen == [1] and list(out) == []
