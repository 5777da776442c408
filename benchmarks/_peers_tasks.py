"""The task functions bench_peers.py adds to ``_tasks``': what every peer's workers import.

Kept light: Dask's and Ray's workers import this module by name; Parallel
Python (``pp``) ships ``pp_chunk``'s source text instead, so that one must
stand alone (no imports, only builtins in its annotations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def map_chunk(fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
    """``fn`` over one chunk: how a system without a ``chunksize`` (Dask, Ray) maps N/8 items a task."""
    return [fn(x) for x in xs]


def pp_chunk(name: str, xs: list[object]) -> list[object]:
    """``map_chunk`` for pp, which ships source: ``name`` is a function shipped with it as a ``depfuncs``."""
    fn = globals()[name]
    return [fn(x) for x in xs]


def nbytes(arr: Any) -> int:
    """Returns the size of its argument: only the argument crosses (the 64 MB CurveZMQ line)."""
    return int(arr.nbytes)
