"""Elastic nodes from the API: ``Client.scale(node, workers)`` and ``pp.Server.set_ncpus`` on a cluster.

A client asks in a STATUS request (``{"scale": {"node": NAME, "workers": N}}``); the broker's core sends the
node CONTROL WORKERS, as the dashboard's resize does, and answers with its status and the outcome as data.
The agent starts more workers at once, or retires idle ones (busy ones once their task is done), so a
shrink loses no task. With key files a client may not steer nodes unless the broker was started with
``--allow-client-scale``. The core's rules first (fake clock, no sockets), then real processes: the
embedded cluster, a broker and agents started from their CLIs, key files, and zpar.pp.
"""

from __future__ import annotations

import os
import subprocess

import psutil
import pytest
import tasks

import zpar
from zpar import pp, security
from zpar import protocol as P
from zpar._embedded import spawn_daemon, stop_processes
from zpar.testing import free_port, wait_for
from zpar_broker.core import BrokerCore, Dest

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------------- the broker's core


class Core:
    """A BrokerCore on a fake clock, with two agents: "a" (2 workers) and "b" (1)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.core = BrokerCore(self.now, collector="tcp://127.0.0.1:9")
        for peer, workers in ((b"a", 2), (b"b", 1)):
            self.core.agent_message(self.now, peer, P.Hello(P.Role.AGENT, peer.decode(), "host", 1, workers))

    def ask(self, request: dict, peer: bytes = b"client") -> tuple[list, dict]:
        """A STATUS with ``request`` from ``peer``: the CONTROLs sent, and the answer's info."""
        out = self.core.producer_message(self.now, peer, P.StatusMsg(request))
        assert isinstance(out[-1].msg, P.StatusMsg) and out[-1].dest is Dest.FRONTEND and out[-1].peer == peer
        controls = [(o.peer, o.msg) for o in out[:-1]]
        assert all(o.dest is Dest.BACKEND and isinstance(o.msg, P.Control) for o in out[:-1])
        return controls, out[-1].msg.info


@pytest.fixture
def core() -> Core:
    return Core()


def test_a_resize_asked_in_status_sends_control_workers_to_that_node_and_answers_ok(core):
    controls, info = core.ask({"scale": {"node": "b", "workers": 3}})
    assert controls == [(b"b", P.Control(P.Action.WORKERS, 3))]
    assert info["scale"]["ok"] is True and info["scale"]["matches"] == 1
    assert {n["name"]: n["workers"] for n in info["nodes"]} == {"a": 2, "b": 1}  # the agent has not answered yet
    core.core.agent_message(core.now, b"b", P.Hello(P.Role.AGENT, "b", "host", 1, 3))  # it says its new count
    assert {n["name"]: n["workers"] for n in core.core.status(core.now)["nodes"]} == {"a": 2, "b": 3}
    assert core.core.counters["control_workers"] == 1


def test_a_producer_that_said_hello_may_resize_too(core):
    core.core.producer_message(core.now, b"p", P.Hello(P.Role.PRODUCER, "client-1"))
    controls, info = core.ask({"scale": {"node": "a", "workers": 1}}, peer=b"p")
    assert controls == [(b"a", P.Control(P.Action.WORKERS, 1))] and info["scale"]["ok"]


def test_an_unknown_node_is_answered_with_no_match_and_nothing_sent(core):
    controls, info = core.ask({"scale": {"node": "c", "workers": 1}})
    assert controls == [] and info["scale"]["ok"] is False and info["scale"]["matches"] == 0
    assert "code" not in info["scale"] and sorted(n["name"] for n in info["nodes"]) == ["a", "b"]


def test_two_nodes_of_one_name_are_not_resized_at_a_guess(core):
    core.core.agent_message(core.now, b"a2", P.Hello(P.Role.AGENT, "a", "host", 2, 1))
    controls, info = core.ask({"scale": {"node": "a", "workers": 1}})
    assert controls == [] and info["scale"]["matches"] == 2 and not info["scale"]["ok"]


@pytest.mark.parametrize("asked", [
    {"node": "a", "workers": 0},
    {"node": "a", "workers": P.MAX_WORKERS + 1},
    {"node": "a", "workers": True},
    {"node": "a", "workers": "2"},
    {"node": "a", "workers": 2.0},
    {"node": "a"},
    {"workers": 2},
    {"node": "", "workers": 2},
    {"node": 7, "workers": 2},
    {"node": "x" * (P.MAX_NAME + 1), "workers": 2},
    ["a", 2],
    "a",
])
def test_a_malformed_resize_is_refused_as_malformed_and_the_status_still_answered(core, asked):
    controls, info = core.ask({"scale": asked})
    assert controls == []
    assert info["scale"]["ok"] is False and info["scale"]["code"] == P.ErrorCode.MALFORMED
    assert str(P.MAX_WORKERS) in info["scale"]["detail"] and info["workers"] == 3
    assert core.core.counters["protocol_errors"] == 1


def test_without_scale_open_a_resize_is_not_allowed_and_says_what_to_do(core):
    core.core.scale_open = False  # key files, and no --allow-client-scale
    controls, info = core.ask({"scale": {"node": "a", "workers": 1}})
    assert controls == [] and info["scale"]["code"] == P.ErrorCode.NOT_ALLOWED
    assert "dashboard" in info["scale"]["detail"] and "--allow-client-scale" in info["scale"]["detail"]
    assert core.core.counters["scale_refused"] == 1
    assert "scale" not in core.ask({})[1]  # a plain status is answered as ever


def test_the_resize_request_and_its_answer_travel_through_the_codec(core):
    request = P.decode(P.encode(P.StatusMsg({"scale": {"node": "a", "workers": 4}})))
    controls, info = core.ask(request.info)
    assert controls == [(b"a", P.Control(P.Action.WORKERS, 4))]
    assert P.decode(P.encode(P.StatusMsg(info))).info["scale"] == info["scale"]


# ---------------------------------------------------------------------- real processes


def release(gate: str) -> None:
    open(gate, "w").close()


def running(gate: str, *xs: int) -> None:
    """Wait until each ``tasks.pp_gated(gate, x)`` has started (its marker file is there)."""
    wait_for(lambda: all(os.path.exists(f"{gate}.{x}") for x in xs), 30, 0.01, f"tasks {xs} running")


def embedded_workers(client: zpar.Client) -> list[psutil.Process]:
    """The live workers of ``client``'s embedded cluster: the children of its hub (not another client's)."""
    out = []
    for proc in client._cluster.procs:
        try:
            out += [p for p in psutil.Process(proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            pass
    return out


def shrink_to_one_while_busy_then_grow(client: zpar.Client, node: str, gate: str, workers: int) -> None:
    """``workers`` long tasks hold every worker; shrinking to 1 lets all of them finish, then the rest run on the
    one worker left; growing back adds workers that take queued tasks at once. Every result is checked."""
    long = [client.submit(tasks.pp_gated, gate, -x) for x in range(1, workers + 1)]
    running(gate, *(-x for x in range(1, workers + 1)))  # every worker busy
    assert client.scale(node, 1) == 1
    assert not any(f.done() for f in long), "a shrink stopped a running task"
    rest = [client.submit(tasks.worker_pid, i) for i in range(20)]
    squares = [client.submit(tasks.square, i) for i in range(20)]
    release(gate)
    assert [f.result(30) for f in long] == [x * x for x in range(1, workers + 1)]
    assert [f.result(30) for f in squares] == [i * i for i in range(20)]
    assert len({f.result(30) for f in rest}) == 1, "tasks after the shrink ran on more than one worker"

    # Growing: the one worker is held, a task waits behind it; a new worker takes it at once.
    held = client.submit(tasks.pp_gated, f"{gate}2", -1)
    running(f"{gate}2", -1)
    marker = f"{gate}.queued"
    queued = client.submit(tasks.touch, marker)
    assert client.scale(node, workers) == workers
    wait_for(lambda: os.path.exists(marker), 30, 0.01, "the queued task taken by a new worker")
    assert queued.result(30) == marker and not held.done()
    load = client.map(tasks.sleep_square, range(40), [0.005] * 40)
    release(f"{gate}2")
    assert held.result(30) == 1 and list(load) == [i * i for i in range(40)]


def test_an_embedded_client_shrinks_to_one_and_grows_back_under_load_losing_nothing(tmp_path):
    with zpar.Client(workers=2) as client:
        client.wait_for_workers(2)
        shrink_to_one_while_busy_then_grow(client, "local", str(tmp_path / "gate"), 2)
        (node,) = client.status()["nodes"]
        assert node["workers"] == 2
        assert client.scale(node["name"], 1) == 1  # its own name works as well as "local"
        wait_for(lambda: len(embedded_workers(client)) == 1, 20, 0.02, "the retired worker gone")


def test_a_cluster_started_from_the_clis_is_resized_by_its_client(new_cluster, tmp_path):
    cluster = new_cluster(agents=1, workers=2)
    node = cluster.status()["nodes"][0]["name"]
    with cluster.client() as client:
        shrink_to_one_while_busy_then_grow(client, node, str(tmp_path / "gate"), 2)
        assert client.scale(node, 3) == 3
        wait_for(lambda: len(cluster.worker_pids()) == 3, 20, 0.02, "three worker processes")
        assert client.scale(node, 1) == 1
        wait_for(lambda: len(cluster.worker_pids()) == 1, 20, 0.02, "the retired workers gone")
        assert client.submit(tasks.square, 12).result(30) == 144
        assert client.scale(node, 2, wait=False) in (1, 2)  # at once, with what the status shows now
        wait_for(lambda: cluster.status()["workers"] == 2, 20, 0.02, "the node at 2 workers")


def test_an_unknown_node_or_a_bad_count_is_a_clear_error(cluster, cluster_client):
    names = [n["name"] for n in cluster.status()["nodes"]]
    with pytest.raises(zpar.ConfigError, match="no node named 'no-such-node'") as caught:
        cluster_client.scale("no-such-node", 2)
    assert all(repr(name) in str(caught.value) for name in names)  # the nodes it has, named
    for bad in (0, -1, P.MAX_WORKERS + 1, 1.5, True):
        with pytest.raises(zpar.ConfigError, match=f"from 1 to {P.MAX_WORKERS}"):
            cluster_client.scale(names[0], bad)
    assert cluster.status()["workers"] == 2  # nothing changed


def test_a_resize_that_does_not_show_in_time_raises_timeout_with_the_count():
    with zpar.Client(workers=1) as client:
        client.wait_for_workers(1)
        with pytest.raises(TimeoutError, match="has 1 workers, not 2"):
            client.scale("local", 2, timeout=0.0)  # asked, then no time at all to see it


# ---------------------------------------------------------------------- key files


class KeyedCluster:
    """A key-file broker (``broker_args`` more flags) and one agent of 2 workers, from the CLIs."""

    def __init__(self, tmp_path, broker_args: tuple[str, ...] = ()) -> None:
        keys, self.producers, agents = tmp_path / "keys", tmp_path / "producers", tmp_path / "agents"
        for folder, name in ((self.producers, "producer"), (agents, "agent")):
            folder.mkdir()
            security.make_keypair_files(keys, name)
            (folder / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
        security.make_keypair_files(keys, "broker")
        self.keys = keys
        self.procs: list[subprocess.Popen] = []
        try:
            ports = [free_port() for _ in range(3)]
            self.frontend, backend, collector = (f"tcp://127.0.0.1:{p}" for p in ports)
            self.procs.append(spawn_daemon(
                ["zpar_broker", "--frontend", self.frontend, "--backend", backend, "--collector", collector,
                 "--heartbeat", "0.1", "--dashboard", "off", "--key-file", str(keys / "broker.key_secret"),
                 "--allow-keys", str(self.producers), "--allow-agent-keys", str(agents), "--log-level", "WARNING",
                 *broker_args]))
            self.procs.append(spawn_daemon(
                ["zpar.agent", "--broker", backend, "--workers", "2", "--heartbeat", "0.1", "--name", "keyed",
                 "--key-file", str(keys / "agent.key_secret"), "--broker-key", str(keys / "broker.key"),
                 "--log-level", "WARNING"]))
        except BaseException:
            self.stop()
            raise

    def client(self) -> zpar.Client:
        return zpar.Client(self.frontend, key_file=str(self.keys / "producer.key_secret"),
                           broker_key=str(self.keys / "broker.key"), connect_timeout=20)

    def stop(self) -> None:
        stop_processes(self.procs)


@pytest.fixture
def keyed(tmp_path, request):
    cluster = KeyedCluster(tmp_path, getattr(request, "param", ()))
    yield cluster
    cluster.stop()


def test_with_key_files_a_producer_may_not_resize_a_node(keyed):
    with keyed.client() as client:
        client.wait_for_workers(2)
        with pytest.raises(zpar.AuthenticationError, match="--allow-client-scale") as caught:
            client.scale("keyed", 1)
        assert "dashboard" in str(caught.value)
        assert client.status()["workers"] == 2 and client.submit(tasks.square, 3).result(30) == 9


@pytest.mark.parametrize("keyed", [("--allow-client-scale",)], indirect=True)
def test_with_key_files_and_allow_client_scale_a_producer_resizes_a_node(keyed):
    with keyed.client() as client:
        client.wait_for_workers(2)
        assert client.scale("keyed", 1) == 1
        assert client.scale("keyed", 3) == 3
        assert list(client.map(tasks.square, range(30))) == [i * i for i in range(30)]


# ---------------------------------------------------------------------- zpar.pp


def test_pp_set_ncpus_on_a_cluster_resizes_every_node_live(new_cluster, tmp_path):
    cluster = new_cluster(agents=2, workers=1)
    name = cluster.frontend.removeprefix("tcp://")
    server = pp.Server(0, ppservers=(cluster.frontend,))
    try:
        gate = str(tmp_path / "gate")
        held = [server.submit(tasks.pp_gated, (gate, -x)) for x in (1, 2)]
        running(gate, -1, -2)  # both nodes' one worker busy
        server.set_ncpus(2)
        assert {n["workers"] for n in cluster.status()["nodes"]} == {2}
        assert server.get_ncpus() == 2  # (the monitor may have read the old count just before: it follows)
        wait_for(lambda: server.get_active_nodes() == {"local": 2, name: 4}, 10, 0.02, "the new sizes shown")
        jobs = [server.submit(tasks.square, (i,)) for i in range(30)]
        assert [job() for job in jobs] == [i * i for i in range(30)]
        server.set_ncpus(1)  # smaller again while its first two jobs still run: they finish
        assert {n["workers"] for n in cluster.status()["nodes"]} == {1}
        wait_for(lambda: server.get_active_nodes() == {"local": 1, name: 2}, 10, 0.02, "the new sizes shown")
        release(gate)
        assert [job() for job in held] == [1, 4]
        server.set_ncpus(0)  # the local pool only: a node keeps at least one worker
        assert server.get_ncpus() == 0 and cluster.status()["workers"] == 2
        assert server.submit(tasks.square, (7,))() == 49
    finally:
        server.destroy()


def test_pp_set_ncpus_without_ppservers_still_sizes_the_local_pool_alone():
    server = pp.Server(1)
    try:
        server.set_ncpus(2)
        assert server.get_active_nodes() == {"local": 2}
        assert [server.submit(tasks.square, (i,))() for i in range(4)] == [0, 1, 4, 9]
    finally:
        server.destroy()
