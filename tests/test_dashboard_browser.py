"""The dashboard page in a real browser: Debian's chromium, driven by Playwright, against a real broker.

Skipped where there is no chromium (``.ci/run`` installs it: apt-get install chromium).
"""

from __future__ import annotations

import shutil

import pytest
import tasks

from zpar.testing import wait_for

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api")
if CHROMIUM is None:
    pytest.skip("no chromium here (apt-get install chromium)", allow_module_level=True)

@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A page that records every console error and uncaught exception in ``page.errors``."""
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    page.close()


def node_names(page) -> list[str]:
    return page.eval_on_selector_all("#nodes-table tbody tr", "rows => rows.map(r => r.dataset.node)")


def test_the_page_shows_nodes_joining_and_leaving_and_a_failure_with_its_traceback(new_cluster, page, tmp_path):
    cluster = new_cluster(agents=2, workers=1)
    page.goto(cluster.status()["dashboard"])
    wait_for(lambda: len(node_names(page)) == 2, 20, 0.05, "both nodes on the page")
    with cluster.client() as client:
        assert list(client.map(tasks.square, range(20))) == [i * i for i in range(20)]
        with pytest.raises(ValueError, match="shown on the page"):
            client.submit(tasks.raise_value_error, "shown on the page").result(30)
        failure = page.wait_for_selector("#failures li.failure", timeout=20_000)
        assert "tasks.raise_value_error" in failure.inner_text()
        assert "ValueError: shown on the page" in failure.inner_text()
        wait_for(lambda: int(page.inner_text("#done")) >= 20, 20, 0.05, "20 tasks done on the page")
        assert page.inner_text("#failed") == "1"
        page.wait_for_selector("#live:not(.stale)")
        before = set(node_names(page))
        third = cluster.add_agent(name="node-three")
        wait_for(lambda: "node-three" in node_names(page), 20, 0.05, "the new node on the page")
        cluster.kill_agent(third)
        wait_for(lambda: "node-three" not in node_names(page), 20, 0.05, "the dead node gone from the page")
        assert set(node_names(page)) == before
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)  # renders: no error
    assert page.errors == []


def test_without_the_token_the_page_shows_nothing_of_the_cluster(new_cluster, page):
    cluster = new_cluster(agents=1, workers=1)
    link = cluster.status()["dashboard"]
    page.goto(link.split("?")[0])  # the page itself, without its token
    page.wait_for_selector("#live.stale")
    assert node_names(page) == [] and page.inner_text("#nodes-count") == "-"
    response = page.request.get(link.split("?")[0] + "api/status")
    assert response.status == 401 and b"nodes" not in response.body()


def test_the_drain_button_drains_a_node(new_cluster, page):
    cluster = new_cluster(agents=2, workers=1)
    page.goto(cluster.status()["dashboard"])
    wait_for(lambda: len(node_names(page)) == 2, 20, 0.05, "both nodes on the page")
    node = node_names(page)[0]
    page.click(f'#nodes-table tr[data-node="{node}"] button.drain')
    page.wait_for_selector("#action:has-text('done')")
    wait_for(lambda: node not in node_names(page), 30, 0.05, "the drained node gone from the page")
    assert node not in [n["name"] for n in cluster.status()["nodes"]]
    assert page.errors == []


def test_the_page_shows_each_producers_progress_in_all_and_per_function(new_cluster, page):
    cluster = new_cluster(agents=1, workers=1)
    page.goto(cluster.status()["dashboard"])
    with cluster.client() as client:
        assert list(client.map(tasks.square, range(30))) == [i * i for i in range(30)]
        assert list(client.map(tasks.add, range(10), range(10))) == [2 * i for i in range(10)]
        row = page.wait_for_selector("#producers-table tbody tr", timeout=20_000)

        def bars() -> dict[str, float]:  # polled from here: the page's CSP forbids the eval wait_for_function uses
            return dict(page.eval_on_selector_all(
                "#producers-table div.progress", "lines => lines.map(l => [l.dataset.function, "
                "l.querySelector('progress').value])"))

        wait_for(lambda: bars() == {"all": 1, "tasks.square": 1, "tasks.add": 1}, 20, 0.05, "every bar at 100 %")
        assert "tasks.square: 30/30" in row.inner_text() and "tasks.add: 10/10" in row.inner_text()
        assert row.get_attribute("data-producer").startswith("client-")
    assert page.errors == []


def test_the_page_warns_of_tasks_no_node_can_take(new_cluster, page):
    cluster = new_cluster(agents=1, workers=1)
    with cluster.client() as client:
        fut = client.options(resources={"gpu": 2}).submit(abs, -1)
        page.goto(cluster.status()["dashboard"])
        warning = page.wait_for_selector("#unplaceable li", timeout=20_000)
        assert "1 task(s) ask for gpu=2, which no connected node offers" in warning.inner_text()
        fut.cancel()
        page.wait_for_selector("#unplaceable", state="hidden", timeout=20_000)
    assert page.errors == []
