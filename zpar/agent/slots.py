"""The agent's slot accounting, with no sockets, processes or clock of its own.

Fed events (tasks from the broker, a worker ready, a worker's results, a
worker's death), it decides which idle worker gets which batch, how many
credits to ask the broker for, and which results to send on. ``AgentCore``
holds it with the agent's other rules.

Batches are sized from measured task durations: an idle worker takes tasks
while their estimated total stays near ``BATCH_TARGET_US`` of work, so tiny
tasks do not each pay a round trip, and a task estimated at 1 ms or more goes
alone. Workers idle at the same moment share what is queued (none takes more
than its even part). Credits are sized from the batch: ``workers x batch x 2``,
or just ``workers`` once tasks take ``prefetch.RETURN_AFTER`` or more.

An estimate can be wrong (``sleep(0)``, then ``sleep(6)``): nothing then waits
behind the long task for more than a few milliseconds (``courier.DELAY``).
The worker sends the results it has while that task runs (``worker_results``
takes a batch's results a part at a time, and they go on at once), and gives
back the tasks it has not started (``given_back``: first in line for the next
idle worker).

Streams (zpar.streaming) pass through ``streams.StreamPassing``, which it
holds. A task that has exchanged an item is never re-run here: if its worker
dies it is reported lost, and the broker fails it rather than run it again.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Sequence

from zpar import _refs
from zpar import protocol as P
from zpar.errors import ProtocolError

from .actions import ToWorker
from .order import appends, first_in_line, line_up
from .prefetch import RETURN_AFTER, Prefetch
from .records import QueuedTask, WorkerSlot, WorkerState
from .streams import StreamPassing

log = logging.getLogger(__name__)

BATCH_TARGET_US = 1500
ALONE_US = 1000  # a task this long or longer is never batched
UNKNOWN_US = ALONE_US  # a function not measured yet is assumed long: it goes alone first
_ALPHA = 0.3  # weight of the newest duration in the moving average


class Slots:
    """The workers (one registry), the queue of tasks they have not got yet, durations and credits."""

    def __init__(self, node: str, *, max_tasks_per_worker: int = 0) -> None:
        self.node = node
        self.max_tasks_per_worker = max_tasks_per_worker
        self.workers: dict[bytes, WorkerSlot] = {}
        self.queue: collections.deque[QueuedTask] = collections.deque()
        self.streams = StreamPassing(self.workers, self.queue)
        self.funcs: dict[bytes, P.Frame] = {}  # digest -> blob frame, shipped once per agent
        self.requested = 0  # credits asked of the broker and not yet used by TASKS
        self.durations: dict[bytes, float] = {}  # digest -> moving average of one call, in us
        self._recent_us = float(UNKNOWN_US)  # across functions: sizes the credit
        self.results: list[P.ResultEntry] = []  # to send to the collector
        self.accepting = True
        self.prefetch = Prefetch()  # tasks waiting behind long ones go back to the broker
        self._retiring: list[bytes] = []  # workers to tell to exit, not told yet

    # ------------------------------------------------------------------ workers

    def add_worker(self, identity: bytes) -> None:
        self.workers[identity] = WorkerSlot(identity)

    def worker_ready(self, identity: bytes, pid: int, now: float) -> list[ToWorker]:
        slot = self.workers.get(identity)
        if slot is None or slot.state is not WorkerState.STARTING:
            return []
        slot.state, slot.pid = WorkerState.IDLE, pid
        if slot.retire:  # the node was made smaller while it started (shrink): it ends now, before any task
            self._retire_now(slot)
            return []
        self.prefetch.worker_free()
        return self.assign(now)

    def worker_results(self, identity: bytes, msg: P.Result, now: float) -> list[ToWorker]:
        slot = self.workers.get(identity)
        if slot is None or slot.state is not WorkerState.BUSY:
            return []
        self.streams.ended(entry.id for entry in msg.results)
        if len(msg.results) < len(slot.batch):  # sent on as they were made: the worker runs the rest
            self._some_results(slot, msg)
            return []
        if slot.doomed:
            return []  # it is being killed; its death reports the batch
        if not slot.stale:
            by_id = {t.id: t for t in slot.batch}
            for entry in msg.results:
                task = by_id.get(entry.id)
                if task is not None:
                    self._measure(task.entry.digest, entry.duration_us)
            self.results.extend(msg.results)
        slot.tasks_done += len(slot.batch)
        self._batch_over(slot)
        return self.assign(now)

    def _batch_over(self, slot: WorkerSlot) -> None:
        slot.batch, slot.deadline, slot.stale = [], 0.0, False
        if slot.retire or (self.max_tasks_per_worker and slot.tasks_done >= self.max_tasks_per_worker):
            self._retire_now(slot)
        else:
            slot.state = WorkerState.IDLE
            self.prefetch.worker_free()

    def _some_results(self, slot: WorkerSlot, msg: P.Result) -> None:
        """The first tasks of a batch are done; the worker is still busy with the rest.

        Their results go on at once (``take_results``). Costs what the message
        holds, not what the batch holds: a worker may send a long batch's
        results in many parts.
        """
        results, batch = msg.results, slot.batch
        n = len(results)
        if not slot.doomed and all(t.id == e.id for t, e in zip(batch, results, strict=False)):  # in order
            finished, slot.batch = batch[:n], batch[n:]
        else:  # a doomed task stays in the batch: the worker's death reports it (timeout, cancel, memory)
            done = {entry.id for entry in results if entry.id not in slot.doomed}
            finished = [t for t in batch if t.id in done]
            slot.batch = [t for t in batch if t.id not in done]
        slot.tasks_done += len(finished)
        if slot.stale:
            return
        by_id = {t.id: t for t in finished}
        for entry in results:
            task = by_id.get(entry.id)
            if task is not None:
                self._measure(task.entry.digest, entry.duration_us)
                self.results.append(entry)

    def given_back(self, identity: bytes, ids: tuple[int, ...], now: float) -> list[ToWorker]:
        """The worker will not run these tasks of its batch (a task of it ran long): queued again, first in line.

        The worker stays busy with the task it runs, if any. A doomed task
        stays in its batch (its worker's death reports it); one that was sent
        objects is not run again (lost, as if its worker died).
        """
        slot = self.workers.get(identity)
        if slot is None or slot.state is not WorkerState.BUSY:
            return []
        back = set(ids).difference(slot.doomed)
        returned = [t for t in slot.batch if t.id in back]
        if not returned:
            return []
        slot.batch = [t for t in slot.batch if t.id not in back]
        if not slot.stale:  # else for a broker that is gone: dropped
            for task in reversed(returned):
                if task.streamed:  # the objects went to that worker
                    self.results.append(P.ResultEntry(task.id, P.Status.LOST, cause=P.Cause(
                        self.node, slot.pid, detail="given back by its worker after it was sent objects")))
                else:
                    first_in_line(self.queue, task)
        if not slot.batch:  # it had not started any of them
            self._batch_over(slot)
        return self.assign(now)

    def worker_items(self, identity: bytes, msg: P.Items) -> None:
        self.streams.worker_items(identity, msg)

    def _retire_now(self, slot: WorkerSlot) -> None:
        slot.state = WorkerState.RETIRING
        self._retiring.append(slot.identity)

    def retire(self, identity: bytes) -> None:
        """Recycle this worker once it is idle (memory limit, say)."""
        slot = self.workers.get(identity)
        if slot is None:
            return
        if slot.state is WorkerState.IDLE:
            self._retire_now(slot)
        elif slot.state is WorkerState.BUSY:
            slot.retire = True

    def shrink(self, count: int) -> None:
        """Retire ``count`` workers (a smaller node, asked from the dashboard): those starting first (each as soon
        as it is ready: it cannot be told before), then idle ones now, then busy ones when their batch is done."""
        order = {WorkerState.STARTING: 0, WorkerState.IDLE: 1, WorkerState.BUSY: 2}
        keep = [s for s in self.workers.values() if s.state in order and not s.retire]
        for slot in sorted(keep, key=lambda s: order[s.state])[:count]:
            if slot.state is WorkerState.IDLE:
                self._retire_now(slot)
            else:
                slot.retire = True

    def retiring(self) -> list[bytes]:
        """Workers to tell to exit now; each is reported once."""
        out, self._retiring = self._retiring, []
        return out

    def worker_exited(self, identity: bytes, returncode: int) -> list[QueuedTask]:
        """A worker died. Its lone task fails with WorkerLost; a batch is re-run task by task.

        In a batch the culprit is unknown, so each task runs again alone: the
        one that kills a worker again is then charged, the others complete.
        """
        slot = self.workers.pop(identity, None)
        if slot is None:
            return []
        self.streams.ended(task.id for task in slot.batch)
        cause = P.Cause.from_returncode(self.node, slot.pid, returncode)
        batch, slot.batch, slot.state = slot.batch, [], WorkerState.EXITED
        if slot.stale:
            return []  # tasks of a broker that is gone: nobody is waiting for them
        if slot.doomed:  # we killed it: timeout or cancel; the rest of its batch is innocent
            for task in reversed(batch):
                if task.id not in slot.doomed and not task.streamed:
                    first_in_line(self.queue, task)
            for task in batch:
                if task.id in slot.doomed:
                    status, why = slot.doomed[task.id]
                    self.results.append(P.ResultEntry(task.id, status, cause=why))
                elif task.streamed:
                    self.results.append(P.ResultEntry(task.id, P.Status.LOST, cause=cause._replace(
                        detail="stopped in the middle of the task's stream")))
            return batch
        if len(batch) == 1 or any(t.alone for t in batch):
            for task in batch:
                self._lost(task, cause)
        elif batch:
            log.warning("worker pid %d on %s %s with a batch of %d; re-running them one by one",
                        slot.pid, self.node, cause.ended(), len(batch))
            for task in reversed(batch):
                if task.streamed:  # it exchanged items: the broker decides (it will not run it again)
                    self._lost(task, cause)
                else:
                    task.alone = True
                    first_in_line(self.queue, task)
        return batch

    def _lost(self, task: QueuedTask, cause: P.Cause) -> None:
        # While the agent stops (drain, shutdown) it stops its own workers: no surprise to warn about.
        log.log(logging.WARNING if self.accepting else logging.INFO, "worker pid %d on %s %s while running task %d",
                cause.pid, self.node, cause.ended(), task.id,
                extra={"task": task.id, "node": self.node, "pid": cause.pid})
        self.results.append(P.ResultEntry(task.id, P.Status.LOST, cause=cause))

    def state(self, identity: bytes) -> WorkerState:
        """Where this worker is in its life (EXITED once it left the registry)."""
        slot = self.workers.get(identity)
        return WorkerState.EXITED if slot is None else slot.state

    def live(self) -> int:
        """Workers not known to have exited."""
        return sum(1 for s in self.workers.values() if s.state is not WorkerState.EXITED)

    def busy_slots(self) -> list[WorkerSlot]:
        return [s for s in self.workers.values() if s.state is WorkerState.BUSY]

    # ------------------------------------------------------------------ tasks

    def tasks(self, msg: P.Tasks, now: float) -> list[ToWorker]:
        bad: set[bytes] = set()
        for func in msg.funcs:
            # Defence in depth: the broker checks it too. Not for a scattered object (zpar._refs), often
            # hundreds of MB: hashing it again here would cost more than its trip.
            if not _refs.is_object(func.blob) and P.digest(func.blob) != func.digest:
                bad.add(func.digest)
            elif func.digest not in self.funcs:  # first verified blob stays: same digest, same bytes
                self.funcs[func.digest] = func.blob
        entries: Sequence[P.TaskEntry] = msg.tasks
        funcs = self.funcs
        if bad or any(entry.digest not in funcs or (entry.refs and not all(d in funcs for d in entry.refs))
                      for entry in entries):
            entries = self._refuse_unknown(entries, bad)
        queue = self.queue
        # The rest of a parted payload follows (P.Part), each sent on to the worker as it comes: alone, so that
        # worker waits for nothing else, and it joins them.
        tasks: Iterable[QueuedTask] = (
            [QueuedTask(entry, alone=True, assembly=P.Assembly(entry)) if entry.parts else QueuedTask(entry)
             for entry in entries] if any(entry.parts for entry in entries) else map(QueuedTask, entries))
        if appends(queue, entries):  # the common case: every task at priority 0, behind tasks of 0 or more
            queue.extend(tasks)
        else:
            line_up(queue, list(tasks))
        self.requested = max(0, self.requested - len(msg.tasks))
        return self.assign(now)

    def part(self, part: P.Part) -> list[ToWorker]:
        """More of a task's payload: kept with the task (for a worker that takes it later), and sent on to the
        worker that has it, if one has."""
        task, slot = self._find(part.id)
        if task is None or task.assembly is None:
            return []  # ended, cancelled or given back meanwhile, or from a broker that is gone
        try:
            if not task.assembly.add(part):
                return []
        except ProtocolError as exc:  # the broker checks each part as we do: a bug there, not here
            log.error("dropped a part from the broker: %s", exc)
            return []
        return [] if slot is None else [ToWorker(slot.identity, part)]

    def _find(self, tid: int) -> tuple[QueuedTask | None, WorkerSlot | None]:
        """Task ``tid`` and the worker that has it (None: queued here), or (None, None). Not a task of a broker
        that is gone (a stale batch): a restarted broker numbers its tasks from 1 again."""
        for slot in self.workers.values():
            if slot.stale:
                continue
            for task in slot.batch:
                if task.id == tid:
                    return task, slot
        for task in self.queue:
            if task.id == tid:
                return task, None
        return None, None

    def _refuse_unknown(self, entries: Sequence[P.TaskEntry], bad: set[bytes]) -> list[P.TaskEntry]:
        """``entries`` whose function blob we hold; the others are reported lost, not given a worker."""
        kept = []
        for entry in entries:
            blobs = (entry.digest, *entry.refs)  # its function's, and its scattered objects' (zpar._refs)
            if all(d in self.funcs and d not in bad for d in blobs):
                kept.append(entry)
                continue
            why = "does not hash to its digest" if any(d in bad for d in blobs) else "never came"
            log.error("task %d refused: its function blob %s", entry.id, why,
                      extra={"task": entry.id, "node": self.node})
            self.results.append(P.ResultEntry(entry.id, P.Status.LOST, cause=P.Cause(
                self.node, detail=f"refused by the agent: its function blob {why}")))
        return kept

    def feed(self, msg: P.Feed) -> list[ToWorker]:
        return self.streams.feed(msg)

    # ------------------------------------------------------------------ cancel, timeouts

    def cancel(self, ids: tuple[int, ...]) -> list[bytes]:
        """Stop these tasks: dropped from the queue; workers running one are returned, to be killed."""
        wanted = set(ids)
        left = [t for t in self.queue if t.id not in wanted]
        self.queue.clear()  # in place: the streams part holds this queue
        self.queue.extend(left)
        kill = []
        for slot in self.workers.values():
            hit = [t.id for t in slot.batch if t.id in wanted and t.id not in slot.doomed]
            if slot.state is WorkerState.BUSY and hit:
                for tid in hit:
                    slot.doomed[tid] = (P.Status.CANCELLED, P.Cause(self.node, slot.pid, detail="cancelled"))
                kill.append(slot.identity)
        return kill

    def expired(self, now: float) -> list[bytes]:
        """Workers whose task ran past its timeout, to be killed (each reported once)."""
        kill = []
        for slot in self.workers.values():
            if slot.state is WorkerState.BUSY and slot.deadline and slot.deadline <= now and not slot.doomed:
                for task in slot.batch:
                    detail = f"ran past its timeout of {task.entry.timeout_ms / 1000:g} s"
                    slot.doomed[task.id] = (P.Status.TIMEOUT, P.Cause(self.node, slot.pid, detail=detail))
                kill.append(slot.identity)
        return kill

    def over_memory(self, identity: bytes, detail: str) -> bool:
        """The worker went past the hard memory limit mid-task: doom its batch; True if it must be killed."""
        slot = self.workers.get(identity)
        if slot is None or slot.state is not WorkerState.BUSY or slot.doomed:
            return False
        for task in slot.batch:
            slot.doomed[task.id] = (P.Status.MEMORY, P.Cause(self.node, slot.pid, detail=detail))
        return True

    def next_deadline(self) -> float:
        """The earliest task timeout still to fire, or when waiting tasks go back to the broker; or infinity."""
        deadlines = [s.deadline for s in self.workers.values()
                     if s.state is WorkerState.BUSY and s.deadline and not s.doomed]
        return min([*deadlines, self.prefetch.deadline()])

    def give_back(self, now: float) -> list[int]:
        """Tasks waiting behind long ones for too long, to give back to the broker (see ``prefetch``)."""
        back = self.prefetch.give_back(now, self.queue, self.workers.values())
        if back:
            self.requested = 0  # the broker drops our unused credits with them
        return back

    def forget_tasks(self) -> list[bytes]:
        """The broker that sent our tasks is gone (a restarted one has a new epoch): drop them.

        Their producers resubmit them to the new broker; what is running now
        finishes, and its results are dropped. Returns the workers to stop: a
        stream or channel task there would wait for its producer for ever.
        """
        self.queue.clear()
        self.results.clear()
        self.streams.forget()
        for slot in self.workers.values():
            if slot.batch:
                slot.stale = True
        self.requested = 0
        return [slot.identity for slot in self.workers.values()
                if slot.stale and any(t.streamed or t.entry.flags & P.FLAG_CHANNEL for t in slot.batch)]

    def _estimate(self, task: QueuedTask) -> float:
        return self.durations.get(task.entry.digest, UNKNOWN_US)

    def _measure(self, digest: bytes, us: int) -> None:
        old = self.durations.get(digest)
        self.durations[digest] = float(us) if old is None else old + _ALPHA * (us - old)
        self._recent_us += _ALPHA * (us - self._recent_us)

    def assign(self, now: float) -> list[ToWorker]:
        """Give each idle worker a batch from the queue: at most its share of it (see ``_take_batch``)."""
        out: list[ToWorker] = []
        if self.queue:
            self._assign(now, out)
        self.prefetch.assigned(now, bool(out), bool(self.queue))
        return out

    def _assign(self, now: float, out: list[ToWorker]) -> None:
        share = 0
        for slot in self.workers.values():
            if slot.state is not WorkerState.IDLE:
                continue
            if not share:  # spread what is queued over the workers idle now
                idle = sum(1 for s in self.workers.values() if s.state is WorkerState.IDLE)
                share = -(-len(self.queue) // idle)
            batch = self._take_batch(share)
            if not batch:
                break
            out.append(self._to_worker(slot, batch))
            if batch[0].assembly is not None:  # alone: the parts of its payload come so far (the rest as they come)
                out += [ToWorker(slot.identity, part) for part in batch[0].assembly.received]
            if self.streams.kept:
                kept = self.streams.feed_kept(slot, batch)
                if kept is not None:
                    out.append(kept)
            if batch[0].entry.timeout_ms:  # tasks with a timeout go alone
                slot.deadline = now + batch[0].entry.timeout_ms / 1000
            if not self.queue:
                break

    def _take_batch(self, share: int) -> list[QueuedTask]:
        """The next batch: about BATCH_TARGET_US of estimated work, a long task alone, at most ``share`` tasks."""
        batch: list[QueuedTask] = []
        budget = float(BATCH_TARGET_US)
        nbytes = 0
        limit = min(share, P.BATCH_MAX_TASKS)
        while self.queue and len(batch) < limit and nbytes < P.BATCH_MAX_BYTES:
            task = self.queue[0]
            cost = self._estimate(task)
            alone = task.alone or task.entry.timeout_ms or cost >= ALONE_US
            if batch and (alone or cost > budget):
                break
            self.queue.popleft()
            batch.append(task)
            nbytes += P.payload_bytes(task.entry.payload)
            budget -= cost
            if alone:
                break
        return batch

    def _to_worker(self, slot: WorkerSlot, batch: list[QueuedTask]) -> ToWorker:
        entries = tuple(t.entry for t in batch)
        slot.batch = batch
        slot.state = WorkerState.BUSY
        return ToWorker(slot.identity, P.Tasks(entries, slot.shipped.functions(entries, self.funcs.__getitem__)))

    # ------------------------------------------------------------------ credits

    def batch_size(self) -> int:
        return max(1, min(P.BATCH_MAX_TASKS, int(BATCH_TARGET_US / max(self._recent_us, 1.0))))

    def credit_target(self) -> int:
        if not self.accepting or self.prefetch.holding:
            return 0
        if self._recent_us >= RETURN_AFTER * 1e6:  # a round trip is nothing to tasks this long: no prefetch
            return max(1, self.live())
        return max(2, self.live() * self.batch_size() * 2)

    def held(self) -> int:
        return len(self.queue) + sum(len(s.batch) for s in self.workers.values())

    def credits_to_ask(self) -> int:
        """Credits to announce now (0: none); the caller sends READY and we count them asked."""
        if not self.accepting:
            return 0
        target = self.credit_target()
        want = target - self.held() - self.requested
        if want <= 0:
            return 0
        idle = any(s.state is WorkerState.IDLE for s in self.workers.values())
        if want * 2 >= target or (idle and not self.queue):
            self.requested += want
            return want
        return 0

    def reset_credits(self) -> None:
        """The broker forgot us (restart, or we were declared dead): ask afresh."""
        self.requested = 0

    def busy(self) -> int:
        return sum(1 for s in self.workers.values() if s.state is WorkerState.BUSY)

    # ------------------------------------------------------------------ what goes to the broker

    def take_results(self) -> list[P.ResultEntry] | None:
        """Pop the next run of pending results that fits one message, or None."""
        if not self.results:
            return None
        entries = next(P.batches(self.results))
        self.results = self.results[len(entries):]
        return list(entries)

    def put_back_results(self, entries: Iterable[P.ResultEntry]) -> None:
        """A run ``take_results`` gave that could not go now: first in line again."""
        self.results[:0] = entries

    def take_items(self) -> tuple[list[P.ItemEntry], list[P.Credit]] | None:
        return self.streams.take_items()

    def put_back_items(self, entries: list[P.ItemEntry], credits: list[P.Credit]) -> None:
        self.streams.put_back_items(entries, credits)
