"""The broker's routing state, with no sockets: fed ``(now, event)``, returns messages.

Tasks flow through three places and are in exactly one at a time::

    producer.queue  --dispatch-->  agent.assigned  --RESULT-->  (forgotten)
          ^                              |
          +------ agent dead or BYE -----+

The broker never unpickles: a task's payload frames are kept as received and forwarded as they are.
Task ids on the agent side are the broker's own global ids (``gid``), so two producers' ids never
collide and a late result for a task that finished or moved can be recognised and dropped. Streams
(zpar.streaming) are routed by ``streams.StreamRouting``, a part this class holds; a task that has
exchanged an item is never run again: re-running it could repeat an item or lose an input.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from zpar import protocol as P
from zpar._liveness import PRODUCER_SLACK, Liveness
from zpar._text import printable
from zpar.errors import ProtocolError

from . import objects
from .limits import Limits, admit_functions, over_quota
from .outgoing import Dest, Outgoing, forced_cancels
from .records import (
    AgentRecord,
    ProducerRecord,
    TaskRecord,
    TaskState,
    count_ended,
    count_submitted,
    note_names,
    producer_status,
    renumbered,
    report,
)
from .resources import Placement, words
from .scheduling import dispatch
from .streams import StreamRouting
from .telemetry import HISTORY_SIZE, OUTCOMES, Durations, History

log = logging.getLogger(__name__)
_FINISHED = {outcome: f"finished_{outcome}" for outcome in OUTCOMES.values()}  # the counter each outcome ends in
_SCALE_REFUSED = ("with key files, clients may not resize nodes: resize it from the broker's dashboard (POST "
                  "/api/nodes/workers with the token in the broker's log), or start zpar-broker with "
                  "--allow-client-scale")


def _why(cause: P.Cause | None) -> str:
    """Why a run ended without a value, in words, for the task history ("" for a value)."""
    if cause is None:
        return ""
    return "; ".join(part for part in (cause.ended(), cause.detail) if part)

class BrokerCore:
    """Queues, credits, round-robin fairness, the assignment table, liveness, per-producer quotas.

    ``limits``: what one producer may hold here (``limits.Limits``: queued tasks and bytes,
    function blobs); past them its tasks are refused with QUOTA_EXCEEDED.

    ``coalesce``: the loop calls ``flush()`` once per turn, after reading every
    socket, and only then are tasks dispatched, results sent on (one RESULT per
    producer) and ACKs sent (one per agent): a turn's READYs and SUBMITs make a
    few large TASKS instead of one small one each (with many agents, each
    message would otherwise carry a task or two). Without it (the tests' way,
    one event at a time) every event's messages come out at once.
    """

    def __init__(self, now: float, *, heartbeat: float = 1.0, liveness: int = 3, collector: str = "",
                 max_message_size: int = 0, security: str = "none", limits: Limits | None = None,
                 coalesce: bool = False) -> None:
        self.limits = limits or Limits()  # per-producer quotas (limits.py)
        self.epoch = uuid.uuid4().hex
        self.security = security  # shown in status: how peers are authenticated
        self.heartbeat, self.liveness, self._rule = heartbeat, liveness, Liveness(heartbeat, liveness)
        self.collector, self.max_message_size, self.started = collector, max_message_size, now
        self._next_gid = 1
        self._tasks: dict[int, TaskRecord] = {}  # gid -> task: the assignment table
        self._producers: dict[bytes, ProducerRecord] = {}
        self._active: collections.deque[ProducerRecord] = collections.deque()  # producers with queued tasks
        self._agents: dict[bytes, AgentRecord] = {}
        self._next_beat = now + heartbeat
        self.counters: collections.Counter[str] = collections.Counter()
        self._streams = StreamRouting(self._tasks, self.counters, self.limits.queued_bytes)
        self._placement = Placement()  # tasks that ask for resources (resources.py)
        self._coalesce = coalesce
        self._dispatch_due = False
        self._acks: dict[bytes, list[int]] = {}  # agent -> result ids to ACK at the next flush
        self.durations = Durations()  # run times of the tasks that ended with a value (telemetry.py)
        self.history = History()  # the tasks that ended, latest last (telemetry.py)
        self.history_open = True  # whether STATUS may list every producer's tasks (not with key files)
        self.scale_open = True  # whether a STATUS may resize a node (Client.scale; not with key files unless allowed)
        self.dashboard = ""  # its link (web.py), for status; "" when there is none
        self._routed: dict[bytes, list[P.ResultEntry]] = {}  # producer -> results to send at the next flush
        #: Results may name this host's shared-memory segments (the embedded hub): a value kept for the tasks
        #: that take it is read out of its segment, which its producer removes once it has mapped it.
        self.shared_values = False
        self._late: list[Outgoing] = []  # to send after the next flush's results (DEPENDENCY_GONE)
        self._value_files: dict[bytes, str] = {}  # digest -> a kept value's segment (the embedded hub's)

    # ------------------------------------------------------------------ events

    def producer_message(self, now: float, peer: bytes, msg: P.Message) -> list[Outgoing]:
        prod = self._producers.get(peer)
        if prod is None:
            if isinstance(msg, P.StatusMsg):  # `zpar status` is not a producer
                return self._asked(now, peer, msg.info)
            if isinstance(msg, P.Bye):
                return []
            if not isinstance(msg, P.Hello):
                # Forgotten (silent too long), or from before a broker restart: it must
                # say HELLO and send its unfinished tasks again.
                self.counters["unknown_producer_messages"] += 1
                return [Outgoing(Dest.FRONTEND, peer, P.Error(P.ErrorCode.UNKNOWN_PEER))]
            prod = self._producers[peer] = ProducerRecord(peer, now)
        prod.last_seen = now
        out: list[Outgoing] = []
        if isinstance(msg, P.Submit):
            self._accept(prod, msg, out)
            self._dispatch(out)
        elif isinstance(msg, P.Part):
            self._part(prod, msg, out)
        elif isinstance(msg, P.Hello):
            prod.name, prod.host = msg.name, msg.host
            out.append(Outgoing(Dest.FRONTEND, peer, self._welcome()))
        elif isinstance(msg, P.Cancel):
            self._cancel(prod, msg.ids, msg.force, out)
        elif isinstance(msg, P.Feed):
            over = self._streams.feed(prod, msg, out)
            if over:  # a clear refusal for those tasks; nothing of the others is touched
                self._cancel(prod, over, False, out)
                self.counters["refused_over_quota"] += len(over)
                out.append(Outgoing(Dest.FRONTEND, peer, P.Error(P.ErrorCode.QUOTA_EXCEEDED, tuple(over), (
                    f"the objects sent to its tasks not started yet pass the broker's limit of "
                    f"{self.limits.queued_bytes} queued bytes; start fewer channel tasks at once, or raise "
                    "--max-queued-bytes"))))
        elif isinstance(msg, P.StatusMsg):
            out += self._asked(now, peer, msg.info)
        elif isinstance(msg, P.Bye):
            self._forget_producer(prod, out)
        elif isinstance(msg, P.Heartbeat):
            out.append(Outgoing(Dest.FRONTEND, peer, P.Heartbeat()))  # so the producer knows we live
        elif isinstance(msg, P.Release):  # scattered objects it dropped: freed here, then on the nodes
            objects.let_go(prod, msg.digests)
            out += self._sweep_objects()
        else:
            self.counters["protocol_errors"] += 1
            out.append(Outgoing(Dest.FRONTEND, peer, P.Error(P.ErrorCode.NOT_ALLOWED, (), msg.kind.name)))
        return out

    def agent_message(self, now: float, peer: bytes, msg: P.Message) -> list[Outgoing]:
        out: list[Outgoing] = []
        agent = self._agents.get(peer)
        if isinstance(msg, P.Hello):
            if agent is not None:
                # The same agent process again (it thought we were gone, or HELLOs queued while
                # we were): it still holds its tasks, so keep them; it asks for credits afresh.
                agent.credits, agent.workers, agent.last_seen = 0, msg.workers, now
                agent.offer(msg.resources)
                self.counters["agents_hello_again"] += 1
            else:
                agent = self._agents[peer] = AgentRecord(peer, msg, now)
                log.info("agent %s joined from %s (pid %d, %d workers%s)", printable(agent.name),
                         printable(agent.host), agent.pid, agent.workers,
                         f"; resources {words(msg.resources)}" if msg.resources else "", extra={"node": agent.name})
            out.append(Outgoing(Dest.BACKEND, peer, self._welcome()))
            return out
        if agent is None:
            # Dropped as silent, or from before a broker restart: it must register anew.
            self.counters["unknown_agent_messages"] += 1
            out.append(Outgoing(Dest.BACKEND, peer, P.Error(P.ErrorCode.UNKNOWN_PEER)))
            return out
        agent.last_seen = now
        if isinstance(msg, P.Ready):
            agent.credits += msg.credits
            self._dispatch(out)
        elif isinstance(msg, P.Heartbeat):
            agent.busy = msg.busy
            if msg.stats is not None:
                agent.stats = msg.stats
        elif isinstance(msg, P.GiveBack):
            self._given_back(agent, msg.ids)
            self._dispatch(out)
        elif isinstance(msg, P.Bye):
            log.info("agent %s left (%s)", printable(agent.name), msg.reason.name.lower(), extra={"node": agent.name})
            self._drop_agent(agent, "left", out)
            self._dispatch(out)
        else:
            self.counters["protocol_errors"] += 1
            out.append(Outgoing(Dest.BACKEND, peer, P.Error(P.ErrorCode.NOT_ALLOWED, (), msg.kind.name)))
        return out

    def results(self, now: float, msg: P.Result) -> list[Outgoing]:
        """Results from the collector: route each to its producer, once; retry lost runs."""
        out: list[Outgoing] = []
        if msg.agent:  # the agent keeps results until we say we have them
            if self._coalesce:
                self._acks.setdefault(msg.agent, []).extend(e.id for e in msg.results)
            else:
                out.append(Outgoing(Dest.BACKEND, msg.agent, P.Ack(tuple(e.id for e in msg.results))))
        if msg.epoch and msg.epoch != self.epoch:
            # Tasks of a broker before a restart: their ids mean nothing here (producers resubmit).
            self.counters["stale_epoch_results"] += len(msg.results)
            return out
        if (agent := self._agents.get(msg.agent)) is not None:
            agent.last_seen = now
        node = agent.name if agent is not None else ""
        when = time.time()  # wall clock, for the task history
        by_producer: dict[bytes, list[P.ResultEntry]] = {}
        for entry in msg.results:
            task = self._tasks.get(entry.id)
            if task is None:
                self.counters["late_results"] += 1  # finished elsewhere, cancelled, or its producer left
                continue
            if msg.agent not in task.holders:  # only an agent it was given to may end it (a late one, once)
                self.counters["results_not_from_holder"] += 1
                continue
            if entry.status == P.Status.LOST:
                if task.agent is None or task.agent.id != msg.agent:  # the task has moved on already
                    self.counters["stale_loss_reports"] += 1
                    continue
                cause = entry.cause or P.Cause()
                if self._lost(task, cause, out):
                    continue  # queued again
                entry = entry._replace(cause=self._gave_up(task, cause))
            del self._tasks[entry.id]
            if task.state is TaskState.QUEUED:  # a dropped agent's late result: accepted, so not run again
                task.producer.unqueue(task)
                self.counters["late_results_accepted"] += 1
            self._unlink(task)
            ended = entry.cause
            if ended is None:  # a value: its run time goes in the histogram
                self.durations.observe(entry.duration_us)
            self._finished(task, OUTCOMES[entry.status], when, node, entry.worker or (ended.pid if ended else 0),
                           entry.duration_us, entry.error or _why(ended))
            by_producer.setdefault(task.producer.id, []).append(renumbered(entry, task.ptid))
            if task.dependents:  # after its own result: the producer fails a dependent from its error
                self._settle(task, entry, by_producer)
        self._route(by_producer, out)
        self._dispatch(out)
        return out

    def flush(self) -> list[Outgoing]:
        """What this turn's events left to send (``coalesce``): ACKs, results, then new TASKS."""
        out: list[Outgoing] = []
        for aid, ids in self._acks.items():
            out += [Outgoing(Dest.BACKEND, aid, P.Ack(chunk)) for chunk in P.chunks(ids)]
        for pid, entries in self._routed.items():
            out += [Outgoing(Dest.FRONTEND, pid, P.Result(tuple(batch))) for batch in P.batches(entries)]
        if self._late:
            out += self._late
            self._late = []
        self._acks, self._routed = {}, {}
        if self._dispatch_due:
            self._dispatch_due = False
            dispatch(self._active, self._agents, out, self._placement)
        return out

    def items(self, now: float, msg: P.Items) -> list[Outgoing]:
        """Streams' items (and read credits) from the collector, for their producers (see StreamRouting)."""
        if (agent := self._agents.get(msg.agent)) is not None:
            agent.last_seen = now
        if msg.epoch and msg.epoch != self.epoch:
            self.counters["stale_epoch_items"] += len(msg.items)
            return []
        return self._streams.items(msg)

    def tick(self, now: float, judge: bool = True) -> list[Outgoing]:
        """Timers: heartbeats to agents, and dropping agents and producers that went silent.

        ``judge`` False (messages still wait unread in our sockets) postpones the
        verdicts: their heartbeats may be among them.
        """
        out: list[Outgoing] = []
        if now < self._next_beat:
            return out
        self._next_beat = now + self.heartbeat
        deadline = self._rule.cutoff(now) if judge else float("-inf")
        producer_deadline = self._rule.cutoff(now, PRODUCER_SLACK) if judge else float("-inf")
        beat = P.Heartbeat()  # one message for every agent: the loop encodes it once
        for agent in list(self._agents.values()):
            if agent.last_seen < deadline:
                log.warning("agent %s silent for %.1f s; re-queueing its %d tasks",
                            printable(agent.name), now - agent.last_seen, len(agent.assigned),
                            extra={"node": agent.name})
                self._drop_agent(agent, "silent", out)
            else:
                out.append(Outgoing(Dest.BACKEND, agent.id, beat))
        for prod in list(self._producers.values()):
            if prod.last_seen < producer_deadline:
                log.warning("producer %s on %s silent for %.1f s; dropping its %d tasks",
                            printable(prod.label()), printable(prod.host), now - prod.last_seen, len(prod.tasks),
                            extra={"producer": prod.label()})
                self._forget_producer(prod, out)
                self.counters["producers_silent"] += 1
        out += self._sweep_objects()
        if self._placement.waiting or self._placement.unmet:
            self._resource_timeouts(now, out)
        self._dispatch(out)
        return out

    def next_deadline(self) -> float:
        return self._next_beat

    def has_agent(self, peer: bytes) -> bool:  # read-only: the shell forgets what it noted of a dropped agent
        return peer in self._agents

    def has_producer(self, peer: bytes) -> bool:
        return peer in self._producers

    def revoke(self, now: float, peer: bytes) -> list[Outgoing]:
        """A connected peer's key was revoked: forget it as the agent or producer it is, and tell it why."""
        bye = P.Bye(P.ByeReason.KEY_REVOKED)
        if peer in self._agents:
            return [*self.agent_message(now, peer, bye), Outgoing(Dest.BACKEND, peer, bye)]
        if peer in self._producers:
            notice = P.Error(P.ErrorCode.KEY_REVOKED)
            return [*self.producer_message(now, peer, bye), Outgoing(Dest.FRONTEND, peer, notice)]
        return []

    def farewells(self) -> list[Outgoing]:
        """A BYE for every agent and producer (the broker is stopping)."""
        bye = P.Bye(P.ByeReason.STOPPING)
        return ([Outgoing(Dest.BACKEND, a, bye) for a in self._agents]
                + [Outgoing(Dest.FRONTEND, p, bye) for p in self._producers])

    def status(self, now: float) -> dict[str, Any]:
        info = report(now, self.epoch, self.started, self.security, self._agents.values(),
                      self._producers.values(), len(self._tasks), self.counters)
        if self._placement.waiting:  # tasks asking for resources no connected node offers
            info["unplaceable"] = self._placement.status(now, self._agents.values())
        if self.dashboard:
            info["dashboard"] = self.dashboard
        if self.history_open:  # with key files producers do not see each other (see history_open)
            info["producer_list"] = [producer_status(p, now) for p in self._producers.values()]
        return info

    def control(self, node: str, action: P.Action, workers: int = 0, by: str = "dashboard",
                ) -> tuple[list[Outgoing], str]:
        """Steer the agent named ``node`` (the dashboard; a client's resize, ``by`` says): CONTROL to it, and what
        was done (or why not)."""
        found = [a for a in self._agents.values() if a.name == node]
        if len(found) != 1:
            return [], f"no node named {node!r}" if not found else f"{len(found)} nodes are named {node!r}"
        agent = found[0]
        self.counters[f"control_{action.value}"] += 1
        log.info("%s: %s node %s%s", by, action.value, printable(node), f" to {workers}" if workers else "",
                 extra={"node": node})
        return [Outgoing(Dest.BACKEND, agent.id, P.Control(action, workers))], "sent"

    def cancel_for(self, producer: str, task: int | None) -> tuple[list[Outgoing], int]:
        """Cancel one task of the producer labelled ``producer``, or all of them (None), from the dashboard:
        dropped if queued, stopped if running, and the producer told (CANCELLED); how many."""
        prod = next((p for p in self._producers.values() if p.label() == producer), None)
        if prod is None:
            return [], 0
        ids = list(prod.tasks) if task is None else [task] if task in prod.tasks else []
        out: list[Outgoing] = []
        cause = P.Cause("the broker", detail="cancelled from the broker's dashboard")
        self._cancel(prod, ids, True, out, cause.detail)
        self._route({prod.id: [P.ResultEntry(i, P.Status.CANCELLED, cause=cause) for i in ids]}, out)
        if ids:
            log.info("dashboard: cancelled %d tasks of producer %s", len(ids), printable(producer),
                     extra={"producer": producer})
        return out, len(ids)

    def tasks(self, limit: int = 100, failed: bool = False) -> list[dict[str, Any]]:
        """The latest tasks that ended (``zpar tasks``, /api/tasks), newest first."""
        return self.history.recent(max(1, min(limit, HISTORY_SIZE)), failed)

    def _asked(self, now: float, peer: bytes, request: dict[str, Any]) -> list[Outgoing]:
        """A STATUS request: what it asks done first (``{"scale": ...}``: a node resized), then its answer."""
        out: list[Outgoing] = []
        scaled = self._scale(request["scale"], out) if "scale" in request else None
        info = self._status_reply(now, request)
        if scaled is not None:
            info["scale"] = scaled
        out.append(Outgoing(Dest.FRONTEND, peer, P.StatusMsg(info)))
        return out

    def _scale(self, asked: Any, out: list[Outgoing]) -> dict[str, Any]:
        """``{"node": NAME, "workers": N}`` asked in a STATUS (zpar.Client.scale): CONTROL to that node, as the
        dashboard's resize. The answer, as data: ``ok``; else ``code`` (NOT_ALLOWED, MALFORMED) or ``matches``
        (how many nodes have that name: none, or several); ``detail`` is for people."""
        if not self.scale_open:
            self.counters["scale_refused"] += 1
            return {"ok": False, "code": int(P.ErrorCode.NOT_ALLOWED), "detail": _SCALE_REFUSED}
        node, workers = (asked.get("node"), asked.get("workers")) if isinstance(asked, dict) else (None, None)
        if (type(node) is not str or not 0 < len(node) <= P.MAX_NAME or type(workers) is not int
                or not 1 <= workers <= P.MAX_WORKERS):
            self.counters["protocol_errors"] += 1
            return {"ok": False, "code": int(P.ErrorCode.MALFORMED),
                    "detail": f"a resize names a node and asks for 1 to {P.MAX_WORKERS} workers"}
        sent, done = self.control(node, P.Action.WORKERS, workers, by="client")
        out += sent
        return {"ok": bool(sent), "matches": sum(a.name == node for a in self._agents.values()), "detail": done}

    def _status_reply(self, now: float, request: dict[str, Any]) -> dict[str, Any]:
        """STATUS's answer; with ``{"tasks": {"limit": n, "failed": bool}}`` asked, the task history too."""
        info = self.status(now)
        asked = request.get("tasks")
        if isinstance(asked, dict):
            if not self.history_open:
                info["tasks_refused"] = ("with key files, producers see no one else's tasks: ask the dashboard's "
                                         "/api/tasks with the token in the broker's log")
            else:
                limit, failed = asked.get("limit", 100), asked.get("failed", False)
                info["tasks"] = self.tasks(limit if type(limit) is int else 100, failed is True)
        return info

    def metrics(self, now: float) -> dict[str, Any]:
        """What /metrics shows (web.py), as plain data: counts since start, and gauges now."""
        counters = self.counters
        queued = sum(p.queued for p in self._producers.values())
        workers = sum(a.workers for a in self._agents.values())
        busy = sum(min(a.busy, a.workers) for a in self._agents.values())
        return {
            "submitted": counters["submitted"],
            "finished": {outcome: counters[counter] for outcome, counter in sorted(_FINISHED.items())},
            "queued": queued,
            "running": len(self._tasks) - queued - sum(p.waiting for p in self._producers.values()),
            "nodes": len(self._agents),
            "workers": {"busy": busy, "idle": workers - busy},
            "producers": len(self._producers),
            "durations": self.durations.snapshot(),
            "handshakes_refused": counters["handshakes_failed"],
            "protocol_errors": counters["protocol_errors"],
            "uptime": now - self.started,
        }

    def protocol_error(self, source: str) -> None:
        self.counters["protocol_errors"] += 1
        self.counters[f"protocol_errors_{source}"] += 1

    # ------------------------------------------------------------------ state

    def _welcome(self) -> P.Welcome:
        return P.Welcome(self.epoch, self.heartbeat, self.liveness, self.collector, self.max_message_size)

    def _accept(self, prod: ProducerRecord, msg: P.Submit, out: list[Outgoing]) -> None:
        limits = self.limits
        accepted = time.time()  # once a message: the task history's "submitted"
        funcs, refused_objects = objects.admit(prod, msg, limits, self.counters)  # scattered objects apart
        refused = admit_functions(prod, funcs, limits, self.counters)  # digest -> why its blob was refused
        if funcs:
            note_names(prod, funcs, limits.functions)
        missing: list[int] = []
        bad: list[int] = []
        gone: list[int] = []  # waiting for tasks that ended
        over: dict[P.ErrorCode, tuple[str, list[int]]] = {}  # QUEUE_FULL, QUOTA_EXCEEDED: (first why, ids)
        for entry in msg.tasks:
            if entry.id in prod.tasks:  # sent again (after a reconnect): we have it already
                self.counters["duplicate_submits"] += 1
                continue
            why = refused.get(entry.digest)
            if why is P.ErrorCode.BAD_FUNCTION:
                bad.append(entry.id)
                continue
            refusal = over_quota(prod, P.payload_bytes(entry.payload) + entry.part_bytes, why, limits)
            if refusal is None and entry.refs:
                refusal = objects.refusal(prod, entry, refused_objects, limits)
                if refusal is not None and refusal[0] in (P.ErrorCode.UNKNOWN_FUNCTION, P.ErrorCode.BAD_FUNCTION):
                    (missing if refusal[0] is P.ErrorCode.UNKNOWN_FUNCTION else bad).append(entry.id)
                    continue
            if refusal is not None:
                over.setdefault(refusal[0], (refusal[1], []))[1].append(entry.id)
                continue
            if entry.digest not in prod.funcs:
                missing.append(entry.id)
                continue
            deps = entry.sched.deps if entry.sched is not None else ()
            if deps and not all(d in prod.tasks or self._value_of(prod, d) for d in deps):
                gone.append(entry.id)  # a task it waits for ended here: its producer sends the values
                continue
            task = TaskRecord(self._next_gid, prod, entry, accepted)
            self._next_gid += 1
            self._tasks[task.gid] = task
            prod.tasks[entry.id] = task
            prod.funcs.use(entry.digest)
            if entry.refs:
                objects.hold(prod, entry.refs)
                values = entry.sched.values if entry.sched is not None else 0
                if values:  # other tasks' values its producer sent (they ended before it came): no Ref holds them
                    objects.let_go(prod, entry.refs[-values:])
            if deps:
                self._wait(task, deps)
            else:
                prod.enqueue(task)
            count_submitted(prod, entry.digest)
            self.counters["submitted"] += 1
        if missing:
            out.append(Outgoing(Dest.FRONTEND, prod.id, P.Error(P.ErrorCode.UNKNOWN_FUNCTION, tuple(missing))))
        if gone:
            self.counters["dependencies_gone"] += len(gone)
            told = [Outgoing(Dest.FRONTEND, prod.id, P.Error(P.ErrorCode.DEPENDENCY_GONE, chunk))
                    for chunk in P.chunks(gone)]
            if self._coalesce:  # behind this turn's results: the producer has the values when it reads this
                self._late += told
            else:
                out += told
        if bad:
            log.warning("producer %s on %s sent a function blob that does not match its digest; refused %d tasks",
                        printable(prod.label()), printable(prod.host), len(bad), extra={"producer": prod.label()})
            out.append(Outgoing(Dest.FRONTEND, prod.id, P.Error(
                P.ErrorCode.BAD_FUNCTION, tuple(bad), "the function blob does not hash to its digest")))
        for code, (detail, ids) in over.items():
            self.counters["refused_queue_full" if code is P.ErrorCode.QUEUE_FULL else "refused_over_quota"] += len(ids)
            out.append(Outgoing(Dest.FRONTEND, prod.id, P.Error(code, tuple(ids), detail)))
        self._activate(prod)

    def _cancel(self, prod: ProducerRecord, ids: Iterable[int], force: bool, out: list[Outgoing],
                why: str = "cancelled by its producer") -> None:
        """Queued tasks are dropped; with ``force``, agents also stop those running. ``why``: for the history."""
        stop: dict[bytes, list[int]] = {}
        failed: dict[bytes, list[P.ResultEntry]] = {}  # tasks that waited for those dropped
        when = time.time()
        for ptid in ids:
            task = prod.tasks.get(ptid)
            if task is None:
                continue
            if task.state is TaskState.QUEUED:
                prod.unqueue(task)  # a tombstone where it lies: O(1)
            elif task.state is TaskState.WAITING:
                task.state = TaskState.GONE  # in the lists of the tasks it waited for: skipped there
                prod.waiting -= 1
            elif (force or task.streamed or task.entry.flags & P.FLAG_CHANNEL or task.incomplete) \
                    and task.agent is not None:
                # A stream left running would wait at its window for ever, and a task short of parts
                # for parts that will not come: stopped too.
                stop.setdefault(task.agent.id, []).append(task.gid)
            else:  # running, not forced: it finishes and its result is discarded
                if task.dependents:  # ... and no task takes its value
                    self._settle(task, None, failed)
                continue
            self._tasks.pop(task.gid, None)
            self._unlink(task)
            self._finished(task, "cancelled", when, why=why)
            self.counters["cancelled"] += 1
            if task.dependents:
                self._settle(task, None, failed)
        out += forced_cancels(stop)
        self._route(failed, out)

    def _part(self, prod: ProducerRecord, part: P.Part, out: list[Outgoing]) -> None:
        """More of a task's payload (P.Part): kept, and sent on to the agent that has the task, if one has."""
        task = prod.tasks.get(part.id)
        if task is None or task.assembly is None:
            self.counters["parts_dropped"] += 1  # its task ended, was cancelled or refused (it comes again)
            return
        try:
            kept = task.assembly.add(part)
        except ProtocolError as exc:
            self.counters["parts_refused"] += 1
            log.warning("producer %s on %s: %s; task refused", printable(prod.label()), printable(prod.host), exc,
                        extra={"producer": prod.label(), "task": part.id})
            self._cancel(prod, (part.id,), True, out, f"refused: {exc}")
            out.append(Outgoing(Dest.FRONTEND, prod.id, P.Error(P.ErrorCode.MALFORMED, (part.id,), str(exc))))
            return
        if not kept:
            self.counters["parts_repeated"] += 1  # sent again with its task (a reconnect): we have it
            return
        self.counters["parts"] += 1
        if task.agent is not None:
            out += task.parts_for(task.agent, (part,))

    def _finished(self, task: TaskRecord, outcome: str, when: float, node: str = "", worker: int = 0,
                  duration_us: int = 0, why: str = "") -> None:
        """``task`` ended (any way: its result, its node gone past its retries, a cancel): counted, in its
        producer's progress, and in the history."""
        counters = self.counters
        counters[_FINISHED[outcome]] += 1
        if outcome == "ok":
            counters["done"] += 1
        elif outcome != "cancelled":
            counters["failed"] += 1
        prod = task.producer
        count_ended(prod, task.entry.digest, outcome == "ok")
        self.history.add(when, prod.label(), task.ptid, prod.names.get(task.entry.digest, ""), node, worker, outcome,
                         duration_us, task.attempts, why, task.submitted, task.dispatched)

    def _lost(self, task: TaskRecord, cause: P.Cause, out: list[Outgoing]) -> bool:
        """A run of ``task`` was lost: queue it again if it has retries left (True), else False."""
        task.attempts += 1
        if task.attempts > task.entry.retries or task.streamed:
            return False
        log.info("task %d of %s lost on %s; running it again (attempt %d of %d)", task.ptid,
                 printable(task.producer.label()), printable(cause.node), task.attempts + 1, task.entry.retries + 1,
                 extra={"task": task.ptid, "producer": task.producer.label(), "node": cause.node, "pid": cause.pid})
        self._requeue(task)
        self.counters["retried"] += 1
        return True

    def _requeue(self, task: TaskRecord) -> None:
        """Back to the front of its producer's queue, from the agent that held it."""
        if task.agent is not None:
            task.agent.release(task.gid)
            task.agent = None
        task.producer.enqueue(task, front=True)
        self._activate(task.producer)

    def _given_back(self, agent: AgentRecord, ids: tuple[int, ...]) -> None:
        """Its workers are held by long tasks (zpar.agent.prefetch): these go first to the next free worker.

        With them go its unused credits: it asks again once a worker of its is free.
        """
        agent.credits = 0
        for gid in reversed(ids):  # each to the front: the first given ends first
            task = agent.assigned.get(gid)
            if task is not None and not (task.streamed or task.entry.flags & P.FLAG_CHANNEL):  # no stream's
                self._requeue(task)
                self.counters["given_back"] += 1

    @staticmethod
    def _gave_up(task: TaskRecord, cause: P.Cause) -> P.Cause:
        """The cause the producer gets: how many runs were lost, and why no more."""
        if task.streamed:
            note = "not run again: it had exchanged stream items (see zpar.streaming)"
            return cause._replace(attempts=task.attempts, detail=f"{cause.detail}; {note}" if cause.detail else note)
        return cause._replace(attempts=task.attempts)

    def _activate(self, prod: ProducerRecord) -> None:
        if prod.queue.live and not prod.active:
            prod.active = True
            self._active.append(prod)
        if prod.shaped:  # tasks that ask for resources (resources.py)
            self._placement.activate(prod)

    def _resource_timeouts(self, now: float, out: list[Outgoing]) -> None:
        """Fail the queued tasks past their resource_timeout that no node could take (resources.py)."""
        when = time.time()
        for task, why in self._placement.expired(now, self._agents.values()):
            prod = task.producer
            prod.unqueue(task)
            del self._tasks[task.gid]
            self._unlink(task)
            self._finished(task, "lost", when, why=f"resources unavailable: {why}")
            self.counters["resource_timeouts"] += 1
            out.append(Outgoing(Dest.FRONTEND, prod.id, P.Error(P.ErrorCode.RESOURCE_UNAVAILABLE, (task.ptid,), why)))

    def _unlink(self, task: TaskRecord) -> None:
        if task.producer.tasks.pop(task.ptid, None) is not None:
            task.producer.funcs.release(task.entry.digest)
            if task.entry.refs:
                objects.unhold(task.producer, task.entry.refs)
            if task.values:  # values of tasks it waited for, not yet in its refs
                objects.unhold(task.producer, [digest for digest in task.values if digest])
        if task.agent is not None:
            task.agent.release(task.gid)
            task.agent = None

    def _forget_producer(self, prod: ProducerRecord, out: list[Outgoing]) -> None:
        """Drop its queued tasks and stop its running ones: nobody will read their results."""
        stop: dict[bytes, list[int]] = {}
        for task in prod.tasks.values():
            self._tasks.pop(task.gid, None)
            if task.agent is not None:
                task.agent.release(task.gid)
                stop.setdefault(task.agent.id, []).append(task.gid)
        out += forced_cancels(stop)
        prod.tasks.clear()
        self._placement.forget(prod)
        prod.clear_queues()
        self._routed.pop(prod.id, None)  # nobody will read them
        if prod.active:
            self._active.remove(prod)
            prod.active = False
        del self._producers[prod.id]
        prod.objects.clear()  # its scattered objects: freed here, and on the nodes no other producer needs them
        if self._value_files:
            self._unlink_values(prod.objects.dropped)
        out += objects.sweep(self._producers.values(), self._agents.values(), prod.objects.dropped)

    def _drop_agent(self, agent: AgentRecord, why: str, out: list[Outgoing]) -> None:
        """The agent is gone: its tasks go back to the front of their queues, or fail past their retries."""
        del self._agents[agent.id]
        cause = P.Cause(agent.name, agent.pid, detail="the node went silent" if why == "silent" else "the node left")
        failed: dict[bytes, list[P.ResultEntry]] = {}
        when = time.time()
        # Oldest first at the front: they were taken first.
        for task in sorted(agent.assigned.values(), key=lambda t: t.gid, reverse=True):
            task.agent = None
            if self._lost(task, cause, out):
                self.counters["requeued"] += 1
                continue
            del self._tasks[task.gid]
            self._unlink(task)
            self._finished(task, "lost", when, agent.name, why=_why(cause))
            failed.setdefault(task.producer.id, []).append(
                P.ResultEntry(task.ptid, P.Status.LOST, cause=self._gave_up(task, cause)))
            if task.dependents:
                self._settle(task, None, failed)
        agent.release_all()
        self._route(failed, out)
        self.counters[f"agents_{why}"] += 1

    def _sweep_objects(self) -> list[Outgoing]:
        """RELEASE to the nodes the scattered objects no producer holds any more (objects.sweep)."""
        if self._value_files:
            self._unlink_values([d for p in self._producers.values() for d in p.objects.dropped])
        return objects.sweep(self._producers.values(), self._agents.values())

    # ------------------------------------------------------------------ futures as arguments (Sched.deps)

    def _value_of(self, prod: ProducerRecord, ptid: int) -> bytes | None:
        """The digest of the value kept here of ``prod``'s ended task ``ptid``, or None if none is kept."""
        digest = prod.values.get(ptid)
        if digest is not None and digest not in prod.objects:  # dropped once the tasks that took it ended
            del prod.values[ptid]
            return None
        return digest

    def _wait(self, task: TaskRecord, deps: tuple[int, ...]) -> None:
        """``task`` takes the values of ``deps`` (its producer's tasks, each held here or its value kept):
        queued now if every value is in, else WAITING until they are (``_settle``)."""
        prod = task.producer
        task.values = [b""] * len(deps)
        for i, ptid in enumerate(deps):
            dep = prod.tasks.get(ptid)
            if dep is None:
                self._take_value(task, i, prod.values[ptid])
            else:
                if dep.dependents is None:
                    dep.dependents = []
                dep.dependents.append((task, i))
                task.waiting += 1
        if task.waiting:
            task.state = TaskState.WAITING
            prod.waiting += 1
            self.counters["waiting_for_values"] += 1
        else:
            self._ready(task)

    @staticmethod
    def _take_value(task: TaskRecord, index: int, digest: bytes) -> None:
        """One value ``task`` waited for is in: noted at its place among its values, and held for it."""
        if task.values is not None:  # always, for a task waiting
            task.values[index] = digest
            objects.hold(task.producer, (digest,))

    def _ready(self, task: TaskRecord) -> None:
        """Every value ``task`` waited for is in: its entry names them (``Sched.values``), and it is queued."""
        if task.state is TaskState.WAITING:
            task.producer.waiting -= 1
        entry, values = task.entry, task.values or []
        sched = entry.sched or P.Sched()
        task.entry = entry._replace(refs=entry.refs + tuple(values), sched=sched._replace(deps=(), values=len(values)))
        task.values = None  # held through its refs from now on
        task.producer.enqueue(task)
        self._activate(task.producer)

    def _settle(self, ended: TaskRecord, entry: P.ResultEntry | None,
                failed: dict[bytes, list[P.ResultEntry]]) -> None:
        """``ended`` left the broker, with a value (``entry`` OK) or without: the tasks waiting for it take
        its value, or fail (DEP_FAILED, into ``failed`` by producer), and so on down the tasks waiting for
        those (a loop, not recursion: a chain may be ten thousand long)."""
        when = time.time()
        work: list[tuple[TaskRecord, P.ResultEntry | None]] = [(ended, entry)]
        while work:
            dep, result = work.pop()
            dependents, dep.dependents = dep.dependents or [], None
            prod = dep.producer
            digest, why = None, f"task {dep.ptid}, whose value it takes, ended without one"
            if result is not None and result.status is P.Status.OK:
                digest, why = self._keep_value(dep, result.payload)
            elif result is not None and result.status is P.Status.STREAMED:
                why = f"task {dep.ptid}, whose value it takes, streamed: pass its result(), not its Future"
            for task, index in dependents:
                if task.state is not TaskState.WAITING or prod.tasks.get(task.ptid) is not task:
                    continue  # cancelled meanwhile, or its producer left
                if digest is not None:
                    self._take_value(task, index, digest)
                    task.waiting -= 1
                    if not task.waiting:
                        self._ready(task)
                    continue
                del self._tasks[task.gid]
                prod.waiting -= 1
                self._unlink(task)
                self._finished(task, "dependency_failed", when, why=why)
                cause = P.Cause("the broker", detail=why)
                failed.setdefault(prod.id, []).append(P.ResultEntry(task.ptid, P.Status.DEP_FAILED, cause=cause))
                if task.dependents:
                    work.append((task, None))
            if digest is not None:
                prod.values[dep.ptid] = digest
                prod.objects.let_go(digest)  # dropped once the last task taking it ends
                if len(prod.values) > 2 * len(prod.objects) + 64:  # forget those dropped since
                    prod.values = {k: d for k, d in prod.values.items() if d in prod.objects}

    def _keep_value(self, task: TaskRecord, payload: P.Payload) -> tuple[bytes | None, str]:
        """Keep ``task``'s value (its result payload) as an object of its producer, for the tasks that take it:
        its digest, or None and why not."""
        from zpar import _refs, serialize  # cloudpickle stays out of a broker that never keeps a value

        prod, limits = task.producer, self.limits
        linked = ""
        try:
            # On the embedded hub a large value stays in its segment, under a second name (nothing copied).
            frames, linked = serialize.kept(payload) if self.shared_values else (payload, "")
            blob = _refs.pack_frames(frames)
        except (OSError, ValueError) as exc:
            return None, f"task {task.ptid}'s value could not be kept: {exc}"
        digest = hashlib.blake2b(b"zpar-value:%s:%d" % (self.epoch.encode(), task.gid), digest_size=16).digest()
        if linked:
            self._value_files[digest] = linked
        if not prod.objects.add(P.Function(digest, blob), limits.objects, limits.object_bytes):
            self._unlink_values((digest,))
            self.counters["values_over_quota"] += 1
            return None, (f"task {task.ptid}'s value ({len(blob)} bytes) does not fit the broker's room for this "
                          f"producer's objects ({limits.objects} objects, {limits.object_bytes} bytes: "
                          "--max-objects, --max-object-bytes)")
        self.counters["values_kept"] += 1
        return digest, ""

    def _unlink_values(self, digests: Iterable[bytes]) -> None:
        """Remove the segments of kept values no longer kept (the embedded hub's second names)."""
        from zpar import _shm

        for digest in digests:
            path = self._value_files.pop(digest, None)
            if path:
                _shm.discard(path)

    def _route(self, results: dict[bytes, list[P.ResultEntry]], out: list[Outgoing]) -> None:
        """Results the broker made (not an agent's) to their producers: now, or at the next flush."""
        for pid, entries in results.items():
            if self._coalesce:
                self._routed.setdefault(pid, []).extend(entries)
            else:
                out += [Outgoing(Dest.FRONTEND, pid, P.Result(tuple(batch))) for batch in P.batches(entries)]

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, out: list[Outgoing]) -> None:
        """Hand queued tasks to agents with credits, fair across producers (``scheduling.dispatch``);
        with ``coalesce``, at the next ``flush``."""
        if self._coalesce:
            self._dispatch_due = True
        else:
            dispatch(self._active, self._agents, out, self._placement)
