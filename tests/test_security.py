"""Security: CurveZMQ from a shared secret or key files; refused peers fail fast and reach nothing.

Every refusal is checked three ways: the peer gets AuthenticationError (or
exits) within 5 s, the broker counts a failed handshake, and no message of
the refused peer reaches the broker's application code.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq

import zpar
from zpar import security
from zpar._embedded import spawn_daemon, stop_processes
from zpar.config import BrokerConfig
from zpar.errors import ConfigError
from zpar.testing import LocalCluster, free_port, wait_for

sys.path.insert(0, os.path.dirname(__file__))
import tasks

SECRET = "test-secret-" + "q7Zr2mXv9LpT4wYk"
ZPAR = os.path.join(os.path.dirname(sys.executable), "zpar")  # the console script of this environment
REFUSAL_BAR = 5.0  # seconds: the bar for every refused case


@pytest.fixture(scope="module")
def secured():
    c = LocalCluster(agents=1, workers=1, secret=SECRET)
    yield c
    killed = c.stop()
    assert not killed


def _counters(cluster: LocalCluster) -> dict:
    return cluster.status()["counters"]


# ---------------------------------------------------------------------- secrets and keys


@pytest.mark.parametrize("bad", ["", "   ", "short-secret", "changeme", "password", "epo20pdosl;dksldkmm",
                                 "a" * 40, "abababababababababab"])
def test_empty_short_and_well_known_secrets_are_refused(bad):
    with pytest.raises(ConfigError, match="zpar keygen"):
        security.check_secret(bad)


def test_keys_derive_the_same_everywhere_and_differ_per_role():
    a, b = security.derive_keys(SECRET), security.derive_keys(SECRET.encode())
    assert {r: k.public for r, k in a.items()} == {r: k.public for r, k in b.items()}
    assert len({k.public for k in a.values()}) == 3
    other = security.derive_keys(SECRET + "x")
    assert other["broker"].public != a["broker"].public
    assert a["agent"].secret.decode() not in repr(a["agent"])


def test_keygen_prints_a_strong_secret_and_writes_key_files(tmp_path):
    out = subprocess.run([ZPAR, "keygen"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip()
    assert security.check_secret(secret) and len(secret) >= 40
    done = subprocess.run([ZPAR, "keygen", "--keys", str(tmp_path), "--name", "node1"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "node1.key").exists()
    assert (tmp_path / "node1.key_secret").stat().st_mode & 0o777 == 0o600
    pair = security.load_keypair(tmp_path / "node1.key_secret", need_secret=True)
    assert pair.public == security.load_keypair(tmp_path / "node1.key", need_secret=False).public


def test_binding_every_interface_without_a_secret_is_authenticated_with_this_users_secret():
    conf = BrokerConfig(frontend="tcp://0.0.0.0:5555")
    assert not conf.secured and not conf.insecure
    creds = security.broker_credentials()
    assert creds.mode == f"curve, this user's secret {security.user_secret_path()}"
    keys = security.derive_keys(security.user_secret())
    assert creds.admit["frontend"] == {keys["producer"].public}
    assert creds.admit["backend"] == creds.admit["collector"] == {keys["agent"].public}
    with pytest.raises(ConfigError, match="needs a scheme"):
        BrokerConfig(frontend="0.0.0.0:5555")


def test_a_broker_on_every_interface_with_no_secret_admits_a_default_client_and_refuses_an_insecure_one():
    ports = [free_port() for _ in range(3)]
    frontend, backend, collector = (f"tcp://0.0.0.0:{port}" for port in ports)
    broker = spawn_daemon(["zpar_broker", "--frontend", frontend, "--backend", backend, "--collector", collector,
                           "--heartbeat", "0.1", "--log-level", "WARNING"])
    agent = spawn_daemon(["zpar.agent", "--broker", f"tcp://127.0.0.1:{ports[1]}", "--workers", "1",
                          "--heartbeat", "0.1", "--log-level", "WARNING"])
    frontend = f"tcp://127.0.0.1:{ports[0]}"

    def joined() -> dict | None:
        assert broker.poll() is None, "the broker exited"
        try:
            status = zpar.client.broker_status(frontend, 1.0)
        except zpar.BrokerUnavailable:
            return None
        return status if status["workers"] == 1 else None

    try:
        status = wait_for(joined, 20, what="the broker answering and the agent joined")
        assert status["security"] == f"curve, this user's secret {security.user_secret_path()}"
        with zpar.Client(frontend) as client:
            assert client.submit(tasks.square, 9).result(timeout=30) == 81
        start = time.monotonic()
        with pytest.raises(zpar.AuthenticationError, match="--insecure"):
            zpar.Client(frontend, insecure=True, connect_timeout=REFUSAL_BAR + 5)
        assert time.monotonic() - start <= REFUSAL_BAR
    finally:
        stop_processes([agent, broker])


# ---------------------------------------------------------------------- a secured cluster


def test_a_client_with_the_secret_runs_tasks(secured):
    with secured.client() as client:
        assert list(client.map(tasks.square, range(50), timeout=30)) == [i * i for i in range(50)]
    assert secured.status()["security"] == "curve, shared secret"


@pytest.mark.parametrize("how", ["this user's secret (none given)", "wrong secret", "agent's key",
                                 "only the broker's public key"])
def test_a_refused_producer_gets_authentication_error_fast_and_sends_nothing(secured, how):
    before = _counters(secured)
    kwargs: dict = {}
    if how == "wrong secret":
        kwargs["secret"] = SECRET + "-wrong"
    start = time.monotonic()
    if how in ("agent's key", "only the broker's public key"):
        keys = security.derive_keys(SECRET)
        own = keys["agent"] if how == "agent's key" else security.KeyPair(*zmq.curve_keypair())
        creds = security.Credentials(own, security.KeyPair(keys["broker"].public))
        attempt = functools.partial(zpar.client.broker_status, secured.frontend, REFUSAL_BAR + 5, creds)
    else:
        attempt = functools.partial(zpar.Client, secured.frontend, connect_timeout=REFUSAL_BAR + 5, **kwargs)
    with pytest.raises(zpar.AuthenticationError) as info:
        attempt()
    took = time.monotonic() - start
    assert took <= REFUSAL_BAR, f"refused after {took:.2f} s"
    assert "broker" in str(info.value)
    after = _counters(secured)
    assert after["handshakes_failed"] > before.get("handshakes_failed", 0)
    # Only our own two status requests reached the broker's code.
    assert after["messages_frontend"] - before["messages_frontend"] == 1
    assert after.get("protocol_errors", 0) == before.get("protocol_errors", 0)


@pytest.mark.parametrize("port", ["frontend", "backend", "collector"])
def test_a_plain_zeromq_peer_reaches_nothing_on_any_port(secured, port):
    before = _counters(secured)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH if port == "collector" else zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = security.HandshakeMonitor(sock, getattr(secured, port), None)
    try:
        sock.connect(getattr(secured, port))
        for _ in range(5):
            try:
                sock.send_multipart(zpar.protocol.encode(zpar.protocol.Hello(zpar.protocol.Role.AGENT, "intruder",
                                                                             "h", 1, 9)), zmq.NOBLOCK)
            except zmq.Again:
                pass
        failure = wait_for(lambda: monitor.socket.poll(50) and monitor.check(), REFUSAL_BAR, what="a refusal")
        assert "requires authentication" in failure
    finally:
        monitor.close()
        sock.close()
    asked = [0]  # our own status requests reach the frontend too

    def counted() -> bool:
        asked[0] += 1
        return _counters(secured)["handshakes_failed"] > before.get("handshakes_failed", 0)

    wait_for(counted, 5, what="the broker counting the failed handshake")
    after = secured.status()
    if port == "frontend":
        assert after["counters"]["messages_frontend"] - before["messages_frontend"] == asked[0] + 1
    elif port == "collector":
        assert after["counters"].get("messages_collector", 0) == before.get("messages_collector", 0)
    assert after["workers"] == 1 and "intruder" not in [n["name"] for n in after["nodes"]]
    assert after["counters"].get("protocol_errors", 0) == before.get("protocol_errors", 0)


def test_an_agent_with_a_wrong_secret_exits_with_an_error(secured):
    env = {**os.environ, "ZPAR_SECRET": SECRET + "-wrong"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "zpar.agent", "--broker", secured.backend, "--workers", "1",
                           "--heartbeat", "0.1", "--log-level", "INFO"],
                          env=env, capture_output=True, text=True, timeout=30)
    took = time.monotonic() - start
    assert proc.returncode == 1
    assert "AuthenticationError" in proc.stderr and "secret" in proc.stderr
    assert took <= REFUSAL_BAR + 2, f"exited after {took:.2f} s"  # + interpreter start-up
    assert secured.status()["workers"] == 1


def test_a_good_client_keeps_working_while_a_bad_one_reconnects_in_a_loop(secured):
    stop = threading.Event()
    attempts = [0]

    def intruder() -> None:
        ctx = zmq.Context.instance()
        while not stop.is_set():
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(secured.frontend)
            try:
                s.send(b"\x80", zmq.NOBLOCK)
            except zmq.Again:
                pass
            attempts[0] += 1
            s.poll(20)
            s.close()

    thread = threading.Thread(target=intruder, daemon=True)
    before = _counters(secured)
    thread.start()
    try:
        with secured.client() as client:
            deadline = time.monotonic() + 30
            maps = 0
            while maps < 3 or attempts[0] < 20:  # long enough for the intruder to be refused many times
                assert time.monotonic() < deadline, f"{maps} maps, {attempts[0]} intruder attempts in 30 s"
                assert sum(client.map(tasks.square, range(2000), chunksize=10, timeout=60)) == sum(
                    i * i for i in range(2000))
                maps += 1
    finally:
        stop.set()
        thread.join(10)
    after = _counters(secured)
    assert after["handshakes_failed"] - before.get("handshakes_failed", 0) >= 10
    assert after.get("protocol_errors", 0) == before.get("protocol_errors", 0)


# ---------------------------------------------------------------------- key files


@pytest.fixture
def keyed(tmp_path):
    """A broker with its own key and an allow-list per role: node1 (and watcher) may submit, node1 may serve."""
    keys, allow, agents = tmp_path / "keys", tmp_path / "allow", tmp_path / "agents"
    allow.mkdir()
    agents.mkdir()
    for name in ("broker", "node1", "node2", "watcher"):
        security.make_keypair_files(keys, name)
    for folder, name in ((allow, "node1"), (allow, "watcher"), (agents, "node1")):
        (folder / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    ports = [free_port() for _ in range(3)]
    frontend, backend, collector = (f"tcp://127.0.0.1:{p}" for p in ports)
    broker = spawn_daemon(["zpar_broker", "--frontend", frontend, "--backend", backend, "--collector", collector,
                           "--heartbeat", "0.1", "--key-file", str(keys / "broker.key_secret"),
                           "--allow-keys", str(allow), "--allow-agent-keys", str(agents), "--log-level", "WARNING"])
    procs = [broker]

    def agent(name: str) -> subprocess.Popen:
        proc = spawn_daemon(["zpar.agent", "--broker", backend, "--workers", "1", "--heartbeat", "0.1",
                             "--key-file", str(keys / f"{name}.key_secret"), "--broker-key", str(keys / "broker.key"),
                             "--log-level", "WARNING"])
        procs.append(proc)
        return proc

    def creds(name: str) -> security.Credentials:
        return security.client_credentials("producer", key_file=str(keys / f"{name}.key_secret"),
                                           broker_key=str(keys / "broker.key"))

    class Keyed:
        pass

    k = Keyed()
    k.keys, k.allow, k.agents, k.frontend = keys, allow, agents, frontend
    k.broker, k.agent, k.creds = broker, agent, creds
    yield k
    stop_processes(procs)


def _status(k, name: str = "watcher") -> dict:
    return wait_for(lambda: _try_status(k, name), 10, what="the broker answering")


def _try_status(k, name):
    try:
        return zpar.client.broker_status(k.frontend, 1.0, k.creds(name))
    except zpar.BrokerUnavailable:
        return None


def test_key_files_admit_the_allow_list_and_refuse_others(keyed):
    keyed.agent("node1")
    wait_for(lambda: _status(keyed)["workers"] == 1, 15, what="node1's agent joined")
    with zpar.Client(keyed.frontend, key_file=str(keyed.keys / "node1.key_secret"),
                     broker_key=str(keyed.keys / "broker.key")) as client:
        assert client.submit(tasks.square, 7).result(timeout=30) == 49
    start = time.monotonic()
    with pytest.raises(zpar.AuthenticationError, match="allow-list"):
        zpar.Client(keyed.frontend, key_file=str(keyed.keys / "node2.key_secret"),
                    broker_key=str(keyed.keys / "broker.key"), connect_timeout=10)
    assert time.monotonic() - start <= REFUSAL_BAR
    bad_agent = keyed.agent("node2")
    assert bad_agent.wait(REFUSAL_BAR + 3) == 1
    assert _status(keyed)["security"] == f"curve, key files: producers {keyed.allow}, agents {keyed.agents}"


def test_removing_a_key_file_revokes_it_without_a_restart(keyed):
    assert _status(keyed, "node1")["workers"] == 0
    (keyed.allow / "node1.key").unlink()
    with pytest.raises(zpar.AuthenticationError):
        zpar.client.broker_status(keyed.frontend, 10, keyed.creds("node1"))
    # and back, picked up on SIGHUP (a file rewritten in place changes no directory time)
    (keyed.allow / "node1.key").write_bytes((keyed.keys / "node1.key").read_bytes())
    keyed.broker.send_signal(signal.SIGHUP)
    assert _status(keyed, "node1")["workers"] == 0
    assert keyed.broker.poll() is None


# ---------------------------------------------------------------------- on the wire


def test_no_pickle_or_argument_bytes_cross_loopback_in_clear(secured):
    """Capture the loopback traffic of a run with a raw socket (root only) and look for the payload."""
    try:
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    except (PermissionError, AttributeError, OSError) as exc:
        pytest.skip(f"no raw packet socket here ({exc}); needs root on Linux")
    sniffer.bind(("lo", 0))
    sniffer.settimeout(0.05)
    marker = b"ZPAR-PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    captured = bytearray()
    stop = threading.Event()

    ports = set(secured.ports)

    def capture() -> None:
        while not stop.is_set():
            try:
                packet = sniffer.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            ip = packet[14:]  # past the (all-zero) Ethernet header of lo
            if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != 6:  # IPv4 and TCP only
                continue
            tcp = ip[(ip[0] & 0xF) * 4:]
            if {int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")} & ports:
                captured.extend(tcp)  # this cluster's traffic, not other tests'

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    try:
        with secured.client() as client:
            assert client.submit(tasks.identity, marker * 100).result(timeout=30) == marker * 100
            assert client.submit(tasks.square, 12345).result(timeout=30) == 12345 ** 2
    finally:
        stop.set()
        thread.join(5)
        sniffer.close()
    assert len(captured) > 1000, "nothing captured"
    assert marker not in captured
    for opcode_run in (b"\x80\x05\x95", b"cloudpickle", b"tasks\x94", b"echo"):
        assert opcode_run not in captured, f"{opcode_run!r} seen in clear"


# ---------------------------------------------------------------------- the embedded default and limits


def test_the_embedded_cluster_listens_on_no_tcp_port_and_keeps_its_sockets_private(embedded_client):
    import psutil

    cluster = embedded_client._cluster
    assert embedded_client.address.startswith("ipc://")
    assert os.stat(cluster.dir).st_mode & 0o777 == 0o700
    for proc in cluster.procs:
        family = psutil.Process(proc.pid)
        for p in [family, *family.children(recursive=True)]:
            listening = [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            assert not listening, f"pid {p.pid} listens on {listening}"


def test_the_embedded_dashboard_listens_on_loopback_only_when_asked_and_only_for_its_token():
    import urllib.error
    import urllib.request

    import psutil

    with zpar.Client(workers=1) as client:
        hub = psutil.Process(client._cluster.procs[0].pid)
        assert not [c for c in hub.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        link = client.dashboard_link
        (port,) = [c.laddr for c in hub.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert port.ip == "127.0.0.1" and link.startswith(f"http://127.0.0.1:{port.port}/?token=")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port.port}/api/status", timeout=10)
        assert refused.value.code == 401


def test_an_argument_over_the_frame_limit_fails_at_submit_before_anything_is_sent(cluster_client):
    # Over the wire (the embedded cluster moves big buffers through shared memory: no frame limit there).
    np = pytest.importorskip("numpy")
    huge = np.zeros((zpar.protocol.MAX_MESSAGE_SIZE // 8) + 1)  # calloc'd: no memory is touched
    with pytest.raises(zpar.PayloadTooLarge, match="MiB"):
        cluster_client.submit(len, huge)
    assert cluster_client.submit(len, huge[:10]).result(timeout=30) == 10


from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(st.lists(st.binary(max_size=64), max_size=12))
@example([b"peer", b"", b"1.0", b"request", b"zpar/frontend", b"127.0.0.1", b"", b"CURVE", b"k" * 32])  # answered
def test_the_zap_policy_answers_or_drops_any_request_without_raising(frames):
    policy = security.ZapPolicy(security.broker_credentials(secret=SECRET))
    reply, admitted, _ = policy.reply(frames)
    assert not admitted or frames[7] == b"CURVE"
    assert reply == [] or reply[4] in (b"200", b"400")  # after the envelope (2), version and request id


def test_the_zap_policy_admits_each_role_only_on_its_own_sockets():
    keys = security.derive_keys(SECRET)
    policy = security.ZapPolicy(security.broker_credentials(secret=SECRET))
    raw = {role: zmq.utils.z85.decode(k.public) for role, k in keys.items()}
    assert policy.decide("zpar/frontend", b"CURVE", [raw["producer"]])[0]
    assert policy.decide("zpar/backend", b"CURVE", [raw["agent"]])[0]
    assert policy.decide("zpar/collector", b"CURVE", [raw["agent"]])[0]
    assert not policy.decide("zpar/frontend", b"CURVE", [raw["agent"]])[0]
    assert not policy.decide("zpar/backend", b"CURVE", [raw["producer"]])[0]
    assert not policy.decide("zpar/backend", b"NULL", [])[0]
    assert not policy.decide("other/backend", b"CURVE", [raw["agent"]])[0]


def test_without_an_authenticator_answering_no_one_gets_in():
    """Fail closed: a server socket set up by apply_server, in a context with no ZAP handler."""
    ctx = zmq.Context()  # a context of its own: no handler bound at inproc://zeromq.zap.01
    creds = security.broker_credentials(secret=SECRET)
    server = ctx.socket(zmq.ROUTER)
    client = ctx.socket(zmq.DEALER)
    try:
        security.apply_server(server, creds, "frontend")
        port = server.bind_to_random_port("tcp://127.0.0.1")
        good = security.client_credentials("producer", secret=SECRET)
        security.apply_client(client, good)
        monitor = security.HandshakeMonitor(client, f"tcp://127.0.0.1:{port}", security.origin(good))
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hello")
        failure = wait_for(lambda: monitor.socket.poll(50) and monitor.check(), REFUSAL_BAR, what="a refusal")
        assert failure and monitor.succeeded == 0
        assert not server.poll(200), "a message got through with no authenticator"
        monitor.close()
    finally:
        client.close(linger=0)
        server.close(linger=0)
        ctx.term()


def test_revoking_a_connected_node_cuts_it_off_and_its_work_goes_elsewhere(keyed):
    (keyed.agents / "node2.key").write_bytes((keyed.keys / "node2.key").read_bytes())
    node1, node2 = keyed.agent("node1"), keyed.agent("node2")
    wait_for(lambda: _status(keyed)["workers"] == 2, 15, what="both agents joined")
    with zpar.Client(keyed.frontend, key_file=str(keyed.keys / "node1.key_secret"),
                     broker_key=str(keyed.keys / "broker.key")) as client:
        (keyed.agents / "node2.key").unlink()
        assert node2.wait(REFUSAL_BAR + 3) == 1, "the revoked agent should stop"
        assert _status(keyed)["workers"] == 1
        assert list(client.map(tasks.square, range(20), timeout=30)) == [i * i for i in range(20)]
        assert _status(keyed)["counters"]["peers_revoked"] == 1
        (keyed.allow / "node1.key").unlink()  # node1 may no longer submit; it still serves as an agent
        with pytest.raises(zpar.AuthenticationError, match="cut us off"):
            wait_for(lambda: client.submit(tasks.square, 2).result(timeout=REFUSAL_BAR) and False, REFUSAL_BAR + 5)
    assert node1.poll() is None and _status(keyed)["workers"] == 1
    (keyed.agents / "node1.key").unlink()
    assert node1.wait(REFUSAL_BAR + 3) == 1


def test_with_key_files_zpar_status_gives_the_dashboard_address_but_not_its_token(keyed):
    """Producers of a key-file cluster are not trusted with each other's work: the token stays in the log."""
    import urllib.error
    import urllib.request

    link = _status(keyed)["dashboard"]
    assert link.startswith("http://127.0.0.1:") and "token" not in link
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(link + "api/status", timeout=10)  # noqa: S310 - the broker's own http:// address
    assert refused.value.code == 401


def test_with_key_files_status_lists_no_ones_tasks(keyed):
    info = wait_for(lambda: _try_status_with(keyed, {"tasks": {"limit": 5}}), 10, what="the broker answering")
    assert "tasks" not in info and "/api/tasks" in info["tasks_refused"]


def _try_status_with(k, request):
    try:
        return zpar.client.broker_status(k.frontend, 1.0, k.creds("watcher"), request=request)
    except zpar.BrokerUnavailable:
        return None
