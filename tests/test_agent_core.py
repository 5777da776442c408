"""The agent's slot accounting (Slots): batching by measured duration, credits, and what a worker's death means."""

from __future__ import annotations

import pytest

from zpar import protocol as P
from zpar.agent.records import WorkerState
from zpar.agent.slots import ALONE_US, BATCH_TARGET_US, Slots

BLOB = b"the function"
D = P.digest(BLOB)  # hops verify content addressing


def tasks(ids, digest=D, ship=True) -> P.Tasks:
    return P.Tasks(tuple(P.TaskEntry(i, digest, (b"args %d" % i,)) for i in ids),
                   (P.Function(digest, BLOB),) if ship else ())


def finish(core: Slots, send, us: int):
    """The worker that got ``send`` reports every task done in ``us`` microseconds each."""
    entries = tuple(P.ResultEntry(t.id, P.Status.OK, (b"ok",), us) for t in send.msg.tasks)
    return core.worker_results(send.identity, P.Result(entries), 0.0)


def ids(send) -> list[int]:
    return [t.id for t in send.msg.tasks]


@pytest.fixture
def core():
    c = Slots("node-1")
    c.add_worker(b"w1")
    return c


def measured(core: Slots, us: int, first_id: int = 10_000) -> None:
    """Teach ``core`` that tasks of D take ``us``: one task run and reported."""
    if core.workers[b"w1"].state is WorkerState.STARTING:
        core.tasks(tasks([first_id]), 0.0)
        (send,) = core.worker_ready(b"w1", 101, 0.0)
    else:
        (send,) = core.tasks(tasks([first_id]), 0.0)
    assert finish(core, send, us) == []
    core.take_results()


def test_a_ready_worker_gets_the_queued_task_with_its_function(core):
    assert core.tasks(tasks([1]), 0.0) == []  # no worker is ready yet
    (send,) = core.worker_ready(b"w1", 101, 0.0)
    assert send.identity == b"w1" and ids(send) == [1]
    assert send.msg.funcs == (P.Function(D, BLOB),) and send.msg.tasks[0].payload == (b"args 1",)
    assert core.busy() == 1


def test_tasks_of_an_unmeasured_function_go_one_at_a_time(core):
    core.tasks(tasks(range(1, 6)), 0.0)
    (send,) = core.worker_ready(b"w1", 101, 0.0)
    assert ids(send) == [1]


def test_the_function_goes_to_each_worker_once(core):
    core.tasks(tasks(range(1, 4)), 0.0)
    (first,) = core.worker_ready(b"w1", 101, 0.0)
    (second,) = finish(core, first, 5000)
    assert first.msg.funcs == (P.Function(D, BLOB),) and second.msg.funcs == ()


def test_tiny_tasks_batch_up_to_about_one_and_a_half_ms(core):
    measured(core, 10)
    (send,) = core.tasks(tasks(range(1, 1001), ship=False), 0.0)
    assert len(send.msg.tasks) == BATCH_TARGET_US // 10
    assert ids(send) == list(range(1, len(send.msg.tasks) + 1))  # in arrival order


@pytest.mark.parametrize("us,batch", [(ALONE_US, 1), (5000, 1), (999, 1), (600, 2), (100, 15)])
def test_batch_size_follows_the_measured_duration(core, us, batch):
    measured(core, us)
    (send,) = core.tasks(tasks(range(1, 51), ship=False), 0.0)
    assert len(send.msg.tasks) == batch


def test_one_worker_gets_one_batch_at_a_time(core):
    core.add_worker(b"w2")
    core.tasks(tasks(range(1, 4)), 0.0)
    assert [ids(s) for s in core.worker_ready(b"w1", 101, 0.0)] == [[1]]
    assert [ids(s) for s in core.worker_ready(b"w2", 102, 0.0)] == [[2]]
    assert core.assign(0.0) == []  # both busy: task 3 waits
    assert core.held() == 3 and core.busy() == 2


def test_credits_are_sized_from_the_batch(core):
    core.add_worker(b"w2")
    assert core.credit_target() == 2 * 1 * 2  # nothing measured: a batch of one
    assert core.credits_to_ask() == 4
    assert core.credits_to_ask() == 0  # asked already
    core.tasks(tasks([1]), 0.0)
    sends = core.worker_ready(b"w1", 101, 0.0) + core.worker_ready(b"w2", 102, 0.0)
    for i in range(60):  # many tiny results bring the estimate down towards 10 us
        sends = [nxt for s in sends for nxt in finish(core, s, 10)]
        sends += core.tasks(tasks([100 + 2 * i, 101 + 2 * i], ship=False), 0.0)
    for s in sends:
        finish(core, s, 10)
    batch = core.batch_size()
    assert batch >= BATCH_TARGET_US // 20
    assert core.credit_target() == 2 * batch * 2
    core.take_results()
    want = core.credit_target() - core.held() - core.requested
    assert want > 0 and core.credits_to_ask() == want


def test_no_credit_is_asked_while_stopping(core):
    core.accepting = False
    assert core.credits_to_ask() == 0


def test_a_worker_killed_with_one_task_gives_lost_naming_the_signal(core):
    core.tasks(tasks([7]), 0.0)
    core.worker_ready(b"w1", 4242, 0.0)
    assert [t.id for t in core.worker_exited(b"w1", -9)] == [7]
    ((tid, status, payload, _, cause),) = core.take_results()
    assert (tid, status, payload) == (7, P.Status.LOST, ())
    assert (cause.node, cause.pid, cause.signal, cause.exitcode) == ("node-1", 4242, 9, None)
    assert cause.ended() == "killed by SIGKILL"
    assert b"w1" not in core.workers


@pytest.mark.parametrize("code,text", [(-9, "killed by SIGKILL"), (-11, "killed by SIGSEGV"),
                                       (3, "exited with code 3"), (0, "exited with code 0")])
def test_exit_status_is_described(code, text):
    assert P.Cause.from_returncode("node-1", 1, code).ended() == text


def test_a_batch_whose_worker_died_runs_again_task_by_task(core):
    measured(core, 10)
    (send,) = core.tasks(tasks(range(1, 6), ship=False), 0.0)
    assert ids(send) == [1, 2, 3, 4, 5]
    core.worker_exited(b"w1", -9)
    assert core.take_results() is None  # nobody is charged yet: the culprit is unknown
    assert [(t.id, t.alone) for t in core.queue] == [(i, True) for i in range(1, 6)]
    core.add_worker(b"w2")
    (alone,) = core.worker_ready(b"w2", 202, 0.0)
    assert ids(alone) == [1]
    (next_one,) = finish(core, alone, 10)
    assert ids(next_one) == [2]
    assert [e.id for e in core.take_results()] == [1]
    core.worker_exited(b"w2", 3)  # task 2 killed a worker twice: it is charged
    ((tid, status, _, _, cause),) = core.take_results()
    assert (tid, status) == (2, P.Status.LOST) and (cause.exitcode, cause.signal, cause.pid) == (3, None, 202)
    assert [t.id for t in core.queue] == [3, 4, 5]


def test_a_worker_that_dies_idle_charges_nobody(core):
    core.worker_ready(b"w1", 101, 0.0)
    assert core.worker_exited(b"w1", -15) == []
    assert core.take_results() is None
    assert core.worker_exited(b"unknown", -9) == []


def test_results_from_an_unknown_or_idle_worker_are_ignored(core):
    stray = P.Result((P.ResultEntry(1, P.Status.OK, (b"x",), 1),))
    assert core.worker_results(b"nobody", stray, 0.0) == []
    core.worker_ready(b"w1", 101, 0.0)
    assert core.worker_results(b"w1", stray, 0.0) == []
    assert core.take_results() is None


def test_results_go_out_in_bounded_chunks(core):
    n = P.BATCH_MAX_TASKS + 5
    core.results = [P.ResultEntry(i, P.Status.OK, (b"f%d" % i,), 1) for i in range(n)]
    entries = core.take_results()
    assert [e.id for e in entries] == list(range(P.BATCH_MAX_TASKS))  # bounded by entries
    assert entries[1].payload == (b"f1",)  # each with its own payload
    half = b"x" * (P.BATCH_MAX_BYTES // 2 + 1)
    core.results[1:] = [P.ResultEntry(i, P.Status.OK, (half, b"buf"), 1) for i in range(n, n + 3)]
    entries = core.take_results()
    assert [e.id for e in entries] == [P.BATCH_MAX_TASKS, n, n + 1]  # bounded by bytes: past the limit by one
    assert entries[-1].payload == (half, b"buf")
    core.put_back_results(entries)  # could not go now: first in line again
    assert [e.id for e in core.take_results()] == [P.BATCH_MAX_TASKS, n, n + 1]
    assert [e.id for e in core.take_results()] == [n + 2] and core.take_results() is None
