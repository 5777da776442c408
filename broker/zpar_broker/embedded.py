"""``python -m zpar_broker.embedded``: the embedded cluster's process, started by ``zpar.Client()``.

It starts its workers first, before it imports the broker and the agent: it
imports what a worker needs, forks the workers while it still has no thread
and no ZeroMQ context (``zpar.agent.spawn.prestart``), and only then imports
the rest. The workers cost no interpreter start and no imports of their own,
so on a small machine they do not compete with the hub for the cores. Then it
runs a broker and an agent in one loop (``hub.EmbeddedNode``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os

from zpar.agent.spawn import prestart


def main(argv: list[str] | None = None) -> int:
    # Starting makes some 100,000 objects, all kept (modules, classes, functions): collecting garbage
    # among them is ~5 % of the start, for none. Off until the loop runs (a forked worker turns it on).
    gc.disable()
    parser = argparse.ArgumentParser(prog="python -m zpar_broker.embedded",
                                     description="zpar's embedded cluster (started by zpar.Client()).")
    parser.add_argument("--frontend", required=True)
    parser.add_argument("--workers", type=int, required=True, help="(zpar.Client says how many: they start first)")
    parser.add_argument("--max-tasks-per-worker", type=int, default=0)
    parser.add_argument("--resources", default="", help="what its node offers: gpu=1,memory=1024")
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--dashboard", default="127.0.0.1:0", help="HOST:PORT of its dashboard (any free port), or off")
    args = parser.parse_args(argv)
    workers = args.workers
    started = prestart(workers, fork=True)  # no thread and no ZeroMQ context here yet
    try:
        # Imported only now, after the fork: the workers need none of it.
        from zpar._loop import run_until_signalled
        from zpar.config import AgentConfig, BrokerConfig

        from .hub import EmbeddedNode

        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        broker = BrokerConfig(frontend=args.frontend, backend="", collector="", heartbeat=args.heartbeat,
                              parent_pid=args.parent_pid, log_level=args.log_level, dashboard=args.dashboard)
        agent = AgentConfig(broker="(in-process)", workers=workers, heartbeat=args.heartbeat,
                            max_tasks_per_worker=args.max_tasks_per_worker, resources=args.resources,
                            parent_pid=args.parent_pid, log_level=args.log_level)
        node = EmbeddedNode(broker, agent, started)
    except BaseException:
        started.stop()
        raise
    gc.enable()
    try:
        return run_until_signalled(node)
    finally:
        from zpar import _shm  # our producer's shared memory (zpar._shm): it may have died without cleaning up

        _shm.remove_dir(os.environ.get(_shm.ENV))


if __name__ == "__main__":
    raise SystemExit(main())
