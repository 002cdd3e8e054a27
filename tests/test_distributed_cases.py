"""The MPI side of tests/test_distributed.py: run under mpiexec, one process per rank.

    mpiexec -n 4 python tests/test_distributed_cases.py layer training buckets

Each case runs on every rank in lockstep; every check is made collective (an Allreduce of the failures), so all
ranks pass or fail together and hypothesis draws and shrinks the same examples everywhere (derandomised, no
database). A failing rank raises inside `abort_on_error`, which ends the whole job with the message. Rank 0 prints
"PASS <case>" lines that the pytest side looks for. Named *_cases.py with no test_ functions: pytest collects
nothing here, and mpi4py is imported only under __main__.
"""
from __future__ import annotations

import os
import sys

import numpy as np

import tinymoe as tm
from tinymoe import data as D
from tinymoe.train import OptimConfig, task_loss

COMM = None  # set under __main__


def _all(ok: bool) -> bool:
    """True on every rank when `ok` holds on every rank."""
    return bool(COMM.allreduce(int(bool(ok)), op=_mpi().MIN))


def _mpi():
    from mpi4py import MPI

    return MPI


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max(initial=0.0) / (np.abs(b).max(initial=0.0) + 1e-6))


# ---- 1. one layer: P ranks against one process on the concatenated batch --------------------------------------
def _layer_case(sizes, d, f, m, k, gate, capacity, priority, scope, seed, stats):
    from tinymoe.distributed import ExpertParallel

    P, r = COMM.Get_size(), COMM.Get_rank()
    E = m * P
    N = sum(sizes)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d)).astype(np.float32)
    G = rng.standard_normal((N, d)).astype(np.float32)  # upstream gradient: loss = Σ y·G (+ aux)
    kwargs = dict(gate=gate, k=min(k, E), capacity_factor=capacity, priority=priority, seed=seed,
                  aux_weights={"load_balance": 1.0, "z_loss": 1.0, "dselect_entropy": 1.0})
    starts = np.concatenate([[0], np.cumsum(sizes)])
    mine = slice(starts[r], starts[r + 1])
    with_aux = scope == "global"  # per-rank capacity is compared with the layer on each shard alone, tasks only

    ref = tm.nn.MoE(d, f, E, **kwargs)
    if scope == "global":  # the single-process layer on the global batch
        x = tm.Tensor(X, requires_grad=True)
        y_ref = ref(x)
        ((y_ref * tm.Tensor(G)).sum() + ref.aux_loss()).backward()
        y_ref, dx_ref = y_ref.data[mine], x.grad[mine]
        aux_ref = {n: v.item() for n, v in ref.aux_losses.items()}
    else:  # GShard groups: the single-process layer on each rank's shard on its own, gradients summed
        outs = []
        for s in range(P):
            xs = tm.Tensor(X[starts[s]:starts[s + 1]], requires_grad=True)
            ys = ref(xs)
            (ys * tm.Tensor(G[starts[s]:starts[s + 1]])).sum().backward()
            outs.append((ys.data, xs.grad))
        y_ref, dx_ref = outs[r]

    layer = tm.nn.MoE(d, f, E, **kwargs)
    par = ExpertParallel(layer, COMM, capacity_scope=scope, bucket_mb=1e-4)
    x = tm.Tensor(X[mine], requires_grad=True)
    y = layer(x)
    loss = (y * tm.Tensor(G[mine])).sum()
    if with_aux:
        loss = loss + layer.aux_loss() * (sizes[r] / N)  # the n_r / N weighting of fit
    loss.backward()
    par.sync_gradients()

    ok = y.shape == y_ref.shape and _rel_err(y.data, y_ref) < 1e-5 and _rel_err(x.grad, dx_ref) < 1e-4
    bitwise = bool(np.array_equal(y.data, y_ref))
    refs = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        want = refs[name].grad
        if name.startswith("experts."):
            want = want[r * m:(r + 1) * m]  # my experts' slice
            bitwise &= bool(np.array_equal(p.grad, want)) or not with_aux
        ok &= p.grad is not None and p.grad.shape == want.shape and _rel_err(p.grad, want) < 1e-4
    if with_aux:
        aux = {n: v.item() for n, v in layer.aux_losses.items()}
        ok &= aux.keys() == aux_ref.keys() and all(abs(aux[n] - aux_ref[n]) <= 1e-5 * (1 + abs(aux_ref[n]))
                                                   for n in aux)
    stats["empty"] += 1 - int(_all(not (layer.last_received == 0).any()))  # an expert got nothing from some rank
    if with_aux:  # the same rows meet each expert's GEMM as on one process: expected bit for bit
        stats["bitwise"] += int(_all(bitwise))
        stats["global"] += 1
    stats["n"] += 1
    return _all(ok)


def case_layer():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    P = COMM.Get_size()
    stats = {"empty": 0, "bitwise": 0, "n": 0, "global": 0}

    @settings(max_examples=int(os.environ.get("TINYMOE_MPI_EXAMPLES", 25)), derandomize=True, database=None,
              deadline=None, suppress_health_check=list(HealthCheck), print_blob=False)
    @given(sizes=st.lists(st.integers(1, 5), min_size=P, max_size=P), d=st.integers(2, 6), f=st.integers(2, 5),
           m=st.integers(1, 2), k=st.integers(1, 3), gate=st.sampled_from(["top_k", "top_k", "softmax", "dselect_k"]),
           capacity=st.sampled_from([None, None, 0.5, 1.0, 2.0]), priority=st.sampled_from(["slot", "weight"]),
           scope=st.sampled_from(["global", "global", "rank"]), seed=st.integers(0, 2**16))
    def check(sizes, d, f, m, k, gate, capacity, priority, scope, seed):
        assert _layer_case(sizes, d, f, m, k, gate, capacity, priority, scope, seed, stats), \
            (sizes, d, f, m, k, gate, capacity, priority, scope, seed)

    check()
    assert stats["empty"] > 0, "no drawn example had an expert without tokens from some rank"
    return f"{stats['n']} examples, {stats['bitwise']} of {stats['global']} with global capacity bitwise (outputs " \
           f"and expert gradients), " \
           f"{stats['empty']} with an expert receiving nothing from some rank"


# ---- 2. a few training steps: P ranks against one process ------------------------------------------------------
def _tiny_run(num_experts, capacity=None, optimizer="adamw"):
    data = D.sequence_tasks(["copy", "reverse"], n_per_task=48, seq_len=6, vocab_size=8, seed=0)
    cfg = tm.ModelConfig(vocab_size=8, max_seq_len=6, d_model=16, n_layers=2, n_heads=2, d_ff=16,
                         num_experts=num_experts, k=2, num_tasks=2, router="add", capacity_factor=capacity, seed=3)
    optim = OptimConfig(optimizer=optimizer, steps=6, batch_size=16, eval_every=3, warmup_steps=2, lr=1e-2)
    return data, cfg, optim


def case_training():
    """fit on P ranks ends where fit on one process ends. With SGD to 1e-5 of each weight's scale; with AdamW to 1e-4
    (m/√v magnifies the last-bit differences of small gradients), except the attention's key bias: its true gradient is zero (softmax ignores a constant added to every key
    score), so it holds rounding noise that Adam's m/√v turns into steps of ~lr either way; it gets an absolute bar."""
    from tinymoe.distributed import ExpertParallel
    from tinymoe.train import evaluate, fit

    P = COMM.Get_size()
    lines = []
    for optimizer, capacity in (("sgd", None), ("sgd", 1.0), ("adamw", None)):
        data, cfg, optim = _tiny_run(2 * P, capacity, optimizer)
        ref = tm.MoETransformer(cfg)
        fit(ref, data, None, optim)
        model = tm.MoETransformer(cfg)
        par = ExpertParallel(model, COMM)
        fit(model, data, None, optim, parallel=par)
        ev = evaluate(model, data, batch_size=40, parallel=par)
        par.unshard()
        got, want = model.state_dict(), ref.state_dict()
        strict = [n for n in want if not (optimizer == "adamw" and n.endswith("qkv.bias"))]
        err = max(_rel_err(got[n], want[n]) for n in strict)
        bias_err = max([float(np.abs(got[n] - want[n]).max()) for n in want if n not in strict], default=0.0)
        ev_ref = evaluate(ref, data, batch_size=40)
        ok = got.keys() == want.keys() and err < (1e-5 if optimizer == "sgd" else 1e-4) and bias_err < optim.lr * optim.steps / 10
        ok &= abs(ev["loss"] - ev_ref["loss"]) < 1e-5 and ev["per_task"] == ev_ref["per_task"]
        assert _all(ok), f"{optimizer}, capacity={capacity}: weights differ by {err:.3g} (relative), key bias by " \
                         f"{bias_err:.3g}; eval {ev} vs {ev_ref}"
        lines.append(f"{optimizer} capacity={capacity}: {err:.1g}")
    return "max relative weight difference after 6 steps: " + ", ".join(lines)


# ---- 3. the gradient Allreduce goes by buckets ------------------------------------------------------------------
class _Counting:
    """A communicator that counts Allreduce calls (everything else passes through)."""

    def __init__(self, comm):
        self.comm, self.allreduces = comm, 0

    def Allreduce(self, *args, **kwargs):
        self.allreduces += 1
        return self.comm.Allreduce(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.comm, name)


def case_buckets():
    from tinymoe.distributed import ExpertParallel

    data, cfg, _ = _tiny_run(2 * COMM.Get_size())
    model = tm.MoETransformer(cfg)
    counting = _Counting(COMM)
    par = ExpertParallel(model, counting)  # 4 MiB buckets: this small model's dense gradients fit in one
    task_loss(model, data, np.arange(4))[0].backward()
    before = counting.allreduces
    par.sync_gradients()
    calls = counting.allreduces - before
    n_dense = len(par.dense)
    assert len(par.buckets) == 1 and calls == 1 + len(par.buckets), (calls, len(par.buckets))  # + the has-grad flags
    # every rank now holds the same summed gradient
    g = np.concatenate([p.grad.reshape(-1) for p in par.dense if p.grad is not None])
    assert _all(np.array_equal(COMM.bcast(g, root=0), g))
    return f"{n_dense} replicated parameters, {len(par.buckets)} bucket, {calls} Allreduce calls"


# ---- 4. a rank that raises ends the job -------------------------------------------------------------------------
def case_abort():
    from tinymoe.distributed import abort_on_error

    with abort_on_error(COMM):
        COMM.Barrier()
        if COMM.Get_rank() == COMM.Get_size() - 1:
            raise RuntimeError("boom on the last rank")
        COMM.Barrier()  # the others wait here for a rank that will never come: only Abort ends this
    return "unreachable"


def main(names):
    global COMM
    from tinymoe.distributed import abort_on_error, world

    COMM = world()
    tm.set_backend(os.environ.get("TINYMOE_BACKEND", "numpy"))
    cases = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}
    for name in names:
        if name == "abort":
            case_abort()
            continue
        with abort_on_error(COMM):
            detail = cases[name]()
        if COMM.Get_rank() == 0:
            print(f"PASS {name} on {COMM.Get_size()} ranks: {detail}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
