"""What the benchmarks share about a LocalCluster: starting it with its logs in a file, watching its
processes' RSS, summarizing its log, and stopping it with nothing left behind."""

from __future__ import annotations

import atexit
import collections
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from zpar.testing import LocalCluster

now = time.monotonic


def private_config_home() -> str:
    """Point ``XDG_CONFIG_HOME`` at a fresh directory (removed at exit) for this process and its children.

    A cluster given no secret authenticates with this user's own secret,
    ``$XDG_CONFIG_HOME/zpar/secret``, made on first use (zpar._secrets.user_secret):
    the benchmarks that measure that default make theirs here, as the test
    suite does, and never create or read the one in the home of whoever runs them.
    Call it before the first cluster or client; returns the directory.
    """
    home = tempfile.mkdtemp(prefix="zpar-bench-config-")
    os.environ["XDG_CONFIG_HOME"] = home
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home


def start_cluster(log_path: str, **kwargs: Any) -> LocalCluster:
    """A LocalCluster whose daemons write their stderr (their logs) to ``log_path``, not to ours."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(fd, 2)  # inherited by the daemons (and their workers) spawned now
    try:
        return LocalCluster(**kwargs)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def kill_leftovers(procs: Iterable[psutil.Process], grace: float = 0.0) -> dict[int, str]:
    """Those of ``procs`` (not this process) still running after ``grace`` s, killed: pid -> command line."""
    me = os.getpid()
    left: list[psutil.Process] = []
    for p in procs:
        try:
            if p.pid != me and p.is_running() and p.status() != psutil.STATUS_ZOMBIE and p not in left:
                left.append(p)
        except psutil.Error:
            pass
    if grace > 0:
        _, left = psutil.wait_procs(left, timeout=grace)
    killed = {}
    for p in left:
        try:
            cmdline = " ".join(p.cmdline())[:120]
        except psutil.Error:
            cmdline = "?"
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
        except psutil.Error:
            pass
        killed[p.pid] = cmdline
    return killed


def stop_cluster(cluster: LocalCluster, out: dict[str, Any]) -> None:
    """Stops ``cluster`` and kills whatever of it is still alive after; notes in ``out`` the pids
    ``stop()`` had to kill (``killed_at_stop``), those alive after it (``leaked``), and a ``stop_error``."""
    procs = cluster.processes()
    try:
        out["killed_at_stop"] = [p.pid for p in cluster.stop(timeout=10)]
    except Exception as exc:  # noqa: BLE001 - reported; what is left is killed below
        out["stop_error"] = str(exc)
    out["leaked"] = list(kill_leftovers(procs))


def cluster_pids(cluster: LocalCluster) -> dict[str, list[int]]:
    """The pids of this producer, the broker, the agents and their workers (for RssWatch)."""
    broker = cluster.broker
    return {"producer": [os.getpid()], "broker": [] if broker is None else [broker.pid],
            "agent": [a.pid for a in list(cluster.agents)], "workers": cluster.worker_pids()}


class RssWatch(threading.Thread):
    """Every ``interval`` s until ``stop()``, the RSS of the processes ``pids()`` lists by role.

    ``samples``: one dict a round, with ``t`` (seconds since the start), what
    ``extra()`` returns, and each role's RSS in bytes (summed over its
    processes; None when none answered). ``peaks``: each process's largest RSS
    (role, pid, peak_mib), and ``procs`` the processes, both by (pid, create
    time), so a replaced process counts as a new one. ``errors``: the first
    rounds that failed (a missed sample is reported, never fatal).
    """

    def __init__(self, pids: Callable[[], dict[str, list[int]]], interval: float = 0.2,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__(name="rss-watch", daemon=True)
        self.pids, self.interval, self.extra = pids, interval, extra
        self.stop_event = threading.Event()
        self.t0 = now()
        self.samples: list[dict[str, Any]] = []
        self.peaks: dict[tuple[int, float], dict[str, Any]] = {}
        self.procs: dict[tuple[int, float], psutil.Process] = {}
        self.errors: list[str] = []

    def rss(self, pid: int, role: str) -> int | None:
        try:
            proc = psutil.Process(pid)
            key = (pid, proc.create_time())
            proc = self.procs.setdefault(key, proc)
            rss = proc.memory_info().rss
        except psutil.Error:
            return None
        if not rss:  # exiting, or a zombie
            return None
        entry = self.peaks.setdefault(key, {"role": role, "pid": pid, "peak_mib": 0.0})
        entry["peak_mib"] = max(entry["peak_mib"], rss / 2**20)
        return rss

    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t": round(now() - self.t0, 3), **(self.extra() if self.extra else {})}
        for role, pids in self.pids().items():
            values = [r for r in (self.rss(pid, role) for pid in pids) if r is not None]
            s[role] = sum(values) if values else None
        return s

    def run(self) -> None:
        self.t0 = now()
        while not self.stop_event.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # noqa: BLE001 - a missed sample is reported, never fatal
                if len(self.errors) < 10:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            self.stop_event.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def peak(self, role: str, **match: Any) -> int | None:
        """The role's largest RSS over the samples whose fields equal ``match``."""
        return max((s[role] for s in self.samples
                    if s.get(role) and all(s.get(k) == v for k, v in match.items())), default=None)


def summarize_log(path: str, width: int) -> dict[str, Any]:
    """A cluster log's size, its most frequent records (``width`` characters of each), its tracebacks, its tail."""
    try:
        size = os.path.getsize(path)
        with open(path, errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {"lines": 0, "bytes": 0}
    kinds: collections.Counter[str] = collections.Counter()
    tracebacks: list[str] = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:  # plain, or in a box drawn by rich
            tracebacks.append("\n".join(lines[max(0, i - 1):i + 25]))
        for level in ("CRITICAL", "ERROR", "WARNING", "INFO"):
            if f" {level} " in line:
                kinds[f"{level} {line.split(f' {level} ', 1)[1][:width]}"] += 1
                break
    return {"lines": len(lines), "bytes": size, "top": kinds.most_common(15), "tracebacks": len(tracebacks),
            "first_tracebacks": tracebacks[:3], "tail": lines[-15:]}


class StallWatch(threading.Thread):
    """How long the broker's loop answered nobody: a STATUS round trip every ``interval`` s on one connection.

    A DEALER of its own (with ``creds``, the producer's credentials, or None
    for an insecure cluster) stays connected to the frontend, so a round trip
    is the broker's loop and nothing else (``zpar status`` pays a new
    connection and handshake each time). A reply later than ``timeout`` counts
    as ``timeout``; replies that come after it are discarded. ``rtts``: (t,
    seconds) since the start; ``worst(t0, t1)`` the longest round trip that
    began in that window.
    """

    def __init__(self, address: str, creds: Any, interval: float = 0.01, timeout: float = 5.0) -> None:
        super().__init__(name="stall-watch", daemon=True)
        self.address, self.creds, self.interval, self.timeout = address, creds, interval, timeout
        self.stop_event = threading.Event()
        self.started = threading.Event()
        self.rtts: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.max_queued = 0  # the most tasks the broker's status said were queued

    def run(self) -> None:
        import zmq

        from zpar import protocol as P
        from zpar import security

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        security.apply_client(sock, self.creds)
        sock.connect(self.address)
        request = P.encode(P.StatusMsg())
        try:
            while not self.stop_event.is_set():
                while sock.poll(0):  # a late reply to an ask that timed out
                    sock.recv_multipart()
                t = now()
                sock.send_multipart(request)
                got = sock.poll(int(self.timeout * 1000))
                rtt = now() - t
                if got:
                    self.note(P.decode(sock.recv_multipart()))
                self.rtts.append((t, rtt if got else self.timeout))
                self.started.set()
                self.stop_event.wait(self.interval)
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.started.set()
            sock.close(linger=0)

    def note(self, msg: Any) -> None:
        info = getattr(msg, "info", None) or {}
        queued = info.get("queued")
        if isinstance(queued, int):
            self.max_queued = max(self.max_queued, queued)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def worst(self, t0: float = 0.0, t1: float = float("inf")) -> float | None:
        """The longest round trip (s) that began between the monotonic times ``t0`` and ``t1``."""
        return max((rtt for t, rtt in self.rtts if t0 <= t <= t1), default=None)

    def quantile(self, q: float, t0: float = 0.0, t1: float = float("inf")) -> float | None:
        values = sorted(rtt for t, rtt in self.rtts if t0 <= t <= t1)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None
