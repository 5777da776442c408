"""How the broker shares queued tasks among the agents that have credits, fair across producers."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Mapping

from zpar import protocol as P

from . import objects
from .outgoing import Dest, Outgoing
from .records import AgentRecord, ProducerRecord, TaskRecord, TaskState, renumbered
from .resources import Placement
from .streams import StreamRouting

#: A TASKS message stops taking tasks past this many payload frames (MAX_FRAMES, less room
#: for function blobs and one more task of the most frames a task may have).
_FRAMES_PER_BATCH = P.MAX_FRAMES - P.MAX_TASK_FRAMES - P.BATCH_MAX_TASKS

#: Past this many payload bytes held by a node, it gets tasks only for its idle workers: what one
#: producer's large arguments can make the broker (and the node) hold is bounded, and a prefetched
#: argument still arrives while the task before it runs.
PREFETCH_BYTES = 32 << 20


def quotas(ready: list[AgentRecord], queued: int) -> list[int]:
    """How many of ``queued`` tasks each agent in ``ready`` (least loaded first) takes now (none in all: none now).

    Idle workers first: a task must not wait behind a long one (a stream, a
    channel task waiting for its producer) prefetched on one node while a
    worker idles on another, whatever credits each node asked for (a node
    that ran tiny tasks asks for many). What is left goes as prefetch, within
    each node's credits, to nodes holding less than PREFETCH_BYTES, toward an
    even number of tasks per worker once all are out (``_prefetch``).
    """
    quotas = []
    left = queued
    for agent in ready:
        take = min(agent.credits, max(0, agent.workers - len(agent.assigned)), left)
        quotas.append(take)
        left -= take
    if left > 0:
        _prefetch(ready, quotas, left)
    return quotas


def _prefetch(ready: list[AgentRecord], quotas: list[int], left: int) -> None:
    """Add to ``quotas`` the ``left`` tasks' prefetch: each node up to its share of the load, in one batch.

    A node's share is what it would hold if every queued task went out and
    every worker held as many. A node short of its share by less than a quarter
    of it, and with more credits than that, gets nothing this time: its workers
    are busy for a while yet, and the tasks go in a larger batch a little later
    (with many nodes, topping each up with a task or two would cost the
    broker a message per task).
    """
    open_ = [i for i, agent in enumerate(ready) if agent.credits > quotas[i] and agent.held_bytes < PREFETCH_BYTES]
    if not open_:
        return
    load = sum(len(ready[i].assigned) + quotas[i] for i in open_)
    per_worker = (left + load) / sum(max(1, ready[i].workers) for i in open_)
    for i in open_:
        agent = ready[i]
        share = per_worker * max(1, agent.workers)
        room = agent.credits - quotas[i]
        want = min(room, math.ceil(share - len(agent.assigned) - quotas[i]), left)
        if want <= 0 or (want < room and want < share / 4):
            continue
        quotas[i] += want
        left -= want
        if not left:
            return


def dispatch(active: collections.deque[ProducerRecord], agents: Mapping[bytes, AgentRecord],
             out: list[Outgoing], placement: Placement | None = None) -> None:
    """Hand the queued tasks of the ``active`` producers to agents with credits (see ``quotas``), as TASKS in ``out``.

    Each task moves to its agent's ``assigned`` table; a producer leaves
    ``active`` once nothing of its is queued. Tasks that ask for resources
    go first, where those are free (``placement``, resources.py); the others
    take what credits are left.
    """
    if placement is not None and placement.waiting:
        for agent, batch in placement.place(agents):
            # As many as the agent has credits for: in messages that each fit (entries, bytes, frames).
            start = 0
            for run in P.batches([task.entry for task in batch], reserved_frames=min(len(batch), P.BATCH_MAX_TASKS)):
                send(agent, batch[start:start + len(run)], out)
                start += len(run)
    while active:
        ready = [a for a in agents.values() if a.credits > 0]
        if not ready:
            return
        if len(ready) > 1:
            ready.sort(key=lambda a: len(a.assigned) / (a.workers or 1))  # least loaded first
        queued = sum(p.queue.live for p in active)
        if not queued:  # their last queued tasks were cancelled, or finished late elsewhere
            for prod in active:
                prod.active = False
            active.clear()
            return
        shares = quotas(ready, queued)
        if not any(shares):  # no idle worker, and the nodes with credits hold enough bytes already
            return
        for agent, quota in zip(ready, shares, strict=True):
            if quota:
                _send_batch(active, agent, min(quota, P.BATCH_MAX_TASKS), out)
            if not active:
                return


def _send_batch(active: collections.deque[ProducerRecord], agent: AgentRecord, limit: int,
                out: list[Outgoing]) -> None:
    batch: list[TaskRecord] = []
    nbytes = nframes = 0
    # Round-robin: in each round, every active producer gives an even share of what is left.
    while len(batch) < limit and nbytes < P.BATCH_MAX_BYTES and active:
        in_round = len(active)
        for served in range(in_round):
            if len(batch) >= limit or nbytes >= P.BATCH_MAX_BYTES:
                break
            prod = active.popleft()
            queue = prod.queue  # its tasks that ask for no resources, highest priority first
            share = max(1, (limit - len(batch)) // (in_round - served))
            while share and queue.live and nbytes < P.BATCH_MAX_BYTES and nframes < _FRAMES_PER_BATCH:
                task = prod.take(queue)
                if task is None:
                    break
                batch.append(task)
                nbytes += task.nbytes
                nframes += len(task.entry.payload)
                share -= 1
            if queue.live:
                active.append(prod)
            else:
                prod.active = False
    if batch:
        send(agent, batch, out)


def send(agent: AgentRecord, batch: list[TaskRecord], out: list[Outgoing]) -> None:
    """TASKS of ``batch`` (taken from their queues) to ``agent``, which holds them now; with the function blobs
    (and scattered objects) it lacks, and what came for them while they were queued (parts, feed)."""
    entries: list[P.TaskEntry] = []
    fed: list[TaskRecord] = []
    parted: list[TaskRecord] = []
    blobs: dict[bytes, P.Frame] = {}
    refs = False  # some task uses scattered objects (objects.py)
    now = time.time()  # once a batch: the task history's "dispatched"
    for task in batch:
        task.dispatched = now
        entry = task.entry
        blobs.setdefault(entry.digest, task.producer.funcs[entry.digest])
        if entry.refs:
            objects.blobs(task.producer, entry.refs, blobs)
            refs = True
        task.state = TaskState.ASSIGNED
        task.agent = agent
        task.holders += (agent.id,)
        agent.hold(task)
        entries.append(renumbered(entry, task.gid))  # the payload goes on as it came
        if task.feed is not None:
            fed.append(task)
        if task.assembly is not None:
            parted.append(task)
    agent.credits -= len(batch)
    funcs = agent.shipped.functions(entries, blobs.__getitem__)
    if refs:
        objects.to_node(agent, entries, funcs, out)
    out.append(Outgoing(Dest.BACKEND, agent.id, P.Tasks(tuple(entries), funcs)))
    for task in parted:  # the parts of their payloads come so far, right behind them (the rest as they come)
        out += task.parts_for(agent)
    if fed:  # what producers sent them while queued, right behind them
        StreamRouting.send_kept_feed(agent, fed, out)
