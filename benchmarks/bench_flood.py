#!/usr/bin/env python
"""One producer's flood against the broker (issue 10): broker RSS and the longest stall of its loop.

    python benchmarks/bench_flood.py [--quick] [--only malformed,cancel] [--json out.json]

Each scenario runs on a fresh ``LocalCluster(agents=1, workers=2,
heartbeat=0.5)`` with the default authentication (this user's own secret,
made in a private ``XDG_CONFIG_HOME``). The flood comes from one process (this
script again, ``--sender``) holding the secret: its connections pass the
CurveZMQ handshake with the producers' key, and it says HELLO as a producer
first, so every message reaches the broker's code. Scenarios:

- ``malformed``: 100,000 malformed messages (bench_garbage's ordinary kinds)
  as fast as they go, on one connection;
- ``many_frames``: 10 messages of 200,000 empty frames (past MAX_FRAMES);
- ``huge_message``: one message of 2,000,000 empty frames (4 MB on the
  wire): ZeroMQ buffers a message whole, ~130 bytes a part, before the
  broker sees its first part, and nothing bounds the number of parts;
- ``empty_maps``: 8 headers of just under MAX_HEADER_BYTES (2 MiB) made of
  empty maps;
- ``submit_quota``: well-formed SUBMITs of tiny tasks up to the producer's
  queue quota (the broker's default, ``zpar.config.DEFAULT_MAX_QUEUED_TASKS``)
  and 5 % past it; the workers are kept busy so that they stay queued; held
  2 s, then BYE;
- ``bytes_quota``: tasks of 1 MiB arguments, 4 times the queued-bytes quota
  (``DEFAULT_MAX_QUEUED_BYTES``), then BYE (after the warm-up map of tiny
  tasks the agent asks for thousands of credits: what it is given is not
  queued, so not counted, yet the broker keeps it for a re-run);
- ``big_argument``: one SUBMIT of one task whose argument is one frame of
  512 MiB (under the broker's MAXMSGSIZE, 1 GiB; over the byte quota);
- ``blobs``: 3 SUBMITs of 100 function blobs of 1 MiB each (right digests),
  a queued task using each;
- ``cancel``: 5 rounds of 10,000 queued tasks, then one CANCEL of their
  10,000 ids;
- ``sessions``: ``DEFAULT_MAX_PRODUCERS_PER_KEY`` producer connections of one
  key and one more, each saying HELLO, heartbeating for 3 s, then BYE.

Every single-connection sender ends with a STATUS round trip of its own, so
the broker has read all it sent before it leaves.

Measured meanwhile from this process: the broker's RSS every 20 ms (psutil;
before = after a warm-up map by a good client, peak over the flood, after =
1 s after the sender ended), and the longest STATUS round trip of a second,
good connection asking every 10 ms (_cluster.StallWatch): the longest time
the broker's loop answered nobody. After each flood the good client maps
2,000 tasks and every result must be right.

Bars (issue 10): peak - before < 200 MiB and longest stall < 0.3 s in every
scenario; broker alive; the good client's results right. Exit code 0 when all
hold, 1 when one is missed, 2 when the benchmark broke.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import psutil

# benchmarks/ is on sys.path
from _cluster import RssWatch, StallWatch, private_config_home, start_cluster, stop_cluster, summarize_log
from _common import finish_run, print_verdicts
from _tasks import noop

now = time.monotonic
MiB = 1 << 20

SCENARIOS = ("malformed", "many_frames", "huge_message", "empty_maps", "submit_quota", "bytes_quota", "big_argument",
             "blobs", "cancel", "sessions")
DEFAULT_SCENARIOS = SCENARIOS


# ---------------------------------------------------------------------- the sender (its own process)


class Sender:
    """One producer connection of the flooding process: HELLO, heartbeats, and counting what comes back."""

    def __init__(self, ctx: Any, address: str, creds: Any, stats: dict[str, Any], heartbeat: float) -> None:
        import zmq

        from zpar import protocol as P
        from zpar import security

        self.P, self.stats, self.heartbeat = P, stats, heartbeat
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 60_000)
        security.apply_client(self.sock, creds)
        self.sock.connect(address)
        self.last_beat = now()

    def send(self, msg: Any) -> None:
        self.send_frames(self.P.encode(msg))

    def send_frames(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames, copy=False)
        self.stats["messages_sent"] += 1

    def hello(self) -> None:
        self.send(self.P.Hello(self.P.Role.PRODUCER, "flood", "bench", os.getpid(), 0))

    def pump(self, wait: float = 0.0, beat: bool = True) -> None:
        """Read what came back (counted by kind or error code); a heartbeat when one is due."""
        if beat and now() - self.last_beat >= self.heartbeat:
            self.send(self.P.Heartbeat())
            self.last_beat = now()
        while self.sock.poll(int(wait * 1000)):
            wait = 0.0
            frames = self.sock.recv_multipart(copy=False)
            try:
                msg = self.P.decode(frames)
            except Exception:  # noqa: BLE001
                self.stats["replies"]["undecodable"] += 1
                continue
            kind = msg.kind.name
            if isinstance(msg, self.P.Error):
                kind = f"ERROR {msg.code.name}"
                self.stats["refused_ids"][msg.code.name] += len(msg.ids)
            self.stats["replies"][kind] += 1

    def wait_welcome(self, timeout: float = 10.0) -> bool:
        end = now() + timeout
        while now() < end:
            before = self.stats["replies"]["WELCOME"]
            self.pump(0.05)
            if self.stats["replies"]["WELCOME"] > before:
                return True
        return False

    def barrier(self, timeout: float = 120.0) -> bool:
        """Ask STATUS and wait for the answer: the broker has read everything sent before it."""
        before = self.stats["replies"]["STATUS"]
        self.send(self.P.StatusMsg())
        end = now() + timeout
        while now() < end:
            self.pump(0.05)
            if self.stats["replies"]["STATUS"] > before:
                return True
        return False

    def hold(self, seconds: float) -> None:
        end = now() + seconds
        while now() < end:
            self.pump(0.05)

    def close(self, wait: float = 0.2) -> None:
        self.send(self.P.Bye(self.P.ByeReason.LEAVING))
        self.pump(wait, beat=False)
        self.sock.close(linger=1000)


def _sleeping_tasks(P: Any, first_id: int, n: int, seconds: float) -> list[Any]:
    from zpar import serialize

    payload = serialize.dumps(((seconds,), {}))
    return [P.TaskEntry(first_id + i, _SLEEP[0], payload) for i in range(n)]


_SLEEP: list[bytes] = []


def sender_main(spec_path: str) -> int:
    import zmq

    from zpar import protocol as P
    from zpar import security, serialize

    with open(spec_path) as fh:
        spec = json.load(fh)
    scenario, address, hb = spec["scenario"], spec["address"], spec["heartbeat"]
    stats: dict[str, Any] = {"scenario": scenario, "messages_sent": 0, "replies": collections.Counter(),
                             "refused_ids": collections.Counter()}
    creds = security.client_credentials("producer")  # this user's own secret: XDG_CONFIG_HOME is ours
    ctx = zmq.Context()
    ctx.max_sockets = spec.get("sessions", 0) + 64
    digest, blob = serialize.dump_function(time.sleep)
    _SLEEP.append(digest)
    sleep_fn = P.Function(digest, blob)
    rng = random.Random(spec.get("seed", 1))
    t0 = now()
    conns: list[Sender] = []
    try:
        if scenario == "sessions":
            for _ in range(spec["sessions"]):
                c = Sender(ctx, address, creds, stats, hb)
                c.hello()
                conns.append(c)
            end = now() + 30
            while now() < end and sum(stats["replies"][k] for k in ("WELCOME", "ERROR TOO_MANY_PEERS")) < len(conns):
                for c in conns:
                    c.pump()
                time.sleep(0.01)
            stats["connect_s"] = round(now() - t0, 2)
            end = now() + spec["hold"]
            while now() < end:
                for c in conns:
                    c.pump()
                time.sleep(0.05)
            for c in conns:
                c.close(wait=0.0)
            conns = []
        else:
            c = Sender(ctx, address, creds, stats, hb)
            conns.append(c)
            c.hello()
            if not c.wait_welcome():
                raise RuntimeError("no WELCOME from the broker")
            tid = 1
            if scenario in ("submit_quota", "bytes_quota", "big_argument", "blobs", "cancel"):
                # keep the workers busy: the rest queues
                c.send(P.Submit(tuple(_sleeping_tasks(P, tid, 16, 600)), (sleep_fn,)))
                tid += 16
                c.hold(0.5)
            if scenario == "malformed":
                import bench_garbage as G

                for i, cat in enumerate(G.plan(spec["messages"], 0, rng)):
                    c.send_frames(G.make_message(cat, rng, "frontend"))
                    if i % 64 == 0:
                        c.pump()
            elif scenario == "many_frames":
                import bench_garbage as G

                frames = G.make_message("too_many_frames", rng, "frontend")
                for _ in range(spec["messages"]):
                    c.send_frames(frames)
                    c.pump()
            elif scenario == "huge_message":  # ZeroMQ holds a message whole, every part, before we see any
                c.send_frames([P.encode(P.Heartbeat())[0]] + [b""] * spec["frames"])
                c.pump()
            elif scenario == "empty_maps":
                import bench_garbage as G

                header = G.empty_maps_header(G.SUBMIT)
                stats["header_bytes"] = len(header)
                for _ in range(spec["messages"]):
                    c.send_frames([header])
                    c.pump()
            elif scenario == "submit_quota":
                total = spec["tasks"]
                while tid <= total:
                    n = min(P.BATCH_MAX_TASKS, total - tid + 1)
                    c.send(P.Submit(tuple(_sleeping_tasks(P, tid, n, 600))))
                    tid += n
                    c.pump()
                stats["tasks_sent"] = tid - 1
                c.barrier()
                c.hold(spec["hold"])
            elif scenario == "bytes_quota":
                arg = rng.randbytes(MiB)
                per = 16
                for _ in range(spec["tasks"] // per):
                    tasks = tuple(P.TaskEntry(tid + i, digest, [arg]) for i in range(per))
                    c.send(P.Submit(tasks))
                    tid += per
                    c.pump()
                stats["tasks_sent"] = tid - 1
                c.barrier()
                c.hold(spec["hold"])
            elif scenario == "big_argument":  # one frame under MAXMSGSIZE: whole in the broker before it is refused
                arg = bytes(spec["bytes"])
                c.send(P.Submit((P.TaskEntry(tid, digest, [arg]),)))
                tid += 1
                c.pump()
            elif scenario == "blobs":
                for _ in range(spec["rounds"]):
                    funcs, tasks = [], []
                    for _ in range(spec["blobs"]):
                        b = rng.randbytes(spec["blob_bytes"])
                        d = P.digest(b)
                        funcs.append(P.Function(d, b))
                        tasks.append(P.TaskEntry(tid, d, [b"\x80\x05N."]))
                        tid += 1
                    c.send(P.Submit(tuple(tasks), tuple(funcs)))
                    c.hold(0.3)
                c.hold(spec["hold"])
            elif scenario == "cancel":
                for _ in range(spec["rounds"]):
                    first = tid
                    while tid < first + spec["ids"]:
                        n = min(P.BATCH_MAX_TASKS, first + spec["ids"] - tid)
                        c.send(P.Submit(tuple(_sleeping_tasks(P, tid, n, 600))))
                        tid += n
                    c.hold(0.5)
                    c.send(P.Cancel(tuple(range(first, tid))))
                    c.hold(0.5)
            t = now()
            stats["barrier_ok"] = c.barrier()  # everything sent is read (the socket would drop it at close)
            stats["barrier_s"] = round(now() - t, 2)
            c.hold(0.5)
            c.close()
            conns = []
    except Exception as exc:  # noqa: BLE001 - reported
        stats["error"] = f"{type(exc).__name__}: {exc}"
        stats["traceback"] = traceback.format_exc()
    finally:
        for c in conns:
            c.sock.close(linger=0)
        ctx.term()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    stats["elapsed_s"] = round(now() - t0, 2)
    with open(spec["out"], "w") as fh:
        json.dump(stats, fh)
    return 0


# ---------------------------------------------------------------------- the benchmark


def scenario_spec(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """What the sender does in scenario ``name``; the quotas are the broker's defaults (zpar.config)."""
    from zpar import config as cfg

    q = args.quick
    return {
        "malformed": {"messages": 20_000 if q else 100_000},
        "many_frames": {"messages": 3 if q else 10},
        "huge_message": {"frames": 2_000_000},
        "empty_maps": {"messages": 8},
        "submit_quota": {"tasks": int(cfg.DEFAULT_MAX_QUEUED_TASKS * 1.05) + 1000, "hold": 2.0,
                         "quota": cfg.DEFAULT_MAX_QUEUED_TASKS},
        "bytes_quota": {"tasks": int(cfg.DEFAULT_MAX_QUEUED_BYTES / MiB * 4), "hold": 1.0,
                        "quota": cfg.DEFAULT_MAX_QUEUED_BYTES},
        "big_argument": {"bytes": 512 * MiB},
        "blobs": {"rounds": 3, "blobs": 100, "blob_bytes": MiB, "hold": 1.0, "quota": cfg.DEFAULT_MAX_FUNCTION_BYTES},
        "cancel": {"rounds": 2 if q else 5, "ids": 10_000},
        "sessions": {"sessions": cfg.DEFAULT_MAX_PRODUCERS_PER_KEY + 1, "hold": 3.0,
                     "quota": cfg.DEFAULT_MAX_PRODUCERS_PER_KEY},
    }[name]


def run_scenario(name: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    from zpar import security

    spec = scenario_spec(name, args)
    out: dict[str, Any] = {"scenario": name, "spec": {k: v for k, v in spec.items() if k != "broker_args"}}
    log_path = os.path.join(workdir, f"{name}.log")
    cluster = watch = stall = proc = None
    try:
        cluster = start_cluster(log_path, agents=1, workers=2, heartbeat=args.heartbeat,
                                broker_args=spec.get("broker_args", []))
        broker = psutil.Process(cluster.broker.pid)
        client = cluster.client()
        assert list(client.map(noop, range(2000), chunksize=1)) == list(range(2000))  # warm
        watch = RssWatch(lambda: {"broker": [broker.pid]}, interval=0.02)
        stall = StallWatch(cluster.frontend, security.client_credentials("producer"))
        watch.start()
        stall.start()
        stall.started.wait(10)
        time.sleep(0.5)
        before = cluster.status(5.0)["counters"]
        out["rss_before"] = broker.memory_info().rss
        cpu0 = sum(broker.cpu_times()[:2])
        spec_path = os.path.join(workdir, f"{name}.spec.json")
        with open(spec_path, "w") as fh:
            json.dump({**spec, "scenario": name, "address": cluster.frontend, "heartbeat": args.heartbeat,
                       "out": os.path.join(workdir, f"{name}.out.json"), "seed": args.seed}, fh)
        t0 = now()
        with open(os.path.join(workdir, f"{name}.err"), "w") as err:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--sender", spec_path],
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            proc.wait(args.deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            out["sender_killed"] = True
        t1 = now()
        out["flood_s"] = round(t1 - t0, 2)
        out["broker_cpu_s"] = round(sum(broker.cpu_times()[:2]) - cpu0, 2)
        time.sleep(1.0)
        out["broker_alive"] = cluster.broker.poll() is None
        try:
            with open(os.path.join(workdir, f"{name}.out.json")) as fh:
                out["sender"] = json.load(fh)
        except OSError:
            out["sender"] = {"error": f"no report (exit code {proc.returncode})"}
        if out["broker_alive"]:
            out["rss_after"] = broker.memory_info().rss
            after = cluster.status(5.0)["counters"]
            out["counters_delta"] = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
                                     if after.get(k, 0) != before.get(k, 0)}
            t = time.perf_counter()
            try:
                got = list(client.map(noop, range(2000), chunksize=1, timeout=60))
                out["good_map_right"] = got == list(range(2000))
                out["good_map_s"] = round(time.perf_counter() - t, 3)
            except Exception as exc:  # noqa: BLE001
                out["good_map_right"] = False
                out["good_map_error"] = f"{type(exc).__name__}: {exc}"
        watch.stop()
        stall.stop()
        out["rss_peak"] = max((s["broker"] for s in watch.samples if s.get("broker")), default=None)
        worst = stall.worst(t0, t1 + 1.0)
        out["stall_max_s"] = worst
        out["stall_p99_s"] = stall.quantile(0.99, t0, t1 + 1.0)
        out["stall_samples"] = sum(1 for t, _ in stall.rtts if t0 <= t <= t1 + 1.0)
        out["stall_errors"] = stall.errors
        out["max_queued"] = stall.max_queued
    except Exception as exc:  # noqa: BLE001
        out["broken"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        for w in (watch, stall):
            if w is not None:
                w.stop()
        if cluster is not None:
            stop_cluster(cluster, out)
        out["log_summary"] = summarize_log(log_path, 60)
    return out


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def verdicts(r: dict[str, Any]) -> list[tuple[str, bool, str]]:
    name = r["scenario"]
    if "broken" in r:
        return [(f"{name}: benchmark ran", False, r["broken"])]
    grew = (r["rss_peak"] or 0) - r["rss_before"]
    sender_error = r.get("sender", {}).get("error")
    return [
        (f"{name}: broker RSS growth < 200 MiB", grew < 200 * MiB, f"+{grew / MiB:.1f} MiB"),
        (f"{name}: longest stall < 0.3 s", (r["stall_max_s"] or 0) < 0.3,
         f"{(r['stall_max_s'] or 0) * 1000:.0f} ms over {r['stall_samples']} round trips"),
        (f"{name}: broker alive, good client's results right",
         bool(r.get("broker_alive")) and bool(r.get("good_map_right")),
         f"alive {r.get('broker_alive')}, right {r.get('good_map_right')} {r.get('good_map_error', '')}"),
        (f"{name}: the flood was sent", not sender_error and not r.get("sender_killed"),
         sender_error or f"{r['sender'].get('messages_sent', 0):,} messages in {r['sender'].get('elapsed_s')} s"),
    ]


def print_report(results: list[dict[str, Any]]) -> bool:
    print(f"\n{'scenario':<14}{'sent':>10}{'flood s':>9}{'RSS before':>12}{'peak':>8}{'growth':>9}{'after':>8}"
          f"{'stall max':>11}{'p99':>8}{'broker CPU':>11}  (MiB, ms, s)")
    for r in results:
        if "broken" in r:
            print(f"{r['scenario']:<14} BROKEN: {r['broken']}")
            continue
        s = r.get("sender", {})
        grew = (r["rss_peak"] or 0) - r["rss_before"]
        print(f"{r['scenario']:<14}{s.get('messages_sent', 0):>10,}{r['flood_s']:>9}{mib(r['rss_before']):>12}"
              f"{mib(r['rss_peak']):>8}{'+' + mib(grew):>9}{mib(r.get('rss_after')):>8}"
              f"{(r['stall_max_s'] or 0) * 1000:>11.0f}{(r['stall_p99_s'] or 0) * 1000:>8.0f}{r['broker_cpu_s']:>11}")
    print()
    for r in results:
        if "broken" in r:
            print(r.get("traceback", ""))
            continue
        s = r.get("sender", {})
        interesting = {k: v for k, v in r.get("counters_delta", {}).items()
                       if not k.startswith(("messages_", "sent_"))}
        if r["spec"].get("quota"):
            print(f"{r['scenario']}: the broker's default quota {r['spec']['quota']:,}")
        print(f"{r['scenario']}: replies {dict(collections.Counter(s.get('replies', {})).most_common(5))}, "
              f"refused ids {s.get('refused_ids') or {}}; most queued {r.get('max_queued', 0):,}; "
              f"counters {interesting}")
        if s.get("error"):
            print(f"  sender error: {s['error']}\n{s.get('traceback', '')}")
        if r["log_summary"].get("tracebacks"):
            print("\n".join(r["log_summary"]["first_tracebacks"]))
    ok = True
    for r in results:
        ok = print_verdicts(verdicts(r)) and ok
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller floods and quotas")
    ap.add_argument("--only", help="comma list of scenarios: " + ", ".join(SCENARIOS))
    ap.add_argument("--heartbeat", type=float, default=0.5, help="cluster heartbeat (0.5 s)")
    ap.add_argument("--deadline", type=float, default=180.0, help="seconds for one scenario's sender (180)")
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--sender", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sender:
        return sender_main(args.sender)
    names = [s.strip() for s in args.only.split(",")] if args.only else list(DEFAULT_SCENARIOS)
    if any(n not in SCENARIOS for n in names):
        ap.error(f"--only takes a comma list of {', '.join(SCENARIOS)}")
    private_config_home()
    print(f"bench_flood: one authenticated producer's floods against LocalCluster(agents=1, workers=2, "
          f"heartbeat={args.heartbeat:g}), default authentication; scenarios {', '.join(names)}; "
          f"{psutil.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
    workdir = tempfile.mkdtemp(prefix="zpar-bench-flood-")
    results = []
    code = 2
    try:
        for name in names:
            t = now()
            results.append(run_scenario(name, args, workdir))
            print(f"  {name}: done in {now() - t:.0f} s", flush=True)
        ok = print_report(results)
        code = 2 if any("broken" in r for r in results) else (0 if ok else 1)
    finally:
        code = finish_run(args, workdir, results, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
