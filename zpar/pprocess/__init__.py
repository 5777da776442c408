"""pprocess's API (0.5.x) on zpar: change the import, keep the program.

::

    import zpar.pprocess as pprocess

    results = pprocess.pmap(calculate, sequence, limit=4)   # calculate(item) on zpar's workers
    for value in results:                                   # input order, each as soon as it is in
        ...

The calls a pprocess program makes run as zpar tasks: on this machine's
cores by default, or on a cluster (see "Which cluster" below). The names are
pprocess's; what each does is pprocess's, with the differences listed below.

What maps to what
-----------------

``pmap(callable, sequence, limit=None)``
    ``callable(item)`` for each item, one task each; returns a :class:`Map`.
``Map``, ``Queue``, ``Exchange``
    Exchanges watch *channels*, each the creating side of one running call.
    ``exchange.start(fn, *args, **kw)`` (or ``exchange.manage(fn)(*args, **kw)``)
    runs ``fn(channel, *args, **kw)`` as a task; past ``limit`` running calls
    it waits in ``exchange.waiting`` and starts when a running one ends.
    ``store()`` hands each channel with data to ``store_data(channel)``;
    ``finish()`` stores until nothing runs or waits. A ``Map`` keeps one
    result per call in call order (``results[i]``, slices, iteration); a
    ``Queue`` yields what arrives, in arrival order.
``MakeParallel(fn)``, ``MakeReusable(fn)``
    ``fn(*args, **kw)`` runs as one task whose return value is the channel's
    one message. zpar's workers are a pool already, so every call reuses a
    worker process: ``reuse=1`` needs nothing more for these wrappers.
``start(fn, *args, **kw)``
    Runs ``fn(channel, *args, **kw)`` on a worker and returns the creating
    side's :class:`Channel`: ``send()`` and ``receive()`` work both ways while
    the task runs (zpar.streaming). ``Exchange(continuous=1)`` takes any number
    of messages from each call.
``create()``, ``exchange.create()``, ``exit(channel)``
    Fork this process, as pprocess does (``os.fork`` and a socket pair): the
    copy runs the code after ``create()`` and must end with ``exit(channel)``.
    A fork copies a running program, which cannot move to another machine, so
    these work only while this layer uses this machine's embedded cluster;
    with a cluster given by address they raise :class:`RemoteForkError`.
``get_number_of_cores()``
    How many calls can run at once: this machine's usable cores for the
    embedded cluster, the workers a remote cluster reports otherwise.

Which cluster
-------------

pprocess's functions take no cluster argument, so this module keeps one
client for them, chosen by :func:`use`:

- by default, a private embedded cluster (``zpar.Client()``: one worker per
  core; ``use(workers=4)`` to choose) started on the first call that needs
  it and stopped by :func:`shutdown` or at exit;
- ``use("tcp://host:5555", secret_file="secret")``: a running cluster,
  connected on first need (the options go to ``zpar.Client``);
- ``use(client)``: a ``zpar.Client`` of yours (you close it).

Every exchange, and :func:`pmap`, also takes ``client=`` (keyword only) to
use that client instead. ``create()`` never starts a cluster: it forks.

A call's function travels as any zpar task's does: defined in your script, by
value; from your own modules, by reference, so those modules must be
importable on every node (or registered with
``cloudpickle.register_pickle_by_value``). What a call prints goes to its
worker's output: your terminal for the embedded cluster, the agent's on a
cluster.

Differences from pprocess
-------------------------

- A call's exception reaches the creating process as itself, with the
  worker's traceback as its ``__cause__``: ``channel.receive()`` raises it
  (as pprocess raises an exception object the child sent). A ``Map`` raises
  it only when that call's result is read.
- ``send()`` returns once the object is on its way; it does not wait for the
  other side to read it (zpar's window of 32 objects is the back-pressure).
- A waiting call starts when a running call ends (pprocess starts one when a
  running call delivers data). ``ready()`` and ``store()`` take their timeout
  in milliseconds, as pprocess's code does (its reference says seconds).
- Not provided: the persistent and background variants (``PersistentQueue``,
  ``BackgroundCallable``, ``BackgroundQueue``, ``start_persistent``): zpar
  routes a call's messages to the process that started it; a process that
  detaches and another that collects later need a cluster-side store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from ..client import Client
from . import _channels
from ._channels import Channel, MakeParallel, MakeReusable
from ._exchange import Exchange, ManagedCallable, Map, Queue, Undefined
from ._layer import (
    RemoteForkError,
    check_fork,
    fork,
    get_client,
    get_number_of_cores,
    shutdown,
    use,
)

__all__ = [
    "Channel",
    "Exchange",
    "MakeParallel",
    "MakeReusable",
    "ManagedCallable",
    "Map",
    "Queue",
    "RemoteForkError",
    "Undefined",
    "create",
    "exit",
    "get_client",
    "get_number_of_cores",
    "pmap",
    "shutdown",
    "start",
    "use",
    "waitall",
]

for _cls in (Channel, Exchange, MakeParallel, MakeReusable, ManagedCallable, Map, Queue, RemoteForkError, Undefined):
    _cls.__module__ = __name__  # they are documented, and pickled by reference, as zpar.pprocess's
del _cls


def pmap(callable: Callable[..., Any], sequence: Iterable[Any], limit: int | None = None, *,
         client: Client | None = None) -> Map:
    """``callable(item)`` for each item of ``sequence``, at most ``limit`` at once; a Map of the results."""
    return Map(limit=limit, client=client)(callable, sequence)


def start(callable: Callable[..., Any], *args: Any, **kw: Any) -> Channel:
    """Run ``callable(channel, *args, **kw)`` as a task; returns the creating end of its channel."""
    return _channels.launch(get_client(), callable, args, kw)


def create() -> Channel:
    """Fork this process; returns a channel to the other side: ``pid`` 0 in the child, the child's pid in the parent.

    The child runs the code after ``create()`` and must end with ``exit(channel)``.
    Raises RemoteForkError while this module uses a cluster given by address.
    """
    check_fork(None)
    return fork()


def exit(channel: Channel) -> NoReturn:  # noqa: A001 - pprocess's name
    """End the created side: a forked child exits at once (``os._exit``); a call running as a task returns.

    Raises RuntimeError at the creating end (which pprocess would have ended).
    """
    _channels.exit_created(channel)


def waitall() -> None:
    """Wait for every child ``create()`` forked to exit, and reap it."""
    _channels.wait_all()
