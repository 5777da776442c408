"""A call's random generators as a forked child's would be: what pprocess's calls start from, on Python 3.

pprocess forks a child for each call. On Python 3 (3.7 and later) the
standard library reseeds ``random`` in every forked child, from the
operating system's entropy: each call draws its own numbers, unrelated to the
parent's seed. numpy's global generator (``numpy.random.rand`` and friends)
is copied as it is: every call starts from the state the parent had when it
started the call, so calls started while the parent draws nothing all draw
the same numbers.

zpar's workers outlive their calls; left alone, a worker's generators would
go on from one call to the next (a call that seeds ``random`` would fix the
numbers of the calls after it on that worker). So each call carries the
parent's numpy state (when the parent has imported ``numpy.random``), and
the worker runs it with ``random`` freshly seeded and numpy's state set to
the parent's, then puts its own generators back.

Generators a program makes itself (``random.Random()``,
``numpy.random.default_rng()``) travel inside the call's arguments or
function, as anything else does.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Inherited:
    """numpy's global generator in the parent at one moment: hashable, and equal while it drew nothing."""

    numpy: tuple[str, bytes, int, int, float]  # its legacy state, the keys packed


def snapshot() -> Inherited | None:
    """What a child forked now would inherit; None when the parent has not imported numpy.random."""
    nprandom: Any = sys.modules.get("numpy.random")
    if nprandom is None:
        return None
    try:
        state = nprandom.get_state()
    except Exception:  # noqa: BLE001 - a global generator that is not MT19937 has no legacy state to carry
        return None
    if not isinstance(state, tuple):
        return None
    name, keys, pos, has_gauss, cached = state
    return Inherited((str(name), keys.tobytes(), int(pos), int(has_gauss), float(cached)))


@contextlib.contextmanager
def as_forked(inherited: Inherited | None) -> Iterator[None]:
    """Run the block as a forked child would: ``random`` reseeded, numpy's state the parent's.

    This process's own generators are put back after.
    """
    saved = random.getstate()
    random.seed(os.urandom(32))  # the entropy a forked child gets (256 bits is plenty, and cheaper than 2.5 KB)
    nprandom: Any = None
    np_saved: Any = None
    if inherited is not None:
        import numpy
        import numpy.random

        nprandom = numpy.random
        np_saved = nprandom.get_state()
        name, keys, pos, has_gauss, cached = inherited.numpy
        nprandom.set_state((name, numpy.frombuffer(keys, dtype=numpy.uint32).copy(), pos, has_gauss, cached))
    try:
        yield
    finally:
        random.setstate(saved)
        if nprandom is not None:
            nprandom.set_state(np_saved)
