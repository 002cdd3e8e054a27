"""The CuPy GPU backend: CPU-side checks that run everywhere, and GPU checks that need CuPy and an NVIDIA GPU.

On every machine (CI included):
* the backend module imports (without CuPy too), and offers every primitive with the reference's signature;
* its CUDA source compiles with NVRTC to PTX for Ampere and Hopper — this needs only the NVRTC library
  (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12), no GPU; skipped with the reason when NVRTC is missing;
* its row-major GEMM bookkeeping (transpose flags, leading dimensions, per-expert offsets, the strided-batched
  path) against NumPy, through a stand-in for cuBLAS that follows cuBLAS's documented column-major contract on host
  memory;
* the registry: no CuPy / CuPy without a GPU / without cuBLAS or NVRTC give the reason and the install command;
  `auto` picks cupy when a GPU is usable; `for_arrays` sends device arrays to cupy and host arrays to a host
  backend, and refuses a mix; `tinymoe train --set backend=cupy` without a GPU exits 2 with one line naming the
  install command; importing tinymoe never imports cupy (a planted one shows it);
* the GPU step test's tolerance: a float32 step on the host is within it of the float64 step, a wrong gradient not.

On a GPU (skipped here with the registry's reason): every primitive and the whole `tm.nn.MoE` layer (output and
every gradient) against the NumPy reference on drawn shapes and routings (empty experts, one expert taking every
token, capacity overflow, k = E, ties, one token), bitwise-equal reruns, and a whole training step on the GPU
equal to the CPU one within float32 tolerance. Nothing here claims a kernel ran unless it ran.
"""
import importlib.util
import inspect
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import tinymoe as tm
import tinymoe.backends.cupy as cupy_backend  # unconditional: an import error of the module fails here, on any machine
from tinymoe import dispatch as D
from tinymoe.activations import ACTIVATIONS
from tinymoe.backends.cupy import _gemm, _kernels
from cupy_standin import HostArray, host_cublas  # noqa: E402
from test_backends import assert_close, assert_same, every_primitive, expert_weights, routings  # noqa: E402

GPU = "cupy" in tm.backends.available()
needs_gpu = pytest.mark.skipif(not GPU, reason=tm.backends.unavailable().get("cupy", "cupy available"))


# ------------------------------------------------------------------------------------------------ module and kernels
def test_module_offers_every_primitive_with_the_reference_signature():
    for name in tm.backends.PRIMITIVES:
        ours, ref = getattr(cupy_backend, name), getattr(D, name)
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(ref).parameters), name
    assert set(_kernels.KERNELS) <= set(_kernels.SOURCE.replace("(", " ").split())


NO_CUPY_IMPORT = """
import importlib.util, sys
assert importlib.util.find_spec("cupy").origin.startswith(sys.argv[1]), "the planted cupy is not the one found"
import numpy as np
import tinymoe as tm
import tinymoe.cli, tinymoe.moe_ops, tinymoe.train  # noqa: E401
layer = tm.nn.MoE(4, 8, 2, k=1, seed=0)
layer(tm.Tensor(np.ones((3, 4), np.float32))).sum().backward()  # a forward and backward on the host
assert "cupy" not in sys.modules, "cupy was imported"
"""


def test_importing_tinymoe_never_imports_cupy(tmp_path):
    """With a `cupy` importable (a planted empty one, so the check bites where CuPy is not installed too; it imports
    cleanly, so a `try: import cupy` would not hide it), importing tinymoe, its CLI and training code and running an
    MoE layer on the host never import it."""
    planted = tmp_path / "cupy"
    planted.mkdir()
    (planted / "__init__.py").write_text("PLANTED = True  # an empty stand-in: importing it is the error\n")
    env = {key: value for key, value in os.environ.items() if key != "TINYMOE_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", NO_CUPY_IMPORT, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _nvrtc_missing():
    """None when NVRTC can be loaded here, else why not."""
    if importlib.util.find_spec("cupy_backends") is None:
        return "CuPy is not installed (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12 to compile-check the kernels)"
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:
        return f"NVRTC cannot be loaded ({str(e).splitlines()[0] if str(e) else type(e).__name__}); pip install " \
               "nvidia-cuda-nvrtc-cu12"
    return None


@pytest.mark.skipif(_nvrtc_missing() is not None, reason=str(_nvrtc_missing()))
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernel_sources_compile_with_nvrtc(arch):
    """Every kernel, for float and double, compiles to PTX (a compile check only: nothing runs)."""
    lowered = _kernels.ptx(arch)
    assert set(lowered) == set(_kernels.name_expressions())
    assert all(lowered.values())


# ------------------------------------------------------------------------------------------------ GEMM bookkeeping
@given(counts=st.lists(st.integers(0, 5), min_size=1, max_size=6), equal=st.booleans(), d=st.integers(1, 4),
       f=st.integers(1, 5), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
@settings(max_examples=25)
def test_expert_gemms_match_numpy(counts, equal, d, f, dtype, seed):
    """The six per-expert GEMMs of the grouped FFN (forward 2, backward 4) address the right rows, experts and
    transposes, one call per non-empty expert or one strided-batched call when all experts hold as many rows."""
    if equal:
        counts = [max(counts[0], 1)] * len(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    E, R = len(counts), int(offsets[-1])
    note(f"offsets={offsets.tolist()}")
    rng = np.random.default_rng(seed)
    xs, dout = (rng.standard_normal((R, w)).astype(dtype) for w in (d, f))
    w1, w2 = rng.standard_normal((E, d, f)).astype(dtype), rng.standard_normal((E, f, d)).astype(dtype)
    h, g, out, dxs = (np.zeros((R, w), dtype) for w in (f, f, d, d))
    dw1, dw2 = np.zeros((E, d, f), dtype), np.zeros((E, f, d), dtype)
    H = HostArray
    run = cupy_backend._expert_gemms
    with host_cublas() as cublas:
        run(offsets, ("rows", f, d), H(xs), H(w1), H(h), (("row", d), ("expert", d * f), ("row", f)))
        run(offsets, ("rows", d, f), H(dout), H(w2), H(out), (("row", f), ("expert", f * d), ("row", d)))
        run(offsets, (f, d, "rows"), H(dout), H(xs), H(dw2), (("row", f), ("row", d), ("expert", f * d)),
            trans_a=True)
        run(offsets, ("rows", f, d), H(xs), H(w2), H(g), (("row", d), ("expert", f * d), ("row", f)), trans_b=True)
        run(offsets, (d, f, "rows"), H(xs), H(dout), H(dw1), (("row", d), ("row", f), ("expert", d * f)),
            trans_a=True)
        run(offsets, ("rows", d, f), H(dout), H(w1), H(dxs), (("row", f), ("expert", d * f), ("row", d)),
            trans_b=True)
        nonempty = sum(c > 0 for c in counts)
        batched = E > 1 and counts[0] > 0 and len(set(counts)) == 1
        assert cublas.calls == 6 * (1 if batched else nonempty)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for e in range(E):
        s, t = offsets[e], offsets[e + 1]
        np.testing.assert_allclose(h[s:t], xs[s:t] @ w1[e], rtol=tol, atol=tol)
        np.testing.assert_allclose(out[s:t], dout[s:t] @ w2[e], rtol=tol, atol=tol)
        np.testing.assert_allclose(dw2[e], dout[s:t].T @ xs[s:t], rtol=tol, atol=tol)
        np.testing.assert_allclose(g[s:t], xs[s:t] @ w2[e].T, rtol=tol, atol=tol)
        np.testing.assert_allclose(dw1[e], xs[s:t].T @ dout[s:t], rtol=tol, atol=tol)
        np.testing.assert_allclose(dxs[s:t], dout[s:t] @ w1[e].T, rtol=tol, atol=tol)


def test_gemm_accumulates_and_pins_the_compute_type(monkeypatch):
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((3, 2), np.float32)
    c = np.full((2, 2), 10, np.float32)
    with host_cublas():
        _gemm.gemm(HostArray(a), HostArray(b), HostArray(c), 2, 2, 3, accumulate=True)
    np.testing.assert_array_equal(c, 10 + a @ b)
    monkeypatch.setenv("CUPY_TF32", "1")
    assert _gemm.compute_type(np.float32) == 77 and _gemm.compute_type(np.float64) == 70  # TF32 never for float64
    monkeypatch.setenv("CUPY_TF32", "0")
    assert _gemm.compute_type(np.float32) == 68


# ------------------------------------------------------------------------------------------------ registry
@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry with its CuPy probe forgotten and no backend chosen (restored afterwards)."""
    monkeypatch.setattr(tm.backends, "_cupy_why", [])
    monkeypatch.setattr(tm.backends, "_current", None)
    monkeypatch.setattr(tm.backends, "_loaded", dict(tm.backends._loaded))
    monkeypatch.delenv("TINYMOE_BACKEND", raising=False)
    return tm.backends


def _pretend_cupy(monkeypatch, get_count):
    """CuPy 'installed' as a stand-in whose driver query is get_count."""
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(tm.backends.importlib.util, "find_spec",
                        lambda name, *a: importlib.machinery.ModuleSpec("cupy", None) if name == "cupy"
                        else real(name, *a))


def test_no_cupy_says_how_to_install(fresh_registry, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(tm.backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "cupy" else real(name, *a))
    assert "cupy" not in tm.backends.available()
    why = tm.backends.unavailable()["cupy"]
    assert "CuPy not installed" in why and "pip install 'tinymoe[cuda12]'" in why and "tinymoe[cuda13]" in why
    with pytest.raises(tm.backends.BackendUnavailable, match=r"CuPy not installed.*tinymoe\[cuda12\]"):
        tm.set_backend("cupy")
    assert tm.backends.auto() in ("numba", "numpy")


@pytest.mark.parametrize("count, expect", [
    (RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"), "cannot reach an NVIDIA GPU"),
    (0, "no NVIDIA GPU")])
def test_cupy_without_a_gpu_says_so(fresh_registry, monkeypatch, count, expect):
    def get_count():
        if isinstance(count, Exception):
            raise count
        return count

    _pretend_cupy(monkeypatch, get_count)
    assert "cupy" not in tm.backends.available()
    why = tm.backends.unavailable()["cupy"]
    assert expect in why and "tinymoe[cuda12]" in why
    with pytest.raises(tm.backends.BackendUnavailable, match=expect):
        tm.set_backend("cupy")
    assert tm.backends.auto() != "cupy"


def test_cupy_with_a_gpu_but_no_cublas_says_so(fresh_registry, monkeypatch):
    _pretend_cupy(monkeypatch, lambda: 1)
    monkeypatch.setitem(sys.modules, "cupy_backends", None)  # `from cupy_backends... import cublas` fails
    why = tm.backends.unavailable()["cupy"]
    assert "cannot load cuBLAS" in why and "tinymoe[cuda12]" in why


def test_cupy_with_a_gpu_and_cublas_but_no_nvrtc_says_so(fresh_registry, monkeypatch):
    """Without NVRTC every kernel would fail at its first launch, mid-training: the registry says so up front."""
    _pretend_cupy(monkeypatch, lambda: 1)
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")

    def no_nvrtc():  # CuPy links NVRTC at run time: the module imports, its first call fails
        raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open shared object file")

    libs.nvrtc = types.SimpleNamespace(getVersion=no_nvrtc)
    for name in ("cupy_backends", "cupy_backends.cuda"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", libs)
    why = tm.backends.unavailable()["cupy"]
    assert "cannot load NVRTC" in why and "compiles the backend's kernels" in why and "tinymoe[cuda12]" in why
    with pytest.raises(tm.backends.BackendUnavailable, match="NVRTC"):
        tm.set_backend("cupy")


class _DeviceArray:
    """Looks like a CuPy array to the registry (its type's module is cupy's)."""


_DeviceArray.__module__ = "cupy._core.core"


class _OtherArray:
    """An array of another NumPy-like module (as tinymoe.guarded's)."""


def test_auto_picks_the_gpu_and_arrays_pick_the_device(fresh_registry, monkeypatch):
    monkeypatch.setattr(tm.backends, "_probe_cupy", lambda: None)  # a usable GPU
    assert "cupy" in tm.backends.available() and tm.backends.auto() == "cupy"
    host = np.zeros((2, 2))
    for current in ("cupy", "numba"):  # device arrays: the cupy backend
        monkeypatch.setattr(tm.backends, "_current", current)
        assert tm.backends.for_arrays(_DeviceArray(), None) is cupy_backend
    monkeypatch.setattr(tm.backends, "_current", "cupy")  # host arrays with the GPU backend chosen: the host twin
    assert tm.backends.for_arrays(host, None).__name__ in ("tinymoe.dispatch", "tinymoe.backends.numba")
    monkeypatch.setattr(tm.backends, "_current", "numpy")  # the reference was asked for: it runs on any device
    assert tm.backends.for_arrays(host, None) is D and tm.backends.for_arrays(_DeviceArray()) is D
    monkeypatch.setattr(tm.backends, "_current", "cupy")
    assert tm.backends.for_arrays(_OtherArray()) is D  # another NumPy-like module: the reference
    with pytest.raises(ValueError, match=r"different devices.*numpy\.ndarray.*cupy\._DeviceArray"):
        tm.backends.for_arrays(host, _DeviceArray())


def test_plan_routing_follows_the_arrays(fresh_registry, monkeypatch):
    """An MoE layer on host arrays still runs (on a host backend) when cupy is the chosen backend."""
    monkeypatch.setattr(tm.backends, "_probe_cupy", lambda: None)
    monkeypatch.setattr(tm.backends, "_current", "cupy")
    plan = tm.moe_ops.plan_routing(np.array([[0, 1], [1, 0]]), 2)
    assert plan.backend.__name__ in ("tinymoe.dispatch", "tinymoe.backends.numba")
    layer = tm.nn.MoE(4, 8, 2, k=1, seed=0)
    assert layer(tm.Tensor(np.ones((3, 4), np.float32))).shape == (3, 4)


@pytest.mark.skipif(GPU, reason="a GPU is usable here: backend=cupy is valid")
def test_train_with_backend_cupy_without_a_gpu_exits_2_naming_the_install(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TINYMOE_BACKEND"}
    proc = subprocess.run([sys.executable, "-m", "tinymoe.cli", "train", "--set", "backend=cupy", "--quiet",
                           "--set", f"out={tmp_path}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinymoe train: error: backend = 'cupy' cannot run here")
    assert "pip install 'tinymoe[cuda12]'" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written: refused with the config, before data or run folder


@pytest.mark.skipif(GPU, reason="a GPU is usable here: cupy runs")
def test_a_gpu_run_is_evaluated_on_this_machines_backend(monkeypatch):
    """tinymoe eval / routes of a run trained with backend = "cupy" run on a host backend where there is no GPU."""
    from tinymoe.runs import run_backend

    monkeypatch.delenv("TINYMOE_BACKEND", raising=False)
    with run_backend("cupy") as name:
        assert name in ("numba", "numpy") and tm.get_backend() == name


# ------------------------------------------------------------------------------------------------ on the GPU
def _dev(a):
    return None if a is None else cupy_backend.asarray(a)


def _on_device(a):
    return isinstance(a, cupy_backend.cp.ndarray)


primitive_cases = dict(routing=routings(), cf=st.none() | st.floats(0.1, 2.0), by_weight=st.booleans(),
                       dtype=st.sampled_from([np.float32, np.float64]), d=st.integers(1, 40), f=st.integers(1, 40),
                       d_out=st.integers(1, 40), activation=st.sampled_from(sorted(ACTIVATIONS)),
                       seed=st.integers(0, 2**16))


@needs_gpu
@given(**primitive_cases)
def test_primitives_on_device_match_reference(routing, cf, by_weight, dtype, d, f, d_out, activation, seed):
    check_primitives(routing, cf, by_weight, dtype, d, f, d_out, activation, seed)


def check_primitives(routing, cf, by_weight, dtype, d, f, d_out, activation, seed):
    """Every primitive on device inputs: results on the device (offsets on the host), equal to the reference.
    (Also run on the CPU stand-in for CuPy: tests/test_cupy_standin.py.)"""
    be = cupy_backend
    idx, keep, priority, E = routing
    T, k = idx.shape
    rng = np.random.default_rng(seed)
    if cf is not None:  # small factors overflow the capacity
        C = D.capacity(cf, T, k, E)
        pw = priority.astype(dtype) if by_weight else None
        ref_keep = D.capacity_keep(idx, E, C, pw, keep)
        got = be.capacity_keep(_dev(idx), E, C, _dev(pw), _dev(keep))
        assert _on_device(got)
        assert_same(got, ref_keep, "capacity_keep")
        keep = ref_keep
    order, offsets, inverse = D.route(idx, E, keep)
    got = be.route(_dev(idx), E, _dev(keep))
    assert _on_device(got[0]) and _on_device(got[2]) and isinstance(got[1], np.ndarray)
    for g, ref, what in zip(got, (order, offsets, inverse), ("order", "offsets", "inverse")):
        assert_same(g, ref, what)
    x = rng.standard_normal((T, d)).astype(dtype)
    xs = D.gather(x, order, k)
    assert_same(be.gather(_dev(x), _dev(order), k), xs, "gather")
    params = expert_weights(rng, E, d, f, d_out, dtype)
    out, h = D.expert_ffn(xs, offsets, *params, activation)
    got_out, got_h = be.expert_ffn(_dev(xs), offsets, *map(_dev, params), activation)
    assert _on_device(got_out) and _on_device(got_h)
    assert_close(got_out, out, dtype, "out")
    assert_close(got_h, h, dtype, "h")
    dout = rng.standard_normal(out.shape).astype(dtype)
    w1, _, w2, _ = params
    for g, ref, what in zip(be.expert_ffn_backward(_dev(dout), _dev(xs), _dev(h), _dev(offsets), _dev(w1), _dev(w2),
                                                   activation),
                            D.expert_ffn_backward(dout, xs, h, offsets, w1, w2, activation),
                            ("dxs", "dw1", "db1", "dw2", "db2")):
        assert_close(g, ref, dtype, what)
    weights = priority.astype(dtype)
    y = D.combine(out, weights, inverse)
    assert_close(be.combine(_dev(out), _dev(weights), _dev(inverse)), y, dtype, "combine")
    dy = rng.standard_normal(y.shape).astype(dtype)
    for g, ref, what in zip(be.combine_backward(*map(_dev, (dy, out, weights, inverse))),
                            D.combine_backward(dy, out, weights, inverse), ("dout", "dweights")):
        assert_close(g, ref, dtype, what)
    assert_close(be.gather_backward(_dev(dout), _dev(inverse), k, T), D.gather_backward(dout, inverse, k, T), dtype,
                 "gather_backward")


EXPERT_COUNTS = [[4, 4, 4], [0, 7, 0, 2], [9], [0, 0, 3]]


@needs_gpu
@pytest.mark.parametrize("counts", EXPERT_COUNTS)
def test_expert_ffn_equal_and_uneven_experts(counts):
    check_expert_counts(counts)


def check_expert_counts(counts):
    """The strided-batched path (all experts equal) and the per-expert loop (empty experts)."""
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    E, R, d, f = len(counts), int(offsets[-1]), 33, 65
    xs = rng.standard_normal((R, d)).astype(np.float32)
    params = expert_weights(rng, E, d, f, d, np.float32)
    out, h = D.expert_ffn(xs, offsets, *params, "silu")
    got_out, got_h = cupy_backend.expert_ffn(_dev(xs), offsets, *map(_dev, params), "silu")
    assert_close(got_out, out, np.float32, "out")
    dout = rng.standard_normal(out.shape).astype(np.float32)
    for g, ref in zip(cupy_backend.expert_ffn_backward(_dev(dout), _dev(xs), got_h, offsets, _dev(params[0]),
                                                       _dev(params[2]), "silu"),
                      D.expert_ffn_backward(dout, xs, h, offsets, params[0], params[2], "silu")):
        assert_close(g, ref, np.float32)


def _layer_run(layer, x, u, device):
    """y, x.grad and every parameter gradient (host arrays) of L = Σ y ⊙ u with the layer on `device`."""
    import cupy

    layer.to(device)
    layer.zero_grad()
    xp = cupy if device == "cupy" else np
    xt = tm.Tensor(xp.asarray(x), requires_grad=True)
    y = layer(xt)
    (y * tm.Tensor(xp.asarray(u))).sum().backward()
    host = cupy.asnumpy
    return host(y.data), host(xt.grad), {n: host(p.grad) for n, p in layer.named_parameters() if p.grad is not None}


@needs_gpu
@given(gate=st.sampled_from(["top_k", "softmax", "expert_choice", "dselect_k"]), cf=st.none() | st.floats(0.1, 2.0),
       priority=st.sampled_from(["slot", "weight"]), T=st.integers(1, 64), E=st.integers(1, 16), k_frac=st.floats(0, 1),
       d=st.integers(1, 24), f=st.integers(1, 24), dtype=st.sampled_from([np.float32, np.float64]),
       activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_moe_layer_on_gpu_matches_numpy(gate, cf, priority, T, E, k_frac, d, f, dtype, activation, seed):
    """tm.nn.MoE moved to the GPU: output, x.grad and every parameter gradient equal the NumPy reference's."""
    k = 1 + int(k_frac * (E - 1))
    layer = tm.nn.MoE(d, f, E, gate=gate, k=k, capacity_factor=cf, priority=priority, activation=activation,
                      seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    x, u = (rng.standard_normal((T, d)).astype(dtype) for _ in range(2))
    with tm.use_backend("numpy"):
        ref = _layer_run(layer, x, u, "cpu")
    with tm.use_backend("cupy"):
        got = _layer_run(layer, x, u, "cupy")
    assert_close(got[0], ref[0], dtype, "y")
    assert_close(got[1], ref[1], dtype, "x.grad")
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_close(got[2][name], ref[2][name], dtype, name)


@needs_gpu
@given(routing=routings(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_two_runs_are_bitwise_equal(routing, dtype, seed):
    check_bitwise(routing, dtype, seed)


def check_bitwise(routing, dtype, seed):
    """Every primitive run twice on the same inputs: the same bits."""
    be = cupy_backend
    idx, keep, priority, E = routing
    T = idx.shape[0]
    rng = np.random.default_rng(seed)
    x = _dev(rng.standard_normal((T, 48)).astype(dtype))
    params = list(map(_dev, expert_weights(rng, E, 48, 96, 48, dtype)))
    weights = _dev(priority.astype(dtype))
    runs = (every_primitive(be, _dev(idx), _dev(keep), x, params, weights) for _ in range(2))
    for a, b in zip(*runs):
        a, b = (v.get() if hasattr(v, "get") else v for v in (a, b))
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _train_step(device, steps=2, dtype=np.float32):
    """Loss and parameters (host) after `steps` AdamW steps (forward, loss + aux, backward, clip) of a small model.

    AdamW's eps is 1e-4, not 1e-8: some gradients are exactly 0 in exact arithmetic (the attention keys' bias: the
    softmax over keys ignores a shift shared by every key) and only rounding noise in float32, ~1e-9, which Adam with
    eps 1e-8 turns into a step of ±lr, so two correct implementations that round differently (GPU and CPU) would
    differ by ~lr there. With eps 1e-4 such noise moves a weight by < 1e-7, while real gradients (~1e-3 after
    clipping) still take steps of ~lr: a gradient 10 % off is still caught (test_step_tolerance_holds_...)."""
    import tinymoe.functional as F
    from tinymoe.arrays import to_host

    cfg = tm.ModelConfig(vocab_size=12, max_seq_len=8, d_model=32, n_layers=2, n_heads=4, d_ff=64, num_experts=4,
                         k=2, moe_every=1, num_tasks=2, seed=3)
    model = tm.MoETransformer(cfg).to(dtype).to(device)
    if device == "cupy":
        import cupy as xp
    else:
        xp = np
    rng = np.random.default_rng(0)
    tokens, targets = (xp.asarray(rng.integers(0, 12, (6, 8))) for _ in range(2))
    task_ids = xp.asarray(rng.integers(0, 2, 6))
    opt = tm.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, eps=1e-4)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(tokens, task_ids=task_ids), targets) + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        tm.optim.clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.item()))
    return losses, {n: to_host(p.data) for n, p in model.named_parameters()}


def assert_same_step(got, want):
    """Two runs of _train_step agree within float32 rounding: losses to 1e-4 relative, weights to 1e-3 relative
    plus 1e-4 (a wrong gradient moves a weight by ~lr = 1e-2)."""
    (got_losses, got_params), (want_losses, want_params) = got, want
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-4)
    for name in want_params:
        np.testing.assert_allclose(got_params[name], want_params[name], rtol=1e-3, atol=1e-4, err_msg=name)


def test_step_tolerance_holds_between_float32_and_float64_and_catches_a_wrong_gradient(monkeypatch):
    """The GPU test's tolerance, checked without a GPU: a float32 run on the host differs from the float64 run (the
    exact answer, near enough) by less than it, as a float32 run on the GPU must; a run whose expert-bias gradient is
    10 % off does not (on every run, the clipping step scales that gradient)."""
    with tm.use_backend("numpy"):
        exact = _train_step("cpu", dtype=np.float64)
        exact = (exact[0], {name: p.astype(np.float32) for name, p in exact[1].items()})
        assert_same_step(_train_step("cpu"), exact)
        clip = tm.optim.clip_grad_norm

        def wrong(params, max_norm):
            for p in params:
                if p.grad is not None and p.shape == (4, 32):  # the experts' output biases b2 (E, d_model)
                    p.grad = p.grad * 0.9
            return clip(params, max_norm)

        monkeypatch.setattr(tm.optim, "clip_grad_norm", wrong)
        with pytest.raises(AssertionError):
            assert_same_step(_train_step("cpu"), exact)


@needs_gpu
def test_training_step_on_gpu_equals_cpu():
    with tm.use_backend("numpy"):
        cpu = _train_step("cpu")
    with tm.use_backend("cupy"):
        gpu = _train_step("cupy")
        again = _train_step("cupy")
    assert_same_step(gpu, cpu)
    for name in cpu[1]:
        assert gpu[1][name].tobytes() == again[1][name].tobytes(), f"{name}: two GPU runs differ"
    assert gpu[0] == again[0]
