"""A socket's CurveZMQ handshakes watched, so that a refusal becomes a clear error and not a hang."""

from __future__ import annotations

import os
import struct

import zmq

_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class HandshakeMonitor:
    """Watches a socket's handshakes (ZMQ socket monitor), so a refusal is an error, not a hang.

    Poll ``socket`` with the owner's loop; ``check()`` reads what arrived and
    returns the reason of the last failed handshake, or None.
    """

    #: Handshakes failed in a row with no detail before that counts as a refusal.
    UNEXPLAINED_LIMIT = 3

    def __init__(self, sock: zmq.Socket[bytes], address: str, origin: str | None) -> None:
        self.address, self.origin = address, origin
        self._watched = sock
        # A unique endpoint: pyzmq's default is named after the fd, which a later socket may reuse.
        self.socket: zmq.Socket[bytes] = sock.get_monitor_socket(
            _HANDSHAKE_EVENTS, f"inproc://zpar-monitor-{os.urandom(8).hex()}")
        self.succeeded = 0
        self.failed = 0
        self._unexplained = 0  # handshakes failed in a row with no detail

    def check(self) -> str | None:
        failure = None
        while self.socket.poll(0):
            try:
                event, value = _next_event(self.socket)
            except zmq.Again:
                break
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded += 1
                failure, self._unexplained = None, 0
                continue
            self.failed += 1
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # Also what a peer hanging up mid-handshake looks like (a plaintext broker closing
                # on us, a proxy whose far end is not up yet): conclude only if it keeps happening.
                self._unexplained += 1
                if self._unexplained < self.UNEXPLAINED_LIMIT:
                    continue
            failure = self._explain(event, value)
        return failure

    def _explain(self, event: int, value: int) -> str:
        where = f"the broker at {self.address}"
        used = self.origin
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"{where} refused our key (ZAP status {value}; we used {used}): it runs with another secret "
                    "(or as another user, each of whom has a secret of their own), this node's public key is not "
                    "in its allow-list for this role, or an agent's secret was used by a producer. Give the "
                    "cluster's secret (secret=..., ZPAR_SECRET_FILE or --secret-file) or key files")
        if self.origin is None:  # a plain handshake fails only with a broker that wants credentials
            return (f"{where} requires authentication and we were told insecure: drop insecure=True/--insecure "
                    "(this user's own secret is then used), or give the cluster's secret or key files")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return (f"{where} does not speak CurveZMQ with us: it runs --insecure (then say insecure=True, on a "
                    "machine and network you trust), or it is not a zpar broker")
        # No detail: a broker with another key and one that runs --insecure both just hang up on us.
        return (f"the CurveZMQ handshake with {where} failed (we used {used}): it runs with another secret (the "
                "cluster's, or another user's own: each user has one) or another broker key; give the cluster's "
                "secret (secret_file=..., ZPAR_SECRET_FILE or --secret-file) or key files. Or it runs --insecure: "
                "then say insecure=True, on a machine and network you trust")

    def close(self) -> None:
        """Stop the monitor before the watched socket closes (a dangling one can wedge libzmq)."""
        try:
            self._watched.disable_monitor()
        except zmq.ZMQError:
            pass  # the watched socket is closed already
        self.socket.close(linger=0)


def _next_event(sock: zmq.Socket[bytes]) -> tuple[int, int]:
    """The next socket-monitor event: ZeroMQ 4's first frame is a uint16 event and a uint32 value.

    Parsed here rather than with ``zmq.utils.monitor``, which imports asyncio
    (17 ms of every daemon's and client's start).
    """
    first = sock.recv_multipart(zmq.NOBLOCK)[0]
    event, value = struct.unpack("=HI", first[:6])
    return event, value
