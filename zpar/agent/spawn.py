"""How an agent starts its workers, and workers started before the agent exists.

A worker is ``python -m zpar.agent.worker ENDPOINT IDENTITY PARENT_PID``; its
start (an interpreter, then zmq, msgpack and cloudpickle) takes about as long
as the agent's own. The embedded cluster's hub (``zpar_broker.embedded``)
therefore starts its workers first thing, before it imports the broker and
the agent, so the two starts overlap: ``prestart`` makes the agent's private
directory and starts the first workers; the agent binds the workers' pipe
there and adopts each by its identity when its core asks for that worker
(``Prestarted.take``). A worker connecting before the pipe is bound retries
every few milliseconds (``RECONNECT_IVL``).

Standard library only (and zpar._ipc's private directories): the hub imports this before anything heavy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

from .._ipc import private_dir

#: Milliseconds between a worker's tries to reach its agent's pipe (bound a moment after a prestart).
RECONNECT_IVL = 5


def worker_identity(generation: int) -> bytes:
    """The routing identity of the agent's ``generation``-th worker (w1, w2, ...)."""
    return f"w{generation}".encode()


def worker_command(endpoint: str, identity: bytes, parent_pid: int, chunk: bool) -> list[str]:
    """The command line of a worker of the agent ``parent_pid`` (``chunk``: its results cross CurveZMQ)."""
    return [sys.executable, "-m", "zpar.agent.worker", endpoint, identity.decode(), str(parent_pid),
            *(["--chunk"] if chunk else [])]


def start_worker(endpoint: str, identity: bytes, chunk: bool) -> subprocess.Popen[bytes]:
    """Start a worker of this process."""
    return subprocess.Popen(worker_command(endpoint, identity, os.getpid(), chunk), stdin=subprocess.DEVNULL)


def pipe_endpoint(rundir: str) -> str:
    """The endpoint of the workers' pipe in the agent's private directory."""
    return f"ipc://{rundir}/workers"


@dataclass
class Prestarted:
    """The agent's private directory, and workers started before the agent, by identity."""

    rundir: str
    procs: dict[bytes, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return pipe_endpoint(self.rundir)

    def take(self, identity: bytes) -> subprocess.Popen[bytes] | None:
        """The worker started for ``identity``, now the agent's (None: start one)."""
        return self.procs.pop(identity, None)

    def stop(self) -> None:
        """Stop the workers no agent took (the agent failed to start)."""
        for proc in self.procs.values():
            proc.kill()
            proc.wait()
        self.procs.clear()


def prestart(count: int) -> Prestarted:
    """A private directory (0700 whatever the umask) and ``count`` workers started for it, in plaintext."""
    started = Prestarted(private_dir("zpar-agent-"))
    try:
        for generation in range(1, count + 1):
            identity = worker_identity(generation)
            started.procs[identity] = start_worker(started.endpoint, identity, chunk=False)
    except BaseException:
        started.stop()
        raise
    return started
