"""zpar.Future's own parts, without a cluster: its lighter condition, and the client's window."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest

from zpar._pending import Window
from zpar.futures import Future
from zpar.testing import wait_for


def test_a_future_has_every_field_the_stdlib_future_sets() -> None:
    ours, theirs = vars(Future(7)), vars(cf.Future())
    assert set(theirs) <= set(ours), "concurrent.futures.Future.__init__ sets fields ours does not"
    assert {k: ours[k] for k in theirs if k not in ("_condition", "_waiters", "_done_callbacks")} == {
        k: v for k, v in theirs.items() if k not in ("_condition", "_waiters", "_done_callbacks")}


def test_a_result_set_in_another_thread_wakes_every_waiter() -> None:
    fut = Future(1)
    got: list[object] = []
    waiters = [threading.Thread(target=lambda: got.append(fut.result(timeout=10))) for _ in range(3)]
    for t in waiters:
        t.start()
    wait_for(lambda: len(fut._condition._waiters or ()) == 3, 10, what="three threads waiting")
    threading.Thread(target=fut.set_result, args=("done",)).start()
    for t in waiters:
        t.join(10)
    assert got == ["done"] * 3


def test_wait_and_as_completed_see_our_futures_complete() -> None:
    futures = [Future(i) for i in range(3)]
    threading.Timer(0.01, futures[1].set_result, args=(1,)).start()
    done, _ = cf.wait(futures, timeout=10, return_when=cf.FIRST_COMPLETED)
    assert done == {futures[1]}
    futures[0].set_exception(ValueError("no"))
    futures[2].cancel()
    assert set(cf.as_completed(futures, timeout=10)) == set(futures)


def test_a_wait_that_times_out_says_so_and_leaves_no_waiter_behind() -> None:
    fut = Future(1)
    with pytest.raises(cf.TimeoutError):
        fut.result(timeout=0.01)
    with fut._condition:
        assert not fut._condition.wait(0)
    assert not fut._condition._waiters
    fut.set_result(2)
    assert fut.result(0) == 2


def test_waiting_without_the_lock_is_refused() -> None:
    with pytest.raises(RuntimeError, match="un-acquired"):
        Future(1)._condition.wait(0)


def test_the_window_gives_out_its_slots_then_blocks_until_one_is_released() -> None:
    window = Window(2)
    assert window.acquire(0.01) and window.acquire(0.01)
    assert not window.acquire(0.01), "a full window makes acquire wait, then give up"
    threading.Timer(0.01, window.release).start()
    assert window.acquire(10)
