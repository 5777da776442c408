"""Attacks from a second local account (issue 10): each finding reproduced, each now refused.

The victim is the user running the suite (root in CI): every test starts real
daemons as the victim, then runs an attacker's program (``tests/attacker.py``)
as uid 65534 through ``setpriv``, with a home and an ``XDG_CONFIG_HOME`` of its
own (so a zpar secret of its own too). The program prints a JSON verdict of
what it tried and got; the test checks both sides: the attacker was refused,
and nothing of it reached the victim. The attacker's tasks and pickles create
an evidence file in a directory only the victim can write: if it exists, a
victim's process ran the attacker's code.

Skipped, with the reason, when not run as root, without ``setpriv``, or when
uid 65534 cannot run a Python of this version that imports this zpar. The
checkout and the virtualenv's packages must be readable by others; when this
interpreter lies where others cannot go (a virtualenv made from a Python under
root's 0700 home), the attacker runs one of the same version from the system's
directories, with this environment's packages on PYTHONPATH.

Not repeated here: an admitted agent (node2) forging a RESULT, ITEMS or BYE
for a task another agent (node1) holds is dropped and counted
(``collector_identity_mismatch``) in tests/test_identity.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import select
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import zpar
from zpar import security
from zpar._embedded import spawn_daemon, stop_processes
from zpar.client import broker_status
from zpar.testing import free_port, wait_for

sys.path.insert(0, os.path.dirname(__file__))
import tasks

#: The second account: nobody, as on most Linux systems.
UID = GID = 65534
ATTACKER_PY = str(Path(__file__).with_name("attacker.py"))
#: The victim's task argument, looked for in clear in what a fake broker receives.
CANARY = "victims-argument-7f3c9a"
#: The victim agent's routing id, fixed by the test (as in tests/test_identity.py). It is random per
#: agent and published nowhere; fixing it gives the attacker a forgery exact in every field but the key.
KNOWN_ID = uuid.UUID("3c0ffee0-5a1e-4b1d-8d7e-2f00d15ea5e0").bytes
# `python -c`: the usual agent, with its routing id fixed to KNOWN_ID (sys.argv[1:] are its options).
_AGENT_WITH_KNOWN_ID = f"""
import sys, types, uuid
import zpar.agent.server as server
server.uuid = types.SimpleNamespace(uuid4=lambda: uuid.UUID(bytes={KNOWN_ID!r}))
from zpar.cli import agent_main
sys.argv[0] = "zpar-agent"
agent_main()
"""
#: How the attacker's process should look: another account, no group, no capability.
NOBODY = {"uid": [UID] * 3, "gid": [GID] * 3, "groups": [], "cap_prm": 0, "cap_eff": 0, "cap_amb": 0}


# ---------------------------------------------------------------------- the second account


def _search_path() -> str:
    """PYTHONPATH for the attacker's interpreter: this zpar's checkout and this environment's packages."""
    roots = {os.path.dirname(os.path.dirname(importlib.util.find_spec(name).origin))
             for name in ("zpar", "zpar_broker")}
    sites = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    return os.pathsep.join([*sorted(roots), *sites])


def _as_nobody(setpriv: str, python: str) -> list[str]:
    # no_new_privs: no setuid program gives the attacker back what it lost.
    return [setpriv, f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--no-new-privs", python, "-s"]


def _probe(setpriv: str, python: str, env: dict[str, str]) -> str | None:
    """None if uid 65534 can run ``python`` of this version and import this zpar; else why not.

    The account must also start that interpreter itself, with no privilege left (an agent starts
    its workers with ``sys.executable``): setpriv looks up the program it runs before it drops its
    capabilities, so a path under root's 0700 home passes that first step and fails the second.
    """
    want = f"{sys.version_info[0]} {sys.version_info[1]}"
    code = ("import subprocess, sys, zpar.client, zpar.cli, zpar_broker.server, zmq, cloudpickle; "
            "subprocess.run([sys.executable, '-c', 'import zpar.agent.worker'], check=True); "
            "print(sys.version_info[0], sys.version_info[1])")
    try:
        proc = subprocess.run([*_as_nobody(setpriv, python), "-c", code], env=env, cwd="/", capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python}: {exc}"
    if proc.returncode != 0:
        last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
        return f"{python}: exit {proc.returncode}: {last[-300:]}"
    if proc.stdout.strip() != want:
        return f"{python} is Python {proc.stdout.strip()}, not {want} (this environment's compiled packages)"
    return None


@dataclasses.dataclass
class Account:
    """How to run a program as the second account."""

    setpriv: str
    python: str
    search_path: str

    def command(self, *args: str) -> list[str]:
        return [*_as_nobody(self.setpriv, self.python), ATTACKER_PY, *args]

    def env(self, home: Path) -> dict[str, str]:
        return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"), "PATH": "/usr/bin:/bin",
                "PYTHONPATH": self.search_path, "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def account() -> Account:
    """The second account, or the module skipped with the reason it cannot be used."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("the attack suite runs the attacker as uid 65534 through setpriv: run the tests as root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("the attack suite needs setpriv (util-linux) to run the attacker as uid 65534")
    search_path = _search_path()
    env = {"HOME": "/nonexistent", "PATH": "/usr/bin:/bin", "PYTHONPATH": search_path}
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = dict.fromkeys(p for p in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin:/bin"))
                               if p)
    reasons = []
    for python in candidates:
        reason = _probe(setpriv, python, env)
        if reason is None:
            return Account(setpriv, python, search_path)
        reasons.append(reason)
    pytest.skip("uid 65534 cannot run a Python that imports this zpar (the checkout and the virtualenv must be "
                "readable and executable by others): " + "; ".join(reasons))


class Attacker:
    """The second account, with a home of its own (made by root, owned by 65534, mode 0700)."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.home = Path(tempfile.mkdtemp(prefix="zpar-attacker-"))
        os.chown(self.home, UID, GID)
        self.home.chmod(0o700)
        self.procs: list[subprocess.Popen[str]] = []

    def give(self, source: Path, name: str) -> str:
        """A copy of ``source`` that the attacker owns (mode 0600): a credential it got hold of."""
        path = self.home / name
        shutil.copyfile(source, path)
        os.chown(path, UID, GID)
        path.chmod(0o600)
        return str(path)

    def _popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(self.account.command(*args), env=self.account.env(self.home), cwd=self.home,
                                text=True, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, program: str, timeout: float = 40, **args: Any) -> dict[str, Any]:
        """Run one program of tests/attacker.py to its end; its verdict, checked to come from uid 65534."""
        proc = self._popen([program, json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"the attacker's {program} failed (exit {proc.returncode}):\n{err}"
        return _verdict(out, err)

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start a program (or ``agent ...``, ``cli ...``) in the background, stdin and stdout piped."""
        return self._popen(list(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def close(self) -> None:
        stop_processes(self.procs)  # bounded: SIGTERM, then SIGKILL
        for proc in self.procs:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def attacker(account):
    made = Attacker(account)
    yield made
    made.close()


def _verdict(out: str, err: str) -> dict[str, Any]:
    """An attacker's verdict (its last line), checked to come from the second account with no privilege."""
    verdict = json.loads(out.strip().splitlines()[-1])
    assert verdict["whoami"] == NOBODY, f"the attacker did not run as the second account:\n{err}"
    return verdict


def _line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next JSON line a background attacker prints."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line from the attacker within {timeout} s"
    line = proc.stdout.readline()
    assert line, f"the attacker exited: {proc.stderr.read() if proc.stderr else ''}"
    return json.loads(line)


def _ended_without_session(attempt: dict[str, Any]) -> bool:
    """A raw attempt's verdict: no reply came, no handshake succeeded, and one failed or was cut."""
    events = attempt["events"]
    return (not attempt["replies"] and "succeeded" not in events
            and any(e in events for e in ("refused", "failed", "disconnected", "retried", "closed")))


def _assert_refused_agent(proc: subprocess.Popen[str], status: Callable[[], dict[str, Any] | None]) -> None:
    """The attacker's zpar-agent ``intruder`` stopped, refused, and never appeared among the broker's nodes."""

    def outcome() -> str | None:
        if proc.poll() is not None:
            return "stopped"
        now = status()
        return "joined" if now and "intruder" in [n["name"] for n in now["nodes"]] else None

    assert wait_for(outcome, 30, what="the intruding agent refused or joined") == "stopped", "the intruder joined"
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and "AuthenticationError" in err, err


def _refusals(counters: dict[str, int]) -> int:
    """Handshakes the broker refused (ZAP) or saw fail (no or wrong credentials)."""
    return counters.get("auth_refused", 0) + counters.get("handshakes_failed", 0)


# ---------------------------------------------------------------------- 1. submitting


def test_another_account_cannot_run_a_task_on_the_default_cluster(attacker, new_cluster, tmp_path):
    cluster = new_cluster(agents=1, workers=1)
    assert cluster.status()["security"].startswith("curve, this user's secret")
    evidence = tmp_path / "evidence"

    broker_key = security.derive_keys(security.user_secret())["broker"].public.decode()

    verdict = attacker.run("submit", frontend=cluster.frontend, evidence=str(evidence), broker_key=broker_key)

    # zpar.Client with the attacker's own secret, in plaintext, and with a key pair of its own and the
    # broker's real public key: AuthenticationError, each.
    for how in ("client", "insecure_client", "keyed_client"):
        assert verdict[how].get("is_authentication_error"), verdict[how]
    # Raw HELLO and SUBMIT frames in plaintext: never past the handshake, no answer.
    assert _ended_without_session(verdict["raw_plaintext"]), verdict["raw_plaintext"]
    status = cluster.status()
    counters = status["counters"]
    assert counters.get("auth_refused", 0) >= 1  # the one that knew the broker's key: ZAP said no
    assert counters.get("handshakes_failed", 0) >= 3  # the others failed the handshake itself
    assert not counters.get("submitted") and status["producers"] == 0 and status["done"] == 0
    assert not counters.get("protocol_errors")
    # The cluster still works for its owner, and only the owner's task ever ran.
    mine = tmp_path / "mine"
    with cluster.client() as client:
        assert client.submit(tasks.touch, str(mine)).result(timeout=30) == str(mine)
    status = cluster.status()
    assert status["counters"]["submitted"] == 1 and status["done"] == 1
    assert not evidence.exists(), "the other account's task ran as the victim"


# ---------------------------------------------------------------------- 2. forging results


def test_a_forged_result_from_another_account_is_not_accepted(attacker, new_cluster, tmp_path, gate):
    cluster = new_cluster(agents=0, workers=1)
    agent = subprocess.Popen([sys.executable, "-c", _AGENT_WITH_KNOWN_ID, "--broker", cluster.backend, "--workers", "1",
                              "--heartbeat", str(cluster.heartbeat), "--liveness", str(cluster.liveness),
                              "--log-level", "ERROR"], stdin=subprocess.DEVNULL, start_new_session=True)
    evidence = tmp_path / "evidence"
    try:
        cluster.wait_for_workers(1)
        with cluster.client() as client:
            future = client.submit(tasks.block_until, gate, 30, "real")
            status = wait_for(lambda: (s := cluster.status())["running"] == 1 and s, 20, what="the task running")
            before = _refusals(status["counters"])

            # RESULTs for that task as its agent would send them (its id, the broker's epoch, the task's
            # broker id among 1..5): a pickle that leaves evidence where it is loaded, then "forged".
            verdict = attacker.run("forge_result", collector=cluster.collector, epoch=status["epoch"],
                                   agent=KNOWN_ID.hex(), evidence=str(evidence))

            for how in ("plaintext", "own_key"):
                assert _ended_without_session(verdict[how]), (how, verdict[how])
            counters = wait_for(lambda: (c := cluster.status()["counters"]) and _refusals(c) >= before + 2 and c,
                                10, what="the broker counting both refusals")
            # Nothing reached the collector's reader: not one frame of the forgeries was decoded.
            assert not counters.get("messages_collector") and not counters.get("collector_identity_mismatch")
            assert not future.done(), "a forged result was delivered"
            Path(gate).touch()
            assert future.result(timeout=30) == "real"
        assert cluster.status()["done"] == 1
    finally:
        stop_processes([agent])
    assert not evidence.exists(), "the victim unpickled the other account's result"


# ---------------------------------------------------------------------- 3. posing as the broker


@pytest.mark.parametrize("curve", [False, True], ids=["plaintext", "own-key"])
def test_a_fake_broker_on_the_victims_ports_gets_nothing_and_sends_nothing(attacker, tmp_path, curve):
    evidence = tmp_path / "evidence"
    fake = attacker.start("fake_broker", json.dumps({"evidence": str(evidence), "canary": CANARY, "curve": curve}))
    endpoints = _line(fake, 30)["ready"]

    # The victim's broker cannot have the ports: it exits, naming them.
    broker = spawn_daemon(["zpar_broker", "--frontend", endpoints["frontend"], "--backend", endpoints["backend"],
                           "--collector", endpoints["collector"], "--log-level", "CRITICAL"])
    try:
        assert broker.wait(30) == 1
    finally:
        stop_processes([broker])
    # Its client and its agent, told those addresses, refuse whoever answers there.
    with pytest.raises((zpar.AuthenticationError, zpar.BrokerUnavailable)):
        zpar.Client(endpoints["frontend"], connect_timeout=5).submit(tasks.identity, CANARY)
    agent = spawn_daemon(["zpar.agent", "--broker", endpoints["backend"], "--workers", "1", "--heartbeat", "0.1",
                          "--log-level", "CRITICAL"])
    try:
        assert agent.wait(30) == 1, "the agent did not stop: it was not refused by the fake broker"
    finally:
        stop_processes([agent])

    out, err = fake.communicate(timeout=20)  # its stdin closed: it reports
    verdict = _verdict(out, err)
    assert verdict["received"] == [], "the fake broker received messages"
    assert not verdict["canary_seen"]
    for name in ("frontend", "backend"):
        assert "succeeded" not in verdict["events"][name] and verdict["events"][name], (name, verdict["events"])
    assert not evidence.exists(), "the victim ran or unpickled what the fake broker sent"


# ---------------------------------------------------------------------- 4. the secret and the ipc socket


def test_another_account_cannot_read_the_users_secret(attacker, monkeypatch):
    config = Path(tempfile.mkdtemp(prefix="zpar-victim-config-"))
    try:
        config.chmod(0o755)  # a home others may look into, as many are
        monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
        security.user_secret()
        path = security.user_secret_path()
        assert path.parent.stat().st_mode & 0o777 == 0o700 and path.stat().st_mode & 0o777 == 0o600
        verdict = attacker.run("read_secret", path=str(path))
        assert (verdict["read"], verdict["stat"], verdict["list"]) == ("PermissionError",) * 3, verdict
        # Opened up by its owner (zpar accepts a folder others may read), the file's own mode still holds.
        path.parent.chmod(0o755)
        assert attacker.run("read_secret", path=str(path))["read"] == "PermissionError"
    finally:
        shutil.rmtree(config, ignore_errors=True)


def test_another_account_cannot_reach_the_embedded_clusters_socket(attacker, tmp_path):
    evidence = tmp_path / "evidence"
    with zpar.Client(workers=1) as client:
        assert client._cluster is not None
        endpoint = client._cluster.frontend
        verdict = attacker.run("ipc_submit", endpoint=endpoint, evidence=str(evidence))
        assert verdict["unix_connect"] == "PermissionError"
        assert _ended_without_session(verdict["zmq"]), verdict["zmq"]
        status = client.status()
        assert status["producers"] == 1 and not status["counters"].get("submitted")
        assert client.submit(tasks.square, 7).result(timeout=30) == 49
        assert client.status()["counters"]["submitted"] == 1
    assert not evidence.exists(), "the other account's task ran in the embedded cluster"


# ---------------------------------------------------------------------- 5. zpar status


def test_zpar_status_from_another_account_fails_and_reveals_nothing(attacker, new_cluster):
    node = "victims-node-5b1e"
    cluster = new_cluster(agents=1, workers=1, agent_args=["--name", node])
    status = cluster.status()
    assert [n["name"] for n in status["nodes"]] == [node]

    verdict = attacker.run("status_cli", frontend=cluster.frontend, variants=[[], ["--json"], ["--insecure"]])

    for extra, result in zip([[], ["--json"], ["--insecure"]], verdict["runs"], strict=True):
        printed = result["stdout"] + result["stderr"]
        assert result["exit"] == 1, (extra, printed)
        assert re.search(r"handshake|authenticat|refused", printed, re.IGNORECASE), (extra, printed)
        for secret in (node, status["epoch"]):
            assert secret not in printed, (extra, secret, printed)


# ---------------------------------------------------------------------- 6. roles


def test_the_producers_secret_does_not_make_an_agent(attacker, new_cluster, tmp_path):
    producers = security.generate_secret()
    agents = tmp_path / "agents.secret"
    security.write_secret_file(agents)
    cluster = new_cluster(agents=1, workers=1, secret=producers, broker_args=["--agent-secret-file", str(agents)],
                          agent_args=["--secret-file", str(agents)])
    status = cluster.status()
    assert status["security"].endswith("agents: their own secret")
    held = tmp_path / "producers.secret"
    held.write_text(producers + "\n")
    held.chmod(0o600)
    evidence = tmp_path / "evidence"
    before = status["counters"]

    # Raw HELLO (backend) and RESULT (collector), with each key the producers' secret gives, and the
    # broker's real public key for agents (a public key may be known to anyone).
    verdict = attacker.run("as_agent", backend=cluster.backend, collector=cluster.collector,
                           broker_key=security.derive_keys(agents.read_text())["broker"].public.decode(),
                           epoch=status["epoch"], evidence=str(evidence),
                           secret_file=attacker.give(held, "producers.secret"))
    attempts = {k: v for k, v in verdict.items() if k != "whoami"}
    assert len(attempts) == 4
    for name, attempt in attempts.items():
        assert _ended_without_session(attempt) and "refused" in attempt["events"], (name, attempt)
    # And the real zpar-agent with that secret: refused, it stops.
    intruder = attacker.start("agent", "--broker", cluster.backend, "--secret-file",
                              str(attacker.home / "producers.secret"), "--workers", "1", "--heartbeat", "0.1",
                              "--name", "intruder", "--log-level", "ERROR")
    _assert_refused_agent(intruder, cluster.status)
    after = cluster.status()
    assert after["counters"]["auth_refused"] >= before.get("auth_refused", 0) + 4  # ZAP: not an agents' key
    assert after["counters"]["handshakes_failed"] > before.get("handshakes_failed", 0)  # and the real agent
    assert after["workers"] == 1 and [n["name"] for n in after["nodes"]] == [n["name"] for n in status["nodes"]]
    # No intruder ever joined: one would have been counted leaving (or silent) when it stopped.
    assert not any(after["counters"].get(c) for c in ("messages_collector", "agents_left", "agents_silent"))
    assert not evidence.exists()


def _start_keyed_broker(tmp_path: Path) -> dict[str, Any]:
    """A key-file broker: alice may submit (--allow-keys), node1 may serve (--allow-agent-keys)."""
    keys, producers, agents = tmp_path / "keys", tmp_path / "producers", tmp_path / "agents"
    for folder in (producers, agents):
        folder.mkdir()
    for name in ("broker", "alice", "node1"):
        security.make_keypair_files(keys, name)
    shutil.copyfile(keys / "alice.key", producers / "alice.key")
    shutil.copyfile(keys / "node1.key", agents / "node1.key")
    frontend, backend, collector = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    broker = spawn_daemon(["zpar_broker", "--frontend", frontend, "--backend", backend, "--collector", collector,
                           "--heartbeat", "0.1", "--key-file", str(keys / "broker.key_secret"),
                           "--allow-keys", str(producers), "--allow-agent-keys", str(agents),
                           "--log-level", "ERROR"])
    return {"keys": keys, "frontend": frontend, "backend": backend, "collector": collector, "procs": [broker]}


def test_with_key_files_a_producers_key_cannot_serve_and_an_agents_key_cannot_submit(attacker, tmp_path):
    k = _start_keyed_broker(tmp_path)
    keys = k["keys"]
    try:
        alice = security.client_credentials("producer", key_file=str(keys / "alice.key_secret"),
                                            broker_key=str(keys / "broker.key"))

        def status() -> dict[str, Any] | None:
            try:
                return broker_status(k["frontend"], 1.0, alice)
            except zpar.BrokerUnavailable:
                return None

        k["procs"].append(spawn_daemon(
            ["zpar.agent", "--broker", k["backend"], "--workers", "1", "--heartbeat", "0.1", "--name", "node1",
             "--key-file", str(keys / "node1.key_secret"), "--broker-key", str(keys / "broker.key"),
             "--log-level", "ERROR"]))
        first = wait_for(lambda: (s := status()) and s["workers"] == 1 and s, 20, what="node1 joined")
        evidence = tmp_path / "evidence"

        # Alice's key, in the producers' allow-list only, as an agent: refused on the backend and the collector.
        verdict = attacker.run("as_agent", backend=k["backend"], collector=k["collector"],
                               broker_key=security.load_keypair(keys / "broker.key", need_secret=False).public.decode(),
                               epoch=first["epoch"],
                               evidence=str(evidence), key_file=attacker.give(keys / "alice.key_secret", "alice"))
        for name in ("producer_key_backend", "producer_key_collector"):
            assert _ended_without_session(verdict[name]) and "refused" in verdict[name]["events"], verdict[name]
        intruder = attacker.start("agent", "--broker", k["backend"], "--key-file", str(attacker.home / "alice"),
                                  "--broker-key", attacker.give(keys / "broker.key", "broker.key"), "--workers",
                                  "1", "--name", "intruder", "--heartbeat", "0.1", "--log-level", "ERROR")
        _assert_refused_agent(intruder, status)

        # node1's key, in the agents' allow-list only, as a producer: AuthenticationError.
        with pytest.raises(zpar.AuthenticationError, match="allow-list"):
            zpar.Client(k["frontend"], key_file=str(keys / "node1.key_secret"), broker_key=str(keys / "broker.key"),
                        connect_timeout=10)

        after = status()
        assert after is not None and [n["name"] for n in after["nodes"]] == ["node1"]
        assert after["counters"]["auth_refused"] >= 4
        assert not any(after["counters"].get(c) for c in ("messages_collector", "submitted", "agents_left",
                                                            "agents_silent"))
        with zpar.Client(k["frontend"], key_file=str(keys / "alice.key_secret"),
                         broker_key=str(keys / "broker.key")) as client:
            assert client.submit(tasks.square, 6).result(timeout=30) == 36
        assert not evidence.exists()
    finally:
        stop_processes(k["procs"])
