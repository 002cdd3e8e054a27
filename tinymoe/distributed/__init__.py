"""Expert parallelism on MPI (mpi4py): experts spread over processes, tokens travel to them by all-to-all.

    mpiexec -n 4 tinymoe train --set model.num_experts=8      # the demo, 2 experts on each of 4 ranks

    from tinymoe.distributed import ExpertParallel, world
    par = ExpertParallel(model, world())      # rank r keeps experts [r·E/P, (r+1)·E/P) of every MoE layer
    fit(model, train, val, optim, parallel=par)

With P ranks and E experts (E divisible by P), every rank routes its own shard of the batch, sends each token row
to the rank that owns its expert (Alltoall of the counts, Alltoallv of the rows), runs its local experts through
the active backend, sends the results back and combines them (GShard, Lepikhin et al. 2021 §3; DeepSpeed-MoE,
Rajbhandari et al. 2022 §5). Everything that is not an expert is data-parallel: gradients summed with a bucketed
Allreduce. The auxiliary losses use the statistics of the global batch. docs/distributed.md has the whole story:
the math, capacity under expert parallelism, the cost model.

Files: comm.py (start-up, abort on error) · ops.py (all-to-all and all-reduce as autodiff ops) · layer.py (the
expert-parallel MoE layer) · parallel.py (sharding a model, gradient sync, checkpoints) · run.py (`tinymoe train`
under mpiexec).
"""
from .comm import ExpertLayoutError, abort_on_error, check_layout, launched_by_mpi, world
from .layer import ExpertParallelMoE, expert_parallel_mixture
from .ops import all_to_all, allreduce_sum
from .parallel import ExpertParallel

__all__ = ["world", "launched_by_mpi", "abort_on_error", "check_layout", "ExpertLayoutError", "all_to_all",
           "allreduce_sum", "ExpertParallelMoE", "expert_parallel_mixture", "ExpertParallel"]
