"""A stand-in for CuPy on the CPU, for tests: the cupy backend's own code runs end to end without a GPU.

* `build_kernels(folder)`: the backend's CUDA source (backends/cupy/_kernels.py) compiled as C++ with a small CUDA
  shim — blockIdx, threadIdx, a barrier for __syncthreads, warp shuffles through a slot array — and C wrappers
  taking the launch dimensions; element-wise kernels run thread by thread, the two whose threads cooperate run one
  std::thread per CUDA thread of a block.
* `HostCublas`: cuBLAS's gemm contract (column-major, C = α·op(A)·op(B) + β·C, leading dimensions) on host memory.
* `make_cupy(lib)`: the few CuPy names the backend uses, on NumPy arrays that carry `.data.ptr` and `.get()`, with
  `RawModule` kernels dispatched to the host-compiled library.
* `standin(lib)`: the cupy backend switched onto all of that inside a `with` block.

Nothing here says anything about speed, or about what NVRTC, the GPU or real cuBLAS do (tests/test_cupy_backend.py
checks those where a GPU is).
"""
import contextlib
import ctypes
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from tinymoe.backends import cupy as cupy_backend
from tinymoe.backends.cupy import _gemm, _kernels

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

SHIM = r"""
// just enough CUDA to run the kernels on the host: one std::thread per CUDA thread of a block (blocks in turn),
// a barrier for __syncthreads, and warp shuffles through a shared slot array and a per-warp barrier
#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>
using std::exp; using std::tanh; using std::fabs; using std::sqrt;
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Dim3 threadIdx, blockIdx;
static thread_local unsigned linear_id;
static Dim3 blockDim, gridDim;
static std::barrier<>* block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
static double slots[1024];
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
template <typename F> F __shfl_down_sync(unsigned, F v, int offset) {  // lane + offset past the warp: own value
    unsigned warp = linear_id / 32, lane = linear_id % 32;
    slots[linear_id] = (double)v;
    warp_barriers[warp]->arrive_and_wait();
    F r = lane + offset < 32 ? (F)slots[warp * 32 + lane + offset] : v;
    warp_barriers[warp]->arrive_and_wait();
    return r;
}

template <typename K, typename... A>
void launch_serial(unsigned gx, unsigned gy, unsigned bx, unsigned by, K kernel, A... args) {  // no cooperation
    gridDim = {gx, gy, 1};
    blockDim = {bx, by, 1};
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x)
            for (unsigned ty = 0; ty < by; ++ty)
                for (unsigned tx = 0; tx < bx; ++tx) {
                    threadIdx = {tx, ty, 0};
                    blockIdx = {x, y, 0};
                    linear_id = ty * bx + tx;
                    kernel(args...);
                }
}

template <typename K, typename... A>
void launch(unsigned gx, unsigned gy, unsigned bx, unsigned by, K kernel, A... args) {  // threads of a block at once
    gridDim = {gx, gy, 1};
    blockDim = {bx, by, 1};
    unsigned n = bx * by;  // a multiple of 32 here
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            std::barrier<> block(n);
            block_barrier = &block;
            warp_barriers.clear();
            for (unsigned w = 0; w < n / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
            std::vector<std::thread> threads;
            for (unsigned ty = 0; ty < by; ++ty)
                for (unsigned tx = 0; tx < bx; ++tx)
                    threads.emplace_back([=] {
                        threadIdx = {tx, ty, 0};
                        blockIdx = {x, y, 0};
                        linear_id = ty * bx + tx;
                        kernel(args...);
                    });
            for (auto& t : threads) t.join();
        }
}
"""

WRAPPERS = r"""
#define LL long long
#define DIMS unsigned gx, unsigned gy, unsigned bx, unsigned by
#define WRAPPERS(F, S) \
extern "C" void gather_rows_##S(DIMS, const F* x, const LL* order, LL k, LL R, LL d, F* xs) \
    { launch_serial(gx, gy, bx, by, gather_rows<F>, x, order, k, R, d, xs); } \
extern "C" void gather_rows_backward_##S(DIMS, const F* dxs, const LL* inv, LL k, LL T, LL d, F* dx) \
    { launch_serial(gx, gy, bx, by, gather_rows_backward<F>, dxs, inv, k, T, d, dx); } \
extern "C" void combine_rows_##S(DIMS, const F* out, const F* w, const LL* inv, LL k, LL T, LL d, F* y) \
    { launch_serial(gx, gy, bx, by, combine_rows<F>, out, w, inv, k, T, d, y); } \
extern "C" void combine_backward_rows_##S(DIMS, const F* dy, const F* w, const LL* inv, LL k, LL n, LL d, F* dout) \
    { launch_serial(gx, gy, bx, by, combine_backward_rows<F>, dy, w, inv, k, n, d, dout); } \
extern "C" void combine_backward_weights_##S(DIMS, const F* dy, const F* out, const LL* inv, LL k, LL n, LL d, F* dw) \
    { launch(gx, gy, bx, by, combine_backward_weights<F>, dy, out, inv, k, n, d, dw); } \
extern "C" void bias_act_##S(DIMS, const F* in, const F* bias, const LL* offsets, int E, LL R, LL n, int act, F* pre, \
                             F* post) \
    { launch_serial(gx, gy, bx, by, bias_act<F>, in, bias, offsets, E, R, n, act, pre, post); } \
extern "C" void act_grad_mul_##S(DIMS, F* gr, const F* h, LL n, int act) \
    { launch_serial(gx, gy, bx, by, act_grad_mul<F>, gr, h, n, act); } \
extern "C" void segment_column_sums_##S(DIMS, const F* x, const LL* offsets, LL n, F* out) \
    { launch(gx, gy, bx, by, segment_column_sums<F>, x, offsets, n, out); } \
extern "C" void adam_step_##S(DIMS, F* p, const F* g, F* m, F* v, LL n, double b1, double b2, double eps, double step, \
                              double inv_root_bc2, double decay) \
    { launch_serial(gx, gy, bx, by, adam_step<F>, p, g, m, v, n, b1, b2, eps, step, inv_root_bc2, decay); }
WRAPPERS(float, f32)
WRAPPERS(double, f64)
"""


def build_kernels(folder):
    """The kernels compiled for the host into `folder` (a ctypes library); pytest.skip without a C++20 compiler."""
    if CXX is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) to run the CUDA kernels on the host")
    probe = folder / "barrier_probe.cpp"  # a compiler without C++20's <barrier> is a reason to skip; nothing else is
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    done = subprocess.run([CXX, "-std=c++20", "-pthread", str(probe), "-o", str(folder / "barrier_probe")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"{CXX} has no C++20 <barrier>: {(done.stderr.splitlines() or ['?'])[0]}")
    src, so = folder / "kernels_host.cpp", folder / "kernels_host.so"
    src.write_text(SHIM + _kernels.SOURCE + WRAPPERS)
    done = subprocess.run([CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(src), "-o", str(so)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]  # the kernel source itself failed to compile: an error
    return ctypes.CDLL(str(so))


SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def c_args(args):
    """ctypes arguments: arrays by address, None or np.uint64 as a pointer, np.int32 as int, floats as double, other
    numbers as long long (the types the backend passes to its kernels)."""
    converted = []
    for a in args:
        if a is None:
            converted.append(ctypes.c_void_p(0))
        elif isinstance(a, np.ndarray):
            assert a.flags.c_contiguous
            converted.append(ctypes.c_void_p(a.ctypes.data))
        elif isinstance(a, np.uint64):
            converted.append(ctypes.c_void_p(int(a)))
        elif isinstance(a, np.int32):
            converted.append(ctypes.c_int(int(a)))
        elif isinstance(a, (float, np.floating)):
            converted.append(ctypes.c_double(float(a)))
        else:
            converted.append(ctypes.c_longlong(int(a)))
    return converted


def launch(lib, name, dtype, grid, block, args):
    """Run kernel `name` for `dtype` with CUDA launch dimensions grid, block (tuples of 1 or 2)."""
    gx, gy = (tuple(grid) + (1,))[:2]
    bx, by = (tuple(block) + (1,))[:2]
    getattr(lib, f"{name}_{SUFFIX[np.dtype(dtype)]}")(*(ctypes.c_uint(v) for v in (gx, gy, bx, by)), *c_args(args))


class HostArray:
    """A NumPy array dressed as a CuPy one for _gemm.gemm (`.data.ptr`, `.dtype`, `.reshape`)."""

    def __init__(self, a):
        self.a = a
        self.dtype = a.dtype
        self.data = types.SimpleNamespace(ptr=a.ctypes.data)

    def reshape(self, *shape):
        return self.a.reshape(*shape)


def _matrix(ptr, rows, cols, ld, dtype):
    """The column-major rows × cols matrix at address ptr with leading dimension ld, as a writable NumPy view."""
    size = np.dtype(dtype).itemsize
    extent = (cols - 1) * ld + rows
    buf = np.ctypeslib.as_array((ctypes.c_byte * (extent * size)).from_address(ptr)).view(dtype)
    return np.lib.stride_tricks.as_strided(buf, shape=(rows, cols), strides=(size, ld * size))


class HostCublas:
    """cuBLAS's gemm contract on host memory: C = α·op(A)·op(B) + β·C, column-major, op(A) m × k, op(B) k × n."""

    calls = 0

    def _one(self, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, dtype):
        A = _matrix(A, k, m, lda, dtype).T if ta else _matrix(A, m, k, lda, dtype)
        B = _matrix(B, n, k, ldb, dtype).T if tb else _matrix(B, k, n, ldb, dtype)
        Cm = _matrix(C, m, n, ldc, dtype)
        a = np.frombuffer(ctypes.string_at(alpha, np.dtype(dtype).itemsize), dtype)[0]
        b = np.frombuffer(ctypes.string_at(beta, np.dtype(dtype).itemsize), dtype)[0]
        Cm[...] = a * (A @ B) + (b * Cm if b else 0)

    def getPointerMode(self, handle):
        return 0

    def gemmEx(self, handle, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, compute, algo):
        assert at == bt == ct and compute in (68, 77, 70)
        HostCublas.calls += 1
        self._one(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, np.float64 if at == 1 else np.float32)

    def gemmStridedBatchedEx(self, handle, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc,
                             sc, batch, compute, algo):
        HostCublas.calls += 1
        dtype = np.float64 if at == 1 else np.float32
        size = np.dtype(dtype).itemsize
        for i in range(batch):
            self._one(ta, tb, m, n, k, alpha, A + i * sa * size, lda, B + i * sb * size, ldb, beta, C + i * sc * size,
                      ldc, dtype)


@contextlib.contextmanager
def host_cublas():
    """_gemm.gemm calling HostCublas (and a stand-in `cupy` for its handle) inside the block."""
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(device=types.SimpleNamespace(
        get_cublas_handle=lambda: 0)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", fake_cupy)
        mp.setattr(_gemm, "_cublas", HostCublas())
        HostCublas.calls = 0
        yield HostCublas




class DeviceArray(np.ndarray):
    """A NumPy array dressed as a CuPy one: `.data.ptr` (its address, for the cuBLAS stand-in) and `.get()`."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self):
        return np.array(self)


def _dev(a):
    return a.view(DeviceArray) if isinstance(a, np.ndarray) else a


class _Kernel:
    def __init__(self, lib, expression):
        name, ctype = expression[:-1].split("<")
        self.lib, self.name = lib, name
        self.dtype = {"float": np.float32, "double": np.float64}[ctype]

    def __call__(self, grid, block, args):
        launch(self.lib, self.name, self.dtype, grid, block, args)


class _Module:
    def __init__(self, lib, code, options=(), name_expressions=()):
        assert code == _kernels.SOURCE
        self.lib, self.names = lib, set(name_expressions)

    def get_function(self, expression):
        assert expression in self.names, expression
        return _Kernel(self.lib, expression)


def make_cupy(lib):
    """The CuPy names the cupy backend and _gemm use, on NumPy, kernels from `lib`."""
    def wrap(fn):
        return lambda *a, **k: _dev(fn(*a, **k))

    def asarray(a, dtype=None):
        return _dev(np.array(a, dtype=dtype, copy=not isinstance(a, DeviceArray) or dtype not in (None, a.dtype)))

    stream = types.SimpleNamespace(synchronize=lambda: None)
    cuda = types.SimpleNamespace(device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
                                 get_current_stream=lambda: stream)
    return types.SimpleNamespace(
        ndarray=DeviceArray, asarray=asarray, int32=np.int32, int64=np.int64, bool_=np.bool_, float32=np.float32,
        ascontiguousarray=wrap(np.ascontiguousarray), where=wrap(np.where), arange=wrap(np.arange),
        zeros=wrap(np.zeros), empty=wrap(np.empty), full=wrap(np.full), empty_like=wrap(np.empty_like),
        zeros_like=wrap(np.zeros_like), argsort=wrap(lambda a: np.argsort(a, kind="stable")),  # CuPy's is stable
        searchsorted=wrap(lambda a, v: np.searchsorted(np.asarray(a), np.asarray(v))),
        RawModule=lambda **kw: _Module(lib, **kw), cuda=cuda)


@contextlib.contextmanager
def standin(lib):
    """The cupy backend on the CPU stand-ins inside the block (its kernel cache and CuPy handle restored after)."""
    fake = make_cupy(lib)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cupy_backend, "cp", fake)
        mp.setattr(cupy_backend, "_module", None)
        mp.setattr(_gemm, "_cublas", HostCublas())
        mp.setitem(sys.modules, "cupy", fake)
        yield fake
