"""``python -m zpar_broker.embedded``: the embedded cluster's process, started by ``zpar.Client()``.

It starts its workers first, before it imports the broker and the agent
(``zpar.agent.spawn.prestart``): a worker's start and the hub's then overlap,
and the first result comes about a worker's start-up sooner. Then it runs a
broker and an agent in one loop (``hub.EmbeddedNode``).
"""

from __future__ import annotations

import argparse
import logging

from zpar.agent.spawn import prestart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zpar_broker.embedded",
                                     description="zpar's embedded cluster (started by zpar.Client()).")
    parser.add_argument("--frontend", required=True)
    parser.add_argument("--workers", type=int, default=0, help="(zpar.Client gives it: the workers start first)")
    parser.add_argument("--max-tasks-per-worker", type=int, default=0)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    workers = args.workers
    if workers <= 0:  # run by hand: what the agent would start (zpar.config costs what prestart saves)
        from zpar.config import usable_cores

        workers = usable_cores()
    started = prestart(workers)
    try:
        # Imported only now: these take as long as a worker's start, which runs meanwhile.
        from zpar._loop import run_until_signalled
        from zpar.config import AgentConfig, BrokerConfig

        from .hub import EmbeddedNode

        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        broker = BrokerConfig(frontend=args.frontend, backend="", collector="", heartbeat=args.heartbeat,
                              parent_pid=args.parent_pid, log_level=args.log_level)
        agent = AgentConfig(broker="(in-process)", workers=workers, heartbeat=args.heartbeat,
                            max_tasks_per_worker=args.max_tasks_per_worker,
                            parent_pid=args.parent_pid, log_level=args.log_level)
        node = EmbeddedNode(broker, agent, started)
    except BaseException:
        started.stop()
        raise
    return run_until_signalled(node)


if __name__ == "__main__":
    raise SystemExit(main())
