"""Who may talk to a broker: CurveZMQ keys from a shared secret or key files, and the ZAP policy.

Three ways to hold credentials (DESIGN.md, Security):

* **Nothing configured**: every process of one user uses that user's own
  secret, ``$XDG_CONFIG_HOME/zpar/secret`` (made on first use, mode 0600 in
  a 0700 directory), so TCP, loopback included, is CurveZMQ and another
  account is refused. Only ``insecure`` turns authentication off.
* **A shared secret.** Every party derives the keypairs from it: once per
  process, keyed by the random salt a ``zpar keygen`` secret carries
  (``zpar-secret-v1:<salt>:<secret>``; a typed secret must pass an entropy
  estimate and goes through scrypt), then one Curve25519 keypair per role
  (``broker``, ``agent``, ``producer``) with BLAKE2b and a label. The broker
  admits producers on its frontend and agents on its backend and collector;
  given an agents' secret of their own, it derives the agent side from that,
  so a producer cannot pose as an agent and an agent cannot submit.
* **Key files** (``zpar keygen --keys DIR``): a keypair per node. Peers know
  the broker's public key; the broker admits the public keys found in an
  allow-list directory per role, read again whenever it changes (or on
  SIGHUP), so removing a file revokes that node, open connections included.

Secret and key files that others may read, and weak secrets, are refused.
ipc sockets are guarded by their file's mode instead (zpar._ipc). This
module holds policy only; the broker's loop answers the ZAP requests
(zpar_broker.server), and connection/agent code call :func:`apply_client`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path

import zmq
import zmq.auth

from ._handshake import HandshakeMonitor
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
    user_secret,
    user_secret_path,
    write_secret_file,
)
from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [  # the secrets' rules live in zpar._secrets; callers reach them here
    "FILE_FORMAT",
    "MIN_SECRET_BITS",
    "MIN_SECRET_BYTES",
    "SCRYPT_N",
    "SOCKET_ROLES",
    "WELL_KNOWN",
    "ZAP_DOMAIN",
    "AllowList",
    "BrokerCredentials",
    "Credentials",
    "HandshakeMonitor",
    "KeyPair",
    "ZapPolicy",
    "apply_client",
    "apply_server",
    "broker_credentials",
    "check_private",
    "check_secret",
    "client_credentials",
    "derive_keys",
    "estimate_bits",
    "generate_secret",
    "load_keypair",
    "make_keypair_files",
    "origin",
    "read_secret_file",
    "user_secret",
    "user_secret_path",
    "write_secret_file",
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
    """What a producer or an agent needs to speak CurveZMQ with a broker.

    ``own`` is this process's keypair, ``broker`` the broker's public key;
    ``origin`` says where they came from, for the messages of a refusal.
    """

    own: KeyPair
    broker: KeyPair
    origin: str = "the secret given"

    def __repr__(self) -> str:
        return f"Credentials({self.origin}, broker {self.broker.public.decode()})"


#: Who connects to each of the broker's sockets.
SOCKET_ROLES = {"frontend": "producer", "backend": "agent", "collector": "agent"}


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class BrokerCredentials:
    """The broker's keypair on each socket, and whom each socket admits.

    ``admit``: socket name -> the public keys derived from the secret of the
    role that socket serves (shared secrets). ``allow``: socket name -> the
    allow-list directory of that role's nodes (key files), which replaces
    ``admit``. ``mode`` says which, for ``zpar status``.
    """

    keys: dict[str, KeyPair]
    admit: dict[str, frozenset[bytes]] = dataclasses.field(default_factory=dict)
    allow: dict[str, str] = dataclasses.field(default_factory=dict)
    mode: str = ""

    def __repr__(self) -> str:
        return f"BrokerCredentials({self.mode})"


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


def _secret_from(secret: str | bytes | None, secret_file: str | None) -> str | bytes | None:
    return read_secret_file(secret_file) if secret_file else secret


def _user_default() -> tuple[bytes, str]:
    path = user_secret_path()
    return user_secret(), f"this user's secret {path}"


def client_credentials(role: str, *, secret: str | bytes | None = None, secret_file: str | None = None,
                       key_file: str | None = None, broker_key: str | None = None, insecure: bool = False,
                       address: str = "tcp://") -> Credentials | None:
    """Credentials of a producer or agent (``role``) for the broker at ``address``.

    In order: key files, a secret (or its file), and with neither this user's
    own secret (``user_secret``, made on first use). None (plaintext) only
    with ``insecure`` and nothing given, or for an ipc/inproc address, which
    the socket file's mode guards instead.
    """
    if not address.startswith("tcp://"):
        return None
    if key_file or broker_key:
        if not (key_file and broker_key):
            raise ConfigError("key files need both this node's key (key_file, NAME.key_secret) and the "
                              "broker's public key (broker_key, broker.key)")
        return Credentials(load_keypair(key_file, need_secret=True), load_keypair(broker_key, need_secret=False),
                           f"the key file {key_file}")
    secret = _secret_from(secret, secret_file)
    origin = f"the secret file {secret_file}" if secret_file else "the secret given"
    if not secret:
        if insecure:
            return None
        secret, origin = _user_default()
    keys = derive_keys(secret)
    return Credentials(keys[role], KeyPair(keys["broker"].public), origin)


def broker_credentials(*, secret: str | bytes | None = None, secret_file: str | None = None,
                       agent_secret: str | bytes | None = None, agent_secret_file: str | None = None,
                       key_file: str | None = None, allow_dir: str | None = None,
                       agent_allow_dir: str | None = None, insecure: bool = False,
                       default: bool = True) -> BrokerCredentials | None:
    """The broker's credentials and whom each socket admits; None to run without authentication.

    Key files: the broker's key and an allow-list per role (``allow_dir``
    producers, ``agent_allow_dir`` agents). Shared secrets: ``secret`` for
    producers and, if given, ``agent_secret`` for agents (else the same).
    With neither, this user's own secret, unless ``insecure`` or not
    ``default`` (a broker with no TCP socket).
    """
    if key_file or allow_dir or agent_allow_dir:
        if not (key_file and allow_dir and agent_allow_dir):
            raise ConfigError("key files need the broker's key (key_file, broker.key_secret) and an allow-list "
                              "directory of public keys per role: allow_keys for producers, allow_agent_keys for "
                              "agents (the same node's key may be in both)")
        if secret or secret_file or agent_secret or agent_secret_file:
            raise ConfigError("give either key files or shared secrets, not both")
        for directory in (allow_dir, agent_allow_dir):
            if not os.path.isdir(directory):
                raise ConfigError(f"the allow-list {directory} is not a directory")
        own = load_keypair(key_file, need_secret=True)
        return BrokerCredentials(
            keys=dict.fromkeys(SOCKET_ROLES, own),
            allow={name: agent_allow_dir if role == "agent" else allow_dir for name, role in SOCKET_ROLES.items()},
            mode=f"curve, key files: producers {allow_dir}, agents {agent_allow_dir}")
    producers = _secret_from(secret, secret_file)
    agents = _secret_from(agent_secret, agent_secret_file)
    mode = "curve, shared secret"
    if not producers:
        if not agents and (insecure or not default):
            return None
        producers, mode = _user_default()
        mode = f"curve, {mode}"
    if agents:
        mode += "; agents: their own secret"
    secrets = {"producer": derive_keys(producers), "agent": derive_keys(agents or producers)}
    return BrokerCredentials(
        keys={name: secrets[role]["broker"] for name, role in SOCKET_ROLES.items()},
        admit={name: frozenset({secrets[role][role].public}) for name, role in SOCKET_ROLES.items()},
        mode=mode)


def origin(creds: Credentials | None) -> str | None:
    """What a :class:`HandshakeMonitor` says we used: where ``creds`` came from, or None for plaintext."""
    return creds.origin if creds is not None else None


def apply_client(sock: zmq.Socket[bytes], creds: Credentials | None) -> None:
    """Make ``sock`` a CurveZMQ client of the broker (before it connects)."""
    if creds is None:
        return
    if creds.own.secret is None:  # client_credentials always loads it
        raise ConfigError("these credentials hold no secret key of this node; give its NAME.key_secret file")
    sock.curve_secretkey = creds.own.secret
    sock.curve_publickey = creds.own.public
    sock.curve_serverkey = creds.broker.public


def apply_server(sock: zmq.Socket[bytes], creds: BrokerCredentials | None, name: str) -> None:
    """Make ``sock`` a CurveZMQ server that our ZAP handler must approve (before it binds).

    ``name`` (frontend, backend, collector) picks the broker's keypair and
    rides in the ZAP domain, so the handler knows which role the socket takes.
    """
    if creds is None:
        return
    own = creds.keys[name]
    if own.secret is None:  # broker_credentials always loads it
        raise ConfigError("these credentials hold no secret key of the broker; give its NAME.key_secret file")
    sock.curve_server = True
    sock.curve_secretkey = own.secret
    sock.curve_publickey = own.public
    sock.setsockopt_string(zmq.ZAP_DOMAIN, f"{ZAP_DOMAIN}/{name}")
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler answering: no one gets in


class AllowList:
    """The public keys in a directory of ``*.key`` files, read again when the directory changes."""

    #: Seconds between two looks at the directory: every message is checked, a stat each is too many.
    RECHECK = 0.005

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._checked = -self.RECHECK
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
        now = time.monotonic()
        if now - self._checked >= self.RECHECK:  # removing a file revokes within RECHECK seconds
            self._checked = now
            self.reload(force=False)
        return key in self.keys


class ZapPolicy:
    """Answers ZAP requests (RFC 27) for the broker's sockets, and whether a key is still admitted."""

    def __init__(self, creds: BrokerCredentials) -> None:
        self.creds = creds
        lists = {directory: AllowList(directory) for directory in set(creds.allow.values())}
        self.allow = {name: lists[directory] for name, directory in creds.allow.items()}

    @property
    def revocable(self) -> bool:
        """Key files: removing a key's file takes it out (shared-secret keys last as long as the secret)."""
        return bool(self.allow)

    def reload(self) -> None:
        for allow in set(self.allow.values()):
            allow.reload()

    def admits(self, name: str, key: bytes) -> bool:
        """Whether the socket ``name`` admits the z85 public ``key`` now."""
        if name in self.allow:
            return key in self.allow[name]
        return key in self.creds.admit.get(name, ())

    def decide(self, domain: str, mechanism: bytes, credentials: list[bytes]) -> tuple[bool, str]:
        """(admitted, reason) for one handshake."""
        prefix, _, name = domain.partition("/")
        if prefix != ZAP_DOMAIN or mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return False, f"unexpected domain {domain!r} or mechanism {mechanism!r}"
        if name in self.allow:  # a handshake is rare: one stat each, so a removed file refuses the next at once
            self.allow[name].reload(force=False)
        if self.admits(name, zmq.utils.z85.encode(credentials[0])):
            return True, f"admitted as {SOCKET_ROLES.get(name, name)}"
        if name in self.allow:
            return False, f"public key not in the {SOCKET_ROLES.get(name, name)}s' allow-list"
        return False, f"key not derived from the {SOCKET_ROLES.get(name, name)}s' secret"

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
        # the broker can tell which connected peers a revocation cuts off.
        user = zmq.utils.z85.encode(frames[8]) if ok else b""
        return [*envelope, b"1.0", request_id, *status, user, b""], ok, f"{address}: {reason}"
