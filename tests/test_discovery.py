"""Discovery on a LAN: the broker announces itself over mDNS; agents, clients and pp find it.

The rules (TXT record, which broker is taken) are tested as plain functions.
The issue's bar runs for real between two network namespaces joined by a veth
pair (made as root; skipped with the reason otherwise): an agent with
``--discover`` and the shared secret joins and runs tasks, one with a wrong
secret is refused, and an impostor repeating the broker's announcement gets
a clear AuthenticationError.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from zpar import _discovery as D
from zpar import protocol as P
from zpar import security
from zpar.config import AgentConfig, BrokerConfig, load
from zpar.errors import AuthenticationError, BrokerUnavailable, ConfigError
from zpar.testing import wait_for

SECRET = security.generate_secret()  # a keygen secret: no scrypt in each process
KEYS = security.derive_keys(SECRET)


def _creds(secret: str = SECRET, role: str = "agent") -> security.Credentials:
    keys = security.derive_keys(secret)
    return security.Credentials(keys[role], security.KeyPair(keys["broker"].public))


def _announcement(cluster: str = "lab", secret: str = SECRET, **kw) -> D.Announcement:
    keys = security.derive_keys(secret)
    fields = dict(name=f"{cluster}-0123abcd", cluster=cluster, hosts=("10.0.0.5",), frontend=5555, backend=5556,
                  collector=5557, security="secret", fingerprint=D.fingerprint(keys["broker"].public),
                  agent_fingerprint=D.fingerprint(keys["broker"].public))
    return D.Announcement(**(fields | kw))


# ---------------------------------------------------------------------- the TXT record


def test_an_announcement_round_trips_through_its_txt_record_as_zeroconf_returns_it():
    ann = _announcement()
    props = {k.encode(): v.encode() for k, v in ann.txt().items()}  # zeroconf hands back bytes
    assert D.Announcement.from_txt(ann.name, ann.hosts, props) == ann
    assert ann.txt()["proto"] == str(P.VERSION) and ann.txt()["txtvers"] == "1"


def test_the_fingerprint_is_a_hash_and_not_the_broker_key():
    public = KEYS["broker"].public
    fp = D.fingerprint(public)
    assert len(fp) == 32 and public.decode() not in fp and fp == D.fingerprint(public)
    assert D.fingerprint(security.derive_keys(security.generate_secret())["broker"].public) != fp


@pytest.mark.parametrize("change", [{"txtvers": "2"}, {"frontend": "70000"}, {"backend": "x"}, {"proto": "v2"},
                                    {"security": "maybe"}, {"cluster": "bad name"}, {"cluster": ""},
                                    {"fp": "zz"}])
def test_a_malformed_or_future_txt_record_is_rejected(change):
    with pytest.raises(ValueError, match=r"."):  # ConfigError (a bad name) is a ValueError too
        D.Announcement.from_txt("x", ("10.0.0.5",), _announcement().txt() | change)


def test_an_unknown_txt_key_is_ignored_for_later_versions():
    ann = _announcement()
    assert D.Announcement.from_txt(ann.name, ann.hosts, ann.txt() | {"extra": "1"}) == ann


def test_the_address_is_picked_on_a_network_we_share():
    import ipaddress

    ann = _announcement(hosts=("172.17.0.1", "10.0.0.5"))
    assert ann.address("agent", [ipaddress.ip_network("10.0.0.0/24")]) == "tcp://10.0.0.5:5556"
    assert ann.address("producer", []) == "tcp://172.17.0.1:5555"


# ---------------------------------------------------------------------- which broker is taken


def test_the_one_broker_with_our_key_is_taken_and_others_are_skipped():
    ours, theirs = _announcement("ours"), _announcement("theirs", security.generate_secret())
    assert D.choose([theirs, ours], "agent", _creds()) == ours


def test_a_broker_whose_key_differs_from_ours_refuses_us_with_a_hint():
    with pytest.raises(AuthenticationError, match=r"does not match .*secret") as info:
        D.choose([_announcement()], "agent", _creds(security.generate_secret()))
    assert "'lab' at 10.0.0.5" in str(info.value)


def test_with_key_files_only_the_known_broker_keys_announcement_is_taken():
    import zmq

    known, other = (security.KeyPair(*zmq.curve_keypair()) for _ in range(2))
    creds = security.Credentials(security.KeyPair(*zmq.curve_keypair()), security.KeyPair(known.public))
    real = _announcement("real", security="keys", fingerprint=D.fingerprint(known.public),
                         agent_fingerprint=D.fingerprint(known.public))
    fake = _announcement("fake", security="keys", fingerprint=D.fingerprint(other.public),
                         agent_fingerprint=D.fingerprint(other.public))
    assert D.choose([fake, real], "agent", creds) == real
    with pytest.raises(AuthenticationError, match="'fake'"):
        D.choose([fake], "producer", creds)


def test_several_brokers_for_us_are_refused_with_a_list_unless_one_is_named():
    a, b = _announcement("alpha"), _announcement("beta")
    with pytest.raises(ConfigError, match=r"2 zpar brokers.*'alpha'.*'beta'.*--cluster NAME"):
        D.choose([b, a], "producer", _creds(role="producer"))
    assert D.choose([b, a], "producer", _creds(role="producer"), cluster="beta") == b


def test_nothing_found_says_how_to_announce_and_what_was_seen():
    with pytest.raises(BrokerUnavailable, match=r"within 3 s.*0.0.0.0.*--no-announce"):
        D.choose([], "agent", _creds(), waited=3)
    with pytest.raises(BrokerUnavailable, match=r"'old'.*speaks protocol 1"):
        D.choose([_announcement("old", protocol=1)], "agent", _creds())
    with pytest.raises(BrokerUnavailable, match="no zpar broker of cluster 'prod'"):
        D.choose([], "agent", _creds(), cluster="prod")


def test_a_role_needs_its_port_and_the_agents_fingerprint_is_the_backends():
    agents_own = security.generate_secret()
    ann = _announcement(frontend=0, agent_fingerprint=D.fingerprint(security.derive_keys(agents_own)["broker"].public))
    with pytest.raises(BrokerUnavailable, match="takes no producers"):
        D.choose([ann], "producer", _creds(role="producer"))
    assert D.choose([ann], "agent", _creds(agents_own)) == ann


def test_insecure_peers_take_only_insecure_brokers_and_the_reverse():
    open_one = _announcement("open", security="none", fingerprint="", agent_fingerprint="")
    assert D.choose([open_one, _announcement()], "agent", None) == open_one
    with pytest.raises(BrokerUnavailable, match="runs --insecure"):
        D.choose([open_one], "agent", _creds())


# ---------------------------------------------------------------------- what a broker announces, and settings


def test_a_broker_on_loopback_or_ipc_announces_nothing():
    loop = {"frontend": "tcp://127.0.0.1:5555", "backend": "tcp://127.0.0.1:5556"}
    assert D.broker_announcement(loop, "c", "e" * 32, "secret", {}) is None
    assert D.broker_announcement({"frontend": "ipc:///tmp/x"}, "c", "e" * 32, "none", {}) is None


def test_a_broker_on_one_address_announces_it_with_its_ports_and_fingerprints():
    endpoints = {"frontend": "tcp://10.1.2.3:7000", "backend": "tcp://10.1.2.3:7001", "collector": "tcp://10.1.2.3:7002"}
    keys = {"frontend": KEYS["broker"].public, "backend": b"x" * 40}
    ann, interfaces = D.broker_announcement(endpoints, "lab", "0123456789abcdef", "secret", keys)
    assert interfaces == ["10.1.2.3"] and ann.hosts == ("10.1.2.3",)
    assert (ann.frontend, ann.backend, ann.collector, ann.cluster) == (7000, 7001, 7002, "lab")
    assert ann.name == "lab-01234567" and ann.fingerprint == D.fingerprint(KEYS["broker"].public)
    assert ann.agent_fingerprint == D.fingerprint(b"x" * 40)


def test_announce_and_discover_settings_come_from_flags_variables_and_files(tmp_path):
    assert BrokerConfig().announce == "auto"
    assert load(BrokerConfig, {}, {"ZPAR_ANNOUNCE": "no", "ZPAR_CLUSTER": "prod"}).announce == "off"
    toml = tmp_path / "zpar.toml"
    toml.write_text('[agent]\ndiscover = true\ncluster = "prod"\n[broker]\nannounce = false\n')
    agent = load(AgentConfig, {}, {}, str(toml))
    assert (agent.discover, agent.cluster) == (True, "prod")
    assert load(BrokerConfig, {}, {}, str(toml)).announce == "off"
    with pytest.raises(ConfigError, match="cluster name"):
        BrokerConfig(cluster="no spaces")
    with pytest.raises(ConfigError, match="announce must be"):
        BrokerConfig(announce="sometimes")


def test_an_agent_given_both_an_address_and_discover_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "zpar.agent", "--broker", "tcp://10.0.0.1:5556", "--discover"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_zeroconf_is_not_imported_by_zpar_a_client_or_a_loopback_broker():
    code = textwrap.dedent("""
        import sys, zpar
        from zpar.config import BrokerConfig
        from zpar.testing import free_port
        from zpar_broker.server import BrokerServer
        ports = [free_port() for _ in range(3)]
        server = BrokerServer(BrokerConfig(*(f"tcp://127.0.0.1:{p}" for p in ports), dashboard="off"))
        server.start()
        server.close()
        with zpar.Client(workers=1) as client:
            assert client.submit(abs, -1).result(timeout=30) == 1
        print(sorted(m for m in sys.modules if m.startswith(("zeroconf", "ifaddr"))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- two network namespaces


BROKER_IP, AGENT_IP = "10.231.0.1", "10.231.0.2"


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.fixture
def lan():
    """Two network namespaces ("broker", "agent") joined by a veth pair; removed even if the test fails."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to make network namespaces")
    tag = f"zd{os.getpid()}"  # unique per run: parallel runs do not collide
    ns = {"broker": f"{tag}b", "agent": f"{tag}a"}
    made: list[str] = []
    try:
        for name in ns.values():
            done = _run("ip", "netns", "add", name)
            if done.returncode:
                pytest.skip(f"ip netns add failed: {done.stderr.strip()}")
            made.append(name)
        ends = {"broker": f"{tag}vb", "agent": f"{tag}va"}
        steps = [("ip", "link", "add", ends["broker"], "type", "veth", "peer", "name", ends["agent"])]
        for role, ip in (("broker", BROKER_IP), ("agent", AGENT_IP)):
            steps += [("ip", "link", "set", ends[role], "netns", ns[role]),
                      ("ip", "-n", ns[role], "addr", "add", f"{ip}/24", "dev", ends[role]),
                      ("ip", "-n", ns[role], "link", "set", ends[role], "multicast", "on", "up"),
                      ("ip", "-n", ns[role], "link", "set", "lo", "up")]
        for step in steps:
            done = _run(*step)
            if done.returncode:
                pytest.skip(f"{' '.join(step)} failed: {done.stderr.strip()}")
        yield ns
    finally:
        for name in made:
            _run("ip", "netns", "del", name)  # the veth pair goes with its namespaces


class Procs:
    """Processes started in the namespaces: stopped at teardown, whatever happened."""

    def __init__(self, ns: dict[str, str], tmp_path) -> None:
        self.ns, self.tmp, self.procs = ns, tmp_path, []

    def start(self, where: str, args: list[str], env: dict[str, str], name: str, **kw) -> subprocess.Popen[str]:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed in stop(), when the process has ended
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[where], *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True, **kw)
        self.procs.append((proc, log))
        return proc

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def stop(self) -> None:
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, log in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            log.close()


@pytest.fixture
def procs(lan, tmp_path):
    started = Procs(lan, tmp_path)
    yield started
    started.stop()


def _env(secret: str = SECRET) -> dict[str, str]:
    return {**os.environ, "ZPAR_SECRET": secret, "PYTHONUNBUFFERED": "1", "ZPAR_ANNOUNCE": "auto"}


def _python(lan, where: str, code: str, secret: str = SECRET, timeout: float = 60) -> dict:
    """Run ``code`` (which prints one JSON line last) in namespace ``where``; its answer."""
    out = subprocess.run(["ip", "netns", "exec", lan[where], sys.executable, "-c", textwrap.dedent(code)],
                         env=_env(secret), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# What a producer in the agent's namespace does: find the broker, wait for the agent, run tasks (Client and pp).
PRODUCER = """
    import json, zpar
    from zpar import pp
    from zpar.testing import wait_for
    with zpar.Client(discover=True, connect_timeout=20) as client:
        wait_for(lambda: client.status()["workers"] >= 1, 30, what="the agent joining")
        squares = list(client.map(pow, range(20), [2] * 20, timeout=30))
        status = client.status()
        address = client.address
    server = pp.Server(0, ppservers=("*",), secret=%r, connect_timeout=20)
    try:
        job = server.submit(pow, (3, 4))
        by_pp = job()
    finally:
        server.destroy()
    print(json.dumps({"address": address, "squares": squares, "pp": by_pp,
                      "nodes": [n["name"] for n in status["nodes"]]}))
"""

STATUS = """
    import json
    from zpar.client import _credentials, broker_status
    address = "tcp://127.0.0.1:5555"
    print(json.dumps(broker_status(address, 10, _credentials(None, None, None, None, address=address))))
"""

# An impostor in the broker's namespace: announces the real broker's fingerprints, but holds another key.
IMPOSTOR = """
    import sys, zmq
    from zpar import _discovery as D
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    sock.curve_server, sock.curve_secretkey, sock.curve_publickey = True, secret, public
    sock.bind("tcp://%s:6555")
    ann = D.Announcement("impostor-0000", "impostor", ("%s",), frontend=6555, backend=6555, security="secret",
                         fingerprint=%r, agent_fingerprint=%r)
    announcer = D.Announcer(ann, ["%s"])
    announcer.start()
    announcer.registered.wait(20)
    print("announced", flush=True)
    sys.stdin.readline()
    announcer.close()
"""


@pytest.mark.timeout(240)
def test_an_agent_in_another_namespace_joins_by_discovery_and_a_wrong_secret_is_refused(lan, procs):
    everywhere = ["--frontend", "tcp://0.0.0.0:5555", "--backend", "tcp://0.0.0.0:5556",
                  "--collector", "tcp://0.0.0.0:5557"]
    broker = procs.start("broker", [sys.executable, "-m", "zpar_broker", *everywhere, "--cluster", "lab",
                                    "--heartbeat", "0.2", "--dashboard", "off"], _env(), "broker")
    # Started at once: the agent looks until the broker's announcement appears.
    agent = procs.start("agent", [sys.executable, "-m", "zpar.agent", "--discover", "--workers", "1",
                                  "--name", "agent-in-its-namespace", "--heartbeat", "0.2"], _env(), "agent")

    answer = _python(lan, "agent", PRODUCER % SECRET, timeout=120)
    assert answer["address"] == f"tcp://{BROKER_IP}:5555"
    assert answer["squares"] == [i * i for i in range(20)] and answer["pp"] == 81
    assert answer["nodes"] == ["agent-in-its-namespace"]
    assert agent.poll() is None and broker.poll() is None
    assert f"joining cluster 'lab' at {BROKER_IP}" in procs.output("agent")

    # A wrong secret: discovery finds the broker but refuses its key, and says why.
    wrong = _env(security.generate_secret())
    refused = subprocess.run(["ip", "netns", "exec", lan["agent"], sys.executable, "-m", "zpar.agent", "--discover",
                              "--discover-timeout", "3", "--workers", "1"],
                             env=wrong, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert "refused: found cluster 'lab'" in refused.stderr and "does not match" in refused.stderr
    # Aimed at the address all the same, the broker itself refuses it (CurveZMQ, not the announcement).
    refused = subprocess.run(["ip", "netns", "exec", lan["agent"], sys.executable, "-m", "zpar.agent", "--broker",
                              f"tcp://{BROKER_IP}:5556", "--workers", "1", "--heartbeat", "0.2"],
                             env=wrong, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "AuthenticationError" in refused.stderr, refused.stderr
    status = _python(lan, "broker", STATUS)
    assert status["workers"] == 1 and status["counters"]["handshakes_failed"] >= 1

    # An impostor repeating the announcement, key fingerprints included, gets a handshake that fails.
    fp = D.fingerprint(KEYS["broker"].public)
    impostor = procs.start("broker", [sys.executable, "-c", textwrap.dedent(IMPOSTOR % (
        BROKER_IP, BROKER_IP, fp, fp, BROKER_IP))], _env(), "impostor", stdin=subprocess.PIPE)
    wait_for(lambda: "announced" in procs.output("impostor") or impostor.poll() is not None, 30,
             what="the impostor's announcement")
    assert impostor.poll() is None, procs.output("impostor")
    answer = _python(lan, "agent", """
        import json, zpar
        out = {}
        for name, discover in (("any", True), ("impostor", "impostor"), ("lab", "lab")):
            try:
                with zpar.Client(discover=discover, connect_timeout=10) as client:
                    out[name] = client.submit(pow, 2, 5).result(timeout=30)
            except zpar.ZparError as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
    """, timeout=120)
    assert answer["any"].startswith("ConfigError: 2 zpar brokers"), answer
    assert answer["impostor"].startswith("AuthenticationError") and "found on the LAN" in answer["impostor"], answer
    assert answer["lab"] == 32
