"""An in-memory transport: a producer's core wired to a stub broker, with no sockets, threads or processes.

Like dramatiq's StubBroker or httpx's MockTransport. What a test drives is
zpar._producer.ProducerCore, every rule of the producer (the pending table,
the window, batching, resubmission, liveness, results to futures), with a
clock it moves by hand::

    from zpar.testing.transport import StubBroker

    broker = StubBroker()                   # a started producer core: its HELLO is in broker.inbox
    broker.welcome()                        # the producer is connected
    fut = broker.submit(pow, 2, 10)         # handed over as Client.submit does
    (task,) = broker.tasks()                # the SUBMITs that reached the broker, decoded
    broker.result(task.id, 1024)            # a RESULT back
    assert fut.result(timeout=0) == 1024
    broker.advance(5.0)                     # time passes: heartbeats, liveness, broker_timeout

Every message crosses ``zpar.protocol.encode`` and ``decode``, both ways, so
a test sees what the wire would carry. The stub answers nothing by itself:
the test plays the broker. Not covered here: the socket, the CurveZMQ
handshake and the I/O thread (zpar._connection); tests with a real cluster
(zpar.testing.LocalCluster) cover those.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from typing import Any, TypeVar

import zmq

from .. import protocol as P
from .. import serialize
from .._pending import PendingTask
from .._producer import ProducerCore
from ..futures import Future
from ..options import TaskOptions
from ..streaming import FeedOp

__all__ = ["StubBroker"]

M = TypeVar("M", bound=P.Message)


def _wire(msg: P.Message) -> P.Message:
    """``msg`` as the other end gets it: encoded, copied to bytes, decoded."""
    return P.decode([frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame) for frame in P.encode(msg)])


class StubBroker:
    """The broker's end of an in-memory link to one ProducerCore (``core``), and the clock (``now``).

    ``inbox``: what the producer sent that the test has not taken yet
    (``take``, ``tasks``). ``released``: window slots given back so far.
    ``funcs``: the function blobs that reached the broker, by digest.
    """

    def __init__(self, *, broker_timeout: float = 30.0, heartbeat: float = 1.0, liveness: int = 3,
                 epoch: str = "epoch-1", address: str = "stub://broker") -> None:
        self.now = 0.0
        self.epoch, self.heartbeat, self.liveness = epoch, heartbeat, liveness
        self.released = 0
        self.inbox: list[P.Message] = []
        self.funcs: dict[bytes, bytes] = {}
        self.core = ProducerCore(address, self._release, broker_timeout)
        self._ids = itertools.count(1)
        self._functions = serialize.FunctionCache()
        self._submits: collections.deque[PendingTask] = collections.deque()
        self._cancels: collections.deque[tuple[int, bool]] = collections.deque()
        self._feeds: collections.deque[FeedOp] = collections.deque()
        self._from_producer(self.core.start(self.now))

    # ------------------------------------------------------------------ the producer's side

    def submit(self, fn: Callable[..., Any], /, *args: Any, opts: TaskOptions | None = None, flags: int = 0,
               hold: bool = False, deps: tuple[Future, ...] = (), **kwargs: Any) -> Future:
        """``fn(*args, **kwargs)`` pickled and handed over as Client.submit does; its future.

        With ``hold`` it waits in the queue until the next ``turn`` (a task the
        I/O thread has not taken yet). ``deps``: futures whose values it takes
        (as pending Futures in Client.submit's arguments; ``args`` hold none).
        """
        opts = opts or TaskOptions()
        digest, blob = self._functions.get(fn)
        frames = serialize.dumps((args, kwargs), "arguments")
        tid = next(self._ids)
        fut = Future(tid, lambda f, force: self._cancels.append((f.task_id, force)), self._feeds.append)
        sched = P.waiting_for(opts.sched, tuple(d.task_id for d in deps)) if deps else opts.sched
        self._submits.append(PendingTask(P.TaskEntry(tid, digest, frames, flags, opts.retries, opts.timeout_ms,
                                                     sched=sched), blob, opts, fut, deps=deps))
        if not hold:
            self.turn()
        return fut

    def start(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """As Client.start: a channel task, its future the producer's end of the stream."""
        fut = self.submit(fn, *args, flags=P.FLAG_CHANNEL, **kwargs)
        fut._stream_state()
        return fut

    def turn(self) -> list[P.Message]:
        """One turn of the I/O thread: what the futures queued (cancels, submits, feeds) handed to the core."""
        cancels, feeds, submits = _drain(self._cancels), _drain(self._feeds), _drain(self._submits)
        return self._from_producer(self.core.handed_over(cancels, submits, feeds))

    def close(self) -> list[P.Message]:
        """The client closes: what the core sends last (BYE); open futures end."""
        return self._from_producer(self.core.closing(_drain(self._submits)))

    # ------------------------------------------------------------------ the broker's side

    def send(self, msg: P.Message) -> list[P.Message]:
        """``msg`` from the broker to the producer, then a turn; what the producer sent in answer."""
        out = self._from_producer(self.core.received(self.now, _wire(msg)))
        return out + self.turn()

    def welcome(self, epoch: str | None = None) -> list[P.Message]:
        """WELCOME (from a restarted broker, if ``epoch`` is new: forget the function blobs first)."""
        if epoch is not None and epoch != self.epoch:
            self.epoch, self.funcs = epoch, {}
        return self.send(P.Welcome(self.epoch, self.heartbeat, self.liveness))

    def result(self, tid: int, value: Any) -> list[P.Message]:
        return self.send(P.Result((P.ResultEntry(tid, P.Status.OK, serialize.dumps(value)),)))

    def raised(self, tid: int, exc: BaseException) -> list[P.Message]:
        """The task raised ``exc`` (as a worker sends it: type, traceback, host, pid)."""
        payload = serialize.dump_exception(exc, "stub-host", 4242)
        return self.send(P.Result((P.ResultEntry(tid, P.Status.RAISED, payload),)))

    def ended(self, tid: int, status: P.Status, cause: P.Cause | None = None) -> list[P.Message]:
        """The task ended without a value (LOST, TIMEOUT, CANCELLED, MEMORY) for ``cause``."""
        return self.send(P.Result((P.ResultEntry(tid, status, cause=cause or P.Cause("stub-node", 4242)),)))

    def streamed(self, tid: int, count: int, value: Any) -> list[P.Message]:
        """A task that sent ``count`` items returned ``value``."""
        return self.send(P.Result((P.ResultEntry(tid, P.Status.STREAMED, serialize.dumps((count, value))),)))

    def items(self, tid: int, *objs: Any, seq: int = 0) -> list[P.Message]:
        """ITEMS: ``objs`` from task ``tid``, numbered from ``seq``."""
        entries = tuple(P.ItemEntry(tid, seq + i, serialize.dumps(obj)) for i, obj in enumerate(objs))
        return self.send(P.Items(entries))

    def error(self, code: P.ErrorCode, *ids: int) -> list[P.Message]:
        return self.send(P.Error(code, ids))

    def advance(self, dt: float) -> list[P.Message]:
        """Move the clock ``dt`` seconds, firing the core's timers at each deadline passed (as its poll would)."""
        target = self.now + dt
        out: list[P.Message] = []
        while not self.core.ended and self.core.next_deadline() <= target:
            self.now = max(self.now, self.core.next_deadline())
            due = self.core.next_deadline()
            out += self._from_producer(self.core.tick(self.now))
            if self.core.next_deadline() <= due:
                break  # nothing more is due before target
        self.now = target
        return out

    def take(self, kind: type[M] | None = None) -> list[Any]:
        """Remove from ``inbox`` and return the messages of ``kind`` (all, if None), oldest first."""
        taken = [m for m in self.inbox if kind is None or isinstance(m, kind)]
        self.inbox = [m for m in self.inbox if not (kind is None or isinstance(m, kind))]
        return taken

    def tasks(self) -> list[P.TaskEntry]:
        """The task entries of the SUBMITs in ``inbox`` (taken out of it); their blobs go to ``funcs``."""
        entries: list[P.TaskEntry] = []
        for submit in self.take(P.Submit):
            self.funcs.update((f.digest, bytes(f.blob)) for f in submit.funcs)
            entries += submit.tasks
        return entries

    # ------------------------------------------------------------------ plumbing

    def _from_producer(self, messages: list[P.Message]) -> list[P.Message]:
        wired = [_wire(m) for m in messages]
        self.inbox += wired
        return wired

    def _release(self) -> None:
        self.released += 1


def _drain(queue: collections.deque[Any]) -> list[Any]:
    out = []
    while queue:
        out.append(queue.popleft())
    return out
