"""Settings of the daemons, as frozen dataclasses.

Each setting comes from, in rising order: its default, a TOML file
(``--config``; a ``[broker]`` or ``[agent]`` table), a ``ZPAR_<NAME>``
variable, a command-line flag. Only the CLI calls :func:`load`; the library
reads no environment by itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ConfigError
from .protocol import MAX_MESSAGE_SIZE

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"
DEFAULT_COLLECTOR = "tcp://127.0.0.1:5557"

# What one producer may hold in the broker: the defaults of zpar_broker.limits.Limits (which zpar cannot import).
DEFAULT_MAX_QUEUED_TASKS = 100_000
DEFAULT_MAX_QUEUED_BYTES = 64 << 20  # 64 MiB
DEFAULT_MAX_FUNCTIONS = 10_000
DEFAULT_MAX_FUNCTION_BYTES = 64 << 20  # 64 MiB
DEFAULT_MAX_OBJECTS = 10_000
DEFAULT_MAX_OBJECT_BYTES = 1 << 30  # 1 GiB
# Producers one key may have connected at once (with a shared secret: all of a cluster's producers).
DEFAULT_MAX_PRODUCERS_PER_KEY = 1024
# Where the broker serves its dashboard, /api/status and /metrics (another free port if this one is taken).
DEFAULT_DASHBOARD = "127.0.0.1:8790"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    frontend: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    collector: str = DEFAULT_COLLECTOR
    heartbeat: float = 1.0  # seconds between heartbeats
    liveness: int = 3  # heartbeats missed before a peer counts as dead
    max_message_size: int = MAX_MESSAGE_SIZE  # ZMQ_MAXMSGSIZE on every socket
    insecure: bool = False  # no authentication at all (else this user's own secret when none is given)
    secret: str = dataclasses.field(default="", repr=False)  # shared secret: CurveZMQ on every TCP socket
    secret_file: str = ""  # the shared secret, read from this file
    agent_secret: str = dataclasses.field(default="", repr=False)  # agents' own secret (else ``secret``)
    agent_secret_file: str = ""
    key_file: str = ""  # the broker's own NAME.key_secret (key-file mode)
    allow_keys: str = ""  # directory of the producers' public NAME.key files it admits (key-file mode)
    allow_agent_keys: str = ""  # directory of the agents' public NAME.key files it admits (key-file mode)
    allow_client_scale: bool = False  # key-file mode: producers may resize nodes (Client.scale), as the dashboard may
    max_queued_tasks: int = DEFAULT_MAX_QUEUED_TASKS  # per producer: tasks queued, not yet given to an agent
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES  # per producer: argument bytes of those tasks
    max_functions: int = DEFAULT_MAX_FUNCTIONS  # per producer: function blobs kept while its tasks use them
    max_function_bytes: int = DEFAULT_MAX_FUNCTION_BYTES  # per producer: bytes of those blobs
    max_objects: int = DEFAULT_MAX_OBJECTS  # per producer: scattered objects kept (zpar.Client.scatter)
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES  # per producer: bytes of those objects
    max_producers_per_key: int = DEFAULT_MAX_PRODUCERS_PER_KEY  # producers connected at once with one key
    parent_pid: int = 0  # exit when this process goes (the embedded cluster)
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object a line (zpar._logs)
    dashboard: str = DEFAULT_DASHBOARD  # HOST:PORT of the HTTP side (zpar_broker.web), or "off"
    announce: str = "auto"  # on the LAN over mDNS (zpar._discovery): auto (off on loopback or --insecure), on, off
    cluster: str = ""  # the name it announces (default: this host's name)

    def __post_init__(self) -> None:
        _check_timing(self.heartbeat, self.liveness)
        _check_log_format(self.log_format)
        object.__setattr__(self, "announce", announce_mode(self.announce))
        _check_cluster(self.cluster)
        dashboard_address(self.dashboard)
        for name in ("max_queued_tasks", "max_queued_bytes", "max_functions", "max_function_bytes",
                     "max_objects", "max_object_bytes", "max_producers_per_key"):
            _check_positive_int(name, getattr(self, name))
        check_scheme(self.frontend, "frontend")
        for name in ("backend", "collector"):  # empty: none (an embedded broker's agent is in-process)
            if getattr(self, name):
                check_scheme(getattr(self, name), name)

    @property
    def secured(self) -> bool:
        """Credentials were given (without any, this user's own secret is used unless ``insecure``)."""
        return bool(self.secret or self.secret_file or self.agent_secret or self.agent_secret_file
                    or self.key_file or self.allow_keys or self.allow_agent_keys)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    broker: str = DEFAULT_BACKEND
    workers: int = 0  # 0: one per usable core
    name: str = ""  # default: host name and pid
    heartbeat: float = 1.0
    liveness: int = 3
    max_message_size: int = MAX_MESSAGE_SIZE
    max_tasks_per_worker: int = 0  # recycle a worker after this many tasks (0: never)
    max_memory_per_worker: int = 0  # MiB of RSS past which a worker is recycled between tasks (0: no limit)
    grace: float = 30.0  # seconds the first SIGTERM gives running tasks to finish
    secret: str = dataclasses.field(default="", repr=False)  # the cluster's shared secret
    secret_file: str = ""
    key_file: str = ""  # this node's NAME.key_secret (key-file mode)
    broker_key: str = ""  # the broker's public broker.key (key-file mode)
    insecure: bool = False  # no authentication (else this user's own secret when none is given)
    parent_pid: int = 0
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object a line (zpar._logs)
    discover: bool = False  # find the broker on the LAN (mDNS, zpar._discovery) instead of ``broker``
    cluster: str = ""  # with discover: only the broker of this cluster
    discover_timeout: float = 10.0  # seconds to look for it
    #: What this node offers tasks that ask for resources, as sorted ``(name, amount)`` pairs; given as
    #: ``gpu=2,memory=64GiB`` (a flag, ZPAR_RESOURCES) or a TOML table, made pairs by ``parse_resources``.
    resources: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        _check_log_format(self.log_format)
        _check_timing(self.heartbeat, self.liveness)
        _check_cluster(self.cluster)
        object.__setattr__(self, "resources", parse_resources(self.resources))
        if not self.discover_timeout > 0:
            raise ConfigError(f"discover-timeout must be a positive number of seconds, not {self.discover_timeout}")
        for name in ("max_tasks_per_worker", "max_memory_per_worker"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must be 0 (off) or more, not {getattr(self, name)}")
        if self.grace < 0:
            raise ConfigError(f"grace must be 0 or more seconds, not {self.grace}")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 (one per core) or more, not {self.workers}")

    @property
    def secured(self) -> bool:
        return bool(self.secret or self.secret_file or self.key_file or self.broker_key)

    def worker_count(self) -> int:
        return self.workers or usable_cores()


_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
          "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def resource_amount(amount: float) -> str:
    """An amount as ``--resources`` would take it: ``2``, ``0.5``, ``64GiB`` (a whole number of GiB, MiB...)."""
    if float(amount).is_integer():
        n = int(amount)
        for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20)):
            if n >= 1 << shift and n % (1 << shift) == 0:
                return f"{n >> shift}{unit}"
        return str(n)
    return f"{amount:g}"


def parse_resources(value: str | Mapping[str, Any] | Iterable[tuple[str, Any]],
                    whose: str = "an agent") -> tuple[tuple[str, float], ...]:
    """An agent's ``--resources`` (or, ``whose`` "a task", what a task asks) as sorted ``(name, amount)`` pairs:
    ``gpu=2,memory=64GiB`` (sizes in KiB, MiB, GiB, TiB or KB, MB, GB, TB), or a mapping (a TOML table:
    ``{gpu = 2, memory = "64GiB"}``). ConfigError saying what is wrong otherwise."""
    from .errors import ProtocolError
    from .protocol import MAX_RESOURCES, check_resource

    if isinstance(value, str):
        pairs: list[tuple[Any, Any]] = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"resources take NAME=AMOUNT pairs separated by commas, like gpu=2,memory=64GiB; "
                                  f"not {item!r}")
            pairs.append((key.strip(), text.strip()))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = list(value)
    out: dict[str, float] = {}
    for name, raw in pairs:
        amount = _amount(name, raw)
        try:
            check_resource(name, amount, f"{whose}'s")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if name in out:
            raise ConfigError(f"resource {name!r} is given twice")
        out[name] = amount
    if len(out) > MAX_RESOURCES:
        raise ConfigError(f"{whose} may name at most {MAX_RESOURCES} resources, not {len(out)}")
    return tuple(sorted(out.items()))


def _amount(name: str, raw: Any) -> float:
    """``2``, ``0.5``, ``64GiB``, ``"512 MB"`` as a number (an int when it is whole)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ConfigError(f"resource {name!r} must be a number or a size like 64GiB, not {raw!r}")
    if isinstance(raw, str):
        text = raw.strip()
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
        unit = text[len(digits):].strip().lower()
        if digits and unit not in _UNITS:
            raise ConfigError(f"resource {name!r}: unknown unit {text[len(digits):].strip()!r} in {raw!r} "
                              "(use KiB, MiB, GiB, TiB, KB, MB, GB or TB)")
        try:
            number = float(digits) * _UNITS[unit]
        except ValueError:
            raise ConfigError(f"resource {name!r} must be a number or a size like 64GiB, not {raw!r}") from None
    else:
        number = float(raw)
    if not number >= 0 or number == float("inf"):
        raise ConfigError(f"resource {name!r} must be a finite amount of at least 0, not {raw!r}")
    return int(number) if number.is_integer() else number


def usable_cores() -> int:
    """Cores this process may run on (affinity and cgroup-aware where possible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_timing(heartbeat: float, liveness: int) -> None:
    if not heartbeat > 0:
        raise ConfigError(f"heartbeat must be a positive number of seconds, not {heartbeat}")
    if liveness < 1:
        raise ConfigError(f"liveness must be at least 1 missed heartbeat, not {liveness}")


def announce_mode(value: object) -> str:
    """``--announce``'s setting as auto, on or off (a TOML bool, or a variable's yes/no, too)."""
    text = str(value).strip().lower()
    if text in ("auto", ""):
        return "auto"
    if text in ("on", "true", "yes", "1"):
        return "on"
    if text in ("off", "false", "no", "0"):
        return "off"
    raise ConfigError(f"announce must be auto, on or off, not {value!r}")


def _check_cluster(name: str) -> None:
    if name:
        from ._discovery import check_cluster_name  # its one rule; zeroconf is not imported by it

        check_cluster_name(name)


def _check_positive_int(name: str, value: object) -> None:
    # A bool is an int to Python, and a TOML file can hold a float or a string: none is a count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, not {value!r}")


#: The daemons' log formats (zpar._logs): a line of text, or one JSON object a line.
LOG_FORMATS = ("text", "json")


def _check_log_format(value: str) -> None:
    if value not in LOG_FORMATS:
        raise ConfigError(f"log-format must be text or json, not {value!r}")


def dashboard_address(value: str) -> tuple[str, int] | None:
    """``--dashboard``'s ``HOST:PORT`` (``[::1]:PORT`` for IPv6) as ``(host, port)``; None for ``off``."""
    if value.lower() in ("off", "no", "false", "0", ""):
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--dashboard takes HOST:PORT (say {DEFAULT_DASHBOARD}) or off, not {value!r}")
    return host, int(port)


def check_scheme(endpoint: str, what: str) -> None:
    """ConfigError for an address without a scheme (``127.0.0.1:5555`` for ``tcp://127.0.0.1:5555``)."""
    if "://" not in endpoint:
        raise ConfigError(f"{what} address {endpoint!r} needs a scheme, like tcp://127.0.0.1:5555")


# Settings that name credentials: set to nothing, they are an error, never a silent downgrade.
_CREDENTIAL_SETTINGS = ("secret", "secret_file", "agent_secret", "agent_secret_file", "key_file", "allow_keys",
                        "allow_agent_keys", "broker_key")


def check_not_empty(name: str, value: Any, where: str) -> None:
    """ConfigError if a credential setting ``name`` was given (in ``where``) but holds nothing."""
    if name in _CREDENTIAL_SETTINGS and isinstance(value, str) and not value.strip():
        raise ConfigError(f"{where} is set but empty: give it a value (make a secret with "
                          "`zpar keygen --out FILE`), or unset it to use this user's own secret")


C = TypeVar("C", BrokerConfig, AgentConfig)


def _convert(raw: Any, typ: str, name: str) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if typ == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if typ == "int":
            return int(raw)
        if typ == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {typ}") from None
    return raw


def load(
    cls: type[C],
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: str | os.PathLike[str] | None = None,
) -> C:
    """Build ``cls`` from defaults < file < ``ZPAR_*`` env < flags (None flags are unset)."""
    section = {BrokerConfig: "broker", AgentConfig: "agent"}[cls]
    values: dict[str, Any] = {}
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    if file:
        import tomllib  # here: a client and the embedded hub, which read no file, skip its imports

        try:
            with open(file, "rb") as fh:
                table = tomllib.load(fh).get(section, {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from None
        for key, value in table.items():
            key = key.replace("-", "_")
            if key not in fields:
                raise ConfigError(f"unknown setting {key!r} in [{section}] of {file}")
            check_not_empty(key, value, f"{key} in [{section}] of {file}")
            values[key] = value
    for key, typ in fields.items():
        raw = (env or {}).get(f"ZPAR_{key.upper()}")
        if raw is not None:
            check_not_empty(key, raw, f"ZPAR_{key.upper()}")
            values[key] = _convert(raw, typ, f"ZPAR_{key.upper()}")
    for key, value in (flags or {}).items():
        if value is not None:
            check_not_empty(key, value, f"--{key.replace('_', '-')}")
            values[key] = value
    for key, typ in fields.items():
        if key in values:
            values[key] = _convert(values[key], typ, key)
    return cls(**values)
