"""AgentCore's rules in time, with a fake clock: no processes, no sockets, no sleeps.

Heartbeats and HELLO again, drain, SIGTERM then SIGKILL, respawn back-off,
results sent again until acknowledged, a restarted broker, the memory limit.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from zpar import protocol as P
from zpar.agent.actions import Action, Exit, Kill, Measure, Probe, Spawn, ToWorker
from zpar.agent.core import AgentCore, Settings
from zpar.agent.lifecycle import KILL_GRACE, MEMORY_CHECK_S, SHUTDOWN_GRACE
from zpar.agent.prefetch import RETURN_AFTER

BLOB = b"the function"
D = P.digest(BLOB)  # hops verify content addressing
MIB = 1024 * 1024


class Agent:
    """An AgentCore, the clock that drives it, and the actions it returned."""

    def __init__(self, workers: int = 1, **settings: Any) -> None:
        self.now = 0.0
        self.core = AgentCore(Settings("node-1", b"agent-1", "host", 4242, workers=workers, **settings), self.now)
        self.started = self.core.start(self.now)

    def at(self, when: float) -> list[Action]:
        """Move the clock to ``when`` and fire the timers."""
        self.now = when
        return self.core.tick(self.now)

    def broker(self, msg: P.Message) -> list[Action]:
        return self.core.from_broker(self.now, msg)

    def welcome(self, epoch: str = "epoch-1", heartbeat: float = 1.0) -> list[Action]:
        return self.broker(P.Welcome(epoch, heartbeat, 3, "tcp://127.0.0.1:9"))

    def ready(self, identity: bytes = b"w1", pid: int = 101) -> list[Action]:
        return self.core.from_worker(self.now, identity, P.Hello(P.Role.WORKER, pid=pid))

    def tasks(self, *ids: int, timeout_ms: int = 0, flags: int = 0) -> list[Action]:
        entries = tuple(P.TaskEntry(i, D, (b"args %d" % i,), flags, 0, timeout_ms) for i in ids)
        return self.broker(P.Tasks(entries, (P.Function(D, BLOB),)))

    def finish(self, identity: bytes, *ids: int) -> list[Action]:
        entries = tuple(P.ResultEntry(i, P.Status.OK, (b"result %d" % i,), 5000) for i in ids)
        return self.core.from_worker(self.now, identity, P.Result(entries))

    def exited(self, identity: bytes, code: int = -9, pid: int = 101) -> list[Action]:
        return self.core.worker_exited(self.now, identity, pid, code)

    def flush(self) -> list[Action]:
        """What the shell sends after a turn of its loop: every run the collector takes, then credits."""
        out: list[Action] = []
        while (run := self.core.next_run(self.now)) is not None:
            out.append(run)
        return out + self.core.credits(self.now)


def of(kind: type, actions: list[Action]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def sent_ids(actions: list[Action]) -> list[int]:
    """The task ids of the RESULT messages in ``actions``."""
    return [e.id for r in of(P.Result, actions) for e in r.results]


def kills(actions: list[Action]) -> list[tuple[bytes, int]]:
    return [(k.identity, k.signum) for k in of(Kill, actions)]


@pytest.fixture
def agent() -> Agent:
    a = Agent()
    a.welcome()
    a.ready()
    return a


# ---------------------------------------------------------------------- start


def test_start_spawns_every_worker_then_says_hello_with_their_number():
    a = Agent(workers=3)
    assert a.started[:3] == [Spawn(b"w1"), Spawn(b"w2"), Spawn(b"w3")]
    assert a.started[3] == P.Hello(P.Role.AGENT, "node-1", "host", 4242, 3)


# ---------------------------------------------------------------------- heartbeats, liveness


def test_a_heartbeat_goes_at_once_then_every_interval_with_a_probe():
    a = Agent()
    first = a.at(0.0)
    assert of(P.Heartbeat, first) == [P.Heartbeat(0)] and of(Probe, first) == [Probe()]
    assert a.at(0.5) == []
    assert a.core.next_deadline() == 1.0
    assert of(P.Heartbeat, a.at(1.0)) == [P.Heartbeat(0)]
    assert a.at(1.5) == []


def test_the_heartbeat_counts_busy_workers(agent):
    agent.tasks(1)
    assert of(P.Heartbeat, agent.at(0.0)) == [P.Heartbeat(1)]


def test_the_brokers_pace_wins_and_brings_the_next_beat_forward():
    a = Agent(heartbeat=5.0)
    a.at(0.0)
    assert a.core.next_deadline() == 5.0
    a.welcome(heartbeat=0.2)
    assert a.core.next_deadline() == pytest.approx(0.2)
    assert of(P.Heartbeat, a.at(0.2)) and a.core.next_deadline() == pytest.approx(0.4)


def test_a_silent_broker_gets_hello_again_once_per_liveness_window():
    a = Agent()
    a.welcome()
    for t in (1.0, 2.0, 3.0):
        assert of(P.Hello, a.at(t)) == []
    again = a.at(4.0)  # silent for more than 3 x 1 s
    assert of(P.Hello, again) == [P.Hello(P.Role.AGENT, "node-1", "host", 4242, 1)]
    for t in (5.0, 6.0, 7.0):  # the next HELLO waits for another silent window
        assert of(P.Hello, a.at(t)) == []
    assert of(P.Hello, a.at(8.0))


def test_any_message_from_the_broker_keeps_it_alive():
    a = Agent()
    a.welcome()
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        assert of(P.Hello, a.at(t)) == []
        a.broker(P.Heartbeat())


def test_no_credit_is_asked_until_the_broker_welcomes_us_again():
    a = Agent()
    a.ready()
    assert of(P.Ready, a.flush()) == []  # not welcomed yet
    a.welcome()
    (ready,) = of(P.Ready, a.flush())
    assert ready.credits > 0
    a.broker(P.Error(P.ErrorCode.UNKNOWN_PEER))  # it forgot us: HELLO, and credits asked afresh
    assert of(P.Ready, a.flush()) == []
    a.welcome()
    assert of(P.Ready, a.flush()) == [ready]


def test_the_broker_refusing_our_key_or_our_parent_dying_stops_the_agent():
    a = Agent(parent_pid=77)
    assert a.core.probed(a.now, None, 77) == []
    assert a.core.probed(a.now, "the broker refused our key", 77) == [Exit(1)]
    assert a.core.probed(a.now, None, 1) == [Exit(0)]
    assert Agent().core.probed(0.0, None, 1) == []  # no parent to watch
    assert a.broker(P.Bye(P.ByeReason.KEY_REVOKED)) == [Exit(1)]


# ---------------------------------------------------------------------- drain


def test_a_drain_with_nothing_held_stops_at_once():
    a = Agent()
    assert a.core.signalled(a.now) == [Exit(0)]


def test_a_drain_takes_no_work_and_stops_when_the_last_task_is_done(agent):
    agent.tasks(1)
    agent.flush()
    assert agent.core.signalled(agent.now) == []
    assert of(P.Ready, agent.flush()) == []  # no credits while draining
    assert of(Exit, agent.at(5.0)) == []
    agent.finish(b"w1", 1)
    assert sent_ids(agent.flush()) == [1]  # its result goes before we stop
    assert of(Exit, agent.at(5.0)) == [Exit(0)]


def test_a_drain_ends_when_its_grace_is_spent():
    a = Agent(grace=10.0)
    a.welcome()
    a.ready()
    a.tasks(1)
    a.at(0.0)
    a.core.signalled(a.now)
    assert a.core.next_deadline() <= 10.0
    assert of(Exit, a.at(9.9)) == []
    assert of(Exit, a.at(10.0)) == [Exit(0)]


def test_a_second_signal_or_no_grace_stops_now(agent):
    agent.tasks(1)
    assert agent.core.signalled(agent.now) == []
    assert agent.core.signalled(agent.now) == [Exit(0)]
    impatient = Agent(grace=0.0)
    impatient.ready()
    impatient.tasks(1)
    assert impatient.core.signalled(0.0) == [Exit(0)]


# ---------------------------------------------------------------------- SIGTERM, then SIGKILL


def test_a_task_past_its_timeout_gets_sigterm_then_sigkill_after_the_grace(agent):
    agent.tasks(1, timeout_ms=2000)
    assert agent.core.next_deadline() <= 2.0
    assert kills(agent.at(1.9)) == []
    assert kills(agent.at(2.0)) == [(b"w1", signal.SIGTERM)]
    assert kills(agent.at(2.0 + KILL_GRACE / 2)) == []
    assert agent.core.next_deadline() <= 2.0 + KILL_GRACE
    assert kills(agent.at(2.0 + KILL_GRACE)) == [(b"w1", signal.SIGKILL)]
    assert kills(agent.at(10.0)) == []  # once
    agent.exited(b"w1", -9)
    (result,) = of(P.Result, agent.flush())
    assert [(e.id, e.status) for e in result.results] == [(1, P.Status.TIMEOUT)]


def test_a_worker_that_exits_after_sigterm_gets_no_sigkill(agent):
    agent.tasks(1)
    assert kills(agent.broker(P.Cancel((1,), force=True))) == [(b"w1", signal.SIGTERM)]
    assert of(Spawn, agent.exited(b"w1", -15)) == [Spawn(b"w2")]
    assert kills(agent.at(KILL_GRACE + 1)) == []
    (result,) = of(P.Result, agent.flush())
    assert [(e.id, e.status) for e in result.results] == [(1, P.Status.CANCELLED)]


def test_shutdown_says_bye_stops_every_worker_and_kills_those_left_after_its_grace():
    a = Agent(workers=2)
    a.welcome()
    a.ready(b"w1")
    out = a.core.shutdown(a.now)
    assert out[0] == P.Bye(P.ByeReason.LEAVING)
    assert kills(out) == [(b"w1", signal.SIGTERM), (b"w2", signal.SIGTERM)]
    assert a.exited(b"w1", -15) == []  # no new worker while stopping
    assert a.core.next_deadline() == SHUTDOWN_GRACE
    assert a.at(SHUTDOWN_GRACE - 0.1) == []  # no heartbeat, no HELLO: only the kills are left
    assert kills(a.at(SHUTDOWN_GRACE)) == [(b"w2", signal.SIGKILL)]
    assert of(P.Ready, a.flush()) == []


# ---------------------------------------------------------------------- respawn


def test_a_ready_worker_that_dies_is_replaced_at_once(agent):
    assert agent.exited(b"w1", -9) == [Spawn(b"w2")]


def test_workers_dying_before_ready_come_back_after_a_doubling_delay_reset_by_a_ready_one():
    a = Agent(heartbeat=100.0)
    a.at(0.0)
    t = 0.0
    for n, delay in enumerate([0.1, 0.2, 0.4, 0.8], start=1):
        assert a.exited(b"w%d" % n, 1) == []  # not at once: it would spin
        assert a.core.next_deadline() == pytest.approx(t + delay)
        assert of(Spawn, a.at(t + delay * 0.9)) == []
        t += delay
        assert of(Spawn, a.at(t)) == [Spawn(b"w%d" % (n + 1))]
    a.ready(b"w5")  # a worker started: earlier failures are forgotten
    a.exited(b"w5", -9)  # ... and a ready one is replaced at once
    a.exited(b"w6", 1)
    assert a.core.next_deadline() == pytest.approx(t + 0.1)


def test_the_respawn_delay_stops_doubling_at_ten_seconds():
    a = Agent(heartbeat=1000.0)
    a.at(0.0)
    for n in range(1, 12):
        a.exited(b"w%d" % n, 1)
        a.at(a.core.next_deadline())
    a.exited(b"w12", 1)
    assert a.core.next_deadline() - a.now == pytest.approx(10.0)


# ---------------------------------------------------------------------- results until acknowledged


def test_results_not_acknowledged_go_again_after_a_liveness_window(agent):
    agent.at(0.0)
    agent.tasks(1, 2)
    agent.finish(b"w1", 1)
    assert sent_ids(agent.flush()) == [1]
    agent.broker(P.Ack((1,)))
    agent.finish(b"w1", 2)
    assert sent_ids(agent.flush()) == [2]
    for t in (1.0, 2.0):
        assert sent_ids(agent.at(t)) == []
        agent.broker(P.Heartbeat())
    (again,) = of(P.Result, agent.at(3.0))  # unacknowledged for 3 heartbeats
    assert [e.id for e in again.results] == [2] and (again.agent, again.epoch) == (b"agent-1", "epoch-1")
    assert sent_ids(agent.at(4.0)) == []  # counted as sent anew
    agent.broker(P.Ack((2,)))
    assert sent_ids(agent.at(8.0)) == []


def test_after_registering_again_with_the_same_broker_every_unacknowledged_result_goes_again(agent):
    agent.tasks(1)
    agent.finish(b"w1", 1)
    agent.flush()
    assert of(P.Hello, agent.broker(P.Error(P.ErrorCode.UNKNOWN_PEER)))
    assert sent_ids(agent.welcome("epoch-1")) == [1]


def test_a_restarted_broker_gets_none_of_the_old_ones_results_and_the_tasks_are_dropped(agent):
    agent.tasks(1, 2, 3)  # 1 runs; 2 and 3 wait
    agent.finish(b"w1", 1)  # 2 runs now
    agent.flush()
    out = agent.welcome("epoch-2")
    assert sent_ids(out) == [] and kills(out) == []  # a plain task finishes; its result is dropped
    assert [t.id for t in agent.core.slots.queue] == []  # 3 is dropped; 2 runs on
    agent.finish(b"w1", 2)
    assert sent_ids(agent.flush()) == []
    assert sent_ids(agent.at(10.0)) == []  # the old broker's results are not sent again


def test_a_restarted_broker_stops_the_workers_of_channel_tasks(agent):
    agent.tasks(1, flags=P.FLAG_CHANNEL)
    assert kills(agent.welcome("epoch-2")) == [(b"w1", signal.SIGTERM)]


def test_runs_the_collector_cannot_take_wait_first_in_line_and_in_order(agent):
    agent.tasks(1)
    agent.core.from_worker(agent.now, b"w1", P.Items((P.ItemEntry(1, 0, (b"item",)),)))
    agent.finish(b"w1", 1)
    items, result = agent.core.next_run(agent.now), agent.core.next_run(agent.now)
    assert isinstance(items, P.Items) and isinstance(result, P.Result)  # a task's items ahead of its result
    assert agent.core.next_run(agent.now) is None
    agent.core.unsent(agent.now, [items, result])
    assert [agent.core.next_run(agent.now), agent.core.next_run(agent.now)] == [items, result]
    agent.at(0.0)
    agent.core.unsent(agent.now, [result])  # not taken: not counted as sent, so not sent again from there
    assert sent_ids(agent.at(3.0)) == []
    assert sent_ids(agent.flush()) == [1]


# ---------------------------------------------------------------------- results as made, no task behind a long one


def tiny(agent: Agent, identity: bytes, *ids: int) -> list[Action]:
    """The worker reports these tasks done in 10 us each (the agent now batches this function)."""
    entries = tuple(P.ResultEntry(i, P.Status.OK, (b"result %d" % i,), 10) for i in ids)
    return agent.core.from_worker(agent.now, identity, P.Result(entries))


def batches(actions: list[Action]) -> list[tuple[bytes, list[int]]]:
    return [(a.identity, [t.id for t in a.msg.tasks]) for a in of(ToWorker, actions) if isinstance(a.msg, P.Tasks)]


def test_results_a_worker_sends_while_its_batch_runs_go_to_the_broker_in_that_turn(agent):
    agent.tasks(1)
    tiny(agent, b"w1", 1)
    agent.flush()
    assert batches(agent.tasks(2, 3, 4)) == [(b"w1", [2, 3, 4])]  # one worker: a batch of tiny tasks
    agent.now = 0.001
    assert tiny(agent, b"w1", 2) == []
    assert sent_ids(agent.flush()) == [2]  # not held for 3 and 4
    assert of(P.Heartbeat, agent.at(1.0)) == [P.Heartbeat(1)]  # still busy with them
    agent.now = 1.5
    assert tiny(agent, b"w1", 3, 4) == []
    assert sent_ids(agent.flush()) == [3, 4] and of(P.Heartbeat, agent.at(2.0)) == [P.Heartbeat(0)]


def test_tasks_a_worker_gives_back_while_a_long_one_runs_go_to_the_idle_worker():
    a = Agent(workers=2)
    a.welcome()
    a.ready(b"w1", 101)
    a.ready(b"w2", 102)
    a.tasks(1)
    tiny(a, b"w1", 1)  # sleep(0): measured tiny
    # map(time.sleep, [6, 0, 0, 0]): spread over the two idle workers, the 6 s call first on w1
    assert batches(a.tasks(2, 3, 4, 5)) == [(b"w1", [2, 3]), (b"w2", [4, 5])]
    a.now = 0.001
    assert tiny(a, b"w2", 4, 5) == []  # w2 idle, nothing queued
    a.now = 0.002  # w1's batch runs long: it gives back the task it has not started
    assert batches(a.core.from_worker(a.now, b"w1", P.GiveBack((3,)))) == [(b"w2", [3])]
    a.now = 0.003
    tiny(a, b"w2", 3)
    assert sent_ids(a.flush()) == [1, 4, 5, 3]  # all before the 6 s call ends
    assert of(P.Heartbeat, a.at(1.0)) == [P.Heartbeat(1)]  # w1 still runs it
    a.now = 6.0
    tiny(a, b"w1", 2)
    assert sent_ids(a.flush()) == [2] and of(P.Heartbeat, a.at(7.0)) == [P.Heartbeat(0)]


def test_tasks_waiting_behind_long_ones_go_back_to_the_broker_with_the_credits(agent):
    # A node of one worker runs a call that waits for tasks of its own (a nested map): the one
    # prefetched here would wait for ever behind it.
    agent.tasks(1, 2, 3)
    assert of(P.GiveBack, agent.at(RETURN_AFTER / 2)) == []
    assert agent.core.next_deadline() == RETURN_AFTER  # the tick comes when they are due
    back = of(P.GiveBack, agent.at(RETURN_AFTER + 0.001))
    assert back == [P.GiveBack((2, 3))]
    assert of(P.GiveBack, agent.at(1.0)) == []  # once
    assert of(P.Ready, agent.flush()) == []  # and no new ones until a worker is free
    agent.now = 2.0
    agent.finish(b"w1", 1)
    assert of(P.Ready, agent.flush()) == [P.Ready(2)]


def test_once_tasks_run_long_a_node_asks_only_for_what_its_workers_take():
    a = Agent(workers=2)
    a.welcome()
    a.ready(b"w1", 101)
    a.ready(b"w2", 102)
    assert of(P.Ready, a.flush()) == [P.Ready(4)]  # unknown durations: a task ahead for each worker
    a.tasks(1, 2)
    a.now = 1.0
    for i, w in ((1, b"w1"), (2, b"w2")):
        a.core.from_worker(a.now, w, P.Result((P.ResultEntry(i, P.Status.OK, (b"r",), 1_000_000),)))
    a.flush()
    a.tasks(3, 4)  # both workers busy with 1 s tasks: nothing asked ahead, nothing to give back later
    assert of(P.Ready, a.flush()) == [] and of(P.GiveBack, a.at(5.0)) == []


def test_channel_tasks_and_tasks_while_a_worker_starts_are_kept():
    a = Agent(workers=2)
    a.welcome()
    a.ready(b"w1", 101)  # w2 still starting: it will take what waits
    a.tasks(1, 2)
    assert of(P.GiveBack, a.at(1.0)) == []
    a.ready(b"w2", 102)
    a.tasks(3, 4, 5, flags=P.FLAG_CHANNEL)  # both workers busy: channel tasks wait here
    assert of(P.GiveBack, a.at(2.0)) == []


# ---------------------------------------------------------------------- memory


def test_past_the_memory_limit_a_worker_is_recycled_between_tasks():
    a = Agent(max_memory_per_worker=100)
    a.welcome()
    a.ready(b"w1", 101)
    a.tasks(1, 2)
    assert a.core.rss_wanted(a.now, b"w1") == 101  # read as its results come in
    assert a.core.rss_wanted(a.now, b"w1") == 0  # ... at most every MEMORY_CHECK_S
    assert a.core.rss_after_task(a.now, b"w1", 150 * MIB) == []  # busy: recycled once its batch is done
    out = a.finish(b"w1", 1)
    assert of(ToWorker, out) == [ToWorker(b"w1", P.Bye(P.ByeReason.RECYCLED))]  # task 2 waits for a new worker
    assert a.exited(b"w1", 0) == [Spawn(b"w2")]
    a.ready(b"w2", 102)
    a.now += MEMORY_CHECK_S
    assert a.core.rss_wanted(a.now, b"w2") == 102
    assert a.core.rss_after_task(a.now, b"w2", 50 * MIB) == []


def test_past_one_and_a_half_times_the_limit_the_task_ends_as_memory_and_its_worker_is_killed():
    a = Agent(max_memory_per_worker=100)
    a.welcome()
    a.ready(b"w1", 101)
    a.at(0.0)
    assert a.core.next_deadline() == pytest.approx(MEMORY_CHECK_S)
    assert of(Measure, a.at(MEMORY_CHECK_S)) == []  # nobody is busy
    a.tasks(7)
    assert of(Measure, a.at(2 * MEMORY_CHECK_S)) == [Measure(b"w1", 101)]
    assert a.core.rss_while_busy(a.now, b"w1", 140 * MIB) == []  # over the limit, under 1.5 x
    assert kills(a.core.rss_while_busy(a.now, b"w1", 160 * MIB)) == [(b"w1", signal.SIGTERM)]
    assert a.core.rss_while_busy(a.now, b"w1", 170 * MIB) == []  # doomed already
    a.exited(b"w1", -15)
    (result,) = of(P.Result, a.flush())
    ((tid, status, _, _, cause, *_),) = result.results
    assert (tid, status, cause.pid) == (7, P.Status.MEMORY, 101) and "hard limit of 150 MiB" in cause.detail


def test_without_a_memory_limit_nothing_is_measured(agent):
    agent.tasks(1)
    assert of(Measure, agent.at(5.0)) == [] and agent.core.rss_wanted(agent.now, b"w1") == 0


# ---------------------------------------------------------------------- deadlines


def test_the_next_deadline_is_the_earliest_timer():
    a = Agent(max_memory_per_worker=100)
    a.welcome()
    a.ready()
    a.at(0.0)  # beat at 1.0, memory at 0.1
    assert a.core.next_deadline() == pytest.approx(MEMORY_CHECK_S)
    a.at(0.05)
    a.tasks(1, timeout_ms=20)
    assert a.core.next_deadline() == pytest.approx(0.07)
