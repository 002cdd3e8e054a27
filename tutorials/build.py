"""Build the executed notebooks: tutorials/NN_*.py (jupytext percent format, the source) -> NN_*.ipynb.

    python tutorials/build.py            # every tutorial (what `make tutorials` runs)
    python tutorials/build.py 02 05      # only those

Each notebook is executed top to bottom by a Jupyter kernel running this Python (nbclient), in the tutorials/
folder, so its plots are embedded in the .ipynb and also saved under tutorials/figures/. Needs the `tutorials`
extra: pip install -e '.[tutorials]'.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def build(script: Path) -> Path:
    notebook = jupytext.read(script)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    target = script.with_suffix(".ipynb")
    nbformat.write(notebook, target)
    return target


def main(argv):
    scripts = sorted(HERE.glob("[0-9][0-9]_*.py"))
    if argv:
        scripts = [s for s in scripts if any(s.name.startswith(prefix) for prefix in argv)]
        if not scripts:
            raise SystemExit(f"no tutorial starts with {argv}; the tutorials are {[s.name for s in HERE.glob('[0-9]*.py')]}")
    for script in scripts:
        if "mpiexec -n" in script.read_text():  # several processes: a notebook kernel is one, so run it in a terminal
            print(f"{script.relative_to(HERE.parent)}: skipped (it runs on several MPI ranks: "
                  f"mpiexec -n 2 python {script.relative_to(HERE.parent)})")
            continue
        start = time.perf_counter()
        target = build(script)
        print(f"{target.relative_to(HERE.parent)}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
