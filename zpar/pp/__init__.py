"""Parallel Python's API on zpar: change ``import pp`` to ``import zpar.pp as pp``.

::

    import zpar.pp as pp

    job_server = pp.Server()                     # one worker per core, here
    job = job_server.submit(sum_primes, (100,), (isprime,), ("math",))
    print(job())                                 # blocks until the result is in

A thin layer over ``zpar.Client``: the local CPUs are an embedded cluster
(``Client(workers=ncpus)``), and each entry of ``ppservers`` names a zpar
broker ("host:port" or "tcp://host:port", its frontend) with however many
agents behind it. Jobs wait in the Server until a node has room (its workers,
twice over), so the nodes share the work as they finish it, as pp's did, and
``set_ncpus`` applies to every job not yet handed out.

Where it differs from pp 1.7:

- Functions travel with cloudpickle, not as source: closures, lambdas,
  bound methods and functions typed at the prompt work. ``depfuncs`` and
  ``modules`` are not needed, but they are honoured: the worker binds them
  as globals of the function where missing (``modules=("math",)`` makes
  ``math`` usable even if the script never imports it).
- ``ppservers=("*",)`` (pp's UDP autodiscovery) raises ConfigError: name the
  broker instead; agents join the broker, so one address reaches them all.
- ``proto``, ``socket_timeout`` and ``broadcast`` are accepted and have no
  effect; ``secret`` is passed to the remote clients; ``restart=True``
  replaces each local worker after every job (remote agents decide for
  their own: ``zpar-agent --max-tasks-per-worker 1``).
- ``Server(..., strict=True)`` makes ``job()`` raise the job's exception
  instead of printing it and returning None.
"""

from ._job import DestroyedServerError, Job, Statistics
from ._server import Server, version
from ._template import Template

__all__ = ["DestroyedServerError", "Job", "Server", "Statistics", "Template", "version"]
