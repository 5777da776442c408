"""Who may talk to a broker: CurveZMQ keys from a shared secret or key files, and the ZAP policy.

Two ways to hold credentials (DESIGN.md, Security):

* **A shared secret.** Every party derives the same keypairs from it: scrypt
  once, with the random salt a ``zpar keygen`` secret carries
  (``zpar-secret-v1:<salt>:<secret>``), then one Curve25519 keypair per role
  (``broker``, ``agent``, ``producer``) from that with BLAKE2b and a label.
  Any other secret (typed, or an older file) must pass an entropy estimate
  and is salted with a fixed label. Secret files and key files that others
  may read, and weak secrets, are refused. The broker admits agents on its
  backend and collector and producers on its frontend. Whoever holds the
  secret is fully trusted.
* **Key files** (``zpar keygen --keys DIR``): a keypair per node. Peers know
  the broker's public key; the broker admits the public keys found in an
  allow-list directory, read again whenever the directory changes (or on
  SIGHUP), so removing a file revokes that node. A node cannot impersonate
  the broker.

With neither, sockets stay on loopback or ipc (config.check_bind_address).
This module holds policy only; the broker's loop answers the ZAP requests
(zpar_broker.server), and connection/agent code call :func:`apply_client`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from ._secrets import (
    FILE_FORMAT,
    MIN_SECRET_BITS,
    MIN_SECRET_BYTES,
    SCRYPT_N,
    WELL_KNOWN,
    check_private,
    check_secret,
    estimate_bits,
    generate_secret,
    read_secret_file,
    stretch,
    write_secret_file,
)
from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [  # the secrets' rules live in zpar._secrets; callers reach them here
    "FILE_FORMAT", "MIN_SECRET_BITS", "MIN_SECRET_BYTES", "SCRYPT_N", "WELL_KNOWN", "ZAP_DOMAIN", "AllowList",
    "Credentials", "HandshakeMonitor", "KeyPair", "PeerKeys", "ZapPolicy", "apply_client", "apply_server",
    "broker_credentials", "check_private", "check_secret", "client_credentials", "derive_keys", "estimate_bits",
    "generate_secret", "load_keypair", "make_keypair_files", "read_secret_file", "write_secret_file",
]

#: handshake fails unless our handler answers for it.
ZAP_DOMAIN = "zpar"

@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class KeyPair:
    """A Curve25519 keypair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes | None = None

    def __repr__(self) -> str:  # never print a secret key
        return f"KeyPair(public={self.public.decode()!r})"


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Credentials:
    """What one process needs to speak CurveZMQ with a broker.

    ``own`` is this process's keypair; ``broker`` the broker's (with its
    secret half only in the broker). ``peers`` is what the broker admits, per
    socket (shared-secret mode); ``allow_dir`` replaces it in key-file mode.
    """

    own: KeyPair
    broker: KeyPair
    peers: dict[str, frozenset[bytes]] = dataclasses.field(default_factory=dict)
    allow_dir: str = ""

    def __repr__(self) -> str:
        mode = f"allow-list {self.allow_dir}" if self.allow_dir else "shared secret"
        return f"Credentials({mode}, broker {self.broker.public.decode()})"


def _keypair_from_seed(seed: bytes) -> KeyPair:
    secret = zmq.utils.z85.encode(seed)
    return KeyPair(zmq.curve_public(secret), secret)


_derived: dict[bytes, dict[str, KeyPair]] = {}


def derive_keys(secret: str | bytes) -> dict[str, KeyPair]:
    """The broker's, agents' and producers' keypairs for a shared secret (cached per process).

    A ``zpar keygen`` secret is stretched with its own salt; any other (typed)
    secret must pass :func:`check_secret` and is salted with a fixed label.
    """
    master = stretch(secret)
    if master not in _derived:
        _derived[master] = {
            role: _keypair_from_seed(hashlib.blake2b(master, digest_size=32, person=b"zpar-" + role.encode()).digest())
            for role in ("broker", "agent", "producer")
        }
    return _derived[master]


def load_keypair(path: str | os.PathLike[str], *, need_secret: bool) -> KeyPair:
    """A keypair from a ``zpar keygen --keys`` file (``NAME.key_secret``, or ``NAME.key`` for a public key)."""
    if need_secret:
        check_private(path, "key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc}") from None
    if need_secret and not secret:
        raise ConfigError(f"{path} holds only a public key; give this node's NAME.key_secret file")
    return KeyPair(public, secret)


def make_keypair_files(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, to share) and ``NAME.key_secret`` (mode 600) into ``directory``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = (Path(p) for p in zmq.auth.create_certificates(folder, name))
    secret.chmod(0o600)
    return public, secret


def client_credentials(role: str, *, secret: str | bytes | None = None, secret_file: str | None = None,
                       key_file: str | None = None, broker_key: str | None = None) -> Credentials | None:
    """Credentials of a producer or agent (``role``), or None for a plain (loopback) connection."""
    if key_file or broker_key:
        if not (key_file and broker_key):
            raise ConfigError("key files need both this node's key (key_file, NAME.key_secret) and the "
                              "broker's public key (broker_key, broker.key)")
        return Credentials(load_keypair(key_file, need_secret=True), load_keypair(broker_key, need_secret=False))
    if secret_file:
        secret = read_secret_file(secret_file)
    if not secret:
        return None
    keys = derive_keys(secret)
    return Credentials(keys[role], KeyPair(keys["broker"].public))


def broker_credentials(*, secret: str | bytes | None = None, secret_file: str | None = None,
                       key_file: str | None = None, allow_dir: str | None = None) -> Credentials | None:
    """The broker's credentials and what it admits, or None when it runs without security."""
    if key_file or allow_dir:
        if not (key_file and allow_dir):
            raise ConfigError("key files need both the broker's key (key_file, broker.key_secret) and an "
                              "allow-list directory of node public keys (allow_keys)")
        if not os.path.isdir(allow_dir):
            raise ConfigError(f"the allow-list {allow_dir} is not a directory")
        own = load_keypair(key_file, need_secret=True)
        return Credentials(own, own, allow_dir=allow_dir)
    if secret_file:
        secret = read_secret_file(secret_file)
    if not secret:
        return None
    keys = derive_keys(secret)
    agents = frozenset({keys["agent"].public})
    return Credentials(keys["broker"], keys["broker"],
                       peers={"frontend": frozenset({keys["producer"].public}), "backend": agents,
                              "collector": agents})


def apply_client(sock: zmq.Socket[bytes], creds: Credentials | None) -> None:
    """Make ``sock`` a CurveZMQ client of the broker (before it connects)."""
    if creds is None:
        return
    if creds.own.secret is None:  # client_credentials always loads it
        raise ConfigError("these credentials hold no secret key of this node; give its NAME.key_secret file")
    sock.curve_secretkey = creds.own.secret
    sock.curve_publickey = creds.own.public
    sock.curve_serverkey = creds.broker.public


def apply_server(sock: zmq.Socket[bytes], creds: Credentials | None, name: str) -> None:
    """Make ``sock`` a CurveZMQ server that our ZAP handler must approve (before it binds).

    ``name`` (frontend, backend, collector) rides in the ZAP domain so the
    handler knows which peers the socket takes.
    """
    if creds is None:
        return
    if creds.own.secret is None:  # broker_credentials always loads it
        raise ConfigError("these credentials hold no secret key of the broker; give its NAME.key_secret file")
    sock.curve_server = True
    sock.curve_secretkey = creds.own.secret
    sock.curve_publickey = creds.own.public
    sock.setsockopt_string(zmq.ZAP_DOMAIN, f"{ZAP_DOMAIN}/{name}")
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler answering: no one gets in


class AllowList:
    """The public keys in a directory of ``*.key`` files, read again when the directory changes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._stamp: tuple[int, int] | None = None
        self.keys: frozenset[bytes] = frozenset()
        self.reload()

    def _current_stamp(self) -> tuple[int, int]:
        st = os.stat(self.directory)
        return st.st_mtime_ns, st.st_ino

    def reload(self, force: bool = True) -> None:
        try:
            stamp = self._current_stamp()
        except OSError as exc:
            log.error("cannot read the allow-list %s (%s): admitting no one", self.directory, exc.strerror)
            self.keys, self._stamp = frozenset(), None
            return
        if not force and stamp == self._stamp:
            return
        keys = set()
        for entry in sorted(Path(self.directory).glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(entry)
            except (OSError, ValueError) as exc:
                log.warning("skipping %s in the allow-list: %s", entry, exc)
                continue
            keys.add(public)
        if keys != self.keys:
            log.info("allow-list %s: %d public keys", self.directory, len(keys))
        self.keys, self._stamp = frozenset(keys), stamp

    def __contains__(self, key: bytes) -> bool:
        self.reload(force=False)  # one stat a handshake: removing a file revokes at once
        return key in self.keys


class ZapPolicy:
    """Answers ZAP requests (RFC 27) for the broker's sockets; counts and names refusals."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self.allow = AllowList(creds.allow_dir) if creds.allow_dir else None

    def reload(self) -> None:
        if self.allow is not None:
            self.allow.reload()

    def decide(self, domain: str, mechanism: bytes, credentials: list[bytes]) -> tuple[bool, str]:
        """(admitted, reason) for one handshake."""
        prefix, _, name = domain.partition("/")
        if prefix != ZAP_DOMAIN or mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return False, f"unexpected domain {domain!r} or mechanism {mechanism!r}"
        key = zmq.utils.z85.encode(credentials[0])
        if self.allow is not None:
            return (True, "allowed") if key in self.allow else (False, "public key not in the allow-list")
        return (True, "holds the secret") if key in self.creds.peers.get(name, ()) else (
            False, f"key not derived from the shared secret for the {name}")

    def reply(self, frames: list[bytes]) -> tuple[list[bytes], bool, str]:
        """The reply frames for a ZAP request received on a ROUTER, whether admitted, and why.

        ``frames``: routing id, empty delimiter, version, request id, domain,
        address, identity, mechanism, credentials...
        """
        if len(frames) < 8 or frames[2] != b"1.0":
            return [], False, "malformed ZAP request"
        envelope, request_id = frames[:2], frames[3]
        domain, address, mechanism = frames[4].decode(errors="replace"), frames[5].decode(errors="replace"), frames[7]
        ok, reason = self.decide(domain, mechanism, frames[8:])
        status = (b"200", b"OK") if ok else (b"400", reason.encode())
        # The user id rides on every message of the connection ("User-Id"): the key, so that
        # the broker can tell which connected peers a revocation cuts off (PeerKeys).
        user = zmq.utils.z85.encode(frames[8]) if ok else b""
        return [*envelope, b"1.0", request_id, *status, user, b""], ok, f"{address}: {reason}"


class PeerKeys:
    """Which allow-listed key each connected peer holds, so a revoked key cuts off its live peers.

    A handshake is checked once; a connection outlives it. In key-file mode
    the broker notes the key (the ZAP user id on the peer's messages) at each
    HELLO, and ``sweep()``, run each heartbeat, names the peers whose key has
    left the allow-list since. Their messages are dropped from then on.
    """

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        self.keys: dict[bytes, bytes] = {}  # peer routing id -> z85 public key
        self.revoked: set[bytes] = set()

    def note(self, peer: bytes, frame: Any) -> None:
        try:
            key = frame.get("User-Id")
        except (zmq.ZMQError, AttributeError):  # no metadata: not a CurveZMQ connection
            return
        if key:
            self.keys[peer] = key.encode()

    def sweep(self) -> list[bytes]:
        """Peers whose key was removed since the last sweep (now counted as revoked)."""
        self.allow.reload(force=False)
        gone = [peer for peer, key in self.keys.items() if key not in self.allow.keys]
        for peer in gone:
            del self.keys[peer]
            self.revoked.add(peer)
        return gone


_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class HandshakeMonitor:
    """Watches a socket's handshakes (ZMQ socket monitor), so a refusal is an error, not a hang.

    Poll ``socket`` with the owner's loop; ``check()`` reads what arrived and
    returns the reason of the last failed handshake, or None.
    """

    def __init__(self, sock: zmq.Socket[bytes], address: str, creds: Credentials | None) -> None:
        self.address, self.creds = address, creds
        self._watched = sock
        # A unique endpoint: pyzmq's default is named after the fd, which a later socket may reuse.
        self.socket: zmq.Socket[bytes] = sock.get_monitor_socket(
            _HANDSHAKE_EVENTS, f"inproc://zpar-monitor-{os.urandom(8).hex()}")
        self.succeeded = 0
        self.failed = 0

    def check(self) -> str | None:
        failure = None
        while self.socket.poll(0):
            try:
                event = recv_monitor_message(self.socket, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded += 1
                failure = None
                continue
            self.failed += 1
            failure = self._explain(event["event"], event["value"])
        return failure

    def _explain(self, event: int, value: int) -> str:
        where = f"the broker at {self.address}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"{where} refused our key (ZAP status {value}): a wrong secret, or this node's public key "
                    "is not in the broker's allow-list")
        if self.creds is None:  # a plain handshake fails only with a broker that wants credentials
            return (f"{where} requires authentication: give the cluster's secret (secret=..., ZPAR_SECRET "
                    "or --secret-file) or key files")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return (f"{where} does not speak CurveZMQ with us: is it running without a secret, or is it "
                    "not a zpar broker?")
        return f"the CurveZMQ handshake with {where} failed: a wrong secret or broker public key?"

    def close(self) -> None:
        """Stop the monitor before the watched socket closes (a dangling one can wedge libzmq)."""
        try:
            self._watched.disable_monitor()
        except zmq.ZMQError:
            pass  # the watched socket is closed already
        self.socket.close(linger=0)
