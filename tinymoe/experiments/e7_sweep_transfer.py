"""E7 — claim (i) against scale: does task-aware routing help the low-resource task with more tasks, more experts
or more data per related task (Gupta et al. 2022, claim i; E2 cannot tell at 7 tasks and 4 experts)?

E2's setting and its pre-declared comparison — MoE add (task-aware) − dense at equal active FLOPs, on the target
task's test accuracy — at every point of a sweep around a base point, one axis at a time (tinymoe.experiments.sweep):
the number of tasks in the mixture T (the target plus T − 1 related tasks: E2's six related tasks first, which hold
the target's parts, then other compositions of up to two primitives), the number of experts E, and the training
examples per related task n. The target keeps its few examples at every point, so its share of the data shrinks as
T or n grows: the question is whether the effect appears as the mixture gets larger, not at equal target exposure.
Both arms use E2's tuned lr and train for the same steps with early stopping on the target's validation accuracy.
"""
from __future__ import annotations

from .common import preset_config
from .e2_transfer import PRESETS as E2_PRESETS
from .e2_transfer import target_accuracy
from .sweep import cached, sweep_experiment, task_pool

PRESETS = {
    "tiny": dict(E2_PRESETS["tiny"], seeds=3, sweep=dict(base=dict(tasks=3, experts=2, data=40),
                 axes=dict(tasks=[2, 3], experts=[2, 4], data=[20, 40])), lr=3e-3, steps=6),
    "small": dict(E2_PRESETS["small"], seeds=8, sweep=dict(base=dict(tasks=16, experts=4, data=300),
                  axes=dict(tasks=[4, 16, 32], experts=[4, 16], data=[100, 300, 900])), lr=1e-2, steps=300),
}
ARM, BASELINE = "MoE add (task-aware)", "dense"
CLAIM = "(i) task-aware routing helps a low-resource task (scale sweep)"
WORDS = {"tasks": "tasks in the mixture", "experts": "experts", "data": "examples per related task"}


def setting(cfg, point) -> dict:
    """E2's preset at this point of the sweep: T − 1 related tasks, E experts, n examples per related task."""
    related = task_pool(cfg["related"], point["tasks"] - 1, exclude=[cfg["target"]], seq_len=cfg["seq_len"],
                        vocab=cfg["vocab"])
    return {**cfg, "related": related, "num_experts": point["experts"], "n_related": point["data"]}


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    cfg = preset_config(PRESETS, preset, seeds)

    def accuracy(arm):
        return lambda point, seed: target_accuracy(arm, setting(cfg, point), cfg["lr"], seed)[1]

    moe, dense = accuracy(ARM), cached(accuracy(BASELINE), ignore=("experts",))  # dense does not use E

    def notes(backend, timer):
        target, largest = "+".join(cfg["target"]), {**cfg["sweep"]["base"], "tasks": max(cfg["sweep"]["axes"]["tasks"])}
        related = ", ".join("+".join(t) for t in setting(cfg, largest)["related"])
        return [f"Target {target}: {cfg['n_target']} training examples, {cfg['n_val']} validation (early stopping on "
                f"the target), {cfg['n_test']} test. Related tasks (the first T − 1 of): {related}. Transformer "
                f"d_model={cfg['d_model']}, {cfg['n_layers']} layers, d_ff={cfg['d_ff']}; MoE: every block, E experts "
                f"of width d_ff, top-1; {cfg['steps']} Adam steps, batch {cfg['batch_size']}, lr {cfg['lr']} for both "
                f"arms (E2's tuned lr); {timer.describe()}.", "", f"Chance accuracy is 1/{cfg['vocab']} = "
                f"{1 / cfg['vocab']:.2f}."]

    return sweep_experiment("e7_sweep_transfer", experiment="e7", title="E7 — claim (i) against scale", preset=preset,
                            cfg=cfg, measure=lambda p, seed: (moe(p, seed), dense(p, seed)), claim=CLAIM, arm=ARM,
                            baseline=BASELINE, metric="target accuracy", words=WORDS, notes=notes,
                            plot_name="e7_sweep_transfer.png", out=out, log=log)
