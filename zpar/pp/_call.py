"""What a worker runs for a ``zpar.pp`` job: the user's function, made to behave as under pp.

Parallel Python shipped a function as source and ran it in a namespace where
the job's ``modules`` had been imported and its ``depfuncs`` defined; it also
captured what the function printed and sent it back with the result. zpar
ships functions with cloudpickle, which takes along the globals a function
refers to, but only those the producer has: a script that never imports
``math`` itself and relies on ``modules=("math",)`` would meet a NameError in
the worker. So ``PPCall`` binds the listed modules and depfuncs as globals of
the function in the worker, where missing, before the first call.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

from .. import serialize


def pack(args: tuple[Any, ...]) -> tuple[bytes, ...]:
    """``args`` pickled now, as pp did at submit: errors show at once, later changes to them do not travel.

    Large buffers are copied out as ``bytes`` of their own, so they still travel out of band.
    Raises SerializationError naming the argument.
    """
    frames = serialize.dumps(args, what="job arguments")
    return (frames[0], *(bytes(f) for f in frames[1:]))


class PPCall:
    """``func`` with the names pp would have defined around it; returns ``(value, output, seconds)``.

    ``names`` are ``(name, object)`` pairs (depfuncs, and what ``globals=`` gave);
    ``modules`` are module names or ``import``/``from`` statements, as pp accepted.
    A module that does not import is reported in the job's output, as pp did,
    and the function runs anyway. An exception the function raises is raised
    again with what it printed so far as its ``pp_output`` attribute.
    """

    __slots__ = ("_bound", "func", "modules", "names")

    def __init__(self, func: Callable[..., Any], names: tuple[tuple[str, Any], ...] = (),
                 modules: tuple[str, ...] = ()) -> None:
        self.func, self.names, self.modules = func, names, modules
        self._bound = False

    def __getstate__(self) -> tuple[Any, ...]:
        return self.func, self.names, self.modules

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.func, self.names, self.modules = state
        self._bound = False

    def __call__(self, head: bytes, *buffers: Any) -> tuple[Any, str, float]:
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                if not self._bound:
                    self._bind(output)
                args = serialize.loads([head, *buffers], what="job arguments")
                start = time.perf_counter()
                value = self.func(*args)
                took = time.perf_counter() - start
        except BaseException as exc:
            try:
                exc.pp_output = output.getvalue()  # type: ignore[attr-defined]  # read back with getattr
            except Exception:  # noqa: BLE001, S110  (a type that refuses attributes: the output is lost)
                pass
            raise
        return value, output.getvalue(), took

    def _bind(self, output: io.StringIO) -> None:
        self._bound = True  # once per worker: the worker caches this object by its digest
        namespace = getattr(self.func, "__globals__", None)
        if namespace is None:  # a builtin or a callable object: nothing to bind into
            return
        for name, obj in self.names:
            namespace.setdefault(name, obj)
        for module in self.modules:
            try:
                _import_into(module.strip(), namespace)
            except Exception:  # noqa: BLE001  (reported in the job's output, as pp did; the job still runs)
                output.write(f"[pp-worker] Warning: could not import module '{module}': {traceback.format_exc()}")

    def __repr__(self) -> str:
        return f"<pp job function {getattr(self.func, '__qualname__', self.func)!r}>"


def _import_into(module: str, namespace: dict[str, Any]) -> None:
    """``import module`` (or the statement given) into ``namespace``, keeping names already there."""
    if module.startswith(("import ", "from ")):
        found: dict[str, Any] = {}
        exec(compile(module, "<pp modules>", "exec"), found)  # noqa: S102  (pp accepted import statements here)
        found.pop("__builtins__", None)
    elif module:
        importlib.import_module(module)
        top = module.partition(".")[0]  # `import a.b` binds `a`, as pp's `import` did
        found = {top: sys.modules[top]}
    else:
        return
    for name, obj in found.items():
        namespace.setdefault(name, obj)


class CallCache:
    """One PPCall per distinct job definition, so that it is pickled once and workers cache it by digest."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._calls: collections.OrderedDict[Any, PPCall] = collections.OrderedDict()

    def get(self, func: Callable[..., Any], depfuncs: tuple[Any, ...], modules: tuple[str, ...],
            namespace: dict[str, Any] | None) -> PPCall:
        """The PPCall for pp's ``submit`` arguments; raises SerializationError if it cannot be pickled."""
        key = _definition(func, depfuncs, modules, namespace)
        try:
            hash(key)
        except TypeError:  # an unhashable callable object: not cached, pickled with each job
            return _checked(PPCall(*key))
        with self._lock:
            call = self._calls.get(key)
            if call is not None:
                self._calls.move_to_end(key)
                return call
        call = _checked(PPCall(*key))
        with self._lock:
            self._calls[key] = call
            if len(self._calls) > self._size:
                self._calls.popitem(last=False)
        return call


def _definition(func: Callable[..., Any], depfuncs: tuple[Any, ...], modules: tuple[str, ...],
                namespace: dict[str, Any] | None) -> tuple[Any, tuple[tuple[str, Any], ...], tuple[str, ...]]:
    """``(func, names, modules)``: depfuncs by name, plus what pp took from ``globals=``.

    From ``namespace`` come its modules (imported again in the worker, under
    the names they have there) and the functions and classes defined in it.
    """
    names = [(getattr(f, "__name__", ""), f) for f in depfuncs]
    found: list[str] = []
    if namespace is not None:
        here = namespace.get("__name__")
        for name, obj in namespace.items():
            if isinstance(obj, types.ModuleType):
                if name not in ("__builtins__", "pp"):  # pp skipped itself too
                    found.append(name if name == obj.__name__ else f"import {obj.__name__} as {name}")
            elif isinstance(obj, (types.FunctionType, type)) and obj.__module__ == here:
                names.append((name, obj))
    return func, tuple(n for n in names if n[0]), modules + tuple(found)


def _checked(call: PPCall) -> PPCall:
    serialize.dump_function(call)  # a function that cannot travel fails here, at submit, as in pp
    return call
