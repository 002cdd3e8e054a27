"""The two collectives of expert parallelism as autodiff ops, plus the row permutation between them.

    y = all_to_all(x, send_counts, recv_counts, comm)  # rows of x in rank blocks -> the rows every rank sent me
    s = allreduce_sum(t, comm)                         # Σ over ranks, the same value on every rank

Adjoints (Lepikhin et al. 2021, §3.2: "the backward pass of AllToAll is again an AllToAll"):
* all-to-all is a permutation of the rows of the global batch across ranks; its adjoint is the inverse
  permutation, the reverse all-to-all (send what you received, receive what you sent).
* y = Σ_r x_r feeds every rank's loss ℓ_s; the objective is Σ_s ℓ_s, so ∂/∂x_r = Σ_s ∂ℓ_s/∂y_s: the adjoint of an
  all-reduce sum is an all-reduce sum of the incoming gradients.
Backward runs in the same order on every rank (the graphs are the same), so the collectives pair up.
"""
from __future__ import annotations

import numpy as np

from ..engine import Tensor


def _alltoallv(data, send_counts, recv_counts, comm):
    """Rows data[offs[p]:offs[p+1]] go to rank p; returns the rows received, in source-rank order. (R, d) -> (R', d)"""
    data = np.ascontiguousarray(data)
    width = int(np.prod(data.shape[1:]))
    send = np.asarray(send_counts, dtype=np.int64) * width
    recv = np.asarray(recv_counts, dtype=np.int64) * width
    out = np.empty((int(np.sum(recv_counts)),) + data.shape[1:], dtype=data.dtype)
    sdispl = np.concatenate([[0], np.cumsum(send)[:-1]])
    rdispl = np.concatenate([[0], np.cumsum(recv)[:-1]])
    comm.Alltoallv([data, (send, sdispl)], [out, (recv, rdispl)])
    return out


def all_to_all(x: Tensor, send_counts, recv_counts, comm) -> Tensor:
    """x (Σ send_counts, d): block p goes to rank p -> (Σ recv_counts, d): block s came from rank s."""
    out = x._make(_alltoallv(x.data, send_counts, recv_counts, comm), (x,), "all_to_all")
    out._backward = lambda g: x._accumulate(_alltoallv(g, recv_counts, send_counts, comm))
    return out


def _allreduce(data, comm):
    send = np.array(data, order="C")  # a copy, 0-d arrays included (ascontiguousarray would make them 1-d)
    out = np.empty_like(send)
    comm.Allreduce(send, out)
    return out


def allreduce_sum(t: Tensor, comm) -> Tensor:
    """Σ_r t_r over the ranks (any shape); the gradient is the all-reduced sum of the gradients (see above)."""
    out = t._make(_allreduce(t.data, comm), (t,), "allreduce_sum")
    out._backward = lambda g: t._accumulate(_allreduce(g, comm))
    return out


def permute_rows(x: Tensor, perm) -> Tensor:
    """y = x[perm] for a permutation `perm`; the adjoint puts each row back: dx[perm] = dy (no scatter-add)."""
    out = x._make(x.data[perm], (x,), "permute_rows")

    def _backward(g):
        dx = np.empty_like(g)
        dx[perm] = g
        x._accumulate(dx)

    out._backward = _backward
    return out
