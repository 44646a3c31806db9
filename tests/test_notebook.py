"""examples/transfer_learning.ipynb, executed as a reader would run it, so that it never rots."""

import re

import pytest
from conftest import DATASETS, ROOT

NOTEBOOK = ROOT / "examples" / "transfer_learning.ipynb"


@pytest.mark.slow
def test_the_notebook_runs_and_learns(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("TRANSFERLAB_DATASETS", str(DATASETS))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # python3: the kernel of the interpreter running the tests (ipykernel from the same venv)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    text = "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    epochs = [int(e) for e in re.findall(r"^epoch (\d+)", text, re.M)]
    assert epochs == [0, 1, 2, 3, 4, 5]  # the closed-form head first; fine-tuning continues the epoch count
    best = float(re.search(r"best validation accuracy ([\d.]+)", text).group(1))
    assert best >= 0.7  # 40 held-out images, chance is 0.5
    images = [out for cell in nb.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) == 2  # the learning curves and the augmented images
    correct, total = map(int, re.search(r"(\d+) of (\d+) validation bees predicted as bees", text).groups())
    assert total == 20 and correct >= 12
