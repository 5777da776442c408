"""Where tasks that ask for resources may go: agents with those resources free; and those no agent offers.

A task with ``resources`` (``Sched.resources``, from ``client.options``)
queues in its producer's queue for that set of resources (its *shape*,
``ProducerRecord.shaped``), so dispatch never scans a queue for a task that
fits: for each shape, it takes the next task of each producer in turn
(highest priority first within a producer) and gives it to an agent with
credits and that much free (``AgentRecord.free``: reserved by ``hold``,
including prefetch, given back by ``release``), idle workers first. These
go before the tasks that ask for nothing, which any node takes.

A shape no connected agent offers in total (``AgentRecord.offered``) is
*unmeetable*: its tasks wait, shown in status (``unplaceable``) and logged.
A task's ``resource_timeout`` counts from when no agent could take it: from
its arrival, or from when the last agent able to take it left; an agent
that could take it joining stops the clock. Past it, the task fails with
ResourceUnavailable. The check runs once a heartbeat (``expired``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

from zpar._text import printable
from zpar.config import resource_amount

from .records import AgentRecord, ProducerRecord, Shape, TaskRecord, TaskState

log = logging.getLogger(__name__)

#: Sums of fractional amounts drift (0.1 + 0.2): a task fits what is free within this.
_SLACK = 1e-9


def fits(free: Mapping[str, float], shape: Shape) -> bool:
    return all(free.get(name, 0) + _SLACK >= amount for name, amount in shape)


def words(resources: Iterable[tuple[str, float]]) -> str:
    """``gpu=1, memory=68719476736`` (names made safe for a terminal); ``none`` for none."""
    return ", ".join(f"{printable(name, 64)}={resource_amount(amount)}" for name, amount in resources) or "none"


class Placement:
    """The producers with tasks queued per shape (``waiting``), and the clocks of tasks no agent can take."""

    def __init__(self) -> None:
        #: shape -> the producers with tasks of it queued, in turn (a dict as an ordered set: O(1) rotation).
        self.waiting: dict[Shape, dict[ProducerRecord, None]] = {}
        self.unmet: dict[Shape, float] = {}  # unmeetable shapes -> since when (their tasks' clocks start there)
        self._clocks: dict[int, float] = {}  # gid -> since when no agent could take it (tasks with a timeout)

    def activate(self, prod: ProducerRecord) -> None:
        """``prod`` queued tasks that ask for resources: it takes its turn for each of their shapes."""
        for shape, queue in prod.shaped.items():
            if queue.live:
                self.waiting.setdefault(shape, {})[prod] = None

    def forget(self, prod: ProducerRecord) -> None:
        for shape in list(prod.shaped):
            producers = self.waiting.get(shape)
            if producers is not None:
                producers.pop(prod, None)
                if not producers:
                    del self.waiting[shape]

    def place(self, agents: Mapping[bytes, AgentRecord]) -> Iterator[tuple[AgentRecord, list[TaskRecord]]]:
        """The batches to send: each task to an agent with a credit and its resources free, the producers of
        each shape in turn. The tasks leave their queues; ``send`` makes the agent hold them."""
        ready = [a for a in agents.values() if a.credits > 0]
        if not ready:
            return
        credits = {a.id: a.credits for a in ready}
        room: dict[bytes, dict[str, float]] = {}  # what is free on an agent given tasks this turn
        batches: dict[bytes, list[TaskRecord]] = {}
        for shape, producers in list(self.waiting.items()):
            while producers:
                agent = self._pick(ready, shape, credits, room, batches)
                if agent is None:
                    break
                prod = next(iter(producers))
                task = self._take(prod, shape)
                del producers[prod]  # its turn is over: to the back, if it has more
                if task is None:
                    continue
                if prod.shaped[shape].live:
                    producers[prod] = None
                else:
                    del prod.shaped[shape]  # no live task left (tombstones, if any, go with it)
                batches.setdefault(agent.id, []).append(task)
                credits[agent.id] -= 1
                free = room.setdefault(agent.id, dict(agent.free))
                for name, amount in shape:
                    free[name] = free.get(name, 0) - amount
            if not producers:
                del self.waiting[shape]
        for aid, batch in batches.items():
            yield agents[aid], batch

    @staticmethod
    def _pick(ready: list[AgentRecord], shape: Shape, credits: dict[bytes, int], room: dict[bytes, dict[str, float]],
              batches: dict[bytes, list[TaskRecord]]) -> AgentRecord | None:
        """The agent for the next task of ``shape``: one with a credit and room, with an idle worker if any
        has, the least loaded per worker."""
        best, best_key = None, (0, 0.0)
        for agent in ready:
            if credits[agent.id] <= 0 or not fits(room.get(agent.id, agent.free), shape):
                continue
            held = len(agent.assigned) + len(batches.get(agent.id, ()))
            key = (0 if held < agent.workers else 1, held / (agent.workers or 1))
            if best is None or key < best_key:
                best, best_key = agent, key
        return best

    @staticmethod
    def _take(prod: ProducerRecord, shape: Shape) -> TaskRecord | None:
        task = prod.take(prod.shaped[shape])
        if task is None:  # only tombstones were left (cancels)
            del prod.shaped[shape]
        return task

    # ------------------------------------------------------------------ what no agent offers

    def unplaceable(self, agents: Iterable[AgentRecord]) -> list[tuple[Shape, list[TaskRecord]]]:
        """The queued tasks no connected agent could ever take, per shape (their resources are offered by none)."""
        offers = [a.offered for a in agents]
        out = []
        for shape, producers in self.waiting.items():
            if any(fits(offered, shape) for offered in offers):
                continue
            tasks = [t for prod in producers for t in prod.shaped.get(shape, ()) if t.state is TaskState.QUEUED]
            if tasks:
                out.append((shape, tasks))
        return out

    def status(self, now: float, agents: Iterable[AgentRecord]) -> list[dict[str, object]]:
        """For status: each shape no agent offers, how many tasks wait for it and since when, and what is offered."""
        agents = list(agents)
        offered = {a.name: dict(a.offered) for a in agents if a.offered}
        # No producer names: with key files, producers see nothing of each other (BrokerCore.history_open).
        return [{"resources": dict(shape), "tasks": len(tasks), "waiting_s": round(now - self.unmet.get(shape, now), 3),
                 "offered": offered} for shape, tasks in self.unplaceable(agents)]

    def expired(self, now: float, agents: Iterable[AgentRecord]) -> list[tuple[TaskRecord, str]]:
        """Tasks past their resource_timeout with no agent able to take them, each with why (for its producer).
        Run once a heartbeat: the clocks start and stop here."""
        agents = list(agents)
        stuck = self.unplaceable(agents)
        unmet = {}
        clocks: dict[int, float] = {}
        out = []
        for shape, tasks in stuck:
            unmet[shape] = self.unmet.get(shape, now)
            if shape not in self.unmet:
                log.warning("%d tasks ask for %s, which no connected node offers (nodes offer: %s); they wait for "
                            "an agent started with --resources", len(tasks), words(shape), _offers(agents))
            for task in tasks:
                timeout_ms = task.entry.sched.resource_timeout_ms if task.entry.sched is not None else 0
                if not timeout_ms:
                    continue
                start = clocks[task.gid] = self._clocks.get(task.gid, now)  # seen here first: it starts now
                if (now - start) * 1000 >= timeout_ms:
                    why = (f"it asks for {words(shape)}, and no connected node has offered that for "
                           f"{timeout_ms / 1000:g} s (its resource_timeout); nodes offer: {_offers(agents)}; "
                           "start an agent with --resources offering it, or ask for less")
                    out.append((task, why))
        self.unmet, self._clocks = unmet, clocks
        return out


def _offers(agents: list[AgentRecord], most: int = 8) -> str:
    offers = [f"{printable(a.name, 64)}: {words(a.offered.items())}" for a in agents[:most]]
    if len(agents) > most:
        offers.append(f"and {len(agents) - most} more")
    return "; ".join(offers) or "no node is connected"
