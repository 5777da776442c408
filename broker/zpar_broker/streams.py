"""The broker's stream routing (zpar.streaming), a part BrokerCore holds.

ITEMS from the collector go to the task's producer, FEED from a producer to
the agent holding the task, or wait with the task while it is queued and go
right behind its TASKS. A task that has exchanged an item is marked
``streamed``: the core never runs it again.
"""

from __future__ import annotations

import collections

from zpar import protocol as P

from .outgoing import Dest, Outgoing
from .records import AgentRecord, Feed, ProducerRecord, TaskRecord, TaskState, renumbered


class StreamRouting:
    """Routes streams' objects and credits by task id, over the core's assignment table and counters."""

    def __init__(self, tasks: dict[int, TaskRecord], counters: collections.Counter[str],
                 max_queued_bytes: int) -> None:
        self._tasks = tasks  # the core's assignment table, shared, never replaced
        self.counters = counters
        self.max_queued_bytes = max_queued_bytes  # a producer's quota, which what queued tasks are sent counts in

    def items(self, msg: P.Items) -> list[Outgoing]:
        """Streams' items (and read credits) from the collector: to each task's producer, in order."""
        out: list[Outgoing] = []
        by_producer: dict[bytes, tuple[list[P.ItemEntry], list[P.Credit]]] = {}
        orphans: set[int] = set()
        for gid, group in P.runs(msg.items):
            task = self._tasks.get(gid)
            if (task is None or task.state is not TaskState.ASSIGNED
                    or task.agent is None or task.agent.id != msg.agent):  # only from the agent running it
                self.counters["late_items"] += sum(1 for _ in group)
                if task is None:
                    orphans.add(gid)  # nobody will read them: stop the task, not leave it at its window
            else:
                task.streamed = True
                ptid = task.ptid
                by_producer.setdefault(task.producer.id, ([], []))[0].extend(
                    [renumbered(e, ptid) for e in group])
        for credit in msg.credits:
            task = self._tasks.get(credit.id)
            if task is not None and task.agent is not None and task.agent.id == msg.agent:
                by_producer.setdefault(task.producer.id, ([], []))[1].append(P.Credit(task.ptid, credit.upto))
        if orphans and msg.agent:
            out.append(Outgoing(Dest.BACKEND, msg.agent, P.Cancel(tuple(sorted(orphans)), force=True)))
        out += [Outgoing(Dest.FRONTEND, pid, P.Items(tuple(e), tuple(c))) for pid, (e, c) in by_producer.items()]
        return out

    def feed(self, prod: ProducerRecord, msg: P.Feed, out: list[Outgoing]) -> list[int]:
        """A producer's objects, credits and closes for its tasks: to their agents, or kept with them.

        Returns the (producer's) ids of queued tasks sent more than the
        producer's queued-bytes quota holds: the caller fails them.
        """
        by_agent: dict[bytes, tuple[list[P.ItemEntry], list[P.Credit], list[int]]] = {}
        over: list[int] = []
        for entry in msg.items:
            task = prod.tasks.get(entry.id)
            if task is None:
                self.counters["late_feed"] += 1
                continue
            gentry = renumbered(entry, task.gid)
            if task.agent is None:  # queued: it goes with the task (a producer keeps to its window)
                if task.feed is None:
                    task.feed = Feed()
                nbytes = P.payload_bytes(entry.payload)
                if len(task.feed.items) >= 2 * P.STREAM_WINDOW or (
                        task.feed.items and task.feed.nbytes + nbytes > 2 * P.STREAM_BYTES):
                    self.counters["feed_over_window"] += 1  # past what a producer's window lets it send
                    continue
                if prod.queued_bytes + nbytes > self.max_queued_bytes:
                    if entry.id not in over:
                        over.append(entry.id)
                    continue
                task.feed.items.append(gentry)
                task.feed.nbytes += nbytes
                prod.queued_bytes += nbytes
                continue
            task.streamed = True
            by_agent.setdefault(task.agent.id, ([], [], []))[0].append(gentry)
        for credit in msg.credits:
            task = prod.tasks.get(credit.id)
            if task is not None and task.agent is not None:
                by_agent.setdefault(task.agent.id, ([], [], []))[1].append(P.Credit(task.gid, credit.upto))
        for ptid in msg.closed:
            task = prod.tasks.get(ptid)
            if task is None:
                continue
            if task.agent is None:
                if task.feed is None:
                    task.feed = Feed()
                task.feed.closed = True
                continue
            task.streamed = True
            by_agent.setdefault(task.agent.id, ([], [], []))[2].append(task.gid)
        for aid, (items, credits, closed) in by_agent.items():
            out.append(Outgoing(Dest.BACKEND, aid, P.Feed(tuple(items), tuple(credits), tuple(closed))))
        return over

    @staticmethod
    def send_kept_feed(agent: AgentRecord, tasks: list[TaskRecord], out: list[Outgoing]) -> None:
        """What producers sent these tasks while they were queued, right behind their TASKS."""
        items: list[P.ItemEntry] = []
        closed: list[int] = []
        for task in tasks:
            feed, task.feed = task.feed, None
            if feed is None:
                continue
            task.producer.queued_bytes -= feed.nbytes
            task.streamed = True
            items += feed.items
            if feed.closed:
                closed.append(task.gid)
        out.append(Outgoing(Dest.BACKEND, agent.id, P.Feed(tuple(items), (), tuple(closed))))
