"""How tests/legacy/*.safetensors were written: ONCE, by tinymoe at commit bc0f03f (before the MoE layer was
rebuilt around per-gate specs). Do not rerun it to "fix" a failing test: the files are the evidence that
checkpoints written by an older tinymoe still load and compute the same outputs (tests/test_legacy_checkpoints.py).

Each file is a model with perturbed weights (so a model rebuilt but not loaded would differ) and, as extra
tensors, a fixed input and the output that version computed on the NumPy backend in eval mode (and, for noisy
top-k, one training-mode output: it draws from the layer's saved noise generator).
"""
import os

import numpy as np

import tinymoe as tm
from tinymoe.experiments.common import SharedBottom

HERE = os.path.dirname(os.path.abspath(__file__))


def perturb(model, seed):
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data = p.data + rng.normal(0, 0.3, p.shape).astype(p.dtype)


def moe_cases():
    """name -> (constructor kwargs) of tm.nn.MoE covering every gate, router and option."""
    base = dict(d_model=6, d_ff=8, num_experts=5)
    return {
        "moe_top_k_token": dict(base, gate="top_k", k=2),
        "moe_top1_capacity_weight": dict(base, gate="top_k", k=1, capacity_factor=0.8, priority="weight"),
        "moe_softmax_concat": dict(base, gate="softmax", router="concat", num_tasks=3, task_dim=4),
        "moe_noisy_top_k_add": dict(base, gate="noisy_top_k", k=2, router="add", num_tasks=3, num_shared_experts=1),
        "moe_dselect_k_task": dict(base, gate="dselect_k", k=2, router="task", num_tasks=3, gamma=2.0),
        "moe_dselect_k_multi_gate": dict(base, gate="dselect_k", k=2, router="multi_gate", num_tasks=3),
        "moe_expert_choice_descriptions": dict(base, gate="expert_choice", k=2, capacity_factor=1.5, router="add",
                                               num_tasks=3, task_descriptions=[[0, 1], [1, 2], [2]]),
        "moe_expert_choice_default_capacity": dict(base, gate="expert_choice", k=1),
        "moe_hash": dict(base, gate="hash", k=2),
    }


def main():
    tm.set_backend("numpy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    tasks = rng.integers(0, 3, 10)
    token_ids = rng.integers(0, 50, 10)
    for i, (name, kwargs) in enumerate(moe_cases().items()):
        moe = tm.nn.MoE(**kwargs, seed=i)
        perturb(moe, 100 + i)
        extra = {"x": x, "task_ids": tasks}
        call = {"task_ids": tasks}
        if kwargs["gate"] == "hash":
            call, extra = {"token_ids": token_ids}, {"x": x, "token_ids": token_ids}
        moe.eval()
        with tm.no_grad():
            extra["y"] = moe(x, **call).numpy()
            total = moe.aux_loss()
            extra["aux"] = np.array(getattr(total, "data", total), np.float32)
        if kwargs["gate"] == "noisy_top_k":  # the training output depends on the saved noise generator's state
            moe.train()
            state = moe.noise_rng.bit_generator.state
            with tm.no_grad():
                y_train = moe(x, **call).numpy()
            moe.noise_rng.bit_generator.state = state
            extra["y_train"] = y_train
        moe.eval()
        tm.save(os.path.join(HERE, f"{name}.safetensors"), moe, extra_tensors=extra)

    xm = rng.standard_normal((7, 6)).astype(np.float32)
    multi = {
        "multigate_softmax": dict(gate="softmax"),
        "multigate_top_k": dict(gate="top_k", k=2),
        "multigate_dselect_k_static": dict(gate="dselect_k", k=2),
        "multigate_dselect_k_per_example": dict(gate="dselect_k", k=2, per_example=True, d_hidden=5),
    }
    for i, (name, kwargs) in enumerate(multi.items()):
        mg = tm.nn.MultiGateMoE(6, 4, 5, 2, seed=i, tower_hidden=3, out_dim=2, **kwargs)
        perturb(mg, 200 + i)
        mg.eval()
        with tm.no_grad():
            outs = mg(xm)
        extra = {"x": xm, **{f"y{t}": o.numpy() for t, o in enumerate(outs)}}
        tm.save(os.path.join(HERE, f"{name}.safetensors"), mg, extra_tensors=extra)

    sb = SharedBottom(6, 4, 2, seed=5, d_hidden=7, tower_hidden=3, out_dim=2)
    perturb(sb, 300)
    with tm.no_grad():
        outs = sb(xm)
    tm.save(os.path.join(HERE, "shared_bottom.safetensors"), sb,
            extra_tensors={"x": xm, **{f"y{t}": o.numpy() for t, o in enumerate(outs)}})

    cfg = tm.ModelConfig(vocab_size=11, max_seq_len=6, d_model=8, n_layers=2, n_heads=2, d_ff=12, num_experts=4, k=2,
                         moe_every=1, router="add", num_tasks=3, task_embedding=True, num_shared_experts=1,
                         capacity_factor=1.25, head="per_task", seed=7)
    model = tm.MoETransformer(cfg)
    perturb(model, 400)
    model.eval()
    tokens = rng.integers(0, 11, (3, 5))
    ttasks = rng.integers(0, 3, 3)
    with tm.no_grad():
        logits = model(tokens, task_ids=ttasks).numpy()
    tm.save(os.path.join(HERE, "transformer_add.safetensors"), model,
            extra_tensors={"tokens": tokens, "task_ids": ttasks, "y": logits})


if __name__ == "__main__":
    main()
