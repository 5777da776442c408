"""zpar.Pool behaves as multiprocessing.Pool, on both topologies.

``address`` is None (an embedded cluster of 2 workers per pool) or the shared
LocalCluster's frontend (2 agents x 1 worker over TCP).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
import os
import tempfile
import threading
import time

import pytest
import tasks

from zpar.pool import Pool
from zpar.testing import wait_for


@pytest.fixture(scope="module", params=["embedded", "tcp"])
def address(request):
    """None: each Pool starts its own cluster; else the session cluster's frontend."""
    return None if request.param == "embedded" else request.getfixturevalue("cluster").frontend


@pytest.fixture(scope="module")
def pool(address):
    """One pool per topology for the tests that leave it running."""
    p = Pool(2, address=address)
    yield p
    p.terminate()


@pytest.fixture
def make(address, request):
    """Fresh pools on this topology; terminated at teardown.

    ``own_cluster``: on TCP, a cluster of its own, for a test that stops
    running tasks (their replacement workers would count as leaked processes
    of the shared cluster). Returns ``(pool, cluster or None)``.
    """
    made: list[Pool] = []

    def make(*args, own_cluster: bool = False, **kwargs):
        cluster = None
        if address is not None and own_cluster:
            cluster = request.getfixturevalue("new_cluster")(agents=2, workers=1)
        where = cluster.frontend if cluster else address
        p = Pool(*(args or (2,)), address=where, **kwargs)
        made.append(p)
        return p, cluster

    yield make
    for p in made:
        p.terminate()


# ---------------------------------------------------------------------- the maps


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_map_matches_the_builtin_map(pool, chunksize):
    assert pool.map(tasks.square, range(50), chunksize) == [i * i for i in range(50)]
    assert pool.map(tasks.square, (i for i in range(9)), chunksize) == [i * i for i in range(9)]  # no len()
    assert pool.map(tasks.square, [], chunksize) == []


def test_map_cuts_its_input_in_chunks_as_multiprocessing_does(pool):
    # 100 items on 2 processes: divmod(100, 2 * 4) = (12, 4), so chunks of 13: 8 tasks.
    before = pool.client.status()["done"]
    assert pool.map(tasks.square, range(100)) == [i * i for i in range(100)]
    assert pool.client.status()["done"] - before == 8


def test_starmap_and_starmap_async(pool):
    pairs = [(i, 10 * i) for i in range(20)]
    assert pool.starmap(tasks.add, pairs) == [a + b for a, b in pairs]
    assert pool.starmap_async(tasks.add, pairs, 3).get(timeout=30) == [a + b for a, b in pairs]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_keeps_order_and_imap_unordered_yields_everything(pool, chunksize):
    assert list(pool.imap(tasks.square, range(30), chunksize)) == [i * i for i in range(30)]
    assert sorted(pool.imap_unordered(tasks.square, iter(range(30)), chunksize)) == [i * i for i in range(30)]
    assert list(pool.imap(tasks.square, [])) == []


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_next_with_a_timeout_raises_multiprocessing_timeout_error_and_goes_on(pool, gate, method):
    results = getattr(pool, method)(tasks.block_until, [gate])
    with pytest.raises(multiprocessing.TimeoutError):
        results.next(timeout=0.1)
    with pytest.raises(TimeoutError):  # the builtin one too
        results.next(timeout=0.05)
    open(gate, "w").close()
    assert results.next(timeout=10) is None
    with pytest.raises(StopIteration):
        results.next(timeout=10)


def test_an_exception_in_imap_is_raised_in_its_place_and_iteration_goes_on(pool):
    results = pool.imap(tasks.raise_if_negative, [1, -2, 3])
    assert next(results) == 1
    with pytest.raises(ValueError, match="negative: -2"):
        next(results)
    assert next(results) == 3


def test_map_raises_the_first_task_exception_once_every_chunk_is_done(pool):
    result = pool.map_async(tasks.raise_if_negative, [1, -1, 2, -2, 3], chunksize=1)
    with pytest.raises(ValueError, match="negative"):
        result.get(timeout=30)
    assert result.ready() and not result.successful()
    with pytest.raises(ValueError, match="negative"):
        pool.map(tasks.raise_if_negative, [1, -1])


@pytest.mark.parametrize("bad", [0, -1])
def test_a_chunksize_below_one_is_refused(pool, bad):
    with pytest.raises(ValueError, match=r"Chunksize must be 1\+"):
        pool.map(tasks.square, range(3), bad)
    with pytest.raises(ValueError, match=r"Chunksize must be 1\+"):
        pool.imap(tasks.square, range(3), bad)


# ---------------------------------------------------------------------- apply and AsyncResult


def test_apply_and_apply_async_pass_args_and_kwds(pool):
    assert pool.apply(tasks.add, (1,), {"b": 2}) == 3
    assert pool.apply_async(tasks.add, (3, 4)).get(timeout=10) == 7
    with pytest.raises(ValueError, match="boom"):
        pool.apply(tasks.raise_value_error, ("boom",))


def test_callback_gets_the_value_once_before_get_returns(pool):
    values, errors = [], []
    result = pool.apply_async(tasks.square, (9,), callback=values.append, error_callback=errors.append)
    assert result.get(timeout=10) == 81
    assert values == [81] and errors == []
    mapped = pool.map_async(tasks.square, range(5), callback=values.append)
    mapped.wait(30)
    assert mapped.ready() and values == [81, [0, 1, 4, 9, 16]]


def test_error_callback_gets_the_exception_once(pool):
    values, errors = [], []
    result = pool.apply_async(tasks.raise_value_error, ("bad",), callback=values.append,
                              error_callback=errors.append)
    result.wait(10)
    assert result.ready() and not result.successful()
    assert values == [] and len(errors) == 1 and isinstance(errors[0], ValueError)
    mapped = pool.map_async(tasks.raise_if_negative, [1, -1, -2], chunksize=1, error_callback=errors.append)
    mapped.wait(30)
    assert len(errors) == 2 and isinstance(errors[1], ValueError)


def test_an_exception_in_a_callback_is_logged_and_the_result_still_ready(pool, caplog):
    def bad(_):
        raise RuntimeError("callback trouble")

    result = pool.apply_async(tasks.square, (2,), callback=bad)
    assert result.get(timeout=10) == 4 and result.successful()
    wait_for(lambda: any("callback" in r.getMessage() for r in caplog.records), 5, what="the log record")


def test_an_async_result_before_it_is_ready(pool, gate):
    result = pool.apply_async(tasks.block_until, (gate, 30, "late"))
    assert not result.ready()
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    started = time.monotonic()
    result.wait(0.05)
    assert time.monotonic() - started >= 0.05
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.05)
    open(gate, "w").close()
    assert result.get(timeout=10) == "late"
    assert result.ready() and result.successful()


def test_map_async_of_nothing_is_ready_at_once(pool):
    called = []
    result = pool.map_async(tasks.square, [], callback=called.append)
    assert result.ready() and result.get(0) == [] and called == [[]]


# ---------------------------------------------------------------------- close, join, terminate


def test_join_before_close_is_a_value_error(pool):
    with pytest.raises(ValueError, match="Pool is still running"):
        pool.join()


def test_close_refuses_new_work_and_join_waits_for_the_rest(make):
    p, _ = make()
    results = [p.apply_async(tasks.sleep_square, (i, 0.02)) for i in range(8)]
    mapped = p.map_async(tasks.square, range(20), 3)
    p.close()
    for call in (lambda: p.apply_async(tasks.square, (1,)), lambda: p.map(tasks.square, [1]),
                 lambda: p.imap(tasks.square, [1]), lambda: p.starmap(tasks.add, [(1, 2)])):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    p.join()
    assert all(r.ready() for r in results) and mapped.ready()
    assert [r.get(0) for r in results] == [i * i for i in range(8)]
    assert mapped.get(0) == [i * i for i in range(20)]


def test_terminate_stops_the_running_tasks(make, gate):
    p, cluster = make(own_cluster=True)
    results = [p.apply_async(tasks.block_until, (gate, 60)) for _ in range(3)]
    if cluster is not None:
        wait_for(lambda: cluster.status()["running"] >= 2, 10, what="the tasks running")
    p.terminate()
    for r in results:
        with pytest.raises(cf.CancelledError):
            r.get(timeout=10)
    if cluster is not None:  # stopped, though the gate is still shut
        wait_for(lambda: cluster.status()["running"] == 0, 10, what="the running tasks stopped")
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(tasks.square, (1,))


def test_the_with_block_terminates_on_exit(make, gate):
    p, _ = make(own_cluster=True)
    with p as entered:
        assert entered is p
        result = p.apply_async(tasks.block_until, (gate, 60))
    with pytest.raises(cf.CancelledError):
        result.get(timeout=10)


# ---------------------------------------------------------------------- initializer, maxtasksperchild


def test_an_importable_initializer_runs_once_in_each_worker_for_each_pool(make, address, tmp_path):
    # tempfile.mkstemp travels by reference, as any installed module's function: one run, one file.
    ran_on = {}
    for name in ("first", "second"):  # on TCP both pools share the cluster's workers
        record = tmp_path / name
        record.mkdir()
        p, _ = make(2, tempfile.mkstemp, ("", "init-", str(record)))
        pids = set(p.map(tasks.worker_pid, range(40), 1)) | set(p.imap_unordered(tasks.worker_pid, range(10)))
        pids |= {p.apply(tasks.worker_pid) for _ in range(5)}
        assert len(os.listdir(record)) == len(pids)
        ran_on[name] = pids
        p.close()
        p.join()
    if address is not None:  # the same workers ran each pool's initializer
        assert ran_on["first"] & ran_on["second"]


def test_a_script_initializer_runs_in_each_worker_before_its_tasks(make, tmp_path):
    # tasks.py travels by value, as the functions of a script do.
    record = str(tmp_path / "inits")
    key = f"ZPAR_TEST_POOL_{os.getpid()}_{time.monotonic_ns()}"
    p, _ = make(2, tasks.init_mark, (record, key, "ready"))
    seen = p.map(tasks.env_of, [key] * 40, 1) + list(p.imap_unordered(tasks.env_of, [key] * 10))
    seen.append(p.apply(tasks.env_of, (key,)))
    assert {value for _, value in seen} == {"ready"}
    with open(record) as fh:
        runs = collections.Counter(fh.read().split())
    assert {str(pid) for pid, _ in seen} <= set(runs)
    assert max(runs.values()) <= 2  # once per worker for each function shipped: a chunk and a call


def test_every_task_sees_the_globals_its_initializer_set(make):
    # tasks.py travels by value, as a script's functions do: each shipped function has its own globals.
    p, _ = make(2, tasks.init_global, ("set",))
    assert p.map(tasks.read_global, range(20)) == ["set"] * 20
    assert p.apply(tasks.read_global) == "set"
    assert set(p.imap_unordered(tasks.read_global, range(6))) == {"set"}
    assert p.starmap(tasks.read_global, [(1,), (2,)]) == ["set", "set"]


def test_an_initializer_that_raises_fails_the_task(make):
    p, _ = make(1, tasks.failing_init)
    with pytest.raises(RuntimeError, match="the initializer failed"):
        p.apply(tasks.square, (2,))
    with pytest.raises(RuntimeError, match="the initializer failed"):  # tried again, not skipped
        p.map(tasks.square, range(3))


def test_maxtasksperchild_recycles_workers_of_the_embedded_cluster():
    with Pool(1, maxtasksperchild=2) as p:
        pids = [p.apply(tasks.worker_pid) for _ in range(6)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5], pids
    assert len({pids[0], pids[2], pids[4]}) == 3, pids


def test_maxtasksperchild_is_ignored_with_a_warning_on_a_remote_cluster(cluster):
    with pytest.warns(RuntimeWarning, match="zpar-agent --max-tasks-per-worker"):
        p = Pool(address=cluster.frontend, maxtasksperchild=3)
    assert repr(p).startswith("<zpar.Pool state=RUN pool_size=2")  # the cluster's workers
    p.terminate()


@pytest.mark.parametrize("kwargs, error", [
    ({"processes": 0}, ValueError),
    ({"maxtasksperchild": 0}, ValueError),
    ({"initializer": 5}, TypeError),
])
def test_bad_arguments_are_refused_like_multiprocessing(kwargs, error):
    before = threading.active_count()
    with pytest.raises(error):
        Pool(**kwargs)
    assert threading.active_count() == before  # refused before anything started
