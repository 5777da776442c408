"""The agent's I/O shell: one poll loop over the broker, the workers and their deaths.

::

    broker (uplink: DEALER + PUSH, or a call) ◀──▶ AgentCore(event) ──▶ ROUTER ◀──▶ worker 1..N (DEALER, ipc)
    SIGTERM/SIGINT ─▶ wake-up fd                      ▲
    pidfd of each worker ─────────────────────────────┘  its death, at once
    timers: heartbeat, parent check, respawn back-off

Workers are fresh interpreters (``python -m zpar.agent.worker``): the agent holds a
ZeroMQ context and so never forks.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import psutil
import zmq

from zpar import protocol as P
from zpar import security
from zpar.config import AgentConfig
from zpar._loop import Reader, Waker, run_loop, run_until_signalled
from zpar.errors import ProtocolError

from .core import AgentCore
from .outbox import Unacked
from .slots import ToWorker, WorkerState
from .uplink import SocketUplink, Uplink, configure

log = logging.getLogger(__name__)

_GRACE = 3.0  # seconds a worker gets to exit after SIGTERM before SIGKILL
_MEMORY_CHECK_S = 0.1  # how often busy workers' memory is read, when there is a limit


class AgentServer:
    """Owns the agent's sockets and worker processes.

    ``uplink`` is how it reaches the broker (default: sockets to
    ``config.broker``); ``poller`` and ``waker`` are shared when another part
    runs in the same loop (the embedded cluster).
    """

    def __init__(self, config: AgentConfig, *, uplink: Uplink | None = None, ctx: zmq.Context | None = None,
                 poller: zmq.Poller | None = None, waker: Waker | None = None) -> None:
        self.config = config
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}"
        self.core = AgentCore(self.name, max_tasks_per_worker=config.max_tasks_per_worker)
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.identity = uuid.uuid4().bytes
        # An empty setting is no setting: the credentials functions treat "" as None.
        self._creds = security.client_credentials("agent", secret=config.secret, secret_file=config.secret_file,
                                                  key_file=config.key_file, broker_key=config.broker_key)
        self.uplink = uplink or SocketUplink(self.ctx, config.broker, self.identity, config.max_message_size,
                                             self._creds)
        self.exit_code = 0
        self.rundir = tempfile.mkdtemp(prefix="zpar-agent-")  # 0700: only we reach our workers
        self.pipe = configure(self.ctx.socket(zmq.ROUTER), config.max_message_size)
        self._pipe_reader = Reader(self.pipe, self._on_worker, log)
        up = self.uplink.socket()
        self._uplink_reader = Reader(up, self._on_broker_frames, log) if up is not None else None
        self.pipe.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.pipe_endpoint = f"ipc://{self.rundir}/workers"
        self.pipe.bind(self.pipe_endpoint)
        self.poller = poller or zmq.Poller()
        self._own_waker = waker is None
        self._waker = waker or Waker()
        self.poller.register(self.pipe, zmq.POLLIN)
        if self.uplink.socket() is not None:
            self.poller.register(self.uplink.socket(), zmq.POLLIN)
        self.poller.register(self._waker.fileno(), zmq.POLLIN)
        self.procs: dict[int, tuple[bytes, subprocess.Popen]] = {}  # pidfd -> (identity, process)
        self._kill_at: dict[bytes, float] = {}  # worker -> when SIGTERM turns into SIGKILL
        self._rss_checked: dict[bytes, float] = {}
        self._next_memory_check = time.monotonic() if config.max_memory_per_worker else float("inf")
        self.epoch = ""  # of the broker that welcomed us
        self.unacked = Unacked()
        self._stop_requests = 0
        self._drain_until = 0.0
        self._generation = 0
        self._respawn_at: list[float] = []
        self._backoff = 0.1
        self.heartbeat = config.heartbeat
        self.liveness = config.liveness
        self._next_beat = time.monotonic()
        self._last_broker = time.monotonic()
        self._welcomed = False
        self._stopping = False

    # ------------------------------------------------------------------ workers

    def _spawn(self) -> None:
        self._generation += 1
        identity = f"w{self._generation}".encode()
        proc = subprocess.Popen(
            [sys.executable, "-m", "zpar.agent.worker", self.pipe_endpoint, identity.decode(), str(os.getpid()),
             *(["--chunk"] if self._creds is not None else [])],
            stdin=subprocess.DEVNULL,
        )
        fd = os.pidfd_open(proc.pid)
        self.procs[fd] = (identity, proc)
        self.poller.register(fd, zmq.POLLIN)
        self.core.add_worker(identity)
        log.debug("started worker %s pid %d", identity.decode(), proc.pid)

    def _reap(self, fd: int) -> None:
        self.poller.unregister(fd)
        os.close(fd)
        identity, proc = self.procs.pop(fd)
        code = proc.wait()
        self._kill_at.pop(identity, None)
        self._rss_checked.pop(identity, None)
        slot = self.core.workers.get(identity)
        never_started = slot is not None and slot.state is WorkerState.STARTING
        self.core.worker_exited(identity, code)
        if self._stopping:
            return
        if never_started:  # a worker that cannot even start: back off instead of spinning
            log.error("worker pid %d exited with %d before it was ready; retrying in %.1f s",
                      proc.pid, code, self._backoff)
            self._respawn_at.append(time.monotonic() + self._backoff)
            self._backoff = min(self._backoff * 2, 10.0)
        else:
            self._spawn()

    def _to_workers(self, sends: list[ToWorker]) -> None:
        for s in sends:
            try:
                self.pipe.send_multipart(P.encode_routed(s.identity, s.msg), copy=False)
            except zmq.ZMQError as exc:  # it died just now; its pidfd will report the batch
                log.warning("could not reach worker %s: %s", s.identity.decode(), exc)
        for identity in self.core.retiring():
            log.info("recycling worker %s", identity.decode())
            try:
                self.pipe.send_multipart(P.encode_routed(identity, P.Bye(P.ByeReason.RECYCLED)))
            except zmq.ZMQError:
                pass

    def _kill(self, identity: bytes, why: str, level: int = logging.WARNING) -> None:
        """SIGTERM now, SIGKILL after a grace second if it is still there."""
        for ident, proc in self.procs.values():
            if ident == identity:
                log.log(level, "stopping worker pid %d: %s", proc.pid, why)
                proc.terminate()
                self._kill_at[identity] = time.monotonic() + 1.0

    def _check_memory(self, identity: bytes, now: float) -> None:
        """Recycle a worker whose RSS passed the limit (checked between tasks, at most 10 times a second)."""
        limit = self.config.max_memory_per_worker
        if not limit or now - self._rss_checked.get(identity, 0.0) < _MEMORY_CHECK_S:
            return
        self._rss_checked[identity] = now
        slot = self.core.workers.get(identity)
        if slot is None or not slot.pid:
            return
        rss = _rss(slot.pid)
        if rss > limit * 1024 * 1024:
            log.info("worker pid %d uses %d MiB, over the %d MiB limit: recycling it", slot.pid, rss >> 20, limit)
            self.core.retire(identity)

    # ------------------------------------------------------------------ loop

    def stop(self) -> None:
        """First call: drain (no new work; running tasks get ``grace`` seconds). Second: stop now."""
        self._stop_requests += 1
        if self._stop_requests == 1 and self.config.grace > 0:
            self._drain_until = time.monotonic() + self.config.grace
            self._next_beat = time.monotonic()  # let the timers notice at once
        else:
            self._waker.wake()

    def run(self) -> None:
        run_loop([self], self.poller, self._waker)

    def start(self) -> None:
        for _ in range(self.config.worker_count()):
            self._spawn()
        self._hello()
        log.info("zpar-agent %s: %d workers, broker %s", self.name, len(self.procs), self.config.broker)

    def handle(self, events: dict[Any, int]) -> None:
        for fd in [fd for fd in events if fd in self.procs]:
            self._reap(fd)
        if self.pipe in events:
            self._pipe_reader.drain()
        if self._uplink_reader is not None and self._uplink_reader.sock in events:
            self._uplink_reader.drain()
        self._flush()

    def next_deadline(self) -> float:
        return min([self._next_beat, *self._respawn_at, *self._kill_at.values(), self.core.next_deadline(),
                    self._next_memory_check])

    def _memory_watchdog(self, now: float) -> None:
        """Stop a task whose worker passed 1.5x the memory limit, before the kernel's OOM killer acts."""
        self._next_memory_check = now + _MEMORY_CHECK_S
        hard = self.config.max_memory_per_worker * 1024 * 1024 * 3 // 2
        for slot in list(self.core.workers.values()):
            if slot.state is not WorkerState.BUSY or not slot.pid:
                continue
            rss = _rss(slot.pid)
            if rss > hard:
                detail = (f"used {rss >> 20} MiB, past the hard limit of {hard >> 20} MiB "
                          "(1.5 x --max-memory-per-worker)")
                if self.core.over_memory(slot.identity, detail):
                    self._kill(slot.identity, "over the memory limit")

    def on_timers(self, now: float) -> bool:
        if now >= self._next_memory_check:
            self._memory_watchdog(now)
        for identity in self.core.expired(now):
            self._kill(identity, "its task ran past its timeout")
        for identity, when in list(self._kill_at.items()):
            if when <= now:
                del self._kill_at[identity]
                for ident, proc in self.procs.values():
                    if ident == identity and proc.poll() is None:
                        proc.kill()
        if self._drain_until and self._drain(now):
            return True
        due = [t for t in self._respawn_at if t <= now]
        if due:
            self._respawn_at = [t for t in self._respawn_at if t > now]
            for _ in due:
                self._spawn()
        if now < self._next_beat:
            return False
        self._next_beat = now + self.heartbeat
        failure = self.uplink.auth_failure()
        if failure:
            log.error("refused by the broker (AuthenticationError): %s; stopping", failure)
            self.exit_code = 1
            return True
        self.uplink.send(P.Heartbeat(self.core.busy()))
        if self._welcomed:  # results the broker has not acknowledged for a while: lost on the way?
            for entries in self.unacked.take(now, older_than=self.heartbeat * self.liveness):
                self.uplink.send_results(P.Result(tuple(entries), self.identity, self.epoch))
        if now - self._last_broker > self.heartbeat * self.liveness:
            # The broker went quiet (restarting?): introduce ourselves again.
            log.warning("no word from the broker for %.1f s; saying HELLO again", now - self._last_broker)
            self._last_broker = now
            self._hello()
        parent = self.config.parent_pid
        if parent and os.getppid() != parent:
            log.warning("parent process %d is gone; stopping", parent)
            return True
        return False

    def _drain(self, now: float) -> bool:
        """Draining: take no new work; True once nothing is held or the grace is over."""
        if self.core.accepting:
            log.info("draining: finishing %d tasks within %.0f s (signal again to stop now)",
                     self.core.held(), self._drain_until - now)
            self.core.accepting = False
        return self.core.held() == 0 or now >= self._drain_until

    def _hello(self) -> None:
        self._welcomed = False
        self.core.reset_credits()
        workers = sum(1 for s in self.core.workers.values() if s.state is not WorkerState.EXITED)
        self.uplink.send(P.Hello(P.Role.AGENT, self.name, socket.gethostname(), os.getpid(), workers))

    def _on_worker(self, frames: list[zmq.Frame]) -> None:
        try:
            identity, msg = P.decode_routed(frames)
        except ProtocolError as exc:
            log.error("worker %s sent a bad message: %s", frames[0].bytes.decode(errors="replace"), exc)
            return
        now = time.monotonic()
        if isinstance(msg, P.Result):
            self._check_memory(identity, now)
            self._to_workers(self.core.worker_results(identity, msg, now))
        elif isinstance(msg, P.Items):
            self.core.worker_items(identity, msg)
        elif isinstance(msg, P.Hello):
            self._backoff = 0.1  # workers start again: forget earlier failures
            self._to_workers(self.core.worker_ready(identity, msg.pid, now))

    def _on_broker_frames(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = P.decode(frames)
        except ProtocolError as exc:
            log.error("dropped a bad message from the broker: %s", exc)
            return
        self.from_broker(msg)

    def from_broker(self, msg: P.Message) -> None:
        """A message from the broker, decoded (called directly by an in-process broker)."""
        self._last_broker = time.monotonic()
        if isinstance(msg, P.Tasks):
            self._to_workers(self.core.tasks(msg, time.monotonic()))
        elif isinstance(msg, P.Ack):
            self.unacked.acked(msg.ids)
        elif isinstance(msg, P.Feed):
            self._to_workers(self.core.feed(msg))
        elif isinstance(msg, P.Cancel):
            for identity in self.core.cancel(msg.ids):
                self._kill(identity, "its task was cancelled", logging.INFO)  # the user's own doing
        elif isinstance(msg, P.Welcome):
            self._welcome(msg)
        elif isinstance(msg, P.Error):
            log.warning("the broker refused a message (%s%s)", msg.code.name, f": {msg.detail}" if msg.detail else "")
            if msg.code is P.ErrorCode.UNKNOWN_PEER:
                self._hello()
        elif isinstance(msg, P.Bye) and msg.reason is P.ByeReason.KEY_REVOKED:
            log.error("refused by the broker (AuthenticationError): this node's key was removed from its "
                      "allow-list; stopping")
            self.exit_code = 1
            self._waker.wake()
        elif isinstance(msg, P.Bye):
            log.info("broker is stopping (%s); waiting for it to return", msg.reason.name.lower())
            self._welcomed = False

    def _welcome(self, msg: P.Welcome) -> None:
        if self.epoch and msg.epoch != self.epoch:
            log.warning("the broker restarted (epoch %s, was %s); dropping the %d tasks of the old one",
                        msg.epoch[:8], self.epoch[:8], self.core.held())
            for identity in self.core.forget_tasks():
                self._kill(identity, "its stream was for a broker that is gone")
            self.unacked.clear()
        elif self.epoch:  # the same broker, after we registered anew: what it may not have
            for entries in self.unacked.take(time.monotonic()):
                self.uplink.send_results(P.Result(tuple(entries), self.identity, msg.epoch))
        self.epoch = msg.epoch
        self.heartbeat, self.liveness = msg.heartbeat, msg.liveness  # the broker's pace wins
        self._next_beat = min(self._next_beat, time.monotonic() + self.heartbeat)
        self.uplink.welcomed(msg)
        self._welcomed = True
        log.info("registered with broker %s (epoch %s)", self.config.broker, msg.epoch[:8])

    def _flush(self) -> None:
        """Send what piled up: streams' items, then results to the collector, then credits to the broker."""
        blocked = False
        while (items := self.core.take_items()) is not None:
            ientries, icredits = items
            if not self.uplink.send_results(P.Items(tuple(ientries), tuple(icredits), self.identity, self.epoch)):
                self.core.put_back_items(ientries, icredits)  # not now; the results wait behind them
                blocked = True
                break
        while not blocked and (entries := self.core.take_results()) is not None:
            if not self.uplink.send_results(P.Result(tuple(entries), self.identity, self.epoch)):
                self.core.put_back_results(entries)  # not now: keep them, in order
                break
            self.unacked.sent(entries, time.monotonic())
        if self._welcomed and not self._stopping:
            n = self.core.credits_to_ask()
            if n:
                self.uplink.send(P.Ready(n))

    def shutdown(self) -> None:
        """Stop taking work, tell the broker, stop the workers; nothing is left running."""
        self._stopping = True
        self.core.accepting = False
        log.info("zpar-agent %s stopping", self.name)
        self.uplink.send(P.Bye(P.ByeReason.LEAVING))
        for _identity, proc in self.procs.values():
            proc.terminate()
        deadline = time.monotonic() + _GRACE
        while self.procs and time.monotonic() < deadline:
            for fd, _ in self.poller.poll(100):
                if fd in self.procs:
                    self._reap(fd)
        for fd in list(self.procs):
            self.procs[fd][1].kill()
            self._reap(fd)

    def close(self) -> None:
        self.uplink.close()
        self.pipe.close(linger=500)
        if self._own_ctx:
            self.ctx.term()
        if self._own_waker:
            self._waker.close()
        shutil.rmtree(self.rundir, ignore_errors=True)


def _rss(pid: int) -> int:
    """Resident bytes of process ``pid``; 0 if it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def run(config: AgentConfig) -> int:
    """Run an agent until SIGTERM or SIGINT; returns the process exit code."""
    return run_until_signalled(AgentServer(config))
