"""The GPU half of the benchmark harness (benchmarks/moe_layer.py: bench_gpu and its table), run on the CPU with
NumPy standing in for CuPy and the NumPy reference standing in for the cupy backend.

Nothing here measures a GPU: the point is that the code a lent GPU machine runs (benchmarks/gpu_check.sh) has no
plumbing error — every row key the table and the target summary read is there and the numbers are consistent — so
that a short GPU session is not spent on a crash. On a GPU the same functions run on CuPy (tests cannot time).
"""
import sys
import time
import types

import numpy as np
import pytest

from benchmarks import moe_layer as bench
from tinymoe import dispatch


class _Event:
    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def _fake_cupy():
    """The few CuPy names the GPU benchmark uses, on NumPy (events read the host clock)."""
    runtime = types.SimpleNamespace(
        getDeviceProperties=lambda i: {"name": b"stand-in GPU", "totalGlobalMem": 2**30},
        driverGetVersion=lambda: 12080, runtimeGetVersion=lambda: 12080)
    cuda = types.SimpleNamespace(Event=_Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3, runtime=runtime,
                                 Device=lambda *a: types.SimpleNamespace(id=0, compute_capability="90"))
    return types.SimpleNamespace(asarray=np.asarray, ones=np.ones, empty_like=np.empty_like, float32=np.float32,
                                 cuda=cuda, __version__="stand-in")


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    be = types.SimpleNamespace(**{name: getattr(dispatch, name) for name in dir(dispatch) if not name.startswith("_")})
    be.warmup = lambda: None
    return be


def test_bench_gpu_rows_table_and_targets(stand_in, capsys):
    shapes = [bench.Shape(64, 8, 16, 4, 2), bench.Shape(64, 8, 16, 8, 1)]
    rows = bench.bench_gpu(stand_in, shapes, repeat=2, warmup=1, activation="gelu", torch_on=False)
    assert [r["shape"] for r in rows] == [str(s) for s in shapes]
    for r in rows:
        assert r["backend"] == "cupy" and r["device"] == "gpu" and r["tf32"] is False
        assert r["rel_err_vs_numpy"] == 0.0  # the stand-in backend is the reference itself
        for mode in ("fwd", "fwdbwd"):
            assert r[f"ratio_{mode}"] == pytest.approx(r[f"moe_{mode}_s"] / r[f"dense_{mode}_s"])
            assert 0 < r[f"dispatch_share_{mode}"] < 1
        assert set(r["stage_s"]) == set(bench.STAGES_FWD + bench.STAGES_BWD)
    table = bench.format_table(rows, {})
    assert table.count("cupy") >= 2
    summary = bench.gpu_targets_summary(rows)
    assert summary.startswith("targets [cupy, GPU]:") and "t_bound" in summary and "dispatch" in summary


def test_gpu_summary_applies_the_issue_bars():
    def row(E, rows_per_expert, ratio):
        return dict(E=E, d=1024, rows_per_expert=rows_per_expert, ratio_fwdbwd=ratio, dispatch_share_fwdbwd=0.05,
                    tf32=False, rel_err_vs_numpy=1e-6, shape=f"x,1024,4096,{E},2", tbound_ratio_fwdbwd=1.0,
                    t_bound_fwdbwd_s=1e-3)

    ok = bench.gpu_targets_summary([row(16, 256, 1.2), row(64, 256, 1.45), row(64, 64, 3.0)])
    assert "f+b E≤16 1.20 (ok" in ok and "f+b E=64 1.45 (ok" in ok and "MISS" not in ok
    miss = bench.gpu_targets_summary([row(8, 2048, 1.3), row(64, 256, 1.6)])
    assert "f+b E≤16 1.30 (MISS" in miss and "f+b E=64 1.60 (MISS" in miss


def test_a_layer_that_cannot_run_is_reported_not_fatal(stand_in, monkeypatch):
    """--layer needs tm.nn.MoE on the device; when that fails the row says why and the rest is still measured."""
    def refuse(self, device):
        raise RuntimeError("no device here")

    from tinymoe.nn.module import Module

    monkeypatch.setattr(Module, "to", refuse)
    rows = bench.bench_gpu(stand_in, [bench.Shape(32, 8, 16, 4, 2)], repeat=1, warmup=0, activation="relu",
                           torch_on=False, layer=True)
    assert "no device here" in rows[0]["errors"]["layer"] and "layer_ratio_fwd" not in rows[0]
    assert rows[0]["ratio_fwdbwd"] > 0
