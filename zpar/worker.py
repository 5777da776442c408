"""The worker loop: receive a batch, run each task, send the batch's results.

Started by the agent as ``python -m zpar.worker ENDPOINT IDENTITY PARENT_PID``.
A worker talks only to its agent, over one DEALER socket on an ipc pipe of its
own; the agent sends it work only while it is idle, so the agent always knows
which tasks a worker holds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Sequence

import zmq

from . import protocol as P
from . import serialize
from .errors import PayloadTooLarge, SerializationError, TaskError

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Exit when the agent dies, even by SIGKILL (Linux), else notice on idle polls."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


class Worker:
    def __init__(self, endpoint: str, identity: bytes, parent: int) -> None:
        self.parent = parent
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.funcs: dict[bytes, Callable[..., Any]] = {}
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(endpoint)

    def run(self) -> None:
        self.sock.send(P.encode(P.Hello(P.Role.WORKER, pid=self.pid, host=self.host)))
        while True:
            if not self.sock.poll(1000):
                if os.getppid() != self.parent:
                    return  # the agent is gone; nobody wants our results
                continue
            frames = self.sock.recv_multipart(copy=False)
            msg = P.decode(frames[0].buffer, len(frames) - 1)  # the agent is trusted
            if isinstance(msg, P.Bye):
                return
            if isinstance(msg, P.Tasks):
                entries, out = self.run_batch(msg, frames[1:])
                self.sock.send_multipart([P.encode(P.Result(tuple(entries))), *out], copy=False)

    def run_batch(self, msg: P.Tasks, frames: list[Any]) -> tuple[list[P.ResultEntry], list[Any]]:
        nf = len(msg.funcs)
        for d, blob in zip(msg.funcs, frames[:nf]):
            self._load_function(d, blob)
        pos = nf
        entries: list[P.ResultEntry] = []
        out: list[Any] = []
        for task in msg.tasks:
            tframes, pos = P.unpack_payload(task, frames, pos)
            start = time.perf_counter_ns()
            status, rframes = self._run_one(task, tframes)
            took = (time.perf_counter_ns() - start) // 1000
            nframes, data, payload = P.pack_payload(rframes)
            entries.append(P.ResultEntry(task.id, status, nframes, took, data))
            out.extend(payload)
        return entries, out

    def _load_function(self, d: bytes, blob: Any) -> None:
        if d in self.funcs:
            return
        try:
            self.funcs[d] = serialize.loads([blob], what="function")
        except Exception as exc:  # kept as a stand-in that raises, so each task reports it
            message, cause = str(exc), exc.__cause__

            def unloadable(*_a: Any, **_k: Any) -> Any:
                raise SerializationError(message) from cause  # a fresh error each call

            self.funcs[d] = unloadable

    def _run_one(self, task: P.TaskEntry, tframes: Sequence[Any]) -> tuple[P.Status, list[Any]]:
        try:
            fn = self.funcs[task.digest]
            payload = serialize.loads(tframes, what="task arguments")
            if task.flags & P.FLAG_CHUNK:
                value = [fn(*a) for a in payload]
            else:
                args, kwargs = payload
                value = fn(*args, **kwargs)
        except Exception as exc:
            return P.Status.RAISED, serialize.dump_exception(exc, self.host, self.pid)
        except BaseException as exc:  # sys.exit or KeyboardInterrupt inside the task
            stand_in = TaskError(f"the task raised {type(exc).__name__}{exc.args!r}; the worker kept running",
                                 type(exc).__name__)
            stand_in.__cause__ = exc
            return P.Status.RAISED, serialize.dump_exception(stand_in, self.host, self.pid)
        try:
            frames = serialize.dumps(value, what="result")
            if len(frames) > P.MAX_TASK_FRAMES:
                raise PayloadTooLarge(f"the result holds {len(frames) - 1} large buffers; at most "
                                      f"{P.MAX_TASK_FRAMES - 1} fit: return fewer, bigger arrays")
            return P.Status.OK, frames
        except Exception as exc:
            return P.Status.RAISED, serialize.dump_exception(exc, self.host, self.pid)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def main(argv: list[str] | None = None) -> None:
    endpoint, identity, parent = (argv or sys.argv[1:])[:3]
    # Ctrl-C in the agent's terminal is the agent's to handle; a task is not torn mid-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(parent))
    worker = Worker(endpoint, identity.encode(), int(parent))
    try:
        worker.run()
    finally:
        worker.close()


if __name__ == "__main__":
    main()
