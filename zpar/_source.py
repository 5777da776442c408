"""Source lines for the tracebacks of functions shipped by value.

cloudpickle ships the code of a function it cannot import on the worker
(``__main__``, a closure, a lambda) and names its file ``<dynamic-code>``, so
a traceback from the worker shows no file and no line of source.
:func:`dump` pickles each code object with its real file name and the lines
of its own block; on the worker :func:`rebuild_code` puts the name back and
gives :mod:`linecache` those lines, so tracebacks read as they would at
home (as loky and Dask show them). A file that cannot be read ships no lines:
the traceback then names the file and line only.
"""

from __future__ import annotations

import inspect
import linecache
import types
from collections import ChainMap
from collections.abc import Callable
from tokenize import TokenError
from typing import IO, Any

import cloudpickle

# cloudpickle's own reducer for code objects: what it ships, ours adds to (None if it moves).
_code_reduce: Callable[[types.CodeType], tuple[Any, ...]] | None = getattr(
    cloudpickle.cloudpickle, "_code_reduce", None)


def _block(code: types.CodeType) -> list[str]:
    """The lines of ``code``'s own block in its file, or [] if the file cannot be read."""
    lines = linecache.getlines(code.co_filename)
    start = code.co_firstlineno - 1
    if not lines or not 0 <= start < len(lines):
        return []
    try:
        return inspect.getblock(lines[start:])
    except (IndexError, SyntaxError, TokenError):  # a block the tokenizer cannot follow
        return []


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    if _code_reduce is None:
        raise TypeError("cloudpickle no longer exposes its code reducer")  # not reached: Pickler checks
    rebuild, args = _code_reduce(code)[:2]
    return rebuild_code, (rebuild, args, code.co_filename, code.co_firstlineno, _block(code))


def rebuild_code(rebuild: Callable[..., types.CodeType], args: tuple[Any, ...], filename: str,
                 first_line: int, lines: list[str]) -> types.CodeType:
    """On the worker: cloudpickle's code object, with its file name back and its lines known."""
    code = rebuild(*args).replace(co_filename=filename)
    if lines and not _readable(filename):
        cached = linecache.cache.get(filename)
        known = list(cached[2]) if cached is not None and len(cached) == 4 else []
        end = first_line - 1 + len(lines)
        known += [""] * max(0, end - len(known))
        known[first_line - 1:end] = lines
        # No mtime: linecache.checkcache never throws these lines away.
        linecache.cache[filename] = (len("".join(known)), None, known, filename)
    return code


def _readable(filename: str) -> bool:
    """Whether the file is here and unchanged-looking, so linecache can read it itself."""
    cached = linecache.cache.get(filename)
    if cached is not None and len(cached) == 4 and cached[1] is None:
        return False  # lines we registered: keep adding to them
    return bool(linecache.getlines(filename))


# cloudpickle's Pickler with our reducer for code objects (the C pickler reads its dispatch table
# when it is made, so it is a class attribute; cloudpickle has no types, hence type()).
_Pickler = type("_SourcePickler", (cloudpickle.Pickler,), {} if _code_reduce is None else {
    "dispatch_table": ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)})


def dump(obj: Any, file: IO[bytes], protocol: int) -> None:
    """Pickle ``obj`` into ``file`` as cloudpickle does, each code object with its file name and lines."""
    _Pickler(file, protocol=protocol).dump(obj)
