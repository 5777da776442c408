"""Futures as arguments in the broker's and the producer's cores (fake clock, no sockets): a task that takes
other tasks' values waits for them, gets them as objects, or fails when one fails."""

from __future__ import annotations

import concurrent.futures

import pytest

from zpar import _refs, errors
from zpar import protocol as P
from zpar.testing.transport import StubBroker

from .test_broker_core import BLOB, Broker, D, delivered

pytestmark = pytest.mark.timeout(60)


def entry(tid: int, deps: tuple[int, ...] = (), payload: bytes = b"args") -> P.TaskEntry:
    return P.TaskEntry(tid, D, (payload,), 0, 3, sched=P.Sched(deps=deps) if deps else None)


def submit(b: Broker, *entries: P.TaskEntry, peer: bytes = b"p"):
    return b.producer(peer, P.Submit(entries, (P.Function(D, BLOB),)))


def tasks_in(out):
    return [t for o in out if isinstance(o.msg, P.Tasks) for t in o.msg.tasks]


def objects_in(out):
    return {f.digest: f.blob for o in out if isinstance(o.msg, P.Tasks) for f in o.msg.funcs if f.digest != D}


def test_a_task_waits_for_its_dependency_and_gets_its_value_as_an_object():
    b = Broker()
    b.join(b"a", workers=2)
    submit(b, entry(1), entry(2, deps=(1,)))
    (first,) = tasks_in(b.ready(b"a", 2))  # only the dependency is queued
    assert first.payload == (b"args",)
    status = b.core.status(b.now)
    assert (status["queued"], status["running"], status["waiting"]) == (0, 1, 1)
    out = b.core.results(b.now, P.Result((P.ResultEntry(first.id, P.Status.OK, (b"\x80value",), 5),), b"a"))
    assert [(r[1], r[2]) for r in delivered(out)] == [(1, b"\x80value")]  # its own result still goes home
    (second,) = tasks_in(out)  # queued now, and sent at once: the node has a credit left
    assert second.sched is not None and second.sched.deps == () and second.sched.values == 1
    (digest,) = second.refs
    blob = objects_in(out)[digest]
    assert _refs.is_object(blob)
    assert blob.endswith(b"\x80value")  # the result payload, as it came: packed, not unpickled


def test_the_value_is_kept_only_while_a_task_takes_it():
    b = Broker()
    b.join(b"a")
    submit(b, entry(1), entry(2, deps=(1,)))
    (first,) = tasks_in(b.ready(b"a", 1))
    b.core.results(b.now, P.Result((P.ResultEntry(first.id, P.Status.OK, (b"v",), 5),), b"a"))
    (second,) = tasks_in(b.ready(b"a", 1))
    prod = b.core._producers[b"p"]
    assert len(prod.objects) == 1
    b.core.results(b.now, P.Result((P.ResultEntry(second.id, P.Status.OK, (b"w",), 5),), b"a"))
    assert len(prod.objects) == 0, "dropped once the last task taking it ended"
    # A task naming it now is told to send the value itself.
    out = submit(b, entry(3, deps=(1,)))
    assert [(o.msg.code, o.msg.ids) for o in out if isinstance(o.msg, P.Error)] == [(P.ErrorCode.DEPENDENCY_GONE, (3,))]


def test_a_later_task_takes_a_value_still_kept():
    b = Broker()
    b.join(b"a")
    submit(b, entry(1), entry(2, deps=(1,)))
    (first,) = tasks_in(b.ready(b"a", 1))
    b.core.results(b.now, P.Result((P.ResultEntry(first.id, P.Status.OK, (b"v",), 5),), b"a"))
    out = submit(b, entry(3, deps=(1,)))
    assert not [o for o in out if isinstance(o.msg, P.Error)]
    out = b.ready(b"a", 2)
    first_refs, second_refs = (t.refs for t in tasks_in(out))
    assert first_refs == second_refs


def test_a_failed_dependency_fails_its_dependents_and_theirs_without_running_them():
    b = Broker()
    b.join(b"a")
    submit(b, entry(1), entry(2, deps=(1,)), entry(3, deps=(2,)), entry(4))
    (first,) = tasks_in(b.ready(b"a", 1))
    out = b.core.results(b.now, P.Result((P.ResultEntry(first.id, P.Status.RAISED, (b"exc",), 5),), b"a"))
    results = [(r.id, r.status) for o in out if isinstance(o.msg, P.Result) for r in o.msg.results]
    assert results == [(1, P.Status.RAISED), (2, P.Status.DEP_FAILED), (3, P.Status.DEP_FAILED)]  # the cause first
    causes = [r.cause.detail for o in out if isinstance(o.msg, P.Result) for r in o.msg.results if r.cause]
    assert "task 1" in causes[0] and "task 2" in causes[1]
    (last,) = tasks_in(b.ready(b"a", 5))
    assert last.payload == (b"args",) and b.core.status(b.now)["failed"] == 3


def test_a_chain_of_ten_thousand_fails_in_a_loop_not_a_recursion():
    b = Broker()
    b.join(b"a")
    n = 10_000
    submit(b, entry(1), *(entry(i, deps=(i - 1,)) for i in range(2, n + 1)))
    (first,) = tasks_in(b.ready(b"a", 1))
    out = b.core.results(b.now, P.Result((P.ResultEntry(first.id, P.Status.LOST, cause=P.Cause("a", 1)),), b"a"))
    out += b.advance(0)
    assert not b.core._producers[b"p"].tasks or b.core._tasks  # the first is queued again (a lost run retries)
    # Fail it for good: cancel it; the 9,999 waiting behind it end unrun.
    assert b.core.status(b.now)["waiting"] == n - 1
    out = b.producer(b"p", P.Cancel((1,), True))
    statuses = [r.status for o in out if isinstance(o.msg, P.Result) for r in o.msg.results]
    assert statuses.count(P.Status.DEP_FAILED) == n - 1
    assert not b.core._producers[b"p"].tasks and not b.core._tasks
    assert b.core.status(b.now)["waiting"] == 0


def test_cancelling_a_waiting_task_leaves_its_dependency_alone():
    b = Broker()
    b.join(b"a")
    submit(b, entry(1), entry(2, deps=(1,)))
    b.producer(b"p", P.Cancel((2,), False))
    assert b.core.status(b.now)["waiting"] == 0
    (first,) = tasks_in(b.ready(b"a", 1))
    out = b.core.results(b.now, P.Result((P.ResultEntry(first.id, P.Status.OK, (b"v",), 5),), b"a"))
    assert [r[1] for r in delivered(out)] == [1]
    assert not tasks_in(b.ready(b"a", 1)) and len(b.core._producers[b"p"].objects) == 0


def test_a_dependency_on_an_unknown_task_is_refused_with_dependency_gone():
    b = Broker()
    out = submit(b, entry(5, deps=(4,)))
    assert [(o.msg.code, o.msg.ids) for o in out if isinstance(o.msg, P.Error)] == [(P.ErrorCode.DEPENDENCY_GONE, (5,))]
    assert not b.core._tasks


def test_values_over_the_object_quota_fail_the_dependents_with_a_clear_cause():
    from zpar_broker.limits import Limits

    b = Broker()
    b.core.limits = Limits(object_bytes=100)
    b.join(b"a")
    submit(b, entry(1), entry(2, deps=(1,)))
    (first,) = tasks_in(b.ready(b"a", 1))
    out = b.core.results(b.now, P.Result((P.ResultEntry(first.id, P.Status.OK, (b"x" * 1000,), 5),), b"a"))
    (failed,) = [r for o in out if isinstance(o.msg, P.Result) for r in o.msg.results if r.id == 2]
    assert failed.status is P.Status.DEP_FAILED and "--max-object-bytes" in failed.cause.detail


def test_a_dead_node_past_its_retries_fails_the_dependents_too():
    b = Broker()
    b.join(b"a")
    submit(b, P.TaskEntry(1, D, (b"args",), 0, 0), entry(2, deps=(1,)))
    tasks_in(b.ready(b"a", 1))
    out = b.agent(b"a", P.Bye())
    statuses = sorted((r.id, r.status) for o in out if isinstance(o.msg, P.Result) for r in o.msg.results)
    assert statuses == [(1, P.Status.LOST), (2, P.Status.DEP_FAILED)]


# ------------------------------------------------------------------ the producer's side


def test_the_producer_fails_a_dependent_with_its_dependencys_error_as_cause():
    broker = StubBroker()
    broker.welcome()
    dep = broker.submit(pow, 2, 3)
    task = broker.submit(abs, 1, deps=(dep,))
    first, second = broker.tasks()
    assert second.sched is not None and second.sched.deps == (first.id,)
    broker.raised(first.id, ValueError("no"))
    broker.ended(second.id, P.Status.DEP_FAILED, P.Cause("the broker", detail="task 1 failed"))
    with pytest.raises(errors.DependencyError) as info:
        task.result(timeout=5)
    assert isinstance(info.value.__cause__, ValueError) and info.value.task_id == first.id
    assert broker.released == 2


def test_the_producer_sends_the_values_itself_when_the_broker_no_longer_has_them():
    broker = StubBroker()
    broker.welcome()
    dep = broker.submit(pow, 2, 3)
    other = broker.submit(pow, 2, 3)
    task = broker.submit(abs, 1, deps=(dep, other))
    first, second, third = broker.tasks()
    broker.result(first.id, 8)
    broker.result(second.id, 8)
    broker.error(P.ErrorCode.DEPENDENCY_GONE, third.id)
    (again,) = broker.tasks()
    assert again.id == third.id and again.sched.deps == () and again.sched.values == 2
    assert again.refs[0] == again.refs[1]  # two equal values: one blob, named twice
    assert _refs.unpack(broker.funcs[again.refs[0]]) == 8
    assert not task.done()


def test_a_dependent_of_a_task_not_yet_admitted_waits_behind_it():
    broker = StubBroker()
    broker.welcome()
    dep = broker.submit(pow, 2, 3)
    broker.submit(abs, 1, deps=(dep,))
    first, second = broker.tasks()
    broker.error(P.ErrorCode.QUEUE_FULL, first.id)
    broker.error(P.ErrorCode.DEPENDENCY_GONE, second.id)
    assert broker.tasks() == []
    broker.advance(1.0)  # the held tasks go again, the dependency first
    assert [t.id for t in broker.tasks()] == [first.id, second.id]


def test_a_cancelled_dependency_fails_the_dependent_with_cancelled_error_as_cause():
    broker = StubBroker()
    broker.welcome()
    dep = broker.submit(pow, 2, 3)
    task = broker.submit(abs, 1, deps=(dep,))
    _first, second = broker.tasks()
    dep.cancel()
    broker.turn()
    broker.error(P.ErrorCode.DEPENDENCY_GONE, second.id)
    with pytest.raises(errors.DependencyError) as info:
        task.result(timeout=5)
    assert isinstance(info.value.__cause__, concurrent.futures.CancelledError)
