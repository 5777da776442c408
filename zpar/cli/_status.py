"""The table ``zpar status`` prints.

Everything in ``info`` came over the wire: node names and hosts from agents,
the rest from whatever answered at the broker's address. None of it is Rich
markup and none of it reaches the terminal raw: each value is a ``Text``
(never parsed as markup) of ``printable(value)`` (controls shown as escapes,
length bounded). Only the fixed words around them carry styles.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .._text import printable
from ..config import resource_amount

#: The widest a peer-supplied value shows in the table.
CELL_LIMIT = 80


def _shown(value: Any, limit: int = CELL_LIMIT) -> str:
    if isinstance(value, float):
        return f"{value:.0f}"
    return printable(value, limit)


def _cell(value: Any) -> Text:
    return Text(_shown(value))


def render(info: dict[str, Any], address: str, console: Console | None = None) -> None:
    console = console or Console()
    console.print(view(info, address))


def view(info: dict[str, Any], address: str) -> Group:
    """The status as one renderable: printed once, or redrawn in place by ``zpar status --watch``."""
    lines: list[RenderableType] = []

    def get(key: str) -> str:
        return _shown(info.get(key, "?"))

    epoch = info.get("epoch", "?")
    epoch = printable(epoch[:8] if isinstance(epoch, str) else epoch, 16)
    # Text, not a str: nothing in it is read as markup, and values are escaped already.
    lines.append(Text.assemble(("broker", "bold"), f" {printable(address)}  epoch {epoch}  up {get('uptime_s')} s  "
                               f"producers {get('producers')}"))
    nodes = info.get("nodes", [])
    nodes = [node for node in nodes if isinstance(node, dict)] if isinstance(nodes, list) else []
    offering = any(node.get("resources") for node in nodes)  # a column only when some node offers resources
    table = Table("node", "host", "pid", "workers", "busy", "idle", "tasks held", *(["resources (free)"] * offering))
    for node in nodes:
        cells = [_cell(node.get(key, "?")) for key in ("name", "host", "pid", "workers", "busy", "idle", "running")]
        if offering:
            cells.append(Text(_pairs(node.get("resources"), node.get("resources_free") or {})))
        table.add_row(*cells)
    lines.append(table)
    waiting = f"  waiting {info['waiting']}" if info.get("waiting") else ""  # for other tasks' values
    lines.append(Text(f"workers {get('workers')} (busy {get('busy')})  queued {get('queued')}{waiting}  "
                      f"running {get('running')}  done {get('done')}  failed {get('failed')}"))
    unplaceable = info.get("unplaceable", [])
    for item in unplaceable if isinstance(unplaceable, list) else []:
        if isinstance(item, dict):
            lines.append(Text(_unplaceable(item), style="bold yellow"))
    counters = info.get("counters", {})
    counters = counters if isinstance(counters, dict) else {}
    errors = counters.get("protocol_errors", 0)
    if errors:
        lines.append(Text(f"bad messages dropped: {_shown(errors)}", style="yellow"))
    refused = counters.get("handshakes_failed", 0)
    if refused:
        lines.append(Text(f"handshakes refused: {_shown(refused)}", style="yellow"))
    security = printable(info.get("security", ""))
    if security.startswith("INSECURE"):
        lines.append(Text(f"warning: {security}; anyone who reaches the broker can run code as its user",
                          style="bold red"))
    elif security:
        lines.append(Text(f"security: {security}"))
    dashboard = info.get("dashboard")
    if isinstance(dashboard, str) and dashboard:
        lines.append(Text(f"dashboard: {printable(dashboard, 200)}"))
    return Group(*lines)


def _pairs(resources: Any, free: Any = None) -> str:
    """``gpu=2, memory=64GiB``, as --resources takes them ("" for none); with ``free`` (a node's), what no task
    holds after each: ``gpu=2 (1)``."""
    if not isinstance(resources, dict):
        return ""
    if free is not None and not isinstance(free, dict):
        free = {}
    return ", ".join(f"{printable(name, 64)}={_amount(amount)}"
                     + (f" ({_amount(free.get(name, '?'))})" if free is not None else "")
                     for name, amount in resources.items())


def _amount(amount: Any) -> str:
    if isinstance(amount, int | float) and not isinstance(amount, bool):
        return resource_amount(amount)
    return printable(amount, 32)


def _unplaceable(item: dict[str, Any]) -> str:
    """The warning for tasks that ask for what no connected node offers."""
    offered = item.get("offered")
    nodes = "; ".join(f"{printable(node, 64)}: {_pairs(res) or 'none'}" for node, res in offered.items()) \
        if isinstance(offered, dict) and offered else "none"
    asked = _pairs(item.get("resources")) or "none"
    return (f"warning: {_shown(item.get('tasks', '?'))} tasks ask for {asked}, which no "
            f"connected node offers (nodes offer: {printable(nodes, 400)}); they wait for an agent started with "
            "--resources")


def render_tasks(tasks: list[Any], console: Console | None = None) -> None:
    """``zpar tasks``: a row a task, newest first; a failure's last line of traceback (or why it was lost)."""
    console = console or Console()
    table = Table("ended", "producer", "task", "function", "node", "worker", "outcome", "seconds", "why")
    for task in tasks if isinstance(tasks, list) else []:
        if not isinstance(task, dict):
            continue
        when = task.get("time")
        ended = time.strftime("%H:%M:%S", time.localtime(when)) if isinstance(when, int | float) else "?"
        error = task.get("error")
        why = error.strip().splitlines()[-1] if isinstance(error, str) and error.strip() else ""
        seconds = task.get("duration_s")
        table.add_row(Text(ended), *(_cell(task.get(key, "")) for key in ("producer", "task", "function", "node",
                                                                          "worker", "outcome")),
                      Text(f"{seconds:.3f}" if isinstance(seconds, int | float) else "?"), Text(printable(why)))
    console.print(table)
