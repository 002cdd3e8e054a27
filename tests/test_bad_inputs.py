"""Bad input at the front door: configs, data files, checkpoints, the environment, the run folder, the disk.

Every case goes through `tinymoe.cli.main` and must end the same way: exit status 2, ONE line on stderr
("tinymoe COMMAND: error: ...") naming the problem (never "unexpected ...: a bug"), no traceback, and the run folder
exactly as it was (no folder at all for a new run). Values are drawn with hypothesis where a family of inputs fits.
Everything runs in-process on the NumPy backend with a tiny model.
"""
import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("safetensors")
import safetensors.numpy  # noqa: E402
from safetensors import safe_open  # noqa: E402

from tinymoe import checkpoint as ckpt  # noqa: E402
from tinymoe.cli import main  # noqa: E402
from tinymoe.config import tomllib  # noqa: E402
from tinymoe.config_docs import toml_value  # noqa: E402
from runconfigs import tiny_run_toml  # noqa: E402

TINY = tiny_run_toml("tiny", optim={"checkpoint_every": 3})

TABLE = """\
name = "table"
backend = "numpy"

[data]
kind = "table"
path = "{path}"
target_columns = ["y"]
task_type = "{task_type}"

[model]
num_experts = 2
d_expert = 4
d_hidden = 4
gate = "softmax"

[optim]
steps = 2
batch_size = 4
eval_every = 1
"""

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


# ---- helpers --------------------------------------------------------------------------------------------------------
def cli(*args, env=None):
    """(exit status, stderr) of `tinymoe ARGS` run in-process, with `env` added to the environment meanwhile."""
    err, out = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main([str(a) for a in args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, err.getvalue()


def assert_clean_error(code, err, command="train", *patterns):
    """Exit 2, one line "tinymoe COMMAND: error: ...", no traceback, not the catch-all for bugs."""
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tinymoe {command}: error: "), err
    assert "Traceback" not in err and "bug in tinymoe" not in err, err
    for pattern in patterns:
        assert pattern in err, (pattern, err)


def snapshot(folder):
    """{relative path: bytes} of everything under `folder` (None when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny):
    """A finished run folder (trained once); tests copy it before touching it."""
    run = tmp_path_factory.mktemp("runs") / "run"
    code, err = cli("train", "--config", tiny, "--run-dir", run, "--quiet")
    assert code == 0, err
    return run


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ---- configs --------------------------------------------------------------------------------------------------------
not_int_ge_1 = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=5), st.booleans())
not_probability = st.one_of(st.floats().filter(lambda v: not 0 <= v < 1), st.text(max_size=5))
not_positive_rate = st.one_of(st.floats().filter(lambda v: not (v > 0 and v != float("inf"))),
                              st.integers(max_value=0), st.integers(10**309, 10**400))  # the last: no float holds it
not_a_name = st.text(max_size=12)
BAD_VALUES = {
    **{f"model.{k}": not_int_ge_1 for k in ("d_model", "n_layers", "n_heads", "d_ff", "num_experts", "k")},
    **{f"data.{k}": not_int_ge_1 for k in ("n_per_task", "seq_len", "vocab_size")},
    **{f"optim.{k}": not_int_ge_1 for k in ("steps", "batch_size", "eval_every")},
    "model.num_shared_experts": st.integers(max_value=-1),
    "model.moe_every": st.integers(max_value=-1),
    "model.dropout": not_probability,
    "optim.momentum": not_probability,
    "optim.lr": not_positive_rate,
    "optim.grad_clip": not_positive_rate,
    "optim.weight_decay": st.floats().filter(lambda v: not (0 <= v < float("inf"))),
    "model.capacity_factor": not_positive_rate,
    "model.activation": not_a_name.filter(lambda s: s not in ("relu", "gelu", "silu")),
    "model.gate": not_a_name.filter(lambda s: s not in ("softmax", "top_k", "noisy_top_k", "dselect_k",
                                                        "expert_choice", "hash")),
    "optim.optimizer": not_a_name.filter(lambda s: s not in ("sgd", "adam", "adamw")),
    "optim.schedule": not_a_name.filter(lambda s: s not in ("cosine", "constant")),
    "data.kind": not_a_name.filter(lambda s: s not in ("sequence", "mmoe", "clustered", "digits", "table")),
    "backend": not_a_name.filter(lambda s: s not in ("auto", "numpy", "numba", "cupy")),
    "model.aux_weights": st.one_of(st.dictionaries(st.sampled_from(["load_balance", "z_loss"]),
                                                   st.floats().filter(lambda v: not 0 <= v < float("inf")),
                                                   min_size=1),
                                   st.just({"bogus": 1.0})),
    # valid one by one, but no machine has the memory for them: refused before anything is allocated
    "model.d_ff": st.integers(10**9, 10**600),
    "data.n_per_task": st.integers(10**10, 10**15),
}


@settings(SETTINGS, max_examples=80)  # cheap: every example fails before any data or weights exist
@given(key=st.sampled_from(sorted(BAD_VALUES)), data=st.data())
def test_bad_config_values(tiny, finished, key, data):
    value = data.draw(BAD_VALUES[key], label=key)
    if isinstance(value, dict):
        override = f"{key}={{{', '.join(f'{k} = {toml_value(v)}' for k, v in value.items())}}}"
    else:
        override = f"{key}={toml_value(value)}"
    with scratch() as d:
        code, err = cli("train", "--config", tiny, "--run-dir", d / "new", "--quiet", "--set", override)
        assert_clean_error(code, err)
        assert not (d / "new").exists()  # nothing written
        run = d / "run"
        shutil.copytree(finished, run)
        before = snapshot(run)
        code, err = cli("train", "--config", tiny, "--run-dir", run, "--quiet", "--resume", "--set", override)
        assert_clean_error(code, err)
        assert snapshot(run) == before


@SETTINGS
@given(content=st.binary(max_size=200))
def test_a_config_file_that_is_not_toml(tiny, content):
    try:
        assume(not isinstance(tomllib.loads(content.decode()), dict))  # a valid TOML table would be a config
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass
    with scratch() as d:
        (d / "bad.toml").write_bytes(content)
        code, err = cli("train", "--config", d / "bad.toml", "--run-dir", d / "new", "--quiet")
        assert_clean_error(code, err)
        assert not (d / "new").exists()


@SETTINGS
@given(top=st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5), st.none(),
                     st.booleans()))
def test_a_json_config_whose_top_level_is_not_a_table(top):
    with scratch() as d:
        (d / "c.json").write_text(json.dumps(top))
        code, err = cli("train", "--config", d / "c.json", "--run-dir", d / "new", "--quiet")
        assert_clean_error(code, err, "train", "top level must be a table")
        assert not (d / "new").exists()


def test_a_fifo_or_a_folder_as_config_file_does_not_hang(tmp_path):
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        code, err = cli("train", "--config", path, "--run-dir", tmp_path / "new", "--quiet")
        assert_clean_error(code, err, "train", "not a regular file")
    assert not (tmp_path / "new").exists()


# ---- data files -----------------------------------------------------------------------------------------------------
def table_config(d, path, task_type="regression"):
    cfg = d / "table.toml"
    cfg.write_text(TABLE.format(path=path, task_type=task_type))
    return cfg


def good_npz(path, n=40):
    rng = np.random.default_rng(0)
    np.savez(path, a=rng.standard_normal(n), b=rng.standard_normal(n), y=rng.integers(0, 3, n).astype(float))
    return path


@SETTINGS
@given(cut=st.floats(0, 0.999))
def test_a_truncated_npz(cut):
    with scratch() as d:
        data = good_npz(d / "t.npz").read_bytes()
        (d / "t.npz").write_bytes(data[: int(cut * len(data))])
        code, err = cli("train", "--config", table_config(d, d / "t.npz"), "--run-dir", d / "new", "--quiet")
        assert_clean_error(code, err, "train", "t.npz")
        assert not (d / "new").exists()


@SETTINGS
@given(cell=st.text(min_size=1, max_size=8).filter(lambda s: "," not in s and "\n" not in s and "\r" not in s
                                                   and '"' not in s))
def test_a_csv_cell_that_is_not_a_number(cell):
    try:
        float(cell.strip())
        assume(False)
    except ValueError:
        pass
    assume(cell.strip())
    with scratch() as d:
        rows = ["a,y"] + [f"{i},{i % 2}" for i in range(20)]
        rows[5] = f"4,{cell}"
        (d / "t.csv").write_text("\n".join(rows) + "\n")
        code, err = cli("train", "--config", table_config(d, d / "t.csv"), "--run-dir", d / "new", "--quiet")
        assert_clean_error(code, err, "train", "'y'")
        assert not (d / "new").exists()


@SETTINGS
@given(label=st.integers(1001, 10**15))
def test_a_huge_class_label(label):
    with scratch() as d:
        rows = ["a,y"] + [f"{i},{i % 2}" for i in range(30)] + [f"9,{label}"]
        (d / "t.csv").write_text("\n".join(rows) + "\n")
        code, err = cli("train", "--config", table_config(d, d / "t.csv", "classification"), "--run-dir",
                        d / "new", "--quiet")
        assert_clean_error(code, err, "train", "labels go up to")
        assert not (d / "new").exists()


@pytest.mark.parametrize("n", [1, 2, 5])
def test_a_table_too_small_to_split(tmp_path, n):
    rows = ["a,y"] + [f"{i},{i}" for i in range(n)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    code, err = cli("train", "--config", table_config(tmp_path, tmp_path / "t.csv"), "--run-dir", tmp_path / "new",
                    "--quiet")
    assert_clean_error(code, err, "train", "split")
    assert not (tmp_path / "new").exists()


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def same_file_content(a, b):
    """Whether two safetensors files hold the same tensors and metadata (a flipped byte may be insignificant)."""
    try:
        with safe_open(str(a), framework="np") as f, safe_open(str(b), framework="np") as g:
            return (f.metadata() == g.metadata() and set(f.keys()) == set(g.keys())
                    and all(np.array_equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys()))
    except Exception:
        return False


@SETTINGS
@given(where=st.floats(0, 0.9999), xor=st.integers(1, 255), truncate=st.booleans())
def test_a_damaged_checkpoint(finished, tiny, where, xor, truncate):
    with scratch() as d:
        run = d / "run"
        shutil.copytree(finished, run)
        path = run / "checkpoint.safetensors"
        data = bytearray(path.read_bytes())
        i = int(where * len(data))
        if truncate:
            data = data[:i]
        else:
            data[i] ^= xor
        path.write_bytes(bytes(data))
        before = snapshot(run)
        code, err = cli("eval", run)
        if code == 0:  # e.g. a space of the header's padding became a tab: the same JSON
            assert not truncate and same_file_content(path, finished / "checkpoint.safetensors")
            return
        assert_clean_error(code, err, "eval", "checkpoint.safetensors")
        code, err = cli("train", "--config", run / "config.json", "--run-dir", run, "--quiet", "--resume")
        assert_clean_error(code, err, "train", "checkpoint.safetensors")
        assert snapshot(run) == before


def resign_train_state(path, out, train_state):
    with safe_open(str(path), framework="np") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = f.metadata()
    m["train_state"] = json.dumps(train_state)
    m["sha256"] = ckpt._checksum(t, m)
    safetensors.numpy.save_file(t, str(out), metadata=m)


@SETTINGS
@given(key=st.sampled_from(["step", "epoch_order", "epoch_pos", "batch_rng", "loss_sum", "best", "has_best",
                            "evals_since_best", "loss_count", "(missing)", "(extra)"]),
       value=st.one_of(st.integers(-5, -1), st.text(max_size=3), st.none(), st.lists(st.integers(-2, 3), max_size=4),
                       st.floats(allow_nan=True).filter(lambda v: not np.isfinite(v)), st.just({"x": 1})))
def test_a_malformed_train_state_is_a_clean_error(finished, key, value):
    """The header passes its checksum (re-signed), but train_state is wrong: a CheckpointError, not a TypeError."""
    with safe_open(str(finished / "checkpoint.safetensors"), framework="np") as f:
        state = json.loads(f.metadata()["train_state"])
    if key == "(missing)":
        state.pop("epoch_pos")
    elif key == "(extra)":
        state["surprise"] = value
    else:
        assume(not (key == "best" and value is None))  # None is a valid best (no validation yet)
        assume(not (key in ("best", "loss_sum") and isinstance(value, int)))  # any finite number is a valid sum
        state[key] = value
    with scratch() as d:
        run = d / "run"
        shutil.copytree(finished, run)
        resign_train_state(finished / "checkpoint.safetensors", run / "checkpoint.safetensors", state)
        before = snapshot(run)
        code, err = cli("train", "--config", run / "config.json", "--run-dir", run, "--quiet", "--resume")
        assert_clean_error(code, err, "train", "train_state")
        assert snapshot(run) == before


def test_eval_refuses_the_checkpoint_of_another_run(finished, tiny, tmp_path):
    other = tmp_path / "other"
    code, err = cli("train", "--config", tiny, "--run-dir", other, "--quiet", "--set", "model.d_ff=16")
    assert code == 0, err
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.copy(other / "checkpoint.safetensors", run / "checkpoint.safetensors")
    code, err = cli("eval", run)
    assert_clean_error(code, err, "eval", "differs from the run's config.json in d_ff")


# ---- the environment ------------------------------------------------------------------------------------------------
@SETTINGS
@given(name=st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=10))
def test_a_bogus_tinymoe_backend_is_refused_before_training(tiny, finished, name):
    assume(name.strip() and name.strip() not in ("numpy", "numba"))
    with scratch() as d:
        code, err = cli("train", "--config", tiny, "--run-dir", d / "new", "--quiet", env={"TINYMOE_BACKEND": name})
        assert_clean_error(code, err, "train", "TINYMOE_BACKEND")
        assert not (d / "new").exists()
    code, err = cli("eval", finished, env={"TINYMOE_BACKEND": name})
    assert_clean_error(code, err, "eval", "TINYMOE_BACKEND")


def test_tinymoe_backend_numpy_is_honoured_by_an_auto_config(tiny, tmp_path):
    code, err = cli("train", "--config", tiny, "--run-dir", tmp_path / "r", "--quiet", "--set", "backend=auto",
                    env={"TINYMOE_BACKEND": "numpy"})
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "results.json").read_text())["backend"] == "numpy"


# ---- the run folder -------------------------------------------------------------------------------------------------
def test_a_folder_that_holds_a_run_needs_resume_or_overwrite(finished, tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    assert_clean_error(*cli("train", "--config", tiny, "--run-dir", run, "--quiet"), "train", "--overwrite")
    assert_clean_error(*cli("train", "--config", tiny, "--run-dir", run, "--quiet", "--resume", "--overwrite"))
    assert snapshot(run) == before
    (run / "metrics.jsonl").write_text('{"step": 99}\n')  # something --overwrite must remove
    code, err = cli("train", "--config", tiny, "--run-dir", run, "--quiet", "--overwrite")
    assert code == 0, err
    after = snapshot(run)
    assert sorted(after) == sorted({**before, ".lock": b""})  # nothing else kept ...
    assert after["results.json"] == before["results.json"]  # ... and the same run again (deterministic)
    assert [json.loads(line)["step"] for line in after["metrics.jsonl"].splitlines()] == [3, 6]


def test_a_locked_run_folder_is_refused(finished, tiny, tmp_path):
    from tinymoe.runs import RunLock

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    with RunLock(run):  # another run holds it
        assert_clean_error(*cli("train", "--config", tiny, "--run-dir", run, "--quiet", "--resume"), "train",
                           "in use by another tinymoe run")
    assert snapshot(run) == before
    code, err = cli("train", "--config", tiny, "--run-dir", run, "--quiet", "--resume")  # released: fine
    assert code == 0, err


def test_two_runs_into_the_same_folder_at_once(tiny, tmp_path):
    """Two real processes: one trains, the other gets the clear error (or, if it starts after, 'holds a run')."""
    import subprocess
    import sys

    slow = ["--set", "optim.steps=400", "--set", "optim.eval_every=50"]
    cmd = [sys.executable, "-m", "tinymoe.cli", "train", "--config", str(tiny), "--run-dir", str(tmp_path / "r"),
           "--quiet", *slow]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    import time

    deadline = time.monotonic() + 60
    while not (tmp_path / "r" / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = subprocess.run(cmd[:-len(slow)] + ["--resume"], capture_output=True, text=True, timeout=120)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    if second.returncode != 0:
        assert_clean_error(second.returncode, second.stderr, "train", "in use by another tinymoe run")


def test_stale_temp_files_are_removed(finished, tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for name in (".checkpoint.safetensors.123.abcd.tmp", ".results.json.9.ff.tmp", ".routes.png.7.tmp.png"):
        (run / name).write_bytes(b"half")
    code, err = cli("train", "--config", tiny, "--run-dir", run, "--quiet", "--resume")
    assert code == 0, err
    assert not [p for p in os.listdir(run) if ".tmp" in p]


def test_a_diverged_run_leaves_nothing_behind(tiny, tmp_path):
    code, err = cli("train", "--config", tiny, "--run-dir", tmp_path / "r", "--quiet", "--set", "optim.lr=1e30",
                    "--set", "optim.grad_clip=none", "--set", "optim.checkpoint_every=none")
    assert_clean_error(code, err, "train", "loss is")
    assert not (tmp_path / "r").exists()


def test_debug_shows_the_traceback(tiny, tmp_path):
    from tinymoe.config import ConfigError

    with pytest.raises(ConfigError):
        main(["train", "--config", str(tiny), "--run-dir", str(tmp_path / "r"), "--set", "model.d_ff=0", "--debug"])
    with pytest.raises(ConfigError):
        cli("train", "--config", tiny, "--run-dir", tmp_path / "r", "--set", "model.d_ff=0",
            env={"TINYMOE_DEBUG": "1"})


# ---- a full or read-only disk ----------------------------------------------------------------------------------------
def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(tiny, tmp_path, monkeypatch):
    """The second checkpoint write fails with ENOSPC half-way: one clean line that says how to resume, the first
    checkpoint intact, no temporary file; after --resume the run equals an uninterrupted one."""
    real_fdopen, calls = os.fdopen, {"n": 0}

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 3])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    real_write_atomic = ckpt.write_atomic

    def write_atomic(path, data):
        if path.endswith(".safetensors"):
            calls["n"] += 1
            if calls["n"] == 2:
                monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
        try:
            return real_write_atomic(path, data)
        finally:
            monkeypatch.setattr(os, "fdopen", real_fdopen)

    monkeypatch.setattr(ckpt, "write_atomic", write_atomic)
    run = tmp_path / "r"
    code, err = cli("train", "--config", tiny, "--run-dir", run, "--quiet")
    assert_clean_error(code, err, "train", "No space left on device", "--resume")
    assert ckpt.load_checkpoint(run / "checkpoint.safetensors").train_state["step"] == 3
    assert not [p for p in os.listdir(run) if ".tmp" in p]
    monkeypatch.setattr(ckpt, "write_atomic", real_write_atomic)
    code, err = cli("train", "--config", tiny, "--run-dir", run, "--quiet", "--resume")
    assert code == 0, err
    code, err = cli("train", "--config", tiny, "--run-dir", tmp_path / "ref", "--quiet")
    assert code == 0, err
    a = ckpt.load_checkpoint(run / "checkpoint.safetensors")
    b = ckpt.load_checkpoint(tmp_path / "ref" / "checkpoint.safetensors")
    for (name, x), (_, y) in zip(sorted(a.model.state_dict().items()), sorted(b.model.state_dict().items())):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_a_read_only_run_folder(finished, tiny, tmp_path, monkeypatch):
    """EROFS on every write into the folder (as root, chmod cannot simulate it): a clean line, nothing changed."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    code, err = cli("train", "--config", tiny, "--run-dir", run, "--quiet", "--resume", "--set", "optim.steps=9")
    assert_clean_error(code, err, "train", "Read-only file system")
    monkeypatch.setattr(os, "open", real_open)
    assert snapshot(run) == before


# ---- metrics.jsonl --------------------------------------------------------------------------------------------------
def test_metrics_are_cut_at_the_last_complete_record_never_rewritten(tmp_path):
    from tinymoe.train import _truncate_records_after

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "x": s}) + "\n" for s in (2, 4, 6)]
    path.write_text("".join(lines) + '{"step": 8, "x"')  # a kill during the last write
    inode = os.stat(path).st_ino
    _truncate_records_after(str(path), 6)
    assert path.read_text() == "".join(lines) and os.stat(path).st_ino == inode
    _truncate_records_after(str(path), 4)
    assert path.read_text() == "".join(lines[:2])
    _truncate_records_after(str(path), 0)
    assert path.read_text() == ""
