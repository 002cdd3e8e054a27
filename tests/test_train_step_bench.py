"""benchmarks/train_step.py runs and its contenders compute the same step (a smoke test, not a timing)."""
import importlib.util
import json
import os

import pytest

import tinymoe as tm

HERE = os.path.dirname(os.path.abspath(__file__))


def _load():
    spec = importlib.util.spec_from_file_location("train_step", os.path.join(HERE, "..", "benchmarks", "train_step.py"))
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
