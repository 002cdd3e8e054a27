"""`tinymoe train` under mpiexec: the same run, its experts spread over the ranks.

    mpiexec -n 4 tinymoe train --set model.num_experts=8 --set optim.steps=300
    mpiexec -n 2 tinymoe train --run-dir runs/demo-ep --resume      # resume on another number of ranks

Every rank builds the same data and model; rank r keeps experts [r·E/P, (r+1)·E/P) of every MoE layer and trains its
part of every batch; rank 0 alone prints, writes metrics.jsonl, the checkpoint (all experts, gathered: a plain
single-process checkpoint that `tinymoe eval` reads) and results.json. An exception on any rank aborts the job.
"""
from __future__ import annotations

from .comm import abort_on_error, world


def train_cli(args, report, describe) -> int:
    """`tinymoe train` on every rank: `report(result, cfg)` prints the summary on the root, `describe(e)` turns an
    error into the CLI's one line (the job then aborts with status 2)."""
    from ..config import load_config
    from ..runs import train_run

    comm = world()
    root = comm.Get_rank() == 0
    with abort_on_error(comm, describe, prefix="tinymoe train"):
        cfg = load_config(args.config, args.set)
        quiet = args.quiet or not root
        if root and not args.quiet:
            print(f"expert parallelism: {comm.Get_size()} MPI ranks, each holding 1/{comm.Get_size()} of every MoE "
                  f"layer's experts")
        result = train_run(cfg, run_dir=args.run_dir, log=(lambda *a: None) if quiet else print, progress=not quiet,
                           resume=args.resume, overwrite=args.overwrite, comm=comm)
        if root:
            report(result, cfg)
    return 0
