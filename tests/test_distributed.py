"""Expert parallelism on MPI: equivalence with one process, faults, the CLI under mpiexec.

The MPI programs live in tests/test_distributed_cases.py and run under `mpiexec -n 2` and `-n 4` (oversubscribed on
a 2-core machine: MPICH runs more ranks than cores as it is). Without mpi4py (pip install 'tinymoe[mpi]') those
tests are skipped; the checks made before any communication run in-process with a stand-in communicator.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.distributed import ExpertLayoutError, ExpertParallel, launched_by_mpi

HERE = Path(__file__).parent
CASES = HERE / "test_distributed_cases.py"
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
needs_mpi = pytest.mark.skipif(not (HAVE_MPI and MPIEXEC),
                               reason="mpi4py or mpiexec missing: pip install 'tinymoe[mpi]' (mpi4py + the MPICH wheel)")


def mpiexec(n, *argv, timeout=240, env=None):
    """Run `argv` on n ranks; returns the CompletedProcess (stdout and stderr as text)."""
    cmd = [MPIEXEC, "-n", str(n)]
    if "Open MPI" in subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout:
        cmd += ["--oversubscribe", "--allow-run-as-root"]  # Open MPI: more ranks than cores, and root in containers
    full_env = {**os.environ, "TINYMOE_BACKEND": "numpy", "PYTHONPATH": str(HERE.parent), **(env or {})}
    return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=full_env)


_runs = {}


def cases(n):
    """All MPI cases on n ranks in one launch (each launch costs a second of start-up per rank), run once."""
    if n not in _runs:
        examples = {2: 25, 4: 15}[n]
        _runs[n] = mpiexec(n, sys.executable, CASES, "layer", "training", "buckets",
                           env={"TINYMOE_MPI_EXAMPLES": str(examples)})
    return _runs[n]


def passed(n, case):
    run = cases(n)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith(f"PASS {case} ")), None)
    assert line is not None, f"case {case} on {n} ranks did not pass (exit {run.returncode}):\n" \
                             f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return line


@needs_mpi
@pytest.mark.parametrize("n", [2, 4])
def test_layer_matches_one_process(n):
    """Outputs, input gradients, expert gradients (each rank's slice), router gradients (after the bucketed
    Allreduce) and the aux losses equal the single-process layer on the concatenated batch: drawn shapes and shard
    sizes, top-k / softmax / DSelect-k, dropless and capacity (global and per-rank scope, slot and weight
    priority), including experts that receive nothing from some rank. Outputs and expert gradients bit for bit."""
    line = passed(n, "layer")
    print(line)
    n_global = int(line.split(" of ")[1].split()[0])
    assert f"{n_global} of {n_global} with global capacity bitwise" in line


@needs_mpi
@pytest.mark.parametrize("n", [2, 4])
def test_training_steps_match_one_process(n):
    """A few fit() steps on n ranks (SGD and AdamW, dropless and with capacity) end with the single-process
    weights, and the distributed evaluate gives the single-process metrics."""
    print(passed(n, "training"))


@needs_mpi
def test_gradient_allreduce_is_bucketed():
    """One Allreduce per bucket of replicated gradients (plus one for the has-gradient flags), not one per
    parameter; afterwards every rank holds the same summed gradient."""
    line = passed(2, "buckets")
    params, calls = int(line.split(": ")[1].split()[0]), int(line.split(", ")[-1].split()[0])
    assert calls == 2 < params


@needs_mpi
@pytest.mark.parametrize("n", [2, 4])
def test_a_raising_rank_aborts_the_job(n):
    """The last rank raises while the others wait in a Barrier: abort_on_error ends every rank (no hang)."""
    start = time.perf_counter()
    run = mpiexec(n, sys.executable, CASES, "abort", timeout=120)
    assert run.returncode != 0
    assert "boom on the last rank" in run.stderr
    assert f"rank {n - 1} of {n} failed (RuntimeError); aborting the MPI job" in run.stderr
    assert "unreachable" not in run.stdout
    assert time.perf_counter() - start < 60


# ---- checks made before any communication (no MPI needed) ------------------------------------------------------
class NoCommunication:
    """A communicator of `size` ranks that fails the test if anything but its rank and size is asked for."""

    def __init__(self, size, rank=0):
        self.size, self.rank = size, rank

    def Get_size(self):
        return self.size

    def Get_rank(self):
        return self.rank

    def __getattr__(self, name):
        raise AssertionError(f"communication ({name}) before the configuration was checked")


@pytest.mark.parametrize("rank", [0, 3])
def test_experts_not_divisible_by_ranks_is_an_error_before_any_communication(rank):
    model = tm.MoETransformer(tm.ModelConfig(vocab_size=8, d_model=16, n_heads=2, d_ff=16, num_experts=6))
    with pytest.raises(ExpertLayoutError, match=r"num_experts=6 cannot be split evenly over 4 ranks.*\[4, 8, 12, 16\]"
                       r".*mpiexec -n in \[1, 2, 3, 6\]"):
        ExpertParallel(model, NoCommunication(4, rank))


def test_unsupported_layers_are_errors_before_any_communication():
    with pytest.raises(ValueError, match="expert_choice"):
        ExpertParallel(tm.nn.MoE(8, 8, 4, gate="expert_choice"), NoCommunication(2))
    with pytest.raises(ValueError, match="MultiGateMoE"):
        ExpertParallel(tm.nn.MultiGateMoE(8, 4, 4, num_tasks=2), NoCommunication(2))
    with pytest.raises(ValueError, match="PLE weighs every expert"):  # one rule for every dense multi-task model
        ExpertParallel(tm.nn.PLE(8, 4, 2, num_task_experts=1, num_shared_experts=2), NoCommunication(2))
    with pytest.raises(ValueError, match="SharedBottom has no tm.nn.MoE layer"):
        ExpertParallel(tm.nn.SharedBottom(8, 4, 2), NoCommunication(2))
    with pytest.raises(ValueError, match="capacity_scope"):
        ExpertParallel(tm.nn.MoE(8, 8, 4), NoCommunication(2), capacity_scope="per_group")


def test_batches_too_small_for_the_ranks_are_errors():
    par = ExpertParallel.__new__(ExpertParallel)  # only the batch arithmetic: no model, no communicator
    par.size, par.rank = 4, 0
    with pytest.raises(ValueError, match=r"every batch needs ≥ 4 examples; got batch_size=2"):
        par.check_batches(100, 2)
    with pytest.raises(ValueError, match="last batch of 2"):
        par.check_batches(66, 8)  # 66 = 8·8 + 2: the last batch of each epoch would leave two ranks empty
    par.check_batches(68, 8)  # a last batch of 4: one example per rank is enough
    shards = [ExpertParallel.shard_batch(_rank(par, r), np.arange(10)) for r in range(4)]
    assert np.array_equal(np.concatenate([s for s, _ in shards]), np.arange(10))  # rank order = batch order
    assert sum(w for _, w in shards) == pytest.approx(1.0)


def _rank(par, r):
    other = ExpertParallel.__new__(ExpertParallel)
    other.size, other.rank = par.size, r
    return other


def test_launched_by_mpi_reads_the_environment(monkeypatch):
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not launched_by_mpi()
    monkeypatch.setenv("PMI_SIZE", "1")
    assert not launched_by_mpi()  # mpiexec -n 1: an ordinary single-process run
    monkeypatch.setenv("PMI_SIZE", "4")
    assert launched_by_mpi()


# ---- the command line under mpiexec --------------------------------------------------------------------------------
TRAIN = ["--set", "backend=numpy", "--set", "data.n_per_task=60", "--set", "optim.batch_size=24",
         "--set", "optim.eval_every=3", "--set", "optim.optimizer=sgd", "--set", "optim.schedule=constant",
         "--set", "optim.warmup_steps=0", "--set", "optim.lr=0.05", "--quiet"]


def _tinymoe():
    return [sys.executable, "-m", "tinymoe.cli"]


def _weights(run_dir):
    from tinymoe.checkpoint import load_checkpoint

    return load_checkpoint(os.path.join(run_dir, "checkpoint.safetensors")).model.state_dict()


@needs_mpi
def test_cli_trains_on_4_ranks_resumes_on_2_and_matches_one_process(tmp_path):
    """`mpiexec -n 4 tinymoe train` then `mpiexec -n 2 tinymoe train --resume`: rank 0 alone prints and writes,
    the checkpoint holds every expert, and the resumed run ends with the weights of one uninterrupted
    single-process run."""
    ep, single = tmp_path / "ep", tmp_path / "single"
    first = mpiexec(4, *_tinymoe(), "train", *TRAIN, "--set", "optim.steps=3", "--run-dir", ep)
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stdout.count("test accuracy per task") == 1  # rank 0 only
    assert sorted(n for n in os.listdir(ep) if n != ".lock") == ["checkpoint.safetensors", "config.json", "curves.png", "metrics.jsonl", "results.json",
                                      "routes.png"]
    w3 = _weights(ep)
    assert w3["blocks.1.ffn.experts.w1"].shape[0] == 8  # all experts, gathered from the 4 ranks
    resumed = mpiexec(2, *_tinymoe(), "train", *TRAIN, "--set", "optim.steps=6", "--run-dir", ep, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")}
    one = subprocess.run(_tinymoe() + ["train", *TRAIN, "--set", "optim.steps=6", "--run-dir", str(single)],
                         capture_output=True, text=True, timeout=240, env={**env, "PYTHONPATH": str(HERE.parent)})
    assert one.returncode == 0, one.stderr[-4000:]
    got, want = _weights(ep), _weights(single)
    assert not np.allclose(got["blocks.1.ffn.experts.w1"], w3["blocks.1.ffn.experts.w1"])  # the resume trained
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


@needs_mpi
def test_cli_experts_not_divisible_is_a_clear_error(tmp_path):
    run = mpiexec(4, *_tinymoe(), "train", *TRAIN, "--set", "model.num_experts=6", "--run-dir", tmp_path / "bad",
                  timeout=120)
    assert run.returncode != 0
    assert "num_experts=6 cannot be split evenly over 4 ranks" in run.stderr
    assert not (tmp_path / "bad" / "config.json").exists()


@needs_mpi
def test_a_bad_config_under_mpiexec_is_the_cli_one_line_error(tmp_path):
    """The same error path as one process: one line naming the problem and the fix, exit status 2, no traceback
    (TINYMOE_DEBUG=1 shows it), and no run folder left behind."""
    run = mpiexec(2, *_tinymoe(), "train", "--set", "model.n_heads=3", "--run-dir", tmp_path / "r", timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "tinymoe train: error: [model] ModelConfig: d_model=32 must be divisible by n_heads=3" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "r").exists()
    debug = mpiexec(2, *_tinymoe(), "train", "--set", "model.n_heads=3", timeout=120, env={"TINYMOE_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr
