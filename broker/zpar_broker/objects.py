"""Scattered objects (``zpar.Client.scatter``) in the broker: kept per producer, sent once per node.

An object is a blob named by its digest, as a function is: it rides in the
``funcs`` of SUBMIT and TASKS, each peer's ``protocol.Shipped`` sends it once,
and a task names the ones it uses in its entry's ``refs``. What differs is
its life and its size:

- Each producer's objects (``Objects``, a ``limits.Functions`` with a second
  quota, ``Limits.objects`` and ``Limits.object_bytes``) stay while the
  producer holds a reference (RELEASE ends that) or a task of its uses one.
  Idle ones are evicted oldest first when room is needed, as function blobs
  are: the producer sends one again when the broker answers UNKNOWN_FUNCTION.
- Each node's copies (``NodeObjects``) are bounded by ``NODE_BYTES``, least
  recently used first (never one a task the node holds uses), and an object
  no producer holds any more is released there (RELEASE to the agent, which
  tells its workers).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from zpar import protocol as P

from .limits import Functions, Limits, admit_blobs
from .outgoing import Dest, Outgoing

if TYPE_CHECKING:
    from .records import AgentRecord, ProducerRecord

#: What one node may cache of scattered objects, all producers together (its agent and each worker
#: hold a copy): past it, the least recently used are released there.
NODE_BYTES = 2 << 30


class Objects(Functions):
    """One producer's scattered objects by digest: verified, counted, and the tasks using each."""

    __slots__ = ("dropped", "released")

    def __init__(self) -> None:
        super().__init__()
        self.released: set[bytes] = set()  # its producer let go; dropped once no task uses it
        self.dropped: list[bytes] = []  # gone from here since the last sweep: maybe from the nodes too

    def add(self, func: P.Function, most: int, most_bytes: int, keep: frozenset[bytes] = frozenset()) -> bool:
        self.released.discard(func.digest)  # scattered again
        return super().add(func, most, most_bytes, keep)

    def release(self, digest: bytes) -> None:
        super().release(digest)
        if digest in self.released and digest not in self._refs:
            self._drop(digest)

    def let_go(self, digest: bytes) -> None:
        """The producer holds no reference to it any more: dropped now, or when its last task leaves."""
        if digest not in self:
            return
        if digest in self._refs:
            self.released.add(digest)
        else:
            self._drop(digest)

    def clear(self) -> None:
        for digest in list(self._blobs):
            self._drop(digest)

    def _drop(self, digest: bytes) -> None:
        super()._drop(digest)
        self.released.discard(digest)
        self.dropped.append(digest)


class NodeObjects:
    """The objects the broker has sent one agent (``AgentRecord.objects``), least recently used first."""

    __slots__ = ("nbytes", "sent", "sizes")

    def __init__(self) -> None:
        self.sizes: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.nbytes = 0
        self.sent = 0  # counted for status: objects sent to this node in all

    def drop(self, digest: bytes) -> bool:
        size = self.sizes.pop(digest, None)
        if size is None:
            return False
        self.nbytes -= size
        return True


def admit(prod: ProducerRecord, msg: P.Submit, limits: Limits,
          counters: collections.Counter[str]) -> tuple[tuple[P.Function, ...], dict[bytes, P.ErrorCode]]:
    """Keep a SUBMIT's object blobs (those its tasks name in ``refs``) that hash to their digest and fit
    the producer's quota. Returns the SUBMIT's other blobs (its functions) and the refused objects' digests."""
    if not msg.funcs:
        return msg.funcs, {}
    named = {d for entry in msg.tasks if entry.refs for d in entry.refs}
    if not named:
        return msg.funcs, {}
    funcs = tuple(f for f in msg.funcs if f.digest not in named)
    blobs = [f for f in msg.funcs if f.digest in named]
    return funcs, admit_blobs(prod.objects, blobs, limits.objects, limits.object_bytes, counters, "objects")


def refusal(prod: ProducerRecord, entry: P.TaskEntry, refused: Mapping[bytes, P.ErrorCode],
            limits: Limits) -> tuple[P.ErrorCode, str] | None:
    """Why a task whose ``refs`` name objects cannot be taken now (None: it can)."""
    for digest in entry.refs:
        why = refused.get(digest)
        if why is P.ErrorCode.BAD_FUNCTION:
            return why, "a scattered object it uses does not hash to its digest"
        if why is P.ErrorCode.QUOTA_EXCEEDED:
            return why, (f"a scattered object it uses is over the broker's limit of {limits.object_bytes} bytes "
                         "of scattered objects per producer; split it, load it in the task, or raise "
                         "--max-object-bytes")
        if why is not None:
            return why, (f"the scattered objects in use are at the broker's limit of {limits.objects} objects or "
                         f"{limits.object_bytes} bytes for this producer (--max-objects, --max-object-bytes)")
        if digest not in prod.objects:
            return P.ErrorCode.UNKNOWN_FUNCTION, (
                "it refers to a scattered object this broker does not hold for this producer: send it again "
                "with the object, which must come from Client.scatter of the same client")
    return None


def hold(prod: ProducerRecord, refs: Iterable[bytes]) -> None:
    """A task the broker now holds uses these objects."""
    for digest in refs:
        prod.objects.use(digest)


def unhold(prod: ProducerRecord, refs: Iterable[bytes]) -> None:
    """A task that used these objects left the broker."""
    for digest in refs:
        prod.objects.release(digest)


def let_go(prod: ProducerRecord, digests: Iterable[bytes]) -> None:
    """RELEASE from a producer: it holds no reference to these any more."""
    for digest in digests:
        prod.objects.let_go(digest)


def blobs(prod: ProducerRecord, refs: Iterable[bytes], into: dict[bytes, P.Frame]) -> None:
    """Put the blobs of ``refs`` (objects of ``prod``) into ``into``, for ``Shipped.functions``."""
    for digest in refs:
        if digest not in into:
            into[digest] = prod.objects[digest]


def to_node(agent: AgentRecord, entries: Iterable[P.TaskEntry], sent: Iterable[P.Function],
            out: list[Outgoing]) -> None:
    """TASKS with ``entries`` go to ``agent`` carrying ``sent``: count the objects among them, mark those used as
    recent, and release there the least recently used past NODE_BYTES (RELEASE in ``out``, ahead of the TASKS)."""
    node = agent.objects
    used = {d for entry in entries if entry.refs for d in entry.refs}
    for digest in used:
        if digest in node.sizes:
            node.sizes.move_to_end(digest)
    for blob in sent:
        if blob.digest in used and blob.digest not in node.sizes:
            size = len(blob.blob)
            node.sizes[blob.digest] = size
            node.nbytes += size
            node.sent += 1
    if node.nbytes <= NODE_BYTES:
        return
    busy = {d for task in agent.assigned.values() if task.entry.refs for d in task.entry.refs}  # these TASKS' too
    victims = []
    for digest in node.sizes:
        if node.nbytes <= NODE_BYTES:
            break
        if digest not in busy:
            victims.append(digest)
            node.nbytes -= node.sizes[digest]
    for digest in victims:
        del node.sizes[digest]
    if victims:
        agent.shipped.forget(victims)
        out += [Outgoing(Dest.BACKEND, agent.id, P.Release(chunk)) for chunk in P.chunks(victims)]  # ahead of TASKS


def sweep(producers: Iterable[ProducerRecord], agents: Iterable[AgentRecord],
          gone: Iterable[bytes] = ()) -> list[Outgoing]:
    """RELEASE to each node the objects it holds that no producer holds any more (dropped since the last
    sweep, or ``gone``: those of a producer that left)."""
    producers = list(producers)
    dropped: set[bytes] = set(gone)
    for prod in producers:
        if prod.objects.dropped:
            dropped.update(prod.objects.dropped)
            prod.objects.dropped.clear()
    if not dropped:
        return []
    orphans = [d for d in dropped if not any(d in p.objects for p in producers)]
    out = []
    for agent in agents:
        here = [d for d in orphans if agent.objects.drop(d)]
        if here:
            agent.shipped.forget(here)
            out += [Outgoing(Dest.BACKEND, agent.id, P.Release(chunk)) for chunk in P.chunks(here)]
    return out


def status(producers: Iterable[ProducerRecord]) -> dict[str, int]:
    """The objects the broker holds for its producers: how many, and their bytes."""
    count = nbytes = 0
    for prod in producers:
        count += len(prod.objects)
        nbytes += prod.objects.nbytes
    return {"count": count, "bytes": nbytes}
