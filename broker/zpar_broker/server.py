"""The broker's I/O shell: three sockets, one poll loop, timers and signals.

::

    producers (DEALER) ──▶ frontend ROUTER ─┐
    agents    (DEALER) ◀─▶ backend  ROUTER ─┼─▶ BrokerCore(now, event) ─▶ [Outgoing]
    agents    (PUSH)   ──▶ collector PULL ──┘                                │
    SIGTERM/SIGINT ──▶ wake-up fd                           send, NOBLOCK ◀──┘

The loop decodes headers, feeds the core, and sends what the core returns.
Payload frames are received without copies and forwarded as they are.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from zpar import _ipc, security
from zpar import protocol as P
from zpar._loop import POLLIN, Reader, Waker, run_loop, run_until_signalled
from zpar.config import DEFAULT_DASHBOARD, BrokerConfig, dashboard_address
from zpar.errors import ProtocolError

from .core import BrokerCore
from .limits import Limits
from .outgoing import Dest, Outgoing
from .sessions import KeySessions

if TYPE_CHECKING:
    from zpar import _discovery

    from .web import Dashboard, Questions

log = logging.getLogger(__name__)
#: ZeroMQ I/O threads, where CurveZMQ encrypts and decrypts: producers' connections on the first,
#: agents' on the second (AFFINITY), so that a large argument is decrypted from its producer on one
#: while the parts already in go on to their agent, encrypted on the other (P.Part): left to ZeroMQ,
#: both connections often share a thread, and the hops run one after the other. Tiny-task throughput
#: is the same as with one thread (measured, 2 cores).
IO_THREADS = 2
_AFFINITY = {"frontend": 1, "backend": 2, "collector": 2}  # results: decrypted on one, encrypted on the other

#: Connections waiting to be accepted on each listening socket.
LISTEN_BACKLOG = 4096

#: Agent routing ids remembered with their keys (those of agents that left are let go past this).
_MAX_AGENT_IDS = 100_000


def _ephemeral(endpoint: str) -> str:
    """Accept ``tcp://host:0`` for a free port, as ZeroMQ spells it ``*``."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return endpoint[:-2] + ":*"
    return endpoint


def _advertised(endpoint: str) -> str:
    """The collector address agents should connect to, as bound."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname or ""
    if host in ("0.0.0.0", "::", "*", ""):  # noqa: S104 - reads a bound address, binds nothing
        return f"tcp://*:{parts.port}"  # the agent substitutes the host it reached us on
    return endpoint


class BrokerServer:
    """Owns the broker's sockets; ``run()`` blocks until SIGTERM/SIGINT or ``stop()``.

    An empty backend or collector address leaves that socket out (the embedded
    cluster, whose one agent is in the same process, needs neither).
    ``poller`` and ``waker`` are shared when another part runs in the same loop.
    """

    def __init__(self, config: BrokerConfig, ctx: zmq.Context[zmq.Socket[bytes]] | None = None, *,
                 poller: zmq.Poller | None = None, waker: Waker | None = None, defer_dashboard: bool = False) -> None:
        self.config = config
        self.ctx: zmq.Context[zmq.Socket[bytes]] = ctx or zmq.Context.instance(io_threads=IO_THREADS)
        self.sockets: dict[str, zmq.Socket[bytes]] = {}
        self.loop_lag = 0.0  # how late the last heartbeat timer ran (seconds): /metrics
        self._questions: Questions | None = None  # the dashboard's thread asking the loop (web.py)
        self._announcer: _discovery.Announcer | None = None  # on the LAN, over mDNS (start())
        self.dashboard: Dashboard | None = None
        self.endpoints: dict[str, str] = {}
        self._own_waker = waker is None
        self._waker = waker or Waker()
        tcp = any(getattr(config, name).startswith("tcp://") for name in ("frontend", "backend", "collector"))
        self.creds = security.broker_credentials(  # "" is no setting
            secret=config.secret, secret_file=config.secret_file, agent_secret=config.agent_secret,
            agent_secret_file=config.agent_secret_file, key_file=config.key_file, allow_dir=config.allow_keys,
            agent_allow_dir=config.allow_agent_keys, insecure=config.insecure, default=tcp)
        self._zap: zmq.Socket[bytes] | None = None
        self._zap_policy: security.ZapPolicy | None = None
        self._monitors: list[security.HandshakeMonitor] = []
        self.reload_requested = False  # SIGHUP: read the allow-list again
        #: With credentials: the key (ZAP User-Id) each agent routing id said HELLO with, kept after
        #: the agent is gone (bounded): another key cannot take over that id and the tasks it held,
        #: and what arrives on the collector for that agent must come from that key.
        self._agent_keys: dict[bytes, str] = {}
        if self.creds is not None:
            # The ZAP handler exists before any socket binds: no window where a handshake goes unchecked.
            self._zap_policy = security.ZapPolicy(self.creds)
            self._zap = self.ctx.socket(zmq.ROUTER)
            self._zap.setsockopt(zmq.LINGER, 0)
            try:
                self._zap.bind("inproc://zeromq.zap.01")
            except zmq.ZMQError as exc:
                self._zap.close()
                raise OSError(f"cannot start the authenticator: {exc}") from None
        for name, kind in (("frontend", zmq.ROUTER), ("backend", zmq.ROUTER), ("collector", zmq.PULL)):
            address = getattr(config, name)
            if not address:
                continue
            sock = self.sockets[name] = self._socket(kind)
            sock.setsockopt(zmq.AFFINITY, _AFFINITY[name])
            if address.startswith("tcp://") and self.creds is not None:
                security.apply_server(sock, self.creds, name)
                self._monitors.append(security.HandshakeMonitor(sock, name, self.creds.mode))
            try:
                _ipc.bind(sock, _ephemeral(address))  # an ipc socket file is 0600 whatever the umask
            except (zmq.ZMQError, OSError) as exc:
                self.close()
                raise OSError(f"cannot bind the {name} to {address}: {exc}. Is another broker running?") from None
            self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.frontend = self.sockets["frontend"]
        self.core: BrokerCore = BrokerCore(
            time.monotonic(),
            heartbeat=config.heartbeat,
            liveness=config.liveness,
            collector=_advertised(self.endpoints.get("collector", "")),
            max_message_size=config.max_message_size,
            security=_describe_security(config, self.creds),
            limits=Limits(queued_tasks=config.max_queued_tasks, queued_bytes=config.max_queued_bytes,
                          functions=config.max_functions, function_bytes=config.max_function_bytes,
                          objects=config.max_objects, object_bytes=config.max_object_bytes),
            coalesce=True,  # dispatch and results once per turn of the loop: see handle()
        )
        self._sessions = KeySessions(config.max_producers_per_key, self.core.has_producer)
        #: Agents in this same process: their messages are calls, not frames.
        self.local_agents: dict[bytes, Callable[[P.Message], None]] = {}
        self._bad_log = RateLimitedLog()  # a flood of garbage must not become a flood of log lines
        self._malformed_told: dict[bytes, float] = {}  # producer -> when it was last told MALFORMED
        self.poller = poller or zmq.Poller()
        handlers = {"frontend": self._on_frontend, "backend": self._on_backend, "collector": self._on_collector}
        # Agents first: results and credits free work for what producers send next.
        self._readers = [Reader(self.sockets[name], handlers[name], log, on_error=self._internal_error,
                                on_oversized=functools.partial(self._oversized, name))
                         for name in ("backend", "collector", "frontend") if name in self.sockets]
        if self._zap is not None:
            self._readers.insert(0, Reader(self._zap, self._on_zap, log, max_frames=64, on_error=self._internal_error))
        for sock in [r.sock for r in self._readers] + [m.socket for m in self._monitors]:
            self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self._waker.fileno(), zmq.POLLIN)
        where = dashboard_address(config.dashboard)
        #: ``defer_dashboard`` (the embedded cluster): no TCP port until its client asks for the dashboard
        #: (``zpar.Client.dashboard_link``: a STATUS asking ``{"dashboard": "start"}``).
        self._dashboard_later = where if defer_dashboard else None
        self.core.history_open = not (self.creds is not None and self.creds.allow)  # with key files: not for all
        self.core.scale_open = self.core.history_open or config.allow_client_scale  # the same rule for Client.scale
        if where is not None and not defer_dashboard:
            try:
                self.start_dashboard(*where, fallback=config.dashboard == DEFAULT_DASHBOARD)
            except OSError:
                self.close()
                raise

    def start_dashboard(self, host: str, port: int, fallback: bool = False) -> None:
        """Serve the dashboard and its API on ``host:port`` (``fallback``: any free port if that one is taken)."""
        from . import web  # http.server: 15 ms of imports a broker without a dashboard goes without

        self._questions = web.Questions()
        self.poller.register(self._questions.fileno(), zmq.POLLIN)
        self.dashboard = web.Dashboard(host, port, web.token_for(self.creds), self._questions, fallback=fallback)
        # In zpar status: with a shared secret every producer is fully trusted (deploy/README), so the
        # link with its token; with key files producers are not, so the address only (the token is in
        # this log, for whoever runs the broker).
        self.core.dashboard = self.dashboard.link if self.core.history_open else self.dashboard.url

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        # A thousand agents connect at once when a cluster starts (two connections each): libzmq's
        # listen backlog of 100 overflows (SYN cookies). The kernel caps this at net.core.somaxconn.
        sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_size)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        return sock

    # ------------------------------------------------------------------ loop

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._waker.wake()

    def run(self) -> None:
        run_loop([self], self.poller, self._waker)

    def start(self) -> None:
        log.info("zpar-broker %s listening: %s", self.core.epoch[:8],
                 ", ".join(f"{name} {ep}" for name, ep in self.endpoints.items()))
        if self.dashboard is not None:
            log.info("dashboard: %s", self.dashboard.link)
        self._announcer = _announcer(self.config, self.endpoints, self.creds, self.core.epoch)

    def handle(self, events: dict[Any, int]) -> None:
        for reader in self._readers:
            if reader.sock in events:
                reader.drain()
        for monitor in self._monitors:
            if monitor.socket in events:
                self._check_handshakes(monitor)
        if self._questions is not None and self._questions.fileno() in events:
            self._questions.answer(self._answer)
        # Once every socket was read: this turn's credits and tasks make few large TASKS, and its
        # results one RESULT per producer and one ACK per agent.
        self._send(self.core.flush())

    def next_deadline(self) -> float:
        return self.core.next_deadline()

    def on_timers(self, now: float) -> bool:
        if now < self.core.next_deadline():
            return False
        self.loop_lag = now - self.core.next_deadline()
        self._send(self.core.tick(now, judge=not self._backlog()))
        self._send(self.core.flush())
        if self.reload_requested and self._zap_policy is not None:
            self.reload_requested = False
            self._zap_policy.reload()
        policy = self._zap_policy
        if policy is not None and policy.revocable:  # silent agents too: their tasks go elsewhere
            for peer in [p for p, key in self._agent_keys.items()
                         if self.core.has_agent(p) and not policy.admits("backend", key.encode())]:
                self._cut_off(now, peer)
        self._sessions.prune()
        parent = self.config.parent_pid
        if parent and os.getppid() != parent:
            log.warning("parent process %d is gone; stopping", parent)
            return True
        return False

    def _backlog(self) -> bool:
        """Messages wait unread in a socket (we were busy): peers' heartbeats may be among them."""
        return any(int(sock.getsockopt(zmq.EVENTS)) & POLLIN for sock in self.sockets.values())

    def shutdown(self) -> None:
        log.info("zpar-broker stopping")
        self._send(self.core.farewells())

    def close(self) -> None:
        if self._announcer is not None:
            self._announcer.close()  # a goodbye on the LAN, so peers forget us now
        if self.dashboard is not None:
            self.dashboard.close()
        if self._questions is not None:
            self._questions.close()
        for monitor in self._monitors:
            monitor.close()
        for sock in self.sockets.values():
            sock.close(linger=0)
        if self._zap is not None:
            self._zap.close(linger=0)
        if self._own_waker:
            self._waker.close()

    def from_local_agent(self, peer: bytes, msg: P.Message) -> None:
        """A message from an agent in this process (see zpar_broker.embedded)."""
        now = time.monotonic()
        if isinstance(msg, P.Result):
            self._send(self.core.results(now, msg))
        elif isinstance(msg, P.Items):
            self._send(self.core.items(now, msg))
        else:
            self._send(self.core.agent_message(now, peer, msg))
        # The agent's part of the loop calls this after the broker's part has flushed this turn.
        self._send(self.core.flush())

    def _answer(self, what: tuple[str, dict[str, Any]]) -> Any:
        """A question from the dashboard's thread (web.Questions), answered with plain data."""
        now = time.monotonic()
        kind, args = what
        if kind == "metrics":
            return self._metrics(now)
        if kind == "tasks":
            return self.core.tasks(**args)
        if kind == "control":
            sent, done = self.core.control(args["node"], P.Action(args["action"]), args.get("workers", 0))
            self._send(sent)
            return {"result": done, "ok": bool(sent)}
        if kind == "cancel":
            sent, count = self.core.cancel_for(args["producer"], args.get("task"))
            self._send(sent)
            return {"cancelled": count}
        if kind == "snapshot":  # the dashboard page's: all it shows, every second
            return {"status": self.core.status(now), "metrics": self._metrics(now), "tasks": self.core.tasks(200),
                    "time": time.time()}
        return self.core.status(now)

    def _metrics(self, now: float) -> dict[str, Any]:
        """The core's metrics and the loop's own (how late it ran its timers)."""
        return self.core.metrics(now) | {"loop_lag": self.loop_lag}

    def _oversized(self, source: str) -> None:
        self.core.protocol_error(source)
        self._bad_log.warn(log, "dropped a message of more than %d frames on the %s", P.MAX_FRAMES, source)

    def _internal_error(self) -> None:
        self.core.counters["internal_errors"] += 1

    def request_reload(self) -> None:
        """SIGHUP: read the allow-list again at the next timer (safe from a signal handler)."""
        self.reload_requested = True

    # ------------------------------------------------------------------ authentication

    def _on_zap(self, frames: list[zmq.Frame]) -> None:
        zap, policy = self._zap, self._zap_policy
        if zap is None or policy is None:  # the reader is registered only with both
            raise RuntimeError("a ZAP request arrived but this broker runs no authenticator")
        reply, admitted, why = policy.reply([f.bytes for f in frames])
        if not reply:
            self._bad_log.warn(log, "malformed ZAP request dropped")
            return
        self.core.counters["auth_admitted" if admitted else "auth_refused"] += 1
        if not admitted:
            self._bad_log.warn(log, "refused a peer: %s", why)
        zap.send_multipart(reply)

    def _check_handshakes(self, monitor: security.HandshakeMonitor) -> None:
        before = monitor.failed
        monitor.check()
        if monitor.failed > before:  # ZAP refusals included; auth_refused counts those apart
            self.core.counters["handshakes_failed"] += monitor.failed - before
            self._bad_log.warn(log, "a peer failed the CurveZMQ handshake on the %s (no secret, a wrong "
                               "one, or not a zpar peer)", monitor.address)

    def _key_refused(self, name: str, header: zmq.Frame, key: str | None = None) -> bool:
        """Whether the key a message came with (ZAP User-Id on its frames) is no longer admitted.

        Checked on every message of every socket: with key files, removing a
        key's file cuts off its open connections at once, not at the next
        handshake. Shared-secret keys last as long as the secret. ``key``: the
        User-Id, if the caller has read it already.
        """
        policy = self._zap_policy
        if policy is None or not policy.revocable:
            return False
        if policy.admits(name, (_user_id(header) if key is None else key).encode()):
            return False
        self.core.counters["revoked_messages"] += 1
        self._bad_log.warn(log, "dropped a message on the %s from a key no longer in its allow-list", name)
        return True

    def _cut_off(self, now: float, agent: bytes) -> None:
        """An agent whose key was revoked: its tasks go elsewhere, its results are refused."""
        self.core.counters["peers_revoked"] += 1
        log.warning("key of agent %s was removed from the allow-list: cutting it off", agent.hex())
        self._send(self.core.revoke(now, agent))
        self._send(self.core.flush())

    def _hello_key_taken(self, peer: bytes, key: str) -> bool:
        """Tie an agent routing id to the key of its first HELLO; another key saying HELLO as it is refused."""
        bound = self._agent_keys.setdefault(peer, key)
        if bound == key:
            if len(self._agent_keys) > _MAX_AGENT_IDS:  # the oldest ids of agents that are gone
                for old in [p for p in self._agent_keys if not self.core.has_agent(p)][:len(self._agent_keys) // 2]:
                    del self._agent_keys[old]
            return False
        self.core.counters["agent_id_taken"] += 1
        self._bad_log.warn(log, "refused a HELLO as agent %s from another key than the one it registered with",
                           peer.hex())
        return True

    # ------------------------------------------------------------------ handlers

    def _decode(self, frames: list[zmq.Frame], source: str, routed: bool) -> tuple[bytes, P.Message | None]:
        """``(peer, message)``; the message None (counted, logged at a bounded rate) if it is bad."""
        self.core.counters[f"messages_{source}"] += 1
        try:
            if routed:
                return P.decode_routed(frames)
            return b"", P.decode(frames)
        except ProtocolError as exc:
            self.core.protocol_error(source)
            self._bad_log.warn(log, "dropped a bad message on the %s: %s", source, exc)
            return (frames[0].bytes if routed else b""), None

    def _on_frontend(self, frames: list[zmq.Frame]) -> None:
        peer, msg = self._decode(frames, "frontend", routed=True)
        if msg is None:
            if self._tell_malformed(peer):
                self._send([Outgoing(Dest.FRONTEND, peer, P.Error(P.ErrorCode.MALFORMED))])
            return
        if self._key_refused("frontend", frames[1]):
            self._send([Outgoing(Dest.FRONTEND, peer, P.Error(P.ErrorCode.KEY_REVOKED))])
            return
        if isinstance(msg, P.Hello) and not self._sessions.admit(peer, _user_id(frames[1])):
            self.core.counters["producers_refused_per_key"] += 1
            self._bad_log.warn(log, "refused a producer: its key has %d producers connected already",
                               self._sessions.limit)
            self._send([Outgoing(Dest.FRONTEND, peer, P.Error(
                P.ErrorCode.TOO_MANY_PEERS, (), f"its key has {self._sessions.limit} clients connected already"))])
            return
        if (isinstance(msg, P.StatusMsg) and self._dashboard_later is not None
                and msg.info.get("dashboard") == "start"):
            self._start_deferred_dashboard()
        self._send(self.core.producer_message(time.monotonic(), peer, msg))

    def _start_deferred_dashboard(self) -> None:
        where, self._dashboard_later = self._dashboard_later, None
        if where is None:  # the caller checks; for the type
            return
        try:
            self.start_dashboard(*where, fallback=True)
        except OSError as exc:  # the cluster runs on without one
            log.warning("no dashboard: %s", exc)

    def _on_backend(self, frames: list[zmq.Frame]) -> None:
        peer, msg = self._decode(frames, "backend", routed=True)
        if msg is None:
            return
        now = time.monotonic()
        if self._key_refused("backend", frames[1]):
            if self.core.has_agent(peer):
                self._cut_off(now, peer)
            return
        if self.creds is not None and isinstance(msg, P.Hello):
            key = _user_id(frames[1])
            if self._hello_key_taken(peer, key):
                return
        self._send(self.core.agent_message(now, peer, msg))

    def _on_collector(self, frames: list[zmq.Frame]) -> None:
        _, msg = self._decode(frames, "collector", routed=False)
        if msg is None:
            return
        if not isinstance(msg, P.Result | P.Items | P.Bye) or not msg.agent:
            self.core.protocol_error("collector")  # only an agent's results, items or goodbye come here
            return
        key = _user_id(frames[0]) if self.creds is not None else ""  # read once: it is on every frame
        if self._key_refused("collector", frames[0], key):
            return
        if self.creds is not None and not self._sender_holds(msg.agent, key):
            self.core.counters["collector_identity_mismatch"] += 1
            self._bad_log.warn(log, "dropped a %s on the collector claiming agent %s: %s", msg.kind.name,
                               msg.agent.hex(), "not a registered agent" if msg.agent not in self._agent_keys
                               else "sent with another key than that agent's")
            return
        now = time.monotonic()
        if isinstance(msg, P.Bye):  # an agent leaving, behind its last results
            self._send(self.core.agent_message(now, msg.agent, msg))
        elif isinstance(msg, P.Items):  # a stream's items, ahead of its result on the same pipe
            self._send(self.core.items(now, msg))
        else:
            self._send(self.core.results(now, msg))

    def _tell_malformed(self, peer: bytes) -> bool:
        """Whether to answer a malformed message with ERROR: once a second per peer, so that a flood
        of garbage does not cost a reply each (a real client's mistake is still named)."""
        now = time.monotonic()
        if now - self._malformed_told.get(peer, -1.0) < 1.0:
            return False
        if len(self._malformed_told) >= 10_000:
            self._malformed_told.clear()
        self._malformed_told[peer] = now
        return True

    def _sender_holds(self, agent: bytes, key: str) -> bool:
        """Whether ``key``, which sent a message on the collector, is the one ``agent`` said HELLO with.

        The collector is a PULL socket: the agent a message claims (``msg.agent``) is a header
        field, so the connection's key (ZAP User-Id, on every frame) must back it, or an admitted
        agent could end, feed or drop another's tasks. With key files that names one node; with a
        shared secret every agent holds the same key, so this proves only "an agent".
        """
        return self._agent_keys.get(agent) == key and self.core.has_agent(agent)

    # ------------------------------------------------------------------ sending

    def _send(self, out: list[Outgoing]) -> None:
        last: P.Message | None = None
        body: list[P.Frame] = []
        for item in out:
            if item.dest is Dest.BACKEND and item.peer in self.local_agents:
                self.local_agents[item.peer](item.msg)
                continue
            if item.msg is not last:  # one message to many peers (a tick's heartbeats): encoded once
                last, body = item.msg, P.encode(item.msg)
            self._send_frames(item, [item.peer, *body])

    def _send_frames(self, item: Outgoing, frames: list[P.Frame]) -> None:
        sock = self.sockets["frontend" if item.dest is Dest.FRONTEND else "backend"]
        self.core.counters[f"sent_{item.dest.value}"] += 1
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.core.counters["send_dropped_hwm"] += 1
            log.warning("%s peer %s is not reading; dropped a %s", item.dest.value, item.peer.hex(), item.msg.kind.name)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.core.counters["send_unroutable"] += 1
                log.debug("%s peer %s is gone; dropped a %s", item.dest.value, item.peer.hex(), item.msg.kind.name)
            else:
                raise


def _user_id(frame: zmq.Frame) -> str:
    """The ZAP user id of the connection ``frame`` came on (the peer's z85 key); "" if it has none."""
    try:
        return str(frame.get("User-Id") or "")
    except zmq.ZMQError:  # no metadata: not an authenticated connection (ipc)
        return ""


def _describe_security(config: BrokerConfig, creds: security.BrokerCredentials | None) -> str:
    if creds is not None:
        return creds.mode
    if config.insecure:
        return "INSECURE: no authentication (--insecure)"
    return "ipc only: guarded by the socket files' mode (0600 in a 0700 directory)"


def _announcer(config: BrokerConfig, endpoints: dict[str, str], creds: security.BrokerCredentials | None,
               epoch: str) -> _discovery.Announcer | None:
    """Start announcing the broker on the LAN if its config asks (see BrokerConfig.announce); else None."""
    if (config.announce == "off" or (config.announce == "auto" and creds is None)  # --insecure: on asking only
            or not any(ep.startswith("tcp://") for ep in endpoints.values())):  # the embedded cluster: ipc
        return None
    from zpar import _discovery  # zeroconf itself only in the announcer's thread

    mode = "none" if creds is None else "keys" if config.key_file else "secret" if config.secured else "user"
    keys = {name: pair.public for name, pair in creds.keys.items()} if creds is not None else {}
    made = _discovery.broker_announcement(endpoints, config.cluster or _discovery.default_cluster_name(), epoch,
                                          mode, keys)
    if made is None:
        if config.announce == "on":
            log.warning("not announced on the LAN: this broker listens on loopback (or IPv6) only")
        return None
    announcer = _discovery.Announcer(*made)
    announcer.start()
    return announcer


class RateLimitedLog:
    """At most ``burst`` warnings per ``window`` seconds; then one line counting what was left out."""

    def __init__(self, burst: int = 10, window: float = 60.0) -> None:
        self.burst, self.window = burst, window
        self._start, self._count = -window, 0

    def warn(self, logger: logging.Logger, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._start >= self.window:
            if self._count > self.burst:
                logger.warning("... and %d more like it in %.0f s (see `zpar status` counters)",
                               self._count - self.burst, self.window)
            self._start, self._count = now, 0
        self._count += 1
        if self._count <= self.burst:
            logger.warning(fmt, *args)


def run(config: BrokerConfig) -> int:
    """Run a broker until SIGTERM or SIGINT; returns the process exit code."""
    return run_until_signalled(BrokerServer(config))
