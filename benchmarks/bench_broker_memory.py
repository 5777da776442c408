#!/usr/bin/env python
"""What queued tasks and forwarded bytes cost one broker (issue 14, docs/scaling.md): RSS and CPU.

    python benchmarks/bench_broker_memory.py [--cases 0:100000,1024:100000,102400:2000] [--repeats 3]
                                             [--insecure] [--forward-mib 16] [--transfers 10] [--json out.json]

For each case ``ARG_BYTES:TASKS`` and each repetition, a fresh ``python -m
zpar_broker`` on three loopback TCP ports (bench_scale's ``Broker``: the
default CurveZMQ with this user's secret, made in a private
``XDG_CONFIG_HOME``; ``--insecure`` for plaintext), with its per-producer
quotas raised past the case (``ZPAR_MAX_QUEUED_TASKS``,
``ZPAR_MAX_QUEUED_BYTES``) and no agent at all, so every task stays queued.
One ``zpar.Client`` (its window past the case) submits TASKS
calls of ``noop(bytes(ARG_BYTES))`` (``None`` for 0), then the benchmark
waits until the broker's status says they are all queued. Measured:

- the broker's RSS before the first submit (the client connected) and once
  all are queued: ``broker_bytes_per_task`` = the difference / TASKS, and
  where it grew (glibc's heap, the I/O threads' arenas, other anonymous maps);
- the broker's CPU over the submits (user + system, every thread) / TASKS:
  what accepting one task costs, apart from dispatching it and routing its
  result (bench_scale's figure covers all three);
- the rate at which the broker took them (TASKS / time to all queued: a
  producer's submit loop sets it, on the same cores);
- the producer process's RSS growth / TASKS: a pending task's cost there
  (its future, its pending-table entry holding the task whole to resend it
  after a broker restart; the tasks of a case share one argument object, so
  an argument large enough for a frame of its own is counted once);
- the broker's RSS once the client closed and the broker dropped its tasks:
  how much it gives back.

Then (unless ``--transfers 0``; ``--insecure`` does not apply) what
forwarding large arguments costs it:
two ``LocalCluster(agents=1, workers=2, heartbeat=1)`` side by side, one with
the default CurveZMQ and one ``insecure=True``; each repetition, alternating
between them, sends ``--transfers`` tasks one after the other, each with a
``--forward-mib`` MiB NumPy argument (pickle-5 buffers, out of band), whose
result is tiny. Measured: MiB/s of argument (wall time: contention on a
shared machine moves it), and the broker's CPU per MiB forwarded (in from the
producer, out to the agent), split into its loop and ZeroMQ's I/O threads,
where CurveZMQ runs: 1 / that is what a core of broker forwards.

Each repetition of a case runs in a fresh process of this script
(``--run``): its broker, its producer, and so a producer RSS that no
earlier repetition's freed memory hides. Every wait has a deadline; every process started is
killed at exit (bench_scale's process groups). Exit code 0 when every case
ran, 2 when one broke.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import psutil

# benchmarks/ is on sys.path
from _cluster import private_config_home, start_cluster, stop_cluster
from _common import finish_run
from _tasks import noop
from bench_scale import Broker, MiB, memory_split, raise_nofile, wait_until

now = time.monotonic


def one_run(arg_bytes: int, tasks: int, args: argparse.Namespace, workdir: str, tag: str) -> dict[str, Any]:
    import zpar

    out: dict[str, Any] = {"arg_bytes": arg_bytes, "tasks": tasks}
    quota_bytes = max(64 << 20, 2 * tasks * (arg_bytes + 256))
    args.broker_env = [f"ZPAR_MAX_QUEUED_TASKS={2 * tasks}", f"ZPAR_MAX_QUEUED_BYTES={quota_bytes}"]
    broker = Broker(args, os.path.join(workdir, f"broker-{tag}.log"))
    me = psutil.Process()
    client = None
    try:
        client = zpar.Client(broker.frontend, insecure=args.insecure, window=tasks + 16, connect_timeout=30)
        wait_until("the broker listing our producer", lambda: broker.status()["producers"] == 1, 30, 0.05)
        payload = None if arg_bytes == 0 else bytes(arg_bytes)
        rss0, split0, mine0 = broker.rss(), memory_split(broker.ps.pid), me.memory_info().rss
        cpu0, t0 = broker.cpu(), now()
        futures = [client.submit(noop, payload) for _ in range(tasks)]
        t_submitted = now()
        wait_until(f"{tasks:,} tasks queued in the broker", lambda: broker.status()["queued"] >= tasks,
                   args.deadline, 0.05)
        t1, cpu1 = now(), broker.cpu()
        rss1, split1, mine1 = broker.rss(), memory_split(broker.ps.pid), me.memory_info().rss
        out["queued_s"] = round(t1 - t0, 3)
        out["submit_s"] = round(t_submitted - t0, 3)
        out["accept_rate_per_s"] = round(tasks / (t1 - t0))
        out["broker_rss_before_mib"] = round(rss0 / MiB, 1)
        out["broker_rss_queued_mib"] = round(rss1 / MiB, 1)
        out["broker_bytes_per_task"] = round((rss1 - rss0) / tasks)
        out["broker_growth_by_place_mib"] = {k: round(split1.get(k, 0.0) - split0.get(k, 0.0), 1)
                                             for k in sorted(set(split0) | set(split1))}
        out["broker_cpu_us_per_accepted_task"] = round(1e6 * (cpu1 - cpu0) / tasks, 2)
        out["producer_bytes_per_pending_task"] = round((mine1 - mine0) / tasks)
        client.close()
        client = None
        del futures
        wait_until("the broker dropping the closed producer's tasks",
                   lambda: (s := broker.status())["queued"] == 0 and s["producers"] == 0, 60, 0.05)
        time.sleep(1.0)  # sampling, not synchronising: RSS 1 s after, once its loop has been quiet a while
        out["broker_rss_after_close_mib"] = round(broker.rss() / MiB, 1)
    except Exception as exc:  # noqa: BLE001 - reported; the next case runs
        out["broken"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    finally:
        if client is not None:
            client.close()
        broker.stop()
    return out


def forward_rounds(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """MiB/s and the broker's CPU per MiB forwarded, CurveZMQ against plaintext, alternating."""
    import numpy as np

    arr = np.ones((args.forward_mib << 20) // 8)
    mib = arr.nbytes / MiB
    out: dict[str, Any] = {"mib_per_transfer": mib, "transfers": args.transfers}
    clusters: dict[str, Any] = {}
    started: list[Any] = []  # clusters and clients, stopped and closed whatever happens
    try:
        for mode in ("curve", "plain"):
            cluster = start_cluster(os.path.join(workdir, f"forward-{mode}.log"), agents=1, workers=2,
                                    heartbeat=1.0, insecure=mode == "plain")
            started.append(cluster)
            client = cluster.client()
            started.append(client)
            for _ in range(2):  # warm: the workers started, the function shipped, the buffers allocated once
                client.submit(len, arr).result(timeout=120)
            if cluster.broker is None:
                raise RuntimeError(f"the {mode} LocalCluster has no broker process")
            clusters[mode] = (client, psutil.Process(cluster.broker.pid))
        rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in clusters}
        for rep in range(args.repeats):
            for mode in (("curve", "plain") if rep % 2 == 0 else ("plain", "curve")):
                client, ps = clusters[mode]
                threads0 = {th.id: th.user_time + th.system_time for th in ps.threads()}
                t0 = now()
                for _ in range(args.transfers):
                    client.submit(len, arr).result(timeout=120)
                elapsed = now() - t0
                loop = io = 0.0
                for th in ps.threads():
                    spent = th.user_time + th.system_time - threads0.get(th.id, 0.0)
                    if th.id == ps.pid:
                        loop += spent
                    else:
                        io += spent
                total = mib * args.transfers
                rounds[mode].append({"mib_per_s": round(total / elapsed, 1),
                                     "broker_cpu_ms_per_mib": round(1e3 * (loop + io) / total, 3),
                                     "loop_ms_per_mib": round(1e3 * loop / total, 3),
                                     "io_threads_ms_per_mib": round(1e3 * io / total, 3)})
        for mode, rs in rounds.items():
            out[mode] = {"rounds": rs, **{k: {"median": round(statistics.median(r[k] for r in rs), 3),
                                              "min": min(r[k] for r in rs), "max": max(r[k] for r in rs)}
                                          for k in rs[0]}}
    except Exception as exc:  # noqa: BLE001 - reported
        out["broken"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    finally:
        for thing in reversed(started):  # each client before its cluster
            if hasattr(thing, "stop"):
                stop_cluster(thing, {})
            else:
                thing.close()
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range of each figure over the repetitions of one case."""
    good = [r for r in runs if "broken" not in r]
    out: dict[str, Any] = {"arg_bytes": runs[0]["arg_bytes"], "tasks": runs[0]["tasks"], "runs": len(good)}
    for key in ("broker_bytes_per_task", "broker_cpu_us_per_accepted_task", "accept_rate_per_s",
                "producer_bytes_per_pending_task", "broker_rss_before_mib", "broker_rss_queued_mib",
                "broker_rss_after_close_mib"):
        values = [r[key] for r in good]
        if values:
            out[key] = {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}
    return out


def in_child(arg_bytes: int, tasks: int, args: argparse.Namespace, workdir: str, tag: str) -> dict[str, Any]:
    """``one_run`` in a fresh process of this script: its result, or what broke it."""
    cmd = [sys.executable, os.path.abspath(__file__), "--run", f"{arg_bytes}:{tasks}", "--workdir", workdir,
           "--tag", tag, "--deadline", str(args.deadline), *(["--insecure"] if args.insecure else [])]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=args.deadline + 120, check=False)
    except subprocess.TimeoutExpired:
        return {"arg_bytes": arg_bytes, "tasks": tasks, "broken": "the run's process did not end in time",
                "traceback": ""}
    lines = proc.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"arg_bytes": arg_bytes, "tasks": tasks, "broken": f"the run's process exited {proc.returncode}",
                "traceback": proc.stderr[-2000:]}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="0:100000,1024:100000,102400:2000",
                    help="ARG_BYTES:TASKS, comma-separated (0:100000,1024:100000,102400:2000)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh brokers (and producers) per case (3)")
    ap.add_argument("--insecure", action="store_true", help="plaintext, no authentication (default: CurveZMQ)")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds for one case's tasks to be queued")
    ap.add_argument("--forward-mib", type=int, default=16, help="MiB of each forwarded argument (16)")
    ap.add_argument("--transfers", type=int, default=10, help="forwarded arguments per repetition (10; 0: none)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--run", metavar="ARG_BYTES:TASKS", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # What bench_scale's Broker reads from its arguments.
    args.heartbeat, args.liveness, args.broker_env = 1.0, 3, []
    if args.run:  # one repetition, in a fresh process: its result as the last line of stdout
        raise_nofile()
        arg_bytes, tasks = (int(x) for x in args.run.split(":"))
        print(json.dumps(one_run(arg_bytes, tasks, args, args.workdir, args.tag)), flush=True)
        return 0
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",") if c]
    private_config_home()  # inherited by the runs' processes: one secret for them all
    print(f"bench_broker_memory: one broker ({'--insecure' if args.insecure else 'CurveZMQ'}), no agent, one "
          f"producer; cases (argument bytes: tasks) {args.cases}; {args.repeats} repetitions; "
          f"{psutil.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
    workdir = tempfile.mkdtemp(prefix="zpar-bench-memory-")
    results: list[dict[str, Any]] = []
    code = 2
    try:
        for arg_bytes, tasks in cases:
            runs = [in_child(arg_bytes, tasks, args, workdir, f"{arg_bytes}-{tasks}-{i}") for i in range(args.repeats)]
            for r in runs:
                if "broken" in r:
                    print(f"  {arg_bytes} B x {tasks:,}: BROKEN {r['broken']}\n{r['traceback']}", flush=True)
                else:
                    print(f"  {arg_bytes} B x {tasks:,}: broker {r['broker_rss_before_mib']} -> "
                          f"{r['broker_rss_queued_mib']} MiB ({r['broker_bytes_per_task']:,} B/task; grew in "
                          f"{r['broker_growth_by_place_mib']}), after close {r['broker_rss_after_close_mib']} MiB; "
                          f"accept {r['broker_cpu_us_per_accepted_task']} us/task, {r['accept_rate_per_s']:,} "
                          f"tasks/s; producer {r['producer_bytes_per_pending_task']:,} B/pending task", flush=True)
            results.append({"summary": summary(runs), "runs": runs})
        print("\nmedians (min-max) per case:")
        for res in results:
            s = res["summary"]
            cells = [f"{k} {v['median']:,} ({v['min']:,}-{v['max']:,})" for k, v in s.items() if isinstance(v, dict)]
            print(f"  {s['arg_bytes']} B x {s['tasks']:,}, {s['runs']} runs: " + "; ".join(cells))
        broken = any("broken" in r for res in results for r in res["runs"])
        if args.transfers:
            forward = forward_rounds(args, workdir)
            results.append({"forward": forward})
            print(f"\nforwarding {forward['mib_per_transfer']:g} MiB arguments, {args.transfers} a repetition, "
                  f"medians (min-max) of {args.repeats}:")
            if "broken" in forward:
                broken = True
                print(f"  BROKEN {forward['broken']}\n{forward['traceback']}")
            for mode in ("curve", "plain"):
                if mode in forward:
                    cells = [f"{k} {v['median']:,} ({v['min']:,}-{v['max']:,})" for k, v in forward[mode].items()
                             if isinstance(v, dict)]
                    print(f"  {mode}: " + "; ".join(cells))
        code = 2 if broken else 0
    finally:
        code = finish_run(args, workdir, results, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
