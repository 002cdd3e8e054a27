"""backends.choose: the fastest backend is picked by timing the caller's own step on each candidate."""
import time

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.backends.choose import fastest, step_times

TWO = tm.backends.available()[:2]


@pytest.mark.skipif(len(TWO) < 2, reason="needs two backends (numba installed)")
@pytest.mark.parametrize("slow", TWO)
def test_fastest_picks_the_backend_whose_step_is_shorter(slow):
    calls = []

    def step():
        calls.append(tm.get_backend())
        if tm.get_backend() == slow:
            time.sleep(0.03)

    before = tm.get_backend()
    pick = fastest(step, TWO, trials=3, warmup=1)
    assert pick != slow and pick in TWO
    assert sorted(calls) == sorted(TWO * 4)  # one warm-up and three timed steps each
    assert tm.get_backend() == before  # the caller's backend is restored


@pytest.mark.skipif(len(TWO) < 2, reason="needs two backends (numba installed)")
def test_step_times_runs_a_real_moe_step_on_each_backend():
    moe = tm.nn.MoE(d_model=8, d_ff=16, num_experts=4, gate="top_k", k=2, seed=0)
    x = tm.Tensor(np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))

    def step():
        moe(x).sum().backward()

    times = step_times(step, TWO, trials=2)
    assert set(times) == set(TWO) and all(len(t) == 2 and min(t) > 0 for t in times.values())


def test_one_candidate_is_returned_without_running_and_bad_arguments_are_refused():
    def step():
        raise AssertionError("must not run")

    assert fastest(step, ["numpy"]) == "numpy"
    with pytest.raises(ValueError, match="trials"):
        step_times(lambda: None, ["numpy"], trials=0)
    with pytest.raises(ValueError, match="no candidate"):
        step_times(lambda: None, [])
