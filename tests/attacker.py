"""The attacker's programs for tests/test_attacks.py, run as another local account.

``python attacker.py NAME JSON_ARGS`` runs one program, which prints its
verdict, one JSON object, as the last line of its stdout: who it ran as, what
it tried and what it got. ``python attacker.py agent|cli ARGS...`` runs the
``zpar-agent`` or ``zpar`` command line itself, as that account would.

The attacker never holds the victim's own secret: it is given addresses,
public keys (which are public), the paths where evidence of a successful
attack would appear and, in the tests of roles, a producer's credential (what
such a holder can do is the question there). Each wait is bounded and ends on an event (a handshake's outcome, a
reply, a connection refused), never on a fixed sleep. This module is not a
test module: pytest never imports it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import zmq
from zmq.utils.monitor import recv_monitor_message

from zpar import protocol as P
from zpar import security, serialize

#: Handshake and connection events, by the name the verdicts use.
_EVENTS = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_CONNECT_RETRIED: "retried",
    zmq.EVENT_CLOSED: "closed",
}
#: A connection attempt that ended without a session: the handshake or the connect failed.
_ENDED = {"refused", "failed", "disconnected", "retried", "closed"}


def whoami() -> dict[str, Any]:
    """Who this process is: real, effective and saved ids, groups, and its capability sets."""
    with open("/proc/self/status") as fh:
        caps = {f"cap_{line[3:6].lower()}": int(line.split()[1], 16) for line in fh
                if line.startswith(("CapPrm:", "CapEff:", "CapAmb:"))}
    return {"uid": list(os.getresuid()), "gid": list(os.getresgid()), "groups": os.getgroups(), **caps}


class Evidence:
    """Unpickling this creates ``path``: whoever unpickles it ran the attacker's pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (self.path, "w")


def leave_evidence(path: str) -> str:
    """The attacker's task: whoever runs it creates ``path``."""
    with open(path, "w") as fh:
        fh.write(f"ran as uid {os.getuid()}\n")
    return path


def _monitored(ctx: zmq.Context, kind: int, keys: dict[str, Any] | None) -> tuple[zmq.Socket, zmq.Socket]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys:  # a CurveZMQ client: our own keypair, and the server key we believe in
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = (
            keys["secret"], keys["public"], keys["server"])
    monitor = sock.get_monitor_socket(zmq.EVENT_ALL, f"inproc://attacker-{os.urandom(6).hex()}")
    return sock, monitor


def _wait_outcome(sock: zmq.Socket, monitor: zmq.Socket, timeout: float, replies: bool) -> dict[str, Any]:
    """Events and replies until the attempt ends: a failed handshake or connect, a reply, or ``timeout``.

    A handshake that succeeds is not the end when ``replies``: then we wait for the broker's answer.
    """
    poller = zmq.Poller()
    poller.register(monitor, zmq.POLLIN)
    if replies:
        poller.register(sock, zmq.POLLIN)
    events: list[str] = []
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready = dict(poller.poll(left * 1000))
        if sock in ready:
            got.append(_describe(sock.recv_multipart()))
        if monitor in ready:
            name = _EVENTS.get(recv_monitor_message(monitor)["event"])
            if name:
                events.append(name)
        if got or (events and events[-1] in _ENDED) or (not replies and "succeeded" in events):
            break
    return {"events": events, "replies": got, "timed_out": deadline - time.monotonic() <= 0}


def _describe(frames: list[bytes]) -> dict[str, Any]:
    """What a reply was, as far as the wire tells (never unpickled)."""
    try:
        msg = P.decode(frames)
    except Exception as exc:  # noqa: BLE001 - any garbage is an answer to report, not a crash
        return {"kind": None, "error": repr(exc)[:200]}
    return {"kind": msg.kind.name, "code": getattr(getattr(msg, "code", None), "name", None)}


def _close(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=0)


def _own_keys(role: str, server: bytes | None = None, secret_file: str | None = None) -> dict[str, Any]:
    """A keypair for ``role`` from this account's own secret (or ``secret_file``), and a server key.

    ``server``: a broker public key we were told (public keys are public); by default the one our
    own secret derives, which is what an attacker who knows nothing else would use.
    """
    keys = security.derive_keys(security.read_secret_file(secret_file) if secret_file else security.user_secret())
    return {"secret": keys[role].secret, "public": keys[role].public, "server": server or keys["broker"].public}


def _raw_attempt(address: str, kind: int, messages: list[P.Message], keys: dict[str, Any] | None,
                 timeout: float = 5.0) -> dict[str, Any]:
    """Connect a raw socket, queue ``messages`` at once (ZeroMQ sends them if a session ever opens), and
    report how the attempt ended."""
    ctx = zmq.Context()
    sock, monitor = _monitored(ctx, kind, keys)
    queued = 0
    try:
        sock.connect(address)
        for msg in messages:
            try:
                sock.send_multipart(P.encode(msg), zmq.NOBLOCK)
                queued += 1
            except zmq.Again:  # the connection failed already: no pipe left to queue on
                break
        outcome = _wait_outcome(sock, monitor, timeout, replies=kind != zmq.PUSH)
        outcome["queued"] = queued
    finally:
        _close(sock, monitor)
        ctx.term()
    return outcome


def _forged_submit(evidence: str) -> list[P.Message]:
    """HELLO as a producer, then a task that creates ``evidence`` wherever it runs."""
    blob = cloudpickle.dumps(leave_evidence)
    entry = P.TaskEntry(1, P.digest(blob), tuple(serialize.dumps(((evidence,), {}))))
    return [P.Hello(P.Role.PRODUCER), P.Submit((entry,), (P.Function(P.digest(blob), blob),))]


def _forged_results(evidence: str, epoch: str, agent: bytes) -> list[P.Message]:
    """RESULTs for the first broker task ids: a pickle that creates ``evidence``, then a plain value."""
    poisoned = tuple(serialize.dumps(Evidence(evidence)))
    forged = tuple(serialize.dumps("forged"))
    return [P.Result(tuple(P.ResultEntry(gid, P.Status.OK, payload) for gid in range(1, 6)), agent=agent,
                     epoch=epoch) for payload in (poisoned, forged)]


def _client_attempt(address: str, evidence: str, **kwargs: Any) -> dict[str, Any]:
    """``zpar.Client(address)`` as this account; if it ever connects, submit a task that leaves evidence."""
    import zpar

    started = time.monotonic()
    try:
        with zpar.Client(address, connect_timeout=10, **kwargs) as client:
            outcome: dict[str, Any] = {"connected": True}
            outcome["result"] = repr(client.submit(leave_evidence, evidence).result(timeout=10))
    except Exception as exc:  # noqa: BLE001 - the verdict names whatever it was
        outcome = {"connected": False, "error": type(exc).__name__, "message": str(exc)[:500],
                   "is_authentication_error": isinstance(exc, zpar.AuthenticationError)}
    outcome["seconds"] = round(time.monotonic() - started, 3)
    return outcome


# ---------------------------------------------------------------------- programs


def submit(frontend: str, evidence: str, broker_key: str) -> dict[str, Any]:
    """Finding 1: run a task on another account's cluster.

    With zpar.Client: our own secret; plaintext; a key pair of our own and the broker's real public
    key ``broker_key`` (public keys are public: this one gets as far as the broker's ZAP check). Then
    raw HELLO and SUBMIT frames in plaintext.
    """
    own, _ = security.make_keypair_files(Path.home() / "keys", "attacker")
    server = Path.home() / "broker.key"
    server.write_text(f'metadata\ncurve\n    public-key = "{broker_key}"\n')
    return {
        "client": _client_attempt(frontend, evidence),
        "insecure_client": _client_attempt(frontend, evidence, insecure=True),
        "keyed_client": _client_attempt(frontend, evidence, key_file=str(own.with_suffix(".key_secret")),
                                        broker_key=str(server)),
        "raw_plaintext": _raw_attempt(frontend, zmq.DEALER, _forged_submit(evidence), None),
    }


def forge_result(collector: str, epoch: str, agent: str, evidence: str) -> dict[str, Any]:
    """Finding 2: push forged RESULTs into another account's collector, in plaintext and with our own key."""
    messages = _forged_results(evidence, epoch, bytes.fromhex(agent))
    return {
        "plaintext": _raw_attempt(collector, zmq.PUSH, messages, None),
        "own_key": _raw_attempt(collector, zmq.PUSH, messages, _own_keys("agent")),
    }


def fake_broker(evidence: str, canary: str, curve: bool) -> dict[str, Any]:
    """Finding 3: bind a broker's three sockets first and wait for the victim's daemons and clients.

    Prints ``{"ready": {name: endpoint}}`` once bound, then one line per handshake event; answers any
    HELLO with a WELCOME and, to a producer, RESULTs whose pickle creates ``evidence``. Runs until its
    stdin closes, then reports what it received: whether anything decoded, and whether ``canary``
    (the victim's task argument) was seen in clear.
    """
    ctx = zmq.Context()
    keys = security.derive_keys(security.user_secret())["broker"] if curve else None
    socks, monitors = {}, {}
    for name, kind in (("frontend", zmq.ROUTER), ("backend", zmq.ROUTER), ("collector", zmq.PULL)):
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:  # our own broker key: a victim that checks the broker's key refuses us
            sock.curve_server, sock.curve_secretkey, sock.curve_publickey = True, keys.secret, keys.public
        monitors[name] = sock.get_monitor_socket(zmq.EVENT_ALL, f"inproc://fake-{name}")
        sock.bind("tcp://127.0.0.1:*")
        socks[name] = sock
    endpoints = {name: sock.getsockopt_string(zmq.LAST_ENDPOINT) for name, sock in socks.items()}
    print(json.dumps({"ready": endpoints}), flush=True)
    poller = zmq.Poller()
    for sock in [*socks.values(), *monitors.values()]:
        poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    received: list[dict[str, Any]] = []
    events: dict[str, list[str]] = {name: [] for name in socks}
    canary_seen = False
    while True:
        ready = dict(poller.poll())
        if sys.stdin.fileno() in ready and not os.read(sys.stdin.fileno(), 4096):
            break  # the test closed our stdin: report
        for name, monitor in monitors.items():
            if monitor in ready:
                event = _EVENTS.get(recv_monitor_message(monitor)["event"])
                if event:
                    events[name].append(event)
                    print(json.dumps({"event": event, "socket": name}), flush=True)
        for name, sock in socks.items():
            if sock not in ready:
                continue
            frames = sock.recv_multipart()
            canary_seen = canary_seen or any(canary.encode() in f for f in frames)
            routed = name != "collector"
            body = frames[1:] if routed else frames
            info = _describe(body)
            received.append({"socket": name, **info})
            print(json.dumps({"received": name, **info}), flush=True)
            if routed and info["kind"] == "HELLO":
                _answer_hello(sock, frames[0], name, endpoints["collector"], evidence)
    for monitor in monitors.values():
        monitor.close(linger=0)
    for sock in socks.values():
        sock.close(linger=0)
    ctx.term()
    return {"endpoints": endpoints, "events": events, "received": received, "canary_seen": canary_seen}


def _answer_hello(sock: zmq.Socket, peer: bytes, name: str, collector: str, evidence: str) -> None:
    """What a fake broker would send: WELCOME, then to a producer poisoned RESULTs, to an agent a task."""
    if name == "frontend":
        bait: P.Message = _forged_results(evidence, "", b"")[0]
    else:
        forged = _forged_submit(evidence)[1]
        bait = P.Tasks(forged.tasks, forged.funcs)
    for msg in (P.Welcome("fake-epoch", 1.0, 30, collector), bait):
        sock.send_multipart(P.encode_routed(peer, msg), zmq.NOBLOCK)


def read_secret(path: str) -> dict[str, Any]:
    """Finding 4a: read another account's own zpar secret (and list its folder)."""
    out: dict[str, Any] = {}
    for what, action in (("read", lambda: Path(path).read_bytes()), ("stat", lambda: os.stat(path)),
                         ("list", lambda: os.listdir(os.path.dirname(path)))):
        try:
            action()
            out[what] = "ok"
        except OSError as exc:
            out[what] = type(exc).__name__
    return out


def ipc_submit(endpoint: str, evidence: str) -> dict[str, Any]:
    """Finding 4b: reach another account's embedded cluster through its ipc socket file."""
    path = endpoint[len("ipc://"):]
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unix.connect(path)
        plain = "connected"
    except OSError as exc:
        plain = type(exc).__name__
    finally:
        unix.close()
    return {"unix_connect": plain, "zmq": _raw_attempt(endpoint, zmq.DEALER, _forged_submit(evidence), None)}


def status_cli(frontend: str, variants: list[list[str]]) -> dict[str, Any]:
    """Finding 5: ``zpar status`` against another account's broker (with each of ``variants``' extra
    flags): its exit code and every character it printed."""
    from zpar.cli import main

    runs = []
    for extra in variants:
        out, err = io.StringIO(), io.StringIO()
        code: Any = 0
        sys.argv = ["zpar", "status", "--broker", frontend, "--timeout", "5", *extra]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code
        runs.append({"exit": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    return {"runs": runs}


def as_agent(backend: str, collector: str, broker_key: str, epoch: str, evidence: str,
             secret_file: str | None = None, key_file: str | None = None) -> dict[str, Any]:
    """Finding 6 and the key-file roles: HELLO as an agent, push a RESULT, with a producer's credentials.

    ``broker_key`` is the broker's real public key for agents (public, so assumed known). With
    ``secret_file`` (the producers' shared secret) we try both keys it derives; with ``key_file``
    (a producer's key pair) that key.
    """
    if key_file:
        own = security.load_keypair(key_file, need_secret=True)
        tries = {"producer_key": {"secret": own.secret, "public": own.public, "server": broker_key.encode()}}
    else:
        tries = {f"{role}_key": _own_keys(role, broker_key.encode(), secret_file) for role in ("agent", "producer")}
    hello = [P.Hello(P.Role.AGENT, "intruder", socket.gethostname(), os.getpid(), 4), P.Ready(4)]
    results = _forged_results(evidence, epoch, os.urandom(16))
    return {f"{name}_{where}": _raw_attempt(address, kind, msgs, keys)
            for name, keys in tries.items()
            for where, address, kind, msgs in (("backend", backend, zmq.DEALER, hello),
                                               ("collector", collector, zmq.PUSH, results))}


def _run_command(which: str, args: list[str]) -> None:
    """``zpar-agent ARGS`` or ``zpar ARGS`` in this process: exits as that command does."""
    from zpar.cli import agent_main, main

    sys.argv = ["zpar-agent" if which == "agent" else "zpar", *args]
    (agent_main if which == "agent" else main)()


PROGRAMS = {f.__name__: f for f in (submit, forge_result, fake_broker, read_secret, ipc_submit, status_cli, as_agent)}


def _main() -> None:
    name, rest = sys.argv[1], sys.argv[2:]
    if name in ("agent", "cli"):
        _run_command(name, rest)
        return
    args = json.loads(rest[0]) if rest else {}
    verdict = PROGRAMS[name](**args)
    print(json.dumps({"whoami": whoami(), **verdict}), flush=True)


if __name__ == "__main__":
    _main()
