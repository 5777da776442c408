"""Resources (``zpar-agent --resources gpu=1``, ``client.options(resources={"gpu": 1})``).

The broker's core with a fake clock: a task goes only to an agent with its
resources free, they stay reserved while the agent holds it (prefetched or
running) and are freed on every way a task leaves an agent; a request no
node offers waits, shown in status, and fails past its resource_timeout.
Then a real TCP cluster started from the CLIs for the bar: on two agents,
one with ``--resources gpu=1``, every gpu task runs there, never two at
once, and the other tasks use both nodes.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import cloudpickle
import pytest
import test_broker_core_properties as props  # the broker's state machine, run here with resources
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule
from rich.console import Console
from test_broker_core import BLOB, D
from test_broker_core import Broker as CoreBroker

import zpar
from zpar import protocol as P
from zpar.cli._status import render
from zpar.config import AgentConfig, load, parse_resources
from zpar.errors import ConfigError
from zpar.testing import wait_for
from zpar_broker.core import Dest

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # these tasks travel by value

GPU = (("gpu", 1),)


def entry(i: int, resources=(), timeout_ms: int = 0, priority: int = 0, peer: bytes = b"p") -> P.TaskEntry:
    sched = P.Sched(priority, tuple(sorted(resources)), timeout_ms) if resources or priority else None
    return P.TaskEntry(i, D, (b"%s:%d" % (peer, i),), 0, 3, 0, (), sched=sched)


class Broker(CoreBroker):
    """test_broker_core's broker, submitting tasks that ask for resources and joining agents that offer them."""

    def submit(self, peer: bytes, ids, resources=(), timeout_ms: int = 0, priority: int = 0):
        entries = tuple(entry(i, resources, timeout_ms, priority, peer) for i in ids)
        return self.producer(peer, P.Submit(entries, (P.Function(D, BLOB),)))

    def join(self, peer: bytes, workers: int = 1, resources=()):
        return self.agent(peer, P.Hello(P.Role.AGENT, peer.decode(), "host", 1, workers, tuple(sorted(resources))))

    def tick(self, dt: float, alive=()):
        self.now += dt
        for peer in alive:
            self.core.agent_message(self.now, peer, P.Heartbeat())
        for peer in list(self.core._producers):
            self.core.producer_message(self.now, peer, P.Heartbeat())
        return self.core.tick(self.now)

    def free(self, agent: bytes) -> dict:
        return self.core._agents[agent].free


def tasks(out, agent: bytes | None = None) -> list[tuple[bytes, int, bytes]]:
    """``[(agent, gid, payload)]`` of the TASKS in ``out``."""
    return [(o.peer, t.id, bytes(t.payload[0])) for o in out if isinstance(o.msg, P.Tasks)
            for t in o.msg.tasks if agent is None or o.peer == agent]


def payloads(out, agent: bytes) -> list[bytes]:
    return [p for _, _, p in tasks(out, agent)]


@pytest.fixture
def b():
    b = Broker()
    b.join(b"gpu", workers=2, resources=GPU)
    b.join(b"cpu", workers=2)
    return b


# ---------------------------------------------------------------- placement and accounting


def test_a_task_asking_for_a_gpu_goes_only_where_one_is_free_and_only_one_at_a_time(b):
    b.submit(b"p", range(1, 4), GPU)
    out = b.ready(b"cpu", 10) + b.ready(b"gpu", 10)
    assert payloads(out, b"cpu") == [] and payloads(out, b"gpu") == [b"p:1"]
    assert b.free(b"gpu") == {"gpu": 0}
    ((_, gid, _),) = tasks(out)
    out = b.finish(b"gpu", [gid])  # the gpu is free again: the next one goes, in order
    assert payloads(out, b"gpu") == [b"p:2"] and b.free(b"gpu") == {"gpu": 0}


def test_tasks_asking_for_nothing_go_to_every_node_as_before(b):
    b.submit(b"p", range(1, 3), GPU)
    b.submit(b"p", range(10, 14))
    out = b.ready(b"gpu", 2) + b.ready(b"cpu", 2)
    assert payloads(out, b"gpu") == [b"p:1", b"p:10"]  # the gpu task first, then its other credit
    assert payloads(out, b"cpu") == [b"p:11", b"p:12"]


def test_fractional_and_several_resources_are_accounted_together():
    b = Broker()
    b.join(b"a", workers=4, resources=(("gpu", 1), ("memory", 10)))
    b.submit(b"p", range(1, 5), (("gpu", 0.5), ("memory", 4)))
    out = b.ready(b"a", 10)
    assert payloads(out, b"a") == [b"p:1", b"p:2"]  # memory: 4 + 4 of 10; a third would need 12
    assert b.free(b"a") == {"gpu": 0, "memory": 2}


def test_priorities_order_a_producers_tasks_of_the_same_resources(b):
    b.submit(b"p", [1], GPU)
    b.submit(b"p", [2], GPU, priority=5)
    assert payloads(b.ready(b"gpu", 1), b"gpu") == [b"p:2"]


def test_producers_asking_for_the_same_resources_take_turns():
    b = Broker()
    b.join(b"a", workers=10, resources=(("gpu", 10),))
    b.submit(b"p", range(1, 11), GPU)
    b.submit(b"q", range(1, 3), GPU)
    out = b.ready(b"a", 4)
    assert sorted(payloads(out, b"a")) == [b"p:1", b"p:2", b"q:1", b"q:2"]
    assert len(b.core._producers[b"q"].tasks) == 2 and b.core._producers[b"q"].queued == 0


@pytest.mark.parametrize("how", ["result", "lost", "given back", "cancelled", "agent silent", "agent left",
                                 "producer left", "dashboard cancel"])
def test_resources_are_freed_whichever_way_the_task_leaves_its_agent(b, how):
    b.submit(b"p", [1], GPU)
    ((_, gid, _),) = tasks(b.ready(b"gpu", 1))
    assert b.free(b"gpu") == {"gpu": 0}
    if how == "result":
        b.finish(b"gpu", [gid])
    elif how == "lost":
        b.finish(b"gpu", [gid], P.Status.LOST)  # run again: queued, its gpu given back first
    elif how == "given back":
        b.core.agent_message(b.now, b"gpu", P.GiveBack((gid,)))
    elif how == "cancelled":
        b.core.producer_message(b.now, b"p", P.Cancel((1,), force=True))
    elif how == "agent silent":
        b.tick(5.0, alive=[b"cpu"])
        assert b"gpu" not in b.core._agents
        b.join(b"gpu", workers=2, resources=GPU)
    elif how == "agent left":
        b.core.agent_message(b.now, b"gpu", P.Bye())
        b.join(b"gpu", workers=2, resources=GPU)
    elif how == "producer left":
        b.core.producer_message(b.now, b"p", P.Bye())
    elif how == "dashboard cancel":
        b.core.cancel_for(b.core._producers[b"p"].label(), 1)
    assert b.free(b"gpu") == {"gpu": 1}
    if how in ("lost", "given back", "agent silent", "agent left"):  # queued again: it goes again
        assert payloads(b.ready(b"gpu", 1), b"gpu") == [b"p:1"]
        assert b.free(b"gpu") == {"gpu": 0}


def test_a_queued_task_asking_for_resources_can_be_cancelled_and_is_never_sent(b):
    b.submit(b"p", [1, 2, 3], GPU)
    b.core.producer_message(b.now, b"p", P.Cancel((1, 2)))
    assert b.core._producers[b"p"].queued == 1
    assert payloads(b.ready(b"gpu", 5), b"gpu") == [b"p:3"]
    b.core.producer_message(b.now, b"p", P.Cancel((3,), force=True))
    assert b.free(b"gpu") == {"gpu": 1} and not b.core._producers[b"p"].tasks


def test_a_node_saying_hello_again_keeps_what_its_tasks_hold(b):
    b.submit(b"p", [1], GPU)
    tasks(b.ready(b"gpu", 1))
    b.join(b"gpu", workers=2, resources=(("gpu", 2),))  # the same agent process, say restarted its session
    assert b.free(b"gpu") == {"gpu": 1}


def test_status_shows_what_each_node_offers_and_has_free(b):
    b.submit(b"p", [1], GPU)
    b.ready(b"gpu", 1)
    nodes = {n["name"]: n for n in b.core.status(b.now)["nodes"]}
    assert nodes["gpu"]["resources"] == {"gpu": 1} and nodes["gpu"]["resources_free"] == {"gpu": 0}
    assert "resources" not in nodes["cpu"]
    assert "unplaceable" not in b.core.status(b.now)


# ---------------------------------------------------------------- what no node offers


def test_a_request_no_node_offers_waits_with_a_warning_in_status(b):
    b.submit(b"p", [1, 2], (("gpu", 2),))
    b.ready(b"gpu", 5)
    b.ready(b"cpu", 5)
    (item,) = b.core.status(b.now)["unplaceable"]
    assert item["resources"] == {"gpu": 2} and item["tasks"] == 2
    assert item["offered"] == {"gpu": {"gpu": 1}}
    for _ in range(100):  # no resource_timeout: it waits, however long
        assert not [o for o in b.tick(1.0, alive=[b"gpu", b"cpu"]) if o.dest is Dest.FRONTEND]
    assert b.core.status(b.now)["unplaceable"][0]["waiting_s"] >= 98
    b.join(b"big", workers=1, resources=(("gpu", 4),))  # a node that can take it joins: it goes there
    assert payloads(b.ready(b"big", 1), b"big") == [b"p:1"]
    assert "unplaceable" not in b.core.status(b.now) or b.core.status(b.now)["unplaceable"] == []


def test_a_request_no_node_offers_fails_past_its_resource_timeout_naming_what_nodes_offer(b):
    b.submit(b"p", [1], (("gpu", 2),), timeout_ms=3000)
    b.submit(b"p", [2], (("gpu", 2),))  # no timeout: it stays
    failed = []
    for _ in range(6):
        failed += [o for o in b.tick(1.0, alive=[b"gpu", b"cpu"]) if o.dest is Dest.FRONTEND]
    (out,) = failed
    assert out.msg.code is P.ErrorCode.RESOURCE_UNAVAILABLE and out.msg.ids == (1,)
    assert "gpu=2" in out.msg.detail and "gpu: gpu=1" in out.msg.detail and "cpu: none" in out.msg.detail
    assert 1 not in b.core._producers[b"p"].tasks and b.core._producers[b"p"].queued == 1
    assert b.core.counters["resource_timeouts"] == 1
    assert b.core.tasks(10)[0]["outcome"] == "lost"


def test_the_resource_timeout_counts_from_when_no_node_could_take_it(b):
    b.join(b"big", workers=1, resources=(("gpu", 2),))
    b.submit(b"p", [1, 2], (("gpu", 2),), timeout_ms=3000)
    tasks(b.ready(b"big", 1))  # task 1 runs there; task 2 waits for it: busy is not unmeetable
    for _ in range(10):
        assert not [o for o in b.tick(1.0, alive=[b"gpu", b"cpu", b"big"]) if o.dest is Dest.FRONTEND]
    b.core.agent_message(b.now, b"big", P.Bye())  # the only node able to take them is gone: the clocks start
    failed = []
    for _ in range(2):
        failed += [o for o in b.tick(1.0, alive=[b"gpu", b"cpu"]) if o.dest is Dest.FRONTEND]
    assert not failed  # 2 s so far
    b.join(b"big", workers=1, resources=(("gpu", 2),))  # back: the clocks stop
    for _ in range(5):
        assert not [o for o in b.tick(1.0, alive=[b"gpu", b"cpu", b"big"]) if o.dest is Dest.FRONTEND]


def test_zpar_status_prints_the_warning_and_the_nodes_resources(b):
    b.submit(b"p", [1], (("gpu", 2),))
    b.ready(b"gpu", 1)
    console = Console(width=300, record=True)
    render(b.core.status(b.now), "tcp://broker:5555", console)
    shown = console.export_text()
    assert "warning: 1 tasks ask for gpu=2, which no connected node offers (nodes offer: gpu: gpu=1)" in shown
    assert "resources (free)" in shown and "gpu=1 (1)" in shown


# ---------------------------------------------------------------- the agent's --resources


def test_an_agents_resources_take_sizes_with_units_from_flags_the_environment_or_its_file(tmp_path):
    assert parse_resources("gpu=2,memory=64GiB") == (("gpu", 2), ("memory", 64 << 30))
    assert parse_resources("licence=0.5, scratch=10 GB") == (("licence", 0.5), ("scratch", 10 * 1000**3))
    assert load(AgentConfig, env={"ZPAR_RESOURCES": "gpu=1,memory=512MiB"}).resources == (
        ("gpu", 1), ("memory", 512 << 20))
    config = tmp_path / "zpar.toml"
    config.write_text('[agent]\nresources = { gpu = 4, memory = "1KiB" }\n')
    assert load(AgentConfig, file=config).resources == (("gpu", 4), ("memory", 1024))
    config.write_text('[agent]\nresources = "gpu=3"\n')
    assert load(AgentConfig, {"resources": "gpu=8"}, file=config).resources == (("gpu", 8),)  # the flag wins
    for bad, why in [("gpu", "NAME=AMOUNT"), ("gpu=lots", "number"), ("gpu=1XB", "unit"), ("gpu=-1", "at least 0"),
                     ("gpu=1,gpu=2", "twice")]:
        with pytest.raises(ConfigError, match=why):
            parse_resources(bad)


# ---------------------------------------------------------------- a real cluster: the bar


def _where(seconds: float) -> tuple[int, float, float]:
    """(this worker's agent's pid, start, end) of a task that keeps its worker busy ``seconds``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        pass
    return os.getppid(), start, time.monotonic()


@pytest.mark.timeout(180)
def test_gpu_tasks_run_only_on_the_gpu_node_never_two_at_once_and_the_rest_use_both(new_cluster):
    cluster = new_cluster(agents=1, workers=2, heartbeat=0.5)  # on a loaded machine 0.1 s drops a busy node
    (cpu,) = cluster.agents
    cluster.agent_args = [*cluster.agent_args, "--resources", "gpu=1"]
    gpu = cluster.add_agent(name="gpu-node")
    with cluster.client() as client:
        assert {n["name"]: n.get("resources") for n in client.status()["nodes"]}["gpu-node"] == {"gpu": 1}
        on_gpu = client.options(resources={"gpu": 1})
        gpu_runs = [on_gpu.submit(_where, 0.05) for _ in range(8)]
        other_runs = [client.submit(_where, 0.02) for _ in range(60)]
        gpu_done = [f.result(timeout=120) for f in gpu_runs]
        other_done = [f.result(timeout=120) for f in other_runs]
    assert {pid for pid, _, _ in gpu_done} == {gpu.pid}
    spans = sorted((start, end) for _, start, end in gpu_done)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans)), spans
    assert {pid for pid, _, _ in other_done} == {gpu.pid, cpu.pid}


@pytest.mark.timeout(120)
def test_a_request_no_node_offers_fails_with_resource_unavailable_past_its_timeout(new_cluster):
    cluster = new_cluster(agents=1, workers=1)
    with cluster.client() as client:
        fut = client.options(resources={"gpu": 2}, resource_timeout=0.5).submit(abs, -1)
        wait_for(lambda: client.status().get("unplaceable"), 30, 0.02, "status showing the waiting task")
        with pytest.raises(zpar.ResourceUnavailable, match=r"gpu=2.*nodes offer: .*: none"):
            fut.result(timeout=60)
        assert client.submit(abs, -3).result(timeout=30) == 3


@pytest.mark.timeout(60)
def test_the_embedded_cluster_offers_the_resources_its_client_names():
    with zpar.Client(workers=1, resources={"gpu": 1, "memory": "1GiB"}) as client:
        (node,) = client.status()["nodes"]
        assert node["resources"] == {"gpu": 1, "memory": 1 << 30}
        assert client.options(resources={"gpu": 1}).submit(abs, -2).result(timeout=30) == 2
    with pytest.raises(ConfigError, match="embedded"):
        zpar.Client("tcp://127.0.0.1:1", resources="gpu=1")


def test_a_request_of_zero_of_a_resource_goes_to_any_node():
    b = Broker()
    b.join(b"plain", workers=1)  # offers nothing: a hostile producer's {"gpu": 0} still fits it
    b.submit(b"p", [1], (("gpu", 0),))
    assert payloads(b.ready(b"plain", 1), b"plain") == [b"p:1"]


# ---------------------------------------------------------------- the accounting as a state machine

OFFERS = {b"a1": (("gpu", 1),), b"a2": (("gpu", 2), ("memory", 4)), b"a3": ()}
ASKS = [(), (("gpu", 1),), (("gpu", 2),), (("gpu", 1), ("memory", 3)), (("gpu", 3),)]


class ResourcesMachine(props.BrokerMachine):
    """The broker's state machine (submits, credits, results, cancels, silences, goodbyes) with tasks that ask
    for resources and priorities, and agents that offer resources: no agent ever holds more than it offers,
    and what it has free is what it offers less what the tasks it holds asked for."""

    @rule(p=st.sampled_from(props.PRODUCERS), n=st.integers(1, 5), ask=st.sampled_from(ASKS),
          priority=st.sampled_from([-1, 0, 0, 5]))
    def submit(self, p, n, ask, priority):
        ids = [self.next_id[p] + i + 1 for i in range(n)]
        self.next_id[p] += n
        sched = P.Sched(priority, ask) if ask or priority else None
        entries = tuple(P.TaskEntry(i, props.D, (b"%s:%d" % (p, i),), 0, P.MAX_RETRIES, sched=sched) for i in ids)
        if p not in self.core._producers:
            self.core.producer_message(self.now, p, P.Hello(P.Role.PRODUCER))
        self.handle(self.core.producer_message(self.now, p, P.Submit(entries, (P.Function(props.D, b"blob"),))))
        self.outstanding.update((p, i) for i in ids)

    @rule(a=st.sampled_from(props.AGENTS))
    def agent_hello(self, a):
        self.handle(self.core.agent_message(self.now, a, P.Hello(P.Role.AGENT, workers=1, resources=OFFERS[a])))

    @rule(a=st.sampled_from(props.AGENTS), data=st.data())
    def give_back(self, a, data):
        held = self.live_holdings(a)
        if held:
            gids = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=3, unique=True))
            self.handle(self.core.agent_message(self.now, a, P.GiveBack(tuple(gids))))
            for gid in gids:  # queued again: no agent holds them, and any may take them next
                self.holder.pop(gid, None)

    @invariant()
    def resources_free_are_those_offered_less_those_held(self):
        for agent in self.core._agents.values():
            expected = dict(agent.offered)
            for task in agent.assigned.values():
                for name, amount in task.entry.sched.resources if task.entry.sched else ():
                    expected[name] = expected.get(name, 0) - amount
            assert all(abs(agent.free.get(k, 0) - v) < 1e-9 for k, v in expected.items()), (agent.free, expected)
            assert all(v >= -1e-9 for v in agent.free.values()), f"{agent.name} holds more than it offers"


ResourcesMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                              derandomize=True, database=None)
TestResourcesStateMachine = ResourcesMachine.TestCase
