"""Both notebooks run top to bottom (small settings), and are committed without outputs."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("name", ["quickstart", "why_blending"])
def test_notebook_is_stripped_and_runs(name, monkeypatch):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks with outputs stripped"
    monkeypatch.setenv("KVBLEND_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(o.output_type == "stream" and ("hits" in o.text or "KL" in o.text) for c in code for o in c.outputs)
