"""Parallel Python's ``Template``: one job definition, submitted again and again (see zpar.pp)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._job import Job
from ._server import Server


class Template:
    """A job definition to submit again and again with other arguments: ``Template(server, f).submit(x)``."""

    def __init__(self, job_server: Server, func: Callable[..., Any], depfuncs: tuple[Any, ...] = (),
                 modules: tuple[str, ...] = (), callback: Callable[..., Any] | None = None,
                 callbackargs: tuple[Any, ...] = (), group: str = "default",
                 globals: dict[str, Any] | None = None) -> None:
        self.job_server, self.func, self.depfuncs, self.modules = job_server, func, depfuncs, modules
        self.callback, self.callbackargs, self.group, self.globals = callback, callbackargs, group, globals

    def submit(self, *args: Any) -> Job:
        """``job_server.submit(func, args, ...)`` with this template's other arguments."""
        return self.job_server.submit(self.func, args, self.depfuncs, self.modules, self.callback,
                                      self.callbackargs, self.group, self.globals)
