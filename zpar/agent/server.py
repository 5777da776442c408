"""The agent's I/O shell: one poll loop over the broker, the workers, their deaths and signals.

::

    broker (uplink: DEALER + PUSH, or a call) ◀──▶ AgentCore(now, event) ──▶ ROUTER ◀──▶ worker 1..N (DEALER, ipc)
    SIGTERM/SIGINT ─▶ wake-up fd ─────────────────────▲
    pidfd of each worker ─────────────────────────────┘  its death, at once

Every rule and timer is the core's (``core.AgentCore``): this shell decodes
what arrives, hands it to the core with the time, and performs the actions
the core returns (send, spawn, signal, measure, stop). Workers are fresh
interpreters (``python -m zpar.agent.worker``): the agent holds a ZeroMQ
context and so never forks (the embedded hub forks its first workers before it
has one, and the agent adopts them: ``spawn.prestart``).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import zmq

from zpar import _ipc, security
from zpar import protocol as P
from zpar._loop import Reader, Waker, run_loop, run_until_signalled
from zpar.config import AgentConfig
from zpar.errors import ProtocolError

from .actions import Action, Exit, Kill, Measure, Probe, Spawn, ToWorker
from .core import AgentCore, Settings
from .spawn import Prestarted, WorkerProcess, pipe_endpoint, start_worker
from .stats import NodeWatch
from .uplink import SocketUplink, Uplink, configure

log = logging.getLogger(__name__)


class AgentServer:
    """Owns the agent's sockets and worker processes.

    ``uplink`` is how it reaches the broker (default: sockets to
    ``config.broker``); ``poller`` and ``waker`` are shared when another part
    runs in the same loop (the embedded cluster).
    """

    def __init__(self, config: AgentConfig, *, uplink: Uplink | None = None,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None, poller: zmq.Poller | None = None,
                 waker: Waker | None = None, prestarted: Prestarted | None = None) -> None:
        self.config = config
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}"
        self.identity = uuid.uuid4().bytes
        self.core = AgentCore(_settings(config, self.name, self.identity), time.monotonic())
        # Two I/O threads: one decrypts what the broker sends while the other passes its parts on to a
        # worker (P.Part); the workers' pipe is the second's (AFFINITY), the broker's connections the first's.
        self.ctx = ctx or zmq.Context(io_threads=2)
        self._own_ctx = ctx is None
        # An empty setting is no setting: the credentials functions treat "" as None.
        self._creds = security.client_credentials("agent", secret=config.secret, secret_file=config.secret_file,
                                                  key_file=config.key_file, broker_key=config.broker_key,
                                                  insecure=config.insecure, address=config.broker)
        self.uplink = uplink or SocketUplink(self.ctx, config.broker, self.identity, config.max_message_size,
                                             self._creds)
        self.exit_code = 0
        self._exiting = False  # the core said Exit: the loop stops at its next turn
        # 0700: only we reach our workers (a hub may have made it, and started workers for it: spawn.prestart)
        self._prestarted = prestarted
        if prestarted is None:
            _ipc.sweep("zpar-agent-")  # what agents killed by SIGKILL left
        self.rundir = prestarted.rundir if prestarted is not None else _ipc.private_dir("zpar-agent-")
        self.pipe = configure(self.ctx.socket(zmq.ROUTER), config.max_message_size)
        if self._own_ctx:
            self.pipe.setsockopt(zmq.AFFINITY, 2)
        self._pipe_reader = Reader(self.pipe, self._on_worker, log)
        up = self.uplink.socket()
        self._uplink_reader = Reader(up, self._on_broker_frames, log) if up is not None else None
        self.pipe.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.pipe_endpoint = pipe_endpoint(self.rundir)
        _ipc.bind(self.pipe, self.pipe_endpoint)  # 0600 whatever the umask, in a 0700 directory
        self.poller = poller or zmq.Poller()
        self._own_waker = waker is None
        self._waker = waker or Waker()
        # SIGTERM/SIGINT reach the loop through this socket pair, in order with messages and deaths.
        self._signal_r, self._signal_w = socket.socketpair()
        self._signal_r.setblocking(False)
        self._signal_w.setblocking(False)
        self._signals = self._signals_seen = 0
        self.poller.register(self.pipe, zmq.POLLIN)
        if up is not None:
            self.poller.register(up, zmq.POLLIN)
        self.poller.register(self._waker.fileno(), zmq.POLLIN)
        self.poller.register(self._signal_r.fileno(), zmq.POLLIN)
        self.procs: dict[int, tuple[bytes, WorkerProcess]] = {}  # pidfd -> (identity, process)
        self._watch = NodeWatch()  # the load its heartbeats carry
        self._pidfds: dict[bytes, int] = {}  # identity -> pidfd

    # ------------------------------------------------------------------ the loop's part

    def stop(self) -> None:
        """SIGTERM or SIGINT (safe from a signal handler or another thread): the core decides what it means."""
        self._signals += 1
        try:
            self._signal_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def run(self) -> None:
        run_loop([self], self.poller, self._waker)

    def start(self) -> None:
        now = time.monotonic()
        self._perform(self.core.start(now), now)
        if self._prestarted is not None:
            self._prestarted.stop()  # any its core did not ask for
        log.info("zpar-agent %s: %d workers, broker %s", self.name, len(self.procs), self.config.broker)

    def handle(self, events: dict[Any, int]) -> None:
        if self._signal_r.fileno() in events:
            self._take_signals()
        for fd in [fd for fd in events if fd in self.procs]:
            self._reap(fd)
        if self.pipe in events:
            self._pipe_reader.drain()
        if self._uplink_reader is not None and self._uplink_reader.sock in events:
            self._uplink_reader.drain()
        self._flush(time.monotonic())

    def next_deadline(self) -> float:
        return self.core.next_deadline()

    def on_timers(self, now: float) -> bool:
        if not self._exiting:
            self._perform(self.core.tick(now), now)
        return self._exiting

    def shutdown(self) -> None:
        """Stop the workers (the core says how); nothing is left running."""
        now = time.monotonic()
        self._perform(self.core.shutdown(now), now)
        poller = zmq.Poller()  # deaths only: unread messages must not make this loop spin
        for fd in self.procs:
            poller.register(fd, zmq.POLLIN)
        while self.procs:
            timeout = max(0.0, self.core.next_deadline() - time.monotonic())
            for fd, _ in poller.poll(int(min(timeout, 1.0) * 1000) + 1):
                poller.unregister(fd)
                self._reap(fd)
            now = time.monotonic()
            self._perform(self.core.tick(now), now)

    def close(self) -> None:
        self.uplink.close()
        self.pipe.close(linger=500)
        if self._own_ctx:
            self.ctx.term()
        if self._own_waker:
            self._waker.close()
        self._signal_r.close()
        self._signal_w.close()
        shutil.rmtree(self.rundir, ignore_errors=True)

    # ------------------------------------------------------------------ events in

    def _take_signals(self) -> None:
        try:
            while self._signal_r.recv(64):
                pass
        except BlockingIOError:
            pass
        while self._signals_seen < self._signals:
            self._signals_seen += 1
            now = time.monotonic()
            self._perform(self.core.signalled(now), now)

    def _reap(self, fd: int) -> None:
        self.poller.unregister(fd)
        os.close(fd)
        identity, proc = self.procs.pop(fd)
        del self._pidfds[identity]
        code = proc.wait()
        now = time.monotonic()
        self._perform(self.core.worker_exited(now, identity, proc.pid, code), now)

    def _on_worker(self, frames: list[zmq.Frame]) -> None:
        try:
            identity, msg = P.decode_routed(frames)
        except ProtocolError as exc:
            log.error("worker %s sent a bad message: %s", frames[0].bytes.decode(errors="replace"), exc)
            return
        now = time.monotonic()
        if isinstance(msg, P.Result):
            pid = self.core.rss_wanted(now, identity)
            if pid:
                self._perform(self.core.rss_after_task(now, identity, _rss(pid)), now)
        self._perform(self.core.from_worker(now, identity, msg), now)

    def _on_broker_frames(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = P.decode(frames)
        except ProtocolError as exc:
            log.error("dropped a bad message from the broker: %s", exc)
            return
        self.from_broker(msg)

    def from_broker(self, msg: P.Message) -> None:
        """A message from the broker, decoded (called directly by an in-process broker)."""
        if isinstance(msg, P.Welcome):
            self.uplink.welcomed(msg)  # connect the collector it names before anything goes there
        now = time.monotonic()
        self._perform(self.core.from_broker(now, msg), now)

    # ------------------------------------------------------------------ actions out

    def _perform(self, actions: Sequence[Action], now: float) -> None:
        """Do what the core asked, in order; runs the collector cannot take now go back to the core."""
        if not actions:
            return
        unsent: list[P.Result | P.Items] = []
        for action in actions:
            if isinstance(action, ToWorker):
                self._to_worker(action)
            elif isinstance(action, (P.Result, P.Items)):
                if unsent or not self.uplink.send_results(action):
                    unsent.append(action)  # and all after it: they stay in order
            elif isinstance(action, Kill):
                self._signal(action)
            elif isinstance(action, Spawn):
                self._spawn(action.identity)
            elif isinstance(action, Measure):
                self._perform(self.core.rss_while_busy(now, action.identity, _rss(action.pid)), now)
            elif isinstance(action, Probe):
                self._perform(self.core.probed(now, self.uplink.auth_failure(), os.getppid()), now)
            elif isinstance(action, Exit):
                if not self._exiting:
                    self._exiting, self.exit_code = True, action.code
            elif isinstance(action, P.Heartbeat):  # with the node's load, for the broker's dashboard
                self.uplink.send(P.Heartbeat(action.busy, self._watch.stats(p.pid for _, p in self.procs.values())))
            else:
                self.uplink.send(action)
        if unsent:
            self.core.unsent(now, unsent)

    def _flush(self, now: float) -> None:
        """Send what piled up for the collector while it takes it, then the credits to ask."""
        while (run := self.core.next_run(now)) is not None:
            if not self.uplink.send_results(run):
                self.core.unsent(now, [run])  # not now: the core keeps it, first in line
                break
        self._perform(self.core.credits(now), now)

    def _to_worker(self, send: ToWorker) -> None:
        try:
            self.pipe.send_multipart(P.encode_routed(send.identity, send.msg), copy=False)
        except zmq.ZMQError as exc:  # it died just now; its pidfd will report the batch
            log.warning("could not reach worker %s: %s", send.identity.decode(), exc)

    def _spawn(self, identity: bytes) -> None:
        proc = self._prestarted.take(identity) if self._prestarted is not None else None
        if proc is None:
            proc = start_worker(self.pipe_endpoint, identity, chunk=self._creds is not None)
        fd = os.pidfd_open(proc.pid)
        self.procs[fd] = (identity, proc)
        self._pidfds[identity] = fd
        self.poller.register(fd, zmq.POLLIN)
        log.debug("started worker %s pid %d", identity.decode(), proc.pid)

    def _signal(self, kill: Kill) -> None:
        fd = self._pidfds.get(kill.identity)
        if fd is not None:
            self.procs[fd][1].send_signal(kill.signum)  # a no-op once it has been reaped


def _settings(config: AgentConfig, name: str, identity: bytes) -> Settings:
    """The core's settings for an agent of ``config`` on this host."""
    return Settings(node=name, identity=identity, host=socket.gethostname(), pid=os.getpid(),
                    workers=config.worker_count(), heartbeat=config.heartbeat, liveness=config.liveness,
                    max_tasks_per_worker=config.max_tasks_per_worker,
                    max_memory_per_worker=config.max_memory_per_worker, grace=config.grace,
                    parent_pid=config.parent_pid, broker=config.broker, resources=config.resources)


def _rss(pid: int) -> int:
    """Resident bytes of process ``pid``; 0 if it is gone."""
    import psutil  # here: only a memory limit needs it, and it is 10 ms of the agent's start

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def run(config: AgentConfig) -> int:
    """Run an agent until SIGTERM or SIGINT; returns the process exit code."""
    return run_until_signalled(AgentServer(config))
