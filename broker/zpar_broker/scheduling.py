"""How the broker shares queued tasks among the agents that have credits."""

from __future__ import annotations

import math

from .records import AgentRecord

#: Past this many payload bytes held by a node, it gets tasks only for its idle workers: what one
#: producer's large arguments can make the broker (and the node) hold is bounded, and a prefetched
#: argument still arrives while the task before it runs.
PREFETCH_BYTES = 32 << 20


def quotas(ready: list[AgentRecord], queued: int) -> list[int]:
    """How many of ``queued`` tasks each agent in ``ready`` takes now (none in all: nobody can take any now).

    Idle workers first: a task must not wait behind a long one (a stream, a
    channel task waiting for its producer) prefetched on one node while a
    worker idles on another, whatever credits each node asked for (a node
    that ran tiny tasks asks for many). What is left goes as prefetch, in
    proportion to the credits left, to nodes holding less than
    PREFETCH_BYTES.
    """
    quotas = []
    left = queued
    for agent in ready:
        take = min(agent.credits, max(0, agent.workers - len(agent.assigned)), left)
        quotas.append(take)
        left -= take
    spare = [agent.credits - take if agent.held_bytes < PREFETCH_BYTES else 0
             for agent, take in zip(ready, quotas, strict=True)]
    total, rest = sum(spare), left
    for i, room in enumerate(spare):
        if left <= 0 or not total:
            break
        extra = min(room, max(1, math.ceil(rest * room / total)), left) if room > 0 else 0
        quotas[i] += extra
        left -= extra
    return quotas
