"""The tutorials (tutorials/NN_*.py) run top to bottom as plain scripts and their closing assertions hold.

Each tutorial ends with assertions that turn what it teaches into a checked fact (outputs equal to the
from-scratch NumPy version, a collapse that happens, a zero-shot route that works, ...), so a tutorial that stops
being true fails here. Each runs in a fresh interpreter, from a temporary directory (so it imports the installed
package, never tests/ or the repository root), with the non-interactive Agg matplotlib backend and its figures
written to that directory. They are sized to take well under a minute each on a 2-core CPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
SCRIPTS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
HANG_GUARD_S = 300  # a hang guard, not a speed test: the tutorials take seconds to tens of seconds
# what a tutorial may import: the public modules (the NumPy reference hot path comes via tm.backends.load("numpy"))
PUBLIC_MODULES = {"tinymoe", "tinymoe.gradcheck", "tinymoe.data", "tinymoe.train", "tinymoe.functional",
                  "tinymoe.distributed"}


def test_the_series_is_there():
    assert [p.name[:2] for p in SCRIPTS] == [f"{i:02d}" for i in range(1, 10)], "tutorials 01-09, one file each"
    readme = (TUTORIALS / "README.md").read_text()
    for script in SCRIPTS:
        assert script.name in readme, f"tutorials/README.md does not list {script.name}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_tutorial_structure(script):
    """A jupytext percent-format notebook that says what it teaches, what it needs and where it comes from."""
    text = script.read_text()
    assert text.startswith("# ---\n# jupyter:\n#   jupytext:") and "format_name: percent" in text
    first_cell = text.split("# %%\n", 1)[0]
    for heading in ("**What you will learn.**", "**Prerequisites.**", "**Sources"):
        assert heading in first_cell, f"{script.name}: the first cell needs {heading}"
    assert re.search(r"^assert ", text, re.M), f"{script.name} must end with assertions"
    assert "from tests" not in text and "import tests" not in text
    imported = set(re.findall(r"^\s*(?:from|import) (tinymoe[\w.]*)", text, re.M))
    assert imported <= PUBLIC_MODULES, f"{script.name} imports {sorted(imported - PUBLIC_MODULES)}: public API only"


def _run(script, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg", "TINYMOE_TUTORIAL_FIGURES": str(tmp_path / "figures"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    for launched_by_mpi in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):  # when pytest itself runs
        env.pop(launched_by_mpi, None)  # under mpiexec, tutorial 9 must still start its own two ranks
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_tutorial_runs_and_its_claims_hold(script, tmp_path):
    if script.name.startswith("08_"):
        pytest.importorskip("numba", reason="tutorial 8 compares the numba backend with the reference")
        pytest.importorskip("hypothesis")
    if script.name.startswith("09_"):  # it starts itself under `mpiexec -n 2`
        pytest.importorskip("mpi4py", reason="tutorial 9 needs MPI: pip install -e '.[mpi]'")
    pytest.importorskip("matplotlib")
    result = _run(script, tmp_path)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "all checks passed" in result.stdout
    figures = list((tmp_path / "figures").glob("*.png"))
    assert figures, f"{script.name} saved no figure"
