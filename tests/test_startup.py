"""The embedded cluster starts its workers before the hub imports the broker, and they are the hub's own."""

from __future__ import annotations

import psutil
import pytest

import zpar
from zpar.agent.server import AgentServer
from zpar.agent.spawn import prestart, worker_identity
from zpar.config import AgentConfig
from zpar.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def identity_of(proc: psutil.Process) -> str:
    """A worker's identity, from its command line (``-m zpar.agent.worker ENDPOINT IDENTITY PARENT``)."""
    try:
        args = proc.cmdline()
    except psutil.Error:  # it died since we listed it
        return "gone"
    return args[args.index("zpar.agent.worker") + 2]


def workers_of(hub: psutil.Process) -> list[psutil.Process]:
    """The hub's live workers (one just killed may be a zombie for a moment, or gone)."""
    live = []
    for proc in hub.children():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "zpar.agent.worker" in proc.cmdline():
                live.append(proc)
        except psutil.Error:
            continue
    return live


def test_the_hubs_workers_are_started_ahead_adopted_by_identity_and_replaced_when_they_die():
    with zpar.Client(workers=2) as client:
        hub = psutil.Process(client._cluster.procs[0].pid)  # this client's (others of the session run too)
        assert "zpar_broker.embedded" in hub.cmdline()
        assert sorted(identity_of(w) for w in workers_of(hub)) == ["w1", "w2"]
        assert sum(client.map(abs, range(-50, 0))) == sum(range(1, 51))
        first = workers_of(hub)[0]
        first.kill()
        wait_for(lambda: sorted(identity_of(w) for w in workers_of(hub)) in (["w2", "w3"], ["w1", "w3"]),
                 timeout=20, what="the dead worker replaced by a new one of the hub's")
        assert sum(client.map(abs, range(-50, 0))) == sum(range(1, 51))


def test_an_agent_adopts_the_workers_it_asks_for_and_stops_those_it_does_not():
    started = prestart(3)
    assert list(started.procs) == [worker_identity(n) for n in (1, 2, 3)] == [b"w1", b"w2", b"w3"]
    procs = list(started.procs.values())
    agent = AgentServer(AgentConfig(broker="tcp://127.0.0.1:9", workers=2), prestarted=started)
    try:
        assert agent.pipe_endpoint == started.endpoint
        agent.start()
        adopted = sorted(identity.decode() for identity, _ in agent.procs.values())
        assert adopted == ["w1", "w2"] and [p.pid for _, p in agent.procs.values()] == [p.pid for p in procs[:2]]
        assert procs[2].poll() is not None and not started.procs  # w3: nobody asked for it
    finally:
        for _, proc in agent.procs.values():
            proc.kill()
            proc.wait()
        agent.close()
