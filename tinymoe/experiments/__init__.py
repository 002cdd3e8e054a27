"""The experiments, one small module each, and the `tinymoe experiment` command.

    tinymoe experiment e1 --preset small --out runs/experiments/e1-small
    python -m tinymoe.experiments e2 --preset tiny
    tinymoe experiment report [--run]      # docs/results.md from the saved results (report.py)

| name | module             | question                                                                  |
|------|--------------------|---------------------------------------------------------------------------|
| e1   | e1_gates           | gates on synthetic MTL (Hazimeh et al. 2021): MSE, cluster recovery (ARI) |
| e2   | e2_transfer        | low-resource transfer (Gupta et al. 2022, claim i)                        |
| e3   | e3_unseen          | few-shot unseen tasks via description-composed routing (claim ii)         |
| e4   | e4_unrelated       | adding unrelated tasks (claim iii)                                        |
| e5   | e5_digits          | gates on multi-digit images (Hazimeh et al. 2021, real-data evaluation)   |
| e6   | e6_scale           | cluster recovery against the number of tasks and experts (scale sweep)    |
| e7   | e7_sweep_transfer  | claim (i) against tasks, experts and data per related task (sweep)        |
| e8   | e8_sweep_unseen    | claim (ii) against seen tasks, experts and data per seen task (sweep)     |
| e9   | e9_sweep_unrelated | claim (iii) against unrelated tasks, experts and data per base task       |

Each trains every arm on the same paired seeds and writes results.md (tables and paired comparisons with their
verdicts, tinymoe.experiments.stats), results.json and PNGs into its run folder (--out, default
runs/experiments/<name>-<time>). `--preset tiny` runs in seconds (tests); `--preset small` in minutes.
"""
from __future__ import annotations

import argparse
import os

from .registry import EXPERIMENTS, get


def run(name, preset="small", seeds=None, out=None, log=print) -> dict:
    return get(name).run(preset=preset, seeds=seeds, out=out, log=log)


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "report":
        from .report import main as report_main

        return report_main(argv[1:])
    p = argparse.ArgumentParser(prog="tinymoe experiment", description="Run one of the experiments (e1 .. e9), or "
                                "`tinymoe experiment report` to write docs/results.md.")
    p.add_argument("name", choices=[*EXPERIMENTS, *EXPERIMENTS.values()], help="which experiment")
    p.add_argument("--preset", default="small", choices=["small", "tiny"], help="small: minutes; tiny: seconds")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the preset's)")
    p.add_argument("--out", default=None, help="run folder (default runs/experiments/<name>-<time>)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument("--backend", help="numpy | numba (default: TINYMOE_BACKEND, else numba when installed)")
    args = p.parse_args(argv)
    if args.backend:
        from .. import backends

        backends.load(args.backend)  # fails here, with the reason, if it cannot run
        os.environ["TINYMOE_BACKEND"] = args.backend
    result = run(args.name, args.preset, args.seeds, args.out, log=(lambda *a: None) if args.quiet else print)
    print(result["table"])
    for c in result.get("comparisons", []):
        print(c.sentence())
    print(f"\nwrote {result['dir']}/results.md ({result['seconds']:.0f} s)")
    return 0
