"""What the agent's core asks its shell to do: the only way a rule reaches a socket or a process.

An action list holds, in the order to perform them:

- a ``P.Message``: for the broker (RESULT and ITEMS to its collector, the others to its backend);
- ``ToWorker``: a message for one worker;
- ``Spawn``, ``Kill``: start a worker process, or signal one;
- ``Measure``: read a worker's resident memory and report it (``AgentCore.rss_while_busy``);
- ``Probe``: look at what only the shell can see and report it (``AgentCore.probed``);
- ``Exit``: leave the loop with this exit code (the shell then calls ``AgentCore.shutdown``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from zpar import protocol as P


@dataclass(frozen=True, slots=True)
class ToWorker:
    identity: bytes
    msg: P.Tasks | P.Part | P.Feed | P.Bye | P.Release


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start a worker process that says HELLO as ``identity``; its death is reported as ``worker_exited``."""

    identity: bytes


@dataclass(frozen=True, slots=True)
class Kill:
    """Send ``signum`` (SIGTERM, SIGKILL) to the worker ``identity``, if it is still there."""

    identity: bytes
    signum: int


@dataclass(frozen=True, slots=True)
class Measure:
    """Read the resident memory of worker ``identity`` (process ``pid``); report it with ``rss_while_busy``."""

    identity: bytes
    pid: int


@dataclass(frozen=True, slots=True)
class Probe:
    """Report ``probed``: whether the broker refused our handshake, and who our parent process is now."""


@dataclass(frozen=True, slots=True)
class Exit:
    """Stop the loop; the process exits with ``code``."""

    code: int


Action: TypeAlias = P.Message | ToWorker | Spawn | Kill | Measure | Probe | Exit
