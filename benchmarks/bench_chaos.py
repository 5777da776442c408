#!/usr/bin/env python
"""Chaos benchmark: 20,000 tasks while workers, an agent and the broker are SIGKILLed.

    python benchmarks/bench_chaos.py [--quick] [--tasks N] [--deadline S] [--seed S] [--json out.json]

A ``LocalCluster(agents=2, workers=2)`` runs N tasks (20,000; 2,000 with
``--quick``), each sleeping a random 0-5 ms and returning a value known in
advance, while chaos threads:

- SIGKILL a random worker every ~0.5 s (0.3-0.7 s; ``--kill-every``) for the whole run;
- SIGKILL one agent once a quarter of the outcomes are in, time how long the
  broker's status keeps listing it, and start a replacement agent;
- SIGKILL the broker once half of the outcomes are in, wait 2 s, and restart
  it on the same ports; recovery = restart to the first new result.

The producer records every id and outcome in a ``zpar.testing.ledger.Ledger``; every
execution is logged by the task itself; ``zpar.testing.ledger.check`` judges. Futures
still pending at the deadline (120 s; 60 s with ``--quick``) are stragglers,
and lost. Exit code 0 when the bars hold (lost = 0, duplicates = 0, wrong = 0,
every task submitted), 1 when one is missed, 2 when the benchmark itself broke.
Whatever happens, every process it started is stopped before it exits.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import psutil

# benchmarks/ is on sys.path
from _cluster import RssWatch, cluster_pids, kill_leftovers
from _common import write_json
from _tasks import expected

from zpar.errors import BrokerUnavailable
from zpar.testing import LocalCluster
from zpar.testing.ledger import Execution, Ledger, Report, check, execution, read_executions

now = time.monotonic


def chaos_task(i: int, exec_dir: str) -> int:
    """Defined in ``__main__``, so it travels by value."""
    with execution(exec_dir, i):
        time.sleep(random.random() * 0.005)
        return expected(i)


class Chaos:
    """The faults; each wait is bounded and ends early when ``stop`` is set."""

    def __init__(self, cluster: LocalCluster, ledger: Ledger, n: int, seed: int, kill_every: float) -> None:
        self.cluster, self.ledger, self.n, self.kill_every = cluster, ledger, n, kill_every
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.t0, self.t0_wall = now(), time.time()  # the execution logs use time.time()
        self.events: list[tuple[float, str]] = []
        self.worker_kills = 0
        self.killed: dict[int, float] = {}  # pid -> wall time of its SIGKILL (workers, and the agent's workers)
        self.agent_workers: set[int] = set()
        self.broker_kill_wall: float | None = None
        self.broker_restart_wall = float("inf")
        self.figures: dict[str, Any] = {}
        self.threads = [threading.Thread(target=self._guard, args=(f,), name=f"chaos-{f.__name__}", daemon=True)
                        for f in (self.kill_workers, self.scenario)]

    def log(self, text: str) -> None:
        self.events.append((now() - self.t0, text))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> list[str]:
        self.stop.set()
        end = now() + timeout
        for t in self.threads:
            t.join(max(0.0, end - now()))
        return [t.name for t in self.threads if t.is_alive()]

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a broken chaos thread is reported, never silent
            self.log(f"{fn.__name__} failed: {exc!r}")
            self.figures.setdefault("chaos_errors", []).append(traceback.format_exc())

    def kill_workers(self) -> None:
        if self.kill_every <= 0:
            return
        while not self.stop.wait(self.rng.uniform(0.6, 1.4) * self.kill_every):
            pids = self.cluster.worker_pids()
            if pids:
                pid = self.rng.choice(pids)
                try:
                    t = time.time()  # before: this thread may wait for the GIL after the kill
                    os.kill(pid, signal.SIGKILL)
                    self.killed[pid] = t
                    self.worker_kills += 1
                except ProcessLookupError:
                    pass

    def _progress(self, fraction: float, stall: float = 5.0) -> str | None:
        """Wait until ``fraction`` of the outcomes are in, or none came for ``stall`` s."""
        last, since = -1, now()
        while not self.stop.wait(0.01):
            done = self.ledger.counts()[1]
            if done >= fraction * self.n:
                return f"{done} outcomes in"
            if done != last:
                last, since = done, now()
            elif now() - since > stall:
                return f"no outcome for {stall:g} s ({done} in)"
        return None

    def _poll_status(self, ok, timeout: float) -> float | None:
        """Seconds until ``ok(status)`` holds, or None by ``timeout`` (or stop)."""
        start = now()
        while now() - start < timeout and not self.stop.is_set():
            try:
                if ok(self.cluster.status(0.5)):
                    return now() - start
            except BrokerUnavailable:
                pass
            self.stop.wait(0.01)
        return None

    def scenario(self) -> None:
        c = self.cluster
        why = self._progress(0.25)
        if why is None:
            return
        victim = self.rng.choice([a for a in c.agents if a.poll() is None])
        self.agent_workers = set(c.worker_pids(victim))
        self.killed.update(dict.fromkeys(self.agent_workers, time.time()))
        killed = now()
        c.kill_agent(victim)
        self.log(f"SIGKILL agent pid {victim.pid} ({why})")
        victim.wait()
        gone = self._poll_status(lambda s: all(n["pid"] != victim.pid for n in s["nodes"]), 10.0)
        detection = None if gone is None else now() - killed
        self.figures["agent_detection_s"] = detection
        self.log(f"the broker stopped listing the agent {detection:.3f} s after the kill" if detection is not None
                 else "the broker still listed the dead agent 10 s after the kill")
        new = c.add_agent(wait=False)
        self.log(f"replacement agent pid {new.pid} started")
        why = self._progress(0.5)
        if why is None:
            return
        broker = c.broker
        assert broker is not None
        try:
            self.figures["counters_before_kill"] = c.status(1.0)["counters"]
        except BrokerUnavailable:
            pass
        self.broker_kill_wall = time.time()
        broker.kill()
        broker.wait()
        self.figures["broker_killed_at"] = now()
        self.log(f"SIGKILL broker pid {broker.pid} ({why})")
        if self.stop.wait(2.0):
            return
        c.start_broker()
        restarted, self.broker_restart_wall = now(), time.time()
        self.figures["broker_restarted_at"] = restarted
        self.log(f"broker restarted, pid {c.broker.pid if c.broker else '?'}")
        up = self._poll_status(lambda s: True, 10.0)
        self.figures["broker_answering_s"] = up
        workers = sum(c.workers for a in c.agents if a.poll() is None)
        back = self._poll_status(lambda s: s["workers"] >= workers, 10.0)
        self.figures["workers_reregistered_s"] = back
        self.log(f"restarted broker answering after {_fmt(up)}; {workers} workers registered again after {_fmt(back)}")


def attribute(runs: dict[Any, list[Execution]], chaos: Chaos) -> tuple[dict[str, int], list[Any]]:
    """Why each run that was followed by another run of the same id did not count.

    A fault between a run's start and the next run's start explains it: its
    worker SIGKILLed (during it, or later in the same batch, whose results
    travel together), its agent SIGKILLed; or the broker killed before the
    next run while this one started before the restart. Anything else is
    unexplained: at-least-once may only re-run because of a fault.
    """
    why: dict[str, int] = {}
    unexplained = []
    for tid, rs in runs.items():
        for r, nxt in itertools.pairwise(rs):
            t = chaos.killed.get(r.pid)
            killed = t is not None and r.start - 0.05 <= t <= nxt.start  # t: just before the kill
            # a run that started before the broker's restart and was followed by one after its death
            # (the agent may run a task it got before the kill, while the broker is away)
            broker = (chaos.broker_kill_wall is not None and chaos.broker_kill_wall <= nxt.start
                      and r.start <= chaos.broker_restart_wall)
            if killed and r.pid in chaos.agent_workers:
                key = "agent SIGKILL"
            elif killed and r.end is None:
                key = "worker SIGKILL mid-task"
            elif killed:
                key = "worker SIGKILL later in the same batch"
            elif broker:
                key = "broker SIGKILL"
            else:
                key = "unexplained"
                unexplained.append(tid)
            why[key] = why.get(key, 0) + 1
    return why, unexplained


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.tasks
    exec_dir = tempfile.mkdtemp(prefix="zpar-chaos-")
    out: dict[str, Any] = {"tasks": n, "deadline_s": args.deadline, "seed": args.seed, "heartbeat": args.heartbeat}
    cluster = sampler = chaos = client = None
    submitter: threading.Thread | None = None
    try:
        cluster = LocalCluster(agents=2, workers=2, heartbeat=args.heartbeat)
        sampler = RssWatch(lambda: cluster_pids(cluster), 0.1)  # for the peaks, and the processes seen
        sampler.start()
        client = cluster.client()
        ledger = Ledger()
        first_error: dict[str, str] = {}
        submit_state: dict[str, Any] = {"submitted": 0, "error": None, "done": False}

        def note_error(fut) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                first_error.setdefault(type(fut.exception()).__name__, str(fut.exception())[:300])

        def submit_all() -> None:
            try:
                for i in range(n):
                    fut = client.submit(chaos_task, i, exec_dir)
                    ledger.track(i, fut)
                    fut.add_done_callback(note_error)
                    submit_state["submitted"] = i + 1
            except Exception as exc:  # noqa: BLE001 - closed at the deadline, or worse: reported
                submit_state["error"] = repr(exc)
            finally:
                submit_state["done"] = True

        chaos = Chaos(cluster, ledger, n, args.seed, args.kill_every)
        start = now()
        deadline = start + args.deadline
        submitter = threading.Thread(target=submit_all, name="submitter", daemon=True)
        submitter.start()
        chaos.start()
        while now() < deadline:  # polling the ledger, with a deadline
            submitted, done = ledger.counts()
            if submit_state["done"] and done >= submitted:
                break
            time.sleep(0.05)
        elapsed = now() - start
        ledger.seal()
        stuck = chaos.join(15.0)
        report = check(ledger, {i: expected(i) for i in range(n)}, exec_dir)
        out["reruns"], out["unexplained"] = attribute(read_executions(exec_dir)[0], chaos)
        try:
            counters = cluster.status(2.0)["counters"]
        except BrokerUnavailable as exc:
            counters = {"unavailable": str(exc)}
        _, outcomes = ledger.snapshot()
        restarted = chaos.figures.get("broker_restarted_at")
        after = [o.at for os_ in outcomes.values() for o in os_ if restarted and o.at > restarted and o.error is None]
        out.update(
            report=report, elapsed_s=elapsed, hit_deadline=elapsed >= args.deadline,
            unsubmitted=n - submit_state["submitted"], submit_error=submit_state["error"],
            first_error=first_error, worker_kills=chaos.worker_kills, events=chaos.events, t0_wall=chaos.t0_wall,
            killed_pids=chaos.killed, agent_workers=sorted(chaos.agent_workers),
            broker_kill_wall=chaos.broker_kill_wall, broker_restart_wall=chaos.broker_restart_wall,
            agent_detection_s=chaos.figures.get("agent_detection_s"),
            broker_answering_s=chaos.figures.get("broker_answering_s"),
            workers_reregistered_s=chaos.figures.get("workers_reregistered_s"),
            broker_restarted=restarted is not None,
            recovery_s=(min(after) - restarted) if after and restarted is not None else None,
            results_after_restart=len(after), chaos_errors=chaos.figures.get("chaos_errors", []),
            broker_counters=counters, counters_before_kill=chaos.figures.get("counters_before_kill", {}),
            chaos_threads_stuck=stuck)
    finally:
        if chaos is not None:
            chaos.join(15.0)
        if client is not None:
            client.close()
        if submitter is not None:
            submitter.join(10.0)
            out["submitter_stuck"] = submitter.is_alive()
        if cluster is not None:
            cluster.stop()
        if sampler is not None:
            sampler.stop()
            out["rss"] = list(sampler.peaks.values())
            # every process of the cluster seen in the run, and any child of ours, still alive after stop()
            left = kill_leftovers([*sampler.procs.values(), *psutil.Process().children(recursive=True)], grace=5.0)
            out["leaked"] = [f"pid {pid}: {cmdline}" for pid, cmdline in left.items()]
        if args.keep_logs:
            out["exec_dir"] = exec_dir
        else:
            shutil.rmtree(exec_dir, ignore_errors=True)
    return out


def _fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:.3f} s"


def print_report(out: dict[str, Any]) -> bool:
    r: Report = out["report"]
    hist = ", ".join(f"{k}x: {v}" for k, v in r.executions.items())
    failed = ", ".join(f"{k} {v}" for k, v in sorted(r.failed.items())) or "none"
    p = print
    p(f"zpar chaos benchmark: {out['tasks']} tasks, LocalCluster(agents=2, workers=2, heartbeat={out['heartbeat']:g}),"
      f" seed {out['seed']}")
    p(f"  run time              {out['elapsed_s']:.2f} s{'  (hit the deadline)' if out['hit_deadline'] else ''}"
      f" (deadline {out['deadline_s']:g} s)")
    p(f"  faults                {out['worker_kills']} workers SIGKILLed, 1 agent SIGKILLed, broker "
      f"{'SIGKILLed and restarted' if out['broker_restarted'] else 'NOT restarted'}")
    p(f"  submitted             {r.submitted}" + (f"  (NOT submitted: {out['unsubmitted']}; "
                                                    f"{out['submit_error'] or 'submit still blocked'})"
                                                    if out["unsubmitted"] else ""))
    p(f"  completed             {r.completed}")
    p(f"  failed                {failed}")
    for kind, msg in sorted(out["first_error"].items()):
        p(f"      e.g. {kind}: {msg}")
    p(f"  lost                  {r.lost}  (of which stragglers, pending at the deadline: {r.stragglers})")
    p(f"  duplicates            {r.dup_delivered}")
    p(f"  wrong                 {r.wrong}")
    p(f"  executions            {hist}  (runs killed mid-task: {r.interrupted}; "
      f"unknown ids: {r.unknown_executions}; torn lines: {r.bad_lines})")
    if out["reruns"]:
        p("      runs followed by another run, by cause: " + ", ".join(f"{k} {v}" for k, v in out["reruns"].items())
          + f"; e.g. ids {r.examples.get('executed_again')}")
    if out["unexplained"]:
        p(f"      unexplained re-runs of ids {sorted(out['unexplained'])[:10]}")
    p(f"  late outcomes         {r.late}  (after the deadline, not counted)")
    p(f"  agent detection       {_fmt(out['agent_detection_s'])}  (SIGKILL to the broker's status no longer "
      "listing it)")
    p(f"  broker recovery       {_fmt(out['recovery_s'])}  (restart to the first new result; "
      f"{out['results_after_restart']} results after the restart)")
    p(f"      restarted broker answering after {_fmt(out['broker_answering_s'])}, workers registered again after "
      f"{_fmt(out['workers_reregistered_s'])}")
    p("  peak RSS (MiB)")
    rss = out.get("rss", [])
    for e in rss:
        if e["role"] != "workers":
            p(f"      {e['role']:<9} pid {e['pid']:<8} {e['peak_mib']:7.1f}")
    workers = sorted(e["peak_mib"] for e in rss if e["role"] == "workers")
    if workers:
        p(f"      workers   {len(workers)} processes: max {workers[-1]:.1f}, median {statistics.median(workers):.1f},"
          f" min {workers[0]:.1f}")
    for label, key in (("first broker", "counters_before_kill"), ("restarted broker", "broker_counters")):
        p(f"  {label + ' counters':<26}" + " ".join(f"{k}={v}" for k, v in sorted(out[key].items())))
    p(f"  leaked processes      {len(out.get('leaked', []))}" + "".join(f"\n      {x}" for x in out.get("leaked", [])))
    for what in ("chaos_threads_stuck", "chaos_errors"):
        if out.get(what):
            p(f"  {what}: {out[what]}")
    if out.get("submitter_stuck"):
        p("  the submitter thread was still blocked in submit() after close()")
    if out.get("exec_dir"):
        p(f"  execution logs kept in {out['exec_dir']} (event times are seconds after {out['t0_wall']:.3f})")
    p("  events")
    for t, text in out["events"]:
        p(f"      {t:7.2f} s  {text}")
    bars = [("lost = 0", r.lost == 0, r.lost), ("duplicates = 0", r.dup_delivered == 0, r.dup_delivered),
            ("wrong = 0", r.wrong == 0, r.wrong), ("all submitted", out["unsubmitted"] == 0, out["unsubmitted"])]
    p("  bars                  " + ", ".join(f"{name}: {'pass' if ok else 'FAIL'} ({v})" for name, ok, v in bars))
    passed = all(ok for _, ok, _ in bars)
    p(f"  verdict               {'PASS' if passed else 'FAIL'}")
    return passed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 tasks and a 60 s deadline")
    ap.add_argument("--tasks", type=int, help="number of tasks (default 20,000; 2,000 with --quick)")
    ap.add_argument("--deadline", type=float, help="seconds before pending futures count as stragglers")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--heartbeat", type=float, default=0.1, help="heartbeat interval of the cluster (liveness 3)")
    ap.add_argument("--kill-every", type=float, default=0.5,
                    help="mean seconds between worker SIGKILLs (0.6x to 1.4x of it; 0: none)")
    ap.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    ap.add_argument("--keep-logs", action="store_true", help="keep the per-worker execution logs")
    args = ap.parse_args(argv)
    args.tasks = args.tasks or (2_000 if args.quick else 20_000)
    args.deadline = args.deadline or (60.0 if args.quick else 120.0)
    try:
        out = run(args)
    except Exception:  # noqa: BLE001 - reported with its traceback, exit code 2
        traceback.print_exc()
        print("verdict: ERROR (the benchmark itself failed; every process it started was stopped)")
        return 2
    passed = print_report(out)
    if args.json:
        write_json(args.json, {**out, "report": vars(out["report"])})
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
