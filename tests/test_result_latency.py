"""A finished result leaves as soon as it is made, and no task waits behind a long one while a worker idles.

Issue 11: ``map(time.sleep, [0, 0, 6], timeout=5)`` gave one result, not two,
before TimeoutError: the second ``sleep(0)`` went in a batch with the 6 s
call and its result waited for the batch to end. The agent's share rule
(tests/test_agent_core.py) and the worker's courier (here) each stop that.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import tasks
import zmq

from zpar import protocol as P
from zpar import serialize
from zpar.agent.courier import Batch, Courier
from zpar.executor import Executor
from zpar.testing import wait_for

# ---------------------------------------------------------------------- the rule, with a fake clock


def entry(tid: int) -> P.ResultEntry:
    return P.ResultEntry(tid, P.Status.OK, (b"r%d" % tid,), 10)


def task(tid: int, flags: int = 0) -> P.TaskEntry:
    return P.TaskEntry(tid, b"d" * 16, (b"args",), flags)


def test_once_a_task_is_seen_running_at_looks_a_delay_apart_the_results_before_it_go_and_the_rest_back():
    batch = Batch(delay=0.002)
    assert batch.look(0.0) == ([], [])  # nothing to look at
    batch.begin([task(1), task(2), task(3), task(4)])
    assert batch.next().id == 1
    batch.done(entry(1))
    assert batch.next().id == 2  # sleep(6)
    assert batch.look(10.0) == ([], [])  # first seen running
    assert batch.look(10.001) == ([], [])  # not for the delay yet
    results, back = batch.look(10.002)
    assert [e.id for e in results] == [1] and back == [3, 4]
    assert batch.look(20.0) == ([], [])  # once for this task
    batch.done(entry(2))
    assert batch.next() is None and not batch.busy  # the batch is over: 3 and 4 are not ours any more
    assert [e.id for e in batch.take()] == [2]


def test_a_short_task_the_loop_was_slow_to_leave_is_not_taken_for_a_long_one():
    batch = Batch(delay=0.002)
    batch.begin([task(1), task(2), task(3)])
    batch.next()
    assert batch.look(0.0) == ([], [])
    batch.done(entry(1))  # this process was not scheduled for 5 ms, then task 1 ended at once
    batch.next()
    assert batch.look(0.005) == ([], [])  # task 2 is new to the courier: nothing is due yet
    batch.done(entry(2))
    assert batch.look(0.007) == ([], []) and batch.busy  # between tasks: nothing to do, task 3 to come


def test_a_batch_of_short_tasks_is_left_alone_however_long_it_runs_in_all():
    batch = Batch(delay=0.002)
    batch.begin([task(tid) for tid in range(1, 101)])
    now = 0.0
    while (t := batch.next()) is not None:
        assert batch.look(now) == ([], [])
        now += 0.0019  # each under the delay: 190 ms in all
        assert batch.look(now) == ([], [])
        batch.done(entry(t.id))
    assert [e.id for e in batch.take()] == list(range(1, 101))  # the loop sends them in one message


def test_a_channel_task_is_not_given_back_and_the_tasks_are_given_back_once_a_batch():
    batch = Batch(delay=0.002)
    batch.begin([task(1), task(2), task(3, P.FLAG_CHANNEL), task(4)])
    batch.next()
    batch.look(0.0)
    assert batch.look(0.002) == ([], [2, 4])
    batch.done(entry(1))
    assert batch.next().id == 3  # its producer's objects may already be on their way here
    batch.look(6.0)
    results, back = batch.look(6.01)  # it runs long too: the results go, nothing more goes back
    assert [e.id for e in results] == [1] and back == []
    batch.done(entry(3))
    assert batch.next() is None


class Sent:
    """A courier's two ways out: records each message, and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[int]]] = []
        self.arrived = threading.Event()

    def results(self, entries: list[P.ResultEntry]) -> None:
        self.messages.append(("results", [e.id for e in entries]))
        self.arrived.set()

    def back(self, ids: list[int]) -> None:
        self.messages.append(("back", ids))
        self.arrived.set()


def test_the_results_of_a_batch_of_short_tasks_leave_in_one_message():
    sent, now = Sent(), [0.0]
    courier = Courier(sent.results, sent.back, delay=0.002, clock=lambda: now[0])
    try:
        t = courier.begin([task(tid) for tid in range(1, 51)])
        while t is not None:
            now[0] += 0.001  # each task under the delay
            t = courier.done(entry(t.id))
        courier.end()
        assert sent.messages == [("results", list(range(1, 51)))]
    finally:
        courier.close()


def courier_acts(now: list[float], done: Callable[[], bool]) -> bool:
    """Move the courier's fake clock a millisecond at a time until ``done`` (its thread looks meanwhile)."""
    def time_passes() -> bool:
        now[0] += 0.001
        return done()

    return wait_for(time_passes, timeout=10, what="the courier acting")


def test_while_the_loop_is_inside_a_long_task_the_courier_sends_the_results_and_gives_back_the_rest():
    sent, now = Sent(), [0.0]
    courier = Courier(sent.results, sent.back, delay=0.002, clock=lambda: now[0])
    try:
        first = courier.begin([task(1), task(2), task(3)])
        assert courier.done(entry(first.id)).id == 2  # the loop goes on to a long task

        # The courier looks at it now and then: once it has seen it run 2 ms, it acts.
        assert courier_acts(now, lambda: len(sent.messages) == 2)
        assert sent.messages == [("results", [1]), ("back", [3])]
        assert courier.done(entry(2)) is None  # task 3 is not ours any more
        courier.end()
        assert sent.messages[2:] == [("results", [2])]
    finally:
        courier.close()


def test_the_courier_sleeps_between_busy_spells_and_the_next_batch_wakes_it():
    sent, now = Sent(), [0.0]
    courier = Courier(sent.results, sent.back, delay=0.001, clock=lambda: now[0])
    try:
        assert not courier.looking  # no batch yet: its thread sleeps
        first = courier.begin([task(1)])
        assert courier.looking
        assert courier.done(entry(first.id)) is None
        courier.end()
        assert wait_for(lambda: not courier.looking, timeout=10, what="the courier going to sleep")
        assert courier.begin([task(2), task(3)]).id == 2  # a long task after the quiet spell is still seen

        assert courier_acts(now, lambda: bool(sent.messages[1:])) and sent.messages[1:] == [("back", [3])]
    finally:
        courier.close()


def test_once_it_has_acted_for_a_long_task_the_courier_sleeps_and_the_next_task_wakes_it():
    # No wake-up (and turn of the GIL) every delay while a long task computes; a channel task kept
    # behind it (never given back) starts, and the courier watches it again.
    sent, now = Sent(), [0.0]
    courier = Courier(sent.results, sent.back, delay=0.002, clock=lambda: now[0])
    try:
        first = courier.begin([task(1), task(2), task(3, P.FLAG_CHANNEL)])
        assert courier.done(entry(first.id)).id == 2  # a long task
        assert courier_acts(now, lambda: len(sent.messages) == 1)
        assert sent.messages == [("results", [1])]  # the channel task stays ours
        assert wait_for(lambda: not courier.looking, timeout=10, what="the courier going to sleep")
        assert courier.done(entry(2)).id == 3  # held: it goes with the next one's, or once that one runs long
        assert courier.looking
        assert courier_acts(now, lambda: len(sent.messages) == 2) and sent.messages[1] == ("results", [2])
    finally:
        courier.close()


def test_a_streaming_task_sends_the_results_before_it_and_gives_back_the_tasks_after_it_at_once():
    sent, now = Sent(), [0.0]
    courier = Courier(sent.results, sent.back, delay=0.002, clock=lambda: now[0])
    try:
        first = courier.begin([task(1), task(2), task(3)])
        courier.done(entry(first.id))
        courier.streaming()  # task 2's first item
        assert sent.messages == [("results", [1]), ("back", [3])]
        courier.streaming()
        assert len(sent.messages) == 2  # once
    finally:
        courier.close()


def test_a_streams_result_goes_at_once_behind_its_items():
    sent = Sent()
    courier = Courier(sent.results, sent.back)
    try:
        first = courier.begin([task(1), task(2)])
        courier.streaming()
        assert courier.done(entry(first.id), send=True) is None  # task 2 went back at task 1's first item
        assert sent.messages == [("back", [2]), ("results", [1])]
    finally:
        courier.close()


# ---------------------------------------------------------------------- a worker process, driven by hand


@pytest.fixture
def worker(tmp_path):
    """A worker process on a ROUTER of ours: ``(router, send)``; stopped with BYE at teardown."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/workers"
    router.bind(endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "zpar.agent.worker", endpoint, "w1", str(os.getpid())],
                            stdin=subprocess.DEVNULL)
    try:
        assert router.poll(20_000), "the worker never said HELLO"
        identity, hello = P.decode_routed(router.recv_multipart())
        assert isinstance(hello, P.Hello) and identity == b"w1"

        def send(msg: P.Message) -> None:
            router.send_multipart(P.encode_routed(b"w1", msg))

        yield router, send
        send(P.Bye(P.ByeReason.RECYCLED))
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        router.close()
        ctx.term()


def received(router: zmq.Socket, timeout: float) -> tuple[str, list[int]]:
    """The next RESULT (``"results"``, ids) or CANCEL (``"back"``, ids) from the worker, within ``timeout`` s."""
    assert router.poll(int(timeout * 1000)), f"nothing from the worker within {timeout} s"
    _, msg = P.decode_routed(router.recv_multipart())
    if isinstance(msg, P.GiveBack):
        return "back", list(msg.ids)
    assert isinstance(msg, P.Result)
    return "results", [e.id for e in msg.results]


def test_a_worker_sends_a_finished_result_and_gives_back_the_rest_while_its_batch_runs_long(worker, tmp_path, gate):
    router, send = worker
    opened = str(tmp_path / "open")
    open(opened, "w").close()
    digest, blob = serialize.dump_function(tasks.block_until)
    batch = tuple(P.TaskEntry(tid, digest, serialize.dumps(((path,), {})))
                  for tid, path in ((1, opened), (2, gate), (3, opened)))
    send(P.Tasks(batch, (P.Function(digest, blob),)))
    early = sorted([received(router, 10), received(router, 10)])  # task 2 is still blocked on its gate
    assert early == [("back", [3]), ("results", [1])]
    open(gate, "w").close()
    assert received(router, 20) == ("results", [2])


# ---------------------------------------------------------------------- through an Executor


@pytest.fixture(params=["embedded", "tcp"])
def executor(request, new_cluster):
    """An Executor of 2 workers: embedded, or a LocalCluster of one agent with 2 workers."""
    if request.param == "embedded":
        ex = Executor(max_workers=2)
    else:
        ex = Executor(address=new_cluster(agents=1, workers=2).frontend)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)  # stops the long sleep rather than wait for it


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "sleep-measured-tiny"])
def test_map_yields_the_short_sleeps_before_the_long_one_ends(executor, warm):
    if warm:  # the agent has measured sleep as a tiny task: the 6 s call is a surprise
        assert list(executor.map(time.sleep, [0] * 4, timeout=20)) == [None] * 4
    start = time.monotonic()
    first_two = list(itertools.islice(executor.map(time.sleep, [0, 0, 6], timeout=5), 2))  # TimeoutError if not
    assert first_two == [None, None]
    assert time.monotonic() - start < 3  # well before the 6 s call ends, as with ProcessPoolExecutor(2)


def test_no_task_waits_behind_a_long_one_while_another_worker_is_idle(executor, tmp_path, gate):
    opened = str(tmp_path / "open")
    open(opened, "w").close()
    assert [f.result(timeout=20) for f in [executor.submit(tasks.block_until, opened) for _ in range(4)]] == [None] * 4
    long_one = executor.submit(tasks.block_until, gate)  # measured tiny, blocks until the gate opens
    quick = [executor.submit(tasks.block_until, opened, value=i) for i in range(6)]
    done, _ = cf.wait(quick, timeout=10)  # whichever worker holds them, they do not wait for the gate
    assert len(done) == 6 and not long_one.done()
    open(gate, "w").close()
    assert long_one.result(timeout=20) is None
