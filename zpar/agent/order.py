"""The order of the agent's queue of tasks: its producer's priority first (higher first), then arrival.

The broker sends each producer's tasks highest priority first, but a node
prefetches: a task of priority 10 may arrive behind tasks of 0 already
queued here, and must still start before them. The common case, every task
at priority 0, appends as the queue always did (``appends``). A task queued
again (given back by its worker, or its worker died) goes before the others
of its priority, never before higher ones.
"""

from __future__ import annotations

import collections
import itertools
import operator
from collections.abc import Sequence

from zpar import protocol as P

from .records import QueuedTask

_SCHED = operator.attrgetter("sched")  # a task entry's scheduling (None: the default)


def priority(task: QueuedTask) -> int:
    """Its producer's priority (``client.options(priority=)``)."""
    sched = task.entry.sched
    return 0 if sched is None else sched.priority


def _rank(task: QueuedTask) -> int:
    return -priority(task)


def appends(queue: collections.deque[QueuedTask], entries: Sequence[P.TaskEntry]) -> bool:
    """Whether ``entries`` (from the broker) go at the end as they come: all at 0, behind tasks of 0 or more."""
    return not any(map(_SCHED, entries)) and (not queue or priority(queue[-1]) >= 0)


def line_up(queue: collections.deque[QueuedTask], tasks: list[QueuedTask]) -> None:
    """Queue tasks from the broker behind those of their priority or higher (where ``appends`` said no):
    appended if none is ranked above the one before it, or the queue is merged again (a stable sort of a
    small queue: the node's prefetch)."""
    ranks = [priority(task) for task in tasks]
    if (not queue or ranks[0] <= priority(queue[-1])) and all(a >= b for a, b in itertools.pairwise(ranks)):
        queue.extend(tasks)
        return
    merged = sorted([*queue, *tasks], key=_rank)
    queue.clear()  # in place: others hold this queue (Slots.streams, Prefetch)
    queue.extend(merged)


def first_in_line(queue: collections.deque[QueuedTask], task: QueuedTask) -> None:
    """``task`` again (given back, or its worker died), before the others of its priority."""
    rank = priority(task)
    if not queue or priority(queue[0]) <= rank:
        queue.appendleft(task)
        return
    for i, other in enumerate(queue):
        if priority(other) <= rank:
            queue.insert(i, task)
            return
    queue.append(task)
