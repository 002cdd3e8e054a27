"""A tiny sequence run (2 tasks, a 1-block MoE transformer, a few steps on the NumPy backend) as a TOML run config,
shared by the command-line, bad-input and kill tests; each passes the keys it needs to differ."""
from tinymoe.config_docs import toml_value


def tiny_run_toml(name="tiny", *, data=None, model=None, optim=None) -> str:
    sections = {
        "data": {"kind": "sequence", "tasks": ["copy", "reverse"], "n_per_task": 30, "seq_len": 4, "vocab_size": 5,
                 **(data or {})},
        "model": {"d_model": 8, "n_layers": 1, "n_heads": 2, "d_ff": 8, "num_experts": 4, "k": 2, "moe_every": 1,
                  "router": "add", "task_embedding": True, **(model or {})},
        "optim": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "eval_every": 3, **(optim or {})},
    }
    lines = [f"name = {toml_value(name)}", 'backend = "numpy"']
    for section, values in sections.items():
        lines += ["", f"[{section}]", *(f"{key} = {toml_value(value)}" for key, value in values.items())]
    return "\n".join(lines) + "\n"
