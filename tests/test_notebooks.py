"""The notebooks run, offline, at small settings (deselect with -m "not notebooks")."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_have_no_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_explore_data.ipynb",
        "02_frozen_vs_end_to_end.ipynb",
        "03_predict.ipynb",
        "04_study.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"
            assert "vlfuse._" not in cell.source  # public API only


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("VLFUSE_NB_DATA", "data.dataset=shapes data.shapes_train_size=300")
    monkeypatch.setenv("VLFUSE_NB_STEPS", "12")
    monkeypatch.setenv("VLFUSE_NB_OUT", str(tmp_path / "compare"))
    monkeypatch.setenv("VLFUSE_NB_MODEL", str(tmp_path / "model" / "final"))
    monkeypatch.setenv("VLFUSE_NB_STUDY_OUT", str(tmp_path / "study"))
    # the study's grid at its smallest: 2 modes x 2 sizes x 3 seeds x 1 rate, then a fourth seed
    small = ["data.shapes_train_size=300", "data.shapes_eval_size=60", "study.validation=60"]
    small += ["study.train_sizes=[60,240]", "study.lr_grid.none=[0.003]", "study.lr_grid.all=[0.001]"]
    monkeypatch.setenv("VLFUSE_NB_STUDY", " ".join(small))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    ]
    assert images, f"{path.name} drew nothing"
