"""The table ``zpar status`` prints."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def render(info: dict[str, Any], address: str, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]broker[/] {address}  epoch {info['epoch'][:8]}  up {info['uptime_s']:.0f} s  "
                  f"producers {info['producers']}")
    table = Table("node", "host", "pid", "workers", "busy", "idle", "tasks held")
    for node in info["nodes"]:
        table.add_row(node["name"], node["host"], str(node["pid"]), str(node["workers"]), str(node["busy"]),
                      str(node["idle"]), str(node["running"]))
    console.print(table)
    console.print(f"workers {info['workers']} (busy {info['busy']})  queued {info['queued']}  "
                  f"running {info['running']}  done {info['done']}  failed {info['failed']}")
    counters = info.get("counters", {})
    errors = counters.get("protocol_errors", 0)
    if errors:
        console.print(f"[yellow]bad messages dropped: {errors}[/]")
    refused = counters.get("handshakes_failed", 0)
    if refused:
        console.print(f"[yellow]handshakes refused: {refused}[/]")
    security = info.get("security", "")
    if security.startswith("INSECURE"):
        console.print(f"[bold red]warning: {security}; anyone who reaches the broker can run code as its user[/]")
    elif security:
        console.print(f"security: {security}")
