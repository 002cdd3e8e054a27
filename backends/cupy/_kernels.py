"""The CUDA C++ source of the CuPy backend's RawKernels, and how they are compiled.

Every kernel is a template over the float type F (float or double), instantiated for both through NVRTC name
expressions. None uses atomics, and every sum runs in a fixed order, so the same input gives bitwise the same
output on one GPU (the property the tests check): the adjoints of gather and combine are gathers over the inverse
map (each output row reads its k inputs in slot order), never scatter-adds whose order would vary from run to run.

Thread layout: the elementwise kernels use a grid-stride loop over the flattened (rows, columns) array, so neighbour
threads touch neighbour columns (coalesced loads). `combine_backward_weights` gives one warp to each assignment and
reduces the warp with shuffles (a fixed tree); `segment_column_sums` gives a (32 columns × 8 row lanes) block to
each (column tile, expert) and adds the 8 lanes in a fixed order.

This file imports nothing from CuPy: `ptx(arch)` compiles the source with NVRTC alone, which works on a machine
without a GPU, so a CPU test can prove the source compiles (tests/test_cupy_backend.py).
"""
from __future__ import annotations

import math

# name expressions NVRTC instantiates: every kernel for float and double
KERNELS = ("gather_rows", "gather_rows_backward", "combine_rows", "combine_backward_rows", "combine_backward_weights",
           "bias_act", "act_grad_mul", "segment_column_sums", "adam_step")
FLOAT_TYPES = {"float32": "float", "float64": "double"}
ACT_CODES = {"relu": 0, "gelu": 1, "silu": 2}  # the names tinymoe.activations.ACTIVATIONS accepts
IDENTITY = 3  # bias_act with no activation (the second layer's bias)
THREADS = 256  # threads per block of every kernel
WARPS_PER_BLOCK = THREADS // 32
SUM_LANES = 8  # row lanes of segment_column_sums' blocks (blockDim = (32, SUM_LANES))

SOURCE = f"#define SUM_LANES {SUM_LANES}  // row lanes of segment_column_sums (the Python constant)\n" + r"""
// ---- activations: the same formulas as tinymoe/activations.py, in the arrays' precision ----------------------
// GELU is the tanh form (Hendrycks & Gimpel 2016): ½v(1 + tanh(√(2/π)(v + 0.044715v³))).
#define GELU_C 0.7978845608028654
#define GELU_A 0.044715

template <typename F>
__device__ __forceinline__ F sigmoid_(F v) {
    F e = exp(-fabs(v));  // exp of a non-positive number only: stable in both tails
    return v >= F(0) ? F(1) / (F(1) + e) : e / (F(1) + e);
}

template <typename F>
__device__ __forceinline__ F act_forward(F v, int act) {
    if (act == 0) return v > F(0) ? v : (v != v ? v : F(0));  // relu; NaN stays NaN, as np.maximum(NaN, 0)
    if (act == 1) {
        F t = tanh(F(GELU_C) * (v + F(GELU_A) * v * v * v));
        return F(0.5) * v * (F(1) + t);
    }
    if (act == 2) return v * sigmoid_(v);  // silu
    return v;  // identity
}

template <typename F>
__device__ __forceinline__ F act_derivative(F v, int act) {
    if (act == 0) return v > F(0) ? F(1) : F(0);
    if (act == 1) {
        F t = tanh(F(GELU_C) * (v + F(GELU_A) * v * v * v));
        return F(0.5) * (F(1) + t) + F(0.5) * v * (F(1) - t * t) * F(GELU_C) * (F(1) + F(3 * GELU_A) * v * v);
    }
    if (act == 2) {
        F s = sigmoid_(v);
        return s * (F(1) + v * (F(1) - s));
    }
    return F(1);
}

// every thread visits i = its id, id + all threads, ... below n
#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// The expert whose rows hold row r: the largest e with offsets[e] <= r (so empty experts are skipped), or -1 when r
// lies outside offsets[0]:offsets[E]. offsets (E + 1,) is tiny and read by every thread: it stays in cache.
__device__ __forceinline__ int expert_of_row(const long long* offsets, int E, long long r) {
    if (r < offsets[0] || r >= offsets[E]) return -1;
    int lo = 0, hi = E;  // offsets[lo] <= r < offsets[hi]
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (offsets[mid] <= r) lo = mid; else hi = mid;
    }
    return lo;
}

// ---- dispatch (GShard §2.2: the "dispatch" and "combine" of a routing) ----------------------------------------
// xs[r, :] = x[order[r] / k, :]                                          x (T, d), order (R,) -> xs (R, d)
template <typename F>
__global__ void gather_rows(const F* __restrict__ x, const long long* __restrict__ order, long long k, long long R,
                            long long d, F* __restrict__ xs) {
    GRID_STRIDE(i, R * d) {
        long long r = i / d, c = i - r * d;
        xs[i] = x[(order[r] / k) * d + c];
    }
}

// Adjoint of gather, as a gather over the inverse map: dx[t, :] = Σ_j dxs[inverse[t·k + j], :] over kept j, in
// j order.
template <typename F>
__global__ void gather_rows_backward(const F* __restrict__ dxs, const long long* __restrict__ inverse, long long k,
                                     long long T, long long d, F* __restrict__ dx) {
    GRID_STRIDE(i, T * d) {
        long long t = i / d, c = i - t * d;
        F acc = F(0);
        for (long long j = 0; j < k; ++j) {
            long long r = inverse[t * k + j];
            if (r >= 0) acc += dxs[r * d + c];
        }
        dx[i] = acc;
    }
}

// y[t, :] = Σ_j w[t, j]·out[inverse[t·k + j], :] over kept j, in j order (Switch eq. 2; no atomics: one thread per
// output element reads its k rows).                                  out (R, d), w (T, k), inverse (T·k,) -> y (T, d)
template <typename F>
__global__ void combine_rows(const F* __restrict__ out, const F* __restrict__ w, const long long* __restrict__ inverse,
                             long long k, long long T, long long d, F* __restrict__ y) {
    GRID_STRIDE(i, T * d) {
        long long t = i / d, c = i - t * d;
        F acc = F(0);
        for (long long j = 0; j < k; ++j) {
            long long r = inverse[t * k + j];
            if (r >= 0) acc += w[t * k + j] * out[r * d + c];
        }
        y[i] = acc;
    }
}

// Adjoint of combine for out: dout[inverse[a], :] = w[a]·dy[a / k, :] for every kept assignment a = t·k + j. Each row
// of dout belongs to exactly one assignment, so this is a plain write (rows no assignment claims stay as they are).
template <typename F>
__global__ void combine_backward_rows(const F* __restrict__ dy, const F* __restrict__ w,
                                      const long long* __restrict__ inverse, long long k, long long n_assign,
                                      long long d, F* __restrict__ dout) {
    GRID_STRIDE(i, n_assign * d) {
        long long a = i / d, c = i - a * d;
        long long r = inverse[a];
        if (r >= 0) dout[r * d + c] = w[a] * dy[(a / k) * d + c];
    }
}

// Adjoint of combine for the weights: dw[a] = <dy[a / k, :], out[inverse[a], :]> (0 for a dropped assignment).
// One warp per assignment: lane l sums columns l, l + 32, ... in order, then a fixed shuffle tree adds the lanes.
template <typename F>
__global__ void combine_backward_weights(const F* __restrict__ dy, const F* __restrict__ out,
                                         const long long* __restrict__ inverse, long long k, long long n_assign,
                                         long long d, F* __restrict__ dw) {
    long long a = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (a >= n_assign) return;  // blockDim is a multiple of 32: a whole warp leaves together
    long long r = inverse[a];
    F acc = F(0);
    if (r >= 0)
        for (long long c = lane; c < d; c += 32) acc += dy[(a / k) * d + c] * out[r * d + c];
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) dw[a] = acc;
}

// ---- grouped expert FFN: the elementwise parts around the per-expert GEMMs ------------------------------------
// v = in[r, c] (+ bias[e(r), c] when bias is given, e(r) the expert of row r); pre[r, c] = v and post[r, c] = act(v)
// where those outputs are given. Forward, first layer: in = pre = h (in place), post = act(h): the bias and the
// activation in one pass over h. Second layer: in = pre = out, act = identity. Backward: act(h) from the saved h.
// Rows outside offsets[0]:offsets[E] are left alone when a bias is given.
template <typename F>
__global__ void bias_act(const F* in, const F* __restrict__ bias, const long long* __restrict__ offsets, int E,
                         long long R, long long n, int act, F* pre, F* post) {
    GRID_STRIDE(i, R * n) {
        long long r = i / n, c = i - r * n;
        F v = in[i];
        if (bias != nullptr) {
            int e = expert_of_row(offsets, E, r);
            if (e < 0) continue;
            v += bias[e * n + c];
        }
        if (pre != nullptr) pre[i] = v;
        if (post != nullptr) post[i] = act_forward(v, act);
    }
}

// g[i] *= act'(h[i]): the upstream gradient times the activation's derivative, recomputed from the saved
// pre-activation in the same pass (cheaper than storing act'(h) in forward: one pass over memory less).
template <typename F>
__global__ void act_grad_mul(F* __restrict__ g, const F* __restrict__ h, long long n, int act) {
    GRID_STRIDE(i, n) {
        g[i] *= act_derivative(h[i], act);
    }
}

// out[e, c] = Σ_{r in offsets[e]:offsets[e+1]} x[r, c]: the bias gradients of every expert at once. Block
// (32, SUM_LANES): threadIdx.x a column, threadIdx.y one of the row lanes (rows y, y + SUM_LANES, ... in order);
// blockIdx.y the expert. The lane sums are added in lane order; sums run in double. Empty experts get 0.
//                                                                                    x (R, n) -> out (E, n)
template <typename F>
__global__ void segment_column_sums(const F* __restrict__ x, const long long* __restrict__ offsets, long long n,
                                    F* __restrict__ out) {
    __shared__ double part[SUM_LANES][32];
    long long c = blockIdx.x * 32LL + threadIdx.x;
    int e = blockIdx.y;
    double acc = 0.0;
    if (c < n)
        for (long long r = offsets[e] + threadIdx.y; r < offsets[e + 1]; r += SUM_LANES) acc += (double)x[r * n + c];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < n) {
        double s = 0.0;
        for (int q = 0; q < SUM_LANES; ++q) s += part[q][threadIdx.x];
        out[e * n + c] = (F)s;
    }
}

// ---- optimizer ------------------------------------------------------------------------------------------------
// One fused Adam(W) step over a parameter (Kingma & Ba 2015, Algorithm 1; AdamW's decoupled decay, Loshchilov &
// Hutter 2019): m <- b1·m + (1 - b1)·g, v <- b2·v + (1 - b2)·g², p <- decay·p - step·m / (sqrt(v)·inv_root_bc2 + eps),
// each element loaded once, computed in double and rounded once (as the numba backend's kernel does).
template <typename F>
__global__ void adam_step(F* __restrict__ p, const F* __restrict__ g, F* __restrict__ m, F* __restrict__ v,
                          long long n, double b1, double b2, double eps, double step, double inv_root_bc2,
                          double decay) {
    GRID_STRIDE(i, n) {
        double gi = (double)g[i];
        double mi = b1 * (double)m[i] + (1.0 - b1) * gi;
        double vi = b2 * (double)v[i] + (1.0 - b2) * gi * gi;
        m[i] = (F)mi;
        v[i] = (F)vi;
        p[i] = (F)(decay * (double)p[i] - step * mi / (sqrt(vi) * inv_root_bc2 + eps));
    }
}
"""

OPTIONS = ("--std=c++17",)


def name_expressions():
    """Every kernel instantiated for both float types: ["gather_rows<float>", ..., "segment_column_sums<double>"]."""
    return [f"{kernel}<{ctype}>" for kernel in KERNELS for ctype in FLOAT_TYPES.values()]


def blocks(n, threads=THREADS, cap=65535 * 32):
    """Blocks for a grid-stride loop over n items (at least 1; capped: the loop covers the rest)."""
    return max(1, min(math.ceil(n / threads), cap))


def ptx(arch="90"):
    """Compile SOURCE to PTX for compute capability `arch` with NVRTC alone (no GPU, no CuPy device needed).

    Returns {name expression: lowered (mangled) name}; raises RuntimeError with NVRTC's log when it fails.
    Used by the tests to prove the kernels compile on a machine without a GPU."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(SOURCE, "tinymoe_kernels.cu", [], [])
    try:
        names = name_expressions()
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture=compute_{arch}", *OPTIONS])
        except Exception as e:
            raise RuntimeError(f"NVRTC could not compile the tinymoe kernels: {e}\n{nvrtc.getProgramLog(prog)}") \
                from None
        if not nvrtc.getPTX(prog):
            raise RuntimeError("NVRTC returned no PTX for the tinymoe kernels")
        return {name: nvrtc.getLoweredName(prog, name) for name in names}
    finally:
        nvrtc.destroyProgram(prog)
