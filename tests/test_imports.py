"""The import graph of the package, read from the source (never by importing it): imports run one way.

* Every module sits in one layer of LAYERS and imports only from its own layer or the layers below — imports
  inside functions (lazy ones) included, so a lazy import cannot hide an arrow running back up.
* No cycles at all, within a layer either.
* Nothing imports tinymoe.experiments from outside it but the `tinymoe` command (cli.py, the front door above
  everything, whose `tinymoe experiment NAME` runs them).
* No model class is found by a string import: the checkpoint registry holds the classes themselves.
"""
import ast
import fnmatch
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = {"tinymoe": "tinymoe", "tinymoe.backends": "backends"}  # backends/ installs as tinymoe.backends

LAYERS = [  # bottom first; a module may import from its own layer and from the layers above it in this list
    ("raw arrays", ["tinymoe.version", "tinymoe.arrays", "tinymoe.guarded", "tinymoe.activations", "tinymoe.data*"]),
    ("engine", ["tinymoe.engine", "tinymoe.gradcheck"]),
    ("ops and the hot path", ["tinymoe.functional", "tinymoe.dispatch", "tinymoe.backends*", "tinymoe.moe_ops",
                              "tinymoe.optim"]),
    ("gates and losses", ["tinymoe.gates", "tinymoe.losses"]),
    ("modules", ["tinymoe.nn*"]),
    ("model", ["tinymoe.model"]),
    ("expert parallelism", ["tinymoe.distributed", "tinymoe.distributed.comm", "tinymoe.distributed.ops",
                            "tinymoe.distributed.layer", "tinymoe.distributed.parallel"]),
    ("checkpoint", ["tinymoe.checkpoint", "tinymoe.interop"]),
    ("training", ["tinymoe.train"]),
    ("runs", ["tinymoe.config", "tinymoe.config_docs", "tinymoe.plots", "tinymoe.runs", "tinymoe.distributed.run"]),
    ("experiments", ["tinymoe.experiments*"]),
    ("front door", ["tinymoe.cli", "tinymoe"]),
]


def find_modules():
    """module name -> (path, is a package __init__)."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            for f in files:
                if f.endswith(".py"):
                    name = ".".join([package, *parts, *([] if f == "__init__.py" else [f[:-3]])])
                    out[name] = (os.path.join(dirpath, f), f == "__init__.py")
    return out


MODULES = find_modules()


def imports_of(name):
    """The package modules `name` imports anywhere in its source (top level or inside functions)."""
    path, is_package = MODULES[name]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule; otherwise pkg itself
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name):
    matches = [i for i, (_, patterns) in enumerate(LAYERS) if any(fnmatch.fnmatch(name, p) for p in patterns)]
    return matches[0] if matches else None


def test_the_graph_is_read():
    """The reader sees real edges (so the tests below can fail)."""
    assert "tinymoe.engine" in GRAPH["tinymoe.functional"]
    assert {"tinymoe.nn.routers", "tinymoe.gates", "tinymoe.moe_ops"} <= GRAPH["tinymoe.nn.moe"]
    assert "tinymoe.activations" in GRAPH["tinymoe.backends.numba"]
    assert len(MODULES) > 40


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == [], "place the new module in a layer of LAYERS"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_down_the_layers(name):
    upward = sorted(m for m in GRAPH[name] if layer_of(m) > layer_of(name))
    assert not upward, (f"{name} (layer {LAYERS[layer_of(name)][0]!r}) imports {upward} from a layer above it: move "
                        "the shared code down, or the importer up")


def test_no_import_cycles():
    state, cycles = {}, []  # depth-first search; state: 1 on the stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_nothing_outside_experiments_imports_them():
    importers = sorted(m for m, deps in GRAPH.items() if not m.startswith("tinymoe.experiments")
                       and any(d.startswith("tinymoe.experiments") for d in deps))
    assert importers == ["tinymoe.cli"]


def test_no_model_class_is_found_by_a_string_import():
    from tinymoe import checkpoint

    for name, spec in checkpoint.MODELS.items():
        assert isinstance(spec.cls, type), name
        assert not spec.cls.__module__.startswith("tinymoe.experiments"), name
    source = open(MODULES["tinymoe.checkpoint"][0], encoding="utf-8").read()
    assert "importlib" not in source and "import_module" not in source
