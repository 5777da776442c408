"""pprocess's API (0.5.x) on zpar: change the import, keep the program.

::

    import zpar.pprocess as pprocess

    results = pprocess.pmap(calculate, sequence, limit=4)   # calculate(item) on zpar's workers
    for value in results:                                   # input order, each as soon as it is in
        ...

The calls a pprocess program makes run as zpar tasks: on this machine by
default, or on a cluster (see "Which cluster" below). The names are
pprocess's; what each does is pprocess's, with the differences listed below.

What maps to what
-----------------

``pmap(callable, sequence, limit=None)``
    ``callable(item)`` for each item, one task each; returns a :class:`Map`.
``Map``, ``Queue``, ``Exchange``
    Exchanges watch *channels*, each the creating side of one running call.
    ``exchange.start(fn, *args, **kw)`` (or ``exchange.manage(fn)(*args, **kw)``)
    runs ``fn(channel, *args, **kw)`` as a task; past ``limit`` running calls
    it waits in ``exchange.waiting`` as ``(fn, args, kw)``. ``store()`` hands
    each channel with data to ``store_data(channel)``, then calls
    ``start_waiting(channel)``; ``finish()`` stores until nothing runs or
    waits. Waiting calls start where pprocess starts them, through the same
    hooks (``_set_waiting``, ``_get_waiting``, ``start_waiting``,
    ``_get_channel_for_process``), so subclasses that override them steer
    the same way. A ``Map`` keeps one result per call in call order
    (``results[i]``, slices, iteration); a ``Queue`` yields what arrives.
``MakeParallel(fn)``, ``MakeReusable(fn)``
    ``fn(*args, **kw)`` runs as one task whose return value is the channel's
    one message. With ``reuse=1`` a ``MakeReusable`` call stays on its worker
    and is sent the next waiting arguments, as in pprocess.
``start(fn, *args, **kw)``
    Runs ``fn(channel, *args, **kw)`` on a worker and returns the creating
    side's :class:`Channel`: ``send()`` and ``receive()`` work both ways while
    the task runs (zpar.streaming). ``Exchange(continuous=1)`` takes any number
    of messages from each call.
``create()``, ``exchange.create()``, ``exit(channel)``
    Fork this process, as pprocess does (``os.fork`` and a socket pair;
    ``create_pipes()`` for two pipes): the copy runs the code after
    ``create()`` and must end with ``exit(channel)``. A fork copies a running
    program, which cannot move to another machine, so ``create()`` works only
    while this layer uses this machine's embedded cluster; with a cluster
    given by address it raises :class:`RemoteForkError`.
``BackgroundCallable``, ``start_persistent``, ``PersistentExchange``, ``PersistentQueue``, ``BackgroundQueue``
    A persistent call runs in a background process forked on this machine,
    listening on a Unix socket file (its address), as in pprocess: its
    creator may exit, and any process collects what it sends later with
    ``connect_persistent(address)`` (``exchange.connect``, ``BackgroundQueue``).
    It cannot be a zpar task, which ends with the program that submitted it;
    the calls it starts itself run on zpar.
``get_number_of_cores()``
    How many calls can run at once on the cluster's cores: this machine's
    usable cores for the embedded cluster, the workers a remote cluster
    reports otherwise.

Calls that hold a worker
------------------------

pprocess gives every call a process of its own. A zpar worker runs one call
at a time, so a call that keeps its worker for as long as it lives (a
channel-aware call, which may wait for messages or never end, and every call
of an exchange with a ``limit``) gets a worker reserved for it: on the
embedded default, this program's pool starts more workers as they are needed
(the first time for the exchange's whole ``limit``), so an exchange runs
``limit`` calls at once, as pprocess does, and calls that never end or wait
for one another all run, whatever the number of cores. Calls of plain
functions with no limit (``pmap(fn, seq)``) share the cores. A cluster given
by address or client has the workers it has: calls beyond them wait.

A call that uses an exchange itself (nested) runs its calls on the cluster it
runs on: through this program's pool, or that cluster's frontend. No
cluster is started inside a worker.

Which cluster
-------------

pprocess's functions take no cluster argument, so this module keeps one
client for them, chosen by :func:`use`:

- by default, a private embedded cluster (``zpar.Client()``: one worker per
  core; ``use(workers=4)`` to choose), and the pool of reserved workers,
  started on the first call that needs them and stopped by :func:`shutdown`
  or at exit;
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

A fresh copy of the parent, or not
----------------------------------

A forked child starts from its parent's state as it is at the fork. zpar
gives each call the part of it that programs notice, as Python 3 gives it to
pprocess's children: ``random`` freshly seeded in every call (the standard
library reseeds a forked child), and numpy's global generator as the parent
had it when it started the call (numpy copies it: calls started while the
parent draws nothing draw the same numbers; seed inside the call for
distinct ones). The rest differs: a call sees the globals of your script as
they were when its function was first sent (it is pickled once per client),
and a worker's module state (module globals, caches, imports) carries over
from one call to the next on that worker.

Differences from pprocess
-------------------------

- A call's exception reaches the creating process as itself, with the
  worker's traceback as its ``__cause__``: ``channel.receive()`` raises it
  (as pprocess raises an exception object the child sent). A ``Map`` raises
  it only when that call's result is read.
- ``send()`` on a task's channel returns once the object is on its way; it
  does not wait for the other side to read it (zpar's window of 32 objects is
  the back-pressure). Forked children's channels do not wait either;
  persistent channels do (a receipt for each message, as in pprocess).
- A waiting call started because a running call delivered its message (as
  pprocess starts it) takes over that call's worker, so it runs once that
  call has returned; pprocess runs both at once for that moment.
- ``ready()`` and ``store()`` take their timeout in milliseconds, as
  pprocess's code does (its reference says seconds).
- ``close_streams()`` points standard input, output and error at /dev/null
  instead of closing them (output vanishes the same way, and no socket
  opened later takes their numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from ..client import Client
from . import _channels, _fork
from ._channels import Channel, MakeParallel, MakeReusable
from ._exchange import Exchange, ManagedCallable
from ._fork import create_pipes, create_socketpair
from ._layer import (
    RemoteForkError,
    check_fork,
    get_client,
    get_number_of_cores,
    place,
    shutdown,
    use,
)
from ._persistent import (
    AcknowledgementError,
    BackgroundCallable,
    BackgroundQueue,
    Persistent,
    PersistentCallable,
    PersistentChannel,
    PersistentExchange,
    PersistentQueue,
    close_streams,
    connect_persistent,
    create_persistent,
    start_persistent,
)
from ._results import Map, Queue, Undefined

#: The pprocess release whose API and behaviour this module follows.
__version__ = "0.5.1"

__all__ = [
    "AcknowledgementError",
    "BackgroundCallable",
    "BackgroundQueue",
    "Channel",
    "Exchange",
    "MakeParallel",
    "MakeReusable",
    "ManagedCallable",
    "Map",
    "Persistent",
    "PersistentCallable",
    "PersistentChannel",
    "PersistentExchange",
    "PersistentQueue",
    "Queue",
    "RemoteForkError",
    "Undefined",
    "__version__",
    "close_streams",
    "connect_persistent",
    "create",
    "create_persistent",
    "create_pipes",
    "create_socketpair",
    "exit",
    "get_client",
    "get_number_of_cores",
    "pmap",
    "shutdown",
    "start",
    "start_persistent",
    "use",
    "waitall",
]

for _cls in (AcknowledgementError, BackgroundCallable, Channel, Exchange, MakeParallel, MakeReusable,
             ManagedCallable, Map, Persistent, PersistentCallable, PersistentChannel, PersistentExchange,
             PersistentQueue, Queue, RemoteForkError, Undefined):
    _cls.__module__ = __name__  # they are documented, and pickled by reference, as zpar.pprocess's
del _cls


def pmap(callable: Callable[..., Any], sequence: Iterable[Any], limit: int | None = None, *,
         client: Client | None = None) -> Map:
    """``callable(item)`` for each item of ``sequence``, at most ``limit`` at once; a Map of the results."""
    return Map(limit=limit, client=client)(callable, sequence)


def start(callable: Callable[..., Any], *args: Any, **kw: Any) -> Channel:
    """Run ``callable(channel, *args, **kw)`` as a task; returns the creating end of its channel.

    A channel-aware call gets a worker of its own on the embedded default (it
    may wait for messages, or never end); a MakeParallel's function runs
    alongside the other calls on the cores.
    """
    streamed = _channels.streams(callable, reuse=False)
    client, slot, where = place(held=streamed)
    try:
        return _channels.launch(client, callable, args, kw, where=where, slot=slot)
    except BaseException:
        if slot is not None:
            slot.release()
        raise


def create() -> Channel:
    """Fork this process; returns a channel to the other side: ``pid`` 0 in the child, the child's pid in the parent.

    The child runs the code after ``create()`` and must end with ``exit(channel)``.
    Raises RemoteForkError while this module uses a cluster given by address.
    """
    check_fork(None)
    return create_socketpair()


def exit(channel: Channel) -> NoReturn:  # noqa: A001 - pprocess's name
    """End the created side: a forked child exits at once (``os._exit``); a call running as a task returns.

    Raises RuntimeError at the creating end (which pprocess would have ended).
    """
    channel._exit()


def waitall() -> None:
    """Wait for every child this process forked (``create()``, persistent calls) to exit, and reap it."""
    _fork.wait_all()

