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
    ((tid, status, payload, _, cause, *_),) = core.take_results()
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
    ((tid, status, _, _, cause, *_),) = core.take_results()
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


# ---------------------------------------------------------------------- a short queue, results as they are made


def two_ready(core: Slots, queued) -> tuple:
    """w1 (measured) and w2 both idle, then ``queued`` arrive: what each worker got."""
    core.add_worker(b"w2")
    core.worker_ready(b"w2", 102, 0.0)
    return tuple(core.tasks(tasks(queued, ship=False), 0.0))


def test_tasks_queued_while_several_workers_are_idle_are_spread_over_them(core):
    measured(core, 10)  # a batch of 150 would fit the budget
    first, second = two_ready(core, [1, 2, 3])
    assert (first.identity, ids(first)) == (b"w1", [1, 2]) and (second.identity, ids(second)) == (b"w2", [3])


def test_a_lone_idle_worker_takes_a_full_batch_while_the_others_are_busy(core):
    measured(core, 10)
    core.add_worker(b"w2")
    core.worker_ready(b"w2", 102, 0.0)
    (busy,) = core.tasks(tasks([1]), 0.0)  # w1 takes it: w2 stays idle
    (full,) = core.tasks(tasks(range(2, 1001), ship=False), 0.0)
    assert busy.identity == b"w1" and full.identity == b"w2" and len(full.msg.tasks) == BATCH_TARGET_US // 10


def test_a_long_queue_still_goes_in_batches_sized_by_duration(core):
    measured(core, 10)
    first, second = two_ready(core, range(1, 1001))
    assert len(first.msg.tasks) == len(second.msg.tasks) == BATCH_TARGET_US // 10


def test_tasks_a_worker_gives_back_are_first_in_line_for_the_next_idle_worker(core):
    measured(core, 10)
    core.add_worker(b"w2")
    (send,) = core.tasks(tasks(range(1, 5), ship=False), 0.0)  # w1: its batch runs long at task 1
    core.tasks(tasks([5, 6], ship=False), 0.0)
    assert ids(send) == [1, 2, 3, 4] and [t.id for t in core.queue] == [5, 6]
    assert core.given_back(b"w1", (3, 4), 0.0) == []  # no worker is idle: they wait ahead of the others
    assert [t.id for t in core.queue] == [3, 4, 5, 6] and [t.id for t in core.workers[b"w1"].batch] == [1, 2]
    (took,) = core.worker_ready(b"w2", 102, 0.0)
    assert took.identity == b"w2" and ids(took)[:2] == [3, 4]
    assert core.busy() == 2  # w1 still runs task 1, and will run 2
    rest = P.Result(tuple(P.ResultEntry(i, P.Status.OK, (b"ok",), 10) for i in (1, 2)))
    core.worker_results(b"w1", rest, 0.0)  # its batch is done: w1 takes what is left
    assert [e.id for e in core.take_results()] == [1, 2]


def test_tasks_given_back_by_an_unknown_idle_or_doomed_holder_are_not_queued_twice(core):
    measured(core, 10)
    core.tasks(tasks(range(1, 4), ship=False), 0.0)
    assert core.given_back(b"nobody", (2,), 0.0) == []
    assert core.cancel((3,)) == [b"w1"]  # being killed for task 3: its death reports it
    assert core.given_back(b"w1", (2, 3, 99), 0.0) == []
    assert [t.id for t in core.queue] == [2] and [t.id for t in core.workers[b"w1"].batch] == [1, 3]
    assert core.given_back(b"w1", (2,), 0.0) == []  # not held any more: a repeat is ignored
    assert [t.id for t in core.queue] == [2]


def test_a_worker_that_gives_back_its_whole_batch_is_idle_again(core):
    measured(core, 10)
    core.tasks(tasks([1, 2], ship=False), 0.0)
    (again,) = core.given_back(b"w1", (1, 2), 0.0)  # it started none: it takes work again
    assert again.identity == b"w1" and ids(again) == [1, 2]


def test_tasks_given_back_for_a_broker_that_is_gone_are_dropped(core):
    measured(core, 10)
    core.tasks(tasks(range(1, 4), ship=False), 0.0)
    core.forget_tasks()
    assert core.given_back(b"w1", (2, 3), 0.0) == [] and not core.queue


def test_a_workers_first_results_go_on_while_it_runs_the_rest(core):
    measured(core, 10)
    (send,) = core.tasks(tasks(range(1, 6), ship=False), 0.0)
    assert ids(send) == [1, 2, 3, 4, 5]
    done = P.Result(tuple(P.ResultEntry(i, P.Status.OK, (b"ok",), 10) for i in (1, 2)))
    assert core.worker_results(b"w1", done, 0.0) == []  # it is still busy: no new batch yet
    assert [e.id for e in core.take_results()] == [1, 2]  # they do not wait for the batch's end
    assert [t.id for t in core.workers[b"w1"].batch] == [3, 4, 5] and core.busy() == 1
    core.tasks(tasks([6], ship=False), 0.0)
    rest = P.Result(tuple(P.ResultEntry(i, P.Status.OK, (b"ok",), 10) for i in (3, 4, 5)))
    (after,) = core.worker_results(b"w1", rest, 0.0)
    assert [e.id for e in core.take_results()] == [3, 4, 5] and ids(after) == [6]


def test_results_sent_ahead_are_measured(core):
    measured(core, 10)
    core.tasks(tasks(range(1, 4), ship=False), 0.0)
    core.worker_results(b"w1", P.Result((P.ResultEntry(1, P.Status.OK, (b"ok",), 5_000_000),)), 0.0)
    assert core.durations[D] > ALONE_US  # the next tasks of this function go alone, at once


def test_a_cancelled_tasks_result_sent_ahead_is_left_to_its_workers_death(core):
    measured(core, 10)
    core.tasks(tasks(range(1, 4), ship=False), 0.0)
    assert core.cancel((1,)) == [b"w1"]
    core.worker_results(b"w1", P.Result((P.ResultEntry(1, P.Status.OK, (b"ok",), 10),)), 0.0)
    assert core.take_results() is None
    core.worker_exited(b"w1", -15)
    ((tid, status, *_),) = core.take_results()
    assert (tid, status) == (1, P.Status.CANCELLED)
    assert [t.id for t in core.queue] == [2, 3]  # innocent: run again elsewhere
