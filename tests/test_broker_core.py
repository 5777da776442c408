"""BrokerCore with a fake clock: no sockets, no sleeps; time is a float we move."""

from __future__ import annotations

import pytest

from zpar import protocol as P
from zpar_broker.core import BrokerCore, Dest
from zpar_broker.scheduling import PREFETCH_BYTES

BLOB = b"the function"
D = P.digest(BLOB)  # hops verify content addressing


class Broker:
    """A BrokerCore and the clock that drives it."""

    def __init__(self, heartbeat: float = 1.0, liveness: int = 3) -> None:
        self.now = 0.0
        self.core = BrokerCore(self.now, heartbeat=heartbeat, liveness=liveness, collector="tcp://127.0.0.1:9")

    def producer(self, peer: bytes, msg):
        """A producer's message; a producer not yet known says HELLO first, as clients do."""
        if peer not in self.core._producers and isinstance(msg, (P.Submit, P.Cancel, P.Heartbeat)):
            self.core.producer_message(self.now, peer, P.Hello(P.Role.PRODUCER))
        return self.core.producer_message(self.now, peer, msg)

    def agent(self, peer: bytes, msg):
        return self.core.agent_message(self.now, peer, msg)

    def submit(self, peer: bytes, ids, digest: bytes = D, ship: bool = True, retries: int = 3):
        entries = tuple(P.TaskEntry(i, digest, (b"%s:%d" % (peer, i),), 0, retries) for i in ids)
        return self.producer(peer, P.Submit(entries, (P.Function(digest, BLOB),) if ship else ()))

    def join(self, peer: bytes, workers: int = 1):
        return self.agent(peer, P.Hello(P.Role.AGENT, peer.decode(), "host", 1, workers))

    def ready(self, peer: bytes, n: int):
        return self.agent(peer, P.Ready(n))

    def finish(self, agent: bytes, gids, status=P.Status.OK):
        """Results from ``agent`` (a lost run's: its worker killed by SIGKILL); the broker's ACK to it is
        checked and left out of what is returned."""
        if status in P.VALUE_STATUSES:
            entries = tuple(P.ResultEntry(g, status, (b"result %d" % g,), 10) for g in gids)
        else:
            entries = tuple(P.ResultEntry(g, status, cause=P.Cause(agent.decode(), 99, None, 9)) for g in gids)
        out = self.core.results(self.now, P.Result(entries, agent))
        acks = [o for o in out if isinstance(o.msg, P.Ack)]
        assert [(o.peer, o.msg.ids) for o in acks] == [(agent, tuple(gids))], "every result is acknowledged"
        return [o for o in out if not isinstance(o.msg, P.Ack)]

    def advance(self, dt: float, alive=(), producers_alive: bool = True):
        """Move the clock; the agents in ``alive`` (and every producer, unless told) send a heartbeat first."""
        self.now += dt
        for peer in alive:
            self.agent(peer, P.Heartbeat())
        if producers_alive:
            for peer in list(self.core._producers):
                self.producer(peer, P.Heartbeat())
        return self.core.tick(self.now)


def data(payload) -> bytes:
    return b"".join(bytes(f) for f in payload)


def dispatched(out):
    """``[(agent, gid, payload)]`` in the TASKS messages of ``out``."""
    return [(o.peer, t.id, data(t.payload)) for o in out if isinstance(o.msg, P.Tasks) for t in o.msg.tasks]


def delivered(out):
    """``[(producer, task id, payload or cause)]`` in the RESULT messages of ``out``."""
    return [(o.peer, r.id, data(r.payload) if r.status in P.VALUE_STATUSES else r.cause)
            for o in out if isinstance(o.msg, P.Result) for r in o.msg.results]


@pytest.fixture
def b():
    return Broker()


def test_producer_and_agent_hello_get_welcome(b):
    (out,) = b.producer(b"p", P.Hello(P.Role.PRODUCER, "client", "host", 7))
    assert (out.dest, out.peer) == (Dest.FRONTEND, b"p")
    assert out.msg == P.Welcome(b.core.epoch, 1.0, 3, "tcp://127.0.0.1:9", 0)
    (out,) = b.join(b"a")
    assert (out.dest, out.peer, out.msg.kind) == (Dest.BACKEND, b"a", P.Kind.WELCOME)


def test_tasks_wait_for_credit_then_go_with_their_function(b):
    assert dispatched(b.submit(b"p", [1, 2, 3])) == []
    b.join(b"a")
    (out,) = b.ready(b"a", 2)
    assert out.msg.funcs == (P.Function(D, BLOB),)
    assert [t.payload for t in out.msg.tasks] == [(b"p:1",), (b"p:2",)]
    assert len({t.id for t in out.msg.tasks}) == 2


def test_function_blob_is_shipped_once_per_agent(b):
    b.submit(b"p", range(1, 7))
    b.join(b"a1"), b.join(b"a2")
    first, second = b.ready(b"a1", 2), b.ready(b"a1", 2)
    assert first[0].msg.funcs == (P.Function(D, BLOB),) and second[0].msg.funcs == ()
    assert len(P.encode(second[0].msg)) == 1  # the tasks' payloads ride inline: no frame at all
    (other,) = b.ready(b"a2", 2)
    assert other.msg.funcs == (P.Function(D, BLOB),)


def test_payload_frames_are_forwarded_untouched(b):
    blob, payload = bytearray(BLOB), (bytearray(b"args"), memoryview(b"buffer"))  # as a socket gave them
    b.producer(b"p", P.Submit((P.TaskEntry(1, D, payload),), (P.Function(D, blob),)))
    b.join(b"a")
    (out,) = b.ready(b"a", 1)
    (task,) = out.msg.tasks
    assert task.payload is payload and out.msg.funcs[0].blob is blob  # the very frames: no copy
    assert P.encode(out.msg)[1:] == [BLOB, b"args", b"buffer"]


def test_an_agent_never_gets_more_tasks_than_its_credits(b):
    b.submit(b"p", range(1, 11))
    b.join(b"a")
    assert len(dispatched(b.ready(b"a", 3))) == 3
    assert len(dispatched(b.ready(b"a", 4))) == 4
    status = b.core.status(b.now)
    assert (status["queued"], status["running"], status["nodes"][0]["credits"]) == (3, 7, 0)
    assert len(dispatched(b.ready(b"a", 10))) == 3
    assert b.core.status(b.now)["nodes"][0]["credits"] == 7


def test_second_producer_is_served_before_the_first_ones_backlog_ends(b):
    b.submit(b"big", range(1, 101))
    b.submit(b"small", range(1, 6))
    b.join(b"a")
    order = [payload.split(b":")[0] for _ in range(10) for _, _, payload in dispatched(b.ready(b"a", 1))]
    assert order.count(b"small") == 5, order
    both = dispatched(b.ready(b"a", 4))
    assert [p.split(b":")[0] for _, _, p in both] == [b"big"] * 4  # small is done: big has it all


def test_batches_are_shared_between_producers(b):
    b.submit(b"p1", range(1, 51))
    b.submit(b"p2", range(1, 51))
    b.join(b"a")
    first = [p.split(b":")[0] for _, _, p in dispatched(b.ready(b"a", 10))]
    assert set(first) == {b"p1", b"p2"}
    both = first + [p.split(b":")[0] for _, _, p in dispatched(b.ready(b"a", 10))]
    assert both.count(b"p1") == both.count(b"p2") == 10


def test_one_batch_is_split_evenly_between_producers(b):
    b.submit(b"p1", range(1, 51))
    b.submit(b"p2", range(1, 51))
    b.join(b"a")
    owners = [p.split(b":")[0] for _, _, p in dispatched(b.ready(b"a", 10))]
    assert owners.count(b"p1") == owners.count(b"p2") == 5


def test_results_reach_their_own_producer_under_its_own_task_ids(b):
    b.submit(b"p1", [1, 2])
    b.submit(b"p2", [1, 2])  # the same ids: the broker's own ids keep them apart
    b.join(b"a")
    sent = dispatched(b.ready(b"a", 4))
    gid_of = {payload: gid for _, gid, payload in sent}
    out = b.finish(b"a", [gid_of[b"p2:1"], gid_of[b"p1:2"], gid_of[b"p2:2"]])
    got = sorted((peer, tid, data) for peer, tid, data in delivered(out))
    assert got == [(b"p1", 2, b"result %d" % gid_of[b"p1:2"]),
                   (b"p2", 1, b"result %d" % gid_of[b"p2:1"]),
                   (b"p2", 2, b"result %d" % gid_of[b"p2:2"])]
    assert all(o.dest is Dest.FRONTEND for o in out)
    assert b.core.status(b.now)["done"] == 3


def test_a_duplicate_result_is_dropped(b):
    b.submit(b"p", [1])
    b.join(b"a")
    ((_, gid, _),) = dispatched(b.ready(b"a", 1))
    assert len(delivered(b.finish(b"a", [gid]))) == 1
    assert b.finish(b"a", [gid]) == []
    assert b.core.counters["late_results"] == 1 and b.core.status(b.now)["done"] == 1


def test_an_agent_silent_past_liveness_is_dropped_and_its_tasks_go_to_another(b):
    b.submit(b"p", [1, 2])
    b.join(b"a1"), b.join(b"a2")
    first = dispatched(b.ready(b"a1", 2))
    assert dispatched(b.ready(b"a2", 2)) == []
    for _ in range(3):  # heartbeat 1 s x liveness 3: silent for 3 s is still alive
        assert dispatched(b.advance(1.0, alive=[b"a2"])) == []
    assert b.core.status(b.now)["nodes"][0]["name"] == "a1"
    again = dispatched(b.advance(1.0, alive=[b"a2"]))
    assert sorted(g for _, g, _ in again) == sorted(g for _, g, _ in first)
    assert {peer for peer, _, _ in again} == {b"a2"}
    assert [n["name"] for n in b.core.status(b.now)["nodes"]] == ["a2"]
    assert b.core.counters["agents_silent"] == 1 and b.core.counters["requeued"] == 2


def test_heartbeats_keep_an_agent_alive(b):
    b.join(b"a")
    for _ in range(20):
        out = b.advance(1.0, alive=[b"a"])
        assert [(o.peer, o.msg) for o in out] == [(b"a", P.Heartbeat())]
    assert b.core.counters["agents_silent"] == 0


def test_the_dropped_agent_is_told_to_say_hello_again(b):
    b.join(b"a")
    b.advance(10.0)
    b.advance(1.0)
    (out,) = b.ready(b"a", 1)
    assert out.msg == P.Error(P.ErrorCode.UNKNOWN_PEER)


def test_late_result_from_a_dropped_agent_is_delivered_once_and_not_run_again(b):
    b.submit(b"p", [1])
    b.join(b"a1"), b.join(b"a2")
    ((_, gid, _),) = dispatched(b.ready(b"a1", 1))
    for _ in range(5):
        b.advance(1.0, alive=[b"a2"])  # a1 is dropped; the task is queued again
    assert len(delivered(b.finish(b"a1", [gid]))) == 1  # a1 was only slow: its result counts
    assert dispatched(b.ready(b"a2", 1)) == []  # nothing is left to do
    status = b.core.status(b.now)
    assert (status["queued"], status["running"]) == (0, 0)


def test_only_an_agent_the_task_was_given_to_may_end_it(b):
    b.submit(b"p", [1])
    b.join(b"a1"), b.join(b"a2")
    ((_, gid, _),) = dispatched(b.ready(b"a1", 1))
    # a2 (admitted, but never given the task) forges its result; an empty agent field fares no better.
    for forger in (b"a2", b""):
        entry = P.ResultEntry(gid, P.Status.OK, (b"forged",), 1)
        out = b.core.results(b.now, P.Result((entry,), forger))
        assert delivered(out) == []
    assert b.core.counters["results_not_from_holder"] == 2
    assert delivered(b.finish(b"a1", [gid])) == [(b"p", 1, b"result %d" % gid)]


def test_idle_workers_are_filled_before_any_node_prefetches(b):
    # a1 ran tiny tasks and asks for many credits, a2 for few: with one idle worker each,
    # two long tasks (channel tasks waiting for their producer, say) go one to each node,
    # never both to a1 where the second would wait behind the first while a2 idles.
    b.join(b"a1"), b.join(b"a2")
    b.ready(b"a1", 2000), b.ready(b"a2", 2)
    out = b.submit(b"p", [1, 2])
    assert sorted(peer for peer, _, _ in dispatched(out)) == [b"a1", b"a2"]
    # Past the idle workers, the rest is prefetched within each node's credits: a2 asked for
    # one task ahead, a1 takes the rest.
    out = b.submit(b"p", list(range(3, 103)))
    per_agent = [peer for peer, _, _ in dispatched(out)]
    assert per_agent.count(b"a1") == 99 and per_agent.count(b"a2") == 1


def test_a_node_gets_large_arguments_past_its_idle_workers_only_up_to_a_bound_of_bytes(b):
    # One producer's 1 MiB arguments, a node that asked for many credits: the broker (and the node)
    # hold what its workers run plus PREFETCH_BYTES, not the whole queue; the rest follows results.
    big = 1 << 20
    b.join(b"a1", workers=2)
    b.ready(b"a1", 1000)
    entries = tuple(P.TaskEntry(i, D, (bytes([i % 256]) * big,)) for i in range(100))
    sent = dispatched(b.producer(b"p", P.Submit(entries, (P.Function(D, BLOB),))))
    held = len(sent)
    assert PREFETCH_BYTES // big <= held <= PREFETCH_BYTES // big + 2
    assert b.core._agents[b"a1"].held_bytes == held * big
    more = dispatched(b.finish(b"a1", [gid for _, gid, _ in sent[:4]]))
    assert len(more) == 4  # each result makes room for one more


def test_an_idle_worker_gets_a_task_however_many_bytes_its_node_holds(b):
    b.join(b"a1", workers=3)
    b.ready(b"a1", 10)
    sizes = [PREFETCH_BYTES, 10, 10, 10]
    entries = tuple(P.TaskEntry(i, D, (b"x" * n,)) for i, n in enumerate(sizes))
    sent = dispatched(b.producer(b"p", P.Submit(entries, (P.Function(D, BLOB),))))
    assert [len(d) for _, _, d in sent] == sizes[:3]  # one per worker, none prefetched


def test_agent_bye_puts_its_tasks_back_at_the_front(b):
    b.submit(b"p", [1, 2, 3])
    b.join(b"a1"), b.join(b"a2")
    assert [d for _, _, d in dispatched(b.ready(b"a1", 2))] == [b"p:1", b"p:2"]
    b.ready(b"a2", 0)
    assert dispatched(b.agent(b"a1", P.Bye(P.ByeReason.LEAVING))) == []
    assert [d for _, _, d in dispatched(b.ready(b"a2", 3))] == [b"p:1", b"p:2", b"p:3"]
    assert b.core.counters["agents_left"] == 1


def test_agent_bye_hands_its_tasks_at_once_to_an_agent_with_credit(b):
    b.submit(b"p", [1])
    b.join(b"a1"), b.join(b"a2")
    b.ready(b"a1", 1)
    b.ready(b"a2", 1)
    assert [(peer, d) for peer, _, d in dispatched(b.agent(b"a1", P.Bye()))] == [(b"a2", b"p:1")]


def test_tasks_an_agent_gives_back_go_first_to_the_next_free_worker_and_its_credits_with_them(b):
    # a1's one worker runs a call that waits for its own nested tasks; one was prefetched to a1.
    b.join(b"a1"), b.join(b"a2")
    b.ready(b"a1", 3)
    sent = dispatched(b.submit(b"p", [1, 2, 3]))
    assert [d for _, _, d in sent] == [b"p:1", b"p:2", b"p:3"]
    gids = [gid for _, gid, _ in sent]
    assert dispatched(b.agent(b"a1", P.GiveBack(tuple(gids[1:])))) == []  # nobody has credits yet
    assert b.core._agents[b"a1"].credits == 0 and b.core.counters["given_back"] == 2
    assert dispatched(b.submit(b"p", [4])) == []  # a1 asks again only when a worker of its is free
    assert [(peer, d) for peer, _, d in dispatched(b.ready(b"a2", 3))] == [(b"a2", b"p:2"), (b"a2", b"p:3"),
                                                                            (b"a2", b"p:4")]
    assert delivered(b.finish(b"a2", gids[1:])) == [(b"p", 2, b"result %d" % gids[1]),
                                                     (b"p", 3, b"result %d" % gids[2])]


def test_an_agent_cannot_give_back_tasks_it_does_not_hold_nor_channel_tasks(b):
    b.join(b"a1"), b.join(b"a2")
    b.ready(b"a1", 1), b.ready(b"a2", 1)
    entries = (P.TaskEntry(1, D, (b"x",), P.FLAG_CHANNEL), P.TaskEntry(2, D, (b"y",)))
    holders = {t.id: peer for peer, t in [(o.peer, t) for o in b.producer(b"p", P.Submit(entries, (
        P.Function(D, BLOB),))) if isinstance(o.msg, P.Tasks) for t in o.msg.tasks]}
    (channel_gid, channel_agent), (other_gid, other_agent) = sorted(holders.items())
    assert channel_agent != other_agent
    b.agent(channel_agent, P.GiveBack((channel_gid, other_gid, 999)))
    assert b.core.counters["given_back"] == 0
    assert channel_gid in b.core._agents[channel_agent].assigned
    assert other_gid in b.core._agents[other_agent].assigned


def test_cancel_drops_a_queued_task_and_leaves_a_running_one(b):
    b.submit(b"p", [1, 2, 3])
    b.join(b"a")
    ((_, running, _),) = dispatched(b.ready(b"a", 1))
    assert b.producer(b"p", P.Cancel((1, 2))) == []
    assert b.core.counters["cancelled"] == 1
    assert [d for _, _, d in dispatched(b.ready(b"a", 5))] == [b"p:3"]
    assert delivered(b.finish(b"a", [running])) == [(b"p", 1, b"result %d" % running)]


def test_producer_bye_forgets_its_queued_and_running_tasks(b):
    b.submit(b"p", range(1, 6))
    b.submit(b"other", [1])
    b.join(b"a")
    sent = {d: g for _, g, d in dispatched(b.ready(b"a", 2))}
    assert set(sent) == {b"p:1", b"other:1"}  # one each: round-robin
    b.producer(b"p", P.Bye())
    status = b.core.status(b.now)
    assert (status["producers"], status["queued"], status["running"]) == (1, 0, 1)
    assert b.finish(b"a", [sent[b"p:1"]]) == [] and b.core.counters["late_results"] == 1
    assert dispatched(b.ready(b"a", 10)) == []
    assert delivered(b.finish(b"a", [sent[b"other:1"]])) == [(b"other", 1, b"result %d" % sent[b"other:1"])]


def test_status_counts_nodes_workers_queue_and_outcomes(b):
    b.producer(b"p", P.Hello(P.Role.PRODUCER))
    b.submit(b"p", range(1, 6))
    b.join(b"a1", workers=2), b.join(b"a2", workers=3)
    b.agent(b"a1", P.Heartbeat(busy=2))
    sent = dispatched(b.ready(b"a1", 3))
    b.finish(b"a1", [sent[0][1]])
    b.finish(b"a1", [sent[1][1]], status=P.Status.RAISED)
    s = b.core.status(b.now)
    assert (s["workers"], s["busy"], s["producers"]) == (5, 2, 1)
    assert (s["queued"], s["running"], s["done"], s["failed"]) == (2, 1, 1, 1)
    a1 = next(n for n in s["nodes"] if n["name"] == "a1")
    assert (a1["busy"], a1["idle"], a1["running"], a1["workers"]) == (2, 0, 1, 2)
    assert s["counters"]["submitted"] == 5


def test_a_status_request_is_answered_without_registering_a_producer(b):
    (out,) = b.producer(b"tool", P.StatusMsg())
    assert isinstance(out.msg, P.StatusMsg) and out.msg.info["producers"] == 0


def test_tasks_of_an_unknown_function_are_refused_by_id(b):
    out = b.submit(b"p", [1, 2], digest=b"\x02" * 16, ship=False)
    assert [o.msg for o in out] == [P.Error(P.ErrorCode.UNKNOWN_FUNCTION, (1, 2))]
    assert b.core.status(b.now)["queued"] == 0


def test_a_message_of_the_wrong_role_is_refused_and_counted(b):
    b.producer(b"p", P.Hello(P.Role.PRODUCER))
    (out,) = b.producer(b"p", P.Ready(5))
    assert isinstance(out.msg, P.Error) and out.msg.code is P.ErrorCode.NOT_ALLOWED
    b.join(b"a")
    (out,) = b.agent(b"a", P.Submit(()))
    assert isinstance(out.msg, P.Error) and out.msg.code is P.ErrorCode.NOT_ALLOWED
    assert b.core.counters["protocol_errors"] == 2


def test_cancel_then_resubmit_keeps_round_robin_fair(b):
    b.submit(b"p1", [1])
    b.producer(b"p1", P.Cancel((1,)))
    b.submit(b"p1", range(2, 20))
    b.submit(b"p2", range(1, 20))
    b.join(b"a")
    owners = [d.split(b":")[0] for _ in range(12) for _, _, d in dispatched(b.ready(b"a", 1))]
    assert owners.count(b"p1") == owners.count(b"p2") == 6, owners


# ---------------------------------------------------------------------- retries, liveness, restarts


def test_a_lost_run_is_queued_again_until_its_retries_are_used(b):
    b.submit(b"p", [1], retries=2)
    b.join(b"a")
    for attempt in range(3):
        (gid,) = [g for _, g, _ in dispatched(b.ready(b"a", 1))]
        out = b.finish(b"a", [gid], status=P.Status.LOST)
        if attempt < 2:
            assert delivered(out) == [] and b.core.counters["retried"] == attempt + 1
    ((peer, tid, cause),) = delivered(out)
    assert (peer, tid) == (b"p", 1) and cause.attempts == 3
    assert (cause.node, cause.pid, cause.signal, cause.exitcode) == ("a", 99, 9, None)  # how the last run ended


def test_a_dead_agent_fails_tasks_that_have_no_retries_left(b):
    b.submit(b"p", [1], retries=0)
    b.submit(b"p", [2], retries=1)
    b.join(b"a")
    b.ready(b"a", 2)
    out = b.advance(4.0)  # the agent went silent
    ((peer, tid, cause),) = delivered(out)
    assert (peer, tid) == (b"p", 1) and cause.attempts == 1
    assert cause.node == "a" and "went silent" in cause.detail and (cause.signal, cause.exitcode) == (None, None)
    assert b.core.status(b.now)["queued"] == 1


def test_a_loss_reported_by_an_agent_that_no_longer_holds_the_task_is_ignored(b):
    b.submit(b"p", [1])
    b.join(b"a1")
    (gid,) = [g for _, g, _ in dispatched(b.ready(b"a1", 1))]
    b.advance(4.0)  # a1 dropped, the task queued again
    b.join(b"a2")
    b.ready(b"a2", 1)
    assert delivered(b.finish(b"a1", [gid], status=P.Status.LOST)) == []
    assert b.core.counters["retried"] == 1 and b.core.counters["stale_loss_reports"] == 1


def test_a_task_sent_again_is_deduplicated(b):
    b.submit(b"p", [1, 2])
    b.submit(b"p", [1, 2, 3])
    assert b.core.status(b.now)["queued"] == 3 and b.core.counters["duplicate_submits"] == 2


def test_a_forced_cancel_tells_the_agent_running_the_task(b):
    b.submit(b"p", [1, 2])
    b.join(b"a")
    b.ready(b"a", 1)
    out = b.producer(b"p", P.Cancel((1, 2), force=True))
    (stop,) = [o for o in out if isinstance(o.msg, P.Cancel)]
    assert stop.peer == b"a" and stop.msg.force and len(stop.msg.ids) == 1
    assert b.core.status(b.now)["queued"] == 0 and b.core.status(b.now)["running"] == 0


def test_a_silent_producer_is_forgotten_and_its_running_tasks_stopped(b):
    b.submit(b"p", [1, 2, 3])
    b.join(b"a")
    b.ready(b"a", 1)
    assert b.core.status(b.now)["producers"] == 1
    out = b.advance(4.0, alive=[b"a"], producers_alive=False)  # producers get twice the agents' 3 s
    assert b.core.status(b.now)["producers"] == 1
    out = b.advance(3.0, alive=[b"a"], producers_alive=False)
    assert [o.peer for o in out if isinstance(o.msg, P.Cancel)] == [b"a"]
    assert b.core.status(b.now)["producers"] == 0 and b.core.counters["producers_silent"] == 1
    (err,) = b.core.producer_message(b.now, b"p", P.Heartbeat())
    assert err.msg == P.Error(P.ErrorCode.UNKNOWN_PEER)


def test_a_heartbeat_from_a_producer_is_answered(b):
    out = b.producer(b"p", P.Heartbeat())
    assert [o.msg for o in out] == [P.Heartbeat()]


def test_results_from_a_previous_broker_epoch_are_dropped(b):
    b.submit(b"p", [1])
    b.join(b"a")
    (gid,) = [g for _, g, _ in dispatched(b.ready(b"a", 1))]
    stale = P.Result((P.ResultEntry(gid, P.Status.OK, (b"old",), 1),), b"a", "some-older-epoch")
    assert [o.msg for o in b.core.results(b.now, stale)] == [P.Ack((gid,))]  # acknowledged, not delivered
    fresh = P.Result((P.ResultEntry(gid, P.Status.OK, (b"new",), 1),), b"a", b.core.epoch)
    assert delivered(b.core.results(b.now, fresh)) == [(b"p", 1, b"new")]


def test_a_hello_again_from_a_registered_agent_keeps_its_tasks(b):
    b.submit(b"p", [1, 2])
    b.join(b"a")
    b.ready(b"a", 2)
    (out,) = b.join(b"a")  # a HELLO queued while it thought we were gone
    assert out.msg.kind is P.Kind.WELCOME
    assert b.core.status(b.now)["running"] == 2 and b.core.counters["requeued"] == 0
    assert b.core._agents[b"a"].credits == 0


def test_no_one_is_declared_dead_while_messages_wait_unread(b):
    b.join(b"a")
    b.producer(b"p", P.Hello(P.Role.PRODUCER))
    b.now += 10.0
    b.core.tick(b.now, judge=False)
    assert b.core.status(b.now)["nodes"] and b.core.status(b.now)["producers"] == 1


def test_nodes_busy_with_tiny_tasks_get_their_prefetch_in_batches_not_a_task_each(b):
    # Ten nodes that asked for many credits (they measured tiny tasks) share a backlog evenly;
    # a trickle of new tasks then waits at the broker until a node is a quarter short of its
    # share, and goes to it in one TASKS message: with a hundred nodes, a task or two to each
    # would cost the broker a message a task.
    nodes = [b"a%d" % i for i in range(10)]
    for node in nodes:
        b.join(node)
        b.ready(node, 1000)
    first = dispatched(b.submit(b"p", range(1000)))
    assert sorted({peer: sum(1 for p, _, _ in first if p == peer) for peer in nodes}.values()) == [100] * 10
    assert dispatched(b.submit(b"p", range(1000, 1010))) == []  # every node is near its share
    held = [gid for peer, gid, _ in first if peer == b"a3"]
    assert dispatched(b.finish(b"a3", held[:40])) == []
    out = b.submit(b"p", range(1010, 1040))
    tasks = [o for o in out if isinstance(o.msg, P.Tasks)]
    assert [(o.peer, len(o.msg.tasks)) for o in tasks] == [(b"a3", 40)]  # the 40 queued, in one message


def test_a_coalescing_core_sends_a_turns_results_and_tasks_once_at_flush():
    core = BrokerCore(0.0, collector="tcp://127.0.0.1:9", coalesce=True)
    core.producer_message(0.0, b"p", P.Hello(P.Role.PRODUCER))
    for node in (b"a1", b"a2"):
        core.agent_message(0.0, node, P.Hello(P.Role.AGENT, node.decode(), "host", 1, 2))
        assert core.agent_message(0.0, node, P.Ready(10)) == []  # nothing queued yet
    entries = tuple(P.TaskEntry(i, D, (b"%d" % i,)) for i in range(8))
    assert not [o for o in core.producer_message(0.0, b"p", P.Submit(entries, (P.Function(D, BLOB),)))
                if isinstance(o.msg, P.Tasks)]
    out = core.flush()
    sent = dispatched(out)
    assert len(sent) == 8 and {peer for peer, _, _ in sent} == {b"a1", b"a2"}
    assert len([o for o in out if isinstance(o.msg, P.Tasks)]) == 2  # one TASKS per node
    # Results from four collector messages in one turn: one ACK per node, one RESULT for the producer.
    for peer, gid, _ in sent[:4]:
        assert core.results(0.0, P.Result((P.ResultEntry(gid, P.Status.OK, (b"r",), 1),), peer)) == []
    out = core.flush()
    acks = sorted((o.peer, sorted(o.msg.ids)) for o in out if isinstance(o.msg, P.Ack))
    by_node: dict[bytes, list[int]] = {}
    for peer, gid, _ in sent[:4]:
        by_node.setdefault(peer, []).append(gid)
    assert acks == sorted((peer, sorted(gids)) for peer, gids in by_node.items())
    results = [o for o in out if isinstance(o.msg, P.Result)]
    assert len(results) == 1 and results[0].peer == b"p" and len(results[0].msg.results) == 4
    assert core.flush() == []
