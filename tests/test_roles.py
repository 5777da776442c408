"""Roles: producers and agents hold credentials of their own, and every message's key is checked.

With shared secrets the broker may be given an agents' secret apart from the
producers' one: then a producer cannot pose as an agent nor an agent submit.
With key files there is an allow-list per role (the same key may be in
both); removing a key's file cuts off its open connections at once, and an
agent's tasks go to another agent. One key may hold at most
``--max-producers-per-key`` producers at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
import zmq

import zpar
from zpar import protocol as P
from zpar import security
from zpar._embedded import spawn_daemon, stop_processes
from zpar.errors import ConfigError
from zpar.testing import LocalCluster, free_port, wait_for

sys.path.insert(0, os.path.dirname(__file__))
import tasks

ZPAR = os.path.join(os.path.dirname(sys.executable), "zpar")
REFUSAL_BAR = 5.0  # seconds: a refused peer must know within this
TYPED = "test-secret-" + "q7Zr2mXv9LpT4wYk"


def _z85(key: bytes) -> bytes:
    return zmq.utils.z85.decode(key)


def _refused(frontend: str, creds: security.Credentials) -> bool:
    try:
        zpar.client.broker_status(frontend, REFUSAL_BAR, creds)
    except zpar.AuthenticationError:
        return True
    return False


# ---------------------------------------------------------------------- the policy


def test_an_agents_secret_of_their_own_splits_the_roles_in_the_zap_policy():
    producers, agents = security.generate_secret(), security.generate_secret()
    creds = security.broker_credentials(secret=producers, agent_secret=agents)
    assert creds.mode == "curve, shared secret; agents: their own secret"
    p, a = security.derive_keys(producers), security.derive_keys(agents)
    assert creds.keys["frontend"].public == p["broker"].public
    assert creds.keys["backend"].public == creds.keys["collector"].public == a["broker"].public
    policy = security.ZapPolicy(creds)
    for socket_name, admitted, refused in (("frontend", p["producer"], [a["producer"], a["agent"], p["agent"]]),
                                           ("backend", a["agent"], [p["agent"], p["producer"], a["producer"]]),
                                           ("collector", a["agent"], [p["agent"], p["producer"]])):
        assert policy.decide(f"zpar/{socket_name}", b"CURVE", [_z85(admitted.public)])[0]
        for key in refused:
            assert not policy.decide(f"zpar/{socket_name}", b"CURVE", [_z85(key.public)])[0]


def test_an_agents_secret_alone_leaves_producers_on_this_users_secret():
    creds = security.broker_credentials(agent_secret=TYPED)
    assert creds.mode == f"curve, this user's secret {security.user_secret_path()}; agents: their own secret"
    assert creds.admit["frontend"] == {security.derive_keys(security.user_secret())["producer"].public}
    assert creds.admit["backend"] == {security.derive_keys(TYPED)["agent"].public}


def test_key_files_need_an_allow_list_per_role_and_no_secret(tmp_path):
    _, secret = security.make_keypair_files(tmp_path / "keys", "broker")
    with pytest.raises(ConfigError, match="allow_agent_keys"):
        security.broker_credentials(key_file=str(secret), allow_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="allow_keys"):
        security.broker_credentials(key_file=str(secret), agent_allow_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="not both"):
        security.broker_credentials(key_file=str(secret), allow_dir=str(tmp_path), agent_allow_dir=str(tmp_path),
                                    agent_secret=TYPED)
    creds = security.broker_credentials(key_file=str(secret), allow_dir=str(tmp_path / "keys"),
                                        agent_allow_dir=str(tmp_path / "keys"))  # one directory for both roles
    assert creds.allow == {"frontend": str(tmp_path / "keys"), "backend": str(tmp_path / "keys"),
                           "collector": str(tmp_path / "keys")}


# ---------------------------------------------------------------------- shared secrets, one per role


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A broker with --secret-file P (producers) and --agent-secret-file A, and one agent holding A."""
    folder = tmp_path_factory.mktemp("roles")
    paths = {}
    for name in ("producers", "agents"):
        paths[name] = folder / name
        made = subprocess.run([ZPAR, "keygen", "--out", str(paths[name])], capture_output=True, text=True,
                              timeout=30)
        assert made.returncode == 0, made.stderr
    c = LocalCluster(agents=0, workers=1, secret=paths["producers"].read_text().strip(),
                     broker_args=["--secret-file", str(paths["producers"]),
                                  "--agent-secret-file", str(paths["agents"])])
    try:
        c.agents.append(spawn_daemon(["zpar.agent", "--broker", c.backend, "--workers", "1", "--heartbeat", "0.1",
                                      "--secret-file", str(paths["agents"]), "--name", "holds-A",
                                      "--log-level", "WARNING"]))
        c.wait_for_workers(1)
        c.paths = paths
        yield c
    finally:
        assert not c.stop()


def test_an_agent_with_the_agents_secret_runs_tasks_for_a_producer_with_the_producers_secret(split):
    with zpar.Client(split.frontend, secret_file=str(split.paths["producers"])) as client:
        assert list(client.map(tasks.square, range(10), timeout=30)) == [i * i for i in range(10)]
    status = split.status()
    assert status["security"] == "curve, shared secret; agents: their own secret"
    assert [n["name"] for n in status["nodes"]] == ["holds-A"]


def test_a_producer_holding_the_agents_secret_is_refused(split):
    before = split.status()
    start = time.monotonic()
    with pytest.raises(zpar.AuthenticationError):
        zpar.Client(split.frontend, secret_file=str(split.paths["agents"]), connect_timeout=REFUSAL_BAR + 5)
    assert time.monotonic() - start <= REFUSAL_BAR
    after = split.status()
    assert after["counters"]["handshakes_failed"] > before["counters"].get("handshakes_failed", 0)
    assert after["counters"].get("submitted", 0) == before["counters"].get("submitted", 0)


def test_an_agent_holding_the_producers_secret_is_refused_and_never_registers(split):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZPAR_")}
    proc = subprocess.run([sys.executable, "-m", "zpar.agent", "--broker", split.backend, "--workers", "1",
                           "--heartbeat", "0.1", "--secret-file", str(split.paths["producers"]), "--name", "holds-P"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "AuthenticationError" in proc.stderr
    status = split.status()
    assert status["workers"] == 1 and [n["name"] for n in status["nodes"]] == ["holds-A"]


# ---------------------------------------------------------------------- key files, one allow-list per role


class KeyedBroker:
    """A key-file broker: ``producers`` may submit (watcher only asks the status), ``agents`` may serve."""

    def __init__(self, tmp_path, producers=("producer", "watcher", "both"), agents=("agent1", "agent2", "both")):
        self.keys, self.producers, self.agents = tmp_path / "keys", tmp_path / "producers", tmp_path / "agents"
        for folder, names in ((self.producers, producers), (self.agents, agents)):
            folder.mkdir()
            for name in names:
                if not (self.keys / f"{name}.key").exists():
                    security.make_keypair_files(self.keys, name)
                (folder / f"{name}.key").write_bytes((self.keys / f"{name}.key").read_bytes())
        security.make_keypair_files(self.keys, "broker")
        self.procs: dict[str, subprocess.Popen] = {}
        try:
            self._start_broker()
        except BaseException:
            self.stop()
            raise

    def _start_broker(self) -> None:
        for _ in range(3):  # a port free a moment ago may be taken meanwhile: try others
            ports = [free_port() for _ in range(3)]
            self.frontend, self.backend, self.collector = (f"tcp://127.0.0.1:{p}" for p in ports)
            self.procs["broker"] = spawn_daemon(
                ["zpar_broker", "--frontend", self.frontend, "--backend", self.backend, "--collector", self.collector,
                 "--heartbeat", "0.1", "--key-file", str(self.keys / "broker.key_secret"),
                 "--allow-keys", str(self.producers), "--allow-agent-keys", str(self.agents),
                 "--log-level", "WARNING"])
            wait_for(lambda: self.procs["broker"].poll() is not None or self._answers(), 15,
                     what="the broker listening")
            if self.procs["broker"].poll() is None:
                return
        raise OSError("the broker could not bind free ports")

    def creds(self, name: str, role: str = "producer") -> security.Credentials:
        return security.client_credentials(role, key_file=str(self.keys / f"{name}.key_secret"),
                                           broker_key=str(self.keys / "broker.key"))

    def _answers(self) -> bool:
        try:
            self.status(1.0)
        except zpar.BrokerUnavailable:
            return False
        return True

    def status(self, timeout: float = 5.0) -> dict:
        return zpar.client.broker_status(self.frontend, timeout, self.creds("watcher"))

    def agent(self, name: str) -> subprocess.Popen:
        self.procs[name] = spawn_daemon(
            ["zpar.agent", "--broker", self.backend, "--workers", "1", "--heartbeat", "0.1", "--name", name,
             "--key-file", str(self.keys / f"{name}.key_secret"), "--broker-key", str(self.keys / "broker.key"),
             "--log-level", "WARNING"])
        return self.procs[name]

    def wait_for_workers(self, n: int) -> dict:
        return wait_for(lambda: (s := self.status())["workers"] == n and s, 20, what=f"{n} workers registered")

    def client(self, name: str, **kwargs) -> zpar.Client:
        return zpar.Client(self.frontend, key_file=str(self.keys / f"{name}.key_secret"),
                           broker_key=str(self.keys / "broker.key"), **kwargs)

    def stop(self) -> None:
        broker = self.procs.pop("broker", None)
        stop_processes([*self.procs.values(), *([broker] if broker else [])])


@pytest.fixture
def keyed(tmp_path):
    k = KeyedBroker(tmp_path)
    yield k
    k.stop()


def test_a_producers_key_cannot_register_as_an_agent(keyed):
    before = keyed.status()["counters"]
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    creds = keyed.creds("producer", role="agent")
    security.apply_client(dealer, creds)
    monitor = security.HandshakeMonitor(dealer, keyed.backend, security.origin(creds))
    try:
        dealer.connect(keyed.backend)
        dealer.send_multipart(P.encode(P.Hello(P.Role.AGENT, "producer-as-agent", "h", os.getpid(), 4)))
        failure = wait_for(lambda: monitor.socket.poll(50) and monitor.check(), REFUSAL_BAR, what="a refusal")
        assert "refused our key" in failure
        assert not dealer.poll(0), "the broker answered a refused peer"
    finally:
        monitor.close()
        dealer.close()
        ctx.term()
    after = keyed.status()
    assert after["counters"]["auth_refused"] > before.get("auth_refused", 0)
    assert after["workers"] == 0 and after["nodes"] == []
    assert after["counters"].get("messages_backend", 0) == before.get("messages_backend", 0)


def test_an_agents_key_cannot_submit(keyed):
    before = keyed.status()["counters"]
    start = time.monotonic()
    with pytest.raises(zpar.AuthenticationError, match="allow-list"):
        keyed.client("agent1", connect_timeout=REFUSAL_BAR + 5)
    assert time.monotonic() - start <= REFUSAL_BAR
    after = keyed.status()["counters"]
    assert after["auth_refused"] > before.get("auth_refused", 0)
    assert after.get("submitted", 0) == 0


def test_a_key_in_both_allow_lists_may_serve_and_submit(keyed):
    keyed.agent("both")
    status = keyed.wait_for_workers(1)
    assert status["security"] == f"curve, key files: producers {keyed.producers}, agents {keyed.agents}"
    with keyed.client("both") as client:
        assert client.submit(tasks.square, 11).result(timeout=30) == 121


def test_removing_a_producers_key_cuts_off_its_idle_connection_and_nothing_runs(keyed, tmp_path):
    keyed.agent("agent1")
    keyed.wait_for_workers(1)
    evidence = tmp_path / "ran"
    with keyed.client("producer") as client:
        assert client.submit(tasks.square, 3).result(timeout=30) == 9  # connected; now idle
        (keyed.producers / "producer.key").unlink()
        # A handshake reads the list again: once a new connection with this key is refused, so is
        # every message of the open one (between handshakes the list is looked at every 5 ms).
        wait_for(lambda: _refused(keyed.frontend, keyed.creds("producer")), REFUSAL_BAR, what="the key refused")
        start = time.monotonic()
        with pytest.raises(zpar.AuthenticationError, match="cut us off"):
            client.submit(tasks.touch, str(evidence)).result(timeout=REFUSAL_BAR + 5)
        assert time.monotonic() - start <= REFUSAL_BAR
    status = keyed.status()
    assert (status["queued"], status["running"], status["done"]) == (0, 0, 1)
    assert status["counters"]["revoked_messages"] >= 1
    assert not evidence.exists()
    assert keyed.procs["agent1"].poll() is None  # producers' keys say nothing of the agents


def test_removing_an_agents_key_cuts_it_off_and_its_task_goes_to_another_agent(keyed, gate):
    keyed.agent("agent1")
    keyed.agent("agent2")
    keyed.wait_for_workers(2)
    with keyed.client("producer") as client:
        future = client.submit(tasks.block_until, gate, 30, "finished")
        status = wait_for(lambda: (s := keyed.status())["running"] == 1 and s, 20, what="the task running")
        holder = next(n["name"] for n in status["nodes"] if n["running"] == 1)
        other = "agent2" if holder == "agent1" else "agent1"
        (keyed.agents / f"{holder}.key").unlink()
        assert keyed.procs[holder].wait(REFUSAL_BAR + 3) == 1, "the revoked agent should stop"
        wait_for(lambda: [(n["name"], n["running"]) for n in keyed.status()["nodes"]] == [(other, 1)], 10,
                 what="the task running on the other agent")
        open(gate, "w").close()
        assert future.result(timeout=30) == "finished"
        workers = {w.pid for w in psutil.Process(keyed.procs[other].pid).children()}
        assert client.submit(tasks.worker_pid).result(timeout=30) in workers
    counters = keyed.status()["counters"]
    assert counters["peers_revoked"] == 1


# ---------------------------------------------------------------------- producers per key


def test_a_key_past_max_producers_per_key_is_refused_at_once_until_one_leaves(new_cluster):
    c = new_cluster(agents=1, workers=1, broker_args=["--max-producers-per-key", "2"])
    first, second = c.client(), c.client()
    start = time.monotonic()
    with pytest.raises(zpar.QuotaExceeded, match="max-producers-per-key"):
        zpar.Client(c.frontend, connect_timeout=REFUSAL_BAR + 5)
    assert time.monotonic() - start <= REFUSAL_BAR
    assert c.status()["counters"]["producers_refused_per_key"] >= 1  # per HELLO refused (a client may send two)
    assert second.submit(tasks.square, 4).result(timeout=30) == 16  # those admitted carry on
    first.close()

    def connects() -> zpar.Client | None:
        try:
            return zpar.Client(c.frontend, connect_timeout=REFUSAL_BAR)
        except zpar.QuotaExceeded:
            return None

    with wait_for(connects, 10, what="the closed client's place free again") as third:
        assert third.submit(tasks.square, 5).result(timeout=30) == 25
