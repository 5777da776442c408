"""zpar.Executor keeps the concurrent.futures.Executor contract, on both topologies.

``address`` is None (an embedded cluster of 2 workers per executor) or the
shared LocalCluster's frontend (2 agents x 1 worker over TCP).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import logging
import os
import tempfile
import time

import pytest
import tasks

from zpar import BrokerUnavailable
from zpar.errors import BrokenCluster
from zpar.executor import Executor
from zpar.testing import free_port, wait_for


@pytest.fixture
def make(address, request):
    """Fresh executors on this topology, for the tests that shut them down; shut down at teardown too.

    ``own_cluster``: on TCP, a cluster of its own (2 agents x 1 worker), for a
    test that stops running tasks: their workers are replaced, and new
    processes on the shared cluster would count as leaked.
    """
    made: list[Executor] = []

    def make(own_cluster: bool = False, **kwargs) -> Executor:
        where = address
        if address is not None and own_cluster:
            where = request.getfixturevalue("new_cluster")(agents=2, workers=1).frontend
        ex = Executor(2, where, **kwargs)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.shutdown(cancel_futures=True)


# ---------------------------------------------------------------------- submit and map


def test_it_is_a_concurrent_futures_executor_and_submit_returns_the_result(executor):
    assert isinstance(executor, cf.Executor)
    fut = executor.submit(tasks.add, 2, b=3)
    assert isinstance(fut, cf.Future)
    assert fut.result(timeout=10) == 5


def test_a_task_exception_comes_back_as_its_own_type(executor):
    with pytest.raises(ValueError, match="boom"):
        executor.submit(tasks.raise_value_error, "boom").result(timeout=10)


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_keeps_input_order(executor, chunksize):
    assert list(executor.map(tasks.square, range(25), chunksize=chunksize, timeout=30)) == [i * i for i in range(25)]
    assert list(executor.map(tasks.add, range(10), range(100, 110), chunksize=chunksize)) == [
        a + b for a, b in zip(range(10), range(100, 110), strict=True)]
    assert list(executor.map(tasks.square, [], chunksize=chunksize)) == []


def test_map_raises_the_task_exception_at_its_place(executor):
    results = executor.map(tasks.raise_if_negative, [1, 2, -3, 4], chunksize=1)
    assert next(results) == 1 and next(results) == 2
    with pytest.raises(ValueError, match="negative: -3"):
        next(results)


def test_map_rejects_a_chunksize_below_one(executor):
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        executor.map(tasks.square, range(3), chunksize=0)


def test_map_timeout_is_measured_from_the_call(executor, gate):
    start = time.monotonic()
    results = executor.map(tasks.block_until, [gate], timeout=0.5)
    with pytest.raises(cf.TimeoutError):
        next(results)
    assert 0.5 <= time.monotonic() - start < 5


# ---------------------------------------------------------------------- futures in the stdlib's tools


def test_futures_work_with_wait_and_as_completed(executor):
    futures = [executor.submit(tasks.square, i) for i in range(10)]
    done, not_done = cf.wait(futures, timeout=30)
    assert not not_done and done == set(futures)
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=10)) == [i * i for i in range(10)]
    fast = executor.submit(tasks.square, 3)
    assert cf.wait([fast], timeout=10, return_when=cf.FIRST_COMPLETED).done == {fast}


def test_futures_work_with_asyncio_wrap_future_and_run_in_executor(executor):
    async def main():
        loop = asyncio.get_running_loop()
        wrapped = await asyncio.wrap_future(executor.submit(tasks.square, 4))
        in_executor = await loop.run_in_executor(executor, tasks.add, 1, 2)
        awaited = await executor.submit(tasks.square, 5)
        return wrapped, in_executor, awaited

    assert asyncio.run(asyncio.wait_for(main(), 30)) == (16, 3, 25)


def test_an_exception_in_a_done_callback_is_logged_not_raised(executor, caplog):
    def bad_callback(fut):
        raise RuntimeError("callback trouble")

    seen = []
    fut = executor.submit(tasks.square, 6)
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        fut.add_done_callback(bad_callback)
        fut.add_done_callback(seen.append)  # the next callback still runs
        assert fut.result(timeout=10) == 36
        wait_for(lambda: seen, 10, what="the second callback")
        fut.add_done_callback(bad_callback)  # on a future already done: called at once, still logged
    assert sum("callback trouble" in r.getMessage() or (r.exc_info and "callback trouble" in str(r.exc_info[1]))
               for r in caplog.records) == 2


# ---------------------------------------------------------------------- shutdown


def test_submit_and_map_after_shutdown_raise_runtime_error(make):
    ex = make()
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.square, 2)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(tasks.square, range(3))
    ex.shutdown()  # twice is fine


def test_shutdown_waits_for_the_pending_tasks(make):
    ex = make()
    futures = [ex.submit(tasks.sleep_square, i, 0.02) for i in range(10)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(10)]


def test_map_results_outlive_the_with_block(make):
    with make() as ex:
        results = ex.map(tasks.square, range(20), chunksize=3)
    assert list(results) == [i * i for i in range(20)]


def test_shutdown_without_wait_returns_at_once_and_the_work_still_completes(make, gate):
    ex = make()
    fut = ex.submit(tasks.block_until, gate, 30, "released")
    ex.shutdown(wait=False)
    assert not fut.done()
    with pytest.raises(RuntimeError):
        ex.submit(tasks.square, 2)
    open(gate, "w").close()
    assert fut.result(timeout=10) == "released"
    ex._closer.join(10)  # the closing thread ends once nothing is pending
    assert not ex._closer.is_alive()


def test_shutdown_with_cancel_futures_cancels_what_is_not_done(make, gate):
    ex = make(own_cluster=True)
    futures = [ex.submit(tasks.block_until, gate) for _ in range(6)]
    started = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - started < 10
    assert all(f.cancelled() for f in futures)


# ---------------------------------------------------------------------- construction


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        Executor(bad)


def test_an_importable_initializer_runs_once_in_each_worker(make, tmp_path):
    # tempfile.mkstemp travels by reference, as any installed module's function: one run, one file.
    ex = make(initializer=tempfile.mkstemp, initargs=("", "init-", str(tmp_path)))
    pids = {ex.submit(tasks.worker_pid).result(timeout=10) for _ in range(10)}
    pids |= set(ex.map(tasks.worker_pid, range(40), chunksize=3))
    pids |= set(ex.map(tasks.worker_pid, range(40)))
    assert len(os.listdir(tmp_path)) == len(pids)


def test_a_script_initializer_runs_in_each_worker_before_its_tasks(make, tmp_path):
    # tasks.py travels by value, as the functions of a script do.
    record = str(tmp_path / "inits")
    key = f"ZPAR_TEST_EXECUTOR_{os.getpid()}_{time.monotonic_ns()}"
    ex = make(initializer=tasks.init_mark, initargs=(record, key, "ready"))
    seen = list(ex.map(tasks.env_of, [key] * 40))
    seen += list(ex.map(tasks.env_of, [key] * 40, chunksize=7))
    assert {value for _, value in seen} == {"ready"}
    with open(record) as fh:
        runs = collections.Counter(fh.read().split())
    assert {str(pid) for pid, _ in seen} <= set(runs)
    assert max(runs.values()) <= 2  # once per worker for each function shipped: a call and a chunk


def test_every_task_sees_the_globals_its_initializer_set(make):
    ex = make(initializer=tasks.init_global, initargs=("set",))
    assert ex.submit(tasks.read_global).result(timeout=10) == "set"
    assert list(ex.map(tasks.read_global, range(12), chunksize=5)) == ["set"] * 12


# ---------------------------------------------------------------------- broken clusters


def test_an_unreachable_broker_is_a_broken_executor():
    with pytest.raises(cf.BrokenExecutor) as info:
        Executor(address=f"tcp://127.0.0.1:{free_port()}", connect_timeout=0.3)
    assert isinstance(info.value, BrokerUnavailable) and isinstance(info.value, BrokenCluster)


def test_a_broker_lost_mid_run_fails_pending_futures_with_broken_executor(new_cluster):
    cluster = new_cluster(agents=1, workers=1)
    ex = Executor(address=cluster.frontend, broker_timeout=0.5)
    try:
        assert ex.submit(tasks.square, 2).result(timeout=10) == 4
        cluster.broker.kill()
        cluster.broker.wait()
        fut = ex.submit(tasks.square, 3)
        with pytest.raises(cf.BrokenExecutor):
            fut.result(timeout=20)
    finally:
        ex.shutdown(cancel_futures=True)


# ---------------------------------------------------------------------- max_tasks_per_child


def test_max_tasks_per_child_recycles_workers_of_the_embedded_cluster():
    with Executor(1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(tasks.worker_pid).result(timeout=20) for _ in range(6)]  # one at a time
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5], pids
    assert len({pids[0], pids[2], pids[4]}) == 3, pids


def test_max_tasks_per_child_is_ignored_with_a_warning_on_a_remote_cluster(cluster):
    with pytest.warns(RuntimeWarning, match="zpar-agent --max-tasks-per-worker"):
        ex = Executor(address=cluster.frontend, max_tasks_per_child=5)
    ex.shutdown()
