"""The Colab demo runs top to bottom on CPU; any failing cell fails the test.

Its training cell runs ``pipeline.run`` on a shrunk config when ``WORKDIR`` is empty, and loads a
finished workdir otherwise. The test sets ``WORKDIR`` to the session's tiny pipeline (trained by
the same ``pipeline.run``, with its eval stage), so the kernel only loads and samples."""

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "distill_demo.ipynb"


def test_demo_notebook_executes(tmp_path, tiny_pipeline):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  parameter = 'WORKDIR = ""  #@param {type:"string"}'
  (cell,) = [c for c in nb.cells if parameter in c.source]
  cell.source = cell.source.replace(parameter, f"WORKDIR = {str(tiny_pipeline)!r}")
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert f"workdir: {tiny_pipeline} | students with [1, 2, 4] steps" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the teacher/student grid and the report's FID-vs-NFE figure
