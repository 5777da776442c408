"""How an agent talks to its broker.

Over the network (:class:`SocketUplink`): a DEALER to the broker's backend for
control messages, and a PUSH to its collector for results. In the embedded
cluster the broker lives in the same process and loop, and the link is a plain
method call (``zpar_broker.embedded``): the same agent code, one hop fewer.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Protocol

import zmq

from zpar import protocol as P
from zpar import security

log = logging.getLogger(__name__)

_RECONNECT_MS = 20  # libzmq's default of 100 ms slows start-up


class Uplink(Protocol):
    def send(self, msg: P.Message) -> None:
        """A control message (HELLO, READY, HEARTBEAT, BYE) to the broker."""

    def send_results(self, msg: P.Result | P.Items) -> bool:
        """Results (or streams' items, ahead of them) for the collector; False when they cannot go now."""

    def welcomed(self, msg: P.Welcome) -> None:
        """The broker's WELCOME arrived: connect whatever it points at."""

    def socket(self) -> zmq.Socket[bytes] | None:
        """The socket the agent's loop polls for the broker's messages, if any."""

    def auth_failure(self) -> str | None:
        """Why the broker refused our handshake, if it did since the last call; else None."""

    def close(self) -> None: ...


def configure(sock: zmq.Socket[bytes], max_message_size: int) -> zmq.Socket[bytes]:
    """The options every agent socket gets: bounded linger and queues, fast reconnects."""
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    return sock


def collector_address(advertised: str, broker: str) -> str:
    """Where to PUSH results: the collector's port, on the host we reached the broker at.

    The host the broker sees itself as (a wildcard, an inside address behind
    NAT or a tunnel) may not be how we reach it; the way we reached its
    backend is. An ipc collector is used as it is.
    """
    if advertised.startswith("tcp://") and broker.startswith("tcp://"):
        host = urllib.parse.urlsplit(broker.replace("tcp://", "//", 1)).hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"tcp://{host}:{advertised.rsplit(':', 1)[1]}"
    return advertised


class SocketUplink:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], broker: str, identity: bytes, max_message_size: int,
                 creds: security.Credentials | None = None) -> None:
        self.ctx, self.address, self.max_message_size, self.creds = ctx, broker, max_message_size, creds
        self.dealer = configure(ctx.socket(zmq.DEALER), max_message_size)
        self.dealer.setsockopt(zmq.AFFINITY, 1)  # the first I/O thread: the workers' pipe has the second
        self.identity = identity
        self.dealer.setsockopt(zmq.IDENTITY, identity)
        security.apply_client(self.dealer, creds)
        self._monitors = ([security.HandshakeMonitor(self.dealer, broker, security.origin(creds))]
                          if broker.startswith("tcp://") else [])
        self.dealer.connect(broker)
        self.collector: zmq.Socket[bytes] | None = None

    def socket(self) -> zmq.Socket[bytes]:
        return self.dealer

    def auth_failure(self) -> str | None:
        for monitor in self._monitors:
            failure = monitor.check()
            if failure:
                return failure
        return None

    def send(self, msg: P.Message) -> None:
        if isinstance(msg, P.Bye) and self.collector is not None:
            # Behind our last results on the same pipe, so the broker sees them first.
            try:  # never block: a broker that refuses us (or is gone) must not hang the agent's exit
                self.collector.send_multipart(P.encode(P.Bye(msg.reason, self.identity)), zmq.NOBLOCK)
            except zmq.Again:
                log.info("broker %s is not reading; left without saying BYE", self.address)
            return
        try:
            self.dealer.send_multipart(P.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("broker %s is not reading; dropped a %s", self.address, msg.kind.name)

    def send_results(self, msg: P.Result | P.Items) -> bool:
        if self.collector is None:
            return False
        try:
            self.collector.send_multipart(P.encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def welcomed(self, msg: P.Welcome) -> None:
        address = collector_address(msg.collector, self.address)
        if self.collector is not None and self.collector.getsockopt_string(zmq.LAST_ENDPOINT) == address:
            return
        if self.collector is not None:
            self.collector.close(linger=0)
        self.collector = configure(self.ctx.socket(zmq.PUSH), self.max_message_size)
        self.collector.setsockopt(zmq.AFFINITY, 1)
        security.apply_client(self.collector, self.creds)
        if address.startswith("tcp://"):
            self._monitors[1:] = [security.HandshakeMonitor(self.collector, address, security.origin(self.creds))]
        self.collector.connect(address)

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close()
        for sock in (self.dealer, self.collector):
            if sock is not None:
                sock.close(linger=500)
