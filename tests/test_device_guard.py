"""The whole training step on a device, checked in CI without a GPU: `tinymoe.guarded` plays one.

A GuardedArray refuses what a CuPy array refuses (implicit conversion to NumPy, NumPy functions on it, mixing it
with host arrays) and counts every copy to or from the host. Because it computes with NumPy underneath, a step
on it must equal the plain NumPy step bit for bit. What is asserted, per model:

* the step runs at all on the device (no implicit host conversion anywhere: each would raise);
* it equals the CPU step bitwise (loss, every parameter after clipping and AdamW);
* the host sees at most SYNCS(model) small copies per step: one per MoE layer (its expert offsets, which the
  expert loop slices by), one per id range check (token ids, targets, and task ids where a router uses them),
  two for the global gradient norm (the second only when some gradient is exactly zero) — and nothing else,
  e.g. no boolean-mask selection, whose size would have to come back from a GPU;
* the only copies to the device are the batch's arrays, noisy top-k's host-drawn noise, and once per process
  a hash layer's table.
"""
import copy
import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe import data as D
from tinymoe import functional as F
from tinymoe.arrays import DeviceUnavailable, array_module
from tinymoe import dispatch
from tinymoe.checkpoint import load_checkpoint
from tinymoe.guarded import GuardedArray, count_transfers, xp
from tinymoe.model import ModelConfig, MoETransformer
from tinymoe.nn import CGC, PLE, MoE, MultiGateMoE
from tinymoe.optim import AdamW, clip_grad_norm
from tinymoe.train import OptimConfig, fit


@pytest.fixture(autouse=True)
def numpy_backend():
    with tm.use_backend("numpy"):  # the reference hot path, which must itself run on the device's module
        yield


# ---- the guard itself: it must fail where CuPy fails -------------------------------------------------------------
def test_the_guard_refuses_implicit_host_conversion():
    a = xp.asarray(np.arange(6.0).reshape(2, 3))
    host = np.ones((2, 3))
    refused = [lambda: np.asarray(a), lambda: np.array(a), lambda: np.exp(a), lambda: np.argsort(a),
               lambda: np.concatenate([a, a]), lambda: a + host, lambda: host + a, lambda: host * a,
               lambda: a[np.array([0, 1])], lambda: a.__setitem__(0, np.zeros(3)), lambda: float(a),
               lambda: xp.where(a > 0, host, a), lambda: xp.concatenate([a, [[1.0, 2.0, 3.0]]])]
    for i, fn in enumerate(refused):
        with pytest.raises(TypeError):
            fn()
            pytest.fail(f"case {i} was not refused")
    with pytest.raises(ValueError, match="ambiguous"):
        bool(a > 0)


def test_the_guard_allows_scalars_and_counts_explicit_transfers():
    a = xp.asarray(np.arange(4.0))  # an upload made outside the block below is not counted there
    with count_transfers() as moved:
        b = (a * 2 + np.float32(1) - 0.5) / 3  # Python and NumPy scalars are fine, as in CuPy
        assert isinstance(b, GuardedArray) and isinstance(xp.argsort(-b), GuardedArray)
        assert moved.to_host == 0 and moved.to_device == 0
        np.testing.assert_array_equal(b.get(), (np.arange(4.0) * 2 + 1 - 0.5) / 3)
        assert float(b.sum()) == float(((np.arange(4.0) * 2 + 0.5) / 3).sum())
        b[a > 1]  # a boolean mask: its result size would come from the device
        xp.asarray(np.zeros(2))
    assert (moved.to_host, moved.to_device) == (3, 1), moved


def test_array_module_finds_the_guards_module_through_its_hook():
    a = xp.zeros(3)
    assert array_module(a) is xp and array_module(np.zeros(3), a) is xp and array_module(np.zeros(3)) is np
    assert tm.Tensor(a).device == "guarded" and tm.Tensor(np.zeros(3)).device == "cpu"


def test_import_tinymoe_does_not_import_the_guard():
    code = "import sys, tinymoe; print('tinymoe.guarded' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- the device API ------------------------------------------------------------------------------------------------
def test_module_and_tensor_to_move_every_array_once():
    model = tm.nn.MoE(8, 16, 4, k=2, seed=0)
    host = {k: v.copy() for k, v in model.state_dict().items()}
    with count_transfers() as moved:
        assert model.to(xp) is model
    assert moved.to_device == len(host) and model.device == "guarded"
    assert all(isinstance(p.data, GuardedArray) for p in model.parameters())
    assert all(np.array_equal(host[k], v) for k, v in model.state_dict().items())  # state_dict: host arrays
    assert isinstance(next(iter(model.state_dict().values())), np.ndarray)
    assert model.to("cpu").device == "cpu" and isinstance(model.experts.w1.data, np.ndarray)


def test_a_model_on_the_device_deep_copies_and_stays_there():
    model = transformer("top_k", router="task").to(xp)
    twin = copy.deepcopy(model)
    assert twin.device == "guarded"
    tokens, tasks = xp.asarray(np.zeros((2, 6), np.int64)), xp.asarray(np.array([0, 1]))
    np.testing.assert_array_equal(model(tokens, task_ids=tasks).numpy(), twin(tokens, task_ids=tasks).numpy())


def test_tensor_to_is_differentiable_and_returns_gradients_home():
    x = tm.Tensor(np.arange(3.0), requires_grad=True)
    y = x.to(xp)
    assert y.device == "guarded" and x.to("cpu") is x
    (y * y).sum().backward()
    assert isinstance(x.grad, np.ndarray)
    np.testing.assert_array_equal(x.grad, 2 * np.arange(3.0))


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_unknown_or_missing_devices_fail_at_once_with_the_fix():
    x = tm.Tensor(np.ones(2))
    with pytest.raises(DeviceUnavailable, match=r"Tensor.to\('cuda'\): CuPy is not installed; pip install"):
        x.to("cuda")
    with pytest.raises(ValueError, match="expected a device"):
        x.to("tpu")
    data, cfg = seq_data_and_config()
    with pytest.raises(ValueError, match="fit: device='tpu' is not a device"):
        fit(MoETransformer(cfg), data, device="tpu")
    with pytest.raises(tm.backends.BackendUnavailable, match="CuPy is not installed"):
        fit(MoETransformer(cfg), data, device="cuda")


@pytest.mark.parametrize("op", ["add", "mul", "matmul", "concatenate", "where", "embedding", "cross_entropy",
                                "getitem", "model", "linear_bias", "layer_norm"])
def test_mixing_host_and_device_names_both_devices_and_the_fix(op):
    h, d = tm.Tensor(np.ones((2, 2))), tm.Tensor(xp.ones((2, 2)))
    cases = {"add": lambda: h + d, "mul": lambda: d * h, "matmul": lambda: h @ d,
             "concatenate": lambda: tm.concatenate([d, h]), "where": lambda: tm.where(np.ones((2, 2), bool), d, h),
             "embedding": lambda: F.embedding(np.array([0, 1]), d),
             "cross_entropy": lambda: F.cross_entropy(d, np.array([0, 1])),
             "getitem": lambda: d[np.array([0, 1])],
             "model": lambda: tm.nn.Linear(2, 3).to(xp)(np.ones((4, 2), np.float32)),
             "linear_bias": lambda: F.linear(d, d, np.ones(2)),
             "layer_norm": lambda: F.layer_norm(d, np.ones(2), np.zeros(2))}
    with pytest.raises(RuntimeError, match=r"different devices, (cpu and guarded|guarded and cpu).*\.to\('guarded'\)"):
        cases[op]()


def test_optimizer_state_follows_its_parameters_to_the_device_and_back():
    model = tm.nn.Linear(4, 3, seed=0)
    opt = AdamW(model.parameters(), lr=0.1)
    x = np.ones((2, 4), np.float32)
    model(x).sum().backward()
    opt.step()  # moments on the host
    model.to(xp)
    model(xp.asarray(x)).sum().backward()
    opt.step()  # the moments move once, then the update runs there
    assert all(isinstance(a, GuardedArray) for a in opt.state["exp_avg"])
    assert all(isinstance(v, np.ndarray) for k, v in opt.state_dict().items() if "." in k)  # saved from the host


@given(n=st.integers(1, 6), m=st.integers(0, 12), two=st.booleans(), seed=st.integers(0, 2**16))
def test_the_gradient_of_indexing_on_the_device_sums_repeats_as_on_the_host(n, m, two, seed):
    """Repeated, negative and missing ids (an embedding's adjoint): on a device summed by sorting and binary search
    with no sync (tinymoe.engine._scatter_add_rows), bit for bit the host's sums."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, 3, 2))
    index = (rng.integers(-n, n, m), rng.integers(-3, 3, m)) if two else rng.integers(-n, n, (m, 2))
    g = rng.standard_normal((m, 2) if two else (m, 2, 3, 2))
    grads = []
    for module in (np, xp):
        t = tm.Tensor(module.asarray(data), requires_grad=True)
        idx = tuple(module.asarray(i) for i in index) if two else module.asarray(index)
        with count_transfers() as moved:
            t[idx].backward(module.asarray(g))
        if module is xp:  # nothing is counted on the host
            assert moved.to_host == 0, moved
        grads.append(t.grad if module is np else t.grad.get())
    np.testing.assert_array_equal(grads[0], grads[1])


# ---- the hot path's reference, primitive by primitive, on drawn routings -----------------------------------------
@st.composite
def routings(draw):
    """(expert_idx (T, k), E, keep or None, capacity, priority or None, seed) including the edges: one token,
    k = E, all tokens on one expert, empty experts, nothing kept, capacity overflow, ties in the priority."""
    T, E = draw(st.integers(1, 9)), draw(st.integers(1, 6))
    k = draw(st.integers(1, E))
    pattern = draw(st.sampled_from(["random", "one expert", "k = E"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if pattern == "one expert":
        idx = np.zeros((T, 1), np.int64) if k == 1 else np.argsort(rng.random((T, E)), axis=1)[:, :k]
        idx[:, 0] = 0
    elif pattern == "k = E":
        k, idx = E, np.argsort(rng.random((T, E)), axis=1)
    else:
        idx = np.argsort(rng.random((T, E)), axis=1)[:, :k]
    keep = draw(st.sampled_from([None, "random", "none"]))
    keep = None if keep is None else (rng.random((T, k)) > 0.3 if keep == "random" else np.zeros((T, k), bool))
    priority = draw(st.sampled_from([None, "random", "ties"]))
    if priority is not None:
        priority = rng.random((T, k)).astype(np.float32) if priority == "random" else np.ones((T, k), np.float32)
    return idx.astype(np.int64), E, keep, draw(st.integers(0, T * k)), priority, rng


@given(routings(), st.sampled_from(["relu", "gelu", "silu"]))
def test_every_dispatch_primitive_on_the_device_equals_the_host_with_one_sync(case, activation):
    idx, E, keep, cap, priority, rng = case
    T, k = idx.shape
    d, f = 3, 4
    x, w = rng.standard_normal((T, d)).astype(np.float32), rng.random((T, k)).astype(np.float32)
    w1, b1 = rng.standard_normal((E, d, f)).astype(np.float32), rng.standard_normal((E, f)).astype(np.float32)
    w2, b2 = rng.standard_normal((E, f, d)).astype(np.float32), rng.standard_normal((E, d)).astype(np.float32)
    host = [idx, keep, priority, x, w, w1, b1, w2, b2]
    dev = [None if a is None else xp.asarray(a) for a in host]

    def run(idx, keep, priority, x, w, w1, b1, w2, b2):
        kept = dispatch.capacity_keep(idx, E, cap, priority, keep)
        order, offsets, inverse = dispatch.route(idx, E, kept)
        xs = dispatch.gather(x, order, k)
        out, h = dispatch.expert_ffn(xs, offsets, w1, b1, w2, b2, activation)
        y = dispatch.combine(out, w, inverse)
        dout, dw = dispatch.combine_backward(y, out, w, inverse)
        grads = dispatch.expert_ffn_backward(dout, xs, h, offsets, w1, w2, activation)
        dx = dispatch.gather_backward(grads[0], inverse, k, T)
        return [kept, order, offsets, inverse, xs, out, h, y, dout, dw, dx, *grads[1:]]

    want = run(*host)
    with count_transfers() as moved:
        got = run(*dev)
    note(f"transfers {moved}")
    assert (moved.to_host, moved.to_device) == (1, 0), moved  # the offsets, once
    assert isinstance(got[2], np.ndarray)  # (they are host ints by design)
    for name, a, b in zip("kept order offsets inverse xs out h y dout dw dx dw1 db1 dw2 db2".split(), want, got):
        np.testing.assert_array_equal(a, b if isinstance(b, np.ndarray) else b.get(), err_msg=name)
        assert isinstance(b, GuardedArray) or name == "offsets", name


# ---- a whole training step, every model family ---------------------------------------------------------------------
def transformer(gate, **kw):
    cfg = ModelConfig(vocab_size=11, max_seq_len=6, d_model=8, n_heads=2, d_ff=8, num_experts=4, k=2, moe_every=1,
                      n_layers=2, gate=gate, num_tasks=2, **kw)
    return MoETransformer(cfg)


SEQ_CASES = {
    "top_k": lambda: transformer("top_k"),
    "top_k capacity, weight priority": lambda: transformer("top_k", capacity_factor=0.5, priority="weight"),
    "noisy_top_k": lambda: transformer("noisy_top_k"),
    "dselect_k": lambda: transformer("dselect_k"),
    "expert_choice": lambda: transformer("expert_choice"),
    "hash": lambda: transformer("hash"),
    "softmax": lambda: transformer("softmax"),
    "dropout": lambda: transformer("top_k", dropout=0.1),
    "task router, shared expert, task head": lambda: transformer("top_k", router="task", num_shared_experts=1,
                                                                 head="per_task", task_embedding=True),
}
TAB_CASES = {
    "MultiGateMoE softmax": lambda: MultiGateMoE(6, 4, 4, 2, gate="softmax", seed=0),
    "MultiGateMoE top_k": lambda: MultiGateMoE(6, 4, 4, 2, gate="top_k", k=2, seed=0),
    "MultiGateMoE dselect_k per example": lambda: MultiGateMoE(6, 4, 5, 2, gate="dselect_k", k=2, per_example=True,
                                                               seed=0),
    "MultiGateMoE dselect_k static": lambda: MultiGateMoE(6, 4, 4, 2, gate="dselect_k", k=2, seed=0),
    "CGC": lambda: CGC(6, 4, 2, seed=0),
    "PLE": lambda: PLE(6, 4, 2, num_levels=2, seed=0),
}


def moe_layers(model):
    return getattr(model, "moe_layers", None) or []


def syncs(model):
    """The copies to the host one step may make (module docstring)."""
    layers = moe_layers(model)
    norm = 2
    if layers:  # the transformer: token ids, targets, the norm, each layer's offsets (+ its task ids' range)
        return 2 + norm + sum(1 + (m.router is not None and m.router.needs_tasks) for m in layers)
    if isinstance(model, MultiGateMoE):  # the shared experts' offsets, each task's targets, the norm
        return 1 + model.num_tasks + norm
    if isinstance(model, MoE):  # offsets, the target's range, the norm (+ the task ids' range)
        return 2 + norm + (model.router is not None and model.router.needs_tasks)
    return model.num_tasks + norm  # CGC / PLE: dense, no routing


def uploads(model):
    """The copies to the device one step makes besides its batch: noisy top-k's noise and dropout's masks, drawn
    on the host from the module's own Generator (so every device sees the same bits): one per noisy layer, three
    per transformer block with dropout (attention weights, attention output, FFN output)."""
    noisy = sum(isinstance(m, MoE) and m.config.gate == "noisy_top_k" for m in model.modules())
    return noisy + sum(3 for b in getattr(model, "blocks", []) if b.drop.p > 0)


def train_step(model, opt, inputs, target_fn):
    """forward, task loss + aux losses, backward, clipping, AdamW; returns the loss (a Tensor)."""
    loss = target_fn(model(*inputs[:-1], **inputs[-1]))
    aux = model.aux_loss() if hasattr(model, "aux_loss") else 0.0
    total = loss + aux
    opt.zero_grad()
    total.backward()
    clip_grad_norm(model.parameters(), 0.5)
    opt.step()
    return total


def compare_steps(make, inputs, target_fn, steps=2):
    """The same steps on the host and on the guarded device: bitwise equal; transfers counted on the device."""
    host, dev = make(), make().to(xp)
    opt_h, opt_d = AdamW(host.parameters(), lr=0.05), AdamW(dev.parameters(), lr=0.05)
    dev_inputs = [xp.asarray(a) if isinstance(a, np.ndarray) else a for a in inputs[:-1]]
    dev_inputs.append({k: xp.asarray(v) for k, v in inputs[-1].items()})
    hash_tables = sum(isinstance(m, MoE) and m.config.gate == "hash" for m in dev.modules())
    for step in range(steps):
        with count_transfers() as moved:
            loss_d = train_step(dev, opt_d, dev_inputs, lambda out: target_fn(out, xp))
        loss_h = train_step(host, opt_h, inputs, lambda out: target_fn(out, np))
        assert loss_d.device == "guarded"
        assert loss_h.item() == loss_d.item()
        for (name, p), q in zip(host.named_parameters(), dev.parameters()):
            assert isinstance(q.data, GuardedArray), name
            np.testing.assert_array_equal(p.data, q.data.get(), err_msg=name)
        # (the batch was moved before the step; a hash table is uploaded once, if no earlier test did it)
        assert uploads(dev) <= moved.to_device <= uploads(dev) + (hash_tables if step == 0 else 0), moved
        assert moved.to_host <= syncs(dev), moved
    return host, dev


@pytest.mark.parametrize("case", list(SEQ_CASES))
def test_transformer_step_on_the_device_equals_the_cpu_step(case):
    rng = np.random.default_rng(0)
    tokens, tasks, targets = rng.integers(0, 11, (3, 6)), rng.integers(0, 2, 3), rng.integers(0, 11, (3, 6))
    on = {np: targets, xp: xp.asarray(targets)}  # the targets on each device, moved before the step
    host, dev = compare_steps(SEQ_CASES[case], [tokens, {"task_ids": tasks}],
                              lambda logits, m: F.cross_entropy(logits, on[m]))
    stats_h, stats_d = host.moe_layers[0].last_routing, dev.moe_layers[0].last_routing
    for field in ("expert_idx", "weights", "keep", "chosen", "counts", "dropped"):
        np.testing.assert_array_equal(getattr(stats_h, field), getattr(stats_d, field), err_msg=field)


@pytest.mark.parametrize("case", list(TAB_CASES))
def test_multitask_step_on_the_device_equals_the_cpu_step(case):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((7, 6)).astype(np.float32), rng.integers(0, 1, (7, 2))  # the towers give one logit
    on = {np: y, xp: xp.asarray(y)}  # the targets on each device, moved before the step

    def loss(outputs, m):
        return sum(F.mse_loss(o.reshape(-1), tm.Tensor(on[m][:, t].astype(np.float32))) * 0.5 +
                   F.cross_entropy(o, on[m][:, t]) for t, o in enumerate(outputs))

    host, dev = compare_steps(TAB_CASES[case], [x, {}], loss)
    assert host.last_weights and len(host.last_weights) == len(dev.last_weights)
    for w_h, w_d in zip(host.last_weights, dev.last_weights):
        assert isinstance(w_d, np.ndarray)  # recorded on the device, copied when read
        np.testing.assert_array_equal(w_h, w_d)


@pytest.mark.parametrize("gate,kw", [("top_k", {}), ("top_k", {"capacity_factor": 0.6}), ("expert_choice", {}),
                                     ("dselect_k", {"num_experts": 5}), ("noisy_top_k", {"router": "add"})])
def test_the_standalone_moe_layer_step_on_the_device_equals_the_cpu_step(gate, kw):
    kw = {"num_experts": 4, "num_tasks": 2, **kw}
    rng = np.random.default_rng(2)
    x, t, target = rng.standard_normal((9, 8)).astype(np.float32), rng.integers(0, 2, 9), rng.integers(0, 8, 9)

    def make():
        return MoE(8, 16, gate=gate, k=2, seed=3, **kw)

    extra = {"task_ids": t} if kw.get("router") else {}
    on = {np: target, xp: xp.asarray(target)}
    compare_steps(make, [x, extra], lambda y, m: F.cross_entropy(y, on[m]))


@given(gate=st.sampled_from(["top_k", "noisy_top_k", "dselect_k", "expert_choice", "softmax", "hash"]),
       T=st.integers(1, 9), E=st.integers(1, 6), data=st.data())
def test_the_moe_layer_on_drawn_shapes_and_routings_equals_the_cpu_step(gate, T, E, data):
    k = data.draw(st.integers(1, E), label="k")
    capacity = data.draw(st.sampled_from([None, 0.3, 1.0, 2.0]), label="capacity_factor")
    priority = data.draw(st.sampled_from(["slot", "weight"]), label="priority")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x, target = rng.standard_normal((T, 8)).astype(np.float32), rng.integers(0, 8, T)
    extra = {"token_ids": rng.integers(0, 50, T)} if gate == "hash" else {}

    def make():
        return MoE(8, 16, E, gate=gate, k=k, capacity_factor=capacity, priority=priority, seed=3)

    on = {np: target, xp: xp.asarray(target)}
    compare_steps(make, [x, extra], lambda y, m: F.cross_entropy(y, on[m]), steps=1)


# ---- checkpoints and fit ---------------------------------------------------------------------------------------------
def test_a_checkpoint_saved_on_the_device_holds_host_arrays_and_loads_on_the_cpu_and_back(tmp_path):
    rng = np.random.default_rng(0)
    tokens, tasks, targets = rng.integers(0, 11, (3, 6)), rng.integers(0, 2, 3), rng.integers(0, 11, (3, 6))
    model = transformer("top_k").to(xp)
    opt = AdamW(model.parameters(), lr=0.05)
    train_step(model, opt, [xp.asarray(tokens), {"task_ids": xp.asarray(tasks)}],
               lambda logits: F.cross_entropy(logits, xp.asarray(targets)))
    path = tm.save(tmp_path / "m.safetensors", model, optimizer=opt)
    ck = load_checkpoint(path)  # a CPU-only load: the file holds host arrays
    assert ck.model.device == "cpu"
    for (name, p), q in zip(model.named_parameters(), ck.model.parameters()):
        np.testing.assert_array_equal(p.data.get(), q.data, err_msg=name)
    back = ck.model.to(xp)
    opt2 = AdamW(back.parameters(), lr=0.05)
    opt2.load_state_dict(ck.optimizer_state)  # the moments go to the parameters' device
    assert all(isinstance(a, GuardedArray) for a in opt2.state["exp_avg"])
    for a, b in zip(opt.state["exp_avg_sq"], opt2.state["exp_avg_sq"]):
        np.testing.assert_array_equal(a.get(), b.get())
    logits = back(xp.asarray(tokens), task_ids=xp.asarray(tasks))
    np.testing.assert_array_equal(logits.numpy(), model(xp.asarray(tokens), task_ids=xp.asarray(tasks)).numpy())


def seq_data_and_config():
    data = D.sequence_tasks([("copy",), ("reverse",)], 16, seq_len=6, vocab_size=8, seed=0)
    cfg = ModelConfig(vocab_size=8, max_seq_len=6, d_model=8, n_heads=2, d_ff=8, num_experts=4, k=2, moe_every=1,
                      n_layers=2, num_tasks=2)
    return data, cfg


def test_fit_on_the_device_equals_the_cpu_run_and_its_checkpoint_resumes_on_the_cpu(tmp_path):
    data, cfg = seq_data_and_config()
    optim = OptimConfig(steps=6, batch_size=8, eval_every=3, warmup_steps=2, checkpoint_every=3)
    host = MoETransformer(cfg)
    hist_h = fit(host, data, data, optim, run_dir=tmp_path / "cpu")
    dev = MoETransformer(cfg)
    hist_d = fit(dev, data, data, optim, run_dir=tmp_path / "dev", device=xp)
    assert dev.device == "guarded"  # moved once, and it stays there
    for r_h, r_d in zip(hist_h, hist_d, strict=True):
        for key in ("train_loss", "grad_norm", "val", "expert_load", "dropped", "aux"):
            assert r_h[key] == r_d[key], key
    for (name, p), q in zip(host.named_parameters(), dev.parameters()):
        np.testing.assert_array_equal(p.data, q.data.get(), err_msg=name)
    # the device run's checkpoint resumes on the CPU exactly as the CPU run's checkpoint does
    longer = OptimConfig(steps=8, batch_size=8, eval_every=3, warmup_steps=2, checkpoint_every=3)
    shutil.copytree(tmp_path / "cpu", tmp_path / "cpu_copy")  # for the resume on the device below
    from_dev, from_cpu = MoETransformer(cfg), MoETransformer(cfg)
    tail_dev = fit(from_dev, data, data, longer, run_dir=tmp_path / "dev", resume=True)
    tail_cpu = fit(from_cpu, data, data, longer, run_dir=tmp_path / "cpu", resume=True)
    assert from_dev.device == "cpu" and len(tail_dev) == len(tail_cpu) > 0
    for r_dev, r_cpu in zip(tail_dev, tail_cpu):
        assert r_dev["train_loss"] == r_cpu["train_loss"] and r_dev["val"] == r_cpu["val"]
    # and a CPU run's checkpoint resumes on the device (weights and moments go up once)
    on_dev = MoETransformer(cfg)
    tail_up = fit(on_dev, data, data, longer, run_dir=tmp_path / "cpu_copy", resume=True, device=xp)
    assert on_dev.device == "guarded"
    assert [r["train_loss"] for r in tail_up] == [r["train_loss"] for r in tail_dev]
    for (name, p), q in zip(from_cpu.named_parameters(), on_dev.parameters()):
        np.testing.assert_array_equal(p.data, q.data.get(), err_msg=name)
    for (name, p), q in zip(from_cpu.named_parameters(), from_dev.parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)


def test_fit_on_the_device_moves_each_batch_once_and_syncs_a_few_numbers_per_step():
    data, cfg = seq_data_and_config()
    steps = 4
    model = MoETransformer(cfg)
    n_params = len(model.parameters())
    with count_transfers() as moved:
        fit(model, data, None, OptimConfig(steps=steps, batch_size=8, eval_every=steps, warmup_steps=1), device=xp)
    assert moved.to_device == n_params + 3 * steps, moved  # the model once; tokens, task ids, targets per step
    # per step: the step's own (see syncs) and the two losses in one copy; at the one logged record: each aux
    # loss's value and each layer's dropped count
    record = len(model.aux_losses) + len(model.moe_layers)
    assert moved.to_host <= steps * (syncs(model) + 1) + record, moved
