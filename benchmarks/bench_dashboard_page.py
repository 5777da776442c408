"""How long the dashboard page takes to draw one snapshot, for 1 to 1,000 nodes (issue 13: "fast with 100
nodes"): the page's own ``show`` fed synthetic snapshots in Debian's chromium (Playwright), no cluster needed.

    python benchmarks/bench_dashboard_page.py

Prints the median and worst milliseconds per snapshot (the page gets one a second) after a warm-up.
"""

from __future__ import annotations

import http.server
import shutil
import statistics
import sys
import threading
import time
from importlib import resources

from playwright.sync_api import sync_playwright

NODES = (1, 10, 100, 1000)
SNAPSHOTS = 30
STATIC = resources.files("zpar_broker").joinpath("static")


def snapshot(nodes: int, t: float, seq: int) -> dict:
    """What /api/events sends, for ``nodes`` nodes of 8 workers and the 200 latest tasks."""
    node_list = [{"name": f"node-{i:04d}", "host": f"host-{i}", "pid": 1000 + i, "workers": 8, "busy": 5,
                  "idle": 3, "running": 12, "credits": 4, "last_seen_s": 0.4, "cpu_percent": 63.0,
                  "memory_used": 9 << 30, "memory_total": 32 << 30,
                  "worker_load": [{"pid": 20000 + i * 8 + w, "rss": 80 << 20, "cpu_percent": 98.0}
                                  for w in range(8)]} for i in range(nodes)]
    tasks = [{"time": t - k * 0.005, "producer": "client-1", "task": seq * 200 + k, "function": f"mod.fn{k % 3}",
              "node": f"node-{k % nodes:04d}", "worker": 20000 + (k % (nodes * 8)), "outcome": "ok",
              "duration_s": 0.02, "attempts": 0, "error": ""} for k in range(200)]
    status = {"epoch": "e" * 32, "broker": {"host": "h", "pid": 1}, "uptime_s": 100.0, "security": "curve",
              "nodes": node_list, "workers": nodes * 8, "busy": nodes * 5, "producers": 1, "queued": 10,
              "running": nodes * 12, "done": seq * 1000, "failed": 0, "counters": {},
              "producer_list": [{"name": "client-1", "host": "h", "queued": 10, "running": nodes * 12,
                                 "submitted": 10**6, "ended": seq * 1000, "failed": 0, "last_seen_s": 0.1}]}
    metrics = {"finished": {"ok": seq * 1000}, "handshakes_refused": 0, "protocol_errors": 0, "loop_lag": 0.001}
    return {"status": status, "metrics": metrics, "tasks": tasks, "time": t}


class _Static(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, directory=str(STATIC), **kwargs)

    def translate_path(self, path: str) -> str:
        return super().translate_path("/dashboard.html" if path.split("?")[0] == "/" else path)

    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    chromium = shutil.which("chromium")
    if chromium is None:
        print("no chromium: apt-get install chromium", file=sys.stderr)
        return 1
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Static)  # the page alone: its events fail, offline
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(f"{'nodes':>6} {'median ms':>10} {'worst ms':>9}")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            for n in NODES:
                page = browser.new_page(viewport={"width": 1200, "height": 1000})
                page.goto(url)
                times = []
                t = time.time()
                for seq in range(SNAPSHOTS + 5):
                    data = snapshot(n, t + seq, seq)
                    took = page.evaluate("s => { const t0 = performance.now(); show(s); "
                                         "return performance.now() - t0; }", data)
                    if seq >= 5:  # after a warm-up
                        times.append(took)
                print(f"{n:>6} {statistics.median(times):>10.1f} {max(times):>9.1f}")
                page.close()
            browser.close()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
