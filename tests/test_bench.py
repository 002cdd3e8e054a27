"""The benchmark harness (benchmarks/moe_layer.py) runs end to end through `tinymoe bench`, and its physics helpers
compute what docs/design.md §6 says. Never asserts speed."""
import json
import math

import numpy as np
import pytest

from benchmarks import moe_layer as bench

RATIO_KEYS = ["ratio_fwd", "ratio_fwdbwd", "tbound_ratio_fwd", "tbound_ratio_fwdbwd", "bound_ratio_fwd",
              "bound_ratio_fwdbwd", "dispatch_share_fwd", "dispatch_share_fwdbwd", "vs_numpy_fwd", "vs_numpy_fwdbwd"]
TIME_KEYS = ["moe_fwd_s", "moe_fwdbwd_s", "dense_fwd_s", "dense_fwdbwd_s", "t_bound_fwd_s", "t_bound_fwdbwd_s",
             "numpy_fwd_s", "numpy_fwdbwd_s"]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """One quick run through the `tinymoe bench` command, which runs benchmarks/moe_layer.py."""
    from tinymoe.cli import main as cli_main

    path = tmp_path_factory.mktemp("bench") / "out.json"
    rc = cli_main(["bench", "--shapes", "quick", "--repeat", "1", "--json", str(path), "--no-torch", "--backend", "numpy",
                     "--settle", "0"])
    return rc, json.loads(path.read_text())


def test_quick_run_writes_json(quick_results):
    rc, rows = quick_results
    assert rc == 0
    assert len(rows) == len(bench.QUICK_SHAPES)
    for row, shape in zip(rows, bench.QUICK_SHAPES):
        assert row["backend"] == "numpy"
        assert (row["T"], row["d"], row["f"], row["E"], row["k"]) == (shape.T, shape.d, shape.f, shape.E, shape.k)
        assert row["rows_per_expert"] == shape.T * shape.k / shape.E
        for key in RATIO_KEYS + TIME_KEYS + ["copy_bandwidth", "p_dense_fwd", "p_dense_fwdbwd"]:
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["vs_numpy_fwd"] == 1.0 and row["rel_err_vs_numpy"] == 0.0  # the reference against itself
        assert row["dispatch_share_fwdbwd"] < 1 and row["bound_ratio_fwd"] >= 1 - 1e-9  # t_bound ≥ dense time
        assert row["flops_fwd"] == bench.dense_flops(shape.T, shape.k, shape.d, shape.f)
        assert set(row["stage_s"]) == set(bench.STAGES_FWD + bench.STAGES_BWD)
        assert {"dense", "numpy"} <= set(row["times_s"]) and "torch" not in row["times_s"]
        assert "vs_torch_fwd" not in row  # --no-torch
        assert {"numpy", "cpu_count", "threads", "blas"} <= set(row["machine"])


def test_unknown_backend_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--shapes", "quick", "--backend", "no_such_backend", "--no-torch"])
    assert exc.value.code != 0
    assert "no_such_backend" in capsys.readouterr().err


def test_resolve_backends_skips_incomplete(monkeypatch):
    """A backend that loads but lacks primitives is skipped with the reason, not run."""
    import types

    from tinymoe import backends

    half = types.SimpleNamespace(route=lambda *a: None)
    real_load = backends.load
    monkeypatch.setattr(backends, "load", lambda name: half if name == "numba" else real_load(name))
    monkeypatch.setattr(backends, "available", lambda: ["numpy", "numba"])
    runnable, skipped = bench.resolve_backends(None)
    assert list(runnable) == ["numpy"]
    assert "missing primitives" in skipped["numba"] and "gather" in skipped["numba"]


def test_t_bound_formula():
    # compute-bound: 1e9 FLOP at 1e11 FLOP/s = 10 ms; bytes (4·1e6 + 2e6) / 1e10 B/s = 0.6 ms
    assert bench.t_bound(1e9, 1e11, 4, 1e6, 2e6, 1e10) == pytest.approx(1e-2)
    # bandwidth-bound: 64 experts · 4 MB + 1 MB = 257 MB at 10 GB/s = 25.7 ms > 10 ms
    assert bench.t_bound(1e9, 1e11, 64, 4e6, 1e6, 1e10) == pytest.approx(25.7e-3)


def test_byte_counts():
    # one expert: W1 and W2 (d·f each), b1 (f), b2 (d), float32
    assert bench.expert_weight_bytes(3, 5) == (2 * 3 * 5 + 5 + 3) * 4
    # x and y (T·d), xs and out (T·k·d), h (T·k·f)
    T, k, d, f = 7, 2, 3, 5
    assert bench.activation_bytes(T, k, d, f) == (2 * T * d + 2 * T * k * d + T * k * f) * 4
    assert bench.activation_bytes(T, k, d, f, backward=True) == 2 * bench.activation_bytes(T, k, d, f)


def test_dense_flops():
    T, k, d, f = 4096, 2, 512, 2048
    assert bench.dense_flops(T, k, d, f) == 4 * T * k * d * f
    assert bench.dense_flops(T, k, d, f, backward=True) == 3 * 4 * T * k * d * f


def test_problem_routing_is_top_k_distinct():
    shape = bench.Shape(64, 8, 16, 8, 3)
    p = bench.make_problem(shape)
    idx = p["expert_idx"]
    assert idx.shape == (64, 3) and idx.min() >= 0 and idx.max() < 8
    assert all(len(set(row)) == 3 for row in idx)  # k distinct experts per token
    assert np.allclose(p["weights"].sum(axis=1), 1, atol=1e-6)
    assert all(p[key].dtype == np.float32 for key in ("x", "dy", "w1", "b1", "w2", "b2", "xd", "W1", "W2", "weights"))
    assert p["xd"].shape == (64 * 3, 8)  # the dense equivalent runs T·k rows


def test_targets_summary_and_table(quick_results):
    _, rows = quick_results
    table = bench.format_table(rows, {"cupy": "no GPU"})
    assert "numpy" in table and "cupy" in table and "skipped" in table
    assert bench.targets_summary(rows).startswith("targets [numpy]")


def test_every_column_of_the_table_has_a_legend_line(quick_results):
    """A reader of `make bench` finds each column's meaning under the table, without the source."""
    _, rows = quick_results
    table = bench.format_table(rows, {})
    head = table.splitlines()[0]
    for column in ("rows/E", "MoE/dense", "/bound", "dispatch%", "vs numpy", "vs torch", "err"):
        assert column in head
        assert any(line.strip().startswith(column) for line in table.splitlines()[2:]), f"no legend for {column}"


def test_make_bench_is_quick_by_default():
    """The default grid takes about a minute (two shapes); the ~9-minute grid is behind --shapes full."""
    assert bench.build_parser().parse_args([]).shapes == "standard"
    assert len(bench.SHAPE_SETS["standard"]) == 2 < len(bench.SHAPE_SETS["full"])
    assert {s.rows_per_expert for s in bench.SHAPE_SETS["standard"]} == {256, 64}


def test_blas_is_described_in_words():
    info = [{"internal_api": "openblas", "version": "0.3.31", "num_threads": 2, "architecture": "SkylakeX"}]
    assert bench.describe_blas(info) == "openblas 0.3.31 (SkylakeX kernels, 2 threads)"


@pytest.mark.parametrize("name", ["gelu", "relu", "silu"])
def test_dense_activation_matches_library(name):
    """The dense yardstick computes the same activation as tinymoe.activations (only faster)."""
    from tinymoe.activations import get_activation

    h = np.random.default_rng(0).standard_normal((64, 32), dtype=np.float32) * 3
    act, act_grad = bench.dense_activation(name)
    ref, ref_grad = get_activation(name)
    assert act(h).dtype == np.float32 and act_grad(h).dtype == np.float32
    np.testing.assert_allclose(act(h), ref(h), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(act_grad(h), ref_grad(h), rtol=1e-5, atol=1e-6)
