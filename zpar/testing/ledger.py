"""The ledger and checker of the fault suite (RELIABILITY.md, "Ground rules"; the Jepsen method).

The producer records each id it submits and each outcome it is handed
(``Ledger.track``); the task logs each run to a per-worker file (``with
execution(exec_dir, i): ...``); at the deadline ``check(ledger, expected,
exec_dir)`` seals the ledger and counts lost, duplicated and wrong outcomes.
Ids are the caller's own (``int`` or ``str``, stored as JSON), not zpar's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TaskId = int | str
AnyFuture = concurrent.futures.Future[Any]


@dataclass(frozen=True)
class Outcome:
    """One outcome handed to the producer: a value, or the name of an error type."""
    value: Any = None
    error: str | None = None  # type name, e.g. "WorkerLost"; None for a result
    at: float = 0.0  # time.monotonic() when it was recorded


@dataclass(frozen=True)
class Execution:
    """One run of a task in a worker; ``end`` is None if the run never finished (killed)."""
    task_id: TaskId
    attempt: int | None
    pid: int
    start: float
    end: float | None


class Ledger:
    """The producer's record of submissions and delivered outcomes; thread-safe.

    After ``seal()`` (the deadline), outcomes still arriving are counted in
    ``late`` and do not count as terminal: a future cancelled by ``close()``
    after the deadline stays lost.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._submitted: dict[TaskId, float] = {}
        self._outcomes: dict[TaskId, list[Outcome]] = {}
        self._futures: dict[TaskId, AnyFuture] = {}
        self._stragglers: list[TaskId] | None = None
        self.late = 0

    def submitted(self, task_id: TaskId) -> None:
        with self._lock:
            if task_id in self._submitted:
                raise ValueError(f"task id {task_id!r} was already submitted: ledger ids must be unique")
            self._submitted[task_id] = time.monotonic()

    def delivered(self, task_id: TaskId, value: Any = None, error: BaseException | str | None = None) -> None:
        """Record an outcome handed to the user: ``value``, or ``error`` (an exception or a type name)."""
        name = error if isinstance(error, str) or error is None else type(error).__name__
        with self._lock:
            if self._stragglers is not None:
                self.late += 1
                return
            self._outcomes.setdefault(task_id, []).append(Outcome(value, name, time.monotonic()))

    def track(self, task_id: TaskId, future: AnyFuture) -> AnyFuture:
        """Record ``future`` as submitted and its outcome when it completes; returns it."""
        self.submitted(task_id)
        with self._lock:
            self._futures[task_id] = future
        future.add_done_callback(lambda f: self._done(task_id, f))
        return future

    def _done(self, task_id: TaskId, future: AnyFuture) -> None:
        if future.cancelled():
            self.delivered(task_id, error="CancelledError")
        elif (exc := future.exception()) is not None:
            self.delivered(task_id, error=exc)
        else:
            self.delivered(task_id, future.result())

    def seal(self) -> list[TaskId]:
        """The deadline: freeze the outcomes; returns the ids whose futures are still pending."""
        with self._lock:
            if self._stragglers is None:
                self._stragglers = [i for i, f in self._futures.items() if not f.done()]
            return list(self._stragglers)

    def snapshot(self) -> tuple[dict[TaskId, float], dict[TaskId, list[Outcome]]]:
        """Copies of (submit times, outcomes per id)."""
        with self._lock:
            return dict(self._submitted), {k: list(v) for k, v in self._outcomes.items()}

    def counts(self) -> tuple[int, int]:
        """(ids submitted, ids with at least one outcome)."""
        with self._lock:
            return len(self._submitted), len(self._outcomes)


# ---------------------------------------------------------------------- execution log (worker side)


def log_execution(exec_dir: str | os.PathLike[str], task_id: TaskId, attempt: int | None = None,
                  start: float | None = None, end: float | None = None) -> None:
    """Append (id, attempt, pid, start, end) to this process's own file in ``exec_dir``.

    Opened in append mode and closed on every call: a SIGKILL right after loses nothing.
    """
    now = time.time()
    line = json.dumps({"id": task_id, "attempt": attempt, "pid": os.getpid(),
                       "start": now if start is None else start, "end": end}) + "\n"
    path = Path(exec_dir) / f"exec-{socket.gethostname()}-{os.getpid()}.jsonl"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)


@contextmanager
def execution(exec_dir: str | os.PathLike[str], task_id: TaskId, attempt: int | None = None) -> Iterator[None]:
    """Log a start line on entry and an end line on exit: a run killed mid-way still counts."""
    start = time.time()
    log_execution(exec_dir, task_id, attempt, start, None)
    try:
        yield
    finally:
        log_execution(exec_dir, task_id, attempt, start, time.time())


def read_executions(exec_dir: str | os.PathLike[str]) -> tuple[dict[TaskId, list[Execution]], int]:
    """Every execution logged in ``exec_dir`` by task id (in start order), and the unreadable lines."""
    runs: dict[tuple[TaskId, int, float], Execution] = {}
    bad = 0
    for path in sorted(Path(exec_dir).glob("exec-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                key = (r["id"], int(r["pid"]), float(r["start"]))
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            old = runs.get(key)
            end = r.get("end") if old is None or old.end is None else old.end
            runs[key] = Execution(key[0], r.get("attempt"), key[1], key[2], end)
    out: dict[TaskId, list[Execution]] = {}
    for run in sorted(runs.values(), key=lambda e: e.start):
        out.setdefault(run.task_id, []).append(run)
    return out, bad


# ---------------------------------------------------------------------- checker


@dataclass
class Report:
    submitted: int
    completed: int  # ids whose (first) outcome is a result
    failed: dict[str, int]  # error type -> ids whose first outcome is that error
    lost: int  # submitted without a terminal outcome
    dup_delivered: int  # ids handed more than one outcome
    wrong: int  # ids with a result different from the expected one (or none expected)
    stragglers: int  # futures still pending at seal() (they are lost too)
    executions: dict[int, int] = field(default_factory=dict)  # runs -> ids that ran that often
    interrupted: int = 0  # runs logged as started, never finished
    unknown_executions: int = 0  # ids executed but never submitted
    bad_lines: int = 0
    late: int = 0  # outcomes after seal()
    examples: dict[str, list[TaskId]] = field(default_factory=dict)  # a few ids per problem

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.dup_delivered == 0 and self.wrong == 0 and self.stragglers == 0

    def summary(self) -> str:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "none"
        hist = ", ".join(f"{k}x: {v}" for k, v in sorted(self.executions.items())) or "(no log)"
        return (f"submitted {self.submitted}, completed {self.completed}, failed {failed}; lost {self.lost}, "
                f"dup_delivered {self.dup_delivered}, wrong {self.wrong}, stragglers {self.stragglers}; "
                f"executions {hist}; interrupted {self.interrupted}; examples {self.examples}")


def check(ledger: Ledger, expected: dict[TaskId, Any], exec_dir: str | os.PathLike[str] | None = None,
          n_examples: int = 5) -> Report:
    """Seal ``ledger`` (if not yet) and compare what was submitted, delivered and executed.

    ``expected`` maps each id to its correct result; a result for an id it
    lacks counts as wrong. See ``Report`` for the fields.
    """
    stragglers = ledger.seal()
    submitted, outcomes = ledger.snapshot()
    lost = [i for i in submitted if not outcomes.get(i)]
    dup = [i for i, o in outcomes.items() if len(o) > 1]
    wrong = [i for i, os_ in outcomes.items()
             if any(o.error is None and (i not in expected or o.value != expected[i]) for o in os_)]
    failed = collections.Counter(o[0].error for o in outcomes.values() if o and o[0].error is not None)
    completed = sum(1 for o in outcomes.values() if o and o[0].error is None)
    hist: dict[int, int] = {}
    interrupted = unknown = bad = 0
    again: list[TaskId] = []
    if exec_dir is not None:
        runs, bad = read_executions(exec_dir)
        again = [i for i, rs in runs.items() if len(rs) > 1]
        hist = dict(sorted(collections.Counter(len(runs.get(i, ())) for i in submitted).items()))
        interrupted = sum(1 for rs in runs.values() for r in rs if r.end is None)
        unknown = sum(1 for i in runs if i not in submitted)
    examples = {k: v[:n_examples] for k, v in
                (("lost", lost), ("dup_delivered", dup), ("wrong", wrong), ("stragglers", stragglers),
                 ("executed_again", again)) if v}
    return Report(len(submitted), completed, dict(failed), len(lost), len(dup), len(wrong), len(stragglers),
                  hist, interrupted, unknown, bad, ledger.late, examples)
