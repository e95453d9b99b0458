"""The Colab demo runs top to bottom on CPU (its default, shrunk settings); any failing cell
fails the test."""

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "distill_demo.ipynb"


def test_demo_notebook_executes(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "students with [1, 2, 4] steps" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the teacher/student grid and the report's FID-vs-NFE figure
