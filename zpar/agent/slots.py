"""What the agent's core keeps per worker and per task, and what it asks the loop to send a worker."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field
from typing import Any

from zpar import protocol as P


class WorkerState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"  # told to exit between tasks (recycling); a new worker takes its place
    EXITED = "exited"


@dataclass(slots=True)
class QueuedTask:
    id: int
    digest: bytes
    flags: int
    data: bytes  # the payload when inline (see protocol.INLINE_MAX), else b""
    frames: list[Any]
    timeout_ms: int = 0
    alone: bool = False  # suspected of killing a worker: run it by itself
    streamed: bool = False  # it sent or was given an item: never run it again
    inbox: list[tuple[P.ItemEntry, list[Any]]] | None = None  # FEED for it before a worker had it
    closed: bool = False  # ... and its producer closed its input


@dataclass(slots=True)
class WorkerSlot:
    identity: bytes
    state: WorkerState = WorkerState.STARTING
    pid: int = 0
    batch: list[QueuedTask] = field(default_factory=list)
    known: set[bytes] = field(default_factory=set)  # function digests this worker has
    deadline: float = 0.0  # when its task runs out of time (0: no timeout)
    doomed: dict[int, tuple[int, str]] = field(default_factory=dict)  # task id -> (Status, reason): being killed
    stale: bool = False  # its batch came from a broker that is gone: drop its results
    tasks_done: int = 0
    retire: bool = False  # recycle it once its batch is done


@dataclass(slots=True)
class ToWorker:
    identity: bytes
    msg: P.Tasks | P.Feed
    frames: list[Any]


def chunk_end(entries: list[Any], frames: list[Any], max_tasks: int = P.BATCH_MAX_TASKS,
              max_bytes: int = P.BATCH_MAX_BYTES) -> tuple[int, int]:
    """How many of ``entries`` (and of the ``frames`` behind them) make the next message.

    At least one entry; then up to ``max_tasks`` entries, about ``max_bytes``
    of payload and protocol.MAX_FRAMES frames.
    """
    n = nframes = nbytes = 0
    for entry in entries:
        if n and (n >= max_tasks or nbytes >= max_bytes or nframes + entry.nframes > P.MAX_FRAMES):
            break
        nbytes += len(entry.data) + sum(len(f) for f in frames[nframes:nframes + entry.nframes])
        nframes += entry.nframes
        n += 1
    return n, nframes


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"
