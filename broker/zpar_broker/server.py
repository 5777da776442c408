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
from typing import Any

import zmq

from zpar import _ipc, security
from zpar import protocol as P
from zpar._loop import Reader, Waker, run_loop, run_until_signalled
from zpar.config import BrokerConfig
from zpar.errors import ProtocolError

from .core import BrokerCore
from .limits import Limits
from .outgoing import Dest, Outgoing

log = logging.getLogger(__name__)


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
                 poller: zmq.Poller | None = None, waker: Waker | None = None) -> None:
        self.config = config
        self.ctx: zmq.Context[zmq.Socket[bytes]] = ctx or zmq.Context.instance()
        self.sockets: dict[str, zmq.Socket[bytes]] = {}
        self.endpoints: dict[str, str] = {}
        self._own_waker = waker is None
        self._waker = waker or Waker()
        self.creds = security.broker_credentials(
            secret=config.secret, secret_file=config.secret_file, key_file=config.key_file,
            allow_dir=config.allow_keys)  # "" is no setting
        self._zap: zmq.Socket[bytes] | None = None
        self._zap_policy: security.ZapPolicy | None = None
        self._monitors: list[security.HandshakeMonitor] = []
        self.reload_requested = False  # SIGHUP: read the allow-list again
        self._peer_keys: security.PeerKeys | None = None  # key-file mode: who holds which key
        #: With credentials: the key (ZAP User-Id) each agent presented at its HELLO on the backend,
        #: by routing id; what it sends on the collector must come from that key (``_sender_holds``).
        self._agent_keys: dict[bytes, str] = {}
        if self.creds is not None:
            # The ZAP handler exists before any socket binds: no window where a handshake goes unchecked.
            self._zap_policy = security.ZapPolicy(self.creds)
            if self._zap_policy.allow is not None:
                self._peer_keys = security.PeerKeys(self._zap_policy.allow)
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
            if address.startswith("tcp://") and self.creds is not None:
                security.apply_server(sock, self.creds, name)
                self._monitors.append(security.HandshakeMonitor(sock, name, self.creds))
            try:
                _ipc.bind(sock, _ephemeral(address))  # an ipc socket file is 0600 whatever the umask
            except (zmq.ZMQError, OSError) as exc:
                self.close()
                raise OSError(f"cannot bind the {name} to {address}: {exc}. Is another broker running?") from None
            self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.frontend = self.sockets["frontend"]
        self.core = BrokerCore(
            time.monotonic(),
            heartbeat=config.heartbeat,
            liveness=config.liveness,
            collector=_advertised(self.endpoints.get("collector", "")),
            max_message_size=config.max_message_size,
            security=_describe_security(config, self.creds),
            limits=Limits(queued_tasks=config.max_queued_tasks, queued_bytes=config.max_queued_bytes,
                          functions=config.max_functions, function_bytes=config.max_function_bytes),
        )
        #: Agents in this same process: their messages are calls, not frames.
        self.local_agents: dict[bytes, Callable[[P.Message], None]] = {}
        self._bad_log = RateLimitedLog()  # a flood of garbage must not become a flood of log lines
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

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
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

    def handle(self, events: dict[Any, int]) -> None:
        for reader in self._readers:
            if reader.sock in events:
                reader.drain()
        for monitor in self._monitors:
            if monitor.socket in events:
                self._check_handshakes(monitor)

    def next_deadline(self) -> float:
        return self.core.next_deadline()

    def on_timers(self, now: float) -> bool:
        if now < self.core.next_deadline():
            return False
        self._send(self.core.tick(now, judge=not self._backlog()))
        if self.reload_requested and self._zap_policy is not None:
            self.reload_requested = False
            self._zap_policy.reload()
        if self._peer_keys is not None:
            for peer in self._peer_keys.sweep():
                self.core.counters["peers_revoked"] += 1
                log.warning("key of peer %s was removed from the allow-list: cutting it off", peer.hex())
                self._send(self.core.revoke(now, peer))
        for peer in [p for p in self._agent_keys if not self.core.has_agent(p)]:
            del self._agent_keys[peer]  # dropped (silent, left, revoked): it must say HELLO again
        parent = self.config.parent_pid
        if parent and os.getppid() != parent:
            log.warning("parent process %d is gone; stopping", parent)
            return True
        return False

    def _backlog(self) -> bool:
        """Messages wait unread in a socket (we were busy): peers' heartbeats may be among them."""
        return any(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN for sock in self.sockets.values())

    def shutdown(self) -> None:
        log.info("zpar-broker stopping")
        self._send(self.core.farewells())

    def close(self) -> None:
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

    def _revoked(self, keys: security.PeerKeys, peer: bytes, header: zmq.Frame, msg: P.Message) -> bool:
        """Key-file mode: drop what a revoked peer sends; note the key of each peer saying HELLO.

        ``header`` is the message's first frame, which carries the ZAP user id (the peer's key).
        """
        if peer in keys.revoked:
            self.core.counters["revoked_messages"] += 1
            return True
        if isinstance(msg, P.Hello):
            keys.note(peer, header)
        return False

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
            self._send_one(Outgoing(Dest.FRONTEND, peer, P.Error(P.ErrorCode.MALFORMED)))
            return
        if self._peer_keys is not None and self._revoked(self._peer_keys, peer, frames[1], msg):
            return
        self._send(self.core.producer_message(time.monotonic(), peer, msg))

    def _on_backend(self, frames: list[zmq.Frame]) -> None:
        peer, msg = self._decode(frames, "backend", routed=True)
        if msg is None:
            return
        if self._peer_keys is not None and self._revoked(self._peer_keys, peer, frames[1], msg):
            return
        if self.creds is not None and isinstance(msg, P.Hello):
            self._agent_keys[peer] = _user_id(frames[1])
        self._send(self.core.agent_message(time.monotonic(), peer, msg))

    def _on_collector(self, frames: list[zmq.Frame]) -> None:
        _, msg = self._decode(frames, "collector", routed=False)
        if msg is None:
            return
        if not isinstance(msg, P.Result | P.Items | P.Bye) or not msg.agent:
            self.core.protocol_error("collector")  # only an agent's results, items or goodbye come here
            return
        if self._peer_keys is not None and msg.agent in self._peer_keys.revoked:
            self.core.counters["revoked_messages"] += 1
            return
        if self.creds is not None and not self._sender_holds(msg.agent, frames[0]):
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

    def _sender_holds(self, agent: bytes, header: zmq.Frame) -> bool:
        """Whether the key that sent ``header`` on the collector is the one ``agent`` said HELLO with.

        The collector is a PULL socket: the agent a message claims (``msg.agent``) is a header
        field, so the connection's key (ZAP User-Id, on every frame) must back it, or an admitted
        agent could end, feed or drop another's tasks. With key files that names one node; with a
        shared secret every agent holds the same key, so this proves only "an agent".
        """
        key = self._agent_keys.get(agent)
        return key is not None and key == _user_id(header)

    # ------------------------------------------------------------------ sending

    def _send(self, out: list[Outgoing]) -> None:
        for item in out:
            self._send_one(item)

    def _send_one(self, item: Outgoing) -> None:
        if item.dest is Dest.BACKEND and item.peer in self.local_agents:
            self.local_agents[item.peer](item.msg)
            return
        sock = self.sockets["frontend" if item.dest is Dest.FRONTEND else "backend"]
        self.core.counters[f"sent_{item.dest.value}"] += 1
        try:
            sock.send_multipart(P.encode_routed(item.peer, item.msg), zmq.NOBLOCK, copy=False)
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


def _describe_security(config: BrokerConfig, creds: security.Credentials | None) -> str:
    if creds is not None:
        return f"curve, allow-list {creds.allow_dir}" if creds.allow_dir else "curve, shared secret"
    if config.insecure:
        return "INSECURE: no authentication (--insecure)"
    return "none: loopback and ipc only"


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
