"""Priorities (``client.options(priority=N)``): higher first within a producer, producers still served in turn.

The broker's per-producer queue (``zpar_broker.queues.TaskQueue``) and the
agent's local queue (``Slots``) with fake clocks; then a real embedded
cluster for the bar: with its one worker busy, 100 priority-0 tasks and then
10 priority-10 tasks: the 10 start before any of the 100, and a second
producer is not starved by the first one's high priorities.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import tasks
from test_broker_core import BLOB, D
from test_broker_core import Broker as CoreBroker

import zpar
from zpar import protocol as P
from zpar.agent.slots import Slots
from zpar.testing import wait_for
from zpar_broker.queues import TaskQueue
from zpar_broker.records import TaskState


def entry(i: int, priority: int = 0, peer: bytes = b"p") -> P.TaskEntry:
    sched = P.Sched(priority) if priority else None
    return P.TaskEntry(i, D, (b"%s:%d" % (peer, i),), 0, 3, 0, (), sched=sched)


class Broker(CoreBroker):
    """test_broker_core's broker, submitting tasks at a priority."""

    def submit(self, peer: bytes, ids, priority: int = 0):
        return self.producer(peer, P.Submit(tuple(entry(i, priority, peer) for i in ids), (P.Function(D, BLOB),)))


def sent(out) -> list[bytes]:
    """The payloads of the tasks in the TASKS of ``out``, in order: who they are."""
    return [bytes(t.payload[0]) for o in out if isinstance(o.msg, P.Tasks) for t in o.msg.tasks]


def gids(out) -> list[int]:
    return [t.id for o in out if isinstance(o.msg, P.Tasks) for t in o.msg.tasks]


class Task:
    """Enough of a TaskRecord for TaskQueue: a name and a state."""

    def __init__(self, name: str) -> None:
        self.name, self.state = name, TaskState.QUEUED


def drain(queue: TaskQueue) -> list[str]:
    out = []
    while (task := queue.take()) is not None:
        out.append(task.name)
    return out


# ---------------------------------------------------------------- the broker's queue


def test_a_queue_gives_higher_priorities_first_then_arrival_order():
    q = TaskQueue(TaskState.GONE)
    for name, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 10), ("e", 5), ("f", -3)]:
        q.put(Task(name), priority)
    assert [t.name for t in q] == ["d", "b", "e", "a", "c", "f"]  # what take would give, in order
    assert drain(q) == ["d", "b", "e", "a", "c", "f"]
    assert q.live == 0 and q.take() is None


def test_a_task_put_back_goes_to_the_front_of_its_own_level_only():
    q = TaskQueue(TaskState.GONE)
    for name, priority in [("a", 0), ("b", 0), ("x", 10), ("y", 10)]:
        q.put(Task(name), priority)
    q.put(Task("again-0"), 0, front=True)  # given back: before a and b, still after the tens
    q.put(Task("again-10"), 10, front=True)
    assert drain(q) == ["again-10", "x", "y", "again-0", "a", "b"]


def test_a_level_made_while_the_top_drains_is_served_in_its_turn():
    q = TaskQueue(TaskState.GONE)
    q.put(Task("a"), 0)
    q.put(Task("b"), 0)
    assert drain(q) == ["a", "b"]
    q.put(Task("hi"), 7)  # a new top while level 0 is empty
    q.put(Task("c"), 0)
    assert drain(q) == ["hi", "c"] and q.levels() == 1


def test_tombstones_are_skipped_counted_and_compacted_in_every_level():
    q = TaskQueue(TaskState.GONE)
    tasks = [Task(str(i)) for i in range(3000)]
    for i, t in enumerate(tasks):
        q.put(t, i % 3)
    for t in tasks[:2500]:
        t.state = TaskState.GONE
        q.tombstone()
    assert q.live == 500 and len(q) - q.gone == 500
    assert len(q) < 2 * 500 + 1100  # compacted once tombstones outnumbered the live tasks past 1024
    names = drain(q)
    assert names == [str(i) for level in (2, 1, 0) for i in range(2500, 3000) if i % 3 == level]
    assert q.gone == 0 and len(q) == 0


def test_the_last_live_task_leaving_empties_every_level():
    q = TaskQueue(TaskState.GONE)
    a, b = Task("a"), Task("b")
    q.put(a, 3)
    q.put(b, -2)
    for t in (a, b):
        t.state = TaskState.GONE
        q.tombstone()
    assert len(q) == 0 and q.levels() == 1 and q.take() is None


def test_the_broker_dispatches_a_producers_higher_priorities_first():
    b = Broker()
    b.submit(b"p", range(1, 6))
    b.submit(b"p", range(6, 9), priority=10)
    b.submit(b"p", [9], priority=-1)
    b.join(b"a", workers=100)
    assert sent(b.ready(b"a", 100)) == [b"p:%d" % i for i in (6, 7, 8, 1, 2, 3, 4, 5, 9)]


def test_a_task_given_back_goes_before_the_others_of_its_priority_not_before_higher_ones():
    b = Broker()
    b.join(b"a", workers=1)
    b.submit(b"p", [1, 2])
    first = gids(b.ready(b"a", 2))  # 1 and 2 prefetched there
    b.submit(b"p", [3])
    b.submit(b"p", [4], priority=10)
    b.core.agent_message(b.now, b"a", P.GiveBack(tuple(first)))
    b.join(b"c", workers=10)
    assert sent(b.ready(b"c", 10)) == [b"p:4", b"p:1", b"p:2", b"p:3"]


def test_a_cancelled_high_priority_task_is_skipped():
    b = Broker()
    b.submit(b"p", [1])
    b.submit(b"p", [2, 3], priority=5)
    b.core.producer_message(b.now, b"p", P.Cancel((2,)))
    b.join(b"a", workers=10)
    assert sent(b.ready(b"a", 10)) == [b"p:3", b"p:1"]


def test_one_producers_high_priorities_do_not_starve_another_producer():
    b = Broker()
    b.submit(b"hi", range(1, 101), priority=100)
    b.submit(b"lo", range(1, 6))
    b.join(b"a", workers=10)
    out = sent(b.ready(b"a", 10))
    assert sorted(out) == sorted([b"hi:%d" % i for i in range(1, 6)] + [b"lo:%d" % i for i in range(1, 6)])


# ---------------------------------------------------------------- the agent's queue


def agent_tasks(ids, priority: int = 0, ship: bool = True) -> P.Tasks:
    return P.Tasks(tuple(entry(i, priority) for i in ids), (P.Function(D, BLOB),) if ship else ())


@pytest.fixture
def slots():
    s = Slots("node-1")
    s.add_worker(b"w1")
    s.tasks(agent_tasks([1000]), 0.0)  # measured: tiny, so tasks go in batches
    s.worker_ready(b"w1", 101, 0.0)
    s.worker_results(b"w1", P.Result((P.ResultEntry(1000, P.Status.OK, (b"ok",), 10),)), 0.0)
    s.take_results()
    return s


def busy(slots: Slots) -> None:
    """w1 takes task 999 (runs long)."""
    (send,) = slots.tasks(agent_tasks([999], ship=False), 0.0)
    assert [t.id for t in send.msg.tasks] == [999]


def test_the_agent_queues_tasks_from_the_broker_by_priority(slots):
    busy(slots)
    slots.tasks(agent_tasks(range(1, 101), ship=False), 0.0)
    slots.tasks(agent_tasks(range(101, 111), priority=10, ship=False), 0.0)
    slots.tasks(agent_tasks([111], priority=5, ship=False), 0.0)
    assert [t.id for t in slots.queue] == [*range(101, 111), 111, *range(1, 101)]
    done = P.Result((P.ResultEntry(999, P.Status.OK, (b"ok",), 10),))
    (send,) = slots.worker_results(b"w1", done, 0.0)
    assert [t.id for t in send.msg.tasks][:11] == [*range(101, 111), 111]


def test_a_task_the_worker_gives_back_waits_behind_higher_priorities_queued_since(slots):
    (send,) = slots.tasks(agent_tasks([1, 2, 3], ship=False), 0.0)  # one batch; task 1 runs long
    assert [t.id for t in send.msg.tasks] == [1, 2, 3]
    slots.tasks(agent_tasks([4], priority=10, ship=False), 0.0)
    slots.tasks(agent_tasks([5], ship=False), 0.0)
    slots.given_back(b"w1", (2, 3), 0.0)
    assert [t.id for t in slots.queue] == [4, 2, 3, 5]


def test_a_batch_of_mixed_priorities_from_the_broker_is_ordered_on_arrival(slots):
    busy(slots)
    mixed = P.Tasks((entry(1), entry(2, 3), entry(3), entry(4, 3)), ())
    slots.tasks(mixed, 0.0)
    assert [t.id for t in slots.queue] == [2, 4, 1, 3]


# ---------------------------------------------------------------- a real cluster: the bar


def _block(started: str, gate: str) -> None:
    """Say it started, then hold the one worker until the test opens ``gate`` (the fixture opens it at teardown)."""
    tasks.touch(started)
    tasks.block_until(gate, 60)


def _stamp(i: int) -> int:
    return time.monotonic_ns()


def _queued(client: zpar.Client, n: int) -> None:
    """Until the broker holds ``n`` tasks queued (the node's prefetch given back: its one worker is held)."""
    wait_for(lambda: client.status()["queued"] >= n, 30, 0.02, f"{n} tasks queued at the broker")


@pytest.mark.timeout(120)
def test_ten_high_priority_tasks_start_before_a_hundred_queued_before_them(tmp_path, gate):
    started = str(tmp_path / "started")
    with zpar.Client(workers=1) as client:
        blocker = client.submit(_block, started, gate)
        wait_for(lambda: os.path.exists(started), 30, what="the blocking task started")
        low = [client.submit(_stamp, i) for i in range(100)]
        high = [client.options(priority=10).submit(_stamp, i) for i in range(10)]
        _queued(client, 110)
        Path(gate).touch()
        blocker.result(timeout=60)
        low_starts = [f.result(timeout=60) for f in low]
        high_starts = [f.result(timeout=60) for f in high]
    assert max(high_starts) < min(low_starts)


def _spin_stamp(i: int) -> int:
    t = time.monotonic_ns()
    end = time.monotonic() + 0.002
    while time.monotonic() < end:
        pass
    return t


@pytest.mark.timeout(120)
def test_a_second_producer_is_served_while_the_first_has_many_high_priority_tasks_queued():
    with zpar.Client(workers=1) as first:
        hub = first.address
        high = [first.options(priority=1000).submit(_spin_stamp, i) for i in range(400)]
        with zpar.Client(hub) as second:
            others = [second.submit(_spin_stamp, i) for i in range(5)]
            other_starts = [f.result(timeout=60) for f in others]
        high_starts = [f.result(timeout=60) for f in high]
    # The second producer's tasks ran in turn, long before the first one's queue ran dry.
    assert max(other_starts) < sorted(high_starts)[-100]


@pytest.mark.timeout(60)
def test_executor_and_pool_pass_priorities_through_options(tmp_path, gate):
    started = str(tmp_path / "started")
    with zpar.Executor(max_workers=1) as ex:
        blocker = ex.submit(_block, started, gate)
        wait_for(lambda: os.path.exists(started), 30, what="the blocking task started")
        low = [ex.submit(_stamp, i) for i in range(20)]
        urgent = ex.options(priority=5)
        high = [urgent.submit(_stamp, i) for i in range(3)]
        mapped = urgent.map(_stamp, range(3))
        _queued(ex.client, 26)  # all but the blocker: none prefetched on the node
        Path(gate).touch()
        blocker.result(timeout=60)
        high_starts = [f.result(timeout=60) for f in high] + list(mapped)
        assert max(high_starts) < min(f.result(timeout=60) for f in low)
    with zpar.Pool(1) as pool:
        urgent_pool = pool.options(priority=3)
        assert urgent_pool.map(abs, [-1, -2]) == [1, 2]
        assert urgent_pool.apply_async(abs, (-4,)).get(timeout=30) == 4
        assert list(urgent_pool.imap_unordered(abs, [-5])) == [5]
        pool.close()
        with pytest.raises(ValueError, match="Pool not running"):  # the pool's state is the view's
            urgent_pool.map(abs, [-1])
        pool.join()


def test_a_priority_out_of_range_is_refused_at_submit():
    with pytest.raises(zpar.ConfigError, match="priority"):
        zpar.TaskOptions(priority=1 << 40)
