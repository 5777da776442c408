"""The agent's core: every rule of a zpar-agent, its timers included, with no sockets, processes or clock.

The shell (``server.AgentServer``) feeds it ``(now, event)`` and performs the
actions it returns, in order (see ``actions``)::

    event                                        actions it may return
    start(now)                                   Spawn x N, HELLO
    from_broker(now, msg)                        ToWorker, Kill, HELLO, RESULT again, Exit (PART: on to its worker;
                                                 CONTROL: a drain, or Spawn / BYE to resize, then HELLO)
    from_worker(now, identity, msg)              ToWorker (batches, given-back tasks; BYE to recycle)
    worker_exited(now, identity, pid, code)      Spawn (now, or after a back-off)
    rss_after_task(now, identity, rss)           ToWorker (BYE to recycle)
    rss_while_busy(now, identity, rss)           Kill (past 1.5 x the limit: MEMORY)
    probed(now, refused, parent)                 Exit
    signalled(now)                               Exit, or a drain begins
    tick(now)                                    Measure, Kill, Spawn, Probe, HEARTBEAT, RESULT again, HELLO, Exit
    next_run(now)                                the next ITEMS or RESULT for the collector, or None
    unsent(now, msgs)                            -- the collector could not take them: kept, in order
    credits(now)                                 READY
    shutdown(now)                                BYE, Kill x N

The collector pushes back (a full queue; none before the first WELCOME), so
what piled up for it is pulled a run at a time (``next_run``) until one
cannot go (``unsent``), once per turn of the loop; then ``credits``.
``next_deadline()`` is when ``tick`` has something to do; ``rss_wanted`` asks
whether to read a worker's memory before its results go in.

Its parts, one role each: ``Slots`` (workers, batches, credits, what a death
means), ``BrokerSession`` (registration, heartbeats, liveness, results not
acknowledged) and the rules of ``lifecycle`` (respawn back-off, SIGTERM then
SIGKILL, the memory limit, the drain).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from zpar import _refs
from zpar import protocol as P
from zpar._text import printable

from .actions import Action, Exit, Measure, Probe, Spawn, ToWorker
from .lifecycle import KILL_GRACE, SHUTDOWN_GRACE, Backoff, Drain, MemoryLimit, next_kill, overdue, terminate
from .prefetch import RETURN_AFTER
from .records import WorkerState
from .session import BrokerSession
from .slots import Slots
from .spawn import worker_identity

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settings:
    """What the core is told once: who the agent is, and the limits it keeps."""

    node: str  # the agent's name: in its HELLO and in every Cause
    identity: bytes  # its DEALER identity: names its results on the collector hop
    host: str = ""
    pid: int = 0
    workers: int = 1
    heartbeat: float = 1.0  # until the broker's WELCOME sets the pace
    liveness: int = 3
    max_tasks_per_worker: int = 0  # recycle a worker after this many tasks (0: never)
    max_memory_per_worker: int = 0  # MiB (0: no limit)
    grace: float = 30.0  # seconds the first SIGTERM gives held tasks
    parent_pid: int = 0  # stop when this process is no longer our parent (0: do not watch)
    broker: str = ""  # where the broker is, for people
    resources: tuple[tuple[str, float], ...] = ()  # what it offers tasks that ask for resources (--resources)


class AgentCore:
    """Every rule of an agent: fed ``(now, event)``, returns the actions to perform."""

    def __init__(self, settings: Settings, now: float) -> None:
        self.settings = settings
        self.slots = Slots(settings.node, max_tasks_per_worker=settings.max_tasks_per_worker)
        hello = P.Hello(P.Role.AGENT, settings.node, settings.host, settings.pid, resources=settings.resources)
        self.session = BrokerSession(settings.identity, hello, now, heartbeat=settings.heartbeat,
                                     liveness=settings.liveness)
        self.backoff = Backoff()
        self.memory = MemoryLimit(settings.max_memory_per_worker, now)
        self.drain = Drain(settings.grace)
        self.stopping = False  # shutdown: no respawns, no credits, only SIGKILLs left to send
        self._generation = 0  # names workers w1, w2, ...
        self.target = settings.workers  # workers to keep (CONTROL may change it: the dashboard's resize)

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> list[Action]:
        """Start the workers and introduce ourselves to the broker."""
        out: list[Action] = [self._spawn() for _ in range(self.settings.workers)]
        out.append(self._hello())
        return out

    def from_broker(self, now: float, msg: P.Message) -> list[Action]:
        """A broker's message (any one is a sign of life)."""
        self.session.heard(now)
        if isinstance(msg, P.Tasks):
            return list(self.slots.tasks(msg, now))
        if isinstance(msg, P.Part):
            return list(self.slots.part(msg))
        if isinstance(msg, P.Control):
            return self._control(now, msg)
        if isinstance(msg, P.Ack):
            self.session.acked(msg.ids)
            return []
        if isinstance(msg, P.Feed):
            return list(self.slots.feed(msg))
        if isinstance(msg, P.Release):
            return self._release(msg.digests)
        if isinstance(msg, P.Cancel):  # the user's own doing: no warning
            return self._kills(now, self.slots.cancel(msg.ids), "its task was cancelled", logging.INFO)
        if isinstance(msg, P.Welcome):
            return self._welcome(now, msg)
        if isinstance(msg, P.Error):
            log.warning("the broker refused a message (%s%s)", msg.code.name,
                        f": {printable(msg.detail)}" if msg.detail else "")
            return [self._hello()] if msg.code is P.ErrorCode.UNKNOWN_PEER else []
        if isinstance(msg, P.Bye) and msg.reason is P.ByeReason.KEY_REVOKED:
            log.error("refused by the broker (AuthenticationError): this node's key was removed from its "
                      "allow-list; stopping")
            return [Exit(1)]
        if isinstance(msg, P.Bye):
            log.info("broker is stopping (%s); waiting for it to return", msg.reason.name.lower())
            self.session.left()
        return []

    def from_worker(self, now: float, identity: bytes, msg: P.Message) -> list[Action]:
        """A worker's message: its results (its next batch goes once all are in), tasks it gives back (GIVE_BACK:
        not started, for another worker), its stream's items, or its HELLO (ready)."""
        if isinstance(msg, P.Result):
            return self._recycle(self.slots.worker_results(identity, msg, now))
        if isinstance(msg, P.GiveBack):
            return self._recycle(self.slots.given_back(identity, msg.ids, now))
        if isinstance(msg, P.Hello):
            self.backoff.ready()  # workers start again: forget earlier failures
            return self._recycle(self.slots.worker_ready(identity, msg.pid, now))
        if isinstance(msg, P.Items):
            self.slots.worker_items(identity, msg)
        return []

    def worker_exited(self, now: float, identity: bytes, pid: int, returncode: int) -> list[Action]:
        """Worker process ``pid`` ended with ``returncode`` (negative: that signal); a new one takes its place."""
        never_ready = self.slots.state(identity) is WorkerState.STARTING
        self.slots.worker_exited(identity, returncode)
        if self.stopping or self.slots.live() >= self.target:  # none in its place: the node was made smaller
            return []
        if never_ready:  # a worker that cannot even start: back off instead of spinning
            delay = self.backoff.failed(now)
            log.error("worker pid %d exited with %d before it was ready; retrying in %.1f s", pid, returncode, delay)
            return []
        return [self._spawn()]

    def rss_wanted(self, now: float, identity: bytes) -> int:
        """The pid whose memory to read before this worker's results go in (0: none now).

        The limit is checked between tasks, at most every ``MEMORY_CHECK_S``
        per worker; answer with ``rss_after_task``.
        """
        slot = self.slots.workers.get(identity)
        if slot is None or not self.memory.check_due(slot, now):
            return 0
        return slot.pid

    def rss_after_task(self, now: float, identity: bytes, rss: int) -> list[Action]:
        """A worker whose task ends uses ``rss`` bytes: past the limit it is recycled once its batch is done."""
        slot = self.slots.workers.get(identity)
        if slot is not None and self.memory.over_soft(slot, rss):
            self.slots.retire(identity)
        return self._recycle([])

    def rss_while_busy(self, now: float, identity: bytes, rss: int) -> list[Action]:
        """The answer to ``Measure``: past the hard limit its task ends as MEMORY, and the worker is stopped."""
        detail = self.memory.over_hard(rss)
        if detail and self.slots.over_memory(identity, detail):
            return self._kills(now, [identity], "over the memory limit")
        return []

    def probed(self, now: float, refused: str | None, parent: int) -> list[Action]:
        """The answer to ``Probe``: why the broker refused our handshake (None: it did not); our parent's pid."""
        if refused:
            log.error("refused by the broker (AuthenticationError): %s; stopping", refused)
            return [Exit(1)]
        expected = self.settings.parent_pid
        if expected and parent != expected:
            log.warning("parent process %d is gone; stopping", expected)
            return [Exit(0)]
        return []

    def signalled(self, now: float) -> list[Action]:
        """SIGTERM or SIGINT: the first drains (no new work; held tasks get the grace), the second stops now."""
        if self.drain.signalled(now):
            return [Exit(0)]
        self.slots.accepting = False
        log.info("draining: finishing %d tasks within %.0f s (signal again to stop now)", self.slots.held(),
                 self.drain.grace)
        return [Exit(0)] if self.drain.over(now, self.slots.held()) else []

    def tick(self, now: float) -> list[Action]:
        """Fire the timers that are due (cheap when none is)."""
        workers = self.slots.workers.values()
        if self.stopping:
            return list(overdue(workers, now))
        out: list[Action] = []
        if self.memory.watch_due(now):
            out += [Measure(s.identity, s.pid) for s in self.slots.busy_slots() if s.pid]
        out += self._kills(now, self.slots.expired(now), "its task ran past its timeout")
        out += overdue(workers, now)
        if self.drain.active and self.drain.over(now, self.slots.held()):
            out.append(Exit(0))
            return out
        out += [self._spawn() for _ in range(self.backoff.due(now))]
        back = self.slots.give_back(now)
        if back:
            log.info("%d tasks waited %.1f s behind long ones: given back to the broker", len(back), RETURN_AFTER)
            out += [P.GiveBack(ids) for ids in P.chunks(back)]
        if self.session.beat_due(now):
            out.append(Probe())
            out.append(P.Heartbeat(self.slots.busy()))
            out += self.session.overdue(now)
            if self.session.silent(now):
                out.append(self._hello())
        return out

    def next_run(self, now: float) -> P.Items | P.Result | None:
        """The next run for the collector: streams' items first, then results (kept until acknowledged)."""
        items = self.slots.take_items()
        if items is not None:
            return self.session.items(*items)
        entries = self.slots.take_results()
        if entries is not None:
            return self.session.results(now, entries)
        return None

    def unsent(self, now: float, msgs: list[P.Result | P.Items]) -> None:
        """The collector could not take these now (in the order given): first in line again."""
        for msg in reversed(msgs):
            if isinstance(msg, P.Items):
                self.slots.put_back_items(list(msg.items), list(msg.credits))
            else:
                self.session.acked(tuple(e.id for e in msg.results))  # counted as sent when they go
                self.slots.put_back_results(msg.results)

    def credits(self, now: float) -> list[Action]:
        """READY for the credits to ask now, if any (none before a WELCOME or while stopping)."""
        if not self.session.welcomed or self.stopping:
            return []
        n = self.slots.credits_to_ask()
        return [P.Ready(n)] if n else []

    def shutdown(self, now: float) -> list[Action]:
        """Stop: take no work, say BYE, stop every worker (SIGKILL after SHUTDOWN_GRACE)."""
        self.stopping = True
        self.slots.accepting = False
        log.info("zpar-agent %s stopping", self.settings.node)
        out: list[Action] = [P.Bye(P.ByeReason.LEAVING)]
        out += [terminate(slot, now, SHUTDOWN_GRACE) for slot in self.slots.workers.values()]
        return out

    def next_deadline(self) -> float:
        """When ``tick`` next has something to do (infinity: never by itself)."""
        kill = next_kill(self.slots.workers.values())
        if self.stopping:
            return kill
        return min(self.session.next_beat, self.backoff.next_deadline(), kill, self.slots.next_deadline(),
                   self.memory.next_watch, self.drain.next_deadline())

    # ------------------------------------------------------------------ rules shared by the events

    def _spawn(self) -> Spawn:
        self._generation += 1
        identity = worker_identity(self._generation)
        self.slots.add_worker(identity)
        return Spawn(identity)

    def _hello(self) -> P.Hello:
        self.slots.reset_credits()
        return self.session.hello(min(self.slots.live(), self.target))

    def _control(self, now: float, msg: P.Control) -> list[Action]:
        """The broker steering this node (its dashboard): drain it, or change how many workers it keeps."""
        if msg.action is P.Action.DRAIN:
            if self.drain.active or self.stopping:
                return []
            log.info("the broker asked this node to drain")
            return self.signalled(now)
        if msg.action is P.Action.STOP:
            log.info("the broker asked this node to stop now")
            return [Exit(0)]
        live = self.slots.live()
        log.info("the broker asked for %d workers (%d now)", msg.workers, live)
        self.target = msg.workers
        if msg.workers < live:
            self.slots.shrink(live - msg.workers)
            out = self._recycle([])  # BYE to the idle ones now
        else:
            out = [self._spawn() for _ in range(msg.workers - live)]
        out.append(self._hello())  # the broker learns the new count (and we ask for credits afresh)
        return out

    def _welcome(self, now: float, msg: P.Welcome) -> list[Action]:
        out: list[Action] = []
        if self.session.restarted(msg):
            log.warning("the broker restarted (epoch %s, was %s); dropping the %d tasks of the old one",
                        printable(msg.epoch[:8]), printable(self.session.epoch[:8]), self.slots.held())
            out += self._kills(now, self.slots.forget_tasks(), "its stream was for a broker that is gone")
            # The new broker knows nothing of the old one's scattered objects: nobody would release them.
            out += self._release([d for d, blob in self.slots.funcs.items() if _refs.is_object(blob)])
        out += self.session.welcome(now, msg)
        log.info("registered with broker %s (epoch %s)", self.settings.broker, printable(msg.epoch[:8]))
        return out

    def _release(self, digests: Iterable[bytes]) -> list[Action]:
        """Scattered objects the broker let go (RELEASE): dropped here, and in each worker that has one."""
        funcs = self.slots.funcs
        gone = [d for d in digests if funcs.pop(d, None) is not None]
        out: list[Action] = []
        for slot in self.slots.workers.values():
            there = [d for d in gone if d in slot.shipped.known]
            if there:
                slot.shipped.forget(there)
                out += [ToWorker(slot.identity, P.Release(ids)) for ids in P.chunks(there)]
        return out

    def _kills(self, now: float, identities: Iterable[bytes], why: str, level: int = logging.WARNING) -> list[Action]:
        """SIGTERM for these workers now, SIGKILL after KILL_GRACE if they are still there."""
        out: list[Action] = []
        for identity in identities:
            slot = self.slots.workers.get(identity)
            if slot is not None:
                log.log(level, "stopping worker pid %d: %s", slot.pid, why)
                out.append(terminate(slot, now, KILL_GRACE))
        return out

    def _recycle(self, sends: list[ToWorker]) -> list[Action]:
        """``sends``, then a BYE for each worker to recycle now."""
        out: list[Action] = list(sends)
        for identity in self.slots.retiring():
            log.info("recycling worker %s", identity.decode())
            out.append(ToWorker(identity, P.Bye(P.ByeReason.RECYCLED)))
        return out
