"""`Module.to`: known devices and float dtypes only, dtype conversion kept through the forward pass (and the
backward), and float64 input into a float32 module cast with a warning, never silently."""
import importlib.util
import warnings

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.backends import BackendUnavailable
from tinymoe.model import ModelConfig, MoETransformer


def models():
    yield "Linear", tm.nn.Linear(8, 3), lambda m, x: m(x)
    yield "MoE", tm.nn.MoE(8, 16, 4, k=2), lambda m, x: m(x)
    yield "MultiGateMoE", tm.nn.MultiGateMoE(8, 4, 4, 2, gate="softmax"), lambda m, x: m(x)[0]
    yield "PLE", tm.nn.PLE(8, 4, 2), lambda m, x: m(x)[1]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float64, "float64"])
def test_to_float64_is_kept_through_forward_and_backward(backend, dtype):
    if backend not in tm.backends.available():
        pytest.skip(f"{backend} is not installed")
    x = np.random.default_rng(0).standard_normal((6, 8))  # float64
    with tm.use_backend(backend):
        for name, model, run in models():
            assert model.to(dtype) is model
            assert {p.dtype for p in model.parameters()} == {np.dtype(np.float64)}, name
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # float64 into a float64 model: nothing to warn about
                y = run(model, x)
            assert y.dtype == np.float64, name
            y.sum().backward()
            assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {np.dtype(np.float64)}, name
            model.to(np.float32)
            assert {p.dtype for p in model.parameters()} == {np.dtype(np.float32)}, name
            assert run(model, x.astype(np.float32)).dtype == np.float32, name


def test_float64_results_match_the_float32_model():
    x = np.random.default_rng(1).standard_normal((5, 8))
    model = tm.nn.MultiGateMoE(8, 4, 4, 2, gate="softmax", seed=3)
    y32 = model(x.astype(np.float32))[0].numpy()
    y64 = model.to(np.float64)(x)[0].numpy()
    np.testing.assert_allclose(y64, y32, rtol=1e-4, atol=1e-5)


def test_transformer_to_float64():
    cfg = ModelConfig(vocab_size=5, max_seq_len=4, d_model=8, n_heads=2, d_ff=8, num_experts=4, moe_every=1)
    model = MoETransformer(cfg).to(np.float64)
    with tm.use_backend("numpy"):
        assert model(np.zeros((2, 4), int)).dtype == np.float64


def test_float64_input_into_float32_module_is_cast_and_warns():
    model = tm.nn.Linear(8, 3)
    with pytest.warns(UserWarning, match=r"float64 input cast to the module's float32.*\.to\(np\.float64\)"):
        y = model(np.ones((2, 8)))
    assert y.dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model(np.ones((2, 8), np.float32)).dtype == np.float32  # float32 in: no warning
    model.to(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 into float64 widens exactly: no warning
        assert model(np.ones((2, 8), np.float32)).dtype == np.float64


def test_cast_input_keeps_the_gradient_path():
    model = tm.nn.Linear(3, 2).to(np.float64)
    x = tm.Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, np.broadcast_to(model.weight.numpy().sum(axis=1), (2, 3)), rtol=1e-6)


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "float16", np.int64, np.float16, 3, None])
def test_unknown_devices_and_dtypes_name_the_valid_ones(bad):
    model = tm.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"expected a device \('cpu', 'numpy', 'cuda', 'gpu', 'cupy'\) or a float "
                                         r"dtype \(np\.float32, np\.float64"):
        model.to(bad)
    assert model.weight.dtype == np.float32


@pytest.mark.parametrize("device", ["cpu", "numpy", "CPU", np])
def test_cpu_devices(device):
    model = tm.nn.Linear(3, 2)
    assert model.to(device) is model and isinstance(model.weight.data, np.ndarray)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
@pytest.mark.parametrize("device", ["cuda", "gpu", "cupy"])
def test_gpu_without_cupy_names_the_install_command(device):
    model = tm.nn.Linear(3, 2)
    with pytest.raises(BackendUnavailable, match=r"CuPy is not installed; pip install 'tinymoe\[cuda12\]'"):
        model.to(device)
    assert isinstance(model.weight.data, np.ndarray)  # nothing moved
