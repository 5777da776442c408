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

import logging
import os
import time
import urllib.parse

import zmq

from zpar import protocol as P
from zpar.config import BrokerConfig
from zpar.daemon import Waker, drain, run_until_signalled
from zpar.errors import ProtocolError

from .core import BrokerCore, Dest, Outgoing

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
    if host in ("0.0.0.0", "::", "*", ""):
        return f"tcp://*:{parts.port}"  # the agent substitutes the host it reached us on
    return endpoint


class BrokerServer:
    """Owns the broker's sockets; ``run()`` blocks until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, config: BrokerConfig, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.ctx = ctx or zmq.Context.instance()
        self.frontend = self._socket(zmq.ROUTER)
        self.backend = self._socket(zmq.ROUTER)
        self.collector = self._socket(zmq.PULL)
        self.endpoints = {}
        for name, sock in (("frontend", self.frontend), ("backend", self.backend), ("collector", self.collector)):
            address = getattr(config, name)
            try:
                sock.bind(_ephemeral(address))
            except zmq.ZMQError as exc:
                self.close()
                raise OSError(f"cannot bind the {name} to {address}: {exc}. Is another broker running?") from None
            self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.core = BrokerCore(
            time.monotonic(),
            heartbeat=config.heartbeat,
            liveness=config.liveness,
            collector=_advertised(self.endpoints["collector"]),
            max_message_size=config.max_message_size,
        )
        self._waker = Waker()
        self._running = False

    def _socket(self, kind: int) -> zmq.Socket:
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
        log.info("zpar-broker %s listening: frontend %s, backend %s, collector %s",
                 self.core.epoch[:8], self.endpoints["frontend"], self.endpoints["backend"],
                 self.endpoints["collector"])
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.collector, zmq.POLLIN)
        poller.register(self._waker.fileno(), zmq.POLLIN)
        self._running = True
        parent = self.config.parent_pid
        while self._running:
            timeout = max(0.0, self.core.next_deadline() - time.monotonic())
            events = dict(poller.poll(int(timeout * 1000) + 1))
            if self._waker.fileno() in events:
                self._running = False
                break
            if self.backend in events:
                self._drain(self.backend, self._on_backend)
            if self.collector in events:
                self._drain(self.collector, self._on_collector)
            if self.frontend in events:
                self._drain(self.frontend, self._on_frontend)
            now = time.monotonic()
            if now >= self.core.next_deadline():
                self._send(self.core.tick(now))
                if parent and os.getppid() != parent:
                    log.warning("parent process %d is gone; stopping", parent)
                    break
        log.info("zpar-broker stopping")
        self._farewell()

    def _farewell(self) -> None:
        for peer in list(self.core._agents):  # noqa: SLF001 - the loop owns the core
            self._send_one(Outgoing(Dest.BACKEND, peer, P.Bye("broker stopping")))

    def close(self) -> None:
        for sock in (self.frontend, self.backend, self.collector):
            sock.close(linger=0)
        if hasattr(self, "_waker"):
            self._waker.close()

    def _drain(self, sock: zmq.Socket, handler) -> None:
        drain(sock, handler, log, self._internal_error)

    def _internal_error(self) -> None:
        self.core.counters["internal_errors"] += 1

    # ------------------------------------------------------------------ handlers

    def _decode(self, frames: list[zmq.Frame], source: str) -> P.Message | None:
        self.core.counters[f"messages_{source}"] += 1
        try:
            return P.decode(frames[0].buffer, len(frames) - 1)
        except ProtocolError as exc:
            self.core.protocol_error(source)
            log.warning("dropped a bad message on the %s: %s", source, exc)
            return None

    def _on_frontend(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        msg = self._decode(frames[1:], "frontend")
        if msg is None:
            self._send_one(Outgoing(Dest.FRONTEND, peer, P.Error("malformed message dropped")))
            return
        self._send(self.core.producer_message(time.monotonic(), peer, msg, frames[2:]))

    def _on_backend(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        msg = self._decode(frames[1:], "backend")
        if msg is None:
            return
        self._send(self.core.agent_message(time.monotonic(), peer, msg, frames[2:]))

    def _on_collector(self, frames: list[zmq.Frame]) -> None:
        msg = self._decode(frames, "collector")
        if msg is None:
            return
        if not isinstance(msg, P.Result):
            self.core.protocol_error("collector")
            return
        self._send(self.core.results(time.monotonic(), msg, frames[1:]))

    # ------------------------------------------------------------------ sending

    def _send(self, out: list[Outgoing]) -> None:
        for item in out:
            self._send_one(item)

    def _send_one(self, item: Outgoing) -> None:
        sock = self.frontend if item.dest is Dest.FRONTEND else self.backend
        self.core.counters[f"sent_{item.dest.value}"] += 1
        try:
            sock.send_multipart([item.peer, P.encode(item.msg), *item.frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.core.counters["send_dropped_hwm"] += 1
            log.warning("%s peer %s is not reading; dropped a %s", item.dest.value, item.peer.hex(), item.msg.kind.name)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.core.counters["send_unroutable"] += 1
                log.debug("%s peer %s is gone; dropped a %s", item.dest.value, item.peer.hex(), item.msg.kind.name)
            else:
                raise


def run(config: BrokerConfig) -> int:
    """Run a broker until SIGTERM or SIGINT; returns the process exit code."""
    return run_until_signalled(BrokerServer(config))
