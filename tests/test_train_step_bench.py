"""benchmarks/train_step.py runs and its contenders compute the same step (a smoke test, not a timing)."""
import importlib.util
import json
import os

import pytest

import tinymoe as tm

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name="train_step"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif("numba" not in tm.backends.available(), reason="needs the numba backend")
def test_train_step_benchmark_writes_json_and_the_backends_agree(tmp_path):
    bench = _load()
    out = tmp_path / "r.json"
    assert bench.main(["--configs", "demo", "--repeat", "1", "--settle", "0", "--no-torch", "--no-memory",
                       "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert set(row["median_s"]) == {"numpy", "numba"} and all(t > 0 for t in row["median_s"].values())
    assert row["parameters"]["numpy"] == row["parameters"]["numba"]
    assert row["first_loss"]["numba"] == pytest.approx(row["first_loss"]["numpy"], rel=1e-5)
    assert row["expert_ffn_flops"]["numba"] > 0


def test_torch_twin_computes_the_same_loss():
    pytest.importorskip("torch")
    bench = _load()
    tokens, targets = bench.batches("demo", 1)[0]
    ours = bench.TinymoeRunner("demo", "numpy")
    twin = bench.TorchRunner("demo")
    assert twin.num_parameters() == ours.model.num_parameters()
    assert twin.step(tokens, targets) == pytest.approx(ours.step(tokens, targets), rel=1e-5)


def test_peak_memory_is_the_childs_own_not_the_parents():
    """getrusage's ru_maxrss survives fork + exec: a child of a big process reported the parent's size."""
    import numpy as np

    bench = _load()
    ballast = np.ones(400 * 2**20 // 8)  # 400 MB resident in this (the parent) process
    mb = bench.peak_memory("numpy", "demo", 1)
    assert ballast[-1] == 1.0
    assert mb is not None and 0 < mb < 200  # the demo model's steps take a few MB


def test_busy_processes_spin_only_inside_the_block():
    import subprocess

    bench = _load()

    seen = []
    original = subprocess.Popen

    class Recording(original):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    bench.subprocess.Popen = Recording
    try:
        with bench.busy_processes(2):
            assert len(seen) == 2 and all(p.poll() is None for p in seen)  # running
    finally:
        bench.subprocess.Popen = original
    assert all(p.poll() is not None for p in seen)  # killed and reaped


def test_public_layer_benchmark_reports_the_medians_it_measured(tmp_path, monkeypatch):
    bench = _load("public_layer")
    monkeypatch.setattr(bench, "D", 8)
    monkeypatch.setattr(bench, "F", 16)
    with tm.use_backend("numpy"):
        row = bench.measure(rows_per_expert=4, backend="numpy", repeat=3)
    assert row["tokens"] == 4 * bench.E // bench.K and tm.get_backend() == "numpy"
    med = {key: sorted(v)[1] for key, v in row["seconds"].items()}
    assert row["median_s"] == med and row["ratio"] == med["moe"] / med["dense"]
