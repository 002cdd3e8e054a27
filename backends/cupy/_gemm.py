"""Row-major GEMMs on slices of CuPy arrays through cuBLAS, with the compute type pinned.

cuBLAS is column-major; a C-contiguous (rows, cols) array is the column-major (cols, rows) matrix, its transpose. So
C = op(A)·op(B) in row-major is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ in column-major: B goes first, and the transpose
flags stand in for copies (`x[s:t].T @ dh` is one call, no transposed copy). Operands are given as a C-contiguous
array plus an element offset, so an expert's rows `xs[s:t]` and its weights `w1[e]` are addressed in place.

The compute type is pinned, the same for the MoE path and the dense baseline it is measured against: float64 in
float64; float32 in float32, or with TF32 tensor cores when CUPY_TF32=1 (CuPy's own switch for its matmuls, so one
setting governs every matmul of a training step). `cupy.matmul` on 3-D arrays ignores that switch and copies
transposed operands, which is why the expert GEMMs call cuBLAS here.

`gemm(..., batch=E, strides=...)` makes one strided-batched call (cublasGemmStridedBatchedEx) for E equal-sized
problems at fixed strides: the expert FFN uses it when every expert holds the same number of rows (expert-choice
routing always does; capacity mode often does), one launch instead of E.
"""
from __future__ import annotations

import os

import numpy as np

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h); stable across CUDA 11-13
_OP_N, _OP_T = 0, 1
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_CUDA_R_32F, _CUDA_R_64F = 0, 1
_GEMM_DEFAULT = -1
_POINTER_MODE_HOST = 0
_ONE = {np.dtype(np.float32): np.ones(1, np.float32), np.dtype(np.float64): np.ones(1, np.float64)}
_ZERO = {dtype: np.zeros(1, dtype) for dtype in _ONE}
_cublas = None


def tf32() -> bool:
    """Whether float32 GEMMs may use TF32 tensor cores (CUPY_TF32=1, as for CuPy's own matmuls)."""
    return os.environ.get("CUPY_TF32", "0").strip() == "1"


def compute_type(dtype) -> int:
    """The cuBLAS compute type for `dtype` (float32 or float64)."""
    if np.dtype(dtype) == np.float64:
        return _COMPUTE_64F
    return _COMPUTE_32F_FAST_TF32 if tf32() else _COMPUTE_32F


def _lib():
    global _cublas
    if _cublas is None:
        from cupy_backends.cuda.libs import cublas  # loads libcublas (ImportError with the reason when missing)

        _cublas = cublas
    return _cublas


def gemm(a, b, c, m, n, k, trans_a=False, trans_b=False, a_at=0, b_at=0, c_at=0, accumulate=False, batch=1,
         strides=(0, 0, 0)):
    """c[m, n] (+)= op(a)[m, k] · op(b)[k, n], row-major, on C-contiguous CuPy arrays of one float dtype.

    a holds op(a) as (m, k) rows starting at element a_at, or (k, m) when trans_a (then op(a) is its transpose);
    likewise b: (k, n), or (n, k) when trans_b; c: (m, n) at c_at. Leading dimensions are the row lengths.
    accumulate: beta = 1 (add into c) instead of overwriting. batch > 1: `batch` such products, the i-th at
    element offsets (a_at, b_at, c_at) + i·strides. Nothing happens when m, n or batch is 0; k = 0 writes zeros.
    """
    import cupy

    if m == 0 or n == 0 or batch == 0:
        return
    if k == 0:  # a product over an empty dimension is 0 (cuBLAS may leave c untouched)
        if not accumulate:
            for i in range(batch):
                start = c_at + i * strides[2]
                c.reshape(-1)[start: start + m * n].fill(0)
        return
    dtype = c.dtype
    size = dtype.itemsize
    cublas = _lib()
    handle = cupy.cuda.device.get_cublas_handle()
    if cublas.getPointerMode(handle) != _POINTER_MODE_HOST:  # alpha and beta below live in host memory
        cublas.setPointerMode(handle, _POINTER_MODE_HOST)
    data_type = _CUDA_R_64F if dtype == np.float64 else _CUDA_R_32F
    # column-major view: C^T (n × m) = op(B)^T (n × k) · op(A)^T (k × m)
    op_b, ld_b = (_OP_T, k) if trans_b else (_OP_N, n)
    op_a, ld_a = (_OP_T, m) if trans_a else (_OP_N, k)
    alpha, beta = _ONE[dtype], (_ONE if accumulate else _ZERO)[dtype]
    pa, pb, pc = a.data.ptr + a_at * size, b.data.ptr + b_at * size, c.data.ptr + c_at * size
    if batch == 1:
        cublas.gemmEx(handle, op_b, op_a, n, m, k, alpha.ctypes.data, pb, data_type, ld_b, pa, data_type, ld_a,
                      beta.ctypes.data, pc, data_type, n, compute_type(dtype), _GEMM_DEFAULT)
    else:
        sa, sb, sc = strides
        cublas.gemmStridedBatchedEx(handle, op_b, op_a, n, m, k, alpha.ctypes.data, pb, data_type, ld_b, sb, pa,
                                    data_type, ld_a, sa, beta.ctypes.data, pc, data_type, n, sc, batch,
                                    compute_type(dtype), _GEMM_DEFAULT)
