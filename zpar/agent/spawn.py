"""How an agent starts its workers, and workers started before the agent exists.

A worker is ``python -m zpar.agent.worker ENDPOINT IDENTITY PARENT_PID``; its
start (an interpreter, then zmq, msgpack and cloudpickle) takes about as long
as the agent's own. The embedded cluster's hub (``zpar_broker.embedded``)
therefore starts its workers first thing, before it imports the broker and
the agent: ``prestart`` makes the agent's private directory and starts the
first workers; the agent binds the workers' pipe there and adopts each by its
identity when its core asks for that worker (``Prestarted.take``). A worker
connecting before the pipe is bound retries every few milliseconds
(``RECONNECT_IVL``).

``prestart(fork=True)`` (the hub's way) imports the worker's modules once and
forks the workers from that warm process: no interpreter start and no import
per worker, so on a small machine they no longer compete with the hub for the
cores. Forking is safe only while the process has no thread and no ZeroMQ
context, so only the hub's first lines may ask for it. Workers started later
(a replacement after a crash, a recycled one) are fresh interpreters
(``start_worker``), as the agent holds a context by then.

Standard library only (and zpar._ipc's private directories) until a fork
asks for the worker's modules: the hub imports this before anything heavy.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .._ipc import private_dir

_PR_SET_NAME = 15

#: Milliseconds between a worker's tries to reach its agent's pipe (bound a moment after a prestart).
RECONNECT_IVL = 5


def worker_identity(generation: int) -> bytes:
    """The routing identity of the agent's ``generation``-th worker (w1, w2, ...)."""
    return f"w{generation}".encode()


class WorkerProcess(Protocol):
    """What the agent uses of a worker's process: a ``subprocess.Popen``, or a ``ForkedWorker``."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def start_worker(endpoint: str, identity: bytes, chunk: bool = False) -> subprocess.Popen[bytes]:
    """Start a worker of this process (a fresh interpreter: safe whatever this process holds); ``chunk``:
    its results cross CurveZMQ."""
    return subprocess.Popen([sys.executable, "-m", "zpar.agent.worker", endpoint, identity.decode(),
                             str(os.getpid()), *(["--chunk"] if chunk else [])], stdin=subprocess.DEVNULL)


class ForkedWorker:
    """A worker forked by this process, with the part of ``subprocess.Popen`` the agent uses.

    Exit codes read as Popen's do: a worker killed by a signal has ``-signum``.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and timeout is not None and not self._ends_within(timeout):
            raise subprocess.TimeoutExpired(f"zpar worker pid {self.pid}", timeout)
        while self.returncode is None:
            self._reap(0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a pid we reaped: the kernel may have given it to another
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _reap(self, options: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, options)
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): its status is lost, as Popen says 0
            self.returncode = 0
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def _ends_within(self, timeout: float) -> bool:
        try:
            fd = os.pidfd_open(self.pid)  # readable once the process has ended (a zombie too)
        except ProcessLookupError:  # reaped elsewhere already
            return True
        try:
            return bool(select.select([fd], [], [], max(0.0, timeout))[0])
        finally:
            os.close(fd)


def fork_worker(endpoint: str, identity: bytes) -> ForkedWorker:
    """Fork a worker of this process, which must have no thread and no ZeroMQ context (see ``prestart``)."""
    from . import worker  # before the fork: a child should not import it again

    parent = os.getpid()
    _flush_std_streams()  # what is buffered now is ours: a child must not write it again
    pid = os.fork()
    if pid:
        return ForkedWorker(pid)
    code = 1
    try:
        # As if started with -m: a worker is told by its __main__ (zpar.joblib does), ps and top name it.
        sys.modules["__main__"] = worker
        sys.argv = [worker.__file__ or "zpar.agent.worker", endpoint, identity.decode(), str(parent)]
        _set_process_name(f"zpar-worker-{identity.decode()}")
        gc.enable()  # the hub may start with it off (zpar_broker.embedded); a worker runs users' code
        worker.main(sys.argv[1:])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 - said on stderr, as an interpreter would before it exits
        import traceback

        traceback.print_exc()
    finally:
        # The hub's own cleanup (atexit, its finally clauses) is not ours: leave without running it,
        # but with what the tasks printed written out, as multiprocessing's forked children do.
        _flush_std_streams()
        os._exit(code)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _set_process_name(name: str) -> None:
    """The name ``ps``, ``top`` and ``pgrep`` show (Linux; 15 bytes): a forked worker keeps the hub's command line."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def pipe_endpoint(rundir: str) -> str:
    """The endpoint of the workers' pipe in the agent's private directory."""
    return f"ipc://{rundir}/workers"


@dataclass
class Prestarted:
    """The agent's private directory, and workers started before the agent, by identity."""

    rundir: str
    procs: dict[bytes, WorkerProcess] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return pipe_endpoint(self.rundir)

    def take(self, identity: bytes) -> WorkerProcess | None:
        """The worker started for ``identity``, now the agent's (None: start one)."""
        return self.procs.pop(identity, None)

    def stop(self) -> None:
        """Stop the workers no agent took (the agent failed to start)."""
        for proc in self.procs.values():
            proc.kill()
            proc.wait()
        self.procs.clear()


def prestart(count: int, *, fork: bool = False) -> Prestarted:
    """A private directory (0700 whatever the umask) and ``count`` workers started for it, in plaintext.

    ``fork``: fork them from this process, after importing what a worker
    needs. Only for a process that has started no thread and made no ZeroMQ
    context (the hub's first lines); one with a thread gets fresh interpreters.
    """
    started = Prestarted(private_dir("zpar-agent-"))
    start: Callable[[str, bytes], WorkerProcess] = start_worker
    if fork and threading.active_count() == 1:
        from . import worker  # noqa: F401 - imported once, here, rather than in each worker

        gc.freeze()  # what the workers inherit is never collected, so its pages stay shared with us
        start = fork_worker
    try:
        for generation in range(1, count + 1):
            identity = worker_identity(generation)
            started.procs[identity] = start(started.endpoint, identity)
    except BaseException:
        started.stop()
        raise
    return started
