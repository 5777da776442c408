"""Which cluster zpar.pprocess runs calls on, and where each call gets its worker.

pprocess's functions take no cluster argument, so the layer uses the drop-in
layers' one default client (zpar._default, shared with zpar.Process): a
private embedded cluster by default, a cluster by address, or a client the
user made. On the embedded default, calls that hold a worker for as long as
they live get one reserved from this program's pool (zpar.pprocess._capacity),
which starts workers as they are needed.

Inside a call (a worker running it), ``_state.inside`` says which cluster that call
runs on: the exchanges the call uses run their calls there too, through the
pool's service or the cluster's frontend, instead of starting a cluster
inside the worker.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from .. import _default
from ..client import Client
from ..config import usable_cores
from ..errors import ConfigError, ZparError
from . import _capacity
from ._capacity import LocalPool, Slot, Where

log = logging.getLogger(__name__)


class RemoteForkError(ZparError, RuntimeError):
    """``create()`` was asked to fork for a cluster elsewhere: a fork cannot leave this machine."""


#: The client the module-level API uses: the drop-in layers' shared default (see zpar._default).
_layer = _default.shared


class _State:
    """This process's pool, and the cluster of the call it runs now, if it is a worker running one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool: LocalPool | None = None  # the embedded default's reserved workers, started on first need
        self.inside: Where | None = None  # set while this process runs a call: the cluster it runs on
        self.atexit = False  # _close_pool is registered


_state = _State()


def use(target: Client | str | None = None, **client_options: Any) -> None:
    """Choose the cluster this module's calls run on from now on.

    ``use()``: a private embedded cluster, started on first need
    (``use(workers=4)`` sizes it; one worker per core by default).
    ``use("tcp://host:5555", secret_file="secret")``: the cluster whose
    broker's frontend is there. Options go to ``zpar.Client`` as they are.
    ``use(client)``: that ``zpar.Client``, which stays yours to close. A
    client this module started before is closed. Raises ConfigError for
    options with a client, or ``workers`` with an address.
    """
    if isinstance(target, Client) and client_options:
        raise ConfigError(f"use(client) takes no client options ({', '.join(client_options)}): "
                          "give them to zpar.Client(...) when you make it")
    if target is not None and client_options.get("workers") is not None:
        raise ConfigError("workers= sizes the embedded cluster; a remote cluster's agents set its size")
    _close_pool()
    _layer.use(target, **client_options)


def shutdown() -> None:
    """Close the clusters this module started (their workers stop); the next call starts new ones."""
    _close_pool()
    _layer.drop()


def _close_pool() -> None:
    with _state.lock:
        pool, _state.pool = _state.pool, None
    if pool is not None:
        pool.close()


def get_client() -> Client:
    """The client this module's calls that hold no worker use now, started if it was not yet (see ``use``)."""
    where = _state.inside
    if where is not None:
        if where.pool:
            return _capacity.link(where.address).shared()
        return _capacity.client_at(where.address, where.insecure)
    return _layer.get()


def _local_pool() -> LocalPool | None:
    """This program's pool, if its calls run on the embedded default (started now if need be)."""
    with _layer.lock:
        if _layer.target is not None:
            return None
        cores = _layer.options.get("workers") or usable_cores()
    with _state.lock:
        if _state.pool is None:
            _state.pool = LocalPool(cores, _layer.get)
            if not _state.atexit:
                atexit.register(_close_pool)
                _state.atexit = True
        return _state.pool


def place(held: bool, hint: int = 1) -> tuple[Client, Slot | None, Where]:
    """Where one call runs: its client, the worker reserved for it if it holds one, and its ``Where``.

    ``held``: the call keeps its worker for as long as it lives, so it gets one
    of its own (on the embedded default; a cluster given by address or client
    has the workers it has). ``hint``: how many such calls its exchange may
    run at once, to size a new shard.
    """
    where = _state.inside
    if where is not None:  # a call's own exchange: the cluster that call runs on
        if not where.pool:
            return _capacity.client_at(where.address, where.insecure), None, where
        link = _capacity.link(where.address)
        if held:
            slot = link.reserve(hint)
            return slot.client, slot, where
        return link.shared(), None, where
    pool = _local_pool()
    if pool is None:
        client = _layer.get()
        return client, None, Where.of(client)
    if held:
        slot = pool.reserve(hint)
        return slot.client, slot, pool.where
    return _layer.get(), None, pool.where


@contextlib.contextmanager
def inside(where: Where | None) -> Iterator[None]:
    """In a worker, while it runs a call: the exchanges the call uses run on ``where``."""
    before, _state.inside = _state.inside, where
    try:
        yield
    finally:
        _state.inside = before
        settle()


def settle() -> None:
    """Tell the pool which of this process's reservations have ended (a worker's exchanges do so as they go)."""
    if _capacity.has_links():
        _capacity.flush_links()


def check_fork(client: Client | None) -> None:
    """Raise RemoteForkError unless the calls in question run on this machine's embedded cluster."""
    target: Client | str | None = client if client is not None else (_layer.client or _layer.target)
    if target is None or (isinstance(target, Client) and target.embedded):
        return
    where = target if isinstance(target, str) else target.address
    raise RemoteForkError(
        f"create() forks this process and runs the code after it in the copy; a copy of a running program "
        f"cannot move to the cluster at {where}. Put the work in a function and run it there with "
        f"exchange.start(fn, ...) or exchange.manage(fn)(...) (pprocess.MakeParallel(fn) for a function that "
        f"returns its result), or fork on this machine with zpar.pprocess.use() (no address).")


def get_number_of_cores() -> int:
    """How many calls can run at once on the cluster this module uses (calls that hold a worker get more).

    For the embedded cluster: the workers asked of ``use(workers=...)``, else
    this machine's usable cores (without starting it). For a cluster given by
    address or client: the workers its broker reports, at least 1.
    """
    with _layer.lock:
        target, workers, client = _layer.target, _layer.options.get("workers"), _layer.client
    if target is None:
        return workers or usable_cores()
    reported: int = (client or get_client()).status()["workers"]
    return max(1, reported)


def forget_after_fork() -> None:
    """In a forked child: the parent's clients, pool and links are not ours to use, nor to close."""
    _layer.forget()
    inside = _state.inside
    _state.__init__()  # type: ignore[misc]  # a fresh lock too: another thread may have held it at the fork
    _state.inside = inside  # a call's forked child still runs on its call's cluster
    _capacity.forget()


def shutdown_after_fork() -> None:
    """A forked child about to leave: stop what it started itself (its parent's are forgotten)."""
    try:
        shutdown()
    except Exception as exc:  # noqa: BLE001 - leaving anyway; the clusters also watch this process
        log.debug("zpar.pprocess: shutting down a forked child's clusters failed: %s", exc)

