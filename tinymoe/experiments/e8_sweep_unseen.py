"""E8 — claim (ii) against scale: does reusing the routing of seen tasks help an unseen task more with more seen
tasks, more experts or more data per seen task (Gupta et al. 2022, claim ii)?

E3's setting and its pre-declared comparison — after K-shot fine-tuning, the held-out tasks' accuracy with their
description at the input and in the routers minus with their description at the input and a fresh router (the same
pre-trained MoE add model, so the difference isolates the reuse of routing) — at every point of a sweep around a
base point, one axis at a time (tinymoe.experiments.sweep): the number of seen tasks T (E3's held-out tasks' parts
first, then E3's other seen tasks, then other compositions of up to two primitives, never one that computes a
held-out task's function), the number of experts E, and the training examples per seen task n. Both methods
fine-tune one pre-trained model per seed and point, at E3's tuned lr.
"""
from __future__ import annotations

from .common import preset_config
from .e3_unseen import BASE_ARM, FRESH_ROUTER, REUSE, heldout_accuracy, pretrain
from .e3_unseen import PRESETS as E3_PRESETS
from .sweep import sweep_experiment, task_pool

PRESETS = {
    "tiny": dict(E3_PRESETS["tiny"], seeds=3, sweep=dict(base=dict(tasks=3, experts=2, data=40),
                 axes=dict(tasks=[3, 4], experts=[2, 4], data=[20, 40])), shot=4, lr=3e-3, steps=6),
    "small": dict(E3_PRESETS["small"], seeds=8, sweep=dict(base=dict(tasks=16, experts=4, data=300),
                  axes=dict(tasks=[4, 16, 32], experts=[4, 16], data=[100, 300, 900])), shot=8, lr=1e-2, steps=400),
}
ARM, BASELINE = REUSE, FRESH_ROUTER
CLAIM = "(ii) unseen tasks: reusing seen routing generalises sample-efficiently (scale sweep)"
WORDS = {"tasks": "seen tasks", "experts": "experts", "data": "examples per seen task"}


def setting(cfg, point) -> dict:
    """E3's preset at this point: T seen tasks (the held-out tasks' parts first), E experts, n per seen task."""
    parts = [(p,) for h in cfg["heldout"] for p in h]
    seen = task_pool([*dict.fromkeys(parts), *cfg["seen"]], point["tasks"], exclude=cfg["heldout"],
                     seq_len=cfg["seq_len"], vocab=cfg["vocab"])
    return {**cfg, "seen": seen, "num_experts": point["experts"], "n_per_task": point["data"]}


def measure(cfg):
    def at(point, seed):
        s = setting(cfg, point)
        trained = pretrain(BASE_ARM[ARM], s, cfg["lr"], seed)  # REUSE and FRESH_ROUTER share the pre-trained model
        return tuple(heldout_accuracy(trained, m, s, seed, shots=[cfg["shot"]])[cfg["shot"]] for m in (ARM, BASELINE))

    return at


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    cfg = preset_config(PRESETS, preset, seeds)

    def notes(backend, timer):
        largest = {**cfg["sweep"]["base"], "tasks": max(cfg["sweep"]["axes"]["tasks"])}
        seen = ", ".join("+".join(t) for t in setting(cfg, largest)["seen"])
        return [f"Held out: {', '.join('+'.join(h) for h in cfg['heldout'])}; seen tasks (the first T of): {seen}. "
                f"Pre-training {cfg['steps']} Adam steps, batch {cfg['batch_size']}, lr {cfg['lr']} (E3's tuned lr for "
                f"MoE add); fine-tuning {cfg['finetune_steps']} steps on K={cfg['shot']} examples of each held-out task "
                f"(all weights, lr {cfg['finetune_lr']}), {cfg['n_test']} test examples each. Transformer d_model="
                f"{cfg['d_model']}, {cfg['n_layers']} layers, d_ff={cfg['d_ff']}; MoE add: every block, E experts, "
                f"top-1; {timer.describe()}.", "", f"Chance accuracy is 1/{cfg['vocab']} = {1 / cfg['vocab']:.2f}."]

    return sweep_experiment("e8_sweep_unseen", experiment="e8", title="E8 — claim (ii) against scale", preset=preset,
                            cfg=cfg, measure=measure(cfg), claim=CLAIM, arm=ARM, baseline=BASELINE,
                            metric=f"held-out accuracy, K={cfg['shot']}", words=WORDS, notes=notes,
                            plot_name="e8_sweep_unseen.png", out=out, log=log)
