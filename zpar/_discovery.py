"""Finding a broker on the LAN: DNS-SD over mDNS (the ``zeroconf`` library).

::

    zpar-broker ── Announcer ── mDNS: "<cluster>-<epoch>._zpar._tcp.local."
                                 A records (its addresses), TXT (below)
    zpar-agent --discover, Client(discover=...), pp ppservers=("*",)
                ── find(role, credentials, cluster) ── browse, resolve, choose()

The TXT record (all text): ``txtvers`` (this format, 1), ``proto`` (the wire's
version), ``cluster`` (its name), ``frontend``/``backend``/``collector``
(ports; absent if not bound), ``security`` (``secret``, ``keys``, ``user``
or ``none``), ``fp``/``afp``: fingerprints of the broker's public key on the
frontend (producers') and on the backend (agents').

Discovery only finds. CurveZMQ still authenticates the broker: a fake
announcement leads a peer to a handshake it cannot complete. A fingerprint is
a BLAKE2b hash of the broker's public key with a label, not the key: with a
shared secret that key is derived from the secret and CurveZMQ never sends it
in clear, so the hash tells a listener no more than a captured handshake
would (each guess of the secret still costs scrypt, or is hopeless for a
``zpar keygen`` secret). It lets a peer skip brokers that its credentials
cannot open, so several clusters can share a LAN.

zeroconf is imported only here, and only when announcing or browsing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import queue
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from . import protocol as P
from ._text import printable
from .errors import AuthenticationError, BrokerUnavailable, ConfigError

if TYPE_CHECKING:
    from zeroconf import Zeroconf

    from .security import Credentials

log = logging.getLogger(__name__)

SERVICE = "_zpar._tcp.local."
TXT_VERSION = "1"
#: Seconds a browse listens before choosing, so that every broker on the LAN has answered
#: (mDNS responders answer within about 120 ms of a query; the first query goes at once).
SETTLE = 1.0
#: Seconds to resolve one announced name into its addresses and TXT record.
RESOLVE_MS = 1500
#: The security modes a TXT record names (the broker's credentials, in one word).
MODES = ("secret", "keys", "user", "none")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
_PORT_ROLES = {"producer": "frontend", "agent": "backend"}


def fingerprint(public: bytes) -> str:
    """The hex fingerprint announced for a broker's z85 public key (a hash: the key stays unsaid)."""
    return hashlib.blake2b(public, digest_size=16, person=b"zpar-announce-v1").hexdigest()


def check_cluster_name(name: str) -> str:
    """``name`` if it can name a cluster (1 to 40 letters, digits, ``_ . -``); else ConfigError."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"cluster name {printable(name)!r} must be 1 to 40 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit")
    return name


def default_cluster_name() -> str:
    """A broker's cluster name when none is given: this host's name, made a valid one."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip("_.-")[:40]
    return name or "zpar"


@dataclasses.dataclass(frozen=True, slots=True)
class Announcement:
    """One broker as announced: where it listens, which cluster, and which keys it holds."""

    name: str  # the DNS-SD instance (unique on the LAN)
    cluster: str
    hosts: tuple[str, ...]  # its addresses
    frontend: int = 0  # ports; 0: not listening for that role
    backend: int = 0
    collector: int = 0
    protocol: int = P.VERSION
    security: str = "none"
    fingerprint: str = ""  # of the frontend's key (producers'); "" with no credentials
    agent_fingerprint: str = ""  # of the backend's key (agents'), which differs given an agents' own secret

    def txt(self) -> dict[str, str]:
        """The TXT record's properties."""
        props = {"txtvers": TXT_VERSION, "proto": str(self.protocol), "cluster": self.cluster,
                 "security": self.security}
        props |= {role: str(port) for role, port in (("frontend", self.frontend), ("backend", self.backend),
                                                     ("collector", self.collector)) if port}
        props |= {key: value for key, value in (("fp", self.fingerprint), ("afp", self.agent_fingerprint)) if value}
        return props

    @classmethod
    def from_txt(cls, name: str, hosts: Iterable[str],
                 props: Mapping[bytes, bytes | None] | Mapping[str, str]) -> Announcement:
        """Parse what a peer announced; ValueError (saying what) for anything malformed or of another format."""
        text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v or "")
                for k, v in props.items()}
        if text.get("txtvers") != TXT_VERSION:
            raise ValueError(f"TXT format {text.get('txtvers')!r}, not {TXT_VERSION}")
        ports = {}
        for role in ("frontend", "backend", "collector"):
            value = text.get(role, "0")
            if not value.isdigit() or not 0 <= int(value) <= 65535:
                raise ValueError(f"{role} port {value!r}")
            ports[role] = int(value)
        proto, security = text.get("proto", ""), text.get("security", "")
        if not proto.isdigit() or security not in MODES:
            raise ValueError(f"protocol {proto!r} or security {security!r}")
        check = check_cluster_name(text.get("cluster", ""))
        fps = [text.get(key, "") for key in ("fp", "afp")]
        if any(fp and not re.fullmatch(r"[0-9a-f]{32}", fp) for fp in fps):
            raise ValueError("a fingerprint that is not 32 hex digits")
        return cls(name, check, tuple(hosts), protocol=int(proto), security=security, fingerprint=fps[0],
                   agent_fingerprint=fps[1], **ports)

    def port(self, role: str) -> int:
        """The port that peers of ``role`` (producer, agent) connect to."""
        return int(getattr(self, _PORT_ROLES[role]))

    def address(self, role: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> str:
        """``tcp://host:port`` for ``role``, on the address reachable from one of our ``networks`` if any."""
        return f"tcp://{pick_host(self.hosts, networks)}:{self.port(role)}"

    def describe(self) -> str:
        host = self.hosts[0] if self.hosts else "?"
        return f"cluster {printable(self.cluster)!r} at {printable(host)}:{self.frontend} ({self.security})"


def pick_host(hosts: Sequence[str], networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """The first of ``hosts`` inside one of our ``networks`` (the LAN we share), else the first."""
    for host in hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if any(ip in net for net in networks if net.version == ip.version):
            return host
    if not hosts:
        raise ValueError("an announcement with no address")
    return hosts[0]


# ---------------------------------------------------------------------- choosing


def _mismatch(ann: Announcement, role: str, creds: Credentials | None, cluster: str) -> str:
    """Why ``ann`` is not for us ("" if it is); "key" when only its key differs from ours."""
    if cluster and ann.cluster != cluster:
        return f"not cluster {cluster!r}"
    if ann.protocol != P.VERSION:
        return f"speaks protocol {ann.protocol}, this zpar {P.VERSION}: run the same zpar version"
    if not ann.port(role) or not ann.hosts:
        return f"takes no {role}s"
    if creds is None:
        return "" if ann.security == "none" else f"wants credentials ({ann.security}) and we were told insecure"
    if ann.security == "none":
        return "runs --insecure, and we hold credentials"
    announced = ann.agent_fingerprint if role == "agent" else ann.fingerprint
    return "" if announced == fingerprint(creds.broker.public) else "key"


def choose(found: Iterable[Announcement], role: str, creds: Credentials | None, cluster: str = "",
           waited: float = 0.0) -> Announcement:
    """The one broker of ``found`` that a ``role`` holding ``creds`` is for (``cluster``: only that one).

    The rules: a broker of another cluster (when one is named), of another
    protocol version, or whose key fingerprint is not the one ``creds``
    expect, is never taken. Exactly one left: it. Several: ConfigError
    listing them (which cluster an agent serves decides whose code it runs:
    never a guess; name one). None: AuthenticationError if brokers were
    found whose key only differs from ours (a wrong secret), else
    BrokerUnavailable saying what was seen.
    """
    found = sorted(found, key=lambda a: (a.cluster, a.name))
    usable, skipped = [], []
    for ann in found:
        why = _mismatch(ann, role, creds, cluster)
        if why:
            skipped.append((ann, why))
        else:
            usable.append(ann)
    if len(usable) == 1:
        return usable[0]
    if usable:
        listing = "; ".join(a.describe() for a in usable)
        raise ConfigError(f"{len(usable)} zpar brokers on the LAN take this {role}: {listing}. Name the one to "
                          "join: zpar-agent --discover --cluster NAME, Client(discover='NAME'), or its address")
    used = creds.origin if creds is not None else "no credentials (insecure)"
    wrong_key = [ann for ann, why in skipped if why == "key"]
    if wrong_key:
        listing = "; ".join(a.describe() for a in wrong_key)
        raise AuthenticationError(
            f"refused: found {listing}, but the key it announces does not match {used}: it runs with another "
            "secret (or other key files, or as another user, with a secret of their own). Give the cluster's "
            "secret (ZPAR_SECRET_FILE, --secret-file, secret_file=...) or its broker.key")
    if skipped:
        listing = "; ".join(f"{a.describe()}: {why}" for a, why in skipped)
        raise BrokerUnavailable(f"no zpar broker on the LAN is for this {role}: {listing}")
    where = f" of cluster {cluster!r}" if cluster else ""
    raise BrokerUnavailable(
        f"no zpar broker{where} announced itself on the LAN within {waited:g} s. Is `zpar broker` running on "
        "an address other than loopback (say --frontend tcp://0.0.0.0:5555 --backend tcp://0.0.0.0:5556 "
        "--collector tcp://0.0.0.0:5557), without --no-announce, on this network segment (mDNS, UDP 5353, does "
        "not cross routers)? Else give its address")


# ---------------------------------------------------------------------- browsing


def local_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The IPv4 networks of this host's interfaces (to pick the broker's address on a LAN we share)."""
    return list(_interfaces(addresses=False))


def _interfaces(addresses: bool) -> list[ipaddress.IPv4Network]:
    """This host's IPv4 interfaces: each address as a /32 (``addresses``), else its network."""
    import ifaddr  # zeroconf's own dependency

    return [ipaddress.IPv4Network(f"{ip.ip}/{32 if addresses else ip.network_prefix}", strict=False)
            for adapter in ifaddr.get_adapters() for ip in adapter.ips
            if isinstance(ip.ip, str)]  # IPv4 (IPv6 comes as a tuple)


def find(role: str, creds: Credentials | None, cluster: str = "", timeout: float = 5.0) -> Announcement:
    """Browse the LAN for ``timeout`` seconds at most and :func:`choose` a broker (raises as it does).

    Listens at least ``SETTLE`` seconds so that every broker has answered,
    and past that only while none is for us (a broker starting meanwhile).
    """
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    if cluster:
        check_cluster_name(cluster)
    events: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()

    def changed(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        events.put((name, state_change is not ServiceStateChange.Removed))

    start = time.monotonic()
    found: dict[str, Announcement] = {}
    try:
        zc = Zeroconf(ip_version=IPVersion.V4Only)
    except OSError as exc:  # no multicast-capable interface, or UDP 5353 unusable here
        raise BrokerUnavailable(f"cannot look for a zpar broker on the LAN (mDNS): {exc}; give its address") from None
    try:
        browser = ServiceBrowser(zc, SERVICE, handlers=[changed])
        try:
            while True:
                now = time.monotonic()
                settled = now >= start + SETTLE
                if now >= start + timeout or (settled and any(
                        not _mismatch(a, role, creds, cluster) for a in found.values())):
                    break
                try:
                    name, present = events.get(timeout=(start + timeout if settled else start + SETTLE) - now)
                except queue.Empty:
                    continue
                if not present:
                    found.pop(name, None)
                    continue
                ann = _resolve(zc, name)
                if ann is not None:
                    found[name] = ann
        finally:
            browser.cancel()
    finally:
        zc.close()
    chosen = choose(found.values(), role, creds, cluster, waited=timeout)
    log.info("discovered %s (%d zpar brokers answered)", chosen.describe(), len(found))
    return chosen


def _resolve(zc: Zeroconf, name: str) -> Announcement | None:
    """The announcement behind ``name``, or None (logged) if it does not resolve or does not parse."""
    from zeroconf import IPVersion, ServiceInfo

    info = ServiceInfo(SERVICE, name)
    if not info.request(zc, RESOLVE_MS):
        log.debug("announced zpar broker %s did not resolve", printable(name))
        return None
    try:
        return Announcement.from_txt(name, info.parsed_addresses(IPVersion.V4Only), info.properties)
    except ValueError as exc:  # a LAN peer's junk, or a future format
        log.warning("ignored the zpar broker announced as %s: %s", printable(name), printable(exc))
        return None


# ---------------------------------------------------------------------- announcing


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:  # a name: LAST_ENDPOINT gives numbers, but be safe
        return False


def broker_announcement(endpoints: Mapping[str, str], cluster: str, epoch: str, security: str,
                        keys: Mapping[str, bytes]) -> tuple[Announcement, list[str]] | None:
    """What a broker bound at ``endpoints`` (name -> tcp://host:port, as bound) announces, and on which
    interface addresses (empty: all); None if it listens on no TCP address other than loopback.

    ``keys``: its public key per socket name (none without credentials).
    """
    ports, bound = {}, set()
    for role in ("frontend", "backend", "collector"):
        parts = urllib.parse.urlsplit(endpoints.get(role, ""))
        if parts.scheme != "tcp" or parts.hostname is None or _loopback(parts.hostname):
            continue
        ports[role] = parts.port or 0
        bound.add(parts.hostname)
    if not ports.get("frontend") and not ports.get("backend"):
        return None
    wildcard = bound & {"0.0.0.0", "::", "*"}  # noqa: S104 - reads a bound address, binds nothing
    interfaces = [] if wildcard else sorted(h for h in bound if _ipv4(h))
    if not wildcard and not interfaces:
        return None  # IPv6 only: announced over IPv4 mDNS, this would name no address a peer can use
    hosts = interfaces or _own_addresses()
    if not hosts:
        return None
    ann = Announcement(f"{cluster}-{epoch[:8]}", cluster, tuple(hosts), protocol=P.VERSION, security=security,
                       fingerprint=fingerprint(keys["frontend"]) if "frontend" in keys else "",
                       agent_fingerprint=fingerprint(keys["backend"]) if "backend" in keys else "", **ports)
    return ann, interfaces


def _own_addresses() -> list[str]:
    """This host's IPv4 addresses but loopback."""
    return sorted({str(net.network_address) for net in _interfaces(addresses=True) if not net.is_loopback})


class Announcer:
    """Announces one broker on the LAN until ``close()``, from a thread of its own.

    zeroconf's probing takes a second or two: the broker's loop neither waits
    for it nor runs it (zeroconf has its own threads). A failure to announce
    is logged; the broker runs on, reachable by its address.
    """

    #: Seconds ``close()`` waits to say goodbye on the LAN (peers then forget the broker at once).
    CLOSE_WAIT = 1.5

    def __init__(self, announcement: Announcement, interfaces: Sequence[str] = ()) -> None:
        self.announcement, self.interfaces = announcement, list(interfaces)
        self._stop = threading.Event()
        self.registered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zpar-announce", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.CLOSE_WAIT)

    def _run(self) -> None:
        from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

        ann = self.announcement
        try:
            zc = Zeroconf(interfaces=self.interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only)
        except OSError as exc:
            log.warning("cannot announce this broker on the LAN (mDNS): %s; peers need its address", exc)
            return
        try:
            server = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:60] or "zpar"
            info = ServiceInfo(SERVICE, f"{ann.name}.{SERVICE}", port=ann.frontend or ann.backend,
                               properties=ann.txt(), server=f"{server}.local.", parsed_addresses=list(ann.hosts))
            zc.register_service(info, allow_name_change=True)
            self.registered.set()
            log.info("announced on the LAN as %s (mDNS %s): %s", ann.cluster, SERVICE, ", ".join(ann.hosts))
            self._stop.wait()
            zc.unregister_service(info)
        except Exception as exc:  # noqa: BLE001 - zeroconf's errors vary; the broker runs on without it
            log.warning("cannot announce this broker on the LAN (mDNS): %s; peers need its address", exc)
        finally:
            zc.close()
