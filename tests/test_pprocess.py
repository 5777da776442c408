"""zpar.pprocess: pprocess's API on zpar, on the embedded cluster and on a broker with agents over TCP.

Forking tests (``create()``) fork this test process: every child ends with
``pprocess.exit(channel)`` inside a ``finally``, so no copy of pytest runs on.
"""

from __future__ import annotations

import functools
import os
import threading

import pytest
import tasks

import zpar
import zpar.pprocess._layer
from zpar import pprocess
from zpar.testing import wait_for

pytestmark = pytest.mark.usefixtures("pprocess_default")


def open_gate(path: str) -> None:
    open(path, "w").close()


def running(gate: str, x: int) -> None:
    """Wait until the call ``tasks.pp_gated(gate, x)`` (x < 0) is running on a worker.

    A call started after that cannot share its worker's batch, whose results
    travel together when the whole batch is done.
    """
    wait_for(lambda: os.path.exists(f"{gate}.{x}"), timeout=30, what=f"pp_gated({x}) running")


def child(channel, fn) -> None:
    """In a forked child: run ``fn(channel)``, then always end the child."""
    try:
        fn(channel)
    finally:
        pprocess.exit(channel)


# ---------------------------------------------------------------------- pmap and Map


def test_pmap_returns_results_in_input_order_by_index_slice_and_iteration(client):
    results = pprocess.pmap(tasks.square, range(12), limit=3, client=client)
    assert results[5] == 25
    assert results[-1] == 121
    assert results[2:6] == [4, 9, 16, 25]
    assert list(results) == [x * x for x in range(12)]
    with pytest.raises(IndexError):
        results[12]


def test_pmap_passes_each_item_as_one_argument(client):
    results = pprocess.pmap(tasks.identity, [(1, 2), (3, 4)], client=client)
    assert list(results) == [(1, 2), (3, 4)]


def test_pmap_limit_bounds_the_calls_in_flight_and_the_rest_wait(client, gate):
    results = pprocess.pmap(functools.partial(tasks.pp_gated, gate), [-1, -2, -3, -4, -5], limit=2, client=client)
    assert len(results.active()) == 2
    assert len(results.waiting) == 3
    assert results.busy()
    open_gate(gate)
    assert list(results) == [1, 4, 9, 16, 25]
    assert not results.unfinished()


def test_map_iteration_yields_each_result_while_later_calls_still_run(client, gate):
    results = pprocess.Map(client=client)
    calc = results.manage(pprocess.MakeParallel(tasks.pp_gated))
    calc(gate, -1)
    running(gate, -1)
    calc(gate, 2)
    assert results[1] == 4  # while call 0 is held at the gate
    calc(gate, -3)
    running(gate, -3)
    it = iter(results)
    open_gate(gate)
    assert list(it) == [1, 4, 9]


def test_pmap_iteration_yields_the_first_results_before_the_last_is_in(client, gate):
    results = pprocess.pmap(functools.partial(tasks.pp_gated, gate), [1, 2, -3], limit=2, client=client)
    it = iter(results)
    assert next(it) == 1
    running(gate, -3)  # started when a slot freed
    assert next(it) == 4
    assert results.unfinished()
    open_gate(gate)
    assert next(it) == 9
    with pytest.raises(StopIteration):
        next(it)


def test_map_raises_a_calls_exception_where_its_result_is_read(client):
    results = pprocess.pmap(tasks.pp_check, [1, "boom", 3], client=client)
    assert results[0] == 1
    assert results[2] == 3
    with pytest.raises(ValueError, match="boom at work") as info:
        results[1]
    assert isinstance(info.value.__cause__, zpar.RemoteTraceback)
    it = iter(results)
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom at work"):
        next(it)
    assert next(it) == 3


def test_managed_map_keeps_call_order_for_calls_of_several_arguments(client):
    results = pprocess.Map(limit=3, client=client)
    calc = results.manage(pprocess.MakeParallel(tasks.add))
    for i in range(4):
        for j in range(3):
            calc(i * 10, j)
    assert results[0:12] == [i * 10 + j for i in range(4) for j in range(3)]


def test_map_slices_hold_arrays(client):
    np = pytest.importorskip("numpy")
    results = pprocess.pmap(tasks.double, [np.arange(3), np.arange(2)], client=client)
    first, second = results[0:2]
    assert first.tolist() == [0, 2, 4] and second.tolist() == [0, 2]


def test_map_start_passes_keyword_arguments(client):
    results = pprocess.Map(client=client)
    results.start(pprocess.MakeParallel(tasks.add), 1, b=2)
    results.start(pprocess.MakeParallel(tasks.add), a="x", b="y")
    assert list(results) == [3, "xy"]


def test_map_with_reuse_and_make_reusable_gives_the_same_results(client):
    results = pprocess.Map(limit=2, reuse=1, client=client)
    calc = results.manage(pprocess.MakeReusable(tasks.add))
    for i in range(8):
        calc(i, 100)
    assert list(results) == [i + 100 for i in range(8)]


# ---------------------------------------------------------------------- Queue


def test_queue_yields_results_in_arrival_order(client, gate):
    queue = pprocess.Queue(client=client)
    calc = queue.manage(pprocess.MakeParallel(tasks.pp_gated))
    calc(gate, -1)  # held at the gate
    running(gate, -1)
    calc(gate, 2)
    assert next(queue) == 4
    open_gate(gate)
    assert next(queue) == 1
    with pytest.raises(StopIteration):
        next(queue)


def test_queue_length_counts_arrived_unread_results(client):
    queue = pprocess.Queue(client=client)
    for i in range(3):
        queue.start(pprocess.MakeParallel(tasks.square), i)
    wait_for(lambda: queue.store(100) or len(queue) == 3, timeout=30, what="3 results stored")
    assert len(queue) == 3
    assert sorted(queue) == [0, 1, 4]
    assert len(queue) == 0


def test_queue_raises_a_calls_exception_and_goes_on(client):
    queue = pprocess.Queue(limit=1, client=client)
    calc = queue.manage(pprocess.MakeParallel(tasks.pp_check))
    calc("boom")
    calc(7)
    with pytest.raises(ValueError, match="boom at work"):
        next(queue)
    assert list(queue) == [7]


# ---------------------------------------------------------------------- Exchange


class Collect(pprocess.Exchange):
    """Stores what arrives, and the most channels it ever watched at once."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.got: list = []
        self.most = 0

    def store_data(self, channel):
        self.most = max(self.most, len(self.active()))
        self.got.append(channel.receive())


def test_exchange_subclass_stores_every_result_and_finish_waits_for_all(client):
    exchange = Collect(limit=2, client=client)
    calc = exchange.manage(pprocess.MakeParallel(tasks.square))
    for i in range(7):
        calc(i)
    assert len(exchange.active()) == 2 and len(exchange.waiting) == 5
    exchange.finish()
    assert sorted(exchange.got) == [i * i for i in range(7)]
    assert exchange.most <= 2
    assert not exchange.unfinished() and exchange.active() == []


def test_exchange_limit_and_flags_are_attributes(client):
    exchange = pprocess.Exchange(limit=4, reuse=1, continuous=1, client=client)
    assert (exchange.limit, exchange.reuse, exchange.continuous) == (4, 1, 1)
    exchange.limit = 1
    exchange.start(pprocess.MakeParallel(tasks.noop))
    assert exchange.busy()


def test_exchange_ready_with_a_timeout_returns_no_channel_while_none_has_data(client, gate):
    exchange = pprocess.Exchange(client=client)
    exchange.start(pprocess.MakeParallel(tasks.block_until), gate)
    assert exchange.ready(50) == []  # 50 ms
    assert exchange.ready(0) == []
    open_gate(gate)
    (channel,) = wait_for(lambda: exchange.ready(100), timeout=30, what="the call's result")
    assert channel.receive() is None
    assert exchange.ready() == [] and exchange.removed == [channel]  # it ended: removed
    assert exchange.active() == []


def test_exchange_add_watches_a_channel_from_start(client):
    pprocess.use(client)
    exchange = Collect()
    exchange.add(pprocess.start(pprocess.MakeParallel(tasks.square), 9))
    exchange.add_wait(pprocess.start(pprocess.MakeParallel(tasks.square), 3))
    exchange.finish()
    assert sorted(exchange.got) == [9, 81]


def test_exchange_without_store_data_says_to_define_it(client):
    exchange = pprocess.Exchange(client=client)
    exchange.start(pprocess.MakeParallel(tasks.noop))
    with pytest.raises(NotImplementedError, match="store_data"):
        exchange.finish()


def test_ready_on_an_empty_exchange_returns_at_once():
    assert pprocess.Exchange().ready() == []


def test_a_plain_calls_channel_cannot_be_sent_to(client):
    pprocess.use(client)
    channel = pprocess.start(pprocess.MakeParallel(tasks.square), 4)
    with pytest.raises(BrokenPipeError, match="reads nothing"):
        channel.send("hello")
    assert channel.receive() == 16
    with pytest.raises(EOFError):
        channel.receive()


def test_a_limit_below_one_is_refused():
    with pytest.raises(zpar.ConfigError, match="limit must be at least 1"):
        pprocess.Queue(limit=0)


def test_a_map_keeps_a_call_that_could_not_start_as_its_error(client):
    results = pprocess.Map(client=client)
    calc = results.manage(pprocess.MakeParallel(tasks.identity))
    calc(1)
    calc(threading.Lock())  # does not pickle
    calc(3)
    assert results[0] == 1 and results[2] == 3
    with pytest.raises(zpar.SerializationError, match="cannot pickle"):
        results[1]


def test_an_exchange_watches_only_channels():
    with pytest.raises(TypeError, match="watches the channels"):
        pprocess.Exchange().add(object())


# ---------------------------------------------------------------------- create(): forking, locally


def test_map_create_forks_children_whose_results_keep_creation_order():
    results = pprocess.Map(limit=3)
    for i in range(8):
        channel = results.create()
        if channel:
            child(channel, lambda ch, i=i: ch.send(i * 10))
    assert list(results) == [i * 10 for i in range(8)]
    assert results.active() == []


def test_exchange_create_keeps_at_most_limit_children():
    exchange = Collect(limit=2)
    for i in range(6):
        channel = exchange.create()
        if channel:
            child(channel, lambda ch, i=i: ch.send((os.getpid(), i)))
    exchange.finish()
    assert sorted(i for _, i in exchange.got) == list(range(6))
    assert len({pid for pid, _ in exchange.got}) == 6 and os.getpid() not in {pid for pid, _ in exchange.got}
    assert exchange.most <= 2


def test_create_gives_a_two_way_channel_and_the_child_pid():
    channel = pprocess.create()
    if channel.pid == 0:
        def echo(ch):
            total = 0
            while (i := ch.receive()) is not None:
                total += i
            ch.send(total)
        child(channel, echo)
    assert channel.pid > 0
    for i in range(100):
        channel.send(i)
    channel.send(None)
    assert channel.receive() == sum(range(100))
    with pytest.raises(EOFError):
        channel.receive()
    channel.close()
    channel.wait()


def test_an_exception_object_sent_through_a_channel_is_raised_on_receipt():
    queue = pprocess.Queue()
    channel = queue.create()
    if channel:
        child(channel, lambda ch: ch.send(KeyError("sent")))
    with pytest.raises(KeyError, match="sent"):
        next(queue)


def test_create_for_a_cluster_given_by_address_explains_why_it_cannot_fork(cluster):
    pprocess.use(cluster.frontend)
    with pytest.raises(pprocess.RemoteForkError, match="cannot move to the cluster at tcp://") as info:
        pprocess.create()
    assert "exchange.start(fn" in str(info.value)
    assert isinstance(info.value, zpar.ZparError)


def test_exchange_create_with_a_remote_client_raises_remote_fork_error(cluster_client):
    with pytest.raises(pprocess.RemoteForkError):
        pprocess.Queue(client=cluster_client).create()


def test_exchange_create_with_an_embedded_client_forks(embedded_client):
    queue = pprocess.Queue(client=embedded_client)
    channel = queue.create()
    if channel:
        child(channel, lambda ch: ch.send("forked"))
    assert list(queue) == ["forked"]


def test_exit_on_the_creating_side_refuses():
    channel = pprocess.create()
    if channel.pid == 0:
        child(channel, lambda ch: None)
    with pytest.raises(RuntimeError, match="creating side"):
        pprocess.exit(channel)
    channel.close()
    pprocess.waitall()


def test_waitall_reaps_children_an_exchange_left_unreaped():
    queue = pprocess.Queue(autoclose=0)
    for i in range(2):
        channel = queue.create()
        if channel:
            child(channel, lambda ch, i=i: ch.send(i))
    pids = [channel.pid for channel in queue.active()]
    assert sorted(queue) == [0, 1]
    pprocess.waitall()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


# ---------------------------------------------------------------------- the cluster this module uses


def test_default_is_an_embedded_cluster_started_on_first_need_and_stopped_by_shutdown():
    pprocess.use(workers=1)
    assert pprocess.get_number_of_cores() == 1  # without starting it
    assert zpar.pprocess._layer._layer.client is None
    assert list(pprocess.pmap(tasks.square, range(3))) == [0, 1, 4]
    client = pprocess.get_client()
    assert client._cluster is not None
    pprocess.shutdown()
    assert client._closed


def test_get_number_of_cores_of_the_default_is_this_machines_usable_cores():
    assert pprocess.get_number_of_cores() == len(os.sched_getaffinity(0))


def test_use_address_connects_there_and_reports_its_workers(cluster):
    pprocess.use(cluster.frontend)
    assert pprocess.get_number_of_cores() == 2
    assert pprocess.get_client().address == cluster.frontend
    assert list(pprocess.pmap(tasks.square, range(4))) == [0, 1, 4, 9]


def test_use_client_keeps_it_open_after_shutdown(cluster_client):
    pprocess.use(cluster_client)
    assert pprocess.get_client() is cluster_client
    pprocess.shutdown()
    assert not cluster_client._closed


def test_use_takes_no_client_options_with_a_client(cluster_client):
    with pytest.raises(zpar.ConfigError, match="takes no client options"):
        pprocess.use(cluster_client, timeout=5)


def test_use_workers_with_an_address_is_a_config_error():
    with pytest.raises(zpar.ConfigError):
        pprocess.use("tcp://127.0.0.1:1", workers=2)


# ---------------------------------------------------------------------- channels to running calls (zpar.streaming)


def test_start_gives_a_two_way_channel_to_a_running_call(client):
    pprocess.use(client)
    channel = pprocess.start(tasks.pp_echo, 100)
    assert channel.pid is None  # the creating end of a task, not a forked child
    for i in range(100):
        channel.send(i)
    channel.send(100)
    assert channel.receive() == sum(range(100))
    assert channel.receive() == "Done"
    with pytest.raises(EOFError):
        channel.receive()
    channel.wait()


class Countdown(pprocess.Exchange):
    """pprocess's two-way test: answer each number with the one below it."""

    def store_data(self, channel):
        data = channel.receive()
        self.got.append(data)
        channel.send(data - 1)


def test_exchange_store_data_can_answer_the_call_that_sent(client):
    exchange = Countdown(client=client)
    exchange.got = []
    exchange.start(tasks.pp_countdown, 6)
    exchange.finish()
    assert exchange.got == [6, 5, 4, 3, 2, 1]


def test_exchange_start_runs_a_channel_aware_call_with_its_arguments(client):
    exchange = Collect(limit=3, client=client)
    for i in range(5):
        exchange.start(tasks.pp_rows, i, 1)
    exchange.finish()
    assert sorted(exchange.got) == [(i, 0, i) for i in range(5)]
    # As in pprocess, a waiting call starts when a running one delivers, before that one is seen to end:
    # for a moment the exchange watches both (each takes over its deliverer's worker: see test_pprocess_capacity).
    assert exchange.most <= 2 * 3


def test_continuous_queue_takes_every_message_of_every_call(client):
    queue = pprocess.Queue(limit=2, continuous=1, client=client)
    calc = queue.manage(tasks.pp_rows)
    for i in range(4):
        calc(i, 5)
    assert len(queue.active()) == 2 and len(queue.waiting) == 2
    assert sorted(queue) == [(i, j, i * 5 + j) for i in range(4) for j in range(5)]


def test_continuous_messages_arrive_while_the_call_still_runs(client):
    pprocess.use(client)
    exchange = Collect(continuous=1)
    channel = pprocess.start(tasks.pp_echo, 10)
    exchange.add(channel)
    channel.send(3)
    channel.send(10)
    exchange.store()
    assert exchange.got == [3]
    assert exchange.active() == [channel] or exchange.ready(0) == []  # "Done" may already be in
    exchange.finish()
    assert exchange.got == [3, "Done"]


def test_reuse_hands_waiting_arguments_to_running_calls(client):
    results = pprocess.Map(limit=2, reuse=1, client=client)
    calc = results.manage(tasks.pp_reusable)
    for i in range(8):
        calc(i, b=100)
    answers = list(results)
    assert [value for _, value in answers] == [i + 100 for i in range(8)]
    assert len({token for token, _ in answers}) <= 2  # 8 calls answered by at most 2 running calls
    assert not results.unfinished()


def test_a_channel_aware_calls_exception_comes_after_what_it_sent(client):
    queue = pprocess.Queue(client=client)
    queue.start(tasks.pp_send_then_fail, "late failure")
    assert next(queue) == "before"
    with pytest.raises(ValueError, match="late failure") as info:
        next(queue)
    assert isinstance(info.value.__cause__, zpar.RemoteTraceback)
    assert list(queue) == []


def test_exit_inside_a_call_ends_the_call_not_the_worker(client):
    queue = pprocess.Queue(client=client)
    queue.start(tasks.pp_exit_early)
    queue.start(tasks.pp_exit_early)
    assert list(queue) == [1, 1]


def test_a_map_refuses_a_second_message_from_one_call(client):
    results = pprocess.Map(client=client)
    results.start(tasks.pp_rows, 0, 2)
    with pytest.raises(RuntimeError, match=r"use a Queue|with a Queue"):
        results.finish()


@pytest.mark.parametrize("topology", ["embedded", "tcp"])
def test_closing_the_channel_of_a_running_call_stops_it(topology, new_cluster):
    # Stopping a call replaces its worker: a cluster of its own, so the new worker goes with it.
    with (zpar.Client(workers=1) if topology == "embedded" else new_cluster(agents=1, workers=1).client()) as client:
        pprocess.use(client)
        channel = pprocess.start(tasks.pp_echo, 10)
        channel.send(1)
        channel.close()
        channel.wait()
        assert channel.future.cancelled()
        assert list(pprocess.pmap(tasks.square, [3], client=client)) == [9]  # the cluster goes on
