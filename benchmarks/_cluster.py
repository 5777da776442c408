"""What the benchmarks share: a cluster whose daemons log to a file."""

from __future__ import annotations

import os
import sys
from typing import Any

from zpar.testing import LocalCluster


def start_cluster(log_path: str, **kwargs: Any) -> LocalCluster:
    """A LocalCluster whose daemons write their stderr (their logs) to ``log_path``, not to ours."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(fd, 2)  # inherited by the daemons (and their workers) spawned now
    try:
        return LocalCluster(**kwargs)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
