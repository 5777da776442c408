"""What the benchmarks share in running and reporting: rotation, log counting, verdicts, JSON."""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def rotated(items: Sequence[T], rep: int) -> list[T]:
    """``items`` in the order of repetition ``rep``: rotated so that none always goes first."""
    k = rep % len(items)
    return [*items[k:], *items[:k]]


class CountingHandler(logging.Handler):
    """Counts log records (a reconnect storm shows up here) instead of printing them."""

    def __init__(self, width: int) -> None:
        super().__init__(logging.INFO)
        self.width = width  # of the message, in the key a record is counted under
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname} {record.name}: {record.getMessage()[:self.width]}"] += 1


def count_zpar_logs(width: int) -> CountingHandler:
    """This process's zpar log records, counted and not printed (a reconnect storm would drown the report)."""
    handler = CountingHandler(width)
    zlog = logging.getLogger("zpar")
    zlog.addHandler(handler)
    zlog.setLevel(logging.INFO)
    zlog.propagate = False
    return handler


def print_verdicts(verdicts: Iterable[tuple[str, bool, str]]) -> bool:
    """Prints ``  [PASS] name: detail`` (or FAIL) for each; True when all passed."""
    ok = True
    for name, good, detail in verdicts:
        ok = good and ok
        print(f"  [{'PASS' if good else 'FAIL'}] {name}: {detail}")
    return ok


def git_state() -> dict[str, Any]:
    """The zpar commit benchmarked, and whether zpar's code differs from it (edits to the benchmarks do not count)."""
    import zpar

    root = os.path.dirname(os.path.dirname(os.path.abspath(zpar.__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "zpar", "broker"],
                               cwd=root, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_json(path: str, doc: Any, indent: int = 2) -> None:
    """``doc`` as JSON at ``path``; what JSON cannot hold is written as its ``str``."""
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=indent, default=str)


def finish_run(args: Any, workdir: str, results: Any, code: int) -> int:
    """The end of a benchmark run: ``--json`` written, its log folder removed if all went well, the exit code said."""
    if args.json:
        write_json(args.json, {"args": vars(args), "commit": git_state(), "results": results, "exit_code": code},
                   indent=1)
    if code == 0 and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}")
    print(f"\nexit code {code}")
    return code
