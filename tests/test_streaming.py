"""Streams and channels (zpar.streaming): each behaviour on both topologies, then the cores' rules.

A generator task streams its items in order under a window; an exception,
a cancel, a timeout or a dead worker ends the stream after the items before
it, and no item ever comes twice. ``client.start`` gives a two-way channel.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import statistics
import threading
import time

import numpy as np
import psutil
import pytest
import tasks

import zpar
from zpar import protocol as P
from zpar import streaming
from zpar.agent.slots import Slots
from zpar.testing import wait_for
from zpar_broker.core import BrokerCore, Dest

W = streaming.WINDOW


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def progress(path) -> int:
    try:
        with open(path) as fh:
            return int(fh.read().strip() or 0)
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------- streams


def test_a_generator_streams_its_items_in_order_and_returns_its_value_as_the_result(client):
    fut = client.submit(tasks.count_up, 2000, "the end")
    assert list(fut.stream(timeout=30)) == list(range(2000))
    assert fut.result(timeout=10) == "the end"


def test_many_short_streams_among_plain_tasks_all_deliver(client):
    # Short generators get batched with other tasks: each stream's result goes ahead of its batch's.
    streams = [client.submit(tasks.count_up, 3, i) for i in range(300)]
    plain = [client.submit(tasks.square, i) for i in range(300)]
    for i, fut in enumerate(streams):
        assert list(fut.stream(timeout=20)) == [0, 1, 2] and fut.result(timeout=10) == i
    assert [f.result(timeout=20) for f in plain] == [i * i for i in range(300)]


def test_result_without_reading_the_stream_discards_the_items_instead_of_waiting(client):
    # Far more items than the window: the generator could only finish if they were discarded.
    assert client.submit(tasks.count_up, 20 * W, 7).result(timeout=30) == 7


def test_items_are_read_one_at_a_time_with_receive_and_eof_after_the_last(client):
    fut = client.submit(tasks.count_up, 3)
    assert [fut.receive(timeout=10) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(EOFError):
        fut.receive(timeout=10)
    assert fut.ready()


def test_a_task_that_is_not_a_generator_streams_nothing(client):
    fut = client.submit(tasks.square, 6)
    assert list(fut.stream(timeout=10)) == []
    assert fut.result(timeout=10) == 36


def test_an_exception_in_the_generator_comes_after_the_items_before_it(client):
    fut = client.submit(tasks.yield_then_raise, 5, "broke at 5")
    seen = []
    with pytest.raises(ValueError, match="broke at 5"):
        seen.extend(fut.stream(timeout=10))  # keeps what came before the error
    assert seen == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="broke at 5"):
        fut.result(timeout=10)


def test_a_hundred_thousand_items_arrive_in_order_each_once(client):
    fut = client.submit(tasks.count_up, 100_000, "all sent")
    assert list(fut.stream(timeout=30)) == list(range(100_000))
    assert fut.result(timeout=10) == "all sent"


def test_every_item_is_here_when_the_result_is(client):
    fut = client.submit(tasks.count_up, W // 2, "after the items")
    assert fut.receive(timeout=10) == 0  # claimed: the items are kept for us
    concurrent.futures.wait([fut], timeout=30)
    assert fut.result(timeout=0) == "after the items"
    assert [fut.receive(timeout=0) for _ in range(W // 2 - 1)] == list(range(1, W // 2))


def test_items_held_in_the_worker_go_while_the_task_runs_on_without_yielding(client, tmp_path):
    gate = str(tmp_path / "gate")
    fut = client.submit(tasks.burst_then_wait, 10, gate)
    assert [fut.receive(timeout=10) for _ in range(10)] == list(range(10))  # not held until the task ends
    assert not fut.done()
    open(gate, "w").close()
    assert fut.result(timeout=10) == "released"


def latencies(fut) -> list[float]:
    """Seconds from each stamped item's making (``time.monotonic()`` in the worker: the same clock) to here."""
    return [time.monotonic() - item for item in fut.stream(timeout=30) if isinstance(item, float)]


def test_a_slow_generators_items_arrive_within_milliseconds(client):
    waits = latencies(client.submit(tasks.stamped, 30, 0.01))
    assert len(waits) == 30
    assert statistics.median(waits) < 0.025, waits  # held for a batch, they would wait 10 ms an item held


def test_the_last_item_of_a_burst_arrives_within_milliseconds_though_the_task_yields_no_more(client):
    # Held in the worker until the courier's next look finds it held a millisecond: about 2 ms, then the hops.
    waits = latencies(client.submit(tasks.bursts_stamped, 20, 50, 0.02))
    assert len(waits) == 20
    assert statistics.median(waits) < 0.015, waits  # held until the next burst, 20 ms


def test_a_slow_reader_pauses_the_generator_at_the_window(own_client, tmp_path):
    path = str(tmp_path / "progress")
    fut = own_client.submit(tasks.count_up_logged, path, 1_000_000)
    stream = fut.stream(timeout=30)
    assert next(stream) == 0
    # Nothing more is read: the generator makes the window's worth, then waits at its yield.
    wait_for(lambda: progress(path) >= W, 10, what="the generator filling the window")
    with pytest.raises(TimeoutError):
        wait_for(lambda: progress(path) > W + 1, 0.5, what="the generator running past the window")
    assert len(fut._stream.items) <= W  # and the producer holds no more than that
    taken = 1 + sum(1 for _, _ in zip(range(999), stream, strict=False))  # 999 more of a longer stream
    assert taken == 1000
    with pytest.raises(TimeoutError):
        wait_for(lambda: progress(path) > taken + W + 1, 0.5, what="the generator running past the window")
    assert fut.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        for _ in stream:
            pass


def test_cancel_stops_a_running_stream_and_its_worker(own_client, gate):
    fut = own_client.submit(tasks.pid_then_count, 10, gate)
    pid = fut.receive(timeout=10)
    assert fut.cancel()  # not forced: a stream is stopped all the same
    with pytest.raises(concurrent.futures.CancelledError):
        fut.receive(timeout=10)
    wait_for(lambda: gone(pid), 10, what=f"worker {pid} stopped")
    assert own_client.submit(tasks.square, 3).result(timeout=20) == 9


def test_a_forced_cancel_through_the_client_stops_a_stream(own_client, gate):
    fut = own_client.submit(tasks.pid_then_count, 10, gate)
    pid = fut.receive(timeout=10)
    assert own_client.cancel([fut], force=True) == 1
    wait_for(lambda: gone(pid), 10, what=f"worker {pid} stopped")


def test_a_cancelled_future_is_done_for_concurrent_futures_wait(client, gate):
    fut = client.submit(tasks.block_until, gate)
    assert fut.cancel()
    done, _ = concurrent.futures.wait([fut], timeout=5)
    assert done == {fut}
    assert list(concurrent.futures.as_completed([fut], timeout=5)) == [fut]


def test_the_task_timeout_covers_the_whole_stream(own_client):
    fut = own_client.options(timeout=0.5).submit(tasks.sleepy_generator, 30)
    assert fut.receive(timeout=10) == "started"
    with pytest.raises(zpar.TaskTimeout):
        fut.receive(timeout=10)


def test_a_worker_killed_mid_stream_fails_it_with_worker_lost_and_no_item_comes_twice(own_client):
    fut = own_client.submit(tasks.pid_then_count, 10**7)
    pid = fut.receive(timeout=10)
    first = [fut.receive(timeout=10) for _ in range(50)]
    os.kill(pid, signal.SIGKILL)
    rest = []
    with pytest.raises(zpar.WorkerLost, match="not run again") as info:
        rest.extend(fut.stream(timeout=20))
    assert (info.value.pid, info.value.signal, info.value.exitcode, info.value.attempts) == (pid, 9, None, 1)
    seen = first + rest
    assert seen == list(range(len(seen))), "every item once, in order"
    assert own_client.submit(tasks.square, 4).result(timeout=20) == 16


def test_a_stream_lost_before_its_first_item_runs_again(own_client, tmp_path):
    fut = own_client.submit(tasks.die_before_first_item_once, str(tmp_path / "runs"), 5)
    assert list(fut.stream(timeout=30)) == [0, 1, 2, 3, 4]
    assert (tmp_path / "runs").read_text() == "2"


def test_large_items_stream_within_the_byte_window(client):
    fut = client.submit(tasks.big_items, 12, 4)  # 48 MiB through an 8 MiB window
    for i, array in enumerate(fut.stream(timeout=30)):
        assert array.nbytes == 4 << 20 and array[0] == array[-1] == i
    assert i == 11


# ---------------------------------------------------------------------- channels


def test_a_channel_round_trips_objects_both_ways(client):
    fut = client.start(tasks.echo, ">")
    for word in ["a", "bb", "ccc"]:
        fut.send(word, timeout=10)
        assert fut.receive(timeout=10) == ">" + word
    fut.close_input()
    assert fut.result(timeout=10) == "bye"
    with pytest.raises(EOFError):
        fut.send("late")


def test_many_objects_each_way_keep_their_order_under_flow_control(client):
    n = 3 * W
    fut = client.start(tasks.running_total)

    def feed():
        for i in range(n):
            fut.send(i, timeout=20)
        fut.close_input()

    sender = threading.Thread(target=feed)
    sender.start()
    totals = list(fut.stream(timeout=20))
    sender.join(20)
    assert totals == list(np.cumsum(range(n)))
    assert fut.result(timeout=10) == n * (n - 1) // 2


def test_a_generator_reads_what_the_producer_sends_through_its_channel(client):
    fut = client.submit(tasks.generator_reading_its_channel)
    fut.send(1)
    fut.send(2)
    fut.close_input()
    assert list(fut.stream(timeout=10)) == [2, 4]


def test_receive_in_the_task_times_out(client):
    assert client.start(tasks.receive_with_timeout, 0.1).result(timeout=10) == "timed out"


def test_any_task_reaches_its_own_channel(client):
    fut = client.submit(tasks.channel_outside_a_task)
    assert isinstance(fut.result(timeout=10), int)


def test_channel_outside_a_task_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="only inside a task"):
        streaming.channel()


def test_wait_ready_returns_the_channels_with_something_to_read(client):
    quiet = client.start(tasks.echo, "")
    talking = client.start(tasks.echo, "")
    assert streaming.wait_ready([quiet, talking], timeout=0.2) == []
    talking.send("x")
    assert streaming.wait_ready([quiet, talking], timeout=10) == [talking]
    assert talking.receive(timeout=1) == "x"
    for fut in (quiet, talking):
        fut.close_input()
        assert fut.result(timeout=10) == "bye"


def test_objects_sent_to_a_queued_task_wait_for_it(new_cluster, gate):
    cluster = new_cluster(agents=1, workers=1)
    client = cluster.client()
    blocker = client.submit(tasks.block_until, gate)
    wait_for(lambda: cluster.status()["busy"] >= 1, 10, what="the only worker busy")
    fut = client.start(tasks.running_total)
    for i in range(5):
        fut.send(i, timeout=10)
    fut.close_input()
    open(gate, "w").close()
    blocker.result(timeout=10)
    assert list(fut.stream(timeout=10)) == [0, 1, 3, 6, 10]
    assert fut.result(timeout=10) == 10


# ---------------------------------------------------------------------- the cores' rules (no processes)

D = P.digest(b"blob")  # hops verify content addressing


def stream_broker():
    core = BrokerCore(0.0)
    core.producer_message(0.0, b"p", P.Hello(P.Role.PRODUCER))
    core.agent_message(0.0, b"a", P.Hello(P.Role.AGENT, "a", "host", 1, 1))
    return core


def submit(core, ptid, flags=0, retries=3):
    return core.producer_message(0.0, b"p", P.Submit((P.TaskEntry(ptid, D, (b"args",), flags, retries),),
                                                     (P.Function(D, b"blob"),)))


def test_the_broker_routes_items_to_the_producer_and_feed_to_the_agent():
    core = stream_broker()
    submit(core, 7)
    (tasks_out,) = core.agent_message(0.0, b"a", P.Ready(1))
    gid = tasks_out.msg.tasks[0].id
    item = (b"item", b"buffer")
    (out,) = core.items(0.0, P.Items((P.ItemEntry(gid, 0, item),), (P.Credit(gid, 9),), b"a"))
    assert (out.dest, out.peer) == (Dest.FRONTEND, b"p") and out.msg.items[0].payload is item
    assert out.msg == P.Items((P.ItemEntry(7, 0, item),), (P.Credit(7, 9),))
    (out,) = core.producer_message(0.0, b"p", P.Feed((P.ItemEntry(7, 0, (b"x",)),), (P.Credit(7, 300),), (7,)))
    assert (out.dest, out.peer) == (Dest.BACKEND, b"a")
    assert out.msg == P.Feed((P.ItemEntry(gid, 0, (b"x",)),), (P.Credit(gid, 300),), (gid,))


def test_the_broker_keeps_feed_for_a_queued_task_and_sends_it_behind_the_task():
    core = stream_broker()
    submit(core, 7, P.FLAG_CHANNEL)
    obj = (b"obj", b"buffer")
    assert core.producer_message(0.0, b"p", P.Feed((P.ItemEntry(7, 0, obj),), (), (7,))) == []
    tasks_out, feed_out = core.agent_message(0.0, b"a", P.Ready(1))
    gid = tasks_out.msg.tasks[0].id
    assert isinstance(tasks_out.msg, P.Tasks) and feed_out.peer == b"a"
    assert feed_out.msg == P.Feed((P.ItemEntry(gid, 0, obj),), (), (gid,))


def test_a_task_that_streamed_is_not_run_again_when_its_worker_dies():
    core = stream_broker()
    submit(core, 7)
    (tasks_out,) = core.agent_message(0.0, b"a", P.Ready(1))
    gid = tasks_out.msg.tasks[0].id
    core.items(0.0, P.Items((P.ItemEntry(gid, 0, (b"i",)),), (), b"a"))
    killed = P.Cause("a", 4242, None, 9)
    out = core.results(0.0, P.Result((P.ResultEntry(gid, P.Status.LOST, cause=killed),), b"a"))
    (failed,) = [o for o in out if isinstance(o.msg, P.Result)]
    (entry,) = failed.msg.results
    assert entry.status == P.Status.LOST and "not run again" in entry.cause.detail
    assert (entry.cause.node, entry.cause.pid, entry.cause.signal, entry.cause.attempts) == ("a", 4242, 9, 1)
    assert core.counters["retried"] == 0


def test_a_plain_cancel_of_a_streaming_task_stops_it_on_its_agent():
    core = stream_broker()
    submit(core, 7)
    (tasks_out,) = core.agent_message(0.0, b"a", P.Ready(1))
    gid = tasks_out.msg.tasks[0].id
    core.items(0.0, P.Items((P.ItemEntry(gid, 0, (b"i",)),), (), b"a"))
    (out,) = core.producer_message(0.0, b"p", P.Cancel((7,)))
    assert (out.peer, out.msg) == (b"a", P.Cancel((gid,), force=True))


def test_items_of_a_task_nobody_waits_for_stop_it():
    core = stream_broker()
    (out,) = core.items(0.0, P.Items((P.ItemEntry(99, 3, (b"i",)),), (), b"a"))
    assert (out.peer, out.msg) == (b"a", P.Cancel((99,), force=True))


def agent_with_worker():
    core = Slots("node")
    core.add_worker(b"w1")
    core.worker_ready(b"w1", 101, 0.0)
    return core


def test_the_agent_forwards_items_and_sends_feed_to_the_worker_holding_the_task():
    core = agent_with_worker()
    assert len(core.tasks(P.Tasks((P.TaskEntry(5, D, (b"args",)),), (P.Function(D, b"blob"),)), 0.0)) == 1
    item = (b"item", b"buffer")
    core.worker_items(b"w1", P.Items((P.ItemEntry(5, 0, item),), (P.Credit(5, 300),)))
    assert core.take_items() == ([P.ItemEntry(5, 0, item)], [P.Credit(5, 300)])
    (fed,) = core.feed(P.Feed((P.ItemEntry(5, 0, (b"x",)),), (P.Credit(5, 256),)))
    assert fed.identity == b"w1" and fed.msg == P.Feed((P.ItemEntry(5, 0, (b"x",)),), (P.Credit(5, 256),))


def test_the_agent_keeps_feed_for_a_queued_task_and_sends_it_behind_the_task():
    core = Slots("node")
    core.add_worker(b"w1")
    core.tasks(P.Tasks((P.TaskEntry(5, D, (b"args",), P.FLAG_CHANNEL),), (P.Function(D, b"blob"),)), 0.0)
    obj = (b"obj", b"buffer")
    assert core.feed(P.Feed((P.ItemEntry(5, 0, obj),), (), (5,))) == []
    send, fed = core.worker_ready(b"w1", 101, 0.0)
    assert isinstance(send.msg, P.Tasks) and fed.msg == P.Feed((P.ItemEntry(5, 0, obj),), (), (5,))


def test_a_streams_result_ahead_of_its_batch_leaves_the_worker_busy_with_the_rest():
    core = agent_with_worker()
    core.durations[D] = 10.0  # short: the three go as one batch
    (send,) = core.tasks(P.Tasks(tuple(P.TaskEntry(i, D, (b"a",)) for i in (1, 2, 3)), (P.Function(D, b"blob"),)),
                         0.0)
    assert [t.id for t in send.msg.tasks] == [1, 2, 3]
    core.worker_items(b"w1", P.Items((P.ItemEntry(2, 0, (b"i",)),)))
    core.worker_results(b"w1", P.Result((P.ResultEntry(1, P.Status.OK, (b"r1",), 5),)), 0.0)
    assert [t.id for t in core.workers[b"w1"].batch] == [2, 3] and core.busy() == 1
    # The worker dies in task 3: task 2 streamed, so it is reported lost, not run again; 3 runs again.
    core.worker_exited(b"w1", -9)
    assert [e.id for e in core.results if e.status == P.Status.LOST] == [2]
    assert [t.id for t in core.queue] == [3]


def test_after_a_broker_restart_the_agent_stops_workers_streaming_for_the_old_one():
    core = Slots("node")
    for w in (b"w1", b"w2"):
        core.add_worker(w)
        core.worker_ready(w, 101, 0.0)
    core.tasks(P.Tasks((P.TaskEntry(5, D, (b"args",)), P.TaskEntry(6, D, (b"args",))), (P.Function(D, b"blob"),)), 0.0)
    streaming_worker = next(s.identity for s in core.workers.values() if s.batch[0].id == 5)
    core.worker_items(streaming_worker, P.Items((P.ItemEntry(5, 0, (b"i",)),)))
    assert core.forget_tasks() == [streaming_worker]  # the plain task just finishes; its result is dropped
    assert core.take_items() is None


def test_a_ready_callback_runs_for_each_item_and_at_the_end(client):
    import threading

    calls: list[int] = []
    lock = threading.Lock()

    def note() -> None:
        with lock:
            calls.append(1)

    fut = client.submit(tasks.generator_reading_its_channel)  # yields only what we send it
    fut.add_ready_callback(note)
    for x in (1, 2, 3):
        fut.send(x)
    fut.close_input()
    assert list(fut.stream(timeout=30)) == [2, 4, 6]
    fut.result(timeout=30)
    wait_for(lambda: len(calls) >= 4, 10, what="three items and the end noticed")
