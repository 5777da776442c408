"""The embedded cluster forks its workers before the hub imports the broker, and they are the hub's own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

import zpar
from zpar.agent.server import AgentServer
from zpar.agent.spawn import ForkedWorker, prestart, worker_identity
from zpar.config import AgentConfig
from zpar.testing import wait_for

FORKED = "zpar-worker-"  # the process name a forked worker gives itself (its command line is the hub's)


def identity_of(proc: psutil.Process) -> str:
    """A worker's identity: from its name if forked, else its command line (``-m zpar.agent.worker ENDPOINT ID``)."""
    try:
        name = proc.name()
        if name.startswith(FORKED):
            return name.removeprefix(FORKED)
        args = proc.cmdline()
    except psutil.Error:  # it died since we listed it
        return "gone"
    return args[args.index("zpar.agent.worker") + 2]


def ended(proc: psutil.Process) -> bool:
    """Gone, or a zombie (orphans are reaped by whatever adopts them, if it does)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def workers_of(hub: psutil.Process) -> list[psutil.Process]:
    """The hub's live workers (one just killed may be a zombie for a moment, or gone)."""
    live = []
    for proc in hub.children():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and (proc.name().startswith(FORKED)
                                                          or "zpar.agent.worker" in proc.cmdline()):
                live.append(proc)
        except psutil.Error:
            continue
    return live


def test_the_hubs_workers_are_forked_ahead_adopted_by_identity_and_replaced_by_fresh_ones_when_they_die():
    with zpar.Client(workers=2) as client:
        hub = psutil.Process(client._cluster.procs[0].pid)  # this client's (others of the session run too)
        assert "zpar_broker.embedded" in hub.cmdline()
        forked = workers_of(hub)
        assert sorted(identity_of(w) for w in forked) == ["w1", "w2"]
        assert all(w.cmdline() == hub.cmdline() for w in forked)  # no interpreter of their own
        assert sum(client.map(abs, range(-50, 0))) == sum(range(1, 51))
        forked[0].kill()
        wait_for(lambda: sorted(identity_of(w) for w in workers_of(hub)) in (["w2", "w3"], ["w1", "w3"]),
                 timeout=20, what="the dead worker replaced by a new one of the hub's")
        [new] = [w for w in workers_of(hub) if identity_of(w) == "w3"]
        assert "zpar.agent.worker" in new.cmdline()  # the hub holds a ZeroMQ context now: never forks again
        assert sum(client.map(abs, range(-50, 0))) == sum(range(1, 51))


def _how_started() -> tuple[str, list[str], bool, bool]:
    import gc

    import zpar.joblib

    main = sys.modules["__main__"]
    return main.__spec__.name, sys.argv[2:3], zpar.joblib._in_zpar_worker(), gc.isenabled()


def _say(text: str) -> int:
    print(text)  # not flushed: the worker's exit must write it out
    return len(text)


def test_a_forked_worker_passes_for_one_run_with_dash_m_collects_garbage_and_writes_out_what_tasks_print(capfd):
    with zpar.Client(workers=1) as client:
        assert client.submit(_how_started).result(timeout=20) == ("zpar.agent.worker", ["w1"], True, True)
        assert client.submit(_say, "printed by a task in a forked worker").result(timeout=20) == 36
    assert "printed by a task in a forked worker" in capfd.readouterr().out


def test_the_hubs_forked_workers_end_with_the_hub_even_if_it_is_killed():
    client = zpar.Client(workers=2)
    try:
        assert client.submit(abs, -3).result(timeout=20) == 3
        hub = psutil.Process(client._cluster.procs[0].pid)
        forked = workers_of(hub)
        assert len(forked) == 2
        hub.kill()
        wait_for(lambda: all(ended(w) for w in forked), timeout=10, what="the hub's workers ended with it")
    finally:
        client.close()


def test_an_agent_adopts_the_workers_it_asks_for_and_stops_those_it_does_not():
    started = prestart(3)  # not fork=True: a test process may hold threads and contexts
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


def test_a_forked_worker_reads_as_a_popen_would():
    # Any child will do: what is tested is how its end is read (not a fork of this process, which has threads).
    proc = ForkedWorker(os.posix_spawn("/bin/sleep", ["sleep", "30"], os.environ))
    try:
        assert proc.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.05)
    finally:
        proc.kill()
    assert proc.wait(10) == -signal.SIGKILL == proc.poll() == proc.returncode
    proc.kill()  # reaped: nothing is sent to a pid the kernel may have given to another process
    assert ForkedWorker(os.posix_spawn("/bin/sh", ["sh", "-c", "exit 3"], os.environ)).wait(10) == 3
