"""SIGKILL a training run again and again, resume it each time, and get exactly the uninterrupted run.

Kills land at random moments of the run and, on purpose, inside the writes that matter: half-way through the
checkpoint's bytes, between its fsync and its rename, and half-way through a metrics.jsonl line. After every kill
`tinymoe train --resume` continues the run. At the end the checkpoint (weights, optimizer moments, best weights,
train_state), metrics.jsonl (every record, minus its wall-clock "seconds") and results.json must equal those of
one uninterrupted run bit for bit, and no temporary file may be left behind.

The child processes run a wrapper that installs the kill points, then calls `tinymoe.cli.main`: the code under test
is the real one. Tiny model, NumPy backend: about half a minute on 2 cores.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from runconfigs import tiny_run_toml  # noqa: E402

CONFIG = tiny_run_toml("kill", data={"n_per_task": 40, "seq_len": 5, "vocab_size": 6}, model={"dropout": 0.1},
                       optim={"steps": 120, "warmup_steps": 2, "eval_every": 2, "checkpoint_every": 2, "patience": 1000})

# The child: `python wrapper.py MODE N RUN_DIR CONFIG [--resume]`. MODE names where it SIGKILLs itself, on the Nth
# such write: "ckpt_data" (half of a checkpoint's bytes written), "ckpt_rename" (after the fsync, before the
# rename), "metrics" (half of a metrics line written); "none" runs to the end (or until the parent kills it).
WRAPPER = r'''
import os, signal, sys
import tinymoe.checkpoint as C
import tinymoe.train as T
from tinymoe.cli import main

mode, nth, run_dir, config = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
count, armed = {"ckpt": 0, "metrics": 0}, {"on": False}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_write_atomic, real_fdopen, real_fsync = C.write_atomic, os.fdopen, os.fsync

def write_atomic(path, data):
    if path.endswith(".safetensors"):
        count["ckpt"] += 1
        armed["on"] = count["ckpt"] == nth
    try:
        return real_write_atomic(path, data)
    finally:
        armed["on"] = False

class HalfWriter:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        die()
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

def fdopen(fd, *args, **kwargs):
    f = real_fdopen(fd, *args, **kwargs)
    return HalfWriter(f) if armed["on"] and mode == "ckpt_data" else f

def fsync(fd):
    real_fsync(fd)
    if armed["on"] and mode == "ckpt_rename":
        die()

real_append = T._append_record

def append_record(f, record):
    count["metrics"] += 1
    if mode == "metrics" and count["metrics"] == nth:
        f.write((__import__("json").dumps(record) + "\n").encode()[:20])
        f.flush()
        die()
    real_append(f, record)

C.write_atomic, os.fdopen, os.fsync, T._append_record = write_atomic, fdopen, fsync, append_record
args = ["train", "--config", config, "--run-dir", run_dir, "--quiet"] + sys.argv[5:]
sys.exit(main(args))
'''


def child(wrapper, mode, nth, run_dir, config, resume):
    env = {**os.environ, "TINYMOE_BACKEND": "numpy"}
    cmd = [sys.executable, str(wrapper), mode, str(nth), str(run_dir), str(config)] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def kill_after_new_records(proc, metrics, n, delay):
    """SIGKILL `proc` `delay` seconds after `metrics` has gained `n` complete lines (or when it exits by itself)."""
    def lines():
        try:
            return metrics.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    start, deadline = None, time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        now = lines()
        if start is None:
            start = now if metrics.exists() else 0
        if now >= start + n:
            time.sleep(delay)
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)


def checkpoint_contents(path):
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta["train_state"]), json.loads(meta["optimizer"]), json.loads(meta["model"])


def records(path):
    lines = path.read_bytes().decode().split("\n")
    assert lines[-1] == "", "metrics.jsonl must end with a complete line"
    out = [json.loads(line) for line in lines[:-1]]
    for r in out:
        r.pop("seconds")
    return out


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    config = tmp_path / "kill.toml"
    config.write_text(CONFIG)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)

    ref = tmp_path / "reference"
    proc = child(wrapper, "none", 0, ref, config, resume=False)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    rng = random.Random(0)
    run = tmp_path / "killed"
    schedule = ["ckpt_data", "ckpt_rename", "metrics", "random"] * 6  # 24 kills
    kills, where = 0, []
    for mode in schedule:
        resume = (run / "config.json").exists()
        if mode == "random":  # once training has logged 1-3 more records, at a random moment within ~2 steps
            proc = child(wrapper, "none", 0, run, config, resume)
            kill_after_new_records(proc, run / "metrics.jsonl", rng.randint(1, 3), rng.uniform(0, 0.05))
        else:
            proc = child(wrapper, mode, 2, run, config, resume)
        code = proc.wait(timeout=300)
        err = proc.stderr.read()
        if code == 0:
            break  # the run finished before this kill
        assert code == -signal.SIGKILL, (mode, code, err)
        kills += 1
        where.append(mode)
    while True:  # finish the run
        proc = child(wrapper, "none", 0, run, config, resume=(run / "config.json").exists())
        code = proc.wait(timeout=300)
        assert code == 0, proc.stderr.read()
        break
    assert kills >= 20, f"only {kills} kills before the run finished ({where}); make the run longer"

    a, b = checkpoint_contents(ref / "checkpoint.safetensors"), checkpoint_contents(run / "checkpoint.safetensors")
    assert a[0].keys() == b[0].keys()
    for name in a[0]:
        np.testing.assert_array_equal(a[0][name], b[0][name], err_msg=name)
        assert a[0][name].dtype == b[0][name].dtype
    assert a[1:] == b[1:]  # train_state, optimizer scalars, model config and its generators' states
    assert records(ref / "metrics.jsonl") == records(run / "metrics.jsonl")
    assert len(records(run / "metrics.jsonl")) == 60  # 120 steps, one record every 2
    assert json.loads((ref / "results.json").read_text()) == json.loads((run / "results.json").read_text())
    leftovers = [n for n in os.listdir(run) if n not in ("config.json", "metrics.jsonl", "checkpoint.safetensors",
                                                          "results.json", "routes.png", "curves.png", ".lock")]
    assert not leftovers, leftovers
