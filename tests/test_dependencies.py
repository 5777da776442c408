"""Futures as arguments, on real clusters: ``submit(f, submit(g, x))`` is ``f(g(x))``; the value goes from the
broker to the node (never back through the producer); a failed ``g`` fails ``f`` with its error as the cause."""

from __future__ import annotations

import concurrent.futures
import operator
import os
import pickle
import sys

import cloudpickle
import numpy as np
import pytest
import tasks

import zpar
from zpar.testing import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # these tasks travel by value

pytestmark = pytest.mark.timeout(120)


def checksum(array):
    return float(np.asarray(array, dtype=np.float64).sum()), array.shape


def ramp(n):
    return np.arange(n, dtype=np.float64)


def counters(client):
    return client.status()["counters"]


def test_submit_f_of_submit_g_is_f_of_g(client):
    assert client.submit(tasks.square, client.submit(tasks.add, 2, 3)).result(timeout=30) == 25


def test_futures_anywhere_in_the_arguments(client):
    parts = [client.submit(tasks.square, i) for i in range(5)]
    assert client.submit(sum, parts).result(timeout=30) == sum(i * i for i in range(5))
    nested = client.submit(tasks.identity, {"a": [parts[0], (parts[1], parts[2])], "b": {"c": parts[3]}})
    assert nested.result(timeout=30) == {"a": [0, (1, 4)], "b": {"c": 9}}
    same_twice = client.submit(tasks.add, parts[4], parts[4])
    assert same_twice.result(timeout=30) == 32
    kw = client.submit(tasks.tag, label=parts[2], x=client.submit(tasks.square, 3))
    assert kw.result(timeout=30) == (4, 9)


def test_a_failed_dependency_fails_the_task_with_its_error_chained(client):
    bad = client.submit(tasks.raise_value_error, "no luck")
    after = client.submit(tasks.square, bad)
    later = client.submit(tasks.identity, [after])  # and the ones that wait for that one
    with pytest.raises(zpar.DependencyError) as info:
        after.result(timeout=30)
    assert isinstance(info.value.__cause__, ValueError) and "no luck" in str(info.value.__cause__)
    assert info.value.task_id == bad.task_id
    with pytest.raises(zpar.DependencyError, match="did not run either") as info2:
        later.result(timeout=30)
    assert info2.value.__cause__ is info.value.__cause__  # the first error of the chain, not a chain of errors


def test_a_cancelled_dependency_fails_the_task(client, gate):
    blocker = client.submit(tasks.block_until, gate)
    after = client.submit(tasks.identity, blocker)
    assert blocker.cancel()  # it runs on (the gate opens at teardown), and its value is no task's
    with pytest.raises(zpar.DependencyError) as info:
        after.result(timeout=30)
    assert isinstance(info.value.__cause__, concurrent.futures.CancelledError)


def test_a_done_future_goes_as_its_value_and_a_failed_one_fails_the_task(client):
    done = client.submit(tasks.square, 7)
    assert done.result(timeout=30) == 49
    assert client.submit(tasks.add, done, 1).result(timeout=30) == 50
    bad = client.submit(tasks.raise_value_error, "before")
    concurrent.futures.wait([bad], timeout=30)
    with pytest.raises(zpar.DependencyError) as info:
        client.submit(tasks.identity, bad).result(timeout=30)
    assert isinstance(info.value.__cause__, ValueError)


def test_a_chain_of_ten_thousand_tasks_completes_without_a_thread_each(client):
    import threading

    threads = threading.active_count()
    x = client.submit(tasks.identity, 0)
    for _ in range(10_000):
        x = client.submit(operator.add, x, 1)
    # The waiting is the broker's, not a thread per task here (pyzmq may start its one thread for zero-copy sends).
    assert threading.active_count() <= threads + 1
    assert x.result(timeout=100) == 10_000
    wait_for(lambda: client.status()["objects"]["count"] == 0, timeout=10, what="the chain's values freed")


def test_a_large_value_goes_from_task_to_task_through_the_broker(client):
    kept = counters(client).get("values_kept", 0)
    n = 3_000_000  # 24 MB: in shared memory on the embedded cluster, in CurveZMQ chunks over TCP
    made = client.submit(ramp, n)
    summed = client.submit(checksum, made)
    assert summed.result(timeout=60) == (float(n * (n - 1) / 2), (n,))
    assert counters(client)["values_kept"] == kept + 1  # the broker kept it for the dependent
    assert np.array_equal(made.result(timeout=30), ramp(n))  # the producer still gets its own result
    wait_for(lambda: client.status()["objects"]["count"] == 0, timeout=10, what="the value freed")
    if client.embedded:  # kept in its shared-memory segment under a second name, removed with it
        wait_for(lambda: not os.listdir(client._cluster.shm_dir), timeout=10, what="the value's segment removed")


def test_values_are_read_only_in_the_task_that_takes_them(client):
    made = client.submit(ramp, 100_000)
    with pytest.raises(ValueError, match="read-only"):
        client.submit(np.negative, made, out=made).result(timeout=30)


def test_a_future_of_another_client_is_refused_while_pending(client, gate):
    with zpar.Client(workers=1) as other:
        pending = other.submit(tasks.block_until, gate)
        with pytest.raises(ValueError, match="another client"):
            client.submit(tasks.identity, pending)
        open(gate, "w").close()
        assert pending.result(timeout=30) is None
        assert client.submit(tasks.identity, pending).result(timeout=30) is None  # done: its value goes


def test_a_pending_future_does_not_pickle_elsewhere(client, gate):
    pending = client.submit(tasks.block_until, gate)
    with pytest.raises(Exception, match="argument of a task"):
        pickle.dumps(pending)
    open(gate, "w").close()
    pending.result(timeout=30)


def test_executor_futures_are_arguments_too(executor):
    assert executor.submit(tasks.square, executor.submit(tasks.add, 1, 2)).result(timeout=30) == 9


OWN_CLUSTER = (2, 1)


def test_a_dependent_whose_node_dies_runs_again_elsewhere_with_the_value(new_cluster, tmp_path):
    cluster = new_cluster(agents=2, workers=1)
    gate = str(tmp_path / "gate")
    with cluster.client() as client:
        value = client.submit(ramp, 1_000)
        holder = client.submit(tasks.block_until, gate, 60.0, value)
        wait_for(lambda: any(n["busy"] for n in client.status()["nodes"]), timeout=30, what="the dependent running")
        busy = next(n for n in client.status()["nodes"] if n["busy"])
        victim = next(p for p in cluster.agents if p.pid == busy["pid"])
        cluster.kill_agent(victim)
        open(gate, "w").close()
        assert np.array_equal(holder.result(timeout=60), ramp(1_000))


def test_a_chain_in_flight_survives_a_broker_restart(new_cluster, tmp_path):
    cluster = new_cluster(agents=1, workers=2)
    gate = str(tmp_path / "gate")
    with cluster.client() as client:
        done = client.submit(tasks.square, 3)
        assert done.result(timeout=30) == 9
        head = client.submit(tasks.block_until, gate, 60.0, 0)  # the rest wait behind it at the broker
        x = head
        for _ in range(500):
            x = client.submit(operator.add, x, 1)
        also = client.submit(tasks.add, done, x)  # a dependency that ended before the restart, and one after
        wait_for(lambda: cluster.status()["waiting"] == 501, 30, what="the chain waiting at the broker")
        old = cluster.status()["epoch"]
        cluster.broker.kill()
        cluster.broker.wait()
        cluster.start_broker()
        wait_for(lambda: cluster.status()["epoch"] != old, 20, what="the new broker answering")
        open(gate, "w").close()
        assert x.result(timeout=60) == 500
        assert also.result(timeout=30) == 509
