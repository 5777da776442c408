"""``zpar.progress`` and ``map(..., progress=True)`` in Jupyter: a real kernel (ipykernel) runs a cell through
nbclient, and each bar comes out as a live widget (rich's Live on an ipywidgets Output), then its last state."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")

pytestmark = pytest.mark.timeout(180)

CELL = """
import zpar

def square(x):
    return x * x

with zpar.Client(workers=2) as client:
    futures = [client.submit(square, i) for i in range(20)]
    zpar.progress(futures, description="squares")
    got = list(client.map(square, range(30), progress="mapped"))
print(sum(got))
"""


def test_the_bars_are_live_widgets_in_a_notebook(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(CELL)]
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = notebook.cells[0].outputs
    views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 2  # one Output widget per bar: the page redraws it in place
    state = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    drawn = [o["data"]["text/plain"] for view in views
             for o in state[view["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]]["state"]["outputs"]]
    assert any("squares" in text and "/20" in text for text in drawn)
    assert any("mapped" in text and "/30" in text for text in drawn)
    assert [o["text"] for o in outputs if o.get("output_type") == "stream"] == ["8555\n"]
