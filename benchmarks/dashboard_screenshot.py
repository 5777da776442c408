"""Screenshot the broker's dashboard under load, for docs/dashboard.png (the README shows it).

A LocalCluster (2 agents x 1 worker, CurveZMQ), a producer mapping short tasks of two functions with one
failure among them, and Debian's chromium (apt-get install chromium) driven by Playwright::

    python benchmarks/dashboard_screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import cloudpickle
from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
import tasks

from zpar.testing import LocalCluster

cloudpickle.register_pickle_by_value(tasks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), os.pardir, "docs", "dashboard.png"))
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("no chromium: apt-get install chromium", file=sys.stderr)
        return 1
    cluster = LocalCluster(agents=2, workers=1)
    try:
        with cluster.client() as client, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(cluster.status()["dashboard"])
            end = time.monotonic() + 20
            while time.monotonic() < end:  # under load for the 20 s shown
                futures = [client.submit(tasks.sleep_square, i, 0.01 * (i % 5)) for i in range(40)]
                futures += [client.submit(tasks.square, i) for i in range(200)]
                if time.monotonic() > end - 10 and not page.query_selector("#failures li.failure"):
                    futures.append(client.submit(tasks.raise_value_error, "one task in this run fails"))
                for fut in futures:
                    fut.exception(60)  # waited for: the failure stays in its future
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        cluster.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
