"""The producer's rules, with no sockets, threads or clocks: fed ``(now, event)``, returns what to send.

zpar._connection is its I/O shell (the one thread that owns the socket);
zpar.testing.transport drives it with no socket at all. The core keeps every
unfinished task whole (its entry, payload attached) so that nothing is lost
when the broker restarts, and resolves each task's future exactly once::

    CONNECTING ──WELCOME──▶ CONNECTED ──(broker silent PRODUCER_SLACK x its liveness, BYE, UNKNOWN_PEER)──┐
        ▲  │ HELLO every heartbeat                                                                     │
        │  └ away past broker_timeout: pending futures fail with BrokenCluster                         │
        └────────────── WELCOME: every unfinished task is sent again (the broker deduplicates) ◀───────┘
    refused handshake, KEY_REVOKED, closing ──▶ ENDED (nothing more is sent)

Events, each returning the messages to send, in order:

- ``start(now)``: HELLO.
- ``submitted(tasks)``: new tasks (PendingTask) into the pending table; SUBMIT when connected.
- ``cancelled(requests)``: ``(task id, force)`` of futures the user cancelled; CANCEL what was sent.
- ``fed(ops)``: a stream's objects, credits and closes (zpar.streaming.FeedOp); FEED.
- ``released(digests)``: scattered objects (zpar._refs) no Ref holds any more; RELEASE.
- ``handed_over(cancels, tasks, feeds)``: the three above, in the order the wire needs.
- ``received(now, msg)``: a message from the broker; ``heard(now)`` for one that did not decode.
- ``tick(now)``: heartbeats, the broker's liveness, ``broker_timeout``; due at ``next_deadline()``.
- ``refused(reason)``: the broker refused our handshake; ``crashed(exc)``: the shell failed.
- ``closing(leftovers)``: BYE; every open future is cancelled (or failed with why the loop ended).

The window: ``release()`` is called once for each task that leaves the
pending table (zpar._pending: result, error, cancel, failure) or is dropped
before it entered (cancelled before it left). Not on ``closing``: the client
is closed, and a submit blocked on the window sees the connection stopped
and raises.
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from . import _refs, errors, serialize  # errors: WorkerLost, MemoryLimitExceeded load when first used (zpar.errors)
from . import protocol as P
from ._liveness import PRODUCER_SLACK, Liveness
from ._pending import PendingTable, PendingTask, abandon
from ._text import printable
from .errors import (
    AuthenticationError,
    BrokenCluster,
    ProtocolError,
    QuotaExceeded,
    ResourceUnavailable,
    TaskError,
    TaskTimeout,
    UnpicklingError,
)
from .streaming import FeedOp

log = logging.getLogger(__name__)

_RESULT_OF = "result of task {}"  # a label built only if unpickling fails


class Link(enum.Enum):
    """The producer's link to its broker."""

    CONNECTING = "connecting"  # HELLO sent, no WELCOME yet: first, or again after losing the broker
    CONNECTED = "connected"
    ENDED = "ended"  # refused, cut off, or closed: nothing more is sent


class ProducerCore:
    """Every rule of the producer's side of the wire (see the module docstring).

    ``hello``: what we say to the broker (name, host, pid). ``release``: gives
    one task's slot of the client's window back. ``broker_timeout``: seconds
    the broker may be away before pending futures fail with BrokenCluster.
    """

    def __init__(self, address: str, release: Callable[[], None], broker_timeout: float,
                 hello: P.Hello | None = None, shared: bool = False) -> None:
        self.address = address
        self.shared = shared  # the embedded cluster's: results may name shared-memory segments (zpar._shm)
        self.release = release
        self.broker_timeout = broker_timeout
        self.hello = hello or P.Hello(P.Role.PRODUCER)
        self.link = Link.CONNECTING
        self.epoch: str | None = None  # the broker's, from its last WELCOME; None before the first
        self.failure: BaseException | None = None  # why the link ended, if it failed
        self.pending = PendingTable(release)
        self.shipped = P.Shipped()  # the function blobs the broker has from us
        self.rule = Liveness()  # the broker's heartbeat and liveness, from its WELCOME
        self._lost_since = self._last_heard = self._next_beat = 0.0
        #: Tasks the broker had no room for yet (QUEUE_FULL), oldest first: sent again as results
        #: come back (each result makes about one task's room) and once a heartbeat. They keep
        #: their slot of the window, so a busy broker slows ``submit`` instead of failing it.
        self._held: dict[int, None] = {}
        #: Tasks not sent because a task whose value they take is not at the broker now (held, or behind
        #: another): sent right behind it (``_follow``). Sent before it, each would be refused in turn.
        self._behind: dict[int, None] = {}

    @property
    def ended(self) -> bool:
        return self.link is Link.ENDED

    def next_deadline(self) -> float:
        """When ``tick`` next has something to do."""
        return self._next_beat

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> list[P.Message]:
        self._lost_since = self._last_heard = now
        self._next_beat = now + self.rule.heartbeat  # the HELLO goes now; again at the next beat if unanswered
        return [self.hello]

    def submitted(self, tasks: Iterable[PendingTask]) -> list[P.Message]:
        """New tasks into the pending table; sent at once if connected, else on the next WELCOME."""
        tasks = list(tasks)
        if self.ended:
            abandon([t.future for t in tasks], self.failure)
            return []
        batch = [task for task in tasks if self.pending.add(task)]
        if any(task.deps for task in batch):
            batch = [task for task in batch if not task.deps or self._sendable(task)]
        return self._submit(batch) if batch and self.link is Link.CONNECTED else []

    def handed_over(self, cancels: Iterable[tuple[int, bool]], tasks: Iterable[PendingTask],
                    feeds: Iterable[FeedOp]) -> list[P.Message]:
        """One turn's work from user threads, in the order the wire needs: ``cancelled``, ``submitted``, ``fed``.

        A task's SUBMIT goes ahead of what is sent to it. The caller takes
        ``feeds`` from their queue before ``tasks`` (a feed is queued after
        its task), so every task fed here is handed over here or before.
        """
        out = self.cancelled(cancels) + self.submitted(tasks)
        return out + self.fed(feeds)

    def cancelled(self, requests: Iterable[tuple[int, bool]]) -> list[P.Message]:
        """Futures the user cancelled, by ``(task id, force)``: forgotten here, and CANCEL if they were sent."""
        ids: list[int] = []
        forced: list[int] = []
        for tid, force in requests:
            if self.pending.cancelled(tid):
                (forced if force else ids).append(tid)
        if self.link is not Link.CONNECTED:
            return []  # never sent on this connection: a WELCOME will not send them either
        return [P.Cancel(chunk, force) for group, force in ((ids, False), (forced, True)) for chunk in P.chunks(group)]

    def fed(self, ops: Iterable[FeedOp]) -> list[P.Message]:
        """FEED what streams handed over: objects for tasks, credits, closed inputs, in order.

        Hand ``submitted`` the tasks first: a task's SUBMIT goes ahead of what is sent to it.
        """
        ops = list(ops)
        if not ops or self.link is not Link.CONNECTED:
            return []  # those streams exchanged items: they fail when the broker is back
        out: list[P.Message] = []
        items: list[P.ItemEntry] = []
        credits: list[P.Credit] = []
        closed: list[int] = []
        nframes = nbytes = 0
        for op in ops:
            if op[1] not in self.pending:
                continue
            if op[0] == "item":
                _, tid, seq, frames = op
                items.append(P.ItemEntry(tid, seq, frames))
                nframes += len(frames)
                nbytes += P.payload_bytes(frames)
            elif op[0] == "credit":
                credits.append(P.Credit(op[1], op[2]))
            else:
                closed.append(op[1])
            if (len(items) + len(credits) + len(closed) >= P.BATCH_MAX_TASKS or nbytes >= P.BATCH_MAX_BYTES
                    or nframes + P.MAX_TASK_FRAMES >= P.MAX_FRAMES):
                out.append(P.Feed(tuple(items), tuple(credits), tuple(closed)))
                items, credits, closed, nframes, nbytes = [], [], [], 0, 0
        if items or credits or closed:
            out.append(P.Feed(tuple(items), tuple(credits), tuple(closed)))
        return out

    def released(self, digests: list[bytes]) -> list[P.Message]:
        """Scattered objects no Ref holds any more: the broker may free them (once no task uses them)."""
        self.shipped.forget(digests)  # scattered again later, they go again
        if not digests or self.link is not Link.CONNECTED:
            return []  # a broker that lost us freed them already
        return [P.Release(chunk) for chunk in P.chunks(digests)]

    def heard(self, now: float) -> None:
        """Something came from the broker (a message that did not decode still shows it lives)."""
        self._last_heard = now

    def received(self, now: float, msg: P.Message) -> list[P.Message]:
        """A message from the broker."""
        if self.ended:
            return []
        self._last_heard = now
        out: list[P.Message] = []
        if isinstance(msg, P.Result):
            self._results(msg, out)
        elif isinstance(msg, P.Items):
            self._items(msg, out)
        elif isinstance(msg, P.Welcome):
            self._welcome(now, msg, out)
        elif isinstance(msg, P.Error):
            self._error(now, msg, out)
        elif isinstance(msg, P.Bye):
            if msg.reason is P.ByeReason.KEY_REVOKED:
                self._cut_off(self._revoked())
            else:
                log.warning("the broker at %s is stopping (%s); waiting for it to return", self.address,
                            msg.reason.name.lower())
                self._lose(now)
        return out  # a HEARTBEAT only shows the broker lives

    def tick(self, now: float) -> list[P.Message]:
        """Timers: a heartbeat (or HELLO, while away) each interval; the broker judged; broker_timeout."""
        if self.ended or now < self._next_beat:
            return []
        self._next_beat = now + self.rule.heartbeat
        # PRODUCER_SLACK x the broker's own rule: a busy broker, or our thread starved of the
        # GIL by the user's code, must not make us resend everything.
        if self.link is Link.CONNECTED and self.rule.silent(now, self._last_heard, PRODUCER_SLACK):
            log.warning("the broker at %s has been silent for %.1f s; reconnecting", self.address,
                        now - self._last_heard)
            self._lose(self._last_heard)
        if self.link is Link.CONNECTED:
            out: list[P.Message] = [P.Heartbeat()]
            if self._held:  # in case no result comes to make room: the broker's queue may have drained
                self._send_held(P.BATCH_MAX_TASKS, out)
            self._follow(out)
            return out
        if now - self._lost_since > self.broker_timeout and self.pending:
            self.pending.fail_all(BrokenCluster(  # a BrokerUnavailable; also what Executor users catch
                f"the broker at {self.address} has not answered for {now - self._lost_since:.0f} s "
                f"(broker_timeout={self.broker_timeout:g} s); is `zpar-broker` running there?"))
        return [self.hello]  # again, until a broker answers

    def refused(self, reason: str) -> None:
        """The broker refused our handshake (credentials): every pending future fails; the link ends."""
        log.info("%s", reason)  # raised to the user, from Client() or from every pending future
        self._cut_off(AuthenticationError(reason))

    def crashed(self, exc: BaseException) -> None:
        """The shell failed with ``exc``: ``closing`` fails the open futures with it instead of cancelling them."""
        if self.failure is None:
            self.failure = exc

    def closing(self, leftovers: Iterable[PendingTask] = ()) -> list[P.Message]:
        """The end: BYE; every future still open (pending, or ``leftovers`` never handed over) is
        cancelled, or failed with ``failure`` if the link failed, so nothing waits forever."""
        futures = self.pending.clear() + [t.future for t in leftovers]
        self.link = Link.ENDED
        abandon(futures, self.failure)
        return [P.Bye(P.ByeReason.LEAVING)]

    # ------------------------------------------------------------------ the link

    def _lose(self, since: float) -> None:
        self.link = Link.CONNECTING
        self._lost_since = since

    def _welcome(self, now: float, msg: P.Welcome, out: list[P.Message]) -> None:
        if self.link is Link.CONNECTED and msg.epoch == self.epoch:
            return  # an answer to a HELLO queued while the broker was away: we are already back
        first = self.epoch is None
        restarted = not first and msg.epoch != self.epoch
        self.epoch, self.rule, self.link = msg.epoch, Liveness(msg.heartbeat, msg.liveness), Link.CONNECTED
        self._next_beat = min(self._next_beat, now + msg.heartbeat)
        if not first:
            # A new broker, or the same one that forgot us: send everything unfinished again.
            # Results already on their way are deduplicated here; tasks it still has, there.
            log.warning("%s broker at %s; sending its %d unfinished tasks again",
                        "a restarted" if restarted else "reconnected to the", self.address, len(self.pending))
            self.shipped.forget()
            self._fail_streams(out)
        self._held.clear()  # everything unfinished goes again below
        self._behind.clear()
        if self.pending:
            out += self._submit(list(self.pending))

    def _error(self, now: float, msg: P.Error, out: list[P.Message]) -> None:
        if msg.code is P.ErrorCode.UNKNOWN_PEER:  # the broker does not know us (any more)
            self._lose(now)
            out.append(self.hello)
        elif msg.code is P.ErrorCode.UNKNOWN_FUNCTION:  # it lost a function blob: send those tasks with it
            retry = [task for task in map(self.pending.get, msg.ids) if task is not None]
            self.shipped.forget(task.entry.digest for task in retry)
            self.shipped.forget(d for task in retry for d in task.entry.refs)  # its scattered objects too
            out += self._submit(retry)
        elif msg.code is P.ErrorCode.KEY_REVOKED:
            self._cut_off(self._revoked())
        elif msg.code is P.ErrorCode.TOO_MANY_PEERS:
            self._cut_off(QuotaExceeded(
                f"the broker at {self.address} refused this client: {printable(msg.detail) or 'too many clients'}; "
                "close other clients of this cluster's credentials, or raise the broker's --max-producers-per-key"))
        elif msg.code is P.ErrorCode.QUEUE_FULL:
            self._held.update((tid, None) for tid in msg.ids if tid in self.pending)
        elif msg.code is P.ErrorCode.DEPENDENCY_GONE:
            self._dependencies_gone(msg.ids, out)
        elif msg.code is P.ErrorCode.QUOTA_EXCEEDED:
            self._fail_ids(msg.ids, lambda tid: QuotaExceeded(
                f"the broker at {self.address} refused task {tid}: {printable(msg.detail) or 'it is over a quota'}"))
        elif msg.code is P.ErrorCode.RESOURCE_UNAVAILABLE:  # no node offers what they ask (resource_timeout)
            self._fail_ids(msg.ids, lambda tid: ResourceUnavailable(
                f"task {tid} gave up waiting for a node: {printable(msg.detail) or 'no node offers its resources'}"))
        elif msg.code is P.ErrorCode.BAD_FUNCTION:
            self._fail_ids(msg.ids, lambda tid: ProtocolError(
                f"the broker at {self.address} refused task {tid}: its function blob does not hash to its digest "
                "(zpar.protocol.digest); this client sent a corrupt or forged function"))
        else:
            detail = f"{msg.code.name}{': ' + printable(msg.detail) if msg.detail else ''}"
            log.error("broker at %s refused a message (%s)", self.address, detail)
            for tid in msg.ids:
                task = self.pending.get(tid)
                if task is not None:
                    self.pending.fail(task, ProtocolError(f"the broker refused task {tid} ({detail})"))

    def _fail_ids(self, ids: Iterable[int], error: Callable[[int], BaseException]) -> None:
        for tid in ids:
            task = self.pending.get(tid)
            if task is not None:
                self.pending.fail(task, error(tid))

    def _revoked(self) -> AuthenticationError:
        return AuthenticationError(f"the broker at {self.address} cut us off: this producer's key was removed "
                                   "from the broker's allow-list")

    def _cut_off(self, exc: BaseException) -> None:
        """For good: every pending future fails with ``exc``; nothing more is sent."""
        self.failure = exc
        self.pending.fail_all(exc)
        self.link = Link.ENDED

    def _submit(self, tasks: list[PendingTask]) -> list[P.Message]:
        """SUBMIT in batches that fit a message, each function blob once per connection; then the PARTs of
        large payloads (P.split: the broker sends each on as it comes, while the next is on its way)."""
        entries = [task.entry for task in tasks]
        parts: list[P.Message] = []
        if any(len(entry.payload) > 1 for entry in entries):
            for i, entry in enumerate(entries):
                entries[i], more = P.split(entry)
                parts += more
        blobs: dict[bytes, P.Frame] = {task.entry.digest: task.blob for task in tasks}
        for task in tasks:
            if task.objects:
                blobs.update(task.objects)
        # A blob for every task at worst: keep room for them in each message.
        return [*(P.Submit(tuple(batch), _named(self.shipped.functions(batch, blobs.__getitem__), tasks))
                  for batch in P.batches(entries, reserved_frames=min(len(blobs), P.BATCH_MAX_TASKS))), *parts]

    # ------------------------------------------------------------------ results

    def _send_held(self, room: int, out: list[P.Message]) -> None:
        """Send up to ``room`` of the tasks the broker had no room for, oldest first."""
        ids = list(itertools.islice(self._held, room))
        for tid in ids:
            del self._held[tid]
        tasks = [task for task in map(self.pending.get, ids) if task is not None]  # not cancelled since
        if tasks:
            out += self._submit(tasks)

    def _results(self, msg: P.Result, out: list[P.Message]) -> None:
        for entry in msg.results:
            task = self.pending.get(entry.id)
            if task is None:
                if entry.payload:
                    serialize.discard(entry.payload)  # a result in shared memory nobody will map
                continue  # cancelled, or a duplicate after a resubmission
            try:
                self._ended(task, entry, out)
            except BaseException as exc:  # noqa: BLE001 - unpickling runs code the value names: whatever it
                # raises (SystemExit too) fails this task, never this thread
                if task.id in self.pending:
                    self.pending.fail(task, UnpicklingError.of(exc, _RESULT_OF.format(entry.id)))
        if self._held:  # after the results: a held task may wait for one of them (Sched.deps)
            self._send_held(len(msg.results), out)
        self._follow(out)

    def _ended(self, task: PendingTask, entry: P.ResultEntry, out: list[P.Message]) -> None:
        """Resolve or fail ``task`` as its RESULT ``entry`` says; raises what decoding raised."""
        if entry.status is P.Status.OK:
            what = functools.partial(_RESULT_OF.format, entry.id)
            self.pending.resolve(task, serialize.loads(entry.payload, what=what, shared=self.shared))
        elif entry.status is P.Status.STREAMED:
            self._stream_ended(task, entry.payload)
        elif entry.status is P.Status.DEP_FAILED:
            self._dependency_failed(task, entry, out)
        elif entry.status is P.Status.RAISED:
            exc = serialize.load_exception(entry.payload)
            if isinstance(exc, TaskError):
                exc = exc.as_raised()  # a SystemExit the worker survived is raised as itself
            if not self._rerun(task, exc, out):
                self.pending.fail(task, exc)
        else:
            self.pending.fail(task, _ended_without_value(entry))

    def _rerun(self, task: PendingTask, exc: BaseException, out: list[P.Message]) -> bool:
        """Run ``task`` again if it raised one of its ``retry_on`` and has re-runs left (True)."""
        opts = task.opts
        if not isinstance(exc, opts.retry_on) or task.reruns >= opts.retries or task.exchanged:
            return False
        task.reruns += 1
        log.info("task %d raised %s; running it again (%d of %d)", task.id, type(exc).__name__, task.reruns,
                 opts.retries)
        if self.link is Link.CONNECTED:
            out += self._submit([task])
        return True

    # ------------------------------------------------------------------ futures as arguments

    def _dependency_failed(self, task: PendingTask, entry: P.ResultEntry, out: list[P.Message]) -> None:
        """The broker ended ``task`` unrun: a task whose value it takes ended without one."""
        if any(not dep.done() for dep in task.deps):  # that one runs again here (its retry_on): wait again
            if self.link is Link.CONNECTED:
                out += self._submit([task])
            return
        cause = entry.cause.detail if entry.cause is not None else ""
        self.pending.fail(task, _dependency_error(task, printable(cause)))

    def _dependencies_gone(self, ids: Iterable[int], out: list[P.Message]) -> None:
        """The broker does not hold some task these wait for: one that ended (its RESULT came first: these go
        again with the values), or one it refused (these go again right behind it)."""
        again: list[PendingTask] = []
        for task in map(self.pending.get, ids):
            if task is None or task.entry.sched is None:
                continue
            if all(dep.done() for dep in task.deps):
                if self._with_values(task):
                    again.append(task)
            else:
                self._behind[task.id] = None
        if again and self.link is Link.CONNECTED:
            out += self._submit(again)
        self._follow(out)

    def _sendable(self, task: PendingTask) -> bool:
        """Whether ``task`` (it waits for others) can go now: with the values of those that ended here, or
        naming them when none is away from the broker; if not, it waits ``_behind`` them (or failed)."""
        waiting = [dep for dep in task.deps if not dep.done()]
        if not waiting:
            return self._with_values(task)  # the broker may have let those values go already
        if any(dep.task_id in self._held or dep.task_id in self._behind for dep in waiting):
            self._behind[task.id] = None
            return False
        return True

    def _follow(self, out: list[P.Message]) -> None:
        """Send the tasks ``_behind`` others once those are back at the broker (or ended), in order."""
        if not self._behind or self.link is not Link.CONNECTED:
            return
        ready: list[PendingTask] = []
        for tid in list(self._behind):
            del self._behind[tid]
            task = self.pending.get(tid)  # None: cancelled, or failed
            if task is not None and self._sendable(task):  # (or behind again, after an earlier one)
                ready.append(task)
        if ready:
            out += self._submit(ready)

    def _with_values(self, task: PendingTask) -> bool:
        """``task``, whose dependencies have all ended here, made to carry their values itself (as objects);
        False if one ended without a value, or its value does not pickle again: ``task`` failed then."""
        if any(dep.cancelled() or dep.exception() is not None for dep in task.deps):
            self.pending.fail(task, _dependency_error(task, ""))
            return False
        blobs: dict[bytes, P.Frame] = {}
        digests: list[bytes] = []  # in the order of deps (two equal values: one blob, named twice)
        try:
            for dep in task.deps:
                blob = _refs.pack(dep.result())
                digests.append(P.digest(blob))
                blobs[digests[-1]] = blob
        except Exception as exc:  # noqa: BLE001 - a value that pickled once may not again (it changed)
            self.pending.fail(task, exc)
            return False
        entry = task.entry
        task.entry = entry._replace(refs=entry.refs + tuple(digests),
                                    sched=(entry.sched or P.Sched())._replace(deps=(), values=len(digests)))
        task.objects = {**(task.objects or {}), **blobs}
        return True

    # ------------------------------------------------------------------ streams (zpar.streaming)

    def _items(self, msg: P.Items, out: list[P.Message]) -> None:
        for tid, run in P.runs(msg.items):  # one lock and one wake-up a run of a task's items
            task = self.pending.get(tid)
            if task is not None:  # else cancelled, failed, or done
                stream = task.future._stream_state()
                if stream.arrived(run) is not None:
                    self._stream_broken(task, f"item {stream.next_seq} of task {task.id} was lost on the way "
                                              "(a connection broke)", out)
        for credit in msg.credits:
            task = self.pending.get(credit.id)
            if task is not None:
                task.future._stream_state().granted(credit.upto)

    def _stream_ended(self, task: PendingTask, payload: P.Payload) -> None:
        """A task that sent items returned: its result, once every item it counted is here."""
        count, value = serialize.loads(payload, what=f"result of task {task.id}", shared=self.shared)
        stream = task.future._stream
        arrived = stream.next_seq if stream is not None else 0
        if arrived < count:
            self.pending.fail(task, errors.WorkerLost(f"{count - arrived} of the {count} items task {task.id} "
                                                      "sent were lost on the way (a connection broke)"))
        else:
            self.pending.resolve(task, value)

    def _stream_broken(self, task: PendingTask, reason: str, out: list[P.Message]) -> None:
        """Fail a stream that cannot go on, and stop its task."""
        if self.link is Link.CONNECTED:
            out.append(P.Cancel((task.id,), True))
        self.pending.fail(task, errors.WorkerLost(reason))

    def _fail_streams(self, out: list[P.Message]) -> None:
        """After the broker lost track of us: a task that exchanged items cannot be sent again."""
        for task in [t for t in self.pending if t.exchanged]:
            self._stream_broken(task, f"the broker at {self.address} lost track of task {task.id} in the middle "
                                      "of its stream; a task that has exchanged items is not run again", out)


def _ended_without_value(entry: P.ResultEntry) -> BaseException:
    """The error for a task that ended without a value (LOST, TIMEOUT, CANCELLED, MEMORY), from its cause."""
    cause = entry.cause or P.Cause()
    worker = f"worker pid {cause.pid} on {cause.node}"
    if entry.status is P.Status.TIMEOUT:
        return TaskTimeout(f"task {entry.id} {cause.detail} on {cause.node}; {worker} was stopped")
    if entry.status is P.Status.CANCELLED:
        return concurrent.futures.CancelledError(f"task {entry.id} was cancelled on {cause.node}")
    fields: dict[str, Any] = {"node": cause.node, "pid": cause.pid, "exitcode": cause.exitcode,
                              "signal": cause.signal, "attempts": cause.attempts}
    if entry.status is P.Status.MEMORY:
        return errors.MemoryLimitExceeded(f"task {entry.id}: {worker} {cause.detail}; it was stopped", **fields)
    ended = cause.ended()
    if ended:
        text = f"task {entry.id} was lost: {worker} {ended}" + (f" ({cause.detail})" if cause.detail else "")
    else:
        text = f"task {entry.id} was lost on {cause.node or 'its node'}" + (f": {cause.detail}" if cause.detail else "")
    if cause.attempts:
        text += f"; gave up after {cause.attempts} attempt{'s' if cause.attempts != 1 else ''}"
    return errors.WorkerLost(text, **fields)


def _dependency_error(task: PendingTask, detail: str) -> BaseException:
    """Why ``task`` did not run: the first of the tasks whose values it takes that failed, as its cause."""
    for dep in task.deps:
        if dep.done():
            try:
                cause = dep.exception()
            except concurrent.futures.CancelledError as exc:
                cause = exc
            if cause is not None:
                root = cause.__cause__ if isinstance(cause, errors.DependencyError) and cause.__cause__ else cause
                how = (f"failed: {type(cause).__name__}: {cause}" if root is cause else
                       f"did not run either (the first to fail raised {type(root).__name__}: {root})")
                err = errors.DependencyError(
                    f"task {task.id} did not run: task {dep.task_id}, whose value it takes as an argument, {how}",
                    dep.task_id)
                err.__cause__ = root  # the first error of a chain, not ten thousand DependencyErrors deep
                return err
    return errors.DependencyError(f"task {task.id} did not run: {detail or 'a task whose value it takes failed'}")


def _named(funcs: tuple[P.Function, ...], tasks: list[PendingTask]) -> tuple[P.Function, ...]:
    """``funcs`` with their names (each function goes once per connection: a look through ``tasks`` each time)."""
    if not funcs:
        return funcs
    names = {task.entry.digest: task.name for task in tasks}
    return tuple(f._replace(name=names.get(f.digest, "")) for f in funcs)
