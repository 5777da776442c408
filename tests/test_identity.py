"""Identity on every message: an agent routing id belongs to the key that first said HELLO with it.

The collector is a PULL socket, so the agent a RESULT, ITEMS or BYE names is a
header field. With key files, a second admitted node could claim another
agent's routing id there; the broker checks the connection's key (ZAP
User-Id) against the one that agent said HELLO with on the backend. On the
backend, while that agent's link is down, another key saying HELLO with its
routing id would take over the agent and the tasks it holds: it is refused.
"""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import threading
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


class CutProxy:
    """Forwards 127.0.0.2:PORT to the broker's 127.0.0.1:PORT. ``cut()`` closes every connection through it and
    accepts none until ``heal()`` (they wait in the backlog, mid-handshake): the agent behind it loses its link,
    then reconnects as itself."""

    def __init__(self, ports: list[int]) -> None:
        self._sel = selectors.DefaultSelector()
        self._listeners = {socket.create_server(("127.0.0.2", port)): port for port in ports}
        self._open: list[socket.socket] = []
        self._cut, self._is_cut, self._stop = threading.Event(), threading.Event(), threading.Event()
        self._listening = False
        self._thread = threading.Thread(target=self._run, name="cut-proxy", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self._cut.set()
        assert self._is_cut.wait(5), "the proxy did not cut"

    def heal(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in [*self._open, *self._listeners]:
            sock.close()
        self._sel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._cut.is_set() and not self._is_cut.is_set():
                for sock in self._open:
                    self._drop(sock)
                self._open.clear()
                self._listen(False)
                self._is_cut.set()
            elif not self._cut.is_set():
                self._is_cut.clear()
                self._listen(True)
            for key, _ in self._sel.select(0.02):
                if key.fileobj in self._listeners:
                    self._accept(key.fileobj)
                else:
                    self._pump(key.fileobj, key.data)

    def _listen(self, on: bool) -> None:
        if on != self._listening:
            for listener in self._listeners:
                self._sel.register(listener, selectors.EVENT_READ) if on else self._sel.unregister(listener)
            self._listening = on

    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", self._listeners[listener]))
        except OSError:  # the broker is gone (teardown)
            conn.close()
            return
        for a, b in ((conn, upstream), (upstream, conn)):
            a.setblocking(False)
            self._sel.register(a, selectors.EVENT_READ, b)
            self._open.append(a)

    def _drop(self, sock: socket.socket) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            chunk = src.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if chunk:
            try:
                dst.setblocking(True)
                dst.sendall(chunk)
                dst.setblocking(False)
                return
            except OSError:
                pass
        for sock in (src, dst):
            self._drop(sock)
            if sock in self._open:
                self._open.remove(sock)


@pytest.fixture
def cluster(tmp_path):
    """A key-file broker admitting node1 (an honest agent, running; and a producer) and node2 (the attacker's key,
    an admitted agent)."""
    keys, allow, agents = tmp_path / "keys", tmp_path / "allow", tmp_path / "agents"
    allow.mkdir()
    agents.mkdir()
    for name in ("broker", "node1", "node2"):
        security.make_keypair_files(keys, name)
    for folder, name in ((allow, "node1"), (agents, "node1"), (agents, "node2")):
        (folder / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    ports = [free_port() for _ in range(3)]
    frontend, backend, collector = (f"tcp://127.0.0.1:{port}" for port in ports)
    # The honest agent reaches the broker through a proxy that can cut its link. Liveness 5 s: a cut of
    # a second or two leaves it registered, holding its tasks.
    proxy = CutProxy(ports[1:])
    procs = [spawn_daemon(["zpar_broker", "--frontend", frontend, "--backend", backend, "--collector", collector,
                           "--heartbeat", "0.2", "--liveness", "25", "--key-file", str(keys / "broker.key_secret"),
                           "--allow-keys", str(allow), "--allow-agent-keys", str(agents), "--log-level", "ERROR"])]
    producer = security.client_credentials("producer", key_file=str(keys / "node1.key_secret"),
                                           broker_key=str(keys / "broker.key"))
    wait_for(lambda: _answers(frontend, producer), 15, what="the broker listening")  # before the proxy forwards
    procs.append(subprocess.Popen(
        [sys.executable, "-c", _AGENT_WITH_KNOWN_ID, "--broker", f"tcp://127.0.0.2:{ports[1]}", "--name", "honest",
         "--workers", "1", "--heartbeat", "0.2", "--liveness", "25",
         "--key-file", str(keys / "node1.key_secret"), "--broker-key", str(keys / "broker.key"),
         "--log-level", "ERROR"],
        stdin=subprocess.DEVNULL, start_new_session=True))

    class Cluster:
        pass

    c = Cluster()
    c.keys, c.frontend, c.backend, c.collector, c.proxy = keys, frontend, backend, collector, proxy
    c.gate = str(tmp_path / "gate")
    c.client = lambda: zpar.Client(frontend, key_file=str(keys / "node1.key_secret"),
                                   broker_key=str(keys / "broker.key"))
    yield c
    open(c.gate, "w").close()
    stop_processes(procs)
    proxy.close()


def _answers(frontend: str, creds: security.Credentials) -> bool:
    try:
        zpar.client.broker_status(frontend, 1.0, creds)
    except zpar.BrokerUnavailable:
        return False
    return True


def _as_node2(c, sock: zmq.Socket) -> zmq.Socket:
    """``sock`` made a CurveZMQ client with node2's key: an admitted agent, but not the honest one."""
    sock.setsockopt(zmq.LINGER, 0)
    security.apply_client(sock, security.client_credentials(
        "agent", key_file=str(c.keys / "node2.key_secret"), broker_key=str(c.keys / "broker.key")))
    return sock


def _forger(c, ctx: zmq.Context) -> zmq.Socket:
    """A raw PUSH to the collector with node2's key."""
    push = _as_node2(c, ctx.socket(zmq.PUSH))
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


def test_a_hello_from_another_key_with_a_registered_agents_routing_id_is_refused(cluster):
    with cluster.client() as client:
        wait_for(lambda: client.status()["workers"] == 1, 20, what="the honest agent joined")
        future = client.submit(tasks.block_until, cluster.gate, 30, "real")
        wait_for(lambda: client.status()["running"] == 1, 20, what="the task running")
        cluster.proxy.cut()  # the honest agent's link is down; the broker still holds it registered
        ctx = zmq.Context()

        def take_over() -> dict | None:
            # A fresh socket each time: while the broker still has the honest link, libzmq itself
            # ignores a second peer with the same routing id, and our HELLO never reaches its code.
            dealer = _as_node2(cluster, ctx.socket(zmq.DEALER))
            dealer.setsockopt(zmq.IDENTITY, KNOWN_ID)
            try:
                dealer.connect(cluster.backend)
                dealer.send_multipart(P.encode(P.Hello(P.Role.AGENT, "attacker", "h", os.getpid(), 4)))
                if dealer.poll(100):
                    reply = P.decode(dealer.recv_multipart())
                    assert not isinstance(reply, P.Welcome), "another key took over the agent's routing id"
            finally:
                dealer.close(linger=0)
            counters = client.status()["counters"]
            return counters if counters.get("agent_id_taken", 0) >= 1 else None

        try:
            counters = wait_for(take_over, 3, what="the broker refusing the takeover")
        finally:
            ctx.term()
        assert not counters.get("agents_hello_again") and not counters.get("requeued")
        status = client.status()
        assert [(n["name"], n["running"]) for n in status["nodes"]] == [("honest", 1)]
        assert status["workers"] == 1
        cluster.proxy.heal()  # the honest agent reconnects, as itself, and finishes its task
        open(cluster.gate, "w").close()
        assert future.result(timeout=20) == "real"
        after = client.status()["counters"]
        assert after["done"] == 1 and not after.get("requeued") and not after.get("collector_identity_mismatch")
