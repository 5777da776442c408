"""zpar.pprocess gives calls the concurrency pprocess gives them, and nested exchanges run where their call runs.

pprocess forks a process per call: calls that never end, or that wait for one
another, all run, and an exchange runs ``limit`` calls at once whatever the
cores. Here a call that holds its worker gets one from this program's pool,
which starts workers as needed; an exchange used inside a call reserves them
through the pool's service instead of starting a cluster in the worker.
"""

from __future__ import annotations

import itertools
import os
import sys

import cloudpickle
import psutil
import pytest

from zpar import pprocess
from zpar.pprocess import _capacity, _layer
from zpar.testing import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # these tasks travel by value


pytestmark = pytest.mark.usefixtures("pprocess_default")


def follower(channel, name):
    """Never ends: sends ``(name, i)`` for i = 0, 1, ... (zpar's window pauses it while they are unread)."""
    for i in itertools.count():
        channel.send((name, i))


def meet(folder, count, i):
    """Returns ``i`` once ``count`` calls have arrived here, all running at the same time."""
    open(os.path.join(folder, str(i)), "w").close()
    wait_for(lambda: len(os.listdir(folder)) >= count, timeout=30, what=f"{count} calls running at once")
    return i


def where_it_ran(_):
    return os.getpid(), os.getppid()


def nested_map(channel, limit):
    """Runs a Map of its own, then sends where its calls ran and how many children this worker has."""
    results = list(pprocess.pmap(where_it_ran, range(3), limit=limit))
    channel.send((results, os.getpid(), len(psutil.Process().children(recursive=True))))


# ---------------------------------------------------------------------- calls that hold a worker


def test_three_endless_followers_of_a_continuous_queue_all_run_on_two_cores():
    queue = pprocess.Queue(continuous=1)
    follow = queue.manage(follower)
    for name in ("a", "b", "c"):
        follow(name)
    seen: dict[str, int] = {}
    for name, i in queue:
        seen[name] = i
        if len(seen) == 3 and min(seen.values()) >= 2:
            break
    assert sorted(seen) == ["a", "b", "c"]
    assert len(queue.active()) == 3  # all still running
    for channel in queue.active():
        channel.close()  # stops its call (and replaces its worker)


def test_an_exchange_runs_limit_calls_at_once_whatever_the_cores(tmp_path):
    limit = len(os.sched_getaffinity(0)) + 2
    results = pprocess.pmap(lambda i: meet(str(tmp_path), limit, i), range(limit), limit=limit)
    assert list(results) == list(range(limit))


def test_a_limit_is_kept_as_pprocess_keeps_it(tmp_path):
    queue = pprocess.Queue(limit=2)
    calc = queue.manage(pprocess.MakeParallel(lambda i: meet(str(tmp_path), 2, i)))
    for i in range(5):
        calc(i)
    assert len(queue.active()) == 2 and len(queue.waiting) == 3
    assert sorted(queue) == list(range(5))


def test_calls_of_plain_functions_without_a_limit_share_the_cores():
    assert list(pprocess.pmap(lambda x: x * 3, range(6))) == [0, 3, 6, 9, 12, 15]
    pool = _layer._state.pool
    assert pool is None or pool.workers() == 0  # no worker was reserved


def test_a_waiting_call_started_by_a_delivery_takes_over_the_delivering_calls_worker():
    exchange = pprocess.Queue(limit=2)
    calc = exchange.manage(pprocess.MakeParallel(lambda i: i))
    for i in range(12):
        calc(i)
    assert sorted(exchange) == list(range(12))
    pool = _layer._state.pool
    assert pool is not None and pool.workers() == max(2, len(os.sched_getaffinity(0)))  # never grew


def test_channel_aware_calls_started_by_deliveries_take_over_the_deliverers_workers():
    def send_one(channel, i):
        channel.send(i)

    queue = pprocess.Queue(limit=2)
    for i in range(12):
        queue.start(send_one, i)
    assert sorted(queue) == list(range(12))
    pool = _layer._state.pool
    assert pool is not None and pool.workers() == max(2, len(os.sched_getaffinity(0)))  # never grew


def test_the_pool_frees_what_a_workers_connection_reserved_when_it_closes():
    pool = _capacity.LocalPool(1, pprocess.get_client)
    try:
        link = _capacity.PoolLink(pool.where.address)
        slot = link.reserve(1)
        assert pool.workers() == 1 and slot.client.address == pool._shards[0].client.address
        assert pool._shards[0].free() == 0
        link.close()  # as a worker that died would
        wait_for(lambda: pool._shards[0].free() == 1, timeout=10, what="the reservation freed")
    finally:
        pool.close()
        _capacity.forget()  # the link's client was to a shard now stopped


# ---------------------------------------------------------------------- nested exchanges


def test_an_exchange_inside_a_call_runs_on_this_programs_pool_not_a_cluster_of_its_own():
    queue = pprocess.Queue()
    queue.start(nested_map, 2)
    (results, caller, caller_children) = next(queue)
    assert caller_children == 0  # no cluster was started inside the worker
    mine = {proc.pid for proc in psutil.Process().children()}  # the embedded clusters this program started
    assert all(agent in mine for _, agent in results), (results, mine)
    assert caller not in {pid for pid, _ in results}


def test_an_exchange_inside_a_call_runs_on_the_cluster_of_an_explicit_client(client):
    # On the tcp topology (2 nodes of one worker) a nested call prefetched to the node whose only
    # worker runs its caller would wait for ever: that node gives it back to the broker.
    queue = pprocess.Queue(client=client)
    for _ in range(3):
        queue.start(nested_map, None)
        (results, caller, caller_children) = next(queue)
        assert caller_children == 0
        assert len(results) == 3 and caller not in {pid for pid, _ in results}
        assert {agent for _, agent in results} <= {proc.pid for proc in psutil.Process().children()}
