"""The notebooks in notebooks/ run top to bottom on CPU with small settings, and are committed
without outputs.

Each notebook has one cell tagged `parameters`; like papermill, the runner inserts a cell after
it that overrides those names (`SMALL = True`: tiny random models where the notebook offers
them, short runs), then executes every cell with nbclient in a fresh kernel whose working
directory is notebooks/ (so the first cell finds this checkout, as it does for a reader who
runs `jupyter` there). Any error in any cell fails the test, naming the cell.

The settings below keep the four notebooks within a few minutes on two CPU cores; the
notebooks' own defaults load the real registry models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ORDER = ["01_quickstart.ipynb", "02_write_your_own_algorithm.ipynb", "03_train_a_drafter.ipynb",
         "04_reproduce_a_paper.ipynb"]

# Overrides per notebook (the `parameters` cell's names).
SMALL_SETTINGS = {
    "01_quickstart.ipynb": {"SMALL": True},
    "02_write_your_own_algorithm.ipynb": {"SMALL": True},
    "03_train_a_drafter.ipynb": {"SMALL": True},
    "04_reproduce_a_paper.ipynb": {"SMALL": True},
}
# The figures each notebook draws (the quickstart: acceptance and tokens/s in one figure, then the tree).
PLOTS = {"01_quickstart.ipynb": 2, "02_write_your_own_algorithm.ipynb": 1, "03_train_a_drafter.ipynb": 2,
         "04_reproduce_a_paper.ipynb": 1}
CELL_TIMEOUT_S = 300


def load(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text())


def parameter_cell_index(nb: dict, name: str) -> int:
    tagged = [i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def source(cell: dict) -> str:
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


def test_the_four_notebooks_exist():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(ORDER)
    assert set(SMALL_SETTINGS) == set(PLOTS) == set(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_committed_without_outputs(name):
    nb = load(name)
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{name} cell {i} has outputs: strip them before committing"
            assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count: strip it"
    assert "widgets" not in nb.get("metadata", {}), f"{name}: widget state in the metadata"


@pytest.mark.parametrize("name", ORDER)
def test_shape_of_a_notebook(name):
    """A Colab badge pointing at this notebook, the install cell first, a run time, parameters."""
    nb = load(name)
    first = source(nb["cells"][0])
    assert f"/blob/main/notebooks/{name})" in first and "colab-badge.svg" in first, f"{name}: no Colab badge"
    assert re.search(r"\*\*Expected run time\.\*\*", first), f"{name}: states no expected run time"
    setup = source(nb["cells"][1])
    assert "pip" in setup and "REPO_URL" in setup and "default_backend" in setup, f"{name}: setup cell"
    params = source(nb["cells"][parameter_cell_index(nb, name)])
    for key in SMALL_SETTINGS[name]:
        assert re.search(rf"^{key} = ", params, re.M), f"{name}: the parameters cell does not define {key}"


def execute(name: str, overrides: dict) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = parameter_cell_index(nb, name)
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name} failed:\n{err}", pytrace=False)
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if "image/png" in o.get("data", {}))
    assert images == PLOTS[name], f"{name}: drew {images} figures, expected {PLOTS[name]}"


@pytest.mark.parametrize("name", ORDER)
def test_runs_top_to_bottom_on_cpu(name):
    execute(name, SMALL_SETTINGS[name])
