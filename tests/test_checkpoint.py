"""Checkpoints (tinymoe.checkpoint): exact round trips of models, optimizer state and the loop's train_state; atomic
writes; clear CheckpointErrors for missing, corrupt, foreign or mismatched files; no pickle anywhere on load."""
import json
import os
import pickle

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import tinymoe as tm
from tinymoe import checkpoint as ckpt
from tinymoe.checkpoint import CheckpointError

SMALL = dict(vocab_size=12, max_seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=4, k=2,
             num_tasks=2, moe_every=1, router="add", task_embedding=True, seed=3)


def transformer(**overrides):
    return tm.MoETransformer(tm.ModelConfig(**{**SMALL, **overrides}))


def tokens_and_tasks(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, SMALL["vocab_size"], (3, 6)), rng.integers(0, SMALL["num_tasks"], 3)


def perturb(model, seed=1):
    """Move every weight away from its seeded init, so a rebuilt-but-not-loaded model would differ."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data = p.data + rng.normal(0, 0.1, p.shape).astype(p.dtype)


def train_steps(model, opt, n=3):
    tokens, tasks = tokens_and_tasks()
    for _ in range(n):
        opt.zero_grad()
        loss = (model(tokens, tasks) ** 2).mean() + model.aux_loss()
        loss.backward()
        opt.step()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


@pytest.fixture
def saved(tmp_path):
    """A saved transformer (path, model)."""
    model = transformer()
    perturb(model)
    path = tmp_path / "ck.safetensors"
    ckpt.save(path, model)
    return path, model


def rewrite(path, out, tensors=None, metadata=None, resign=True):
    """Copy a checkpoint with some tensors / metadata entries replaced (a crafted file). resign: recompute the
    header's sha256, as a deliberate forger would, so the checks behind the checksum are what gets tested."""
    with safe_open(str(path), framework="np") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = f.metadata()
    t.update(tensors or {})
    m.update(metadata or {})
    if resign and "sha256" not in (metadata or {}):
        m["sha256"] = ckpt._checksum(t, m)
    safetensors.numpy.save_file(t, str(out), metadata=m)
    return out


# ---------------------------------------------------------------------------------------------------- round trips
def test_transformer_round_trip_same_outputs(saved):
    path, model = saved
    loaded = ckpt.load(path)
    assert type(loaded) is tm.MoETransformer and loaded.config == model.config
    assert_same_weights(model, loaded)
    tokens, tasks = tokens_and_tasks()
    model.eval(), loaded.eval()
    np.testing.assert_array_equal(model(tokens, tasks).numpy(), loaded(tokens, tasks).numpy())


def test_file_is_plain_safetensors_with_documented_layout(saved):
    path, model = saved
    with safe_open(str(path), framework="np") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == {f"model.{n}" for n in model.state_dict()}
    assert meta["format"] == ckpt.FORMAT_NAME and meta["format_version"] == str(ckpt.FORMAT_VERSION)
    header = json.loads(meta["model"])
    assert header["class"] == "tinymoe.MoETransformer" and header["config"]["d_model"] == 16
    assert json.loads(meta["optimizer"]) is None and json.loads(meta["train_state"]) is None
    assert ckpt.read_header(path)["model"]["config"] == header["config"]


@pytest.mark.parametrize("gate,per_example", [("dselect_k", False), ("dselect_k", True), ("top_k", False)])
def test_multigate_round_trip(tmp_path, gate, per_example):
    model = tm.nn.MultiGateMoE(d_in=5, d_expert=6, num_experts=4, num_tasks=3, gate=gate, k=2,
                               per_example=per_example, seed=7)
    perturb(model)
    ckpt.save(tmp_path / "mg.safetensors", model)
    loaded = ckpt.load(tmp_path / "mg.safetensors")
    assert type(loaded) is tm.nn.MultiGateMoE and loaded.config == model.config
    assert_same_weights(model, loaded)
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    model.eval(), loaded.eval()
    for a, b in zip(model(x), loaded(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("gate", ["top_k", "noisy_top_k", "dselect_k"])
def test_moe_round_trip_float64(tmp_path, gate):
    model = tm.nn.MoE(d_model=6, d_ff=8, num_experts=4, gate=gate, k=2, router="concat", num_tasks=2, seed=5,
                      dtype=np.float64)
    perturb(model)
    x, tasks = np.random.default_rng(0).normal(size=(2, 5, 6)), np.array([0, 1])
    model(x, tasks)  # advances noisy top-k's generator past its seeded start
    ckpt.save(tmp_path / "moe.safetensors", model)
    loaded = ckpt.load(tmp_path / "moe.safetensors")
    assert all(p.dtype == np.float64 for p in loaded.parameters())
    assert_same_weights(model, loaded)
    # training mode on purpose: noisy top-k draws from the layer's own generator, whose state is restored too
    np.testing.assert_array_equal(model(x, tasks).numpy(), loaded(x, tasks).numpy())


def test_shared_bottom_round_trip(tmp_path):
    from tinymoe.nn import SharedBottom

    model = SharedBottom(d_in=4, d_out=6, num_tasks=2, seed=1, dtype=np.float64)
    perturb(model)
    loaded = ckpt.load(ckpt.save(tmp_path / "sb.safetensors", model))
    assert type(loaded) is SharedBottom
    assert_same_weights(model, loaded)


def test_float64_weights_kept_when_the_config_builds_float32(tmp_path):
    model = transformer()
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    loaded = ckpt.load(ckpt.save(tmp_path / "f64.safetensors", model))
    assert {p.dtype for p in loaded.parameters()} == {np.dtype(np.float64)}
    assert_same_weights(model, loaded)


# ------------------------------------------------------------------------------------- optimizer and train_state
@pytest.mark.parametrize("opt_cls,kwargs", [(tm.optim.Adam, dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7)),
                                            (tm.optim.AdamW, dict(lr=2e-3, weight_decay=0.05)),
                                            (tm.optim.SGD, dict(lr=0.05, momentum=0.9))])
def test_optimizer_resume_is_exact(tmp_path, opt_cls, kwargs):
    model = transformer()
    opt = opt_cls(model.parameters(), **kwargs)
    train_steps(model, opt)
    ckpt.save(tmp_path / "o.safetensors", model, opt)

    ck = ckpt.load_checkpoint(tmp_path / "o.safetensors")
    assert ck.optimizer_class == f"tinymoe.optim.{opt_cls.__name__}"
    saved_state = opt.state_dict()
    assert ck.optimizer_state.keys() == saved_state.keys()
    assert ck.optimizer_state["step"] == 3 and ck.optimizer_state["lr"] == kwargs["lr"]
    for key, value in saved_state.items():
        np.testing.assert_array_equal(ck.optimizer_state[key], value, err_msg=key)

    opt2 = ck.make_optimizer()
    assert type(opt2) is opt_cls
    for name in kwargs:
        assert getattr(opt2, name) == getattr(opt, name), name
    # continuing both runs gives identical weights
    train_steps(model, opt, 2)
    train_steps(ck.model, opt2, 2)
    assert_same_weights(model, ck.model)


def test_optimizer_state_plugs_into_a_hand_built_optimizer(tmp_path):
    model = transformer()
    opt = tm.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, 2)
    ck = ckpt.load_checkpoint(ckpt.save(tmp_path / "o.safetensors", model, opt))
    opt2 = tm.optim.Adam(ck.model.parameters(), lr=1.0)
    opt2.load_state_dict(ck.optimizer_state)
    assert opt2.step_count == 2 and opt2.lr == 1e-2
    for m1, m2 in zip(opt.state["exp_avg"], opt2.state["exp_avg"]):
        np.testing.assert_array_equal(m1, m2)


def test_extra_tensors_and_loading_into_an_existing_model(tmp_path):
    model = transformer()
    perturb(model)
    best = {f"best.{k}": v * 2 for k, v in model.state_dict().items()}
    path = ckpt.save(tmp_path / "e.safetensors", model, extra_tensors=best)

    target = transformer()  # the model a training loop already built
    ck = ckpt.load_checkpoint(path, model=target)
    assert ck.model is target
    assert_same_weights(model, target)
    assert ck.extra_tensors.keys() == best.keys()
    for k in best:
        np.testing.assert_array_equal(ck.extra_tensors[k], best[k])

    with pytest.raises(CheckpointError, match="holds a tinymoe.MoETransformer, not a MoE"):
        ckpt.load_checkpoint(path, model=tm.nn.MoE(16, 32, 4))
    with pytest.raises(CheckpointError, match="weights do not match.*wrong shape"):
        ckpt.load_checkpoint(path, model=transformer(d_ff=24))


def test_train_state_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(12345)
    rng.random(10)  # advance the stream
    mt = np.random.Generator(np.random.MT19937(7))  # its state holds a uint32 array
    train_state = {"step": 41, "best_val": float("inf"), "lr_history": [1e-3, 0.1 + 0.2], "nan": float("nan"),
                   "rng": rng.bit_generator.state, "mt": mt.bit_generator.state, "pair": (1, "a"),
                   "by_epoch": {0: 1.5, 1: np.float32(0.25)}, "big": 2**100 + 1,
                   "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
                   "__tinymoe__": "a user key that looks like our tag"}
    ck = ckpt.load_checkpoint(ckpt.save(tmp_path / "t.safetensors", transformer(), train_state=train_state))
    ts = ck.train_state
    assert ts["rng"] == rng.bit_generator.state
    assert ts["step"] == 41 and ts["best_val"] == float("inf") and np.isnan(ts["nan"])
    assert ts["lr_history"] == [1e-3, 0.1 + 0.2] and ts["pair"] == (1, "a") and ts["big"] == 2**100 + 1
    assert ts["by_epoch"] == {0: 1.5, 1: 0.25} and ts["__tinymoe__"] == train_state["__tinymoe__"]
    assert ts["arr"].dtype == np.int16
    np.testing.assert_array_equal(ts["arr"], train_state["arr"])

    restored = np.random.default_rng()
    restored.bit_generator.state = ts["rng"]
    np.testing.assert_array_equal(restored.random(5), rng.random(5))
    restored_mt = np.random.Generator(np.random.MT19937())
    restored_mt.bit_generator.state = ts["mt"]
    np.testing.assert_array_equal(restored_mt.integers(0, 2**62, 5), mt.integers(0, 2**62, 5))


def test_unstorable_train_state_is_rejected_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match=r"train_state\['rng'\].*Generator.*bit_generator.state"):
        ckpt.save(tmp_path / "t.safetensors", transformer(), train_state={"rng": np.random.default_rng(0)})
    assert os.listdir(tmp_path) == []


def test_unregistered_model_is_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="register_model"):
        ckpt.save(tmp_path / "l.safetensors", tm.nn.Linear(3, 4))


# ------------------------------------------------------------------------------------------------------ atomicity
@pytest.mark.parametrize("victim", ["fsync", "replace"])
def test_failed_write_keeps_the_old_checkpoint_and_leaves_no_temp_file(saved, monkeypatch, victim):
    path, model = saved
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.os, victim, boom)
    other = transformer(seed=99)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save(path, other)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]
    assert_same_weights(model, ckpt.load(path))


def test_save_creates_missing_directories_and_overwrites(tmp_path):
    path = tmp_path / "a" / "b" / "ck.safetensors"
    ckpt.save(path, transformer(seed=1))
    second = transformer(seed=2)
    ckpt.save(str(path), second)
    assert_same_weights(second, ckpt.load(path))
    assert os.listdir(path.parent) == ["ck.safetensors"]


# --------------------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such checkpoint file"):
        ckpt.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", [1, 7, 100, -10])
def test_truncated_file(saved, tmp_path, cut):
    path, _ = saved
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CheckpointError, match=r"bad.safetensors: not a readable safetensors file.*truncated"):
        ckpt.load(bad)


def test_garbage_and_empty_files(tmp_path):
    for name, data in [("garbage.safetensors", np.random.default_rng(0).bytes(500)), ("empty.safetensors", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{name}: not a readable safetensors file"):
            ckpt.load(tmp_path / name)


def test_flipped_data_byte_fails_the_checksum(saved, tmp_path):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flip.safetensors: the file does not match the checksum"):
        ckpt.load(bad)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.numpy.save_file({"weight": np.ones((2, 2), np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="other.safetensors: not a tinymoe checkpoint.*load_state_dict"):
        ckpt.load(path)
    safetensors.numpy.save_file({"weight": np.ones(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a tinymoe checkpoint"):
        ckpt.load(path)


def test_unknown_model_class(saved, tmp_path):
    path, _ = saved
    header = ckpt.read_header(path)["model"]
    bad = rewrite(path, tmp_path / "u.safetensors", metadata={"model": json.dumps({**header, "class": "my.Model"})})
    with pytest.raises(CheckpointError, match="unknown model class 'my.Model'.*register_model"):
        ckpt.load(bad)


def test_config_that_no_longer_validates(saved, tmp_path):
    path, _ = saved
    header = ckpt.read_header(path)["model"]
    for change, pattern in [({"n_heads": 3}, "divisible"), ({"removed_field": 1}, "removed_field")]:
        model_meta = json.dumps({**header, "config": {**header["config"], **change}})
        bad = rewrite(path, tmp_path / "c.safetensors", metadata={"model": model_meta})
        with pytest.raises(CheckpointError, match=f"c.safetensors: the saved config no longer validates.*{pattern}"):
            ckpt.load(bad)


def test_weights_that_do_not_match_the_rebuilt_model(saved, tmp_path):
    path, _ = saved
    header = ckpt.read_header(path)["model"]
    # the config now builds a wider FFN than the saved weights (e.g. a changed default)
    model_meta = json.dumps({**header, "config": {**header["config"], "d_ff": 48}})
    bad = rewrite(path, tmp_path / "s.safetensors", metadata={"model": model_meta})
    with pytest.raises(CheckpointError, match=r"s.safetensors: the saved weights do not match.*wrong shape.*"
                                              r"\(4, 16, 32\) \(expected \(4, 16, 48\)\).*read_header"):
        ckpt.load(bad)
    # one more layer: missing weights
    model_meta = json.dumps({**header, "config": {**header["config"], "n_layers": 3}})
    bad = rewrite(path, tmp_path / "m.safetensors", metadata={"model": model_meta})
    with pytest.raises(CheckpointError, match="missing blocks.2"):
        ckpt.load(bad)


def test_corrupt_header_json(saved, tmp_path):
    path, _ = saved
    bad = rewrite(path, tmp_path / "h.safetensors", metadata={"train_state": "{not json"})
    with pytest.raises(CheckpointError, match="'train_state' entry of the header is missing or not JSON"):
        ckpt.load(bad)


def test_newer_format_version(saved, tmp_path):
    path, _ = saved
    bad = rewrite(path, tmp_path / "v.safetensors", metadata={"format_version": "99"})
    with pytest.raises(CheckpointError, match="newer than this tinymoe reads.*upgrade"):
        ckpt.load(bad)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# -------------------------------------------------------------------------------------------------------- no pickle
def test_load_never_unpickles(tmp_path, monkeypatch):
    model = transformer()
    opt = tm.optim.Adam(model.parameters())
    train_steps(model, opt, 1)
    path = ckpt.save(tmp_path / "p.safetensors", model, opt, {"rng": np.random.default_rng(1).bit_generator.state})

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    ck = ckpt.load_checkpoint(path)
    ck.make_optimizer()
    assert_same_weights(model, ck.model)


# ------------------------------------------------------------------------------------- the header, sizes, odd files
def test_the_checksum_covers_the_header(tmp_path):
    """Editing a header entry ("step": 4 -> 2) without re-signing is caught: it would resume at the wrong step."""
    model = transformer()
    path = ckpt.save(tmp_path / "h.safetensors", model, train_state={"step": 4})
    for key, value in [("train_state", '{"step":2}'), ("tinymoe_version", "9.9"), ("optimizer", "null ")]:
        bad = rewrite(path, tmp_path / f"{key}.safetensors", metadata={key: value}, resign=False)
        with pytest.raises(CheckpointError, match="does not match the checksum.*edited"):
            ckpt.load_checkpoint(bad)
    assert ckpt.load_checkpoint(path).train_state == {"step": 4}


def test_format_1_files_still_load(saved, tmp_path):
    """Format 1 (a digest of the tensors only) is still read; its tensors are still checked."""
    path, model = saved
    with safe_open(str(path), framework="np") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = f.metadata()
    old = tmp_path / "v1.safetensors"
    safetensors.numpy.save_file(t, str(old), metadata={**m, "format_version": "1", "sha256": ckpt._checksum(t)})
    assert_same_weights(model, ckpt.load(old))
    name = next(iter(t))
    flipped = {**t, name: t[name] + 1}
    bad = tmp_path / "v1bad.safetensors"
    safetensors.numpy.save_file(flipped, str(bad), metadata={**m, "format_version": "1", "sha256": ckpt._checksum(t)})
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.load(bad)


@pytest.mark.parametrize("change", [{"d_model": 10**9}, {"d_ff": 10**8, "d_model": 10**4}, {"vocab_size": 10**10},
                                    {"num_experts": 10**7}])
def test_a_header_asking_for_a_huge_model_is_refused_before_allocating(saved, tmp_path, change):
    """A small file whose (re-signed) header asks for a huge model: a CheckpointError, not a MemoryError."""
    path, _ = saved
    header = ckpt.read_header(path)["model"]
    bad = rewrite(path, tmp_path / "big.safetensors",
                  metadata={"model": json.dumps({**header, "config": {**header["config"], **change}})})
    with pytest.raises(CheckpointError, match="asks for .* parameters but the file holds"):
        ckpt.load(bad)


@pytest.mark.parametrize("name, model", [("moe", lambda: tm.nn.MoE(6, 8, 4, k=2, num_shared_experts=1)),
                                         ("mg", lambda: tm.nn.MultiGateMoE(5, 4, 3, 2, gate="dselect_k", k=2)),
                                         ("mgp", lambda: tm.nn.MultiGateMoE(5, 4, 3, 2, gate="top_k", k=2,
                                                                            per_example=True, d_hidden=7)),
                                         ("cgc", lambda: tm.nn.CGC(5, 4, 3, num_task_experts=2, num_shared_experts=1,
                                                                   d_hidden=6, out_dim=2)),
                                         ("ple", lambda: tm.nn.PLE(5, 4, 2, num_task_experts=1, num_shared_experts=2,
                                                                   num_levels=3, tower_hidden=5))])
def test_parameter_counts_match_the_models(name, model):
    """The counts that bound a rebuild are not below what the constructors really build (else a good file fails)."""
    m = model()
    spec = ckpt.MODELS[ckpt._model_name(m)]
    assert spec.num_parameters(spec.get_config(m)) == m.num_parameters()


def test_only_regular_files_are_opened(tmp_path):
    """A FIFO would block forever in open(); a folder is no checkpoint either."""
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        ckpt.load(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        ckpt.load(tmp_path)


@pytest.mark.parametrize("gate", ["top_k", "noisy_top_k", "dselect_k", "hash", "softmax"])
@pytest.mark.parametrize("router, head", [("token", "shared"), ("token", "per_task"), ("add", "shared"),
                                          ("concat", "per_task")])
def test_transformer_parameter_count(gate, router, head):
    """Exact for token routers, never above the real count otherwise (it bounds what a rebuild may allocate)."""
    c = tm.ModelConfig(**{**SMALL, "num_experts": 5, "gate": gate, "router": router, "head": head,
                          "num_shared_experts": 1})
    real = tm.MoETransformer(c).num_parameters()
    count = ckpt.transformer_parameters(c)
    assert count == real if router == "token" else count <= real
