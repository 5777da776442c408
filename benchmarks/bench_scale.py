#!/usr/bin/env python
"""One broker, many agents (issue 12): routing throughput, idle CPU and memory for N = 1 ... 1,000 agents.

    python benchmarks/bench_scale.py [--agents 1,10,100,1000] [--quick] [--insecure] [--json out.json]

For each N, a fresh ``python -m zpar_broker`` on three loopback TCP ports
(the default authentication: this user's own secret, made in a private
``XDG_CONFIG_HOME``; ``--insecure`` for plaintext) meets N *simulated*
agents. They live in a few host processes (this script again, ``--host``:
``--hosts`` of them, 2 by default), each agent with its own DEALER to the
backend and PUSH to the collector, exactly as ``zpar.agent.uplink`` opens
them (same options, same CurveZMQ keys: ``client_credentials("agent")``), all
polled by one loop per host. A simulated agent speaks the real wire
(``zpar.protocol``, nothing hand-made): HELLO with ``--workers`` workers;
on WELCOME it adopts the epoch and the pace, connects its collector and asks
for the credits a real agent asks once it has measured tiny tasks (workers
x BATCH_MAX_TASKS x 2, ``Slots.credit_target``); it heartbeats every
``heartbeat`` s from the WELCOME, says HELLO again when the broker is silent
for a liveness window or answers UNKNOWN_PEER; on TASKS it answers every
task at once with a RESULT (status OK, ``None`` pickled: a few bytes;
``agent`` and ``epoch`` set as the real uplink sets them) over its
collector, then a READY for as many credits, as a real agent whose workers
are idle again; it counts the ACKs. It never unpickles a function or an
argument, so what is measured is the broker's routing (and the cost of the
simulation, on the same 2 cores: see the CPU split in the report).

Measured for each N, in this order:

- ``idle_cpu_pct``: the broker's CPU (psutil, user + system, every thread:
  the Python loop and ZeroMQ's I/O threads, where CurveZMQ runs) over
  ``--idle-window`` s (10; 5 with ``--quick``) with the N agents connected
  and heartbeating, nothing else running; split into the loop's thread and
  ZeroMQ's I/O threads. Bar: < 5 % of a core at 1,000 agents (heartbeat 1 s).
- ``rss_mib``: the broker's RSS at the end of that window (N agents
  connected, no task run yet); ``rss_per_agent_kib`` = (rss_N - rss_1) / N
  when N = 1 ran too. ``rss_after_mib``: after the throughput rounds; also
  at the end of each round (a high-water mark levels off, a leak does not),
  and split by where it lives (glibc's main heap, the thread arenas of
  ZeroMQ's I/O threads, other anonymous maps, files).
- ``tasks_per_s``: ``--producers`` real ``zpar.Client`` producers (2), each
  in its own process, each ``imap_unordered(noop, range(--tasks),
  chunksize=--chunksize)`` (200,000; 50,000 with ``--quick``; chunksize 1:
  every item is one task of the broker, and the batches are those of the
  wire: the client's SUBMITs, the broker's TASKS, the agents' RESULTs, up to
  BATCH_MAX_TASKS each), started together after a warm-up map; the tasks of
  all producers / (last result - start), the median of ``--repeats`` rounds
  (3; each listed). Bar: >= 200,000 tasks/s at 100 agents. Beside it: each
  role's CPU over the round (broker, hosts, producers; 2 cores = 200 %), the
  broker's CPU per task and what it makes a core's cap (1 s / that), the
  tasks per TASKS message, and the broker's counters.
- fairness: over the window where every producer was running (from the
  start to the first one done), each producer's completed tasks (its
  timeline, one point per 1,000 results); ``fair_min_max`` = min / max.
- With ``--profile`` (N values; 100 and 1,000 by default, none with
  ``--quick``) a second, shorter round (a quarter of the tasks) runs with
  ``py-spy record --nonblocking`` on the broker for ``--profile-seconds``,
  and py-spy samples the idle broker after the idle window: the top
  functions by own time and by inclusive time (below the loop).
  ``--broker-env KEY=VALUE`` sets the broker's environment for experiments
  (``MALLOC_ARENA_MAX=1``).

Checked, not timed: every producer got all its results (each None), every
result was acknowledged, no agent was dropped or had to say HELLO again
(broker counters ``agents_silent``, ``unknown_agent_messages``), the broker's
RLIMIT_NOFILE fits 2 N connections (it inherits ours, raised to the hard
limit here, in the hosts and in the producers). Exit code 0 when every bar
and check holds, 1 when one is missed, 2 when the benchmark broke. Every
process started is killed by process group on exit, Ctrl-C, SIGTERM and
errors. Figures and findings: benchmarks/README.md, issue 12.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import heapq
import json
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any, Self

import psutil

# benchmarks/ is on sys.path
from _cluster import private_config_home
from _common import finish_run, print_verdicts

now = time.monotonic
MiB = 1 << 20
HERE = os.path.abspath(__file__)

THROUGHPUT_BAR = 200_000  # tasks/s at BAR_AGENTS_THROUGHPUT agents
BAR_AGENTS_THROUGHPUT = 100
IDLE_BAR_PCT = 5.0  # % of one core at BAR_AGENTS_IDLE agents
BAR_AGENTS_IDLE = 1000


def raise_nofile() -> tuple[int, int]:
    """The soft RLIMIT_NOFILE raised to the hard one: 1,000 agents are 2,000 connections to one broker."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


#: The process groups this run started (each child leads its own): killed at exit whatever happened.
_GROUPS: set[int] = set()


def started(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    _GROUPS.add(proc.pid)
    return proc


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    _GROUPS.discard(pgid)


@atexit.register
def _kill_all() -> None:
    for pgid in list(_GROUPS):
        kill_group(pgid)


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout: how the host and producer processes report to the harness."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Commands:
    """Lines from the harness on stdin, read without blocking (the harness gone: EOF, ``stop``)."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self.buf = b""
        self.eof = False

    def read(self) -> list[str]:
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            return ["stop"]
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [line.decode().strip() for line in lines if line.strip()]

    def wait(self, timeout: float) -> list[str]:
        """The next command(s), within ``timeout`` s (none: [])."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return self.read() if ready else []


# ---------------------------------------------------------------------- simulated agents (a host process)


class SimAgent:
    """One simulated agent: its two sockets and what it must remember to behave as a real one."""

    __slots__ = ("acked", "beats", "collector", "dealer", "epoch", "heartbeat", "hellos", "identity", "index",
                 "last_beat", "last_heard", "liveness", "max_gap", "next_beat", "pending", "results", "tasks",
                 "tasks_msgs", "welcomed", "welcomes")

    def __init__(self, index: int, identity: bytes, dealer: Any, heartbeat: float, liveness: int, t: float) -> None:
        self.index, self.identity, self.dealer = index, identity, dealer
        self.collector: Any = None
        self.epoch = ""
        self.welcomed = False
        self.heartbeat, self.liveness = heartbeat, liveness
        self.next_beat = t  # the real agent's first beat goes at once (BrokerSession.next_beat)
        self.last_heard = t
        self.last_beat = 0.0
        self.max_gap = 0.0  # longest time between two of our heartbeats once welcomed: did the host keep pace?
        self.beats = 0  # heartbeats sent since the last WELCOME
        self.hellos = self.welcomes = 0
        self.tasks = self.tasks_msgs = self.results = self.acked = 0
        self.pending: list[list[Any]] = []  # encoded results the collector could not take yet, in order


class Host:
    """A host process's agents and one loop for all of them (``--host SPEC``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import zmq

        from zpar import protocol as P
        from zpar import security, serialize
        from zpar.agent.uplink import collector_address, configure

        self.zmq, self.P, self.security = zmq, P, security
        self.configure, self.collector_address = configure, collector_address
        self.spec = spec
        self.backend: str = spec["backend"]
        self.workers: int = spec["workers"]
        # What a real agent asks once it has measured tiny tasks: workers x batch x 2 (Slots.credit_target).
        self.credit_target = self.workers * P.BATCH_MAX_TASKS * 2
        self.creds = security.client_credentials("agent", insecure=spec["insecure"], address=self.backend)
        chunk = spec["chunksize"]
        # The tiny result: None (or a chunk's list of Nones), pickled once as a worker would.
        self.payload = (serialize.dumps(None if chunk <= 1 else [None] * chunk)[0],)
        self.beat_frames = P.encode(P.Heartbeat(0))  # the same bytes for every agent: encoded once
        self.ctx = zmq.Context(io_threads=1)
        self.ctx.max_sockets = 2 * spec["agents"] + 64  # libzmq's default is 1,023 sockets a context
        self.counters: collections.Counter[str] = collections.Counter()
        self.agents: list[SimAgent] = []
        self.by_socket: dict[Any, SimAgent] = {}
        self.poller = zmq.Poller()
        self.blocked: set[int] = set()  # agents with results waiting for their collector
        self.loop_lag = 0.0  # the longest a due heartbeat waited for the loop
        t = now()
        hb, liveness = spec["heartbeat"], spec["liveness"]
        for i in range(spec["agents"]):
            dealer = configure(self.ctx.socket(zmq.DEALER), P.MAX_MESSAGE_SIZE)
            identity = uuid.uuid4().bytes  # as zpar.agent.server: a random routing id per agent
            dealer.setsockopt(zmq.IDENTITY, identity)
            security.apply_client(dealer, self.creds)
            dealer.connect(self.backend)
            agent = SimAgent(i, identity, dealer, hb, liveness, t)
            self.agents.append(agent)
            self.by_socket[dealer] = agent
            self.poller.register(dealer, zmq.POLLIN)
            self.hello(agent)
        self.beats = [(a.next_beat, a.index) for a in self.agents]
        heapq.heapify(self.beats)

    # ------------------------------------------------------------------ sending

    def send(self, agent: SimAgent, msg: Any) -> None:
        try:
            agent.dealer.send_multipart(self.P.encode(msg), self.zmq.NOBLOCK)
        except self.zmq.Again:  # as the real uplink: a broker that does not read loses a control message
            self.counters[f"dropped_{msg.kind.name}"] += 1

    def hello(self, agent: SimAgent) -> None:
        agent.welcomed = False
        agent.hellos += 1
        self.send(agent, self.P.Hello(self.P.Role.AGENT, f"sim-{self.spec['index']}-{agent.index}",
                                      socket.gethostname(), os.getpid(), self.workers))

    def send_results(self, agent: SimAgent, frames: list[Any]) -> None:
        if agent.pending or agent.collector is None:
            agent.pending.append(frames)
            self.blocked.add(agent.index)
            return
        try:
            agent.collector.send_multipart(frames, self.zmq.NOBLOCK)
        except self.zmq.Again:  # the collector pushes back: kept, in order, as the real agent keeps them
            self.counters["collector_full"] += 1
            agent.pending.append(frames)
            self.blocked.add(agent.index)

    def flush(self) -> None:
        for i in list(self.blocked):
            agent = self.agents[i]
            while agent.pending and agent.collector is not None:
                try:
                    agent.collector.send_multipart(agent.pending[0], self.zmq.NOBLOCK)
                except self.zmq.Again:
                    break
                agent.pending.pop(0)
            if not agent.pending:
                self.blocked.discard(i)

    # ------------------------------------------------------------------ what the broker says

    def on_message(self, agent: SimAgent, frames: list[Any], t: float) -> None:
        P = self.P
        try:
            msg = P.decode(frames)
        except Exception:  # noqa: BLE001 - a ProtocolError from the broker is a finding: counted
            self.counters["undecodable"] += 1
            return
        agent.last_heard = t
        if isinstance(msg, P.Tasks):
            entries = msg.tasks
            n = len(entries)
            agent.tasks += n
            agent.tasks_msgs += 1
            payload = self.payload
            results = [P.ResultEntry(e.id, P.Status.OK, payload, 1) for e in entries]
            for run in P.batches(results):  # one message per run that fits (one, for a TASKS of tiny tasks)
                self.send_results(agent, P.encode(P.Result(tuple(run), agent.identity, agent.epoch)))
            agent.results += n
            self.send(agent, P.Ready(n))  # the results are out, the workers idle again: as many credits
        elif isinstance(msg, P.Ack):
            agent.acked += len(msg.ids)
        elif isinstance(msg, P.Heartbeat):
            self.counters["broker_heartbeats"] += 1
        elif isinstance(msg, P.Welcome):
            self.welcome(agent, msg, t)
        elif isinstance(msg, P.Error):
            self.counters[f"error_{msg.code.name}"] += 1
            if msg.code is P.ErrorCode.UNKNOWN_PEER:
                self.hello(agent)
        elif isinstance(msg, P.Bye):
            self.counters[f"bye_{msg.reason.name}"] += 1
            agent.welcomed = False
        else:
            self.counters[f"other_{msg.kind.name}"] += 1

    def welcome(self, agent: SimAgent, msg: Any, t: float) -> None:
        zmq = self.zmq
        if agent.epoch and msg.epoch != agent.epoch:
            self.counters["broker_restarted"] += 1
        agent.epoch = msg.epoch
        agent.heartbeat, agent.liveness = msg.heartbeat, msg.liveness  # the broker's pace wins
        agent.next_beat = min(agent.next_beat, t + msg.heartbeat)
        agent.welcomed = True
        agent.welcomes += 1
        agent.beats = 0
        agent.last_beat = t
        if agent.collector is None:  # as SocketUplink.welcomed: the collector's port, on the host we reached
            address = self.collector_address(msg.collector, self.backend)
            agent.collector = self.configure(self.ctx.socket(zmq.PUSH), self.P.MAX_MESSAGE_SIZE)
            self.security.apply_client(agent.collector, self.creds)
            agent.collector.connect(address)
        self.send(agent, self.P.Ready(self.credit_target))

    # ------------------------------------------------------------------ timers

    def beat_due(self, t: float) -> None:
        beats = self.beats
        while beats and beats[0][0] <= t:
            due, i = heapq.heappop(beats)
            agent = self.agents[i]
            if due != agent.next_beat:  # moved by a WELCOME: the entry for the new time is pushed below
                due = agent.next_beat
                if due > t:
                    heapq.heappush(beats, (due, i))
                    continue
            self.loop_lag = max(self.loop_lag, t - due)
            with contextlib.suppress(self.zmq.Again):
                agent.dealer.send_multipart(self.beat_frames, self.zmq.NOBLOCK)
            if agent.welcomed:
                agent.beats += 1
                if agent.beats > 1:
                    agent.max_gap = max(agent.max_gap, t - agent.last_beat)
            agent.last_beat = t
            if t - agent.last_heard > agent.heartbeat * agent.liveness:  # the broker went quiet: HELLO again
                agent.last_heard = t
                self.counters["hello_after_silence"] += 1
                self.hello(agent)
            agent.next_beat = t + agent.heartbeat
            heapq.heappush(beats, (agent.next_beat, i))

    # ------------------------------------------------------------------ reporting

    def stats(self) -> dict[str, Any]:
        agents = self.agents
        cpu = psutil.Process().cpu_times()
        return {
            "agents": len(agents),
            "welcomed": sum(1 for a in agents if a.welcomed),
            "min_beats": min((a.beats for a in agents if a.welcomed), default=0),
            "hellos": sum(a.hellos for a in agents),
            "welcomes": sum(a.welcomes for a in agents),
            "tasks": sum(a.tasks for a in agents),
            "tasks_msgs": sum(a.tasks_msgs for a in agents),
            "results": sum(a.results for a in agents),
            "acked": sum(a.acked for a in agents),
            "pending_results": sum(len(a.pending) for a in agents),
            "max_beat_gap_s": round(max((a.max_gap for a in agents), default=0.0), 3),
            "loop_lag_s": round(self.loop_lag, 3),
            "agents_with_tasks": sum(1 for a in agents if a.tasks),
            "counters": dict(self.counters),
            "cpu_s": round(cpu.user + cpu.system, 3),
        }

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        zmq = self.zmq
        commands = Commands()
        self.poller.register(commands.fd, zmq.POLLIN)
        ready_told = False
        while True:
            t = now()
            wait = max(0.0, self.beats[0][0] - t) if self.beats else 1.0
            if self.blocked:
                wait = min(wait, 0.001)
            events = self.poller.poll(wait * 1000)
            t = now()
            for sock, _ in events:
                if sock == commands.fd:
                    for cmd in commands.read():
                        if cmd == "stats":
                            emit("stats", **self.stats())
                        elif cmd == "stop":
                            self.stop()
                            return
                    continue
                agent = self.by_socket[sock]
                for _ in range(64):  # bounded: one busy agent does not starve the others' heartbeats
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.on_message(agent, frames, t)
            if self.blocked:
                self.flush()
            self.beat_due(now())
            if not ready_told and all(a.welcomed for a in self.agents):
                ready_told = True
                emit("ready", **self.stats())

    def stop(self) -> None:
        """As a real agent stops: BYE over the collector, behind its last results; then the sockets close."""
        P, zmq = self.P, self.zmq
        self.flush()
        for agent in self.agents:
            if agent.collector is not None:
                with contextlib.suppress(zmq.Again):
                    agent.collector.send_multipart(P.encode(P.Bye(P.ByeReason.LEAVING, agent.identity)), zmq.NOBLOCK)
        stats = self.stats()
        for agent in self.agents:
            for sock in (agent.dealer, agent.collector):
                if sock is not None:
                    sock.close(linger=500)
        self.ctx.term()
        emit("stopped", **stats)


def host_main(spec_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    raise_nofile()
    host = Host(spec)
    try:
        host.run()
    except KeyboardInterrupt:
        return 1
    return 0


# ---------------------------------------------------------------------- a producer (its own process)


def producer_main(spec_path: str) -> int:
    """A real ``zpar.Client``: a warm-up map, then one timed map per ``go`` from the harness."""
    with open(spec_path) as fh:
        spec = json.load(fh)
    raise_nofile()
    from _tasks import noop

    import zpar

    chunksize, step = spec["chunksize"], spec["step"]
    commands = Commands()
    client = zpar.Client(spec["frontend"], insecure=spec["insecure"], connect_timeout=60)
    try:
        warm = list(client.map(noop, range(spec["warm"]), chunksize=chunksize))
        emit("ready", warm=len(warm))
        while True:
            cmds = commands.wait(600.0)
            if not cmds or "stop" in cmds:
                return 0
            for cmd in cmds:
                if not cmd.startswith("go "):
                    continue
                n = int(cmd.split()[1])
                t0 = now()
                done = wrong = 0
                timeline = [(t0, 0)]
                for value in client.imap_unordered(noop, range(n), chunksize=chunksize, timeout=spec["timeout"]):
                    done += 1
                    if value is not None:
                        wrong += 1
                    if done % step == 0:
                        timeline.append((now(), done))
                t1 = now()
                if timeline[-1][1] != done:
                    timeline.append((t1, done))
                emit("done", t0=t0, t1=t1, items=done, tasks=-(-done // chunksize), wrong=wrong, timeline=timeline)
    finally:
        client.close()


# ---------------------------------------------------------------------- the harness


class Child:
    """A process of this script (``--host`` or ``--producer``) in its own process group; JSON lines out."""

    def __init__(self, role: str, spec: dict[str, Any], workdir: str, name: str) -> None:
        self.name = name
        spec_path = os.path.join(workdir, f"{name}.spec.json")
        with open(spec_path, "w") as fh:
            json.dump(spec, fh)
        self.err_path = os.path.join(workdir, f"{name}.err")
        with open(self.err_path, "w") as err:
            self.proc = started(subprocess.Popen([sys.executable, HERE, f"--{role}", spec_path],
                                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                                 start_new_session=True))
        self.ps = psutil.Process(self.proc.pid)
        self.buf = b""

    def send(self, line: str) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(line.encode() + b"\n")
                self.proc.stdin.flush()

    def expect(self, event: str, deadline: float) -> dict[str, Any]:
        """The next line of kind ``event`` (others are skipped), by the monotonic ``deadline``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("event") == event:
                    return dict(msg)
            left = deadline - now()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} in time")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                data = os.read(fd, 1 << 20)
                if not data:
                    raise RuntimeError(f"{self.name} exited (code {self.proc.wait(5)}) before {event!r}; "
                                       f"stderr: {self.stderr_tail()}")
                self.buf += data

    def ask(self, command: str, event: str, timeout: float = 10.0) -> dict[str, Any]:
        self.send(command)
        return self.expect(event, now() + timeout)

    def cpu(self) -> float:
        try:
            t = self.ps.cpu_times()
        except psutil.Error:
            return 0.0
        return t.user + t.system

    def stderr_tail(self, lines: int = 8) -> str:
        try:
            with open(self.err_path, errors="replace") as fh:
                return " | ".join(fh.read().splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        kill_group(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """``python -m zpar_broker`` on three free loopback ports, its log in a file, in its own process group."""

    def __init__(self, args: argparse.Namespace, log_path: str) -> None:
        from zpar import security
        from zpar.client import broker_status
        from zpar.errors import BrokerUnavailable

        self.insecure = args.insecure
        self.creds = security.client_credentials("producer", insecure=args.insecure)
        self.proc: subprocess.Popen[bytes] | None = None
        for _ in range(5):  # a port free a moment ago may be taken before the broker binds it
            ports = [free_port() for _ in range(3)]
            self.frontend, self.backend, self.collector = (f"tcp://127.0.0.1:{p}" for p in ports)
            env = {**os.environ, **dict(kv.split("=", 1) for kv in args.broker_env)}
            cmd = [sys.executable, "-m", "zpar_broker", "--frontend", self.frontend, "--backend", self.backend,
                   "--collector", self.collector, "--heartbeat", str(args.heartbeat), "--liveness",
                   str(args.liveness), "--log-level", "WARNING", "--parent-pid", str(os.getpid()),
                   "--dashboard", "127.0.0.1:0", *(["--insecure"] if args.insecure else [])]
            with open(log_path, "a") as log:
                self.proc = started(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                     stderr=log, env=env, start_new_session=True))
            deadline = now() + 20
            while self.proc.poll() is None and now() < deadline:
                try:
                    broker_status(self.frontend, 0.5, self.creds, insecure=self.insecure)
                    break
                except BrokerUnavailable:
                    continue
            if self.proc.poll() is None:
                if now() >= deadline:
                    raise TimeoutError("the broker did not answer within 20 s")
                self.ps = psutil.Process(self.proc.pid)
                return
        raise OSError("the broker could not bind free ports in 5 attempts")

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        from zpar.client import broker_status

        return broker_status(self.frontend, timeout, self.creds, insecure=self.insecure)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds of its Python thread (the loop) and of ZeroMQ's I/O threads (TCP, CurveZMQ) apart."""
        split = {"loop": 0.0, "zmq_io": 0.0}
        with contextlib.suppress(psutil.Error):
            for th in self.ps.threads():
                split["loop" if th.id == self.ps.pid else "zmq_io"] += th.user_time + th.system_time
        return split

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
        finally:
            kill_group(self.proc.pid)  # what is left, and anything it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


def memory_split(pid: int) -> dict[str, float]:
    """A process's RSS by where it lives (MiB): glibc's main heap, its thread arenas (64 MiB-aligned
    anonymous maps: the ZeroMQ I/O threads' allocations), other anonymous maps (pymalloc's arenas, large
    blocks, stacks) and files (code, libraries)."""
    split: collections.Counter[str] = collections.Counter()
    try:
        maps = psutil.Process(pid).memory_maps(grouped=False)
    except psutil.Error:
        return {}
    for m in maps:
        addr = int(m.addr.split("-")[0], 16)
        if m.path == "[heap]":
            kind = "heap"
        elif m.path in ("", "[anon]") or m.path.startswith("[anon"):
            kind = "thread_arenas" if addr % (64 << 20) == 0 else "other_anon"
        elif m.path.startswith("["):
            kind = "other_anon"
        else:
            kind = "files"
        split[kind] += m.rss
    return {k: round(v / MiB, 1) for k, v in sorted(split.items())}


def wait_until(what: str, condition: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """``condition()`` polled until true; its value, or TimeoutError naming ``what``."""
    deadline = now() + timeout
    while True:
        value = condition()
        if value:
            return value
        if now() >= deadline:
            raise TimeoutError(f"not within {timeout:.0f} s: {what}")
        time.sleep(interval)


def host_totals(hosts: list[Child], command: str = "stats", event: str = "stats") -> dict[str, Any]:
    """The hosts' counters, summed (the maxima of the timing ones)."""
    total: dict[str, Any] = collections.Counter()
    counters: collections.Counter[str] = collections.Counter()
    maxima = ("max_beat_gap_s", "loop_lag_s")
    mins = ("min_beats",)
    out: dict[str, Any] = {}
    for h in hosts:
        s = h.ask(command, event, 30.0)
        for k, v in s.items():
            if k == "counters":
                counters.update(v)
            elif k in maxima:
                out[k] = max(out.get(k, 0.0), v)
            elif k in mins:
                out[k] = min(out.get(k, v), v)
            elif isinstance(v, int | float) and k != "event":
                total[k] += v
    return {**dict(total), **out, "counters": dict(counters)}


def pyspy_path() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))


def start_profile(pid: int, seconds: float, out_path: str, rate: int = 200) -> subprocess.Popen[bytes] | None:
    exe = pyspy_path()
    if exe is None:
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate), "--nonblocking",
           "--format", "raw", "--output", out_path]
    return started(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True))


def read_profile(path: str, top: int = 12) -> dict[str, Any]:
    """py-spy's raw stacks: the functions where the broker's loop spent its samples, by own and inclusive time."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        with open(path) as fh:
            for line in fh:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                total += n
                frames = [_frame_name(f) for f in stack.split(";")]
                own[frames[-1]] += n
                # Inclusive: below the loop only (the frames that start and run it are in every sample).
                loop = next((i for i, f in enumerate(frames) if f.startswith("run_loop ")), -1)
                for f in set(frames[loop + 1:]):
                    incl[f] += n
    except OSError:
        return {"samples": 0}
    if not total:
        return {"samples": 0}
    return {"samples": total,
            "own": [(f, round(100 * n / total, 1)) for f, n in own.most_common(top)],
            "inclusive": [(f, round(100 * n / total, 1)) for f, n in incl.most_common(top)]}


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` as ``func (file.py)``: lines of one function counted together."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(where.split('/')[-2:])})"


def interpolate(timeline: list[list[float]], t: float) -> float:
    """Results a producer had at monotonic time ``t``, from its timeline of (time, results)."""
    prev = timeline[0]
    if t <= prev[0]:
        return 0.0
    for point in timeline[1:]:
        if point[0] >= t:
            span = point[0] - prev[0]
            return prev[1] + (point[1] - prev[1]) * ((t - prev[0]) / span if span > 0 else 1.0)
        prev = point
    return float(prev[1])


def throughput_round(broker: Broker, hosts: list[Child], producers: list[Child], tasks: int,
                     args: argparse.Namespace, profile_path: str | None = None) -> dict[str, Any]:
    """Every producer maps ``tasks`` tiny tasks at once; the rate, each role's CPU and the fairness."""
    out: dict[str, Any] = {}
    before = broker.status()["counters"]
    hosts_before = host_totals(hosts)
    threads0 = broker.thread_cpu()
    cpu0 = {"broker": broker.cpu(), "hosts": sum(h.cpu() for h in hosts),
            "producers": sum(p.cpu() for p in producers)}
    machine0 = psutil.cpu_times()
    t0 = now()
    for p in producers:
        p.send(f"go {tasks}")
    spy = start_profile(broker.proc.pid, args.profile_seconds, profile_path) if profile_path else None
    done = [p.expect("done", t0 + args.deadline) for p in producers]
    t1 = max(d["t1"] for d in done)
    cpu1 = {"broker": broker.cpu(), "hosts": sum(h.cpu() for h in hosts),
            "producers": sum(p.cpu() for p in producers)}
    threads1 = broker.thread_cpu()
    machine1 = psutil.cpu_times()
    elapsed = t1 - min(d["t0"] for d in done)
    total_tasks = sum(d["tasks"] for d in done)
    out["tasks"] = total_tasks
    out["expected_items"] = tasks * len(producers)
    out["items"] = sum(d["items"] for d in done)
    out["elapsed_s"] = round(elapsed, 3)
    out["tasks_per_s"] = round(total_tasks / elapsed) if elapsed > 0 else None
    out["wrong_results"] = sum(d["wrong"] for d in done)
    span = now() - t0
    out["cpu_pct"] = {k: round(100 * (cpu1[k] - cpu0[k]) / span, 1) for k in cpu0}
    busy = (sum(machine1) - machine1.idle - machine1.iowait) - (sum(machine0) - machine0.idle - machine0.iowait)
    out["cpu_pct"]["machine"] = round(100 * busy / span, 1)
    out["broker_threads_pct"] = {k: round(100 * (threads1[k] - threads0[k]) / span, 1) for k in threads0}
    out["broker_cpu_us_per_task"] = round(1e6 * (cpu1["broker"] - cpu0["broker"]) / max(total_tasks, 1), 2)
    # Fairness: from the common start to the first producer done, what each completed.
    start = max(d["t0"] for d in done)
    end = min(d["t1"] for d in done)
    shares = [interpolate(d["timeline"], end) - interpolate(d["timeline"], start) for d in done]
    out["fair_window_s"] = round(end - start, 3)
    out["fair_shares"] = [round(s) for s in shares]
    out["fair_min_max"] = round(min(shares) / max(shares), 3) if max(shares) > 0 else None
    # Every result acknowledged (the broker ACKs each RESULT): a condition with a deadline.
    def all_acked() -> dict[str, Any] | None:
        s = host_totals(hosts)
        return s if s["acked"] >= s["results"] else None

    try:
        after_hosts = wait_until("every result acknowledged", all_acked, 10.0)
    except TimeoutError:
        after_hosts = host_totals(hosts)
    out["unacked"] = after_hosts["results"] - after_hosts["acked"]
    after = broker.status()["counters"]
    out["counters_delta"] = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
                             if after.get(k, 0) != before.get(k, 0)}
    msgs = after_hosts["tasks_msgs"] - hosts_before["tasks_msgs"]
    got = after_hosts["tasks"] - hosts_before["tasks"]
    out["agent_tasks"] = got
    out["tasks_per_tasks_msg"] = round(got / msgs, 1) if msgs else None
    out["agents_with_tasks"] = after_hosts["agents_with_tasks"]
    out["rss_end_mib"] = round(broker.rss() / MiB, 1)  # a high-water mark, or a leak if it grows round after round
    if spy is not None:
        try:
            spy.wait(args.profile_seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
        out["profile"] = read_profile(profile_path or "")
    elif profile_path:
        out["profile"] = {"samples": 0, "error": "py-spy not found (pip install py-spy)"}
    return out


class Watchers:
    """``count`` dashboard pages open on the broker: each reads /api/events (a snapshot a second) in a thread."""

    def __init__(self, link: str, count: int) -> None:
        import urllib.parse

        parts = urllib.parse.urlsplit(link)
        self.url = f"{parts.scheme}://{parts.netloc}/api/events?{parts.query}"
        self.count, self.snapshots = count, 0
        self._replies: list[Any] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        import urllib.request

        for _ in range(self.count):
            reply = urllib.request.urlopen(self.url, timeout=30)  # noqa: S310 - the broker's own http:// link
            self._replies.append(reply)
            thread = threading.Thread(target=self._read, args=(reply,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, reply: Any) -> None:
        with contextlib.suppress(OSError, ValueError):  # closed by __exit__
            for line in reply:
                if line.startswith(b"data: "):
                    json.loads(line[6:])  # what a page does with each snapshot, at the least
                    self.snapshots += 1

    def __exit__(self, *exc: object) -> None:
        for reply in self._replies:
            reply.close()
        for thread in self._threads:
            thread.join(timeout=5)


def dashboard_cost(plain: list[dict[str, Any]], watched: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """Throughput and broker CPU per task without and with ``count`` dashboards open (medians, alternating)."""
    def median(rounds: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] or 0 for r in rounds))

    out = {"watchers": count}
    for key in ("tasks_per_s", "broker_cpu_us_per_task"):
        out[key] = [median(plain, key), median(watched, key)]
    out["throughput_ratio"] = round(out["tasks_per_s"][1] / max(out["tasks_per_s"][0], 1e-9), 3)
    out["broker_us_ratio"] = round(out["broker_cpu_us_per_task"][1] / max(out["broker_cpu_us_per_task"][0], 1e-9), 3)
    return out


def run_n(n: int, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    out: dict[str, Any] = {"agents": n}
    log_path = os.path.join(workdir, f"broker-{n}.log")
    broker: Broker | None = None
    hosts: list[Child] = []
    producers: list[Child] = []
    try:
        broker = Broker(args, log_path)
        soft, hard = broker.ps.rlimit(psutil.RLIMIT_NOFILE)
        out["broker_nofile"] = [soft, hard]
        if soft < 2 * n + 256:
            raise RuntimeError(f"the broker's RLIMIT_NOFILE {soft} is too low for {n} agents")
        # The agents: --hosts processes (fewer for few agents), an even share each.
        k = max(1, min(args.hosts, n))
        t = now()
        for i in range(k):
            count = n // k + (1 if i < n % k else 0)
            spec = {"index": i, "agents": count, "backend": broker.backend, "workers": args.workers,
                    "heartbeat": args.heartbeat, "liveness": args.liveness, "insecure": args.insecure,
                    "chunksize": args.chunksize}
            hosts.append(Child("host", spec, workdir, f"host-{n}-{i}"))
        deadline = t + 30 + 0.06 * n
        for h in hosts:
            h.expect("ready", deadline)
        out["connect_s"] = round(now() - t, 2)
        wait_until(f"the broker listing {n} agents", lambda: len(broker.status()["nodes"]) == n, 30)
        # Idle: the connection storm over (every agent welcomed and two beats past it), then the window.
        wait_until("every agent past its second heartbeat", lambda: host_totals(hosts)["min_beats"] >= 2,
                   10 + 4 * args.heartbeat)
        rss_samples = []
        hosts_cpu0 = sum(h.cpu() for h in hosts)
        threads0 = broker.thread_cpu()
        cpu0, t0 = broker.cpu(), now()
        end = t0 + args.idle_window
        while now() < end:  # sampling, not synchronising: the window is the measurement
            rss_samples.append(broker.rss())
            time.sleep(min(0.5, max(0.0, end - now())))
        cpu1, t1 = broker.cpu(), now()
        threads1 = broker.thread_cpu()
        out["idle_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 2)
        out["idle_threads_pct"] = {k: round(100 * (threads1[k] - threads0[k]) / (t1 - t0), 2) for k in threads0}
        out["idle_hosts_cpu_pct"] = round(100 * (sum(h.cpu() for h in hosts) - hosts_cpu0) / (t1 - t0), 2)
        out["rss_mib"] = round(broker.rss() / MiB, 1)
        out["rss_split_idle"] = memory_split(broker.ps.pid)
        out["rss_idle_max_mib"] = round(max(rss_samples) / MiB, 1)
        idle_hosts = host_totals(hosts)
        out["idle_max_beat_gap_s"] = idle_hosts.get("max_beat_gap_s")
        if n in args.profile:  # after the window, not in it: py-spy's own CPU must not count
            path = os.path.join(workdir, f"pyspy-idle-{n}.txt")
            spy = start_profile(broker.ps.pid, args.profile_seconds, path, rate=1000)
            if spy is not None:
                try:
                    spy.wait(args.profile_seconds + 30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
                out["idle_profile"] = read_profile(path)
        # Throughput: the producers connect and warm up, then start together.
        for i in range(args.producers):
            spec = {"frontend": broker.frontend, "insecure": args.insecure, "chunksize": args.chunksize,
                    "warm": args.warm, "step": 1000, "timeout": args.deadline}
            producers.append(Child("producer", spec, workdir, f"producer-{n}-{i}"))
        deadline = now() + 120
        for p in producers:
            p.expect("ready", deadline)
        if args.watchers:  # rounds alternate: without the dashboard open, then with it (issue 13's bar)
            rounds, watched = [], []
            snapshots = 0
            for _ in range(args.repeats):
                rounds.append(throughput_round(broker, hosts, producers, args.tasks, args))
                with Watchers(broker.status()["dashboard"], args.watchers) as watchers:
                    watched.append(throughput_round(broker, hosts, producers, args.tasks, args))
                snapshots += watchers.snapshots
            out["dashboard_cost"] = dashboard_cost(rounds, watched, args.watchers)
            out["dashboard_cost"]["snapshots"] = snapshots  # what the pages got: none, and the cost means nothing
        else:
            rounds = [throughput_round(broker, hosts, producers, args.tasks, args) for _ in range(args.repeats)]
        ranked = sorted(rounds, key=lambda r: r["tasks_per_s"] or 0)
        out["throughput"] = ranked[(len(ranked) - 1) // 2]  # the median round (the lower one of two)
        out["tasks_per_s"] = out["throughput"]["tasks_per_s"]
        out["tasks_per_s_rounds"] = [r["tasks_per_s"] for r in rounds]
        out["fair_min_max"] = out["throughput"]["fair_min_max"]
        out["fair_min_max_rounds"] = [r["fair_min_max"] for r in rounds]
        # What the broker could route with a core of its own at this batching: 1 s / its CPU per task.
        out["broker_cap_tasks_per_s"] = round(1e6 / max(out["throughput"]["broker_cpu_us_per_task"], 0.01))
        out["rounds"] = rounds  # in the order they ran
        if n in args.profile:
            out["profiled"] = throughput_round(broker, hosts, producers, max(args.tasks // 4, 10_000), args,
                                               os.path.join(workdir, f"pyspy-{n}.txt"))
        for p in producers:
            p.send("stop")
        for p in producers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(15)
        out["rss_after_mib"] = round(broker.rss() / MiB, 1)
        out["rss_split_after"] = memory_split(broker.ps.pid)
        status = broker.status()
        out["broker_counters"] = status["counters"]
        out["hosts"] = host_totals(hosts)
        out["broker_alive"] = broker.proc is not None and broker.proc.poll() is None
    except Exception as exc:  # noqa: BLE001 - reported; the next N runs
        out["broken"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    finally:
        try:
            for p in producers:
                p.kill()
            for h in hosts:  # a clean goodbye when they can (BYE over the collector) ...
                h.send("stop")
            for h in hosts:
                with contextlib.suppress(Exception):
                    h.expect("stopped", now() + 20)
        finally:  # ... and killed in any case, a second Ctrl-C included
            for c in [*producers, *hosts]:
                c.kill()
            if broker is not None:
                broker.stop()
        out["log_tail"] = _tail(log_path)
    return out


def _tail(path: str, lines: int = 10) -> list[str]:
    try:
        with open(path, errors="replace") as fh:
            return fh.read().splitlines()[-lines:]
    except OSError:
        return []


# ---------------------------------------------------------------------- report


def checks(r: dict[str, Any]) -> list[tuple[str, bool, str]]:
    n = r["agents"]
    if "broken" in r:
        return [(f"N={n}: benchmark ran", False, r["broken"])]
    rounds = r["rounds"] + ([r["profiled"]] if "profiled" in r else [])
    items, expected = sum(x["items"] for x in rounds), sum(x["expected_items"] for x in rounds)
    wrong, unacked = sum(x["wrong_results"] for x in rounds), max(x["unacked"] for x in rounds)
    counters = r.get("broker_counters", {})
    hosts = r.get("hosts", {})
    dropped = counters.get("agents_silent", 0) + counters.get("unknown_agent_messages", 0)
    out = [
        (f"N={n}: every result back and right", items == expected and wrong == 0,
         f"{items:,} of {expected:,} items in {len(rounds)} rounds, {wrong} wrong"),
        (f"N={n}: every result acknowledged", unacked == 0 and hosts.get("pending_results", 0) == 0,
         f"unacked {unacked}, pending {hosts.get('pending_results', 0)}"),
        (f"N={n}: no agent dropped or re-registered", dropped == 0 and hosts.get("hellos", 0) == n,
         (f"agents_silent {counters.get('agents_silent', 0)}, unknown_agent_messages "
          f"{counters.get('unknown_agent_messages', 0)}, HELLOs {hosts.get('hellos', 0)} for {n} agents")),
    ]
    if n == BAR_AGENTS_THROUGHPUT:
        out.append((f"N={n}: >= {THROUGHPUT_BAR:,} tasks/s", (r["tasks_per_s"] or 0) >= THROUGHPUT_BAR,
                    f"{r['tasks_per_s'] or 0:,} tasks/s"))
    if n == BAR_AGENTS_IDLE:
        out.append((f"N={n}: idle broker CPU < {IDLE_BAR_PCT:g} % of a core", r["idle_cpu_pct"] < IDLE_BAR_PCT,
                    f"{r['idle_cpu_pct']} %"))
    cost = r.get("dashboard_cost")
    if cost:  # issue 13: the dashboard open costs the broker < 5 % of its throughput, its pages fed
        out.append((f"N={n}: {cost['watchers']} dashboard(s) open cost < 5 % of throughput (medians, alternating)",
                    cost["throughput_ratio"] >= 0.95 and cost["snapshots"] > 0,
                    (f"{cost['tasks_per_s'][0]:,.0f} -> {cost['tasks_per_s'][1]:,.0f} tasks/s "
                     f"({cost['throughput_ratio']:.3f}x); broker {cost['broker_cpu_us_per_task'][0]:.2f} -> "
                     f"{cost['broker_cpu_us_per_task'][1]:.2f} us a task ({cost['broker_us_ratio']:.3f}x)")))
    return out


def print_profile(profile: dict[str, Any], most: int | None = None) -> None:
    """A py-spy profile's functions (``most`` at the most), by own time, then by inclusive time."""
    for f, pct in profile.get("own", [])[:most]:
        print(f"    {pct:5.1f} %  {f}")
    print("  inclusive:")
    for f, pct in profile.get("inclusive", [])[:most]:
        print(f"    {pct:5.1f} %  {f}")


def print_report(results: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    base = next((r for r in results if r["agents"] == 1 and "broken" not in r), None)
    for r in results:
        if base is not None and "broken" not in r and r["agents"] > 1:
            r["rss_per_agent_kib"] = round((r["rss_mib"] - base["rss_mib"]) * 1024 / r["agents"], 1)
    print(f"\n{'agents':>7}{'tasks/s':>10}{'idle CPU %':>11}{'RSS MiB':>9}{'KiB/agent':>10}{'after MiB':>10}"
          f"{'fair':>6}{'tasks/msg':>10}{'us/task':>8}{'1-core cap':>11}   CPU % over the run: broker, hosts, "
          f"producers, machine")
    for r in results:
        if "broken" in r:
            print(f"{r['agents']:>7}  BROKEN: {r['broken']}")
            continue
        tp = r["throughput"]
        c = tp["cpu_pct"]
        print(f"{r['agents']:>7}{r['tasks_per_s'] or 0:>10,}{r['idle_cpu_pct']:>11}{r['rss_mib']:>9}"
              f"{r.get('rss_per_agent_kib', '-')!s:>10}{r['rss_after_mib']:>10}{r['fair_min_max']!s:>6}"
              f"{tp['tasks_per_tasks_msg']!s:>10}{tp['broker_cpu_us_per_task']:>8}{r['broker_cap_tasks_per_s']:>11,}"
              f"   {c['broker']}, {c['hosts']}, {c['producers']}, {c['machine']}")
    print(f"\n(tasks/s: {args.producers} producers x {args.tasks:,} tasks, chunksize {args.chunksize}; fair: min/max "
          f"of the producers' completed tasks while all ran; tasks/msg: tasks per TASKS message the agents got; "
          f"us/task: broker CPU per task; 1-core cap: 1 s / us/task, what the broker could route with a core of "
          f"its own at that batching; the median of {args.repeats} rounds)")
    for r in results:
        if "broken" in r:
            print(f"\nN={r['agents']}:\n{r.get('traceback', '')}\nbroker log: {r.get('log_tail')}")
            continue
        tp = r["throughput"]
        d = tp["counters_delta"]
        print(f"\nN={r['agents']}: connected in {r['connect_s']} s; idle hosts' CPU {r['idle_hosts_cpu_pct']} %; "
              f"longest heartbeat gap {r['hosts'].get('max_beat_gap_s')} s; broker RLIMIT_NOFILE "
              f"{r['broker_nofile'][0]}; agents given tasks {tp['agents_with_tasks']}; fair shares "
              f"{tp['fair_shares']} over {tp['fair_window_s']} s")
        each = [(x["tasks_per_s"], x["tasks_per_tasks_msg"], x["broker_cpu_us_per_task"], x["fair_min_max"])
                for x in r["rounds"]]
        print(f"  rounds (tasks/s, tasks per TASKS message, broker us/task, fair): {each}")
        print(f"  broker messages in the run: frontend {d.get('messages_frontend', 0):,}, backend "
              f"{d.get('messages_backend', 0):,}, collector {d.get('messages_collector', 0):,}; sent to producers "
              f"{d.get('sent_frontend', 0):,}, to agents {d.get('sent_backend', 0):,}; "
              f"host counters {r['hosts'].get('counters')}")
        print(f"  broker CPU by thread, idle: {r['idle_threads_pct']} %; over the run: {tp['broker_threads_pct']} %"
              f" (loop: the Python thread; zmq_io: ZeroMQ's I/O threads, CurveZMQ included)")
        rounds = [x["rss_end_mib"] for x in r["rounds"]] + ([r["profiled"]["rss_end_mib"]] if "profiled" in r else [])
        print(f"  broker RSS (MiB) idle {r['rss_split_idle']}; after {r['rss_split_after']}; at the end of each "
              f"round {rounds}")
        odd = {k: v for k, v in r.get("broker_counters", {}).items()
               if not k.startswith(("messages_", "sent_", "auth_")) and k not in ("done", "submitted")}
        if odd:
            print(f"  other broker counters: {odd}")
        idle = r.get("idle_profile")
        if idle:
            print(f"  py-spy on the idle broker ({idle.get('samples', 0)} samples at 1,000 Hz over "
                  f"{args.profile_seconds:g} s: the loop's active time only): own time")
            print_profile(idle, 8)
        prof = r.get("profiled", {}).get("profile")
        if prof:
            p = r["profiled"]
            print(f"  py-spy on the broker ({prof.get('samples', 0)} samples at 200 Hz over {args.profile_seconds:g} s,"
                  f" profiled round {p['tasks_per_s']:,} tasks/s): own time")
            print_profile(prof)
    ok = True
    print()
    for r in results:
        ok = print_verdicts(checks(r)) and ok
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", help="comma list of agent counts (1,10,100,1000; 1,10,100 with --quick)")
    ap.add_argument("--quick", action="store_true", help="N = 1, 10, 100; shorter runs, no profile")
    ap.add_argument("--insecure", action="store_true", help="plaintext, no authentication (default: CurveZMQ)")
    ap.add_argument("--hosts", type=int, default=2, help="processes hosting the simulated agents (2)")
    ap.add_argument("--workers", type=int, default=2, help="workers each simulated agent announces (2)")
    ap.add_argument("--producers", type=int, default=2, help="zpar.Client producers, one process each (2)")
    ap.add_argument("--tasks", type=int, help="tasks each producer maps (200,000; 50,000 with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed throughput rounds for each N; the median is "
                                                           "reported (the lower of two), every one listed (3)")
    ap.add_argument("--chunksize", type=int, default=1, help="the producers' map chunksize (1: one task an item)")
    ap.add_argument("--warm", type=int, default=5000, help="tasks of each producer's warm-up map (5,000)")
    ap.add_argument("--heartbeat", type=float, default=1.0, help="the broker's heartbeat (1 s, its default)")
    ap.add_argument("--liveness", type=int, default=3)
    ap.add_argument("--idle-window", type=float, help="seconds of idle CPU sampling (10; 5 with --quick)")
    ap.add_argument("--profile", help="agent counts to profile the broker at with py-spy (100,1000; none with "
                                      "--quick; 'none')")
    ap.add_argument("--profile-seconds", type=float, default=5.0)
    ap.add_argument("--broker-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the broker alone, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds for one throughput round (300)")
    ap.add_argument("--watchers", type=int, default=0, help="dashboard pages open (each reading /api/events) "
                    "in every other throughput round, to measure what the dashboard costs (0: none)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--host", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--producer", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.host:
        return host_main(args.host)
    if args.producer:
        return producer_main(args.producer)
    args.agents = [int(x) for x in (args.agents or ("1,10,100" if args.quick else "1,10,100,1000")).split(",")]
    args.tasks = args.tasks or (50_000 if args.quick else 200_000)
    if args.chunksize > 1:  # whole chunks: the simulated agents answer each chunk with chunksize Nones
        args.tasks = -(-args.tasks // args.chunksize) * args.chunksize
        args.warm = -(-args.warm // args.chunksize) * args.chunksize
    args.idle_window = args.idle_window or (5.0 if args.quick else 10.0)
    profile = args.profile or ("none" if args.quick else "100,1000")
    args.profile = [] if profile == "none" else [int(x) for x in profile.split(",")]
    # SIGTERM as Ctrl-C: the finally blocks kill every process group started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    private_config_home()
    nofile = raise_nofile()  # inherited by the broker, the hosts and the producers
    from zpar import security

    security.client_credentials("agent", insecure=args.insecure)  # this user's secret, made once before the rest
    print(f"bench_scale: one broker ({'--insecure' if args.insecure else 'CurveZMQ, this user secret'}, heartbeat "
          f"{args.heartbeat:g} s) against N simulated agents ({args.hosts} host processes, {args.workers} workers "
          f"each), N = {', '.join(map(str, args.agents))}; {args.producers} producers x {args.tasks:,} tasks, "
          f"chunksize {args.chunksize}; RLIMIT_NOFILE {nofile[0]}; {psutil.cpu_count()} cores, python "
          f"{sys.version.split()[0]}", flush=True)
    workdir = tempfile.mkdtemp(prefix="zpar-bench-scale-")
    results: list[dict[str, Any]] = []
    code = 2
    try:
        for n in args.agents:
            t = now()
            results.append(run_n(n, args, workdir))
            r = results[-1]
            print(f"  N={n}: done in {now() - t:.0f} s"
                  + (f" (BROKEN: {r['broken']})" if "broken" in r else
                     f": {r['tasks_per_s']:,} tasks/s, idle {r['idle_cpu_pct']} %, RSS {r['rss_mib']} MiB"),
                  flush=True)
        ok = print_report(results, args)
        code = 2 if any("broken" in r for r in results) else (0 if ok else 1)
    finally:
        code = finish_run(args, workdir, results, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
