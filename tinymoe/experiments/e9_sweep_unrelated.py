"""E9 — claim (iii) against scale: does task-aware MoE forget less than dense when more unrelated tasks are added,
with more experts, or with more data per base task (Gupta et al. 2022, claim iii)?

E4's setting and its pre-declared comparison — Δ(MoE add, task-aware) − Δ(dense at equal active FLOPs), where
Δ is the base tasks' test accuracy after continuing on base + unrelated tasks (exposure-matched batches) minus after
continuing on the base tasks alone — at every point of a sweep around a base point, one axis at a time
(tinymoe.experiments.sweep): the number of unrelated tasks added T (half value-only maps, half per-sequence random
labels, as many unrelated examples in all as base examples), the number of experts E, and the training examples per
base task n. The four base tasks are E4's. Both arms use E4's tuned lr.
"""
from __future__ import annotations

from .common import preset_config
from .e4_unrelated import PRESETS as E4_PRESETS
from .e4_unrelated import forgetting
from .sweep import cached, sweep_experiment

PRESETS = {
    "tiny": dict(E4_PRESETS["tiny"], seeds=3, sweep=dict(base=dict(tasks=2, experts=2, data=40),
                 axes=dict(tasks=[2, 4], experts=[2, 4], data=[20, 40])), lr=3e-3, steps=6, steps_after=4),
    "small": dict(E4_PRESETS["small"], seeds=8, sweep=dict(base=dict(tasks=16, experts=4, data=600),
                  axes=dict(tasks=[4, 16, 32], experts=[4, 16], data=[200, 600, 1800])), lr=1e-2, steps=250,
                  steps_after=150),
}
ARM, BASELINE = "MoE add (task-aware)", "dense"
CLAIM = "(iii) adding unrelated tasks hurts task-aware MoE less (scale sweep)"
WORDS = {"tasks": "unrelated tasks added", "experts": "experts", "data": "examples per base task"}


def setting(cfg, point) -> dict:
    """E4's preset at this point: T unrelated tasks (⌈T/2⌉ value maps, ⌊T/2⌋ memorisation), E experts, n per
    base task."""
    T = point["tasks"]
    return {**cfg, "unrelated": dict(value=T - T // 2, memorise=T // 2), "num_experts": point["experts"],
            "n_per_task": point["data"]}


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    cfg = preset_config(PRESETS, preset, seeds)

    def delta(arm):
        def at(point, seed):
            _, only_base, with_unrelated = forgetting(arm, setting(cfg, point), cfg["lr"], seed)
            return with_unrelated - only_base

        return at

    moe, dense = delta(ARM), cached(delta(BASELINE), ignore=("experts",))  # dense does not use E

    def notes(backend, timer):
        return [f"Base tasks: {', '.join('+'.join(t) for t in cfg['base'])}; Δ = base accuracy after base + unrelated "
                f"minus after base only (higher = less forgetting), mean over seeds of Δ per arm in the table. Phase "
                f"1: {cfg['steps']} steps, batch {cfg['batch_size']}; each continuation: {cfg['steps_after']} steps "
                f"(fresh Adam), base only at batch {cfg['batch_size']}, base + unrelated at batch "
                f"{2 * cfg['batch_size']} (exposure-matched). Transformer d_model={cfg['d_model']}, {cfg['n_layers']} "
                f"layers, d_ff={cfg['d_ff']}; MoE: every block, E experts, top-1; lr {cfg['lr']} for both arms (E4's "
                f"tuned lr); {timer.describe()}."]

    return sweep_experiment("e9_sweep_unrelated", experiment="e9", title="E9 — claim (iii) against scale",
                            preset=preset, cfg=cfg, measure=lambda p, seed: (moe(p, seed), dense(p, seed)), claim=CLAIM,
                            arm=ARM, baseline=BASELINE, metric="Δ base accuracy", words=WORDS, notes=notes,
                            plot_name="e9_sweep_unrelated.png", out=out, log=log)
