"""The Colab demos run top to bottom on CPU; any failing cell fails the test.

Each training cell runs ``pipeline.run`` on a shrunk config when ``WORKDIR`` is empty, and loads a
finished workdir otherwise. The tests set ``WORKDIR`` to the session's runs (trained by the same
``pipeline.run``, with their eval stages), so the kernel only loads and samples."""

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def _execute(name, workdir, tmp_path):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  parameter = 'WORKDIR = ""  #@param {type:"string"}'
  (cell,) = [c for c in nb.cells if parameter in c.source]
  cell.source = cell.source.replace(parameter, f"WORKDIR = {str(workdir)!r}")
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  pictures = [o for o in outputs if "image/png" in o.get("data", {})]
  return text, pictures


def test_demo_notebook_executes(tmp_path, tiny_pipeline):
  text, pictures = _execute("distill_demo.ipynb", tiny_pipeline, tmp_path)
  assert f"workdir: {tiny_pipeline} | students with [1, 2, 4] steps" in text
  assert len(pictures) == 2  # the teacher/student grid and the report's FID-vs-NFE figure


def test_text_to_image_notebook_executes(tmp_path, emoji_run):
  _, workdir = emoji_run
  text, pictures = _execute("text_to_image_demo.ipynb", workdir, tmp_path)
  assert f"workdir: {workdir} | students with [1] steps" in text
  assert "FID / CLIP score" in text  # the report's table
  # The prompt's teacher/student rows, the FID-CLIP figure and the captions at the slider's w.
  assert len(pictures) == 3
