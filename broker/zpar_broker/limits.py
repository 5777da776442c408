"""What one producer may hold in the broker (``Limits``), and its function blobs within them (``Functions``).

A producer at a quota gets its tasks refused for now (ERROR QUEUE_FULL: the
producer holds them and sends them again as its results come back, so an
honest client only slows down); a task that can never fit (a function blob
over the byte quota by itself) is refused for good (QUOTA_EXCEEDED: the
producer fails its future with ``zpar.QuotaExceeded``). Nothing of another
producer's is touched, and the broker holds no more than the quotas.
Function blobs no task of the producer holds any more are evicted oldest
first to make room: the producer sends one again when the broker answers
UNKNOWN_FUNCTION, so only blobs in use count against the quota.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from zpar import protocol as P


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-producer quotas of a BrokerCore (each a count or bytes; see the module docstring)."""

    #: Tasks queued (not yet given to an agent) at once.
    queued_tasks: int = 100_000
    #: Payload bytes of those queued tasks (a task alone in the queue is taken whatever its size).
    queued_bytes: int = 64 << 20
    #: Function blobs kept, and their bytes.
    functions: int = 10_000
    function_bytes: int = 64 << 20
    #: Scattered objects kept (zpar.Client.scatter; objects.py), and their bytes.
    objects: int = 10_000
    object_bytes: int = 1 << 30


class Functions:
    """One producer's function blobs by digest, verified, counted, and the tasks using each."""

    __slots__ = ("_blobs", "_idle", "_refs", "nbytes")

    def __init__(self) -> None:
        self._blobs: dict[bytes, P.Frame] = {}
        self._refs: dict[bytes, int] = {}  # digest -> tasks of the producer the broker holds that use it
        self._idle: dict[bytes, None] = {}  # blobs no task uses, oldest first: evicted first
        self.nbytes = 0

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._blobs

    def __getitem__(self, digest: bytes) -> P.Frame:
        return self._blobs[digest]

    def __len__(self) -> int:
        return len(self._blobs)

    def add(self, func: P.Function, most: int, most_bytes: int, keep: frozenset[bytes] = frozenset()) -> bool:
        """Keep ``func`` (False if it would be over ``most`` blobs or ``most_bytes`` even after evicting
        idle blobs not in ``keep``). The caller has checked its digest."""
        if func.digest in self._blobs:
            return True
        size = len(func.blob)
        if size > most_bytes:
            return False
        while len(self._blobs) >= most or self.nbytes + size > most_bytes:
            victim = next((d for d in self._idle if d not in keep), None)
            if victim is None:
                return False
            self._drop(victim)
        self._blobs[func.digest] = func.blob
        self._idle[func.digest] = None
        self.nbytes += size
        return True

    def use(self, digest: bytes) -> None:
        """A task the broker now holds uses this blob: it stays."""
        n = self._refs.get(digest, 0)
        if not n:
            self._idle.pop(digest, None)
        self._refs[digest] = n + 1

    def release(self, digest: bytes) -> None:
        """A task that used this blob left the broker."""
        n = self._refs.get(digest, 0) - 1
        if n > 0:
            self._refs[digest] = n
            return
        self._refs.pop(digest, None)
        if digest in self._blobs:
            self._idle[digest] = None

    def _drop(self, digest: bytes) -> None:
        self.nbytes -= len(self._blobs.pop(digest))
        self._idle.pop(digest, None)


class Holder(Protocol):
    """What the quota rules read of a producer's record (records.ProducerRecord)."""

    @property
    def funcs(self) -> Functions: ...
    @property
    def queued(self) -> int: ...
    @property
    def queued_bytes(self) -> int: ...


def admit_functions(prod: Holder, funcs: tuple[P.Function, ...], limits: Limits,
                    counters: collections.Counter[str]) -> dict[bytes, P.ErrorCode]:
    """Keep a SUBMIT's blobs that hash to their digest and fit the quota; the others' digests, and why."""
    return admit_blobs(prod.funcs, funcs, limits.functions, limits.function_bytes, counters, "functions")


def admit_blobs(store: Functions, blobs: Sequence[P.Function], most: int, most_bytes: int,
                counters: collections.Counter[str], what: str) -> dict[bytes, P.ErrorCode]:
    """Keep in ``store`` the ``blobs`` that hash to their digest and fit ``most`` blobs and ``most_bytes``;
    the others' digests, and why (``what`` names the counters: functions, objects)."""
    refused: dict[bytes, P.ErrorCode] = {}
    keep = frozenset(b.digest for b in blobs)  # not evicted to make room for each other
    for blob in blobs:
        if blob.digest in store:  # sent again (a reconnect): what we hold was verified; no second hash
            store.add(blob, most, most_bytes, keep)
        elif P.digest(blob.blob) != blob.digest:
            # Content addressing is verified: another producer's digest cannot be made to run this.
            counters[f"{what}_mismatched"] += 1
            refused[blob.digest] = P.ErrorCode.BAD_FUNCTION
        elif not store.add(blob, most, most_bytes, keep):
            counters[f"{what}_over_quota"] += 1
            never = len(blob.blob) > most_bytes
            refused[blob.digest] = P.ErrorCode.QUOTA_EXCEEDED if never else P.ErrorCode.QUEUE_FULL
    return refused


def over_quota(prod: Holder, nbytes: int, function_refused: P.ErrorCode | None,
               limits: Limits) -> tuple[P.ErrorCode, str] | None:
    """Why one more task of ``nbytes`` would take ``prod`` over a quota: (QUEUE_FULL for now, or
    QUOTA_EXCEEDED for good; a line for the producer), or None."""
    if function_refused is P.ErrorCode.QUOTA_EXCEEDED:
        return function_refused, (f"its function blob is over the broker's limit of {limits.function_bytes} "
                                  "bytes of function blobs (--max-function-bytes); pass large data as arguments")
    if function_refused is not None:
        return P.ErrorCode.QUEUE_FULL, (f"its function blobs in use are at the broker's limit of "
                                        f"{limits.functions} blobs or {limits.function_bytes} bytes")
    if prod.queued >= limits.queued_tasks:
        return P.ErrorCode.QUEUE_FULL, f"{prod.queued} of its tasks are queued, the broker's limit"
    if prod.queued and prod.queued_bytes + nbytes > limits.queued_bytes:
        return P.ErrorCode.QUEUE_FULL, (f"{prod.queued_bytes} bytes of its tasks' arguments are queued, the "
                                        f"broker's limit is {limits.queued_bytes}")
    return None
