"""Start-up from mpi4py's COMM_WORLD, the expert layout check, and abort-on-error.

mpi4py is imported lazily: importing it starts MPI, which a single-process user should never pay for (and which
must not happen at all when the `mpi` extra is not installed).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback

# Environment variables the common launchers set in every rank: MPICH's Hydra (PMI_*), Open MPI (OMPI_*), PMIx.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


class ExpertLayoutError(ValueError):
    """The experts cannot be spread evenly over the ranks (E not divisible by P)."""


def mpi():
    """The mpi4py.MPI module, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError("tinymoe.distributed needs mpi4py and an MPI library: pip install 'tinymoe[mpi]' "
                          "(mpi4py plus the MPICH wheel)") from None
    return MPI


def world():
    """MPI.COMM_WORLD: every process that mpiexec started."""
    return mpi().COMM_WORLD


def launched_by_mpi() -> bool:
    """Whether mpiexec started this process with more than one rank (read from the environment, without starting
    MPI: a plain `tinymoe train` stays a single process)."""
    for var in _SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) > 1
    return False


def check_layout(num_experts, size, where="expert parallelism"):
    """E experts over P ranks: each rank owns E/P of them. Raised before any communication, so every rank sees the
    same clear error instead of a hang."""
    if num_experts % size:
        divisors = [p for p in range(1, num_experts + 1) if num_experts % p == 0]
        multiples = [size * m for m in range(1, 5)]
        raise ExpertLayoutError(
            f"{where}: num_experts={num_experts} cannot be split evenly over {size} ranks (each rank owns E/P "
            f"experts). Use num_experts in {multiples} (a multiple of {size}) or run with mpiexec -n in {divisors}.")


@contextlib.contextmanager
def abort_on_error(comm=None, describe=None, prefix="tinymoe"):
    """Any exception on any rank ends the whole job: the rank prints what failed, then calls MPI Abort.

    Without this, the other ranks would wait forever in their next collective for a rank that has died (MPI
    collectives have no timeout). A clean `sys.exit(0)` passes through. `describe(e)` (the CLI's one-line
    description of an error) replaces the traceback unless TINYMOE_DEBUG=1; user mistakes (ValueError,
    ImportError) print their message. The job exits with status 2, as a failed single-process command does."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        comm = comm if comm is not None else world()
        rank, size = comm.Get_rank(), comm.Get_size()
        debug = os.environ.get("TINYMOE_DEBUG", "").strip() not in ("", "0")
        if debug or (describe is None and not isinstance(e, (ValueError, ImportError))):
            text = traceback.format_exc()
        else:
            text = f"{prefix}: error: {describe(e) if describe is not None else e}\n"
        text += f"{prefix}: rank {rank} of {size} failed ({type(e).__name__}); aborting the MPI job\n"
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), text.encode())  # one write, so the launcher forwards it whole
        time.sleep(0.5)  # Abort kills every rank at once: give mpiexec time to forward the message first
        comm.Abort(2)
        raise  # (Abort does not return; this is in case an MPI library lets it)
