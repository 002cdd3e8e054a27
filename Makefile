# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# setuptools notes every editable install of a package-dir mapping (backends/ -> tinymoe.backends) with a boxed
# warning about same-named folders; it does not apply here, so the install stays quiet
PIP    := PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip

.PHONY: demo test bench tutorials clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamp files record which extras are installed, so re-running is instant.
$(VENV)/.demo-installed: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install --quiet -e ".[numba,train,plot]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install --quiet -e ".[numba,train,plot,test,mpi]"
	touch $@

$(VENV)/.tutorials-installed: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install --quiet -e ".[tutorials]"
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/tinymoe train

test: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# tutorials/NN_*.py (jupytext percent scripts, the source) -> executed tutorials/NN_*.ipynb with their plots
tutorials: $(VENV)/.tutorials-installed
	$(PY) tutorials/build.py

# about a minute; the full grid (~9 minutes): .venv/bin/tinymoe bench --shapes full
bench: $(VENV)/.test-installed
	$(VENV)/bin/tinymoe bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
