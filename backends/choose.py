"""Which backend runs *this* model fastest on *this* machine now: measured, not guessed from the sizes.

    from tinymoe.backends.choose import fastest
    name = fastest(lambda: model_step(model, batch))   # forward + backward of one batch, no optimizer step

Why measure: which backend wins depends on the model's shapes and on what else the machine is doing. The numba
backend's expert kernels win once an expert's GEMMs have real work (a whole transformer step 1.3-3x faster than
the NumPy reference at 256 rows per expert and more), while on a tiny model Python and the autodiff graph cost
the same on both and the difference is within noise; under CPU contention the order of two backends' step
times has flipped before (benchmarks/README.md). A few timed steps, interleaved so that a change of load hits
both alike, decide it for the shapes and the load at hand.

`step()` is called under `tm.use_backend(name)`, which holds that backend's session (the numba backend's: NumPy's
BLAS on one thread, the dense products on numba's threads); it should run one forward + backward of a real batch
and leave the parameters unchanged (no optimizer step: gradients may accumulate, the caller zeroes them afterwards).
"""
from __future__ import annotations

import time


def fastest(step, candidates=None, trials=5, warmup=1) -> str:
    """The name of the candidate backend (default: every available one) whose fastest timed `step()` was the
    shortest (`step_times`). The minimum, not the median: on a busy machine a step that lost its core to another
    process for a scheduler slice (milliseconds) measures the scheduler, not the backend, and a small model's
    step times split into two groups far apart; their median picks a side by chance. Ties go to the earlier
    candidate (the NumPy reference first in `available()`). One candidate: returned without running anything."""
    from . import available

    names = list(available() if candidates is None else candidates)
    if len(names) == 1:
        return names[0]
    times = step_times(step, names, trials, warmup)
    return min(names, key=lambda name: min(times[name]))


def step_times(step, candidates=None, trials=5, warmup=1) -> dict:
    """Every timed `step()`, in seconds, per candidate backend (default: every available one): {name: [s, ...]}.

    Each candidate first runs `warmup` untimed steps (compilation, first-touch allocation); then the candidates
    take turns, one timed step each per round, for `trials` rounds.
    """
    from . import available, use_backend

    names = list(available() if candidates is None else candidates)
    if not names:
        raise ValueError("step_times: no candidate backends; pass names from tinymoe.backends.available()")
    if trials < 1:
        raise ValueError(f"step_times: trials must be at least 1, got {trials}")
    times = {name: [] for name in names}
    for name in names:
        with use_backend(name):
            for _ in range(warmup):
                step()
    for _ in range(trials):
        for name in names:
            with use_backend(name):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return times
