"""Identity on every message: what reaches the collector must come from the key of the agent it names.

The collector is a PULL socket, so the agent a RESULT, ITEMS or BYE names is a
header field. With key files, a second admitted node could claim another
agent's routing id there; the broker checks the connection's key (ZAP
User-Id) against the one that agent said HELLO with on the backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import zmq

import zpar
from zpar import protocol as P
from zpar import security, serialize
from zpar._embedded import spawn_daemon, stop_processes
from zpar.testing import free_port, wait_for

sys.path.insert(0, os.path.dirname(__file__))
import tasks

#: The honest agent's routing id, fixed by the test only. It is random per agent process and
#: nothing publishes it; fixing it simulates an attacker who learned it some other way.
KNOWN_ID = uuid.UUID("6a1d0f3e-2c4b-4d8e-9f10-0123456789ab").bytes

# `python -c`: the usual agent, with its routing id fixed to KNOWN_ID (sys.argv[1:] are its options).
_AGENT_WITH_KNOWN_ID = f"""
import sys, types, uuid
import zpar.agent.server as server
server.uuid = types.SimpleNamespace(uuid4=lambda: uuid.UUID(bytes={KNOWN_ID!r}))
from zpar.cli import agent_main
sys.argv[0] = "zpar-agent"
agent_main()
"""


@pytest.fixture
def cluster(tmp_path):
    """A key-file broker admitting node1 (an honest agent, running) and node2 (the attacker's key)."""
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    allow.mkdir()
    for name in ("broker", "node1", "node2"):
        security.make_keypair_files(keys, name)
    for name in ("node1", "node2"):
        (allow / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    frontend, backend, collector = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    procs = [spawn_daemon(["zpar_broker", "--frontend", frontend, "--backend", backend, "--collector", collector,
                           "--heartbeat", "0.2", "--key-file", str(keys / "broker.key_secret"),
                           "--allow-keys", str(allow), "--log-level", "ERROR"])]
    procs.append(subprocess.Popen(
        [sys.executable, "-c", _AGENT_WITH_KNOWN_ID, "--broker", backend, "--workers", "1", "--heartbeat", "0.2",
         "--key-file", str(keys / "node1.key_secret"), "--broker-key", str(keys / "broker.key"),
         "--log-level", "ERROR"],
        stdin=subprocess.DEVNULL, start_new_session=True))

    class Cluster:
        pass

    c = Cluster()
    c.keys, c.frontend, c.collector, c.gate = keys, frontend, collector, str(tmp_path / "gate")
    c.client = lambda: zpar.Client(frontend, key_file=str(keys / "node1.key_secret"),
                                   broker_key=str(keys / "broker.key"))
    yield c
    stop_processes(procs)


def _forger(c, ctx: zmq.Context) -> zmq.Socket:
    """A raw PUSH to the collector, a CurveZMQ client with node2's key: admitted, but not the agent."""
    own = security.load_keypair(c.keys / "node2.key_secret", need_secret=True)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.curve_secretkey, push.curve_publickey = own.secret, own.public
    push.curve_serverkey = security.load_keypair(c.keys / "broker.key", need_secret=False).public
    push.connect(c.collector)
    return push


def test_a_result_or_goodbye_claiming_another_agent_is_dropped_and_counted(cluster):
    with cluster.client() as client:
        wait_for(lambda: client.status()["workers"] == 1, 20, what="the honest agent joined")
        future = client.submit(tasks.block_until, cluster.gate, 30, "real")
        status = wait_for(lambda: (s := client.status())["running"] == 1 and s, 20, what="the task running")
        assert status["nodes"][0]["running"] == 1
        epoch = status["epoch"]
        forged = serialize.dumps("forged")
        # The task's broker id is the first one given (1); forge a few in case.
        entries = tuple(P.ResultEntry(gid, P.Status.OK, tuple(forged)) for gid in range(1, 6))
        messages = [
            P.Result(entries, agent=KNOWN_ID, epoch=epoch),  # an id learned somehow
            P.Result(entries, agent=os.urandom(16), epoch=epoch),  # an id guessed
            P.Items((), (), agent=KNOWN_ID, epoch=epoch),
            P.Bye(P.ByeReason.LEAVING, KNOWN_ID),  # would drop the honest agent and re-queue its task
        ]
        ctx = zmq.Context()
        push = _forger(cluster, ctx)
        try:
            for msg in messages:
                push.send_multipart(P.encode(msg))
            counters = wait_for(
                lambda: (n := client.status()["counters"]).get("collector_identity_mismatch", 0) >= len(messages)
                and n, 20, what="the forgeries counted")
        finally:
            push.close(linger=0)
            ctx.term()
        assert counters["collector_identity_mismatch"] == len(messages)
        assert not counters.get("results_not_from_holder") and not counters.get("agents_left")
        assert not future.done(), "a forged result was delivered"
        after = client.status()
        assert after["workers"] == 1 and after["nodes"][0]["running"] == 1, "the forged BYE dropped the agent"
        open(cluster.gate, "w").close()
        assert future.result(timeout=30) == "real"
        assert client.status()["done"] == 1
