"""The training loop: `fit` a model on a multi-task dataset, `evaluate` it per task.

    optim = OptimConfig(optimizer="adamw", lr=3e-3, steps=1000, batch_size=64, eval_every=100, patience=5)
    history = fit(model, data["train"], data["val"], optim)      # early stopping on the validation metric
    evaluate(model, data["test"])     # {"per_task": {name: metric}, "mean": ..., "metric": "accuracy" | "mse", ...}

Two kinds of data and models (tinymoe.data):
* `SequenceTasks` + `MoETransformer`: each example is one task's sequence; the loss is per-position cross-entropy,
  the metric per-position accuracy (also the share of sequences entirely right, "exact").
* `TabularTasks` + a multi-task model returning one output per task (`MultiGateMoE`, `SharedBottom`): every
  example is scored on every task; the loss is the mean over tasks of MSE (regression) or cross-entropy
  (classification), the metric per-task MSE or accuracy.

The training loss is the task loss plus the model's weighted auxiliary losses (`model.aux_loss()`: load balance,
z-loss, DSelect-k entropy, ...). Batches are drawn epoch by epoch from a seeded permutation; the optimizer, the
schedule and the batch order all come from `OptimConfig`, so the same seed gives the same run. `fit` can write a
checkpoint every `checkpoint_every` steps and resume from one exactly (same losses as an uninterrupted run).

Devices: `fit` trains where the model is, or moves it once to `device=` (the GPU by default when the backend is
cupy). Each step then copies its batch to the device once and keeps the forward, the losses, backward,
clipping and the optimizer there; the host sees a few numbers per step (the two losses in one copy, the global
gradient norm, the expert offsets of each MoE layer, the range checks of the ids).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import backends
from . import functional as F
from . import optim as O
from .arrays import move, to_host
from .data import SequenceTasks, TabularTasks
from .engine import Tensor, no_grad
from .nn.module import device_module

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # sgd (with momentum) | adam | adamw
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled decay (ignored by sgd/adam)
    momentum: float = 0.9  # sgd only
    steps: int = 1000  # optimizer steps
    batch_size: int = 64
    warmup_steps: int = 50  # linear warmup, then the schedule
    schedule: str = "cosine"  # cosine (down to min_lr_ratio · lr) | constant
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0  # global-norm clipping; None = off
    eval_every: int = 100  # steps between validation evals (and log lines)
    patience: int | None = None  # early stopping: stop after this many evals without improvement; None = off
    checkpoint_every: int | None = None  # steps between checkpoints when fit() has a run_dir; None = at the end only
    seed: int = 0  # batch order

    def __post_init__(self):
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(_finite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr!r}")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0,
               f"weight_decay must be a finite number ≥ 0, got {self.weight_decay!r}")
        _check(_finite(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("steps", "batch_size", "eval_every"):
            _check(_integer(getattr(self, name)) and getattr(self, name) >= 1,
                   f"{name} must be an integer ≥ 1, got {getattr(self, name)!r}")
        _check(_integer(self.warmup_steps) and self.warmup_steps >= 0,
               f"warmup_steps must be an integer ≥ 0, got {self.warmup_steps!r}")
        _check(_finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
               f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        _check(self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0),
               f"grad_clip must be a finite number > 0 or None, got {self.grad_clip!r}")
        _check(self.patience is None or (_integer(self.patience) and self.patience >= 1),
               f"patience must be an integer ≥ 1 or None, got {self.patience!r}")
        _check(self.checkpoint_every is None or (_integer(self.checkpoint_every) and self.checkpoint_every >= 1),
               f"checkpoint_every must be an integer ≥ 1 or None, got {self.checkpoint_every!r}")
        _check(_integer(self.seed) and self.seed >= 0, f"seed must be an integer ≥ 0, got {self.seed!r}")

    def lr_at(self, step) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if self.schedule == "constant":
            return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr
        return O.warmup_cosine(step, self.lr, self.warmup_steps, self.steps, self.min_lr_ratio * self.lr)


def _check(condition, message):
    if not condition:
        raise ValueError(f"OptimConfig: {message}")


def _finite(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says at which step and what to try."""


def make_optimizer(model, cfg: OptimConfig) -> O.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return O.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return O.Adam(params, lr=cfg.lr)
    return O.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ---- one batch: forward and loss ---------------------------------------------------------------------------------


def _is_sequence(data):
    if isinstance(data, SequenceTasks):
        return True
    if isinstance(data, TabularTasks):
        return False
    raise TypeError(f"expected a tinymoe.data SequenceTasks or TabularTasks, got {type(data).__name__}")


def model_xp(model):
    """The array module of the model's parameters: numpy on the CPU, cupy on the GPU."""
    p = next(iter(model.parameters()), None)
    return np if p is None else p.xp


def batch(data, idx, xp=np) -> dict:
    """Examples `idx` of `data` as arrays on xp's device, each copied there once: tokens, task_ids, targets (a
    SequenceTasks) or x, y (a TabularTasks)."""
    out = {}
    for name in ("tokens", "task_ids", "targets") if _is_sequence(data) else ("x", "y"):
        host = getattr(data, name)[idx]  # (B, ...)
        out[name] = move(host, xp)
    return out


def task_loss(model, data, idx, xp=None):
    """The task loss on examples `idx` (a scalar Tensor) and the model's outputs, computed on the model's device
    (or xp's)."""
    b = batch(data, idx, model_xp(model) if xp is None else xp)
    if _is_sequence(data):
        logits = model(b["tokens"], task_ids=b["task_ids"])  # (B, L, V)
        return F.cross_entropy(logits, b["targets"]), logits
    outputs = model(b["x"])  # list of num_tasks (B, out_dim)
    if len(outputs) != data.num_tasks:
        raise ValueError(f"the model returned {len(outputs)} outputs for {data.num_tasks} tasks")
    losses = []
    for t, out in enumerate(outputs):
        y = b["y"][:, t]
        if data.task_type == "regression":
            losses.append(F.mse_loss(out.reshape(-1), Tensor(y.astype(out.dtype))))
        else:
            losses.append(F.cross_entropy(out, y))
    return sum(losses[1:], losses[0]) * (1.0 / len(losses)), outputs


def _aux_loss(model):
    aux = getattr(model, "aux_loss", None)
    return aux() if aux is not None else 0.0


def _aux_values(model) -> dict:
    return {name: float(v.item() if isinstance(v, Tensor) else v) for name, v in getattr(model, "aux_losses", {}).items()}


# ---- evaluation ---------------------------------------------------------------------------------------------------


def evaluate(model, data, batch_size=512, parallel=None) -> dict:
    """Per-task test metrics in eval mode (no dropout, no routing noise).

    parallel: a tinymoe.distributed.ExpertParallel; every rank then evaluates its part of each batch and the sums
    are added over the ranks (every rank gets the same result).

    Returns {"metric": "accuracy" | "mse", "higher_is_better": bool, "per_task": {task name: value},
    "mean": mean over tasks, "loss": mean task loss} (+ "exact": {task: share of sequences all right}).
    """
    was_training = model.training
    model.eval()
    xp = model_xp(model)
    sequence = _is_sequence(data)
    T, n = data.num_tasks, len(data)
    sums = np.zeros(T)  # per task: correct positions, or squared error / correct examples
    counts = np.zeros(T)
    exact = np.zeros(T)
    loss_sum = 0.0
    try:
        with no_grad():
            if parallel is None:
                batches = [np.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
            else:  # distributed hook: this rank's part of each batch
                batches = parallel.eval_batches(n, batch_size)
            for idx in batches:
                loss, out = task_loss(model, data, idx, xp)
                loss_sum += loss.item() * len(idx)
                if sequence:  # predictions made on the device; (B, L) integers come back
                    right = to_host(out.data.argmax(axis=-1)) == data.targets[idx]  # (B, L)
                    tasks = data.task_ids[idx]
                    np.add.at(sums, tasks, right.sum(axis=1))
                    np.add.at(counts, tasks, right.shape[1])
                    np.add.at(exact, tasks, right.all(axis=1))
                else:
                    for t, o in enumerate(out):
                        y = data.y[idx, t]
                        if data.task_type == "regression":
                            sums[t] += float(((o.numpy().reshape(-1) - y) ** 2).sum())
                        else:
                            sums[t] += float((to_host(o.data.argmax(axis=-1)) == y).sum())
                        counts[t] += len(idx)
    finally:
        model.train(was_training)
    if parallel is not None:  # distributed hook: the sums over every rank's examples
        sums, counts, exact = (parallel.sum(a) for a in (sums, counts, exact))
        loss_sum = parallel.sum(loss_sum)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_task = sums / counts  # NaN for a task with no examples here
    present = counts > 0
    metric = "accuracy" if sequence or data.task_type == "classification" else "mse"
    result = {"metric": metric, "higher_is_better": metric == "accuracy",
              "per_task": {name: float(v) for name, v, p in zip(data.task_names, per_task, present) if p},
              "mean": float(per_task[present].mean()) if present.any() else float("nan"),
              "loss": loss_sum / max(n, 1)}
    if sequence:
        result["exact"] = {name: float(e / (c / data.seq_len)) for name, e, c, p in
                           zip(data.task_names, exact, counts, present) if p}
    return result


# ---- the loop ------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything besides weights, optimizer moments and the modules' own Generators (dropout, noisy gates: the
    checkpoint saves those with the model) that an exact resume needs."""

    step: int = 0
    batch_rng: dict | None = None  # the batch-order Generator's bit_generator.state
    epoch_order: list | None = None  # the current epoch's permutation and position in it
    epoch_pos: int = 0
    best: float | None = None  # best validation mean so far
    evals_since_best: int = 0
    loss_sum: float = 0.0  # the running train loss of the current eval window
    loss_count: int = 0


class _Batches:
    """Epochs of a seeded permutation, cut into batches (the last partial batch of an epoch is kept)."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size = n, batch_size
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(n), 0

    def next(self):
        if self.pos >= self.n:
            self.order, self.pos = self.rng.permutation(self.n), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += len(idx)
        return idx


def fit(model, train, val=None, optim: OptimConfig | None = None, seed=None, *, run_dir=None, resume=False,
        log=None, progress=False, parallel=None, device=None) -> list[dict]:
    """Train `model` on `train`; evaluate on `val` every `eval_every` steps; returns the list of logged records.

    With `val`, the best weights by the validation mean (accuracy up, MSE down) are restored at the end, and
    `patience` stops early. With `run_dir`, every record goes to run_dir/metrics.jsonl and a checkpoint
    (run_dir/checkpoint.safetensors) is written every `checkpoint_every` steps and at the end; `resume=True`
    continues from that checkpoint exactly. `seed` overrides optim.seed. `log(str)` receives one line per eval.

    parallel: a tinymoe.distributed.ExpertParallel (experts spread over MPI ranks): every rank calls fit with the
    same arguments and trains its part of each batch; only its root writes metrics and checkpoints.

    device: where to train ("cpu", "cuda", or an array module); the model is moved there once, before the
    optimizer is made, and stays there. None: the GPU when the backend is cupy, else where the model already is.
    """
    optim = optim or OptimConfig()
    if device is None and backends.get_backend() == "cupy":
        device = "cuda"
    if device is not None:
        model.to(_device_or_raise(device))
    if seed is not None:
        optim = replace(optim, seed=seed)
    if len(train) == 0:
        raise ValueError("fit: the training set is empty")
    if parallel is not None:
        parallel.check_batches(len(train), optim.batch_size)
    opt = make_optimizer(model, optim)
    batches = _Batches(len(train), optim.batch_size, optim.seed)
    state = TrainState()
    best = {"weights": None}  # the best-on-validation weights so far
    history: list[dict] = []
    ckpt_path = os.path.join(run_dir, "checkpoint.safetensors") if run_dir else None
    if resume:
        state, best["weights"] = _restore(ckpt_path, model, opt, batches, parallel)
    writer = parallel is None or parallel.is_root  # distributed hook: one rank writes
    if run_dir and writer:
        os.makedirs(run_dir, exist_ok=True)
        _truncate_records_after(os.path.join(run_dir, "metrics.jsonl"), state.step if resume else 0)
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "ab") if run_dir and writer else None
    bar = _progress(optim.steps, state.step, progress and writer)
    log = log if writer else None
    model.train()
    started = time.perf_counter()
    try:
        # numba: NumPy's BLAS on one thread, the cores to the expert kernels. NumPy's overflow/invalid warnings are
        # off: a diverging run is caught by its non-finite loss or gradient norm and stopped with one clear error.
        with backends.session(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            _loop(model, train, val, optim, opt, batches, state, best, history, ckpt_path, metrics_file, bar, log,
                  started, parallel)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()
    if best["weights"] is not None:
        model.load_state_dict(best["weights"])
    model.eval()
    return history


def _device_or_raise(device):
    xp = device_module(device, "fit(device=...)")
    if xp is None:
        raise ValueError(f"fit: device={device!r} is not a device; use 'cpu', 'cuda' or an array module")
    return xp


def _host_floats(*tensors) -> list[float]:
    """Scalar tensors as Python floats, in one copy from their device (one synchronisation on a GPU)."""
    xp = tensors[0].xp
    return to_host(xp.stack([t.data.reshape(()) for t in tensors])).tolist()


def _loop(model, train, val, optim, opt, batches, state, best, history, ckpt_path, metrics_file, bar, log, started,
          parallel=None):
    """fit's steps: batch, loss, backward, clip, step; every eval_every steps a record, an eval, a checkpoint.
    best["weights"] holds the best-on-validation weights so far."""
    while state.step < optim.steps:
        step = state.step
        opt.lr = optim.lr_at(step)
        idx = batches.next()
        share = 1.0
        if parallel is not None:  # distributed hook: my part of the batch, weighted so Σ_ranks = the batch loss
            idx, share = parallel.shard_batch(idx)
        loss, _ = task_loss(model, train, idx)
        aux = _aux_loss(model)
        total = loss + aux
        if parallel is None:
            value, task_value = _host_floats(total, loss)
        else:  # distributed hook: the global batch's losses, both in one Allreduce
            value, task_value = map(float, parallel.sum([total.item() * share, loss.item() * share]))
        if not math.isfinite(value):
            raise TrainingDiverged(f"fit: the loss is {value} at step {step} (lr {opt.lr:.3g}); lower the lr, "
                                   f"keep grad_clip on, or check the data for NaNs")
        opt.zero_grad()
        (total if parallel is None else total * share).backward()
        if parallel is not None:
            parallel.sync_gradients()
        clip = O.clip_grad_norm if parallel is None else (lambda _, norm: parallel.clip_grad_norm(norm))
        try:
            grad_norm = clip(model.parameters(), optim.grad_clip) if optim.grad_clip else None
        except FloatingPointError:  # a finite loss with an inf/NaN gradient: diverged all the same
            raise TrainingDiverged(f"fit: the gradient norm is not finite at step {step} (lr {opt.lr:.3g}) although "
                                   f"the loss is {value:.4g}; lower the lr, or check the data for NaNs") from None
        opt.step()
        state.step += 1
        state.loss_sum, state.loss_count = state.loss_sum + task_value, state.loss_count + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{task_value:.4f}")

        last = state.step == optim.steps
        if state.step % optim.eval_every == 0 or last:
            record = {"step": state.step, "lr": opt.lr, "train_loss": state.loss_sum / state.loss_count,
                      "aux": _aux_values(model), "seconds": round(time.perf_counter() - started, 3)}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            record.update(_routing_record(model))
            state.loss_sum, state.loss_count = 0.0, 0
            stop = False
            if val is not None:
                result = evaluate(model, val, parallel=parallel)
                record["val"] = {"loss": result["loss"], "mean": result["mean"], "per_task": result["per_task"],
                                 "metric": result["metric"]}
                better = state.best is None or (result["mean"] > state.best if result["higher_is_better"]
                                                else result["mean"] < state.best)
                if better:
                    state.best, state.evals_since_best = result["mean"], 0
                    best["weights"] = model.state_dict()
                else:
                    state.evals_since_best += 1
                    stop = optim.patience is not None and state.evals_since_best >= optim.patience
                record["early_stop"] = stop
            history.append(record)
            if metrics_file:
                _append_record(metrics_file, record)
            if log:
                log(_format_record(record))
            if ckpt_path and (stop or last or (optim.checkpoint_every and state.step % optim.checkpoint_every == 0)):
                _checkpoint(ckpt_path, metrics_file, model, opt, batches, state, best["weights"], parallel)
            if stop:
                break
        elif ckpt_path and optim.checkpoint_every and state.step % optim.checkpoint_every == 0:
            _checkpoint(ckpt_path, metrics_file, model, opt, batches, state, best["weights"], parallel)


def _checkpoint(ckpt_path, metrics_file, *save_args):
    """Save the checkpoint once every metrics record it covers is on disk (fsync first: a crash never leaves a
    checkpoint ahead of its metrics)."""
    if metrics_file:
        os.fsync(metrics_file.fileno())
    _save(ckpt_path, *save_args)


def _append_record(f, record):
    """One record, one line, appended in one write: a kill leaves at most a partial last line, which a resume cuts."""
    f.write((json.dumps(record) + "\n").encode())
    f.flush()


def _truncate_records_after(path, step):
    """Cut metrics.jsonl after the last complete record with record["step"] ≤ `step` (the whole file for a fresh run).

    The file is only ever appended to and cut at a line boundary, never rewritten, so a kill at any moment leaves
    every record before it intact. A resumed run re-logs the steps after its checkpoint, so the file reads as if the
    run had never been interrupted; a half-written last line (a kill during a write) is cut too."""
    if not os.path.exists(path):
        return
    keep = 0
    if step > 0:
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                if not line.endswith(b"\n"):
                    break  # the partial line of an interrupted write
                try:
                    record = json.loads(line)
                    record_step = record["step"]
                except (ValueError, KeyError, TypeError):
                    break  # not one of ours: keep what comes before it
                if not isinstance(record_step, int) or record_step > step:
                    break
                offset += len(line)
                keep = offset
    if os.path.getsize(path) != keep:
        os.truncate(path, keep)


def _routing_record(model) -> dict:
    """Per MoE layer: the expert load f_i and the assignments dropped by capacity in the last batch. A multi-gate
    model (one gate per task over shared experts) has one "layer": its mean gate weight per expert over tasks."""
    weights = getattr(model, "last_weights", None)
    if weights:
        record = {"expert_load": [np.round(np.mean([w.mean(axis=0) for w in weights], axis=0), 4).tolist()]}
        if hasattr(model, "expert_names"):  # CGC / PLE: each task gates only its own and the shared experts
            record["experts"] = list(model.expert_names)
        return record
    layers = getattr(model, "moe_layers", None) or []
    stats = [m.last_routing for m in layers if m.last_routing is not None]
    if not stats:
        return {}
    return {"expert_load": [np.round(s.expert_load(), 4).tolist() for s in stats],
            "dropped": [int(s.dropped.sum()) for s in stats]}


def _format_record(r) -> str:
    line = f"step {r['step']:>6}  loss {r['train_loss']:.4f}  lr {r['lr']:.2e}"
    if r.get("aux"):
        line += "  aux " + " ".join(f"{k} {v:.3g}" for k, v in r["aux"].items())
    if "val" in r:
        v = r["val"]
        line += f"  val mean {v['mean']:.4f}  " + " ".join(f"{k} {x:.3f}" for k, x in v["per_task"].items())
    return line


def _progress(total, initial, enabled):
    """A tqdm bar when asked for and stderr is a terminal (quiet in logs and CI); None otherwise."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    import sys

    return tqdm(total=total, initial=initial, disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True)


# ---- checkpoint / resume ------------------------------------------------------------------------------------------


def _save(path, model, opt, batches, state: TrainState, best_weights, parallel=None):
    from .checkpoint import save

    if parallel is not None:  # distributed hook: every rank joins the gather of the experts, the root writes
        best_weights = parallel.full_state_dict(best_weights) if best_weights is not None else None
        with parallel.gathered(opt):
            if parallel.is_root:
                _save(path, model, opt, batches, state, best_weights)
        return

    state.batch_rng = batches.rng.bit_generator.state
    state.epoch_order, state.epoch_pos = batches.order.tolist(), batches.pos
    train_state = asdict(state)
    train_state["has_best"] = best_weights is not None
    extra = {f"best.{k}": v for k, v in (best_weights or {}).items()}
    save(path, model, optimizer=opt, train_state=train_state, extra_tensors=extra)


def _restore(path, model, opt, batches, parallel=None):
    from .checkpoint import CheckpointError, load_checkpoint

    if parallel is not None:  # distributed hook: every rank loads the whole checkpoint and keeps its experts
        with parallel.gathered(opt):
            state, best = _restore(path, model, opt, batches)
        return state, (parallel.local_state_dict(best) if best is not None else None)

    if path is None or not os.path.exists(path):
        raise CheckpointError(f"fit(resume=True): no checkpoint at {path}; train without resume first")
    ckpt = load_checkpoint(path, model=model)
    if ckpt.optimizer_state:
        opt.load_state_dict(ckpt.optimizer_state)
    state, has_best = _train_state(path, ckpt.train_state, batches.n)
    try:
        batches.rng.bit_generator.state = state.batch_rng
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: train_state.batch_rng is not a generator state ({e}); the checkpoint is "
                              "damaged - restore it or train again without resume") from None
    batches.order, batches.pos = np.asarray(state.epoch_order, dtype=np.int64), state.epoch_pos
    best = None
    if has_best:
        best = {k[len("best."):]: v for k, v in ckpt.extra_tensors.items() if k.startswith("best.")}
        if set(best) != set(model.state_dict()):
            raise CheckpointError(f"{path}: train_state says there are best weights, but the file holds "
                                  f"{len(best)} of {len(model.state_dict())}; the checkpoint is damaged")
    return state, best


def _train_state(path, raw, n) -> tuple[TrainState, bool]:
    """The checkpoint's train_state checked field by field (a CheckpointError names the first bad one)."""
    from .checkpoint import CheckpointError

    def bad(what):
        return CheckpointError(f"{path}: train_state {what}; the checkpoint is damaged or was not written by fit - "
                               "restore it, or train again without resume")

    if not isinstance(raw, dict):
        raise bad(f"is {type(raw).__name__}, not a dict")
    raw = dict(raw)
    has_best = raw.pop("has_best", False)
    fields = {f.name for f in TrainState.__dataclass_fields__.values()}
    if set(raw) != fields or not isinstance(has_best, bool):
        raise bad(f"has the keys {sorted(raw)}, expected {sorted(fields)} and has_best")
    state = TrainState(**raw)
    for name in ("step", "epoch_pos", "evals_since_best", "loss_count"):
        if not _integer(getattr(state, name)) or getattr(state, name) < 0:
            raise bad(f"{name} = {getattr(state, name)!r} is not an integer ≥ 0")
    order = state.epoch_order
    if (not isinstance(order, list) or len(order) != n or not all(_integer(i) for i in order)
            or sorted(order) != list(range(n))):
        raise bad(f"epoch_order is not a permutation of the {n} training examples")
    if state.epoch_pos > n:
        raise bad(f"epoch_pos = {state.epoch_pos} is past the {n} training examples")
    if not _finite(state.loss_sum) or not (state.best is None or _finite(state.best)):
        raise bad("loss_sum or best is not a finite number")
    if not isinstance(state.batch_rng, dict):
        raise bad("batch_rng is not a generator state")
    return state, has_best
