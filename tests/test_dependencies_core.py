"""Futures as arguments in the broker's and the producer's cores (fake clock, no sockets): a task that takes
other tasks' values waits for them, gets them as objects, or fails when one fails."""

from __future__ import annotations

import collections
import concurrent.futures

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from zpar import _refs, errors
from zpar import protocol as P
from zpar.testing.transport import StubBroker
from zpar_broker.records import TaskState

from .test_broker_core import BLOB, Broker, D, delivered
from .test_broker_core_properties import BrokerMachine

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
    b.finish(b"a", [first.id])
    (second,) = tasks_in(b.ready(b"a", 1))
    prod = b.core._producers[b"p"]
    assert len(prod.objects) == 1
    b.finish(b"a", [second.id])
    assert len(prod.objects) == 0, "dropped once the last task taking it ended"
    # A task naming it now is told to send the value itself.
    out = submit(b, entry(3, deps=(1,)))
    assert [(o.msg.code, o.msg.ids) for o in out if isinstance(o.msg, P.Error)] == [(P.ErrorCode.DEPENDENCY_GONE, (3,))]


def test_a_later_task_takes_a_value_still_kept():
    b = Broker()
    b.join(b"a")
    submit(b, entry(1), entry(2, deps=(1,)))
    (first,) = tasks_in(b.ready(b"a", 1))
    b.finish(b"a", [first.id])
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
    out = b.finish(b"a", [first.id], P.Status.LOST)
    out += b.advance(0)
    assert b.core._tasks[first.id].state is TaskState.QUEUED  # the first is queued again (a lost run retries)
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
    out = b.finish(b"a", [first.id])
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


# ------------------------------------------------------------------ the broker as a state machine, with deps

class DependenciesMachine(BrokerMachine):
    """The broker machine's random submits, credits, results, silences and goodbyes, where tasks also take
    earlier tasks' values and results may be errors: every task still ends once, in one place meanwhile, and
    no kept value outlives the tasks that take it."""

    def handle(self, out) -> None:
        plain = [o for o in out if not isinstance(o.msg, P.Result)]
        super().handle(plain)
        for o in out:
            if isinstance(o.msg, P.Result):
                for r in o.msg.results:
                    key = (o.peer, r.id)
                    self.delivered[key] += 1
                    assert self.delivered[key] == 1, f"result {key} delivered twice"
                    if r.status is P.Status.OK:
                        assert r.payload == (b"echo " + b"%s:%d" % key,), "result routed to the wrong task"
                    self.outstanding.discard(key)

    @rule(p=st.sampled_from([b"p1", b"p2"]), data=st.data())
    def submit_with_deps(self, p, data):
        tid = self.next_id[p] + 1
        self.next_id[p] += 1
        earlier = list(range(1, tid))
        deps = tuple(data.draw(st.lists(st.sampled_from(earlier), max_size=3))) if earlier else ()
        entry = P.TaskEntry(tid, D2, (b"%s:%d" % (p, tid),), 0, P.MAX_RETRIES,
                            sched=P.Sched(deps=deps) if deps else None)
        if p not in self.core._producers:
            self.core.producer_message(self.now, p, P.Hello(P.Role.PRODUCER))
        out = self.core.producer_message(self.now, p, P.Submit((entry,), (P.Function(D2, b"blob"),)))
        refused = any(isinstance(o.msg, P.Error) and tid in o.msg.ids for o in out)
        self.handle(out)
        if not refused:
            self.outstanding.add((p, tid))

    @rule(a=st.sampled_from([b"a1", b"a2", b"a3"]), data=st.data())
    def failures(self, a, data):
        """Results that are errors: their dependents end unrun."""
        choices = self.live_holdings(a)
        if not choices:
            return
        gids = data.draw(st.lists(st.sampled_from(choices), min_size=1, max_size=2, unique=True))
        entries = tuple(P.ResultEntry(g, P.Status.RAISED, (b"exc",), 1) for g in gids)
        self.handle(self.core.results(self.now, P.Result(entries, a)))

    @invariant()
    def every_task_is_in_exactly_one_place(self):
        core = self.core
        places = collections.Counter()
        for prod in core._producers.values():
            for queue in (prod.queue, *prod.shaped.values()):
                places.update(t.gid for t in queue if t.state is not TaskState.GONE)
        for agent in core._agents.values():
            places.update(t.gid for t in agent.assigned.values() if t.agent is agent)
        for t in core._tasks.values():
            if t.state is TaskState.WAITING:
                assert t.waiting > 0 and t.agent is None and t.gid not in places
                places[t.gid] += 1
        assert set(places) == set(core._tasks), "the table and the queues/assignments/waiting disagree"
        assert all(n == 1 for n in places.values()), "a task is in two places"

    @invariant()
    def status_adds_up(self):
        s = self.core.status(self.now)
        assert s["queued"] >= 0 and s["running"] >= 0 and s["waiting"] >= 0
        assert s["queued"] + s["running"] + s["waiting"] == len(self.core._tasks)
        assert s["waiting"] == sum(t.state is TaskState.WAITING for t in self.core._tasks.values())

    @invariant()
    def no_kept_value_outlives_the_tasks_that_take_it(self):
        for prod in self.core._producers.values():
            taken = set()
            for t in prod.tasks.values():
                taken.update(t.entry.refs)
                taken.update(t.values or ())
            assert set(prod.objects._blobs) <= taken, "a value no task takes is still kept"


D2 = P.digest(b"blob")
# Derandomized: the same search every run, so CI is deterministic.
DependenciesMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=60, deadline=None,
                                                 derandomize=True, database=None)
TestDependenciesStateMachine = DependenciesMachine.TestCase
