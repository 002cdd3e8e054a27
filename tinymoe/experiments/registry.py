"""The experiments by name: the one registry that `tinymoe experiment` and the report both read."""
from __future__ import annotations

import importlib

EXPERIMENTS = {"e1": "e1_gates", "e2": "e2_transfer", "e3": "e3_unseen", "e4": "e4_unrelated", "e5": "e5_digits",
               "e6": "e6_scale", "e7": "e7_sweep_transfer", "e8": "e8_sweep_unseen", "e9": "e9_sweep_unrelated"}


def get(name):
    """The module of experiment `name` ('e1' or 'e1_gates', ...)."""
    key = name.lower()
    for short, module in EXPERIMENTS.items():
        if key in (short, module):
            return importlib.import_module(f"{__package__}.{module}")
    raise ValueError(f"unknown experiment {name!r}; choose one of {list(EXPERIMENTS)} (or {list(EXPERIMENTS.values())})")
