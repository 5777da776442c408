"""Which cluster zpar.pprocess runs calls on: one client per process, chosen by ``use()``.

pprocess's functions take no cluster argument, so the layer uses the
drop-in layers' one default client (zpar._default, shared with
zpar.Process), started on first need: a private embedded cluster by default,
a cluster by address, or a client the user made. Forking (``create()``) is
allowed only while that client is (or will be) the embedded cluster.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import _default
from ..client import Client
from ..config import usable_cores
from ..errors import ConfigError, ZparError
from . import _channels
from ._channels import Channel

log = logging.getLogger(__name__)


class RemoteForkError(ZparError, RuntimeError):
    """``create()`` was asked to fork for a cluster elsewhere: a fork cannot leave this machine."""


#: The client the module-level API uses: the drop-in layers' shared default (see zpar._default).
_layer = _default.shared


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
    _layer.use(target, **client_options)


def shutdown() -> None:
    """Close the client this module started (the embedded cluster stops with it); the next call starts another."""
    _layer.drop()


def get_client() -> Client:
    """The client this module's calls use now, started if it was not yet (see ``use``)."""
    return _layer.get()


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
    """How many calls can run at once on the cluster this module uses.

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


def fork() -> Channel:
    """``create()``'s fork; in the child, forget the parent's client."""
    channel = _channels.fork()
    if channel.pid == 0:  # the parent's client is not ours to use, nor to close, in this copy
        _layer.forget()
    return channel
